"""The tape: the user's whole forward recorded as ops on values and parameters (docs/maths.md §7.1).

While ``FPropagation(model, graph=True)`` runs the forward, a ``TorchFunctionMode`` sees every torch function
call (STYLE P10). A call that reads a **value** (a tensor computed from the model's inputs) or a **parameter**
of the model (whichever module holds it) is run through its entry of the junction table
(:data:`torch_fadjoint.junctions.JUNCTIONS`, filled by ``arithmetic``, ``activations`` and ``functionals``) and
recorded as an op; its tensor outputs become values. Any other call is a constant (buffers, masks, shapes) and
runs as written, and so is a call on a value whose output carries no gradient in autograd either (a comparison,
``argmax``, ``x.new_zeros(…)``, ``x.detach()``, anything inside the user's own ``torch.no_grad()`` block: the
forward runs with grad enabled inside the recorder whatever the caller's mode, so an inner block is seen as such
even when ``net(x)`` is called under ``no_grad``, as the optimizers' loops may). Each recorded op runs under
``no_grad``: no autograd graph.
A call on a value with no entry is refused, naming the op and the module it ran in.

An in-place op produces a new version of its input (``out += identity``): the tensor's later uses read the new
value; every saved tensor keeps its version, so the sweep (:mod:`torch_fadjoint.tape_sweep`, the F-adjoint and
the other rules' signals sent back over these ops) refuses one overwritten later, as autograd refuses it (the
entries copy what their own in-place backward needs). Values sharing memory with the one written become stale
(refused when read, but for their metadata); memory no value owns (a view of a constant, a buffer, a frozen
parameter) is never written with a value; a value changed by a call no mode sees (``set_``) is refused when read
(docs/graphs.md, "In-place writes and views").

Over 400 lines: ``TapeMode`` and the bookkeeping it runs on every call (the values' registry, inputs, the
per-callable cache) share the forward's tape; what a forward may write is in ``tape_writes``, the sweep in
``tape_sweep``.
"""
from __future__ import annotations

import types
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from . import activations, arithmetic, functionals, poolings, steps  # noqa: F401  (they fill JUNCTIONS)
from .junctions import JUNCTIONS
from .tape_writes import (_LEAF_TYPES, _LEAVING, _STATISTICS, _check_in_place, _constant_write, _keep_state,
                          _keep_state_written, _leaves, _note_nograd_views, _op_name, _writes_first_argument,
                          put_back_state, state_of, written_by)

__all__ = ["Tape", "TapeMode", "rerun", "state_of", "put_back_state"]


# calls whose floating output carries no gradient in autograd either: new tensors shaped like a value, detach
_CONSTANT_MAKERS = frozenset({
    Tensor.new_zeros, Tensor.new_ones, Tensor.new_full, Tensor.new_empty, Tensor.new_tensor, torch.zeros_like,
    torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like, Tensor.detach,
    torch.detach,
})


# functions written in Python on top of table ops, with no entry of their own: the tape records the ops they call
_COMPOSITES = frozenset({torch.nn.functional.multi_head_attention_forward})
_UNDISPATCHED: dict = {}


def _undispatched(func):
    """``func`` whose own ``has_torch_function`` check is off (a copy with that one global replaced), so that its
    body runs under the tape's mode without handing the call back to the mode; its inner calls dispatch as usual."""
    clone = _UNDISPATCHED.get(func)
    if clone is None:
        scope = {**func.__globals__, "has_torch_function": lambda *args: False}
        clone = _UNDISPATCHED[func] = types.FunctionType(func.__code__, scope, func.__name__, func.__defaults__,
                                                         func.__closure__)
        clone.__kwdefaults__ = func.__kwdefaults__
    return clone


class _Op:
    """One recorded call: its entry, what it saved, where its inputs come from, which values it made."""

    __slots__ = ("entry", "saved", "inputs", "outputs", "single", "where", "versions", "needed", "call")

    def __init__(self, entry, saved, inputs: dict, outputs: list[int], single: bool, where: str, versions: list,
                 needed: frozenset):
        self.entry, self.saved, self.inputs, self.outputs = entry, saved, inputs, outputs
        self.single, self.where, self.versions, self.needed = single, where, versions, needed
        self.call = None  # with tape.keep: (func, args, kwargs, stale) with its values left out, for :func:`rerun`


