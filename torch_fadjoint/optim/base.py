"""The shared optimizer base and the SGD update every rule applies (ALGORITHMS.md §1.4, §6.7).

``RuleOptimizer`` is a ``torch.optim.Optimizer`` bound to an :class:`~torch_fadjoint.FPropagation`:
hyper-parameters live in ``param_groups`` (schedulers, ``state_dict`` and ``zero_grad`` work unchanged),
per-parameter buffers in ``self.state[p]``. One step contract for every rule::

    loss = opt.step(closure=None, *, target=None, out_adj=None)

``closure`` (positional, as torch's) runs the forward; ``target`` gives the loss (and X*^L, or LFP's
reward), or ``out_adj`` gives the rule's top signal directly (then the loss returned is None).

The update is torch.optim.SGD's (STYLE P1: a thin class over a functional core)::

    g ← −g if maximize;  g ← g + λ θ
    b ← g (first step) | μ b + (1 − dampening) g;   g ← g + μ b (Nesterov) | b
    θ ← θ − lr g

``validate`` (checked by one rule for every optimizer):

* ``True`` — the targets are checked, and a non-finite top signal, feedback or UPDATE is refused before
  anything is written (three host syncs per step: targets, output and signal, update bounds): for SGD by a bound on every new value,
  max|θ| + lr·bound(direction) from max|g|, max|b| and the hyper-parameters (NaN/Inf anywhere, in a
  loaded momentum buffer too, or an overflow; it may refuse an update that would just fit, only when the
  bound itself leaves the dtype's range); for a delegated torch optimizer (Adam, …) by checking the new
  values and state and restoring the old ones.
* ``"async"`` — the same checks, decided on the device (a found-non-finite flag, as torch's fused optimizers
  and ``GradScaler`` do): the step makes no host synchronisation; every SGD write is made
  ``where(ok, new, old)`` with ``ok`` the AND of the step's checks, one tensor at a time (so a non-finite
  update is never written, a new momentum buffer is zeros, and no copy of the parameters is kept; ``.grad``
  is written); the error — naming the step and the first non-finite tensor — is raised at the next step once
  the flags have reached the host (a non-blocking copy and an event on CUDA; steps still in flight are
  queued, none is dropped), or at ``opt.synchronize()``. Where writes happen before the last check (the
  sequential equilibrium rule) or inside a delegated torch optimizer, the values are kept and put back with
  ``torch.where`` instead. A delegated torch optimizer makes whatever syncs it makes itself (CPU Adam reads
  its step count; ``capturable=True`` avoids it on CUDA).
* ``False`` — no finite checks at all and no host sync; that is all it gives up.
* ``None`` (the default) — ``"async"`` when the recorded output is on CUDA, ``True`` elsewhere.

Hyper-parameters are checked (finite, in range, an lr the parameters' dtype can hold) at construction and
at every step (values set later in ``param_groups`` included), whatever ``validate`` is. Exceptions inside
a rule leave parameters, ``.grad`` and state as they were and the records either intact or cleared.
"""
from __future__ import annotations

import contextlib
import ctypes
import inspect
import math
import numbers
from collections import defaultdict, deque

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..losses import LOSSES, get_loss
from ..recorder import FPropagation
from ..sweep import check_finite, check_out_adj, param_names

__all__ = ["RuleOptimizer", "DelegatingRuleOptimizer", "sgd_update", "sgd_bounds", "fused_sgd_weight_update",
           "check_hyper", "BASES"]


# -- the functional SGD core -------------------------------------------------------------------
def sgd_update(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor | None], *, lr: float,
               momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
               maximize: bool = False, foreach: bool | None = None, ok: Tensor | None = None) -> None:
    """θ ← θ − lr · SGD-direction(g), in place; fills ``momentum_buffers`` on the first step.

    params, grads: matching lists; momentum_buffers: the same length, ``None`` entries are replaced by
    new buffers (the caller stores them). Grads are never modified in place. ``lr`` may be a 0-dim tensor
    on the parameters' device (a captured step reads it there: ``θ.addcmul_(d, lr, value=−1)``).
    ok: a 0-dim bool tensor (validate="async"): every write becomes ``where(ok, new, old)`` — decided on the
    device, nothing changes where it is False (a new buffer is zeros) — one tensor at a time, so no copy
    of the parameters is kept.
    """
    if foreach is None:
        foreach = bool(params) and all(p.device.type != "cpu" for p in params)
    if foreach and ok is None and not isinstance(lr, Tensor):
        _foreach_sgd(params, grads, momentum_buffers, lr=lr, momentum=momentum, dampening=dampening,
                     weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
    else:
        _single_tensor_sgd(params, grads, momentum_buffers, lr=lr, momentum=momentum, dampening=dampening,
                           weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, ok=ok)


def _compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling and is_compiling())


