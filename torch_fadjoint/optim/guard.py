"""The step guard: every check of an optimizer step, its host syncs and its async flags (docs/maths.md §6.7).

A rule's step tells the guard what must hold before it writes anything; the guard decides when and how it
is decided (``validate``, docs/performance.md)::

    guard.begin(output)                        resolve the mode; count the step
    guard.require_finite(tensors, what, names) e.g. the recorded output and the top signal
    guard.require_bounded(entries, what, names) |θ'| ≤ Σ c · Π ‖t‖ fits θ's dtype, one entry per parameter
    guard.require_fit(rows, fits, what, names) the same decided by ``fits`` from numbers (validate=True only)
    guard.require(flags, what, names)          flags decided on the device (a Cholesky info, a target range)
    guard.commit()                             validate=True: ONE host sync; raises the first failure
    ok = guard.ok()                            async: the AND of the step's flags, for writes where(ok, new, old)
    guard.settle()                             async: restore protected tensors where a flag failed; queue flags

Nothing is cached across steps: every bound reads the tensors it bounds in the step that writes them, so a
value changed behind the version counters (``.data``, ``.numpy()``, ``vector_to_parameters``) is caught.

* ``True`` — the checks are gathered as tensors whose 2-norms are read in one ``_foreach_norm`` per (device,
  dtype) and brought to the host in one sync at ``commit()``; the bounds are evaluated there in float64.
  A 2-norm bounds every entry, and is finite iff every entry is (unless it overflows): a failing fast
  check is re-decided exactly before anything is refused (``require_fit``'s ``exact()``, e.g. the SGD update run
  on copies; max|t| and elementwise finiteness for the others), so no step is refused by the looseness of the
  fast path. Every bound must stay below ``_limit``: 12 units of roundoff under the dtype's largest value.
* ``"async"`` — every check becomes device flags (exact peaks); no host sync; writes are masked by ``ok()``;
  the error is raised by a later step once the flags reached the host, or by ``synchronize()``.
* ``False`` — nothing is checked.

Over 400 lines: every check of a step with its one host read, the async flags and their undo, and the update's
bounds: the one object that owns a step's checks (issue 20's split).
"""
from __future__ import annotations

import contextlib
import ctypes
import math
from collections import defaultdict, deque
from typing import Callable

import torch
from torch import Tensor

__all__ = ["StepGuard", "Capture", "PendingFlags", "Term", "scaled", "rounding_slack", "VALIDATE", "check_validate",
           "async_message", "host_bytes"]

VALIDATE = (None, True, False, "async")


def check_validate(validate):
    if not any(validate is v or (isinstance(v, str) and validate == v) for v in VALIDATE):
        raise ValueError(f"validate must be True, False, 'async' or None (async on CUDA, True elsewhere), got "
                         f"{validate!r}")
    return validate


def Term(coef, *tensors: Tensor, rows: int = 1, exact: Tensor | None = None) -> tuple:
    """One term of a bound: ``coef · Π ‖t‖`` over ``tensors`` (a product Y*ᵀX is bounded entrywise by ‖Y*‖·‖X‖,
    or by rows·max|Y*|·max|X|, ``rows`` its contracted length). ``exact``: the tensor the term bounds, when it
    exists (a gradient made from its factors' norms), read by the exact re-check. ``coef`` may be a 0-dim device
    tensor (a captured learning rate). A plain tuple: the step makes a few per parameter."""
    return coef, tensors, rows, exact


def scaled(terms: list[tuple], factor) -> list[tuple]:
    """``factor`` × every term."""
    return [(coef * factor, tensors, rows, exact) for coef, tensors, rows, exact in terms]


def rounding_slack(n: int, dtype: torch.dtype) -> float:
    """1 + γ_n: a sum of n products computed in floating point (a GEMM's contraction of length n, accumulated in
    float64 for float64, in float32 otherwise) exceeds the exact sum by at most γ_n = n·u / (1 − n·u) times the
    sum of the products' magnitudes (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1). A bound on
    the exact product (‖Y*‖·‖X‖) bounds the computed one once multiplied by it; ∞ where n·u ≥ 1/2."""
    unit = 2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24
    return 1 + n * unit / (1 - n * unit) if n * unit < 0.5 else math.inf


# -- peaks ---------------------------------------------------------------------------------------
def _amax(tensor: Tensor) -> Tensor:
    """max|t| in one read (NaN if t holds one). ``aminmax``: on CPU the ∞-norm is not vectorised."""
    if tensor.numel() == 0:
        return tensor.new_zeros(())
    low, high = torch.aminmax(tensor)
    return torch.maximum(low.abs(), high.abs())


