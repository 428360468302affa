"""The optimizer base every rule shares (docs/maths.md §1.4, §6.7).

``RuleOptimizer`` is a ``torch.optim.Optimizer`` bound to an :class:`~torch_fadjoint.FPropagation`:
hyper-parameters live in ``param_groups`` (schedulers, ``state_dict`` and ``zero_grad`` work unchanged),
per-parameter buffers in ``self.state[p]``. One step contract for every rule::

    loss = opt.step(closure=None, *, target=None, out_adj=None)

``closure`` (positional, as torch's) runs the forward; ``target`` gives the loss (and X*^L, or LFP's
reward), or ``out_adj`` gives the rule's top signal directly (then the loss returned is None).

The class is thin (STYLE P1): the update is the functional SGD core (:mod:`torch_fadjoint.optim.functional`),
and every check, its host syncs and its async flags belong to the step's guard
(:class:`~torch_fadjoint.optim.guard.StepGuard`, ``opt.guard``). ``validate`` (docs/performance.md):

* ``True`` — the targets, the recorded output, the top signal and a bound on every new value are checked
  before anything is written, decided with ONE host sync: a non-finite signal, feedback or update (NaN/Inf
  anywhere, in a loaded or poked momentum buffer or parameter too, or an overflow) is refused;
* ``"async"`` — the same checks decided on the device: no host sync; every write is ``where(ok, new, old)``;
  the error is raised by a later step (or ``opt.synchronize()``), and the refused step's ``.grad`` and new
  momentum buffers are removed then if no step ran after it;
* ``False`` — no checks and no host sync;
* ``None`` (the default) — ``"async"`` when the recorded output is on CUDA, ``True`` elsewhere.

Hyper-parameters are checked (finite, in range, an lr the parameters' dtype can hold) at construction and
at every step, whatever ``validate`` is. Exceptions inside a rule leave parameters, ``.grad`` and state as
they were and the records either intact or cleared.

Over 400 lines: the optimizer's contract (``step``, ``state_dict``, groups, the loss and its targets) and the
SGD plan every rule writes through; the checks live in ``guard.py``, the update in ``functional.py``.
"""
from __future__ import annotations

import inspect
import math
import numbers
import operator
from functools import partial

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..losses import LOSSES, get_loss
from ..recorder import FPropagation
from ..sweep import check_out_adj, param_names
from .functional import _compiling, sgd_update, sgd_update_bound, sgd_update_fits, sgd_update_is_finite
from .guard import StepGuard, Term, check_validate

__all__ = ["RuleOptimizer", "check_hyper", "UPDATE_FAILS"]

UPDATE_FAILS = "NaN/Inf in its gradient, momentum buffer or value, or a value past its dtype's range"


# -- hyper-parameters ------------------------------------------------------------------------------
def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_hyper(name: str, value, low: float = 0.0, high: float = math.inf, *, low_open: bool = False,
                high_open: bool = False, where: str = "") -> float:
    """A finite real number in the range, as a float (numpy scalars accepted); ValueError naming it otherwise."""
    ok = _real(value) and math.isfinite(float(value))
    if ok:
        value = float(value)
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{where}{name} must be a finite number in {interval}, got {value!r}")
    return value


_SGD_RANGES = {"lr": (0.0, math.inf), "momentum": (0.0, math.inf), "dampening": (-math.inf, math.inf),
               "weight_decay": (0.0, math.inf)}



