"""F-propagation: ``FPropagation``, the façade over the two recorders (docs/maths.md §1.1, §6.1, §6.7, §7.1).

``FPropagation(model)`` wraps the user's model (not a copy; its ``forward`` runs as written) and records what the
forward computes, with one of two recorders picked at :meth:`FPropagation.attach` from the model:

* the **chain** (:class:`torch_fadjoint.chain.ChainRecorder`, §6): a plain ``nn.Sequential`` of table entries —
  provably a chain — records one :class:`~torch_fadjoint.layers.LayerRecord` per parametric layer (``net.layers``),
  what every rule of §1–§6 sweeps;
* the **tape** (:class:`TapeRecorder` below over :mod:`torch_fadjoint.tape`, §7.1): any other model — the user's
  own ``forward``, residuals, concatenations, attention, parameters wherever they are read.

``graph=True`` / ``False`` forces one; a rule that sweeps chains only claims a net left to choose
(:meth:`FPropagation.require_chain`). The façade owns what both share: the model's fingerprint (a model changed
after wrapping is refused at the next forward), ``paused()``, the model's ``state_dict``, the loss and the
F-adjoint's entry points ``net.backward`` / ``net.adjoint``.

Over 400 lines: the façade and the tape's recorder (``TapeRecorder``: its hooks and the per-forward tape), which
share the forward's put-back-on-refusal path; ``TapeRecorder`` is the part to move out next.
"""
from __future__ import annotations

import contextlib
import operator
import weakref
from itertools import chain
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals
from torch.utils._pytree import tree_flatten

from .chain import (ChainRecorder, HookedRecorder, _check_inputs, _describe, _foreign_hooks, _forward_holder, _ours,
                    plain_chain)
from .layers import LayerRecord
from .losses import describe_identity, get_loss, loss_identity
from .maps import MapRecord
from .output import OutputNote, refuse_fed_output, refuse_fed_target, unwatched, watch_output
from .sweep import accumulate_grads, check_finite, check_out_adj, fadjoint_grads, param_names
from .tape import Tape, TapeMode, put_back_state, state_of
from .tape_sweep import check_versions, sweep_tape, tape_grads

__all__ = ["FPropagation", "LayerRecord", "MapRecord"]


def _graph_backward_hook(model: nn.Module, modules, params) -> str | None:
    """The first backward-side hook anywhere in the model, in words (None if there is none).
    ``modules``: the model's modules; ``params``: its (name, parameter) pairs (as attach found them)."""
    if _module_globals._global_backward_hooks or _module_globals._global_backward_pre_hooks:
        return "a global module backward hook is registered (register_module_full_backward_hook)"
    for module in modules:
        if module._backward_hooks or module._backward_pre_hooks:
            name = next(n for n, m in model.named_modules() if m is module)
            return f"{name or '<model>'} ({type(module).__name__}) has a backward hook"
    for name, param in params:
        if param._backward_hooks or getattr(param, "_post_accumulate_grad_hooks", None):
            return f"{name} has a gradient hook (register_hook / register_post_accumulate_grad_hook)"
    return None