def _add(target: Tensor, other: Tensor, alpha: float, inplace: bool = False) -> Tensor:
    """target + alpha·other. Under torch.compile the product is made first: inductor's add + mm → addmm
    pattern drops ``alpha`` (torch 2.14.1, pytorch/pytorch#167313), which turns θ − lr·(Y*ᵀX) into θ + Y*ᵀX
    when the gradient feeds the update alone (measured: tests/test_graph.py)."""
    if alpha != 1 and _compiling():
        other, alpha = other * alpha, 1
    return target.add_(other, alpha=alpha) if inplace else target.add(other, alpha=alpha)


def _single_tensor_sgd(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
                       ok=None):
    """torch.optim.SGD's single-tensor loop; with ``ok`` every in-place write is ``t ← where(ok, t', t)``."""
    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        if weight_decay != 0:
            grad = _add(grad, param, weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = momentum_buffers[i] = (torch.clone(grad).detach() if ok is None else
                                             torch.where(ok, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)))
            elif ok is None:
                _add(buf.mul_(momentum), grad, 1 - dampening, inplace=True)
            else:  # one temporary at a time
                torch.where(ok, _add(buf * momentum, grad, 1 - dampening, inplace=True), buf, out=buf)
            grad = _add(grad, buf, momentum) if nesterov else buf
        if ok is not None:
            torch.where(ok, param - grad * lr if isinstance(lr, Tensor) else _add(param, grad, -lr), param, out=param)
        elif isinstance(lr, Tensor):
            param.addcmul_(grad, lr, value=-1)
        else:
            _add(param, grad, -lr, inplace=True)


def _group_by_device_dtype(tensors):
    """Indices grouped by (device, dtype): torch's own helper is private."""
    groups = defaultdict(list)
    for i, tensor in enumerate(tensors):
        groups[(tensor.device, tensor.dtype)].append(i)
    return groups.values()


def _foreach_sgd(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, maximize):
    for indices in _group_by_device_dtype(params):
        device_params = [params[i] for i in indices]
        device_grads = [grads[i] for i in indices]
        if maximize:
            device_grads = torch._foreach_neg(device_grads)
        if weight_decay != 0:
            device_grads = torch._foreach_add(device_grads, device_params, alpha=weight_decay)
        if momentum != 0:
            if all(momentum_buffers[i] is not None for i in indices):
                bufs = [momentum_buffers[i] for i in indices]
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, device_grads, alpha=1 - dampening)
            else:
                bufs = []
                for i, grad in zip(indices, device_grads):
                    if momentum_buffers[i] is None:
                        momentum_buffers[i] = torch.clone(grad).detach()
                    else:
                        momentum_buffers[i].mul_(momentum).add_(grad, alpha=1 - dampening)
                    bufs.append(momentum_buffers[i])
            device_grads = torch._foreach_add(device_grads, bufs, alpha=momentum) if nesterov else bufs
        torch._foreach_add_(device_params, device_grads, alpha=-lr)


def _amax(tensor: Tensor) -> Tensor:
    """max|t| in one read (NaN if t holds one). ``aminmax``: on CPU the ∞-norm is not vectorised (1 877 µs for a
    1024 × 1024 float32 tensor against aminmax's 104 µs, abs().amax()'s 177 µs and a temporary, 2 threads)."""
    low, high = torch.aminmax(tensor)
    return torch.maximum(low.abs(), high.abs())


def _amaxes(tensors: list[Tensor]) -> list[Tensor]:
    """max|t| of each tensor; on CUDA one ``_foreach_norm(∞)`` where the tensors share a dtype (one launch
    instead of one per tensor)."""
    if len(tensors) > 1 and tensors[0].is_cuda and len({(t.device, t.dtype) for t in tensors}) == 1:
        return list(torch._foreach_norm(tensors, float("inf")))
    return [_amax(t) for t in tensors]


def peaks(tensors: list[Tensor], known: dict | None = None) -> list[Tensor]:
    """max|t| of every tensor (0-dim, its dtype; NaN if t has one), without a host sync.

    known: {tensor: (version, bound)} — a bound this optimizer computed for the tensor after its last write;
    it replaces the read while the tensor's version counter says nobody has written it since.
    """
    out: list = [None] * len(tensors)
    read = []
    for i, tensor in enumerate(tensors):
        entry = known.get(tensor) if known is not None else None
        if entry is not None and entry[0] == tensor._version:
            out[i] = entry[1]
        else:
            read.append(i)
    for i, peak in zip(read, _amaxes([tensors[i] for i in read])):
        out[i] = peak
    return out


