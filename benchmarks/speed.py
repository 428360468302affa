"""Step time and memory of every learning rule against autograd + torch.optim.SGD, as ratios (issue 5).

    python -m benchmarks.speed --config configs/speed.toml [--quick] [--cuda-graph] [--compile]

For each MLP size × batch of the config, every rule of ``benchmarks/rules.py`` (``--rules`` to choose) is
built from the same initial weights; after warm-up the repetitions are interleaved (rule A, rule B, …,
A, B, …) in one process, so drifting clocks and neighbours hit every rule alike. Reported per rule:

* step time: median and interquartile range of forward + adjoint/backward + update, the ratio of medians
  and the *paired ratio* (median and quartiles of the per-repetition ratios of interleaved neighbours,
  which cancels load that drifts over seconds: the steadier estimate on a shared machine);
* bytes kept for the backward step (exact, noise-free): for autograd, every tensor the forward saves
  (``torch.autograd.graph.saved_tensors_hooks``); for our rules, every tensor held by the recorder's
  records after the forward; storages counted once, parameters (and views of them) excluded;
* peak memory of one step: the most bytes of tensor storage alive at once among those created during the
  step, tracked by a ``TorchDispatchMode`` that counts each op output's storage once and releases it when
  its last tensor dies (the same method on CPU and CUDA); on CUDA also ``torch.cuda.max_memory_allocated``
  above the memory allocated before the step.

On a loaded CPU run with ``OMP_WAIT_POLICY=PASSIVE`` (libgomp's default spin-waiting makes 2-thread ops
wait for descheduled threads; the variable is recorded in the command). Width ≥ ``big_width`` gets
``big_warmup`` warm-up steps and at least ``big_min_repeats`` repetitions; the inference-learning rules
run only where max width × batch ≤ ``slow_rules_max_cost``. See benchmarks/results/speed/README.md.

Writes ``speed.json`` and ``SPEED.md`` (ratios ours / autograd, device, torch, threads, the command) and
``step_time.png`` (step time vs batch) under ``out``.

Named models (``models = ["examples_mnist", "examples_mnist_modules"]``, ``benchmarks/models.py``; images
(B, 1, 28, 28)) replace the MLP ``sizes``: for each batch, every (model, rule) pair is built and their
repetitions are interleaved in one loop, so the models are compared side by side as the rules are. Each
entry's ratios are to the same model's ``reference`` (or ``reference_of[rule]``); ``model_reference`` adds
the paired ratio of each entry to the same rule on that model (the functional forward against the one
written with modules). ``graph = true`` records the whole graph on a tape (``FPropagation(model, graph=True)``) in
every library rule and in ``record``: the residual nets (``models = ["resnet18_tv"]``, ``image_shape = [3, 32,
32]``: ``configs/speed_resnet18.toml``) need it; their bytes kept are what the tape's ops saved, and the output.
Two measurements that are not learning rules: ``forward`` (the model's own forward
under ``torch.no_grad()``) and ``record`` (the recorder's forward, records taken then dropped): their
ratio is the recording overhead.

CUDA: ``--cuda-graph`` captures the whole step (forward, adjoint, update; ``validate=False``, static input
and target buffers) in a ``torch.cuda.CUDAGraph`` and replays it; ``--compile`` wraps the step in
``torch.compile``. Both are checked against the eager step (same parameters after 3 steps) before timing.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm.auto import tqdm

from .common import DTYPES, environment, parse_config, pyplot, write_json, write_markdown
from .models import build_model, input_shape
from .rules import RULES, build_trainer
from .train import DEFAULTS as TRAIN_DEFAULTS

import torch_fadjoint as tfa

DEFAULTS = {
    "sizes": [[784, 256, 256, 10], [784, 1024, 1024, 10], [784, 4096, 4096, 10], [784, 1024, 1024, 1024, 10]],
    "batches": [16, 128, 1024],
    "models": [],  # named models (benchmarks/models.py) instead of the MLP sizes, interleaved per batch
    "rules": [],  # empty: every rule in benchmarks/rules.py
    "reference": "sgd",
    "reference_of": {},  # {rule: its reference} where not `reference` (TOML table), e.g. record = "forward"
    "model_reference": "",  # with `models`: each entry's paired ratio to the same rule on this model
    "optimizer": "sgd",  # the torch optimizer of the autograd / fadjoint_dropin rules
    "dropout": True,
    "graph": False,  # true: every library rule (and `record`) records the whole graph on a tape (the ResNets need it)
    "image_shape": [],  # the ResNets' input [C, H, W] (random); empty: MNIST's 1 x 28 x 28
    **{k: TRAIN_DEFAULTS[k] for k in ("channels", "kernels", "strides", "pools", "hidden")},  # small_cnn
    **{k: TRAIN_DEFAULTS[k] for k in ("sequential", "relax_init", "T", "clip_norm", "delta_rel", "positions")},
    "activation": "relu",
    "loss": "cross_entropy",
    "lr": 0.01,
    "momentum": 0.9,
    "foreach": True,
    "repeats": 20,
    "warmup": 3,
    "max_seconds": 20.0,  # per (size, batch): fewer repetitions for big sizes
    "min_repeats": 5,     # never fewer interleaved repetitions than this ...
    "big_width": 4096,    # ... except for MLPs this wide (or wider):
    "big_min_repeats": 3, "big_warmup": 1,
    "slow_rules_max_cost": 1024 * 128,  # il, il_prox, il_prox_adam only where max width x batch <= this
    "dtype": "float32",
    "device": "cpu",
    "threads": 0,
    "validate": False,
    "cuda_graph": False,
    "compile": False,
    "quick": False,
    "progress": True,
    "out": "runs/speed",  # with --config FILE: runs/<FILE's name>
}
QUICK = {"sizes": [[784, 64, 10]], "batches": [16, 64], "repeats": 3, "warmup": 1}
SLOW_RULES = {"il", "il_prox", "il_prox_adam"}  # T inference sweeps per step: measured, but skipped at 4096


class ForwardOnly:
    """Not a rule: the model's own forward under ``torch.no_grad()`` (what ``record`` is compared with)."""

    uses_autograd, net = False, None

    def __init__(self, model, cfg):
        self.model = model

    @torch.no_grad()
    def step(self, x, target):
        self.model(x)


