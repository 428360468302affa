"""A whole training step as one CUDA graph (``graphed_step``) or one compiled function (``compiled_step``).

Issue 16. The maths is the rules' own (docs/maths.md §1–§4 and the SGD update of §1.4); this module only
changes *when the host takes part*: never, between the copy of a batch into the static buffers and the replay
of forward + sweep + update.

    gs = tfa.graphed_step(net, opt, example_input, example_target)
    for x, t in loader:
        loss = gs(x, t)          # copy into the static buffers, one replay; the loss is a static tensor

What a replay keeps of the eager step, and how:

* **Learning rates** are read from one 0-dim device tensor per parameter group (torch's capturable
  optimizers do the same), refreshed from ``param_groups`` before each replay with a ``fill_`` (no sync), so
  every ``torch.optim.lr_scheduler`` keeps working. Any other hyper-parameter that changes (momentum cycled
  by ``OneCycleLR``, a new group), new state tensors (``opt.load_state_dict``), ``model.train()``/``eval()``
  or the validate mode re-captures the graph (a warning from the third re-capture on).
* **The first step of a fresh optimizer** runs eagerly: it creates the momentum buffers (``b ← g``, not
  ``μ·0 + (1 − dampening) g``), exactly as the eager step does; the capture follows on the next call. A batch
  of another shape or dtype (the last, partial batch of an epoch) also runs as an eager step. A batch may
  come from the host: it is copied into the static buffers (non-blocking from pinned memory).
* **The warm-up** steps that CUDA graphs need before a capture (on a side stream, ``warmup`` of them) and the
  capture itself are undone: parameters, module buffers (BatchNorm's running statistics), optimizer state and
  step count are put back, so the first replay is the next step of the eager sequence. Over 100 steps the
  replays equal the eager steps to rounding (``tests/test_graph.py``).
* **validate="async"** (the default on CUDA): each replay decides on the device, as the eager async step does
  (a failed check writes nothing); the graph folds the step's flags into a device record (first failed step,
  its check, how many failed), which travels to the host by a non-blocking copy after a replay whenever the
  previous copy has arrived; the error is raised by the next call that finds it there, by ``opt.step()``, or
  by ``opt.synchronize()`` (which always waits). ``validate=True`` is refused (a host sync per step);
  ``validate=False`` checks nothing.
* Dropout masks are drawn from the CUDA generator's graph-safe stream: valid masks, not the eager sequence.

Refused in one line, before anything is written: a tensor not on CUDA ("CUDA graphs need CUDA tensors"),
``validate=True``, a process group (the all-reduce is not captured), an optimizer other than this net's
``tfa.optim`` one, and a rule whose update is a torch optimizer's own step (``Consequentialism``,
``InferenceLearning``: ``capture_refusal`` says why). ``compiled_step`` is ``torch.compile`` of the same step
(torch ≥ 2.14).

Over 400 lines: the two whole-step captures (a CUDA graph, ``torch.compile``) share the snapshot that puts a
refused step back and the checked first steps.
"""
from __future__ import annotations

import contextlib
import struct
import warnings

import torch
from torch import Tensor

from .optim.base import RuleOptimizer
from .optim.guard import Capture, async_message, host_bytes
from .recorder import FPropagation
from .sweep import param_names

__all__ = ["graphed_step", "GraphedStep", "compiled_step", "CompiledStep", "COMPILE_MIN_TORCH"]

COMPILE_MIN_TORCH = (2, 14)  # the whole step compiles and equals eager here; older dynamo fails inside it