class Tape:
    """The values and ops of one forward. ``params``: ``{id(parameter): (name, parameter)}`` of the model."""

    def __init__(self, params: dict[int, tuple[str, nn.Parameter]]):
        self.params = params
        self.ops: list[_Op] = []
        self._values: dict[int, tuple[weakref.ref, int, int]] = {}  # id(tensor) → (the tensor, its value index,
        # its version then: a later read of another version that no call the tape saw made is refused)
        self.storages: dict[int, list[weakref.ref]] = {}  # storage → the values there (a value, its views)
        self.foreign: set[int] = set()  # values that are views of a tensor that is not a value (a constant, a buffer,
        # a parameter, a detach() alias): never written in place (the tape would go on reading that one unchanged)
        self.nograd_views: dict[int, weakref.ref] = {}  # views of values made under no_grad (autograd refuses them
        # written in place with grad enabled)
        self.model_memory: set[int] = set()  # storages of the model's parameters and buffers
        self.earlier: dict[int, weakref.ref] = {}  # values of earlier forwards that need grad and are still alive
        # (kept in an attribute): read with grad enabled, refused (autograd would backpropagate into that forward)
        self.watched: list[tuple] = []  # (tensor, version, op, where): what autograd saves and the records do not
        # keep (Junction.autograd_saves); one written later is refused. Held until the forward ends, weakly after
        self.multi_views: set[int] = set()  # outputs of an op returning several views (chunk, split, unbind) and
        # views of them: never written in place (autograd refuses it)
        self.needs: list[bool] = []  # per value: whether a trainable parameter lies upstream (its adjoint is used)
        self.count = 0
        self.output: int | None = None
        self.output_tensor: Tensor | None = None  # the model's output and its version at the end of the forward
        self.output_version = 0
        self.path: list[str] = []  # the module stack, for messages
        self.grad_mode = True  # the grad mode the forward was called in (``value.requires_grad``'s answer)
        self.state: dict[int, tuple[Tensor, ...]] = {}  # storage → the model's parameters and buffers there: what
        # the forward writes into one (through any alias: a view, .data) is copied first and put back if it is refused
        self.state_copies: list[tuple[Tensor, Tensor, bool]] = []  # (tensor, its value then, whether it was replaced)
        self.trained: set[int] = set()  # storages of the parameters that require grad (never written in place)
        self.param_memory: list[tuple[nn.Parameter, int]] = []  # each parameter's data_ptr at the forward: one
        # rebound after it (``p.data = …``) is refused by the sweep, which would read the old one
        self.stale: dict[int, str] = {}  # value index → the in-place op that overwrote it through an alias (a view
        # or its base): the tape does not follow views, so a later read of it is refused
        self.keep = False  # keep every value and its version for a rule that reads them (LFP: sweep_tape's rule)
        self.kept: dict[int, tuple[Tensor, int]] = {}  # value index → (the tensor as the forward made it, version)
        self.derived: dict[int, weakref.ref] = {}  # with keep: tensors computed from values that are not values (a
        # mask h > 0, an arg-max, a no_grad block's result): a re-run (:func:`rerun`) would read them stale

    def add_value(self, tensor: Tensor, needs: bool = False, arguments: tuple = ()) -> int:
        """A new value (or a new version of one); ``needs``: a trainable parameter lies upstream of it. A view of
        one of the call's ``arguments`` that is not a value, or is a foreign one (``z.view_as(h)`` of a constant
        ``z``, ``w[0]`` of a frozen weight, ``h.detach().view_as(h)``), is foreign."""
        index = self.count
        self.count += 1
        ref = weakref.ref(tensor)
        self._values[id(tensor)] = (ref, index, tensor._version)
        self.needs.append(needs)
        if tensor.numel():
            storage = tensor.untyped_storage().data_ptr()
            self.storages.setdefault(storage, []).append(ref)
            if tensor._is_view():
                for arg in arguments:  # the tensors among them, as _leaves(arguments) gives them, nested ones last
                    for leaf in ((arg,) if isinstance(arg, Tensor) else () if type(arg) in _LEAF_TYPES
                                 else _leaves((arg,))):
                        if isinstance(leaf, Tensor) and leaf.numel() and leaf.untyped_storage().data_ptr() == storage:
                            found = self.value_of(leaf)
                            if found is None or found in self.foreign:
                                self.foreign.add(index)
                            elif found in self.multi_views:
                                self.multi_views.add(index)
        if self.keep:
            self.kept[index] = (tensor, tensor._version)
        return index

    def keep_before_write(self, source) -> None:
        """An in-place op is about to overwrite the value ``source``: the kept tensor of its old version becomes a
        copy (``out += identity`` overwrites BatchNorm's output, which LFP's ε-rule reads)."""
        if self.keep and source is not None and source[0] == "value" and source[1] in self.kept:
            old = self.kept[source[1]][0].clone()
            self.kept[source[1]] = (old, old._version)

    def aliases(self, storage: int) -> list[Tensor]:
        """The live values whose memory is at ``storage`` (views of one another)."""
        found = []
        for ref in self.storages.get(storage, ()):
            tensor = ref()
            if (tensor is not None and tensor.untyped_storage().data_ptr() == storage
                    and not any(tensor is other for other in found)):
                found.append(tensor)
        return found

    def saw_write(self, values: list[Tensor]) -> None:
        """A call the tape saw wrote into the memory of ``values`` outside the table (under ``no_grad``, through a
        ``detach()`` alias; ``set_`` gives them other memory): their new versions are theirs (autograd reads them so
        too)."""
        for value in values:
            ref, index, _ = self._values[id(value)]
            self._values[id(value)] = (ref, index, value._version)
            if value.numel():
                memory = self.storages.setdefault(value.untyped_storage().data_ptr(), [])
                if not any(r is ref for r in memory):
                    memory.append(ref)

    def value_of(self, tensor) -> int | None:
        """The value index of ``tensor`` (its newest version), or None if it is not a value."""
        found = self._values.get(id(tensor))
        if found is None or found[0]() is not tensor:
            return None
        return found[1]

    def where(self) -> str:
        return self.path[-1] if self.path else "the model's forward"

    def source(self, leaf):
        """("value", index) | ("param", parameter) | None for a constant."""
        if not isinstance(leaf, Tensor):
            return None
        index = self.value_of(leaf)
        if index is not None:
            return ("value", index)
        if isinstance(leaf, nn.Parameter) and id(leaf) in self.params:
            return ("param", leaf)
        return None