class RecordOnly:
    """Not a rule: the recorder's forward (``FPropagation(model)(x)`` under ``torch.no_grad()``), records dropped;
    with ``graph = true`` the tape's forward (``FPropagation(model, graph=True)``)."""

    uses_autograd = False

    def __init__(self, model, cfg):
        self.model, self.net = model, tfa.FPropagation(model, graph=bool(cfg.get("graph", False)))

    @torch.no_grad()
    def step(self, x, target):
        self.net(x)
        self.net.clear()


class ReadFloor:
    """Not a rule: ``fadjoint_unchecked``'s step with the least that any exact-or-refused check of it must add
    (issue 20): after the forward, one read of every parameter and of its momentum buffer (a 2-norm each, one
    ``_foreach_norm``), brought to the host in one sync; nothing is decided from it. A check must bound θ' =
    θ − lr·b' before writing it, so it reads θ and b in every step (nothing cached across steps survives a write
    through ``.data``); the gradient's own bound and every other check come on top."""

    uses_autograd = False

    def __init__(self, model, cfg):
        self.trainer = build_trainer("fadjoint_unchecked", model, cfg)
        self.net, self.params = self.trainer.net, [p for p in model.parameters() if p.requires_grad]

    @torch.no_grad()
    def step(self, x, target):
        self.net(x)
        state = self.trainer.opt.state
        buffers = [state[p]["momentum_buffer"] for p in self.params if "momentum_buffer" in state.get(p, {})]
        torch.stack(torch._foreach_norm(self.params + buffers)).tolist()
        return self.trainer.opt.step(target=target)