def _stack64(values: list[Tensor]) -> Tensor:
    """0-dim tensors → one float64 vector (one cast when they share a dtype)."""
    if all(v.dtype == values[0].dtype for v in values):
        return torch.stack(values).to(torch.float64)
    return torch.stack([v.to(torch.float64) for v in values])


_LIMITS: dict = {}


def _limits(params: list[Tensor]) -> Tensor:
    """The largest finite value of each parameter's dtype, as a float64 vector on their device (cached: made
    once, so no host-to-device copy per step)."""
    key = (params[0].device, tuple(p.dtype for p in params))
    if key not in _LIMITS:
        _LIMITS[key] = torch.tensor([torch.finfo(dtype).max for dtype in key[1]], dtype=torch.float64, device=key[0])
    return _LIMITS[key]


def sgd_bounds(params: list[Tensor], grad_bounds: list[Tensor], momentum_buffers: list[Tensor | None], *, lr: float,
               momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
               known: dict | None = None, new_buffers: list | None = None, **_) -> Tensor:
    """A bound on every new value |θ'| of :func:`sgd_update`: a float64 vector, one entry per parameter, ``inf``
    where it could leave the parameter's dtype (and NaN where θ, g or the buffer holds one); no host sync.

    grad_bounds: max|g| per parameter (or a bound on it), 0-dim tensors::

        |g'| ≤ G + λP;  |b'| ≤ μB + |1 − dampening| |g'|;  |d| ≤ |g'| + μ|b'| (Nesterov) | |b'|;  |θ'| ≤ P + lr|d|

    computed for all parameters at once. P and B are read (``peaks``) unless ``known`` holds this optimizer's
    own bounds from the last write. With ``new_buffers`` (a list) the bound on each new buffer is appended to
    it (None without momentum).
    """
    peak = _stack64(peaks(params, known))
    direction = _stack64(grad_bounds)
    if weight_decay:
        direction = direction + weight_decay * peak
    new_buf = None
    if momentum:
        present = [buf for buf in momentum_buffers if buf is not None]
        found = iter(peaks(present, known))
        zero = peak.new_zeros(())
        buf_peak = _stack64([next(found).to(torch.float64) if buf is not None else zero for buf in momentum_buffers])
        # a new buffer is g' itself: the factor max(1, |1 − dampening|) bounds both cases without a mask
        factor = abs(1 - dampening) if len(present) == len(momentum_buffers) else max(1.0, abs(1 - dampening))
        new_buf = momentum * buf_peak + factor * direction
        direction = direction + momentum * new_buf if nesterov else new_buf
    bound = peak + lr * direction
    if new_buffers is not None:
        new_buffers.extend(new_buf.unbind() if new_buf is not None else [None] * len(params))
    return torch.where(bound <= _limits(params), bound, torch.full_like(bound, float("inf")))  # NaN → inf too


def fused_sgd_weight_update(weights: list[Tensor], factors: list[tuple[Tensor, Tensor]],
                            momentum_buffers: list[Tensor | None], *, lr: float, momentum: float = 0.0,
                            dampening: float = 0.0, weight_decay: float = 0.0, maximize: bool = False,
                            foreach: bool | None = None, ok: Tensor | None = None, **_) -> None:
    """SGD on each W from the factors (Y*, X) of its gradient G = Y*ᵀ X, with G never materialised.

    The GEMM that makes G writes straight into the tensor the update reads (s = −1 if maximize else 1)::

        μ = 0:  W ← (1 − lr λ) W − lr s Y*ᵀX                   one addmm_ into W
        μ > 0:  b ← s Y*ᵀX + λ W  (first step)  |  μ b + (1 − dampening)(s Y*ᵀX + λ W)   addmm_ into b
                W ← W − lr b

    The same update as ``sgd_update`` (no Nesterov) to rounding, not bit for bit: the GEMM rounds
    ``α Y*ᵀX + β C`` once where SGD rounds G, then the update. With ``lr`` a 0-dim device tensor (a
    captured step) and μ = 0, the smaller factor is scaled by −lr s first (W ← (1 − lr λ) W first, if λ).
    With ``ok`` (validate="async") each GEMM writes a new tensor, kept where ``ok`` (see ``sgd_update``).
    """
    sign = -1.0 if maximize else 1.0
    if ok is not None:
        _masked_fused_update(weights, factors, momentum_buffers, lr=lr, momentum=momentum, dampening=dampening,
                             weight_decay=weight_decay, sign=sign, ok=ok)
        return
    for i, (weight, (y_adj, x_prev)) in enumerate(zip(weights, factors)):
        if momentum == 0 and isinstance(lr, Tensor):
            if weight_decay != 0:
                weight.mul_(1.0 - lr * weight_decay)
            if y_adj.numel() <= x_prev.numel():
                weight.addmm_((y_adj * (-sign * lr)).t(), x_prev)
            else:
                weight.addmm_(y_adj.t(), x_prev * (-sign * lr))
        elif momentum == 0:
            weight.addmm_(y_adj.t(), x_prev, beta=1.0 - lr * weight_decay, alpha=-lr * sign)
        elif momentum_buffers[i] is None:
            momentum_buffers[i] = torch.addmm(weight, y_adj.t(), x_prev, beta=weight_decay, alpha=sign)
        else:
            momentum_buffers[i].addmm_(y_adj.t(), x_prev, beta=momentum, alpha=(1 - dampening) * sign)
            if weight_decay != 0:
                momentum_buffers[i].add_(weight, alpha=(1 - dampening) * weight_decay)
    if momentum != 0:
        sgd_update(weights, momentum_buffers, [None] * len(weights), lr=lr, foreach=foreach)