class TapeRecorder(HookedRecorder):
    """The tape of ``net``'s model (docs/maths.md §7.1): one pre- and one post-hook per module keep the module path
    for messages (the tape's ``TorchFunctionMode`` sees the functions, whichever module calls them); each forward
    records a :class:`~torch_fadjoint.tape.Tape` (``tape``), swept by :meth:`grads`."""

    def __init__(self, net):
        self.net = net
        self._handles: list = []
        self._path: list[str] = []
        self._params: dict[int, tuple[str, nn.Parameter]] = {}
        self._earlier: dict[int, weakref.ref] = {}  # the values of earlier forwards that need grad, while alive
        self.clear()

    def attach(self) -> None:
        def leave(module, inputs, output) -> None:  # a forward hook's return value would replace the output
            if self._path:
                self._path.pop()

        for name, module in self.net.model.named_modules():
            describe = _describe(name, module)
            if isinstance(module, torch.jit.ScriptModule):
                self.remove()
                raise TypeError(f"{describe}: a TorchScript module (torch.jit.script / trace) runs a graph the tape "
                                "cannot see; wrap the eager module instead")
            self._handles.append(module.register_forward_pre_hook(
                _ours(lambda m, i, d=describe: self._path.append(d) and None)))
            self._handles.append(module.register_forward_hook(_ours(leave)))
        self._params = {id(p): (n, p) for n, p in self.net.model.named_parameters(remove_duplicate=False)}

    def clear(self) -> None:
        self.tape: Tape | None = None
        self._output = None  # the model's output (the tape keeps its index and version)

    def forward(self, args: tuple, kwargs: dict):
        """Record one forward on a new tape; a refused forward puts back every buffer it wrote."""
        net = self.net
        self.clear()
        leaves = (list(args) if not kwargs and all(isinstance(a, Tensor) for a in args)  # net(x): no pytree walk
                  else tree_flatten((args, kwargs))[0])
        _check_inputs(leaves)
        tape = Tape(self._params)
        tape.path = self._path
        tape.earlier = self._earlier
        tape.keep = net.keep_pre_activations  # rules that read the values themselves (LFP, §7.2)
        self._path.clear()
        for value in leaves:
            if isinstance(value, Tensor) and value.is_floating_point():
                tape.add_value(value)
        bound = [(m._buffers, dict(m._buffers)) for m in net._modules_seen() if m._buffers]
        params = [p for _, p in self._params.values()]
        tape.state = state_of(params, (b for _, buffers in bound for b in buffers.values()))  # copied when first
        # written (through any alias), put back if the forward is refused
        tape.trained = {p.untyped_storage().data_ptr() for p in params if p.requires_grad and p.numel()}
        tape.model_memory = set(tape.state)
        try:
            tape.grad_mode = torch.is_grad_enabled()
            # the forward runs with grad enabled, whatever the caller's mode: a no_grad block inside is then a
            # constant as autograd has it, and a grad mode switched off unseen (an autograd.Function) is refused
            with torch.enable_grad(), TapeMode(tape, tape.grad_mode):
                output = net.model(*args, **kwargs)
            index = tape.value_of(output) if isinstance(output, Tensor) else None
            if index is None:
                raise ValueError(f"FPropagation: the model returned {type(output).__name__}, expected a tensor computed "
                                 "from its input (the loss reads the recorded output)")
            if index in tape.stale:
                raise ValueError(f"FPropagation: the model returned a value that {tape.stale[index]} overwrote through "
                                 "a view of the same memory (the tape does not follow views): write out of place")
            tape.output_tensor, tape.output_version = output, output._version
            tape.param_memory = [(p, p.data_ptr()) for p in params]
            check_versions(tape)  # an overwritten record refused now, while the buffers can be put back
            tape.watched = [(weakref.ref(t), *rest) for t, *rest in tape.watched]  # none kept past the forward
        except BaseException as exc:
            self.clear()
            put_back_state(tape)
            for buffers, before in bound:  # a buffer rebound in the forward (self.buf = …)
                buffers.clear()
                buffers.update(before)
            # a full backward hook runs the module's forward through an autograd.Function (torch's BackwardHook): name
            # the hook, not the Function the tape refused
            hook = (_graph_backward_hook(net.model, net._modules_seen(), self._params.values())
                    if isinstance(exc, ValueError) and "torch.autograd.Function" in str(exc) else None)
            if hook is not None:
                raise ValueError(f"FPropagation: {hook}, which autograd would call and the F-adjoint does not; the "
                                 "forward is refused, nothing was changed (remove it; clip or freeze in the optimizer "
                                 "instead)") from None
            raise
        finally:
            self._path.clear()
        tape.state, tape.state_copies = {}, []
        tape.output = index
        self._remember(tape)
        self.tape, self._output = tape, output
        return output

    def _remember(self, tape: Tape) -> None:
        """Keep (weakly) the values of this forward that need grad, and drop the earlier ones that died: a later
        forward reading one (a state carried in an attribute) is refused (:func:`torch_fadjoint.tape._inputs`)."""
        earlier = {key: ref for key, ref in self._earlier.items() if ref() is not None}
        for key, (ref, index, _) in tape._values.items():
            if tape.needs[index] and ref() is not None:
                earlier[key] = ref
        self._earlier = earlier

    def grads(self, out_adj: Tensor, *, retain_records: bool = False, rule=None) -> dict[Tensor, Tensor]:
        """{parameter: feedback} by the sweep over the last forward's tape; see :meth:`FPropagation.graph_grads`."""
        net, tape = self.net, self.tape
        if tape is None:
            raise RuntimeError("FPropagation: no recorded forward; call net(x) first (records are freed by each sweep)")
        out_adj = check_out_adj(net, out_adj)
        hook = _graph_backward_hook(net.model, net._modules_seen(), self._params.values())
        if hook is not None:
            self.clear()
            raise RuntimeError(f"FPropagation: {hook}, which autograd would call and the F-adjoint does not; records "
                               "cleared, nothing was changed (remove it; clip or freeze in the optimizer instead)")
        try:
            with torch.no_grad():  # the parameters require grad: with grad enabled, every adjoint would carry a graph
                grads = (tape_grads(tape, out_adj, release=not retain_records) if rule is None
                         else sweep_tape(tape, out_adj, rule, release=not retain_records))
            if net.reducer is not None and grads:  # data parallel: the mean over the ranks (one bucket per sweep)
                net.reducer.launch(list(grads.values()))
                net.reducer.wait()
        except BaseException:
            self.clear()
            raise
        if not retain_records:
            self.clear()
        return grads