class _CUDA:
    """The device side of a graphed step. ``tests/test_graph.py`` puts a CPU stand-in with the same four
    methods in its place, which records the ops of the capture and re-runs them on each replay."""

    def check(self, tensors: dict[str, Tensor]) -> None:
        for what, tensor in tensors.items():
            if not tensor.is_cuda:
                raise RuntimeError(f"graphed_step: CUDA graphs need CUDA tensors; {what} is on {tensor.device} "
                                   "(on CPU use opt.step(), or tfa.compiled_step)")

    @contextlib.contextmanager
    def side_stream(self):
        """The warm-up runs on a side stream, as ``torch.cuda.graphs`` asks."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream().wait_stream(stream)

    def capture(self, step):
        """Capture ``step()``; returns (the graph, what ``step`` returned). ``thread_local``: a DataLoader's
        pin-memory thread may call CUDA while this thread captures (torch's default "global" would fail)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            result = step()
        return graph, result

    def to_host(self, tensor: Tensor):
        """A non-blocking copy into pinned memory and the event that says it has arrived."""
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event


class _RecordOnTheWay:
    """The graph's error record on its way to the host; queued with the optimizer's async flags."""

    def __init__(self, graphed: GraphedStep):
        self.graphed = graphed
        self.host, self.event = graphed._backend.to_host(graphed._record)

    def ready(self) -> bool:
        return self.event.query()

    def wait(self) -> None:
        """Wait for a fresh copy: it holds every replay so far."""
        self.host, self.event = self.graphed._backend.to_host(self.graphed._record)
        self.event.synchronize()

    def message(self) -> str | None:
        step, first, failed = struct.unpack("<qqq", host_bytes(self.host))
        if failed == 0:
            return None
        self.graphed._record.zero_()  # reported: later failures are counted afresh
        later = f" ({failed - 1} later replay(s) failed as well and wrote nothing)" if failed > 1 else ""
        return async_message(step, self.graphed._parts, first) + later


class _Snapshot:
    """Parameters, module buffers, optimizer state (values and which tensors) and step count, to put back."""

    def __init__(self, net: FPropagation, opt):
        self.net, self.opt = net, opt
        state = getattr(opt, "state", {})
        tensors = {id(t): t for t in [*net.model.parameters(), *net.model.buffers(),
                                      *(v for entry in state.values() for v in entry.values()
                                        if isinstance(v, Tensor))]}
        self.values = [(t, t.detach().clone()) for t in tensors.values()]
        self.state = {p: dict(entry) for p, entry in state.items()}
        self.grads = {p: p.grad for p in net.model.parameters()}
        guard = getattr(opt, "guard", None)
        self.steps = guard.steps if guard is not None else None

    def restore(self, grads_too: bool = True) -> None:
        with torch.no_grad():
            for tensor, value in self.values:
                tensor.copy_(value)
        state = self.opt.state
        for p in [p for p in state if p not in self.state]:
            del state[p]
        for p, entry in self.state.items():
            state[p].clear()
            state[p].update(entry)
        if self.steps is not None:
            self.opt.guard.steps = self.steps
        if grads_too:
            for p, grad in self.grads.items():
                p.grad = grad
        self.net.clear()


class GraphedStep:
    """One training step of ``opt`` on ``net``, captured as a CUDA graph and replayed per batch.

    Made by :func:`graphed_step`; see the module docstring. Attributes: ``replays``, ``eager_steps``,
    ``captures`` (how often each happened). ``gs(x, t)`` returns the loss as a static tensor (the next
    call overwrites it: ``.clone()`` it to keep it).
    """

    def __init__(self, net: FPropagation, opt: RuleOptimizer, example_input: Tensor, example_target: Tensor, *,
                 warmup: int = 3, _backend=None):
        if not isinstance(net, FPropagation):
            raise TypeError(f"graphed_step: expected an FPropagation (tfa.FPropagation(model)), got {type(net).__name__}")
        if not isinstance(opt, RuleOptimizer):
            raise TypeError(f"graphed_step: expected a tfa.optim optimizer of this net, got {type(opt).__name__} "
                            "(a torch optimizer's step reads its learning rate on the host)")
        if opt.net is not net:
            raise ValueError("graphed_step: the optimizer belongs to another FPropagation")
        if opt.capture_refusal is not None:
            raise RuntimeError(f"graphed_step: {type(opt).__name__} cannot be captured: {opt.capture_refusal}")
        if net.reducer is not None:
            raise RuntimeError("graphed_step: not with a process_group (the gradient all-reduce is not captured); "
                               "use opt.step()")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"graphed_step: warmup must be an int >= 1, got {warmup!r}")
        if not isinstance(example_input, Tensor) or not isinstance(example_target, Tensor):
            raise TypeError("graphed_step: example_input and example_target must be tensors")
        self._backend = _backend if _backend is not None else _CUDA()
        params = [p for group in opt.param_groups for p in group["params"]]
        self._backend.check({"the example input": example_input, "the example target": example_target,
                             "the first parameter": params[0]})
        if (opt.validate if opt.validate is not None else ("async" if example_input.is_cuda else True)) is True:
            raise RuntimeError("graphed_step: validate=True checks on the host in every step, which a graph cannot "
                               "hold; use validate='async' (the default on CUDA) or validate=False")
        self.net, self.opt, self.warmup = net, opt, warmup
        self.model = net.model
        device = params[0].device
        self._x = example_input.detach().clone()
        self._t = example_target.detach().clone()
        self._record = torch.zeros(3, dtype=torch.int64, device=device)  # first failed step, its check, count
        self._counter = torch.zeros((), dtype=torch.int64, device=device)
        self._lrs: dict[int, Tensor] = {}
        self._lr_values: list[float] = []
        self._parts: list = []
        self._graph = self._loss = self._key = self._inflight = None
        self._eager_first = False
        self.replays = self.eager_steps = self.captures = 0
        self._capture()

    # -- the call ------------------------------------------------------------------------------
    def __call__(self, x: Tensor, target: Tensor) -> Tensor:
        if (x.shape != self._x.shape or target.shape != self._t.shape or x.dtype != self._x.dtype
                or target.dtype != self._t.dtype):
            return self._eager(x, target)  # e.g. the last, partial batch of an epoch
        if self._eager_first:
            self._eager_first = False
            return self._eager(x, target)
        if self._graph is None or self._structure() != self._key:
            self._capture()
            if self._graph is None:
                return self._eager(x, target)
        opt = self.opt
        guard = opt.guard
        guard.raise_pending(wait=False)
        opt.check_groups()
        self._refresh_lrs()
        self._x.copy_(x, non_blocking=True)  # from the device, or from (pinned) host memory
        self._t.copy_(target, non_blocking=True)
        guard.steps += 1
        self._graph.replay()
        self.replays += 1
        if guard.mode == "async" and self._parts and (self._inflight is None or self._inflight not in guard.pending):
            self._inflight = _RecordOnTheWay(self)
            guard.add_pending(self._inflight)
        return self._loss

    def synchronize(self) -> None:
        """``opt.synchronize()``: wait for every replay's checks and raise the first pending error."""
        self.opt.synchronize()

    def _eager(self, x: Tensor, target: Tensor) -> Tensor:
        self.eager_steps += 1
        x, target = x.to(self._x.device, non_blocking=True), target.to(self._t.device, non_blocking=True)
        with torch.no_grad():
            self.net(x)
            return self.opt.step(target=target)

    # -- capture -------------------------------------------------------------------------------
    def _structure(self) -> tuple:
        """What a replay cannot change: everything of the step but the learning rates and the batch (the state
        tensors too: ``opt.load_state_dict`` puts new ones in place, which the graph would not write)."""
        groups = tuple((tuple(id(p) for p in group["params"]),
                        tuple((k, v) for k, v in sorted(group.items()) if k not in ("params", "lr")
                              and isinstance(v, (bool, int, float, str, type(None)))))
                       for group in self.opt.param_groups)
        state = tuple(id(v) for entry in self.opt.state.values() for v in entry.values() if isinstance(v, Tensor))
        return groups, state, self.model.training, self.opt.validate

    def _refresh_lrs(self) -> None:
        """By position: ``opt.load_state_dict`` replaces the group dicts (the structure key keeps positions)."""
        for i, (group, lr) in enumerate(zip(self.opt.param_groups, self._lrs.values())):
            value = float(group["lr"])
            if self._lr_values[i] != value:
                lr.fill_(value)
                self._lr_values[i] = value

    def _state_keys(self) -> dict:
        return {p: frozenset(entry) for p, entry in self.opt.state.items()}

    def _captured_step(self) -> Tensor:
        """The step the graph holds: the forward, the rule's step, and the async flags folded into the record."""
        self.net(self._x)
        loss = self.opt.step(target=self._t)
        self._counter.add_(1)
        capture = self.opt.guard.capture
        if capture.flags is not None:
            failed = ~capture.flags
            first = failed.to(torch.int64).argmax()
            fresh = failed.any() & (self._record[2] == 0)
            newest = torch.stack([self._counter, first, self._record[2]])
            self._record.copy_(torch.where(fresh, newest, self._record))
            self._record[2].add_(failed.any().to(torch.int64))
            self._parts = capture.parts
        return loss

    def _capture(self) -> None:
        """Warm up, capture, undo both. A fresh optimizer (state created by its first step) postpones the
        capture until one eager step has made that state."""
        opt = self.opt
        opt.synchronize()  # nothing may be in flight during a capture (and a re-capture reports the old graph's)
        self._graph = self._loss = None
        self._lrs = {id(g): torch.tensor(float(g["lr"]), dtype=torch.float64, device=self._x.device)
                     for g in opt.param_groups}
        self._lr_values = [float(g["lr"]) for g in opt.param_groups]
        key, keys, snapshot = self._structure(), self._state_keys(), _Snapshot(self.net, self.opt)
        capture = Capture(self._lrs)
        try:
            with torch.no_grad(), opt.guard.capturing(capture):
                with self._backend.side_stream():
                    for i in range(self.warmup):
                        self._captured_step()
                        if i == 0 and self._state_keys() != keys:  # the first step made state: not steady yet
                            snapshot.restore(grads_too=True)
                            self._eager_first = True
                            return
                snapshot.restore(grads_too=False)
                graph, loss = self._backend.capture(self._captured_step)
            snapshot.restore(grads_too=False)
        except BaseException as exc:
            snapshot.restore(grads_too=True)
            if isinstance(exc, Exception):
                raise RuntimeError(f"graphed_step: capturing the {type(opt).__name__} step failed, nothing was "
                                   f"changed: {type(exc).__name__}: {exc}") from exc
            raise
        finally:
            self._record.zero_()
            self._counter.fill_(opt.guard.steps)
        self._graph, self._loss, self._key = graph, loss, key
        self._inflight = None
        self.captures += 1
        if self.captures >= 3:
            warnings.warn(f"graphed_step: re-captured {self.captures - 1} times (a hyper-parameter other than lr, "
                          "the train/eval mode or the validate mode changed); only learning rates are read from "
                          "the device", stacklevel=3)