def _masked_fused_update(weights, factors, momentum_buffers, *, lr, momentum, dampening, weight_decay, sign, ok):
    for i, (weight, (y_adj, x_prev)) in enumerate(zip(weights, factors)):
        if momentum == 0:
            if isinstance(lr, Tensor):
                scaled = (1.0 - lr * weight_decay) * weight if weight_decay != 0 else weight
                new = torch.addmm(scaled, (y_adj * (-sign * lr)).t(), x_prev)
            else:
                new = torch.addmm(weight, y_adj.t(), x_prev, beta=1.0 - lr * weight_decay, alpha=-lr * sign)
            torch.where(ok, new, weight, out=weight)
            continue
        buf = momentum_buffers[i]
        if buf is None:
            new = torch.addmm(weight, y_adj.t(), x_prev, beta=weight_decay, alpha=sign)
            momentum_buffers[i] = torch.where(ok, new, torch.zeros((), dtype=new.dtype, device=new.device))
        else:
            new = torch.addmm(buf, y_adj.t(), x_prev, beta=momentum, alpha=(1 - dampening) * sign)
            if weight_decay != 0:
                new.add_(weight, alpha=(1 - dampening) * weight_decay)
            torch.where(ok, new, buf, out=buf)
    if momentum != 0:
        sgd_update(weights, momentum_buffers, [None] * len(weights), lr=lr, ok=ok)


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


VALIDATE = (None, True, False, "async")


def _check_validate(validate):
    if not any(validate is v or (isinstance(v, str) and validate == v) for v in VALIDATE):
        raise ValueError(f"validate must be True, False, 'async' or None (async on CUDA, True elsewhere), got "
                         f"{validate!r}")
    return validate


def _finite_flags(tensors: list[Tensor]) -> Tensor:
    """Per tensor, whether it is finite, decided on the device (no host sync). A float64 sum cannot overflow
    for float32/bf16 tensors, so one read each; float64 tensors take the exact elementwise test."""
    return torch.stack([t.isfinite().all() if t.dtype == torch.float64 else t.sum(dtype=torch.float64).isfinite()
                        for t in tensors])


# -- validate="async": errors decided on the device, raised from the host later --------------------
def _host_bytes(host: Tensor) -> bytes:
    """The bytes of a host tensor, read without dispatching an op (so no sync is counted or made)."""
    return ctypes.string_at(host.data_ptr(), host.numel() * host.element_size())


def _async_message(step: int, parts: list, first: int) -> str:
    """The error of flag ``first`` among ``parts`` [(what, names, count)] of step ``step``."""
    for what, names, count in parts:
        if first < count:
            names = names() if callable(names) else names
            where = names[first] if names is not None else f"entry {first}"
            return (f"step {step} (validate='async'): {what}: non-finite values in {where}; that step wrote no "
                    "parameter and no state")
        first -= count
    return f"step {step} (validate='async'): a check failed; that step wrote no parameter and no state"