def _inputs(tape: Tape, func, args: tuple, kwargs: dict, metadata: bool = False) -> dict:
    """{adjoint key: source} for every value or parameter among the call's arguments (the table's keys:
    position, keyword, or (position, i) inside a list). A tensor that requires grad and is neither (a parameter of
    another model, a module-level ``nn.Parameter``) is refused: autograd would fill its ``.grad``, the sweep would not.
    So is a read of a value overwritten through an alias (stale) or changed by a call the tape did not see
    (``Tensor.set_``), unless the call reads ``metadata`` only (``x.shape``, ``x.size(0)``).
    (:meth:`Tape.source` inlined: this runs on every call the forward makes.)"""
    found = {}
    values, params = tape._values, tape.params
    for key, arg in (enumerate(args) if not kwargs else [*enumerate(args), *kwargs.items()]):
        if isinstance(arg, Tensor):
            items = ((None, arg),)
        elif isinstance(arg, (list, tuple)):
            items = enumerate(arg)
        else:
            continue  # a number, a shape, a dtype, None: no tensor
        for i, item in items:
            if not isinstance(item, Tensor):
                continue
            value = values.get(id(item))
            if value is not None and value[0]() is item:
                if not metadata:
                    if tape.stale and value[1] in tape.stale:
                        raise ValueError(f"{_op_name(func)} in {tape.where()}: reads a value that "
                                         f"{tape.stale[value[1]]} overwrote through a view of the same memory (the tape "
                                         "does not follow views): write out of place")
                    if item._version != value[2]:
                        raise ValueError(f"{_op_name(func)} in {tape.where()}: reads a value changed in place by a call "
                                         "the tape did not see (Tensor.set_, a write from outside torch's functions): "
                                         "write out of place")
                source = ("value", value[1])
            elif id(item) in params and isinstance(item, nn.Parameter):
                source = ("param", item)
            elif item.requires_grad:
                raise ValueError(f"{_op_name(func)} in {tape.where()}: reads a tensor that requires grad and is not a "
                                 "parameter of the model (autograd would fill its .grad, the sweep does not): register "
                                 "it on a module of the model, or detach it")
            else:
                base = item._base
                if (getattr(item, "_fadjoint_needs", False) if type(item) is not Tensor else
                        base is not None and type(base) is not Tensor and getattr(base, "_fadjoint_needs", False)) \
                        and not metadata and torch.is_grad_enabled():  # tfa.output's watched (or a view of one)
                    raise ValueError(f"{_op_name(func)} in {tape.where()}: reads the output of a recorded forward (or "
                                     "a tensor computed from one) with trainable parameters upstream: autograd would "
                                     "backpropagate into that forward, the sweep covers this one only; detach() it")
                earlier = tape.earlier.get(id(item)) if tape.earlier else None
                if earlier is not None and earlier() is item and not metadata and torch.is_grad_enabled():
                    raise ValueError(f"{_op_name(func)} in {tape.where()}: reads a tensor an earlier forward computed "
                                     "from the parameters (kept in an attribute?): autograd would backpropagate into "
                                     "that forward's graph, the sweep cannot; detach() it where it is kept")
                continue
            found[key if i is None else (key, i)] = source
    return found


