"""The output ``net(x)`` returns: a tensor that notices being changed before the loss (docs/maths.md §7.1, "the
loss and the recorded output").

``net.backward(criterion, target)`` and every optimizer's step start the sweep from the **recorded** output X^L:
the loss is theirs to compute. A user who changes the output after ``net(x)`` returned and expects the loss to
see the change (``out = net(x) / T``, ``F.log_softmax(net(x), 1)``, ``net(x).float()``, ``net(x)[:, :10]``,
``net(x).split(…)``, another model applied to it) would train on a loss they did not write, without a word. So
``net(x)`` returns a :class:`RecordedOutput`: the same values (an alias of the recorded tensor, sharing its
storage and version counter), a ``torch.Tensor`` everywhere, which notes

* the first torch call on it that makes floating values from it (a tensor of at least one dimension, or several
  with no integer one among them), **whatever the grad mode**: this library trains without autograd, so
  ``torch.no_grad()`` says nothing about what the user means; ``.data = …`` assignments too;
* every ``torch.nn.functional`` loss applied to it (a loss module calls one), with its settings;

and the recorder refuses the loss after a change, or after a logged loss other than the one it trains, in one
line naming the call, before anything is written (``FPropagation.loss_input``). What passes: ``out.detach()`` and
whatever is made from it, ``out.data`` reads, comparisons, ``argmax``, values with their indices (``max(dim)``,
``topk``, ``sort``), scalars (a logged mean, ``.item()``), constants shaped like it (``zeros_like``,
``x.new_ones``), the same loss as the one trained (the loop that logs ``criterion(out, target)``), and copies of
the same values (``clone``, ``contiguous``, ``.to`` another device), which stay watched with the output's note.
Not seen (documented, not detected): a deliberate escape from ``__torch_function__`` (``out.as_subclass(Tensor)``,
``Tensor._make_subclass``, ``torch.utils.swap_tensors``) and ``torch.vmap`` over it.

When the output needs a gradient as autograd has it (a trainable parameter upstream, grad enabled at ``net(x)``),
every floating result of a call on it made with grad enabled (``out * 1.0``, ``out[:2]``, ``out.mean()``,
``torch.cat([out, x])``) is watched too, sharing its note, and so is every floating result made from one, and a
tensor written with one in place (``buf[:] = out``, ``z.copy_(out)``, through a view of ``buf`` too: a plain
tensor's class becomes ``RecordedOutput``, the same object): a recorded forward it is fed into (``net(net(x))``,
``h = net(h)`` in a loop, ``dec(enc(x))`` with two wrappers, a tensor kept in an attribute) refuses it — autograd
would backpropagate through both forwards, the sweep covers the one it records only — and so does a loss given it
as its target (autograd would differentiate through it); ``out.detach()`` is the way to feed it on,
``buf.detach_()`` makes a written tensor a constant again. What is made under ``torch.no_grad()`` is a constant, as
in autograd. The library's own entries take such a tensor as a plain
one (a top signal computed from the output: ``sweep.check_out_adj``). With nothing trainable upstream (a frozen
teacher) the results are plain tensors and the output is a plain input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import called_loss_identity, needs_gradient
from .tape import _op_name
from .tape_writes import _writes_first_argument

__all__ = ["RecordedOutput", "OutputNote", "watch_output", "unwatched", "refuse_fed_output", "refuse_fed_target"]

# calls whose floating result is no stand-in for the output (autograd gives it no gradient either)
_READS = frozenset({
    Tensor.detach, torch.detach, Tensor.data.__get__, Tensor._base.__get__, Tensor.requires_grad_, Tensor.new_zeros,
    Tensor.new_ones, Tensor.new_full, Tensor.new_empty, Tensor.new_tensor, torch.zeros_like, torch.ones_like,
    torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like, torch.randint_like,
})
# copies of the same values (same shape and dtype): the copy stays watched, sharing the output's note
_COPIES = frozenset({Tensor.clone, torch.clone, Tensor.contiguous, Tensor.to, Tensor.cpu, Tensor.cuda, Tensor.float,
                     Tensor.double, Tensor.half, Tensor.bfloat16, Tensor.type_as})
# torch.nn.functional's losses (the loss modules call them): noted with their settings, compared at the loss
_LOSSES = frozenset(getattr(F, name) for name in dir(F) if name.endswith("_loss") or name in (
    "cross_entropy", "binary_cross_entropy", "binary_cross_entropy_with_logits", "kl_div"))


class OutputNote:
    """What happened to one forward's returned output: ``change`` (the first call that made a stand-in for it, by
    name) and ``losses`` ([(name, identity)] of every loss applied to it, ``losses.called_loss_identity``);
    ``needs``: a trainable parameter lies upstream of it (autograd's ``requires_grad`` of the output)."""

    __slots__ = ("change", "losses", "needs")

    def __init__(self, needs: bool = False):
        self.change: str | None = None
        self.losses: list[tuple[str, tuple | None]] = []
        self.needs = needs

    def changed(self, name: str) -> None:
        if self.change is None:
            self.change = name


class RecordedOutput(Tensor):
    """The output of a recorded forward: a ``torch.Tensor`` that notes what is done to it (see the module
    docstring) into the :class:`OutputNote` it shares with the recorder."""

    _fadjoint_note: OutputNote
    _fadjoint_copy = False  # a copy (clone, .to) shares the note, not the recorded output's version counter
    _fadjoint_needs = False  # computed from a recorded output that has trainable parameters upstream
    _fadjoint_derived = False  # computed from one (``_derived``) or written with one (``_watch_written``): not it

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is Tensor.detach_ and isinstance(args[0], RecordedOutput):
            return _detached_in_place(args[0])
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        watched = _outputs_in(args, kwargs)
        if func in _LOSSES:
            identity = called_loss_identity(func, args, kwargs)
            for value in watched:
                value._fadjoint_note.losses.append((_op_name(func), identity))
        elif getattr(func, "__name__", "") == "__set__":  # out.data = …: the alias would change, not the record
            for value in watched:
                value._fadjoint_note.changed(f"Tensor.{getattr(func.__self__, '__name__', '?')} = … (an assignment)")
        elif (func in _COPIES and isinstance(result, Tensor) and watched and result is not watched[0]
              and result.shape == watched[0].shape and result.dtype == watched[0].dtype):
            copy = watch_output(result, watched[0]._fadjoint_note)  # the same values: watched as the output is
            copy._fadjoint_copy = True  # its own version counter: a change in place is noted, not versioned
            copy._fadjoint_needs = watched[0]._fadjoint_needs and torch.is_grad_enabled()
            return copy
        elif func not in _READS:
            written = _written(func, args, kwargs)
            if written is not None and not (written is result is watched[0] and len(watched) == 1):
                # written in place with watched tensors read (buf[:] = out, z.copy_(out), preds[i:j].copy_(out)):
                # the one written carries them on; a copy or stand-in written is noted; the output itself is
                # its version counter's to refuse
                if isinstance(written, RecordedOutput) and written._fadjoint_copy:
                    written._fadjoint_note.changed(_op_name(func))
                sources = [value for value in watched if value is not written]
                if torch.is_grad_enabled() and any(value._fadjoint_needs for value in sources):
                    _watch_written(written, sources[0]._fadjoint_note)
                return result  # the very object written (a parameter's -= stays a parameter's)
            needs = any(value._fadjoint_needs for value in watched) and torch.is_grad_enabled()  # as requires_grad
            if _stands_in(result):
                for value in watched:
                    if result is not value or value._fadjoint_copy:  # in place on the output: its version refuses it
                        value._fadjoint_note.changed(_op_name(func))
            if needs and not any(result is value for value in watched):
                return _derived(result, watched)
        return result

    def __repr__(self, *, tensor_contents=None):
        """Printed as the tensor it is (``tensor([...])``): the watching is not part of its value."""
        return self.as_subclass(Tensor).__repr__(tensor_contents=tensor_contents)

    def __format__(self, spec: str) -> str:
        """Formatted as the tensor it is (``f"{out.mean():.3f}"``: a scalar's number)."""
        return self.as_subclass(Tensor).__format__(spec)

    def __deepcopy__(self, memo):
        """A copy is a plain tensor (a copy is not the recorded output), made as torch copies one: a leaf stays a
        leaf, and tensors sharing memory in one ``deepcopy`` share it in the copy."""
        return Tensor.__deepcopy__(self.as_subclass(Tensor), memo)

    def __reduce_ex__(self, protocol):
        """Saved (``torch.save``, pickle) as the plain tensor it is: ``torch.load(weights_only=True)`` reads it."""
        return self.as_subclass(Tensor).__reduce_ex__(protocol)


def _stands_in(result) -> bool:
    """Whether ``result`` could be taken for the output by a loss: floating values of at least one dimension, or
    several floating tensors with no integer one among them (``split``; ``max(dim)`` gives values *and* indices)."""
    if isinstance(result, Tensor):
        return result.dim() >= 1 and (result.is_floating_point() or result.is_complex())
    if isinstance(result, (tuple, list)) and result and all(isinstance(item, Tensor) for item in result):
        return all(item.is_floating_point() or item.is_complex() for item in result)
    return False


def _floating(value) -> bool:
    return isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex())