class PendingFlags:
    """One async step's flags on their way to the host (a non-blocking copy and an event on CUDA)."""

    def __init__(self, flags: Tensor, step: int, parts: list):
        if flags.is_cuda:
            self.host = torch.empty(flags.shape, dtype=torch.bool, pin_memory=True)
            self.host.copy_(flags, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = flags, None
        self.step, self.parts = step, parts

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def message(self) -> str | None:
        values = _host_bytes(self.host)
        return None if all(values) else _async_message(self.step, self.parts, values.index(0))


class _Forget(dict):
    """A ``known``-bounds record that keeps nothing (a captured step must read every peak on each replay)."""

    def __setitem__(self, key, value) -> None:
        pass


class Capture:
    """What changes while a step is captured into one graph (``tfa.graphed_step``): the learning rate of each
    parameter group is read from a 0-dim device tensor (``lrs``, keyed by the group's ``id``), so a scheduler's
    new value reaches the replays; no bound is remembered across steps; the async flags stay on the device
    (``flags``, ``parts``) for the graph to fold into its own error record."""

    def __init__(self, lrs: dict[int, Tensor]):
        self.lrs = lrs
        self.flags: Tensor | None = None
        self.parts: list = []


# -- the optimizer base ------------------------------------------------------------------------
class RuleOptimizer(Optimizer):
    """Base of every ``tfa.optim`` optimizer: an Optimizer bound to an ``FPropagation`` recorder.

    Subclasses set ``signal`` ("out_adj" or "reward"), implement ``_top_signal(target)`` when it is not
    the loss's X*^L, and ``_rule_step(signal)``, which computes everything first and writes last.

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

    def __init__(self, net: FPropagation, params, defaults: dict, loss="cross_entropy",
                 loss_kwargs: dict | None = None, validate=None):
        if not isinstance(net, FPropagation):
            raise TypeError(f"expected an FPropagation (tfa.FPropagation(model)), got {type(net).__name__}")
        self.net = net
        self.loss = loss
        self._loss_fn = get_loss(loss)
        self.loss_kwargs = dict(loss_kwargs or {})
        self._check_loss_kwargs()
        self.validate = _check_validate(validate)
        self._mode = True       # the resolved validate of the step in progress
        self._flags: list = []  # async: (per-tensor finite flags on the device, their names)
        self._guarded: list = []  # async: (tensor written in place, its value before the step)
        self._pending = deque()  # async: earlier steps' flags on their way to the host, oldest first
        self._capture: Capture | None = None  # set while tfa.graphed_step captures a step
        self._steps = 0
        self._known = {}        # {param or buffer: (version after our write, bound on max|·|)}: saves reads
        self._ok_of = (0, None)  # async: (number of flags, their AND) of the step in progress
        self._next_known = []
        super().__init__(net.parameters() if params is None else params, defaults)
        self._check_groups()

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

    def _check_groups(self) -> None:
        """Every group's hyper-parameters are finite and in range (called at construction and each step)."""
        for i, group in enumerate(self.param_groups):
            where = f"param_groups[{i}]: " if len(self.param_groups) > 1 else ""
            for key, (low, high) in self._ranges().items():
                if key in group:
                    check_hyper(key, group[key], low, high, where=where)
            for param in group["params"]:  # torch's kernels raise an unnamed overflow for such an alpha
                if param.is_floating_point() and group["lr"] > torch.finfo(param.dtype).max:
                    raise ValueError(f"{where}lr={group['lr']:g} overflows {param.dtype}, the dtype of "
                                     f"{param_names(self.net, [param])[0]}")

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
        self._raise_pending(wait=False)
        self._check_groups()
        if closure is not None:
            closure()
        output = self.net.output
        mode = self.validate
        self._mode = ("async" if output.is_cuda else True) if mode is None else mode
        self._flags, self._guarded, self._next_known, self._ok_of = [], [], [], (0, None)
        self._steps += 1
        loss, signal = self._signal(target, out_adj)
        self._rule_step(signal)
        if self._mode == "async":
            self._settle()
        return loss

    @contextlib.contextmanager
    def capturing(self, capture: Capture):
        """Steps inside run as ``capture`` says (``tfa.graphed_step``'s warm-up and capture). Afterwards no
        bound is trusted any more: a replay writes the parameters behind their version counters."""
        self._capture, self._known = capture, _Forget()
        try:
            yield capture
        finally:
            self._capture, self._known = None, {}

    # -- validate="async": decided on the device, raised later ------------------------------------
    @property
    def _checks_now(self) -> bool:
        """Whether this step checks with a host sync (validate=True)."""
        return self._mode is True

    def _check(self, tensors: list[Tensor], what: str, names) -> None:
        """Refuse non-finite ``tensors``: now (validate=True, one sync), later (async), or not at all (False)."""
        if not tensors or self._mode is False:
            return
        if self._mode is True:
            check_finite(tensors, what, names=names, reducer=self.net.reducer)
            return
        flags = _finite_flags(tensors)
        if self.net.reducer is not None:  # every rank skips alike (a collective, not a host sync)
            flags = self.net.reducer.all_ranks(flags)
        self._flags.append((flags, what, names))

    def _guard(self, tensors) -> None:
        """Async: keep the values that this step is about to overwrite in place (restored if a flag fails)."""
        if self._mode == "async":
            self._guarded.extend((t, t.clone()) for t in tensors if t is not None)

    def _guard_new(self, tensors) -> None:
        """Async: state created by this step is zeroed if a flag fails (it cannot be un-created without a sync)."""
        if self._mode == "async":
            self._guarded.extend((t, torch.zeros_like(t)) for t in tensors)

    def _settle(self) -> None:
        """Async, after the writes: where any flag failed, put back every guarded value (torch.where on the
        device, no sync), and send the flags to the host without waiting."""
        if not self._flags:
            return
        flags = torch.cat([f.to(torch.bool).reshape(-1) for f, _, _ in self._flags])
        ok = flags.all()
        for tensor, before in self._guarded:
            torch.where(ok, tensor, before, out=tensor)
        self._guarded = []
        parts = [(what, names, len(f.reshape(-1))) for f, what, names in self._flags]
        self._flags = []
        if self._capture is not None:  # a captured step: the graph keeps the flags on the device
            self._capture.flags, self._capture.parts = flags, parts
        else:
            self._pending.append(PendingFlags(flags, self._steps, parts))

    def _raise_pending(self, wait: bool) -> None:
        """Raise the first error among earlier async steps whose flags have reached the host, oldest first
        (``wait``: wait for all of them)."""
        while self._pending:
            pending = self._pending[0]
            if not pending.ready():
                if not wait:
                    return
                pending.wait()
            self._pending.popleft()
            message = pending.message()
            if message is not None:
                raise RuntimeError(message)

    def synchronize(self) -> None:
        """Wait for the flags of every earlier ``validate="async"`` step (graphed replays included) and raise
        the first pending error, if any."""
        self._raise_pending(wait=True)

    def _signal(self, target, out_adj) -> tuple[Tensor | None, Tensor]:
        output = self.net.output
        if output.shape[0] == 0:
            raise ValueError("step: the recorded forward has batch size 0; nothing to learn from")
        if out_adj is None:
            if target is None:
                raise ValueError("step() needs target= (or the top signal as out_adj=)")
            target = _as_target(target)
            loss, signal = self._top_signal(output, target)
        else:
            loss, signal = None, out_adj
        check_out_adj(self.net, signal, self.signal)
        describe = self.net.layers[-1].describe
        self._check([output, signal], "step", names=[
            f"X^L, the recorded output of {describe} (NaN/Inf in the input or the weights?)",
            f"{self.signal} (the signal at the output of {describe})"])
        return loss, signal

    def _safe_target(self, output: Tensor, target: Tensor) -> Tensor:
        """Async: class targets out of range are flagged on the device and clamped (an out-of-range index would
        abort a CUDA kernel); the step is then skipped."""
        if self._mode != "async" or target.is_floating_point() or output.dim() != 2 or target.dim() != 1:
            return target
        n_classes = output.shape[1]
        inside = ((target >= 0) & (target < n_classes)).all().reshape(1)
        self._flags.append((inside, "target", [f"the target (a class outside [0, {n_classes - 1}])"]))
        return target.clamp(0, n_classes - 1)

    def _top_signal(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        kwargs = dict(self.loss_kwargs)
        if self._loss_fn in LOSSES.values():
            kwargs["validate"] = self._checks_now
            target = self._safe_target(output, target)
        result = self._loss_fn(output, target, **kwargs)
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Tensor)):
            name = getattr(self._loss_fn, "__name__", "the loss")
            raise TypeError(f"loss {name}: expected a callable returning (loss, out_adj), got {type(result).__name__}")
        return result

    def _rule_step(self, signal: Tensor) -> None:
        raise NotImplementedError

    # -- helpers for subclasses --------------------------------------------------------------------
    def _group_of(self) -> dict:
        return {param: group for group in self.param_groups for param in group["params"]}

    def _sgd_plan(self, grads: dict[Tensor, Tensor], grad_bounds: dict | None = None, check: bool | None = None) -> list:
        """Per group: (group, params, grads, buffers) of the parameters this step updates; with ``validate``
        every new value is bounded first (one host sync) and nothing is written on failure."""
        plan = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p in grads]
            if params:
                bufs = [self.state.get(p, {}).get("momentum_buffer") for p in params]
                plan.append((group, params, [grads[p] for p in params], bufs))
        if self._mode is not False if check is None else check:
            self._check_sgd_bounds(plan, grad_bounds)
        return plan

    def _check_sgd_bounds(self, plan, grad_bounds: dict | None) -> None:
        bounds, params_all = [], []
        for group, params, group_grads, bufs in plan:
            missing = [g for p, g in zip(params, group_grads) if not (grad_bounds and p in grad_bounds)]
            read = iter(_amaxes(missing))
            gbounds = [grad_bounds[p] if grad_bounds and p in grad_bounds else next(read) for p in params]
            new_buffers: list = []
            group_bounds = sgd_bounds(params, gbounds, bufs, **self._hyper(group), known=self._known,
                                      new_buffers=new_buffers)
            self._next_known.extend(zip(params, group_bounds.unbind(), new_buffers))
            bounds.append(group_bounds)
            params_all += params
        if bounds:
            self._check_bounds(torch.cat(bounds), f"{type(self).__name__} step", lambda: [
                f"the update of {name} (its new values, its gradient or its momentum buffer are not finite)"
                for name in param_names(self.net, params_all)])

    def _check_bounds(self, bounds: Tensor, what: str, names) -> None:
        """``bounds`` (one entry per update) must be finite: now (one sync), later (async) or not at all."""
        if self._mode is False:
            return
        flags = bounds.isfinite()
        if self.net.reducer is not None:
            flags = self.net.reducer.all_ranks(flags)
        if self._mode == "async":
            self._flags.append((flags, what, names))
        elif not bool(flags.all()):
            first = int((~flags).nonzero()[0, 0])
            raise RuntimeError(f"{what}: non-finite values in {(names() if callable(names) else names)[first]}; "
                               "nothing was changed")

    def _hyper(self, group) -> dict:
        lr = group["lr"] if self._capture is None else self._capture.lrs[id(group)]
        return dict(lr=lr, momentum=group["momentum"], dampening=group["dampening"],
                    weight_decay=group["weight_decay"], nesterov=group["nesterov"], maximize=group["maximize"])

    def _ok(self) -> Tensor | None:
        """Async: whether every check of this step so far passed (a 0-dim bool on the device), for writes
        made ``where(ok, new, old)``; None in the other modes."""
        if self._mode != "async" or not self._flags:
            return None
        if self._ok_of[0] != len(self._flags):
            self._ok_of = (len(self._flags), torch.cat([f.to(torch.bool).reshape(-1) for f, _, _ in self._flags]).all())
        return self._ok_of[1]

    def _write_sgd(self, plan, write_grad: bool = True, masked: bool = True) -> None:
        """Write ``.grad`` and apply each group's SGD update (the last phase of a step). Async: the writes are
        masked by this step's checks (``masked``: every check is in), else guarded and restored at the end."""
        ok = self._ok() if masked else None
        for group, params, group_grads, bufs in plan:
            for param, grad in zip(params, group_grads if write_grad else ()):
                param.grad = grad
            if ok is None:
                self._guard(params + bufs)
            created = [i for i, buf in enumerate(bufs) if buf is None]
            sgd_update(params, group_grads, bufs, **self._hyper(group), foreach=group["foreach"], ok=ok)
            if ok is None:
                self._guard_new([bufs[i] for i in created if bufs[i] is not None])
            self._remember(params, bufs)
            if group["momentum"] != 0:
                for param, buf in zip(params, bufs):
                    self.state[param]["momentum_buffer"] = buf

    def _remember(self, params, bufs) -> None:
        """After a write: the bounds just checked become this optimizer's record of the new peaks (no re-read
        while nobody else writes these tensors; the version counter tells)."""
        if self._mode is not True:  # async: a skipped step's bound is not its values' (one foreach read next step)
            self._next_known = []
            return
        pending = {param: (bound, buf_bound) for param, bound, buf_bound in self._next_known}
        for param, buf in zip(params, bufs):
            if param in pending:
                bound, buf_bound = pending.pop(param)
                self._known[param] = (param._version, bound)
                if buf is not None and buf_bound is not None:
                    self._known[buf] = (buf._version, buf_bound)
        self._next_known = [(p, b, bb) for p, (b, bb) in pending.items()]

    def _apply_sgd(self, grads: dict[Tensor, Tensor]) -> None:
        self._write_sgd(self._sgd_plan(grads))

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
        super().load_state_dict(state_dict)


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