def _hook_keys(module: nn.Module) -> tuple:
    """The forward hooks of ``module``, as the keys of its hook dicts and the ids of what they hold: when they are
    what ``attach`` saw, no hook was added or removed (another recorder's hooks are told apart only if not)."""
    pre, post = module._forward_pre_hooks, module._forward_hooks
    return tuple(pre), tuple(map(id, pre.values())), tuple(post), tuple(map(id, post.values()))


def _signature(module: nn.Module) -> tuple:
    """One flat tuple of the objects that make ``module`` what it is: its class and the class's forward (patched
    after wrapping, it computes something else), its instance forward, children,
    parameters and forward hooks (their names and the objects; each part's length first, so that no two different
    states flatten alike). Compared by identity (``_same``): the fingerprint keeps every object alive, so an equal
    signature is the same module state; an equal object that is not the same one (a name re-made, a class forward
    its descriptor makes anew) only sends the comparison to the detailed one."""
    state = module.__dict__
    params, children = state["_parameters"], state["_modules"]
    pre, post = state["_forward_pre_hooks"], state["_forward_hooks"]
    cls = type(module)
    return (cls, cls.forward, state.get("forward"), len(params), len(children), len(pre), len(post),
            *params, *params.values(), *children, *children.values(), *pre, *pre.values(), *post, *post.values())


def _signatures(modules) -> tuple:
    """The signatures of ``modules``, one flat tuple."""
    return tuple(chain.from_iterable(map(_signature, modules)))


def _same(now: tuple, then: tuple) -> bool:
    """Whether two flat tuples hold the same objects (identity, never ``==``: a tensor's is elementwise)."""
    return len(now) == len(then) and all(map(operator.is_, now, then))