def graphed_step(net: FPropagation, opt: RuleOptimizer, example_input: Tensor, example_target: Tensor, *,
                 warmup: int = 3) -> GraphedStep:
    """Capture ``net(x); opt.step(target=t)`` as one CUDA graph; returns ``step(x, t) -> loss`` that replays it.

    example_input, example_target: CUDA tensors of the batch shape to capture (their values are not trained on).
    warmup: eager steps on a side stream before the capture (undone, as the capture is). See the module
    docstring for what a replay keeps of the eager step and what is refused.
    """
    return GraphedStep(net, opt, example_input, example_target, warmup=warmup)


class CompiledStep:
    """``torch.compile`` of ``net(x); opt.step(target=t)``, its first ``check_steps`` calls checked against the
    eager step (made by :func:`compiled_step`)."""

    def __init__(self, net: FPropagation, opt, check_steps: int, compile_kwargs: dict):
        import torch._inductor.config  # noqa: F401  (fallback_random below)

        net.require_chain("tfa.compiled_step")  # dynamo cannot trace the tape's TorchFunctionMode
        self.net, self.opt, self.check_steps = net, opt, check_steps
        self.checked = 0
        self._compiled = torch.compile(self._step, **compile_kwargs)

    @torch.no_grad()
    def _step(self, x: Tensor, target: Tensor):
        self.net(x)
        return self.opt.step(target=target)

    def __call__(self, x: Tensor, target: Tensor):
        # inductor's own RNG would draw other dropout masks than the eager step: use torch's, so the two agree
        with torch._inductor.config.patch(fallback_random=True):
            if self.checked >= self.check_steps:
                return self._compiled(x, target)
            return self._checked(x, target)

    def _checked(self, x: Tensor, target: Tensor):
        """Run the step eagerly, put everything back, run it compiled; refuse (all back again) if they differ
        by more than rounding: ``tol`` of what the step moved, plus a few ulps of the values."""
        before = _Snapshot(self.net, self.opt)
        rng = torch.random.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
        self._step(x, target)
        eager = [value.detach().clone() for value, _ in before.values]
        before.restore()
        torch.random.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])
        try:
            loss = self._compiled(x, target)
        except Exception as exc:  # a trace that fails part-way may have run the segments before it: put them back
            before.restore()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise RuntimeError(f"compiled_step: torch.compile could not run step {self.checked + 1} "
                               f"({type(exc).__name__}: {first[:200]}); nothing was changed; use the eager step") from exc
        self.checked += 1
        with torch.no_grad():
            for (tensor, old), want in zip(before.values, eager):
                if not tensor.is_floating_point():
                    continue
                error = (tensor - want).abs().max()
                moved = (want - old).abs().max()
                tol = 1e-3 * moved + 8 * torch.finfo(tensor.dtype).eps * want.abs().max()
                if bool(error > tol):  # a host read, in the checked steps only
                    before.restore()
                    name = _name_of(self.net, self.opt, tensor)
                    raise RuntimeError(f"compiled_step: torch.compile changed step {self.checked}: {name} differs from "
                                       f"the eager step's by {float(error):.3g} (the step moved it by {float(moved):.3g}); "
                                       "nothing was changed; use the eager step (a compiler bug: report it)")
        return loss