_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocasting() -> bool:
    """Whether an autocast region is active (CPU or CUDA), on any torch ≥ 2.1 (one C call when none is)."""
    if not _any_autocast():  # no device autocasts: the common case, without the two calls below
        return False
    try:
        return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


class TapeMode(TorchFunctionMode):
    """Records every call on a value or a parameter into ``tape`` (see the module docstring)."""

    def __init__(self, tape: Tape, grad_mode: bool = True):
        super().__init__()
        self.tape = tape
        self.grad_mode = grad_mode  # the grad mode the forward was called in (``requires_grad``'s answer)
        self.seen_grad = True       # the grad mode as the calls this mode saw set it (the forward starts enabled)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tape = self.tape
        try:
            call = _CALLS.get(func) or _Call.of(func)
        except TypeError:  # an unhashable callable: looked at afresh each time (the sets below refuse it later)
            call = _Call(func)
        if call.sets_grad:  # torch.no_grad(), set_grad_enabled(…), enable_grad() in the forward
            self._check_grad_mode(func)
            self.seen_grad = bool(args[0] if args else kwargs.get("mode"))
            return func(*args, **kwargs)
        if _transforms_active():
            raise ValueError(f"{_op_name(func)} in {tape.where()}: runs under a torch.func transform (vmap, grad, "
                             "jacrev …), whose tensors the tape cannot follow; the forward is refused")
        inputs = _inputs(tape, func, args, kwargs, call.metadata)
        if torch.is_grad_enabled() != self.seen_grad and not call.metadata and (inputs or not _inference_mode()):
            # on a constant too: an autograd.Function whose forward computes only from constants (a straight-through
            # estimator returning h_q.clone()) would pass the gradient to its value inputs, which the tape never saw
            # go in; a constant made under inference_mode (a mask) is autograd's constant too, and a shape is no value
            self._check_grad_mode(func)
        if inputs:
            if call.leaving and any(kind == "value" and tape.needs[index] for kind, index in inputs.values()):
                raise ValueError(f"{_op_name(func)} in {tape.where()}: takes a value out of torch (autograd refuses "
                                 "it on a tensor that requires grad too); detach it first, or keep it in torch")
        written = written_by(func, args, kwargs) if call.may_write or "out" in kwargs else ()  # the others write
        if tape.state and written:  # no tensor they are given
            _keep_state_written(tape, func, args, kwargs, written)
        if not inputs or not torch.is_grad_enabled():
            # constants only (buffers, masks, shapes), or the user's own no_grad block inside a forward called with
            # grad enabled: autograd gives what is computed there no gradient, so its outputs are constants here too
            written = _constant_write(tape, func, written) if written else ()
            result = func(*args, **kwargs)
            if written:  # values written outside the table: their new versions are the ones later calls read
                tape.saw_write(written)
            if inputs or tape.nograd_views:
                _note_nograd_views(tape, result, args, kwargs, inputs)
            return _derived(tape, result, inputs) if tape.keep else result
        if func is Tensor.register_hook:
            _refuse_attribute("register_hook")(tape, func, args, inputs)
        entry = JUNCTIONS.get(func)  # the table itself (not cached: an entry may be added at any time)
        if entry is None and call.special is not None:
            return call.special(tape, func, args, inputs)
        if entry is None and call.composite:  # torch's Python of torch ops: record the ops it calls
            inner = TapeMode(tape, self.grad_mode)
            inner.seen_grad = self.seen_grad
            with inner:
                return _undispatched(func)(*args, **kwargs)
        if entry is None:
            tensors = [leaf for leaf in _leaves((*args, *kwargs.values())) if isinstance(leaf, Tensor)]
            if tape.state and not call.metadata:  # it may write a buffer it is given before it is refused
                _keep_state(tape, tensors)
            before = [t._version for t in tensors]
            result = func(*args, **kwargs)
            wrote = any(t._version != v for t, v in zip(tensors, before))  # h[:, 0] = 0, z[1:] = h[1:]: not constants
            if not wrote and (func in _CONSTANT_MAKERS or not any(
                    isinstance(leaf, Tensor) and (leaf.is_floating_point() or leaf.is_complex())
                    for leaf in _leaves((result,)))):
                # metadata (x.shape), masks and indices (x > 0, argmax), x.new_zeros(…), x.detach()
                return _derived(tape, result, inputs) if func not in _CONSTANT_MAKERS or func in _DETACH else result
            raise ValueError(f"{_op_name(func)} in {tape.where()}: not in the table of ops the F-adjoint can sweep "
                             "back through (tfa.junctions.JUNCTIONS); the forward is refused")
        if _autocasting():
            raise ValueError(f"{_op_name(func)} in {tape.where()}: runs under torch.autocast, whose casts the tape does "
                             "not record; the forward is refused (cast the model instead: model.to(dtype))")
        if entry.writes_first(args, kwargs):
            _check_in_place(tape, func, args, inputs)
            tape.keep_before_write(inputs.get(0))
        _set_grad_enabled(False)  # no autograd graph: the sweep is ours (torch.no_grad() without its Python)
        try:
            out, saved = entry.run(func, args, kwargs)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{exc} (in {tape.where()})") from None
        finally:
            _set_grad_enabled(True)  # enabled: the calls that reach here are those made with grad enabled
        needs = tape.needs  # the inputs whose adjoint reaches a parameter
        needed = frozenset([key for key, (kind, source) in inputs.items()
                            if (source.requires_grad if kind == "param" else needs[source])])
        leaves = [out] if isinstance(out, Tensor) else list(out)
        arguments = (*args, *kwargs.values()) if kwargs else args
        outputs = [tape.add_value(t, bool(needed), arguments) if isinstance(t, Tensor) and t.is_floating_point()
                   else -1 for t in leaves]
        if len(leaves) > 1 and sum(i >= 0 and t._is_view() for t, i in zip(leaves, outputs)) > 1:
            tape.multi_views.update(i for t, i in zip(leaves, outputs) if i >= 0 and t._is_view())
        versions = [(t, t._version) for t in _tensors_in(saved) if not t.is_inference()]
        for t in entry.autograd_saves(args, kwargs, out):  # watched, not kept: through its base if a view (a
            if isinstance(t, Tensor) and not t.is_inference():  # temporary one shares the base's version counter)
                t = t._base if t._is_view() else t
                tape.watched.append((t, t._version, entry.name, tape.where()))  # weak once the forward has ended
        tape.ops.append(_Op(entry, saved, inputs, outputs, isinstance(out, Tensor), tape.where(), versions, needed))
        if tape.keep:  # a rule that re-runs the ops (inference learning, docs/maths.md §7.5) reads the call
            tape.ops[-1].call = _call_of(tape, func, args, kwargs, inputs)
            _derived(tape, [t for t in leaves if isinstance(t, Tensor) and not t.is_floating_point()], inputs)
        return out


    def _check_grad_mode(self, func) -> None:
        """Grad mode switched off where no call of ours saw it (a ``torch.autograd.Function``'s forward, such as
        ``checkpoint(use_reentrant=True)``, or ``inference_mode``): autograd would call that function's own backward,
        which the tape cannot see; treating its inside as constants would drop gradients silently: refused."""
        if torch.is_grad_enabled() != self.seen_grad:
            raise ValueError(f"{_op_name(func)} in {self.tape.where()}: runs inside a torch.autograd.Function (e.g. "
                             "checkpoint(use_reentrant=True)) or inference_mode, whose backward the tape cannot sweep; "
                             "the forward is refused (use checkpoint(use_reentrant=False), or write the op in torch)")