class FPropagation(nn.Module):
    """Wrap ``model`` and record its F-propagation (docs/maths.md §1.1, §6.1, §7.1); ``net(x) == model(x)``.

    Args:
        model: the user's module (not copied).
        keep_pre_activations: also keep Y^k of every layer and the input and output of every map (the chain), or
            every value (the tape): for the rules that read them (LFP, the equilibrium quirk).
        process_group: a ``torch.distributed`` group for data-parallel training: parameters and buffers
            are broadcast from its first rank now, and every sweep averages the feedback over its ranks
            (``tfa.distributed``). BatchNorm then uses each rank's local batch statistics (as DDP without
            SyncBatchNorm).
        graph: ``None`` (default): the chain for a plain ``nn.Sequential`` of table entries, the tape for any
            other model; ``True``: the tape; ``False``: the chain (refusing what is not one).

    ``state_dict()`` / ``load_state_dict()`` are the wrapped model's (its own keys), so a checkpoint
    saved through the recorder loads into the bare model and back.

    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> with FPropagation(model) as net:
    ...     out = net(torch.randn(5, 4))
    ...     [layer.name for layer in net.layers]
    ['0', '2']

    ``net.adjoint(out_adj)`` runs the F-adjoint sweep (docs/maths.md §1.2, §6.2, §7.1) and accumulates into
    ``.grad`` exactly as ``loss.backward()`` would.
    """

    # Per-forward state is written at every forward: plain attributes, not nn.Module.__setattr__.
    _PLAIN_STATE = frozenset({"_recorder", "_fingerprint", "_paused", "_attached", "_claimed_by", "_output_note",
                              "_pristine", "_owner"})

    def __setattr__(self, name, value):
        if name in FPropagation._PLAIN_STATE:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __init__(self, model: nn.Module, keep_pre_activations: bool = False, process_group=None,
                 graph: bool | None = None):
        super().__init__()
        if graph is not None and not isinstance(graph, bool):
            raise TypeError(f"graph must be True, False or None, got {graph!r}")
        self.graph_choice = graph  # None: a chain when the model is one (plain nn.Sequential of table entries)
        self.graph = bool(graph)   # what attach() resolved: the tape (tfa.tape) or the chain of §6
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
        self.model = model
        self.reducer = None
        if process_group is not None:
            from .distributed import GradientAverager, broadcast_parameters

            self.reducer = GradientAverager(process_group)
            broadcast_parameters(model, process_group)
        self.keep_pre_activations = keep_pre_activations
        self._recorder: ChainRecorder | TapeRecorder | None = None
        self._fingerprint: tuple = ((), (), ((), ()))
        self._paused = False
        self._attached = False
        self._pristine = False  # the last forward found every module as attach saw it, hooks included (_changed)
        self._owner = None  # id(self) at attach
        self._claimed_by = None  # the rule that switched a net left to choose to the chain (require_chain)
        self._output_note = OutputNote()  # what was done to the returned output before the loss (tfa.output)
        self.attach(model)

    # -- the recorder ----------------------------------------------------------------------------
    def attach(self, model: nn.Module | None = None) -> "FPropagation":
        """(Re)register the hooks on ``model`` (default: the wrapped one); removes old ones first.

        With ``graph=False``, raises TypeError naming the module when a module cannot be recorded as a chain
        whatever it is given (a foreign forward hook, an unsupported layer configuration, a parameter-holding map);
        left to choose, such a model goes to the tape.
        """
        self.remove()
        if model is not None:
            self.model = model
        self.graph = self.graph_choice if self.graph_choice is not None else not plain_chain(self.model)
        recorder = TapeRecorder(self) if self.graph else ChainRecorder(self)
        try:
            recorder.attach()
        except (TypeError, ValueError):
            if self.graph_choice is not None:
                raise
            self.graph, recorder = True, TapeRecorder(self)  # not recordable as a chain: the tape records it
            recorder.attach()
        self._recorder = recorder
        self._fingerprint = self._make_fingerprint()
        self._owner = id(self)  # a copy (copy.deepcopy, pickle) keeps the number: its hooks are still this net's
        self._attached = True
        return self

    def require_chain(self, who: str) -> None:
        """A rule that sweeps a chain of layers (docs/maths.md §6) claims this net: one whose recorder was left to
        FPropagation (``graph=None``) is re-attached as a chain; one asked for a graph (``graph=True``) is refused."""
        if not self.graph:
            return
        if self.graph_choice:
            raise ValueError(f"{who} sweeps a chain of layers (docs/maths.md §6); this net records a graph "
                             "(FPropagation(model, graph=True)): wrap the model with graph=False (graphs: issue 22)")
        self.graph_choice = False
        self.attach()
        self._claimed_by = who

    def remove(self) -> None:
        """Remove every hook and drop every record."""
        if self._recorder is not None:
            self._recorder.remove()
        self._attached = False

    def clear(self) -> None:
        """Drop the records of the last forward."""
        if self._recorder is not None:
            self._recorder.clear()

    def __enter__(self) -> "FPropagation":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @contextlib.contextmanager
    def paused(self) -> Iterator["FPropagation"]:
        """Run the model without recording (evaluation): ``with net.paused(): model(x)``."""
        previous, self._paused = self._paused, True
        try:
            yield self
        finally:
            self._paused = previous

    def state_dict(self, *args, **kwargs):
        """The wrapped model's ``state_dict`` (its own keys: a checkpoint loads into the bare model)."""
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        """Load into the wrapped model (keys as ``model.state_dict()``)."""
        return self.model.load_state_dict(state_dict, strict=strict, **kwargs)

    def _make_fingerprint(self) -> tuple:
        """What ``attach`` saw: every module with the names and identities of its children and parameters and the
        forward hooks (``_hook_keys``, and the ids of those that are no recorder's), its class and any forward set on
        the instance (``m.__class__ = …``, ``m.forward = …`` change what it computes), and each parameter's shape, dtype
        and device (``model.to(...)`` changes those in place); and each module's ``_signature``, all of it in one
        tuple. The fingerprint keeps them alive (the hooks too): their ids stay theirs."""
        modules = tuple((m, tuple(m._modules), tuple(map(id, m._modules.values())), tuple(m._parameters),
                         tuple(map(id, m._parameters.values())),
                         (_hook_keys(m), tuple(map(id, _foreign_hooks(m)))),
                         (type(m), m.__dict__.get("forward"), _forward_holder(type(m))[1]),
                         (*m._forward_pre_hooks.values(), *m._forward_hooks.values()))
                        for _, m in self.model.named_modules())
        params = tuple((p, p.shape, p.dtype, p.device, p.is_cpu)
                       for _, p in self.model.named_parameters(remove_duplicate=False))
        seen = tuple(m for m, *_ in modules)
        return modules, params, (seen, _signatures(seen))

    def _modules_seen(self) -> list[nn.Module]:
        """The model's modules as ``attach`` found them (the fingerprint: no walk of the tree)."""
        return list(self._fingerprint[2][0])

    def _changed(self) -> bool:
        """True if the model is not what ``attach`` saw (checked at every forward without walking the tree): a child
        or parameter added, removed, renamed or replaced, a forward hook other than a recorder's added or removed, a
        module's class or instance forward replaced, a parameter's shape, dtype or device changed, ``net.model``
        replaced, or this net a copy of another (``copy.deepcopy``, pickle: its hooks are the other's). A module whose
        ``_signature`` is the one ``attach`` took is unchanged; only one that differs is looked at in detail."""
        modules, params, (seen, signatures) = self._fingerprint
        if self._owner != id(self) or (seen and self.model is not seen[0]):  # a copy of a net, or net.model replaced
            self._pristine = False
            return True
        self._pristine = _same(_signatures(seen), signatures)
        if not self._pristine and self._changed_in_detail(modules):  # may differ by another recorder's hooks only
            return True
        return any(p.dtype is not dtype or p.shape != shape or not (cpu and p.is_cpu) and p.device != device
                   for p, shape, dtype, device, cpu in params)  # on the one CPU device: no device objects made

    @staticmethod
    def _changed_in_detail(modules: tuple) -> bool:
        for module, child_names, children, own_names, own, hooks, (kind, forward, class_forward), _ in modules:
            found_children, found_params = module._modules, module._parameters
            if (tuple(map(id, found_params.values())) != own or tuple(map(id, found_children.values())) != children
                    or tuple(found_params) != own_names or tuple(found_children) != child_names
                    or type(module) is not kind or module.__dict__.get("forward") is not forward
                    or _forward_holder(kind)[1] is not class_forward):
                return True
            if _hook_keys(module) != hooks[0] and tuple(map(id, _foreign_hooks(module))) != hooks[1]:
                return True
        return False

    # -- forward -------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if self._paused:
            return self.model(*args, **kwargs)
        if not self._attached:
            raise RuntimeError("FPropagation: no hooks are attached (remove() was called); call attach()")
        if self._changed():
            raise RuntimeError("FPropagation: the model's modules, parameters or hooks changed after wrapping; "
                               "call net.attach()")
        if torch.is_inference_mode_enabled() and isinstance(self._recorder, TapeRecorder):
            # an evaluation: inference tensors carry no version counter for the tape's in-place checks, and autograd
            # could not backpropagate through them either: run unrecorded, and drop the last records, so that no
            # step trains on a forward other than the one the user just ran
            self._recorder.clear()
            self._output_note = OutputNote()
            return self.model(*args, **kwargs)
        grad_enabled = torch.is_grad_enabled()  # the caller's (the recorder runs the forward with its own)
        if not (len(args) == 1 and not kwargs and type(args[0]) is Tensor and args[0]._base is None):  # else: x
            if not all(isinstance(value, Tensor) for value in (*args, *kwargs.values())):  # nested: looked into
                for leaf in tree_flatten((args, kwargs))[0]:
                    refuse_fed_output(leaf, "an input")
            # an output fed in: refused with trainable parameters upstream, else plain (changed for its own loss)
            args = tuple(unwatched(value, self.model, i) for i, value in enumerate(args))
            kwargs = {key: unwatched(value, self.model, key) for key, value in kwargs.items()}
        try:
            output = self._recorder.forward(args, kwargs)
        except (TypeError, ValueError) as exc:  # the chain's refusal of a model the tape would have recorded
            if self._claimed_by is None:
                raise
            raise type(exc)(f"{exc} (this net records a chain because {self._claimed_by} sweeps one; that rule does "
                            "not run on graphs)") from None
        # autograd's requires_grad of the output: a trainable parameter upstream, grad enabled at the call
        self._output_note = OutputNote(needs=grad_enabled and self._output_needs())
        return watch_output(output, self._output_note) if isinstance(output, Tensor) else output

    def _output_needs(self) -> bool:
        """Whether a trainable parameter lies upstream of the recorded output (autograd's ``requires_grad`` of it,
        were the forward run with grad enabled): the tape's own answer; on a chain, any parameter's (or buffer's) the
        forward read (its ``requires_grad``, as the recorder kept it: ``module_reads.read_through``)."""
        recorder = self._recorder
        if isinstance(recorder, TapeRecorder):
            return bool(recorder.tape.needs[recorder.tape.output])
        return any(any(through[2::2]) for *_, through in recorder._configs)

    # -- records -------------------------------------------------------------------------------
    @property
    def _handles(self) -> list:
        return self._recorder._handles if self._recorder is not None else []

    @property
    def _tape(self) -> Tape | None:
        """The tape of the last forward (None on a chain, or when none is recorded)."""
        return self._recorder.tape if isinstance(self._recorder, TapeRecorder) else None

    @property
    def layers(self) -> list[LayerRecord]:
        """The chain's records of the last forward, layer 1 first (a net on the tape has none: ``[]``)."""
        return self._recorder.layers if isinstance(self._recorder, ChainRecorder) else []

    @property
    def records(self) -> dict[str, LayerRecord]:
        """The records of the last forward keyed by the layer's qualified name (``name#2`` for a second call)."""
        return {(layer.name if layer.call == 1 else f"{layer.name}#{layer.call}"): layer for layer in self.layers}

    @property
    def output(self) -> Tensor:
        """X^L of the last recorded forward."""
        output = self._recorder._output if self._recorder is not None else None
        if output is None:
            raise RuntimeError("FPropagation: no recorded forward; call net(x) first (records are freed by each sweep)")
        return output

    @staticmethod
    def loss_target(target):
        """``target`` for a loss computed here; refused (ValueError, nothing written) when it is a recorded output,
        or was computed from one, with trainable parameters upstream (:func:`~torch_fadjoint.output.refuse_fed_target`:
        autograd would differentiate the loss through it)."""
        refuse_fed_target(target)
        return target

    def loss_input(self, loss_fn=None, loss_kwargs: dict | None = None) -> Tensor:
        """X^L for a loss computed here (``net.backward``, a step given ``target=``) by ``loss_fn`` (as
        :func:`~torch_fadjoint.losses.get_loss` returns it; None: a rule's own signal, not a loss): the recorded
        output, refused (RuntimeError, nothing written) when the one ``net(x)`` returned was changed first, or went
        into another loss than ``loss_fn`` with ``loss_kwargs`` (:mod:`torch_fadjoint.output`)."""
        output, note = self.output, self._output_note
        if note.change is not None:
            raise RuntimeError(f"FPropagation: the output of net(x) went through {note.change} after net(x) "
                               "returned, which the loss would not see (net.backward and the optimizers start from the "
                               "recorded output): put that op inside the model's forward, or read the output through "
                               "out.detach() for metrics")
        if note.losses and loss_fn is not None:
            ours = loss_identity(loss_fn, loss_kwargs)
            for name, theirs in note.losses:
                if theirs is None or theirs != ours:
                    raise RuntimeError(f"FPropagation: the output of net(x) went into {name} "
                                       f"({describe_identity(theirs)}) after net(x) returned, and the loss trained here is "
                                       f"{describe_identity(ours) if ours else 'a callable of yours'}: pass the loss you "
                                       "mean as the criterion, or log it from out.detach()")
        return output

    def recorded_layers(self) -> list[LayerRecord]:
        """The chain's layers of the last forward after checking that no record went stale; RuntimeError otherwise."""
        self.output  # noqa: B018 - raises when nothing is recorded
        if self.graph:
            raise RuntimeError("FPropagation: this rule sweeps a chain of layers and this net records a graph (a model "
                               "other than a plain nn.Sequential): wrap it with FPropagation(model, graph=False), or "
                               "use a rule that runs on graphs (the README's rules table)")
        return self._recorder.recorded_layers()

    # -- the F-adjoint -------------------------------------------------------------------------
    def graph_grads(self, out_adj: Tensor, *, retain_records: bool = False, rule=None) -> dict[Tensor, Tensor]:
        """On the tape: {parameter: ∂J/∂θ} from X*^L by the sweep over the last forward's tape (docs/maths.md §7.1);
        nothing is written; the tape is freed unless ``retain_records``. ``rule``: another signal's rule for
        the same sweep (a ``tfa.tape_sweep.TapeRule``: LFP's reward, §7.2), ``out_adj`` then being its top signal."""
        if not isinstance(self._recorder, TapeRecorder):
            raise RuntimeError("FPropagation: graph_grads sweeps a tape; this net records a chain (graph=False)")
        return self._recorder.grads(out_adj, retain_records=retain_records, rule=rule)

    def adjoint(self, out_adj: Tensor, *, validate: bool = True, retain_records: bool = False) -> None:
        """Run the F-adjoint sweep from X*^L = ``out_adj`` and accumulate ∂J/∂θ into ``.grad``.

        out_adj: the output's shape, dtype and device (docs/maths.md §1.2, §6.2, §7.1). Equal to
        ``loss.backward()`` (to rounding; bit for bit where autograd's kernels are used), without
        autograd. Frozen parameters (``requires_grad=False``) get no ``.grad``. Nothing is written
        when it raises.
        """
        if self.graph:
            grads = self.graph_grads(out_adj, retain_records=retain_records)
            if validate:
                check_finite(list(grads.values()), "F-adjoint gradients", names=lambda: param_names(self, grads))
            accumulate_grads(grads)
            return
        accumulate_grads(fadjoint_grads(self, out_adj, validate=validate, retain_records=retain_records))

    def backward(self, loss, target, **loss_kwargs) -> Tensor:
        """The loss of the recorded output and its F-adjoint sweep in one call: ``loss.backward()``'s stand-in.

        loss: a library loss (``tfa.losses.nll``, ``"cross_entropy"``, …) or torch's own functional
        (``F.nll_loss``, ``F.cross_entropy``, ``F.mse_loss``: the same closed-form adjoint, §1.3); ``target``
        and ``loss_kwargs`` as that loss takes them. Returns the loss tensor; ``.grad`` accumulates.

        >>> net = FPropagation(nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(dim=1)))
        >>> output = net(torch.randn(2, 4))
        >>> loss = net.backward(torch.nn.functional.nll_loss, torch.tensor([0, 2]))
        """
        loss_fn = get_loss(loss)
        output, target = self.loss_input(loss_fn, loss_kwargs), self.loss_target(target)
        if output.shape[0] == 0:
            raise ValueError("FPropagation.backward: the recorded forward has batch size 0; nothing to learn from")
        result = loss_fn(output, target, **loss_kwargs)
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Tensor)):
            name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
            raise TypeError(f"FPropagation.backward: {name} returned {type(result).__name__}, expected (loss, out_adj) "
                            "(a closed-form loss: 'cross_entropy', 'nll', 'mse' or torch's functional of one of them)")
        value, out_adj = result
        self.adjoint(out_adj)
        return value

    def extra_repr(self) -> str:
        recorder = "tape" if self.graph else "chain"
        return f"{recorder}, hooks={len(self._handles)}, keep_pre_activations={self.keep_pre_activations}"