def _derived(result, watched: list[RecordedOutput]):
    """``result``'s floating tensors (made from ``watched``, one of which has a trainable parameter upstream:
    ``out * 1.0``, ``out[:2]``, ``out.mean()``, ``torch.cat([out, x])``, ``out.max(1).values``) watched too, with the
    first one's note: a recorded forward they are fed into refuses them (autograd would backpropagate into the
    forward that made them; :func:`unwatched`). The library's own entries take them as plain tensors (a top signal:
    ``sweep.check_out_adj``). Integer results (``argmax``, indices) stay plain, as autograd gives them no gradient."""
    note = watched[0]._fadjoint_note

    def watch(tensor: Tensor) -> RecordedOutput:
        derived = watch_output(tensor, note)
        derived._fadjoint_needs = derived._fadjoint_derived = True  # not a copy: a write into it changes no output
        # (one into a view of the output is the output's version counter's to refuse)
        return derived

    if _floating(result):
        return watch(result)
    if isinstance(result, (tuple, list)) and any(_floating(item) for item in result):  # split, max(dim), aminmax
        return type(result)([watch(item) if _floating(item) else item for item in result])
    return result


def _detached_in_place(value: RecordedOutput) -> RecordedOutput:
    """``value.detach_()``, as autograd's: a constant from now on (truncated backpropagation: ``h = net(x + h);
    h.detach_()``). A stand-in, or a tensor written with one, becomes a plain tensor; the output (or a copy) stays
    watched for its loss but needs no gradient. torch's own ``detach_`` refuses the output's alias (a view), and
    there is no graph to cut (the recorder builds none)."""
    if value._fadjoint_derived:
        value.__class__ = Tensor
    else:
        value._fadjoint_needs = False
    return value