_DETACH = frozenset({Tensor.detach, torch.detach})
# calls that read a tensor's metadata, not its entries: a stale value may be asked its shape
_METADATA = frozenset({Tensor.size, Tensor.dim, Tensor.numel, Tensor.nelement, Tensor.ndimension, Tensor.stride,
                       Tensor.storage_offset, Tensor.is_contiguous, Tensor.is_floating_point, Tensor.is_complex,
                       Tensor.element_size, Tensor.__len__,
                       *(getattr(Tensor, name).__get__ for name in ("shape", "dtype", "device", "ndim", "layout",
                                                                     "is_cuda"))})


def _derived(tape: Tape, result, inputs: dict):
    """``result`` (returned unchanged): with ``tape.keep``, its tensors are marked as computed from values."""
    if tape.keep and any(kind == "value" for kind, _ in inputs.values()):
        for leaf in tree_flatten(result)[0]:
            if isinstance(leaf, Tensor):
                tape.derived[id(leaf)] = weakref.ref(leaf)
    return result


def _call_of(tape: Tape, func, args: tuple, kwargs: dict, inputs: dict) -> tuple:
    """(func, args, kwargs, stale) with every value input left out (None; :func:`rerun` puts others in);
    ``stale``: a constant argument computed from values (a mask ``h > 0``), which a re-run would read unchanged."""
    args, kwargs = list(args), dict(kwargs)
    for key, (kind, _) in inputs.items():
        if kind == "value":
            where, i = key if isinstance(key, tuple) else (key, None)
            holder = args if isinstance(where, int) else kwargs
            if i is None:
                holder[where] = None
            else:
                holder[where] = [None if j == i else item for j, item in enumerate(holder[where])]
    stale = any(isinstance(leaf, Tensor) and (ref := tape.derived.get(id(leaf))) is not None and ref() is leaf
                for leaf in tree_flatten((args, kwargs))[0])
    return func, tuple(args), kwargs, stale