def amaxes(tensors: list[Tensor]) -> list[Tensor]:
    """max|t| of each tensor (0-dim, its dtype); on CUDA one ``_foreach_norm(∞)`` per dtype."""
    if len(tensors) > 1 and tensors[0].is_cuda and len({(t.device, t.dtype) for t in tensors}) == 1:
        return list(torch._foreach_norm(tensors, float("inf")))
    return [_amax(t) for t in tensors]


def _foreach_norm(tensors: list[Tensor]) -> list[Tensor]:
    """2-norms, accumulated in float32 at least (a float16 tensor's norm past 65504 is common)."""
    if tensors[0].dtype in (torch.float16, torch.bfloat16):
        try:
            return list(torch._foreach_norm(tensors, 2, dtype=torch.float32))
        except TypeError:  # torch without the dtype argument
            return list(torch._foreach_norm([t.float() for t in tensors], 2))
    return list(torch._foreach_norm(tensors, 2))


def _read_back(tensors: list[Tensor], flags: list[Tensor]) -> tuple[list[float], list[float]]:
    """‖t‖₂ of each tensor and the values of ``flags`` on the host: one ``_foreach_norm`` per (device, dtype) of
    the tensors, and one host read per device (``torch.cat`` promotes the dtypes)."""
    groups: dict = {}
    for i, tensor in enumerate(tensors):  # get_device(): an int, cheaper than .device per tensor
        groups.setdefault((tensor.get_device(), tensor.dtype), []).append(i)
    parts = [torch.stack(_foreach_norm([tensors[i] for i in indices])) for indices in groups.values()]
    parts += [f.reshape(-1) for f in flags]
    devices = [part.get_device() for part in parts]
    if len(set(devices)) == 1:
        values = (torch.cat(parts) if len(parts) > 1 else parts[0]).tolist()
    else:
        by_device = defaultdict(list)
        for device, part in zip(devices, parts):
            by_device[device].append(part)
        read = {device: iter(torch.cat(group).tolist()) for device, group in by_device.items()}
        values = [next(read[device]) for device, part in zip(devices, parts) for _ in range(part.numel())]
    out = [0.0] * len(tensors)
    position = 0
    for indices in groups.values():
        for i in indices:
            out[i] = values[position]
            position += 1
    return out, values[position:]


_ROUNDINGS = 12  # 8 for the ops of an update (g', b', d, θ' round ≤ 6 times), 4 for the bound's own host sums


def _limit(dtype: torch.dtype) -> float:
    """The largest a bound may be: the dtype's largest value × (1 − 12·u), u its unit roundoff. A bound holds for the
    exact values; each op of the update rounds its result by up to u of it (float16, lr = 3: a momentum buffer
    rounded up made −inf while the exact θ' fitted by 8 units), and the bound itself is summed in float64 on the
    host, which rounds alike (float64: a θ' one half-ulp past the largest value passed a bound that the host's
    sum rounded down, and torch's one-rounding add wrote −inf; session 5). Below 10⁻⁶ of the range in float32."""
    info = torch.finfo(dtype)
    return info.max * (1 - _ROUNDINGS * info.eps / 2)


_LIMITS: dict = {}


def _limits(dtypes: tuple, device) -> Tensor:
    """``_limit`` of each dtype, as a float64 vector on ``device`` (made once per key)."""
    key = (device, dtypes)
    if key not in _LIMITS:
        _LIMITS[key] = torch.tensor([_limit(d) for d in dtypes], dtype=torch.float64, device=device)
    return _LIMITS[key]


def _finite_flags(tensors: list[Tensor]) -> Tensor:
    """Per tensor, whether it is finite, decided on the device (no host sync)."""
    return torch.stack([t.isfinite().all() for t in tensors])


# -- async: errors decided on the device, raised from the host later ----------------------------
def host_bytes(host: Tensor) -> bytes:
    """The bytes of a host tensor, read without dispatching an op (so no sync is counted or made)."""
    return ctypes.string_at(host.data_ptr(), host.numel() * host.element_size())


def async_message(step: int, parts: list, first: int) -> str:
    """The error of flag ``first`` among ``parts`` [(what, names, count)] of step ``step``."""
    for what, names, count in parts:
        if first < count:
            names = names() if callable(names) else names
            where = names[first] if names is not None else f"entry {first}"
            found = where if what == "target" else f"non-finite values in {where}"
            return (f"step {step} (validate='async'): {what}: {found}; that step wrote no parameter and no state")
        first -= count
    return f"step {step} (validate='async'): a check failed; that step wrote no parameter and no state"