# -- the optimizer base ------------------------------------------------------------------------
class RuleOptimizer(Optimizer):
    """Base of every ``tfa.optim`` optimizer: an Optimizer bound to an ``FPropagation`` recorder.

    Subclasses set ``signal`` ("out_adj" or "reward"), implement ``_top_signal(output, target)`` when it is
    not the loss's X*^L, and ``_rule_step(signal)``, which tells ``self.guard`` what must hold, computes
    everything first and writes last (``_write_sgd`` commits the guard's checks before its first write).

    Args:
        net: the ``FPropagation`` wrapping the model.
        params: parameters or parameter groups (default: ``net.parameters()``).
        defaults: the hyper-parameters of every group.
        loss: ``"cross_entropy"``, ``"nll"``, ``"mse"`` or a callable ``(output, target) -> (loss, out_adj)``.
        loss_kwargs: extra arguments for the loss (checked against its signature now).
        validate: see the module docstring (True | False | "async" | None: async on CUDA, True elsewhere).
    """

    state_keys: frozenset = frozenset({"momentum_buffer"})
    signal = "out_adj"
    capture_refusal: str | None = None  # why tfa.graphed_step cannot capture this rule's step (None: it can)
    consumes_signal = False  # _rule_step takes the top signal in a one-element list that its sweep empties (sweep.take)
    chain_only = False  # the rule sweeps a chain of layers (§6): a net left to choose (graph=None) records one

    def __init__(self, net: FPropagation, params, defaults: dict, loss="cross_entropy",
                 loss_kwargs: dict | None = None, validate=None):
        if not isinstance(net, FPropagation):
            raise TypeError(f"expected an FPropagation (tfa.FPropagation(model)), got {type(net).__name__}")
        self.net = net
        self.loss = loss
        self._loss_fn = get_loss(loss)
        self.loss_kwargs = dict(loss_kwargs or {})
        self._check_loss_kwargs()
        self.guard = StepGuard(validate, net.reducer)
        super().__init__(net.parameters() if params is None else params, defaults)
        self._check_groups()
        if self.chain_only:  # last: a refused construction leaves the net as it was
            net.require_chain(type(self).__name__)

    @property
    def validate(self):
        """True | False | "async" | None (see the module docstring); may be changed between steps."""
        return self.guard.validate

    @validate.setter
    def validate(self, value) -> None:
        self.guard.validate = check_validate(value)

    def _check_loss_kwargs(self) -> None:
        try:
            signature = inspect.signature(self._loss_fn)
        except (TypeError, ValueError):
            return
        if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            return
        unknown = sorted(set(self.loss_kwargs) - set(signature.parameters) - {"validate"})
        if unknown:
            name = getattr(self._loss_fn, "__name__", "the loss")
            raise ValueError(f"loss_kwargs: {name} takes no argument(s) {unknown}")

    def check_groups(self) -> None:
        """Every group's hyper-parameters are finite and in range (ValueError naming it); each step calls it."""
        self._check_groups()

    def _check_groups(self) -> None:
        """Checked once per settings: a step whose groups hold the same scalar objects as the last checked ones (a
        tensor or any other object is checked every time: it may have changed in place) skips the checks."""
        settings = _group_settings(self.param_groups)
        checked = self.__dict__.get("_checked_settings")
        if settings is not None and checked is not None and len(settings) == len(checked) and all(
                map(operator.is_, settings, checked)):
            return
        self._checked_settings = None
        largest_of_all = self._check_groups_now()
        if settings is not None and largest_of_all <= _SMALLEST_MAX:  # else the parameters' dtypes matter too
            self._checked_settings = settings

    def _check_groups_now(self) -> float:
        largest_of_all = 0.0
        for i, group in enumerate(self.param_groups):
            where = f"param_groups[{i}]: " if len(self.param_groups) > 1 else ""
            for key, (low, high) in self._ranges().items():
                if key in group:
                    check_hyper(key, group[key], low, high, where=where)
            values = [(key, group[key]) for key in ("lr", "momentum", "dampening", "weight_decay")
                      if isinstance(group.get(key), (int, float))]
            largest = max((abs(value) for _, value in values), default=0.0)
            largest_of_all = max(largest_of_all, largest)
            if largest > _SMALLEST_MAX and largest > min(
                    (torch.finfo(p.dtype).max for p in group["params"] if p.is_floating_point()), default=math.inf):
                for param in group["params"]:  # torch's kernels cast these to the dtype: an overflow is silent there
                    for key, value in values:
                        if param.is_floating_point() and abs(value) > torch.finfo(param.dtype).max:
                            raise ValueError(f"{where}{key}={value:g} overflows {param.dtype}, the dtype of "
                                             f"{param_names(self.net, [param])[0]}")
        return largest_of_all

    def _ranges(self) -> dict:
        return _SGD_RANGES

    # -- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, *, target=None, out_adj: Tensor | None = None):
        """One training step from the recorded forward; returns the loss tensor (None with ``out_adj``).

        closure: optional callable running the forward (``lambda: net(x)``) first (torch's contract).
        target: the loss's target (e.g. (B,) class indices); or ``out_adj``: the rule's top signal
        (X*^L; for LFP the reward R^L) in the output's shape.
        """
        if closure is not None and not callable(closure):
            raise TypeError(f"step(): the positional argument is a closure (torch.optim's contract), got "
                            f"{type(closure).__name__}; pass targets as step(target=t)")
        self.guard.raise_pending(wait_for_undo=self._new_buffers_matter())
        self._check_groups()
        if closure is not None:
            closure()
        self.guard.reducer = self.net.reducer
        self.guard.begin(self.net.output)
        loss, signal = self._signal(target, out_adj)
        if self.consumes_signal:  # no frame above the sweep keeps X*^L once the top op has read it
            signal = [signal]
        self._rule_step(signal)
        del signal
        self.guard.commit()  # a rule that wrote nothing still refuses what it was told
        self.guard.settle()
        return loss

    def synchronize(self) -> None:
        """Wait for the flags of every earlier ``validate="async"`` step (graphed replays included) and raise
        the first pending error, if any."""
        self.guard.raise_pending(wait=True)

    def _new_buffers_matter(self) -> bool:
        """Whether a momentum buffer that a refused async step created would change the next step: with
        dampening ≠ 0 a first step (b = g) differs from μ·0 + (1 − dampening) g, so that step's flags are
        awaited first (one sync, only after a step that created buffers) and the buffers removed if refused."""
        return any(group.get("momentum") and group.get("dampening") for group in self.param_groups)

    def _signal(self, target, out_adj) -> tuple[Tensor | None, Tensor]:
        output = self.net.output
        if output.shape[0] == 0:
            raise ValueError("step: the recorded forward has batch size 0; nothing to learn from")
        if out_adj is None:
            if target is None:
                raise ValueError("step() needs target= (or the top signal as out_adj=)")
            target = self.net.loss_target(_as_target(target))
            loss, signal = self._top_signal(self.net.loss_input(*self._trained_loss()), target)
        else:
            loss, signal = None, out_adj
        signal = check_out_adj(self.net, signal, self.signal)
        guard = self.guard
        if guard.active:
            top, name = self.net.layers[-1] if self.net.layers else None, self.signal  # named only on failure
            describe = lambda: top.describe if top is not None else "the model"  # noqa: E731
            guard.require_finite([output], "step", names=lambda: [
                f"X^L, the recorded output of {describe()} (NaN/Inf in the input or the weights?)"])
            # the signal's own check is decided now, as a flag: the guard does not keep X*^L through the sweep
            guard.require(signal.isfinite().all(), "step", lambda: [f"{name} (the signal at the output of {describe()})"])
        return loss, signal

    def _target_validate(self):
        """What the built-in losses and rewards check themselves: dtype, shape and device on the host; the class
        range by torch's CPU kernels (which refuse an index outside [0, C), named by the loss) — a device flag
        instead on CUDA and in async mode (``_safe_target``) — or nothing (validate=False)."""
        return "no_sync" if self.guard.active else False

    def _safe_target(self, output: Tensor, target: Tensor) -> Tensor:
        """On CUDA or in async mode, class targets out of range are flagged on the device and clamped (an index
        outside would abort a CUDA kernel); the step is then refused."""
        guard = self.guard
        if (not guard.active or target.dtype not in _CLASS_DTYPES or output.dim() != 2 or target.dim() != 1
                or (guard.checks_on_host and not output.is_cuda)):
            return target  # another dtype or shape: the loss refuses it by name
        n_classes = output.shape[1]
        inside = ((target >= 0) & (target < n_classes)).all()
        guard.require(inside, "target", [f"a class outside [0, {n_classes - 1}]"],
                      error=lambda: ValueError(f"target: targets must lie in [0, {n_classes - 1}]"))
        return target.clamp(0, n_classes - 1)

    def _trained_loss(self) -> tuple:
        """(loss, loss_kwargs) of the loss this step trains, for ``net.loss_input``; a rule whose top signal is not
        a loss's X*^L (LFP's reward) returns (None, None): a loss logged beside it is a metric."""
        return (self._loss_fn, self.loss_kwargs) if self.signal == "out_adj" else (None, None)

    def _top_signal(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        kwargs = dict(self.loss_kwargs)
        if getattr(self._loss_fn, "closed_form", self._loss_fn) in LOSSES.values():  # ours, or a ModuleLoss
            kwargs["validate"] = self._target_validate()
            target = self._safe_target(output, target)
        result = self._loss_fn(output, target, **kwargs)
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Tensor)):
            name = getattr(self._loss_fn, "__name__", type(self._loss_fn).__name__)  # a module: its class
            raise TypeError(f"loss {name}: expected a callable returning (loss, out_adj), got {type(result).__name__}")
        return result

    def _rule_step(self, signal: Tensor) -> None:
        raise NotImplementedError

    # -- helpers for subclasses --------------------------------------------------------------------
    def _group_of(self) -> dict:
        return {param: group for group in self.param_groups for param in group["params"]}

    def _hyper(self, group) -> dict:
        capture = self.guard.capture
        lr = group["lr"] if capture is None else capture.lrs[id(group)]
        return dict(lr=lr, momentum=group["momentum"], dampening=group["dampening"],
                    weight_decay=group["weight_decay"], nesterov=group["nesterov"], maximize=group["maximize"])

    def _momentum_buffer(self, param: Tensor, group: dict) -> Tensor | None:
        """The parameter's momentum buffer, checked: a tensor of its shape, dtype and device (a loaded or edited
        state may hold anything); None before its first step or without momentum."""
        state = self.state.get(param)
        buf = state.get("momentum_buffer") if state else None
        if buf is None or not group["momentum"]:
            return None
        # is_inference() is an eager-mode check: dynamo graph-breaks on it, and torch 2.14.1 resumes a frame that
        # broke after a lookup keyed by a tensor with the first key's value for every key (each parameter got the
        # first one's buffer: tests/test_graph.py, scripts/dynamo_tensor_key_graph_break.py)
        if not (isinstance(buf, Tensor) and buf.dtype is param.dtype and buf.shape == param.shape
                and (buf.is_cpu and param.is_cpu or buf.device == param.device)  # one CPU: no device objects made
                and (_compiling() or not buf.is_inference())
                and ((buf.is_contiguous() and buf.numel()) or not any(  # contiguous and not empty: no stride 0
                    stride == 0 and size > 1 for stride, size in zip(buf.stride(), buf.shape)))):
            found = (f"a tensor of shape {tuple(buf.shape)}, {buf.dtype} on {buf.device}" if isinstance(buf, Tensor)
                     else f"a {type(buf).__name__}")
            if isinstance(buf, Tensor) and (buf.shape, buf.dtype, buf.device) == (param.shape, param.dtype, param.device):
                found += (f" of layout {buf.layout}" if buf.layout != torch.strided
                          else " made under torch.inference_mode (not writable here)" if buf.is_inference()
                          else " whose entries share memory (an expand()ed view, not writable in place)")
            raise ValueError(f"{type(self).__name__}.step: the momentum_buffer of {param_names(self.net, [param])[0]} "
                             f"is {found}, expected a tensor of shape {tuple(param.shape)}, {param.dtype} on "
                             f"{param.device} (a loaded or edited optimizer state?); nothing was changed")
        return buf

    def _sgd_plan(self, grads: dict[Tensor, Tensor]) -> list:
        """Per group: (group, params, grads, buffers) of the parameters this step updates (buffers checked)."""
        plan = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p in grads]
            if params:
                bufs = [self._momentum_buffer(p, group) for p in params]
                plan.append((group, params, [grads[p] for p in params], bufs))
        return plan

    def _require_sgd_bounds(self, plan, what: str | None = None, grad_terms: dict | None = None) -> None:
        """Tell the guard: every new value of the plan's update fits its dtype (``grad_terms``: {θ: (tensors, slack)},
        tensors whose norms' product times ``slack`` bounds the gradient, read instead of it: a Linear weight's ‖Y*‖
        and ‖X‖, taken in the sweep, and the GEMM's ``rounding_slack``). validate=True decides it from numbers
        (:func:`sgd_update_fits`, one formula per parameter; a parameter whose bound fails is decided by running its
        update on copies, :func:`sgd_update_is_finite`); async from the terms of :func:`sgd_update_bound`."""
        guard = self.guard
        if not guard.active or not plan:
            return
        what = what or f"{type(self).__name__} step"
        grad_terms = grad_terms or {}
        if guard.checks_on_host:
            rows, owners = [], []
            for group, params, grads, bufs in plan:
                hyper = self._hyper(group)
                for param, grad, buf in zip(params, grads, bufs):
                    grad_reads, slack = grad_terms.get(param) or ((grad,), 1.0)
                    read = (param,) if buf is None else (param, buf)
                    exact = partial(sgd_update_is_finite, param, grad, buf, **hyper, foreach=group["foreach"])
                    rows.append((param, (*read, *grad_reads), (buf is not None, hyper, slack), exact))
                    owners.append(param)
            guard.require_fit(rows, sgd_update_fits, what, lambda: [
                f"the update of {name} ({UPDATE_FAILS})" for name in param_names(self.net, owners)])
            return
        entries, owners = [], []
        for group, params, grads, bufs in plan:
            hyper = self._hyper(group)
            for param, grad, buf in zip(params, grads, bufs):
                factors = grad_terms.get(param)
                term = Term(factors[1], *factors[0], exact=grad) if factors else Term(1, grad)
                for terms in sgd_update_bound(param, term, buf, **hyper):
                    entries.append((param, terms))
                    owners.append(param)
        guard.require_bounded(entries, what, lambda: [
            f"the update of {name} ({UPDATE_FAILS})" for name in param_names(self.net, owners)])

    def _write_sgd(self, plan, write_grad: bool = True, masked: bool = True) -> None:
        """Write ``.grad`` and apply each group's SGD update (the last phase of a step), after committing the
        guard's checks (validate=True: the step's one host sync). Async: the writes are masked by the step's
        checks (``masked``: every check is in), else protected and restored at the end (``guard.settle``)."""
        guard = self.guard
        if masked:
            guard.commit()
        ok = guard.ok() if masked else None
        for group, params, grads, bufs in plan:
            created = [p for p, buf in zip(params, bufs) if buf is None] if group["momentum"] else []
            if guard.mode == "async":
                guard.undo.append(self._undo_of(params if write_grad else [], created))
            if write_grad:
                for param, grad in zip(params, grads):
                    param.grad = grad
            if ok is None:
                guard.protect(params + bufs)
            sgd_update(params, grads, bufs, **self._hyper(group), foreach=group["foreach"], ok=ok)
            if group["momentum"] != 0:
                for param, buf in zip(params, bufs):
                    self.state[param]["momentum_buffer"] = buf
                if ok is None:
                    guard.protect_new([self.state[p]["momentum_buffer"] for p in created])

    def _undo_of(self, params: list[Tensor], created: list[Tensor]):
        """What a refused async step wrote that its masks could not keep out: the ``.grad`` of ``params`` and the
        momentum buffers of ``created``; the returned callable puts them back (``guard.raise_pending``)."""
        grads = [(p, p.grad) for p in params]
        written: dict = {}  # what the step left, filled in below: the undo removes only that, nothing set since

        def undo() -> None:
            for param, grad in grads:
                if param.grad is written.get(("grad", param)):
                    param.grad = grad
            for param in created:
                entry = self.state.get(param)
                if entry is not None and entry.get("momentum_buffer") is written.get(("buf", param)):
                    entry.pop("momentum_buffer", None)
                    if not entry:
                        del self.state[param]

        def note() -> None:
            for param, _ in grads:
                written[("grad", param)] = param.grad
            for param in created:
                written[("buf", param)] = self.state.get(param, {}).get("momentum_buffer")
        undo.note = note
        return undo

    def _apply_sgd(self, grads: dict[Tensor, Tensor], grad_terms: dict | None = None) -> None:
        plan = self._sgd_plan(grads)
        self._require_sgd_bounds(plan, grad_terms=grad_terms)
        self._write_sgd(plan)

    @staticmethod
    def _sgd_defaults(lr, momentum, dampening, weight_decay, nesterov, maximize, foreach) -> dict:
        lr = check_hyper("lr", lr)
        momentum = check_hyper("momentum", momentum)
        weight_decay = check_hyper("weight_decay", weight_decay)
        dampening = check_hyper("dampening", dampening, -math.inf)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        return dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                    nesterov=bool(nesterov), maximize=bool(maximize), foreach=foreach)

    # -- checkpoints -------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``load_state_dict`` after checking, before anything changes, that the groups carry this
        rule's hyper-parameters and every state tensor has its parameter's shape (ValueError naming it)."""
        groups, state = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(groups, list) or not isinstance(state, dict):
            raise ValueError(f"{type(self).__name__}.load_state_dict: expected a dict with 'state' and 'param_groups'")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{type(self).__name__}.load_state_dict: {len(groups)} parameter groups, expected "
                             f"{len(self.param_groups)}")
        params = [p for group in self.param_groups for p in group["params"]]
        names = param_names(self.net, params)
        for i, (mine, theirs) in enumerate(zip(self.param_groups, groups)):
            # torch's Optimizer.__setstate__ (run by every load) adds "differentiable" to the defaults
            mine_keys, their_keys = set(self.defaults) - {"differentiable"}, set(theirs) - {"params", "differentiable"}
            odd = (mine_keys - their_keys) | (their_keys - mine_keys - set(mine) - _SCHEDULER_KEYS)
            if odd:
                raise ValueError(f"{type(self).__name__}.load_state_dict: param_groups[{i}] lacks or adds "
                                 f"{sorted(odd)}: not this rule's hyper-parameters (another rule's state_dict?)")
            if len(mine["params"]) != len(theirs["params"]):
                raise ValueError(f"{type(self).__name__}.load_state_dict: param_groups[{i}] has "
                                 f"{len(theirs['params'])} parameters, expected {len(mine['params'])}")
        index = {pid: j for j, pid in enumerate(pid for group in groups for pid in group["params"])}
        for pid, entry in state.items():
            j = index.get(pid)
            if j is None:
                raise ValueError(f"{type(self).__name__}.load_state_dict: state for parameter id {pid}, which no group "
                                 "holds")
            for key, value in entry.items():
                if key not in self.state_keys:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: {names[j]}: unexpected state {key!r} "
                                     f"(expected {sorted(self.state_keys)}; another rule's state_dict?)")
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape != params[j].shape:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: {names[j]}: {key} has shape "
                                     f"{tuple(value.shape)}, expected {tuple(params[j].shape)} (another architecture?)")
                if key in _SHAPED_STATE and not (isinstance(value, Tensor) and value.shape == params[j].shape
                                                 and value.is_floating_point()):
                    found = (f"has shape {tuple(value.shape)}, {value.dtype}" if isinstance(value, Tensor)
                             else f"is a {type(value).__name__}")
                    raise ValueError(f"{type(self).__name__}.load_state_dict: {names[j]}: {key} {found}, expected a "
                                     f"floating tensor of shape {tuple(params[j].shape)}")
        super().load_state_dict(state_dict)


_SMALLEST_MAX = torch.finfo(torch.float16).max  # below this a hyper-parameter fits every floating dtype
_SCALARS = frozenset({int, float, bool, str, type(None)})


def _group_settings(groups: list[dict]) -> tuple | None:
    """Every group's keys and values but its parameters, in one flat tuple (the groups' number and sizes first);
    None when one is not an immutable scalar (a tensor learning rate may change in place)."""
    settings = [len(groups)]
    for group in groups:
        settings.append(len(group))
        for key, value in group.items():
            if key != "params":
                if type(value) not in _SCALARS:
                    return None
                settings += (key, value)
    return tuple(settings)

_CLASS_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

# state that holds one value per entry of its parameter (a loaded 0-dim or Python number is refused)
_SHAPED_STATE = frozenset({"momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "grad_avg"})

# keys that torch's lr schedulers add to parameter groups
_SCHEDULER_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "base_lr", "max_momentum", "base_momentum", "swa_lr"})


def _as_target(target):
    """Tensors pass; numpy arrays and lists of numbers become tensors; anything else is a one-line error."""
    if isinstance(target, Tensor):
        return target
    if type(target).__module__ == "numpy" or isinstance(target, (list, tuple)):
        try:
            return torch.as_tensor(target)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"target: expected a tensor (or a list / numpy array of numbers), got "
                             f"{type(target).__name__}: {exc}") from None
    raise ValueError(f"target: expected a tensor, got {type(target).__name__}")