def rerun(op: _Op, values: dict):
    """``(out, saved)``: ``op`` called again (its entry's :meth:`run`) with ``values`` ({input key: tensor}) for its
    value inputs, for a rule that re-runs the forward from other values (inference learning, docs/maths.md §7.5).
    Out of place: a call that writes its first input writes a copy. It writes no buffer: ``F.batch_norm`` in
    train mode normalises with the statistics of the batch it is given and leaves the running ones alone. Needs
    the tape recorded with ``keep``; a call that read a constant computed from values (``h > 0``) is refused."""
    if op.call is None:
        raise RuntimeError(f"{op.entry.name} in {op.where}: the call was not kept for a re-run (record with "
                           "keep_pre_activations=True)")
    func, args, kwargs, stale = op.call
    if stale:
        raise ValueError(f"{op.entry.name} in {op.where}: reads a tensor computed from values outside the table (a "
                         "mask such as h > 0, an arg-max, a no_grad block's result): a re-run would read it unchanged")
    args, kwargs = list(args), dict(kwargs)
    for key, value in values.items():
        where, i = key if isinstance(key, tuple) else (key, None)
        holder = args if isinstance(where, int) else kwargs
        if i is None:
            holder[where] = value
        else:
            items = list(holder[where])
            items[i] = value
            holder[where] = items
    if op.entry.writes_first(args, kwargs):
        first = 0 if args else next(k for k in ("input", "self", "tensor") if k in kwargs)
        holder = args if first == 0 else kwargs
        holder[first] = holder[first].clone()
    if func is F.batch_norm:
        training = args[5] if len(args) > 5 else kwargs.get("training", False)
        if training:  # the batch's statistics; the running ones are left alone
            for position, name in ((1, "running_mean"), (2, "running_var")):
                if len(args) > position:
                    args[position] = None
                else:
                    kwargs.pop(name, None)
    return op.entry.run(func, tuple(args), kwargs)