BASES: dict[str, type[Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
}
_BASE_STATE_KEYS = {
    torch.optim.SGD: {"momentum_buffer"},
    torch.optim.Adam: {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
    torch.optim.AdamW: {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
    torch.optim.RMSprop: {"step", "square_avg", "momentum_buffer", "grad_avg"},
}


class DelegatingRuleOptimizer(RuleOptimizer):
    """A rule whose update is any ``torch.optim`` optimizer's (``base``), fed the rule's ``.grad``.

    The base optimizer (``self.inner``) shares this optimizer's ``param_groups`` and ``state``, so
    schedulers and ``add_param_group`` change the lr it uses and ``state_dict()`` carries its buffers.
    Only the parameters this forward used are stepped: the others' ``.grad`` is hidden during the step
    (a stale ``.grad`` from an earlier step never moves a parameter). With ``validate`` the new values
    and state are checked after the base step and the old ones restored if any is not finite.

    base: "sgd" | "adam" | "adamw" | "rmsprop" | an ``Optimizer`` class; ``base_kwargs`` go to it.
    """

    capture_refusal = ("its update is the base torch optimizer's own step, which reads its learning rate as a "
                       "host number (a graph would freeze it) and keeps Python-side state; graphed_step captures "
                       "FAdjoint, EquilibriumFAdjoint and LFP")

    def __init__(self, net: FPropagation, params, lr: float, base, base_kwargs: dict, loss="cross_entropy",
                 loss_kwargs: dict | None = None, validate=None, rule_defaults: dict | None = None):
        if isinstance(base, str) and base.lower() in BASES:
            base_cls = BASES[base.lower()]
        elif isinstance(base, type) and issubclass(base, Optimizer):
            base_cls = base
        else:
            raise ValueError(f"base must be one of {sorted(BASES)} or an Optimizer class, got {base!r}")
        if not isinstance(net, FPropagation):
            raise TypeError(f"expected an FPropagation (tfa.FPropagation(model)), got {type(net).__name__}")
        lr = check_hyper("lr", lr)
        params = list(net.parameters() if params is None else params)
        self.inner = base_cls(params, lr=lr, **base_kwargs)  # validates its own hyper-parameters
        for group in self.inner.param_groups:
            for key, value in (rule_defaults or {}).items():
                group.setdefault(key, value)
        self.state_keys = frozenset(_BASE_STATE_KEYS.get(base_cls, set()) or {"*"})
        super().__init__(net, self.inner.param_groups, {**self.inner.defaults, **(rule_defaults or {})}, loss=loss,
                         loss_kwargs=loss_kwargs, validate=validate)
        self._link_inner()

    def _ranges(self) -> dict:
        return {"lr": (0.0, math.inf)}

    def _link_inner(self) -> None:
        self.inner.param_groups = self.param_groups
        self.inner.state = self.state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "inner" in self.__dict__:
            self._link_inner()

    def load_state_dict(self, state_dict: dict) -> None:
        if "*" in self.state_keys:  # an Optimizer class we know nothing about: torch's own checks only
            Optimizer.load_state_dict(self, state_dict)
        else:
            super().load_state_dict(state_dict)

    def _apply_base(self, grads: dict[Tensor, Tensor]) -> None:
        """Step the base optimizer on exactly the parameters in ``grads`` (all-or-nothing with validate)."""
        mine = [p for group in self.param_groups for p in group["params"]]
        used = [p for p in mine if p in grads]

        hidden = {p: p.grad for p in mine if p not in grads and p.grad is not None}
        saved = None
        fresh = [p for p in used if not self.state.get(p)]
        self._guard(used + [v for p in used for v in self.state.get(p, {}).values() if isinstance(v, Tensor)])
        if self._checks_now:
            saved = [(p, p.clone(), p.grad, {k: v.clone() if isinstance(v, Tensor) else v
                                             for k, v in self.state.get(p, {}).items()}, p in self.state)
                     for p in used]
        try:
            for p in hidden:
                p.grad = None
            for p in used:
                p.grad = grads[p]
            self.inner.step()
            self._guard_new([v for p in fresh for v in self.state.get(p, {}).values() if isinstance(v, Tensor)])
            new = used + [v for p in used for v in self.state.get(p, {}).values()
                          if isinstance(v, Tensor) and v.is_floating_point()]
            self._check(new, f"{type(self).__name__} step", names=lambda: [
                f"the new value of {n}" for n in param_names(self.net, used)] + ["the optimizer state"] * len(new))
        except BaseException:
            for p, value, grad, state, had in saved or []:
                p.copy_(value)
                p.grad = grad
                if had:
                    self.state[p] = state
                else:
                    self.state.pop(p, None)
            raise
        finally:
            for p, grad in hidden.items():
                p.grad = grad