class PendingFlags:
    """One async step's flags on their way to the host (a non-blocking copy and an event on CUDA).

    ``undo``: called when this step's flags say it was refused and no step ran after it: it removes what the
    step could not help writing (the ``.grad`` it set, the momentum buffers it created)."""

    def __init__(self, flags: Tensor, step: int, parts: list, undo: Callable[[], None] | None = None):
        if flags.is_cuda:
            self.host = torch.empty(flags.shape, dtype=torch.bool, pin_memory=True)
            self.host.copy_(flags, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = flags, None
        self.step, self.parts, self.undo = step, parts, undo

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def message(self) -> str | None:
        values = host_bytes(self.host)
        return None if all(values) else async_message(self.step, self.parts, values.index(0))


class Capture:
    """What changes while a step is captured into one graph (``tfa.graphed_step``): the learning rate of each
    parameter group is read from a 0-dim device tensor (``lrs``, keyed by the group's ``id``), so a scheduler's
    new value reaches the replays; the async flags stay on the device (``flags``, ``parts``) for the graph to
    fold into its own error record."""

    def __init__(self, lrs: dict[int, Tensor]):
        self.lrs = lrs
        self.flags: Tensor | None = None
        self.parts: list = []


# -- the guard -----------------------------------------------------------------------------------
class StepGuard:
    """Every check of one optimizer's steps (see the module docstring). ``reducer``: a
    ``tfa.distributed.GradientAverager`` (every rank refuses alike), or None."""

    def __init__(self, validate=None, reducer=None):
        self.validate = check_validate(validate)
        self.reducer = reducer
        self.mode = True                     # the resolved validate of the step in progress
        self.steps = 0
        self.pending: deque = deque()        # async: earlier steps' flags on their way to the host
        self.capture: Capture | None = None  # set while tfa.graphed_step captures a step
        self._checks: list = []              # True: (kind, payload, what, names, error) until commit()
        self._flags: list = []               # async: (flags, what, names)
        self._protected: list = []           # async: (tensor written in place, its value before the step)
        self._ok = (0, None)                 # async: (number of flags, their AND)
        self.undo: list[Callable[[], None]] = []  # async: what a refused step's undo runs (see PendingFlags)

    # -- the step's frame ---------------------------------------------------------------------------
    def begin(self, output: Tensor) -> None:
        """Start a step whose recorded output is ``output`` (its device resolves ``validate=None``)."""
        self.mode = ("async" if output.is_cuda else True) if self.validate is None else self.validate
        self._checks, self._flags, self._protected, self._ok, self.undo = [], [], [], (0, None), []
        self.steps += 1

    @property
    def checks_on_host(self) -> bool:
        """Whether this step may read values back to decide (validate=True)."""
        return self.mode is True

    @property
    def active(self) -> bool:
        return self.mode is not False

    @contextlib.contextmanager
    def capturing(self, capture: Capture):
        """Steps inside run as ``capture`` says (``tfa.graphed_step``'s warm-up and capture)."""
        self.capture = capture
        try:
            yield capture
        finally:
            self.capture = None

    # -- what must hold -----------------------------------------------------------------------------
    def require_finite(self, tensors: list[Tensor], what: str, names) -> None:
        """Every entry of ``tensors`` is finite. ``names``: one per tensor (or a callable making them)."""
        if not tensors or self.mode is False:
            return
        if self.mode is True:
            self._checks.append(("finite", list(tensors), what, names, None))
        else:
            self._add_flags(_finite_flags(tensors), what, names)

    def require_bounded(self, entries: list[tuple[Tensor, list[Term]]], what: str, names) -> None:
        """For each (θ, terms): Σ coef·rows·Π‖t‖ over the terms bounds every new value of θ, and must fit
        θ's dtype (NaN/Inf anywhere makes it fail)."""
        if not entries or self.mode is False:
            return
        if self.mode is True:
            self._checks.append(("bound", entries, what, names, None))
        else:
            self._add_flags(self._device_bounds(entries), what, names)

    def require_fit(self, rows: list[tuple], fits: Callable, what: str, names) -> None:
        """validate=True: for each row (θ, reads, args, exact), ``fits(args, values, limit)`` says whether every new
        value of θ fits ``limit`` (``_limit`` of θ's dtype), from a bound on max|t| of each tensor of ``reads`` (its
        2-norm); a row that fails so is re-decided by ``exact()`` (e.g. the update run on copies). The numbers-only
        form of :meth:`require_bounded` (no terms built per step: the step's bound is one closed formula)."""
        if rows and self.mode is True:
            self._checks.append(("fit", (rows, fits), what, names, None))

    def require(self, flags: Tensor, what: str, names, error: Callable[[], Exception] | None = None) -> None:
        """Flags decided on the device (True = passes). ``error``: the exception validate=True raises (default:
        the non-finite RuntimeError naming ``names[first]``)."""
        if self.mode is False:
            return
        flags = flags.reshape(-1)
        if self.mode is True:
            self._checks.append(("flags", flags, what, names, error))
        else:
            self._add_flags(flags, what, names)

    def _add_flags(self, flags: Tensor, what: str, names) -> None:
        if self.reducer is not None:  # every rank skips alike (a collective, not a host sync)
            flags = self.reducer.all_ranks(flags)
        self._flags.append((flags, what, names))

    def _device_bounds(self, entries) -> Tensor:
        """Async: the exact bounds on the device, compared with each θ's dtype range (no host sync)."""
        reads = {id(t): t for _, terms in entries for _, tensors, _, _ in terms for t in tensors}
        peak = dict(zip(reads, amaxes(list(reads.values()))))
        bounds = []
        for _, terms in entries:
            total = None
            for coef, tensors, rows, _ in terms:  # a 0-dim input may be a norm computed earlier: slack and floor
                value = peak[id(tensors[0])].to(torch.float64) * _SLACK + _floor(tensors[0].dtype)
                for t in tensors[1:]:
                    value = value * (peak[id(t)].to(torch.float64) * _SLACK + _floor(t.dtype))
                value = value * (coef * rows)
                total = value if total is None else total + value
            bounds.append(total)
        limits = _limits(tuple(param.dtype for param, _ in entries), bounds[0].device)
        return torch.stack(bounds) <= limits  # NaN compares False

    # -- deciding -------------------------------------------------------------------------------------
    def commit(self) -> None:
        """validate=True: decide every check gathered so far with one host sync and raise the first failure
        (RuntimeError naming the tensor; nothing has been written). Other modes: nothing to do."""
        checks, self._checks = self._checks, []
        if self.mode is not True or not checks:
            return
        reads = {id(t): t for kind, payload, *_ in checks if kind != "flags" for t in _tensors_of(kind, payload)}
        flags = [payload for kind, payload, *_ in checks if kind == "flags"]
        norms, flag_values = _read_back(list(reads.values()), flags)
        norm = dict(zip(reads, norms))
        floors = {}
        for t in reads.values():
            if t.dtype not in floors:
                floors[t.dtype] = _floor(t.dtype)
        bound = {key: value * _SLACK + floors[t.dtype] for (key, t), value in zip(reads.items(), norms)}
        flag_values = iter(flag_values)
        passes = []
        for kind, payload, what, names, error in checks:
            if kind == "finite":
                fast = [math.isfinite(norm[id(t)]) for t in payload]
                passes.append([ok or bool(t.isfinite().all()) for ok, t in zip(fast, payload)])
            elif kind == "bound":
                passes.append([_fits(param, terms, bound) or _fits_exactly(param, terms) for param, terms in payload])
            elif kind == "fit":
                rows, fits = payload
                passes.append([fits(args, [bound[id(t)] for t in reads], _limit(param.dtype)) or exact()
                               for param, reads, args, exact in rows])
            else:
                passes.append([next(flag_values) == 1.0 for _ in range(payload.numel())])
        if self.reducer is not None:  # every rank refuses alike: one small collective
            device = next(iter(reads.values())).device if reads else flags[0].device
            flat = self.reducer.all_ranks(torch.tensor([ok for entry in passes for ok in entry], dtype=torch.bool,
                                                       device=device)).tolist()
            flat = iter(flat)
            passes = [[next(flat) for _ in entry] for entry in passes]
        for (kind, payload, what, names, error), entry in zip(checks, passes):
            if not all(entry):
                if error is not None:
                    raise error()
                first = entry.index(False)
                names = names() if callable(names) else names
                where = names[first] if names is not None else f"entry {first}"
                raise RuntimeError(f"{what}: non-finite values in {where}; nothing was changed")

    def ok(self) -> Tensor | None:
        """Async: whether every check of this step so far passed (a 0-dim bool on the device); None otherwise."""
        if self.mode != "async" or not self._flags:
            return None
        if self._ok[0] != len(self._flags):
            self._ok = (len(self._flags), torch.cat([f.to(torch.bool).reshape(-1) for f, _, _ in self._flags]).all())
        return self._ok[1]

    def protect(self, tensors) -> None:
        """Async: keep the values this step is about to overwrite in place (restored if a flag fails)."""
        if self.mode == "async":
            self._protected.extend((t, t.clone()) for t in tensors if t is not None)

    def protect_new(self, tensors) -> None:
        """Async: state created by this step is zeroed if a flag fails (it cannot be un-created without a sync;
        the step's ``undo`` removes it once the host knows)."""
        if self.mode == "async":
            self._protected.extend((t, torch.zeros_like(t)) for t in tensors)

    def restore_protected(self) -> None:
        """An exception in the middle of an async step's writes: put back every protected value now."""
        for tensor, before in reversed(self._protected):
            tensor.copy_(before)
        self._protected = []

    def settle(self) -> None:
        """Async, after the writes: where any flag failed, put back every protected value (on the device, no
        sync), and send the flags to the host without waiting."""
        if self.mode != "async" or not self._flags:
            return
        flags = torch.cat([f.to(torch.bool).reshape(-1) for f, _, _ in self._flags])
        ok = flags.all()
        for tensor, before in self._protected:
            torch.where(ok, tensor, before, out=tensor)
        self._protected = []
        parts = [(what, names, len(f.reshape(-1))) for f, what, names in self._flags]
        self._flags = []
        if self.capture is not None:  # a captured step: the graph keeps the flags on the device
            self.capture.flags, self.capture.parts = flags, parts
            return
        undo, self.undo = self.undo, []
        for u in undo:  # what the step left, so that the undo removes only that (not what the user sets later)
            note = getattr(u, "note", None)
            if note is not None:
                note()
        self.pending.append(PendingFlags(flags, self.steps, parts,
                                         (lambda: [u() for u in reversed(undo)]) if undo else None))

    def add_pending(self, pending) -> None:
        """Queue another source of async flags (a graphed replay's record)."""
        self.pending.append(pending)

    def raise_pending(self, wait: bool = False, wait_for_undo: bool = False) -> None:
        """Raise the first error among earlier async steps whose flags have reached the host, oldest first
        (``wait``: wait for all; ``wait_for_undo``: wait for those whose refusal would need an undo). A refused
        step that no later step followed is undone first (its ``.grad`` and new momentum buffers)."""
        while self.pending:
            pending = self.pending[0]
            if not pending.ready():
                if not (wait or (wait_for_undo and getattr(pending, "undo", None) is not None)):
                    return
                pending.wait()
            self.pending.popleft()
            message = pending.message()
            if message is not None:
                if getattr(pending, "undo", None) is not None and pending.step == self.steps:
                    pending.undo()
                raise RuntimeError(message)


def _tensors_of(kind: str, payload) -> list[Tensor]:
    if kind == "finite":
        return payload
    if kind == "fit":
        return [t for _, reads, *_ in payload[0] for t in reads]
    return [t for _, terms in payload for _, tensors, _, _ in terms for t in tensors]


_SLACK = 1 + 2.0 ** -20  # a computed 2-norm may round below the largest entry by an ulp


def _floor(dtype: torch.dtype) -> float:
    """Below this, squares may underflow and a 2-norm read 0: it is added to every norm read."""
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    return math.sqrt(torch.finfo(accumulate).tiny)


def _fits(param: Tensor, terms: list[tuple], bound: dict) -> bool:
    """The fast bound (2-norms, float64 on the host) is finite and fits θ's dtype. ``bound``: each tensor's norm
    with its slack and floor."""
    total = 0.0
    for coef, tensors, _, _ in terms:  # ‖Y*ᵀX‖_max ≤ ‖Y*‖·‖X‖: no row factor with 2-norms
        value = float(coef)
        for t in tensors:
            value *= bound[id(t)]
        total += value
    return total <= _limit(param.dtype)  # NaN compares False


def _fits_exactly(param: Tensor, terms: list[tuple]) -> bool:
    """The exact bound, decided only when the fast one failed: max|t|; for a product, the smaller of
    rows·Π max|t| and Π ‖t‖ in float64; the bounded tensor itself where the term names it (``exact``)."""
    total = 0.0
    for coef, tensors, rows, exact in terms:
        if exact is not None:
            value = float(_amax(exact))
        elif len(tensors) == 1:
            value = float(_amax(tensors[0]))
        else:
            peaks = rows * math.prod(float(_amax(t)) for t in tensors)
            norms = math.prod(float(torch.linalg.vector_norm(t, dtype=torch.float64)) for t in tensors)
            value = min(peaks, norms)
        total += float(coef) * value
    return total <= _limit(param.dtype)