def _requires_grad(tape: Tape, func, args: tuple, inputs: dict):
    """``value.requires_grad`` as autograd would answer: a trainable parameter lies upstream."""
    kind, source = next(iter(inputs.values()))
    return tape.needs[source] and torch.is_grad_enabled() and tape.grad_mode if kind == "value" else func(*args)


def _refuse_attribute(what: str):
    def refuse(tape: Tape, func, args: tuple, inputs: dict):
        raise ValueError(f"Tensor.{what} in {tape.where()}: {_VALUE_REASONS[what]}; the forward is refused")
    return refuse


_VALUE_REASONS = {
    "grad_fn": "the tape's values have no grad_fn (no autograd graph is built); do not branch on it in the forward",
    "register_hook": "a tensor hook on a value would not be called by the sweep (clip or freeze in the optimizer)",
}
# attributes and methods of a value whose autograd answer the tape gives itself, or refuses
_VALUE_ATTRIBUTES = {
    Tensor.requires_grad: _requires_grad,
    Tensor.grad_fn: _refuse_attribute("grad_fn"),
}


_set_grad_enabled = torch._C._set_grad_enabled
_inference_mode = torch.is_inference_mode_enabled


class _Call:
    """What the tape needs to know of a callable, whatever its arguments: looked up once per callable (``_CALLS``)
    instead of at every call of the forward. The junction entry is not kept here: the table may grow."""

    __slots__ = ("sets_grad", "special", "composite", "leaving", "may_write", "metadata")

    def __init__(self, func):
        self.sets_grad = func is torch._C._set_grad_enabled
        self.special = _VALUE_ATTRIBUTES.get(getattr(func, "__self__", None))  # x.requires_grad, x.grad_fn
        self.composite = func in _COMPOSITES
        self.leaving = func in _LEAVING
        self.metadata = func in _METADATA
        # what :func:`_keep_state_written` looks at besides ``out=``: a call writing its first argument (or handing
        # its memory out of torch), or a normalisation's statistics
        self.may_write = _writes_first_argument(func) or func in _STATISTICS

    @classmethod
    def of(cls, func) -> "_Call":
        call = cls(func)
        if len(_CALLS) >= 4096:  # callables made on the fly (a lambda per call): keep the cache bounded
            _CALLS.clear()
        if not isinstance(getattr(func, "__self__", None), Tensor):  # a method bound to a tensor would keep it alive
            _CALLS[func] = call
        return call


_CALLS: dict = {}


def _tensors_in(saved) -> list[Tensor]:
    """The tensors of an entry's record (a tensor, or tuples, lists and dicts of them and of other values; a
    shape holds ints only). One loop over a stack, not a call per container, and plain values (most of a record:
    keys, dims, shapes) dropped by their type before any isinstance: it runs on every recorded op."""
    if isinstance(saved, Tensor):
        return [saved]
    found: list[Tensor] = []
    stack = [saved]
    pop, push, keep, plain = stack.pop, stack.extend, found.append, _LEAF_TYPES
    while stack:
        item = pop()
        kind = type(item)
        if kind in plain:
            continue
        if kind is tuple or kind is list:
            push(item)
        elif isinstance(item, Tensor):
            keep(item)
        elif isinstance(item, (tuple, list)):  # a named tuple, a list subclass (torch.Size is plain, above)
            push(item)
        elif isinstance(item, dict):
            push(item.values())
    return found