MEASUREMENTS = {"forward": ForwardOnly, "record": RecordOnly, "read_floor": ReadFloor}


# -- memory ------------------------------------------------------------------------------------
def _storage_key(tensor: torch.Tensor) -> tuple:
    return (tensor.device, tensor.untyped_storage().data_ptr())


def _tensors(obj, seen_ids=None):
    """Every tensor reachable from ``obj`` through dataclass fields, lists, tuples and dicts."""
    seen_ids = set() if seen_ids is None else seen_ids
    if id(obj) in seen_ids:
        return
    seen_ids.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item, seen_ids)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item, seen_ids)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            if name != "module":
                yield from _tensors(getattr(obj, name), seen_ids)


def _unique_bytes(tensors, exclude: set) -> int:
    total, seen = 0, set(exclude)
    for tensor in tensors:
        key = _storage_key(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def bytes_kept(trainer, model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> int:
    """Bytes held for the backward step after one forward (parameters excluded); nothing is updated."""
    params = {_storage_key(p) for p in model.parameters()}
    if not getattr(trainer, "uses_autograd", False) and getattr(trainer, "net", None) is None:
        return 0  # ForwardOnly keeps nothing
    if getattr(trainer, "uses_autograd", False):
        saved = []

        def pack(tensor):
            saved.append(tensor)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = model(x)
            trainer.loss_of(out, target)
        return _unique_bytes(saved, params)
    with torch.no_grad():
        trainer.net(x)
    if getattr(trainer.net, "graph", False):  # the tape: what each op saved for the sweep, and the output X^L, and
        tape = trainer.net._tape                # the values a rule that reads them keeps (LFP, IL: tape.kept)
        kept_values = [tensor for tensor, _ in getattr(tape, "kept", {}).values()]
        kept = _unique_bytes(_tensors([[op.saved for op in tape.ops], trainer.net.output, kept_values]), params)
    else:
        kept = _unique_bytes(_tensors(trainer.net.layers), params)
    trainer.net.clear()
    return kept


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage created inside the mode and alive at once.

    An op output whose storage is new counts until its last tensor dies; one that aliases an input's
    storage made before the mode (``W.t()``, ``W.add_(…)``, ``buf.addmm_(…)``) is not an allocation."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self._refs = 0, 0, {}

    def _release(self, key, nbytes):
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(tensor) for tensor in _tensors([args, kwargs or {}])}
        for tensor in _tensors(out if isinstance(out, (list, tuple)) else [out]):
            key = _storage_key(tensor)
            nbytes = tensor.untyped_storage().nbytes()
            if key not in self._refs:
                if key in inputs:  # a view of, or an in-place write into, memory older than the step
                    continue
                self._refs[key] = 0
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            self._refs[key] += 1
            weakref.finalize(tensor, self._release, key, nbytes)
        return out


def peak_step_bytes(trainer, x, target) -> dict:
    """Peak bytes alive during one step (dispatch-mode count; + CUDA allocator peak on CUDA)."""
    result = {}
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        trainer.step(x, target)
        torch.cuda.synchronize()
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - before
    mode = _LiveBytes()
    with mode:
        trainer.step(x, target)
    result["peak_bytes"] = mode.peak
    return result


# -- CUDA graph / compile ----------------------------------------------------------------------
def cuda_graph_step(trainer, x: torch.Tensor, target: torch.Tensor, warmup: int = 3):
    """Capture ``trainer.step`` on static buffers in a CUDA graph; returns ``step(x, t)`` that replays it.

    The trainer must be host-sync free (``validate=False``). Inputs are copied into the static buffers.
    The warm-up steps (needed so that the optimizer's buffers exist and the capture records the
    steady-state branch, not "first step: buf = clone(g)") are undone afterwards: parameters are restored
    and every tensor of the optimizer state is zeroed, which is the fresh state for SGD with dampening 0
    (μ·0 + g = g) and for Adam (moments 0, step 0), so the first replay is the first step.
    """
    static_x, static_t = x.clone(), target.clone()
    params = list(trainer.model.parameters())
    saved = [p.detach().clone() for p in params]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs recommends
        for _ in range(warmup):
            trainer.step(static_x, static_t)
        with torch.no_grad():
            for param, value in zip(params, saved):
                param.copy_(value)
            for state in trainer.opt.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        value.zero_()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = trainer.step(static_x, static_t)

    def step(x_new, t_new):
        static_x.copy_(x_new)
        static_t.copy_(t_new)
        graph.replay()
        return static_loss

    return step


COMPILE_MIN_TORCH = (2, 14)  # the whole step compiles and equals eager here; older dynamo fails inside it


def compiled_step(trainer):
    """``torch.compile`` of the trainer's step (hooks and Python checks may graph-break; correct anyway).

    Refused below torch 2.14 with one line: torch 2.4 cannot trace the fused step (a dict keyed by tensors),
    torch 2.1 not the ``out=`` forms of autograd's kernels (measured 2026-12-01; 2.14.1 passes)."""
    found = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if found < COMPILE_MIN_TORCH:
        raise RuntimeError(f"compiled_step: torch.compile of the whole step needs torch >= "
                           f"{'.'.join(map(str, COMPILE_MIN_TORCH))}, found {torch.__version__}; use the eager step")
    return torch.compile(trainer.step)


# -- the harness -------------------------------------------------------------------------------
def _arch_cfg(cfg: dict, arch) -> dict:
    """The model config of ``arch``: MLP widths (a list) or a model name of benchmarks/models.py."""
    if isinstance(arch, str):
        return {**cfg, "model": arch}
    return {**cfg, "model": "mlp", "widths": list(arch)}


def _make(cfg, rule, arch, device, dtype):
    torch.manual_seed(0)
    acfg = _arch_cfg(cfg, arch)
    model = build_model(acfg).to(device=device, dtype=dtype)
    trainer = MEASUREMENTS[rule](model, acfg) if rule in MEASUREMENTS else build_trainer(rule, model, acfg)
    return model, trainer


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_equal(cfg, rule, arch, device, dtype, make_step, x, target) -> float:
    """Max |Δθ| between the eager step and ``make_step(trainer)`` after 3 steps from the same weights."""
    model_a, eager = _make(cfg, rule, arch, device, dtype)
    model_b, fast = _make(cfg, rule, arch, device, dtype)
    step = make_step(fast, x, target)
    for _ in range(3):
        eager.step(x, target)
        step(x, target)
    _sync(device)
    return max((a - b).abs().max().item() for a, b in zip(model_a.parameters(), model_b.parameters()))


def time_interleaved(entries: dict, repeats: int, min_repeats: int, max_seconds: float, device, x, target,
                     on_rep=None, on_error=None) -> None:
    """Time each entry's ``entry["_step"](x, target)`` in interleaved repetitions (A, B, C, A, B, C, …).

    A timed block is ``entry.get("block_steps", 1)`` steps between two device synchronisations (the only
    syncs: nothing reads a value back per step); its time / steps is appended to ``entry["times"]``. Stops
    after ``repeats``, or once ``min_repeats`` are done and ``max_seconds`` have passed. With ``on_error``, an
    entry whose step raises is passed to ``on_error(key, exc)`` and timed no further (else it raises). Then
    ``median_s``, ``iqr_s`` and ``repeats`` of every entry that has times (the ``_step`` keys are dropped)."""
    _sync(device)
    start, live = time.perf_counter(), dict(entries)
    for rep in range(repeats):
        for key, entry in list(live.items()):
            steps, step = entry.get("block_steps", 1), entry["_step"]
            try:
                _sync(device)
                tic = time.perf_counter()
                for _ in range(steps):
                    step(x, target)
                _sync(device)
            except Exception as exc:  # noqa: BLE001 - reported per entry by the caller
                if on_error is None:
                    raise
                on_error(key, exc)
                del live[key]
                continue
            entry["times"].append((time.perf_counter() - tic) / steps)
        if on_rep is not None:
            on_rep(rep)
        if rep + 1 >= min_repeats and time.perf_counter() - start > max_seconds:
            break
    for entry in entries.values():
        entry.pop("_step", None)
        if not entry.get("times"):
            continue
        quartiles = statistics.quantiles(entry["times"], n=4) if len(entry["times"]) > 1 else [entry["times"][0]] * 3
        entry.update(median_s=statistics.median(entry["times"]), iqr_s=quartiles[2] - quartiles[0],
                     repeats=len(entry["times"]))


def measure(cfg: dict, widths, batch: int, rules: list[str], device, bar=None) -> dict:
    """The entries of one cell: ``widths`` (an MLP; entries keyed by rule) or a list of model names (entries
    keyed ``model/rule``, every pair interleaved)."""
    dtype = DTYPES[cfg["dtype"]]
    archs = [widths] if not isinstance(widths[0], str) else list(widths)
    mlp = len(archs) == 1 and not isinstance(archs[0], str)
    big = mlp and max(widths) >= cfg["big_width"]
    warmup = cfg["big_warmup"] if big else cfg["warmup"]
    min_repeats = cfg["big_min_repeats"] if big else cfg["min_repeats"]
    gen = torch.Generator().manual_seed(1)
    acfg = _arch_cfg(cfg, archs[0])
    x = torch.randn(batch, *input_shape(acfg), generator=gen).to(device=device, dtype=dtype)
    target = torch.randint(0, widths[-1] if mlp else 10, (batch,), generator=gen).to(device)
    runs = [(rule if mlp else f"{arch}/{rule}", arch, rule) for arch in archs for rule in rules]
    entries = {}
    for key, arch, rule in runs:
        model, trainer = _make(cfg, rule, arch, device, dtype)
        reference = cfg.get("reference_of", {}).get(rule, cfg["reference"])
        entry = {"kept_bytes": bytes_kept(trainer, model, x, target),
                 "reference": reference if mlp else f"{arch}/{reference}"}
        if not mlp:
            entry.update(model=arch, rule=rule)
            if cfg.get("model_reference") and arch != cfg["model_reference"]:
                entry["model_reference"] = f"{cfg['model_reference']}/{rule}"
        step = trainer.step
        if cfg["cuda_graph"] and device.type == "cuda":
            entry["graph_max_abs_diff"] = _check_equal(cfg, rule, arch, device, dtype, cuda_graph_step, x, target)
            step = cuda_graph_step(trainer, x, target)
        elif cfg["compile"]:
            entry["compile_max_abs_diff"] = _check_equal(cfg, rule, arch, device, dtype,
                                                         lambda tr, *_: compiled_step(tr), x, target)
            step = compiled_step(trainer)
        for _ in range(warmup):
            step(x, target)
        if not warmup:
            trainer.step(x, target)
        # the peak of a steady-state eager step (optimizer buffers already exist, as in training)
        entry.update(peak_step_bytes(trainer, x, target))
        entry["times"], entry["_step"] = [], step
        entries[key] = entry
    label = f"{'x'.join(map(str, widths))} b{batch}"
    time_interleaved(entries, cfg["repeats"], min_repeats, cfg["max_seconds"], device, x, target,
                     on_rep=None if bar is None else lambda rep: bar.set_postfix_str(f"{label} rep {rep + 1}"))
    for entry in entries.values():
        ref = entries.get(entry["reference"])
        if ref is not None:
            entry["time_ratio"] = entry["median_s"] / ref["median_s"]
            entry["kept_ratio"] = entry["kept_bytes"] / ref["kept_bytes"] if ref["kept_bytes"] else float("nan")
            entry["peak_ratio"] = entry["peak_bytes"] / ref["peak_bytes"] if ref["peak_bytes"] else float("nan")
        other = entries.get(entry.get("model_reference", ""))
        if other is not None:
            entry["model_time_ratio"] = entry["median_s"] / other["median_s"]
            entry["model_peak_ratio"] = entry["peak_bytes"] / other["peak_bytes"] if other["peak_bytes"] else float("nan")
    return entries


def main(argv=None) -> dict:
    cfg = parse_config(DEFAULTS, __doc__.splitlines()[1], argv)
    # OpenMP settings change CPU timings a lot on a loaded machine (libgomp's default spin-waiting makes
    # every parallel op wait for descheduled threads): they are part of the exact command.
    omp = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") if k in os.environ)
    if omp:
        cfg["command"] = f"{omp} {cfg['command']}"
    if cfg["quick"]:
        cfg.update(QUICK)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    rules = cfg["rules"] or [cfg["reference"]] + [r for r in RULES if r != cfg["reference"]]
    if cfg["cuda_graph"] or cfg["compile"]:
        cfg["validate"] = False  # no host syncs inside a captured step
    results = []
    cells = [(cfg["models"], b) for b in cfg["batches"]] if cfg["models"] else \
        [(w, b) for w in cfg["sizes"] for b in cfg["batches"]]
    bar = tqdm(cells, desc="speed", disable=not cfg["progress"], file=sys.stderr)
    for widths, batch in bar:
        if cfg["models"]:
            results.append({"models": widths, "batch": batch, "rules": measure(cfg, widths, batch, rules, device, bar)})
            continue
        # IL runs T inference sweeps per step (~25x a step): skipped where width x batch is large
        chosen = [r for r in rules if not (r in SLOW_RULES and max(widths) * batch > cfg["slow_rules_max_cost"])]
        results.append({"widths": widths, "batch": batch, "rules": measure(cfg, widths, batch, chosen, device, bar)})
    payload = {"config": cfg, "environment": environment(device), "results": results}
    add_paired_ratios(payload)
    out = Path(cfg["out"])
    write_json(out / "speed.json", payload)
    report = write_report(payload, out)
    print(report.read_text())
    return payload


PAIRS = (("reference", "paired_ratio"), ("model_reference", "model_paired_ratio"))


def add_paired_ratios(payload: dict, pairs=PAIRS) -> dict:
    """Per-repetition ratios of interleaved neighbours (rule's i-th time / reference's i-th time): their
    median and quartiles. Load that drifts over seconds cancels in each pair, so on a shared machine
    this is the steadier estimate; ``time_ratio`` (ratio of medians) is kept alongside. ``pairs``: (the
    entry's key naming its reference, the name of the ratio); entries without times are passed over."""
    default = payload["config"]["reference"]
    for cell in payload["results"]:
        for entry in cell["rules"].values():
            for ref_field, name in pairs:
                ref_key = entry.get(ref_field, default if ref_field == "reference" else None)
                ref = cell["rules"].get(ref_key) if ref_key else None
                if ref is None or not entry.get("times") or not ref.get("times"):
                    continue
                ratios = [t / r for t, r in zip(entry["times"], ref["times"])]
                q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
                entry.update({name: statistics.median(ratios), f"{name}_q1": q[0], f"{name}_q3": q[2]})
    return payload


def _ratio(e: dict, name: str) -> str:
    nan = float("nan")
    return f"{e.get(name, nan):.2f} [{e.get(name + '_q1', nan):.2f}, {e.get(name + '_q3', nan):.2f}]"


def write_report(payload: dict, out: Path) -> Path:
    cfg, env = payload["config"], payload["environment"]
    ref = cfg["reference"]
    mode = "CUDA graph" if cfg["cuda_graph"] else ("torch.compile" if cfg["compile"] else "eager")
    others = "".join(f" `{rule}` against `{r}`." for rule, r in cfg.get("reference_of", {}).items() if rule != r)
    lines = ["# Step time and memory, ours / autograd", "",
             f"Command: `{cfg['command']}`  ",
             f"Machine: {env['device_name']} ({env['device']}), torch {env['torch']}, {env['threads']} threads, "
             f"{cfg['dtype']}, {mode} steps, validate={cfg['validate']}.  ",
             f"Reference: `{ref}` (autograd + torch.optim.SGD, lr {cfg['lr']}, momentum {cfg['momentum']})." + others +
             " Ratios < 1 favour the rule. Timings: median of interleaved repetitions (IQR in brackets).", "",
             "Paired ratio: median [quartiles] of the per-repetition ratios of interleaved neighbours.", ""]
    mib = 2 ** 20
    nan = float("nan")
    mlp_cells = [c for c in payload["results"] if "widths" in c]
    model_cells = [c for c in payload["results"] if "models" in c]
    if mlp_cells:
        lines += ["| MLP | batch | rule | step ms (IQR) | time ratio | paired ratio [q1, q3] | kept for backward MiB | "
                  "kept ratio | peak MiB | peak ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for cell in mlp_cells:
        for rule, e in cell["rules"].items():
            lines.append(
                f"| {'-'.join(map(str, cell['widths']))} | {cell['batch']} | {rule} | {1e3 * e['median_s']:.2f} "
                f"({1e3 * e['iqr_s']:.2f}) | {e.get('time_ratio', nan):.2f} | {_ratio(e, 'paired_ratio')} | "
                f"{e['kept_bytes'] / mib:.2f} | {e.get('kept_ratio', nan):.2f} | {e['peak_bytes'] / mib:.2f} | "
                f"{e.get('peak_ratio', nan):.2f} |")
    if mlp_cells:
        lines += ["", "![step time vs batch](step_time.png)", ""]
    if model_cells:
        against = cfg.get("model_reference") or "–"
        lines += [f"Models (benchmarks/models.py), every (model, rule) pair interleaved per batch. `vs` is the "
                  f"entry's reference on the same model; the last two columns compare each entry with the same rule "
                  f"on `{against}`.", "",
                  f"| model | batch | rule | step ms (IQR) | vs | time ratio | paired ratio [q1, q3] | kept MiB | "
                  f"kept ratio | peak MiB | peak ratio | paired ratio to {against} [q1, q3] | peak ratio to {against} |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell in model_cells:
        for e in cell["rules"].values():
            vs_model = f"{_ratio(e, 'model_paired_ratio')} | {e.get('model_peak_ratio', nan):.2f}" \
                if e.get("model_reference") else "– | –"
            lines.append(
                f"| {e['model']} | {cell['batch']} | {e['rule']} | {1e3 * e['median_s']:.2f} ({1e3 * e['iqr_s']:.2f}) | "
                f"{e['reference'].split('/')[-1]} | {e.get('time_ratio', nan):.2f} | {_ratio(e, 'paired_ratio')} | "
                f"{e['kept_bytes'] / mib:.2f} | {e.get('kept_ratio', nan):.2f} | {e['peak_bytes'] / mib:.2f} | "
                f"{e.get('peak_ratio', nan):.2f} | {vs_model} |")
        lines.append("")
    report = write_markdown(out, "SPEED.md", lines)
    if mlp_cells:
        _plot(payload, out)
    return report


def _plot(payload: dict, out: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    sizes = [list(s) for s in dict.fromkeys(tuple(c["widths"]) for c in payload["results"] if "widths" in c)]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 3.5), squeeze=False)
    for ax, widths in zip(axes[0], sizes):
        cells = [c for c in payload["results"] if c.get("widths") == widths]
        for rule in cells[0]["rules"]:
            pts = [(c["batch"], 1e3 * c["rules"][rule]["median_s"]) for c in cells if rule in c["rules"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=rule)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("step ms")
        ax.set_title("-".join(map(str, widths)), fontsize=9)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