def _name_of(net: FPropagation, opt, tensor: Tensor) -> str:
    for name, value in [*net.model.named_parameters(), *net.model.named_buffers()]:
        if value is tensor:
            return name
    for param, entry in getattr(opt, "state", {}).items():
        for key, value in entry.items():
            if value is tensor:
                return f"the {key} of {param_names(net, [param])[0]}"
    return "a tensor of the step"


def compiled_step(net: FPropagation, opt, *, check_steps: int = 3, **compile_kwargs) -> CompiledStep:
    """``torch.compile`` of ``net(x); opt.step(target=t)`` (hooks and Python checks may graph-break; correct
    anyway); returns ``step(x, t) -> loss``. Any optimizer of ``net`` with ``opt.step(target=)``.

    The first ``check_steps`` calls run the step eagerly too (from the same state and RNG state, then put back)
    and refuse, restoring everything, if the compiled step's parameters, buffers or optimizer state differ
    from the eager step's by more than rounding: a silent miscompilation (torch 2.14.1's inductor drops the
    ``alpha`` of ``add(θ, mm, alpha)``, pytorch/pytorch#167313; the SGD core avoids that pattern) becomes an
    error. Random ops draw from torch's generator (``fallback_random``), so Dropout masks equal eager's.
    torch >= 2.14: torch 2.4 cannot trace the fused step (a dict keyed by tensors), torch 2.1 not the ``out=``
    forms of autograd's kernels (measured 2026-12-01)."""
    if isinstance(check_steps, bool) or not isinstance(check_steps, int) or check_steps < 0:
        raise ValueError(f"compiled_step: check_steps must be an int >= 0, got {check_steps!r}")
    found = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if found < COMPILE_MIN_TORCH:
        raise RuntimeError(f"compiled_step: torch.compile of the whole step needs torch >= "
                           f"{'.'.join(map(str, COMPILE_MIN_TORCH))}, found {torch.__version__}; use the eager step")
    return CompiledStep(net, opt, check_steps, compile_kwargs)