def _written(func, args: tuple, kwargs: dict):
    """The tensor a call writes in place (its ``out=``, the first argument of ``x.add_(…)``, ``x[i] = …``), or None."""
    target = kwargs.get("out")
    if target is None and args and _writes_first_argument(func):  # the tape's own test of an in-place call
        target = args[0]
    return target if isinstance(target, Tensor) else None


def _watch_written(target: Tensor, note: OutputNote) -> None:
    """``target``, written in place with a watched tensor that needs a gradient (``buf[:] = out``, ``z.copy_(out)``,
    ``z.add_(out)``, a view of ``buf`` written), is watched from now on, and so is the tensor it is a view of: a plain
    tensor's class becomes :class:`RecordedOutput` (the same object: the user's name for it sees the change), a
    tensor of another subclass is flagged (``_fadjoint_needs``), a parameter is left alone (a recorded forward reading
    it trains it). ``target.detach_()`` makes it a constant again."""
    for tensor in (target, target._base):
        if type(tensor) is Tensor and (tensor.is_floating_point() or tensor.is_complex()):
            tensor.__class__ = RecordedOutput
            tensor._fadjoint_note, tensor._fadjoint_needs, tensor._fadjoint_derived = note, True, True
        elif tensor is not None and not isinstance(tensor, nn.Parameter):
            try:
                tensor._fadjoint_needs = True
            except AttributeError:  # a subclass without instance attributes: refused below rather than missed
                raise ValueError(f"a {type(tensor).__name__} written in place with the output of a recorded forward "
                                 "that needs a gradient cannot be watched; write out.detach() into it") from None


def _outputs_in(args: tuple, kwargs: dict) -> list[RecordedOutput]:
    """The watched outputs among a call's arguments (top level and inside lists or tuples)."""
    found = []
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, RecordedOutput):
            found.append(arg)
        elif isinstance(arg, (list, tuple)):
            found.extend(item for item in arg if isinstance(item, RecordedOutput))
    return found


def watch_output(output: Tensor, note: OutputNote) -> RecordedOutput:
    """``output`` as a :class:`RecordedOutput` writing into ``note`` (an alias: same storage, same version)."""
    watched = output.as_subclass(RecordedOutput)
    watched._fadjoint_note = note
    watched._fadjoint_needs = note.needs
    return watched


def refuse_fed_output(value, where: str) -> None:
    """ValueError when ``value`` is a recorded output, or was computed from one, with a trainable parameter upstream:
    read by the recorded forward ``where`` describes, autograd would backpropagate through both forwards, and the
    sweep covers the one it records only."""
    if needs_gradient(value):
        raise ValueError(f"FPropagation: {where} is the output of a recorded forward (or computed from one) with "
                         "trainable parameters upstream: autograd would backpropagate through both forwards, the sweep "
                         "covers this one only; pass it detached (out.detach()) to train this forward alone, or record "
                         "both in one model")


def refuse_fed_target(value, what: str = "target") -> None:
    """ValueError when a loss's ``value`` (a target) is a recorded output, or was computed from one, with a trainable
    parameter upstream: autograd would differentiate the loss through it too; the library's loss takes it as a
    constant."""
    if needs_gradient(value):
        raise ValueError(f"{what}: computed from the output of a recorded forward with trainable parameters upstream: "
                         "autograd would differentiate the loss through it too, the sweep takes it as a constant; pass "
                         "it detached (.detach()) to mean a constant")


def unwatched(value, model, position: int | str = 0):
    """``value`` as a plain tensor when it is a watched output — fed into the recorded forward of ``model`` as its
    input at ``position`` (an index, or a keyword), which changes it for its own loss — else itself; refused
    (:func:`refuse_fed_output`) when a trainable parameter lies upstream of it."""
    if not isinstance(value, Tensor) or (type(value) is Tensor and value._base is None):
        return value
    refuse_fed_output(value, f"input {position!r}" if isinstance(position, str) else f"input {position}")
    if not isinstance(value, RecordedOutput):
        return value
    value._fadjoint_note.changed(f"{type(model).__name__}'s recorded forward")
    return value.as_subclass(Tensor)
