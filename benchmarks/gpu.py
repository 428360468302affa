"""One prepared GPU benchmark: step time and memory against autograd, every rule's epoch, the comparison protocol.

    python -m benchmarks.gpu [--config configs/gpu.toml] [--budget-s 480] [--out DIR] [--fresh]
    python -m benchmarks.gpu --device cpu --quick --out runs/gpu_cpu      # the CPU smoke test

Three phases, in order, inside one time budget (``budget_s``, measured from the start of the command):

1. **steps** (until ``steps_share`` × budget): for every MLP of ``sizes`` and model of ``models``
   (``benchmarks/models.py``) × every batch, the step variants of :data:`VARIANTS`, built from the same
   weights, their repetitions interleaved in one loop (``benchmarks.speed.time_interleaved``): autograd +
   ``torch.optim.SGD`` eager (``sgd``, the reference), CUDA-graphed (``benchmarks.speed.cuda_graph_step``) and
   compiled (``benchmarks.speed.compiled_step``); the F-adjoint (``tfa.optim.FAdjoint``) with the library's
   default ``validate`` (None: "async" on CUDA), ``validate=False``, ``validate="async"``, ``fuse_update=True``,
   and its graphed and compiled steps (``tfa.graphed_step`` / ``tfa.compiled_step``, validate=False). Each
   graphed or compiled variant is first checked against the eager step (max |Δθ| after 3 steps from the same
   weights). A timed block is ``block_steps`` steps between two device synchronisations (at least
   ``min_block_s``; nothing is read back per step). Reported: median step time, the paired ratio to ``sgd``
   (and to autograd's step of the same mode), peak memory of a step (CUDA: ``max_memory_allocated`` above the
   allocation before the step; everywhere: ``benchmarks.speed``'s count of live tensor storage) and its ratio.
   A variant that cannot run says why in one line (``refused: …``, ``not available in this version``,
   ``skipped: …``) instead of a ratio.
2. **epochs** (until ``epochs_share`` × budget): the 1-epoch MNIST time (and test accuracy) of every rule
   of ``benchmarks.rules.RULES`` on the device (``benchmarks.train.run``; 784-256-256-10, batch 128).
3. **compare** (the time left): ``benchmarks.compare`` with ``compare_config`` (5 seeds × 10 epochs, both
   data sets, every rule) into ``<out>/compare`` with ``--resume`` and ``stop_after_s`` = the time left: no
   run starts after the budget; what finished is kept.

Each cell / rule / phase is written as soon as it finishes: ``steps.json``, ``epochs.json``, ``compare/``,
``gpu.json`` (environment, phases, targets) and ``GPU.md`` (device, driver, torch and CUDA versions, the exact
command, a table per phase, and a PASS / MISS / unmeasured line per target computed from the measured
ratios). Rerunning the same command resumes: measured cells and rules are kept (``--fresh`` measures again)
and the comparison continues from its run files. Default ``out``: ``benchmarks/results/gpu_<device>/`` on
CUDA (``gpu_nvidia_h200``), ``runs/gpu_cpu`` (git-ignored) on CPU.

``--quick`` (CPU smoke test, about 2 minutes on a loaded 2-core machine): a 784-64-10 MLP and the CNN at
batch 1 and 16, 3 repetitions, no ``torch.compile`` (10-60 s a step on CPU), the epoch phase on 1000 images,
the comparison reduced to ``--quick`` (sgd and fadjoint, MNIST, 3000 images).
"""
from __future__ import annotations

import gc
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import compare, speed
from .common import DTYPES, environment, parse_config, write_json, write_markdown
from .models import input_shape
from .rules import RULES
from .train import DEFAULTS as TRAIN_DEFAULTS
from .train import load_splits, run

import torch_fadjoint as tfa

DEFAULTS = {
    "phases": ["steps", "epochs", "compare"],
    "budget_s": 480.0,      # the whole command; phases 1 and 2 end at these fractions of it, phase 3 gets the rest
    "steps_share": 0.5,
    "epochs_share": 0.75,
    # phase 1: step time and peak memory
    "sizes": [[784, 256, 256, 10], [784, 1024, 1024, 10]],
    "models": ["examples_mnist"],  # benchmarks/models.py: pytorch/examples' MNIST Net
    "batches": [1, 16, 128, 1024],
    "variants": [],         # empty: every entry of VARIANTS
    "loss": "cross_entropy",  # the MLPs' loss
    "model_loss": "nll",    # the named models' (the Net ends in log_softmax)
    "dropout": False,       # p = 0: eager, graphed and compiled steps draw no masks, so they can be compared
    "lr": 0.01,
    "momentum": 0.9,
    "foreach": True,
    "repeats": 30,
    "warmup": 3,
    "min_repeats": 5,
    "max_seconds": 6.0,     # per cell, after min_repeats
    "min_block_s": 0.005,   # a timed block is at least this long (one sync before, one after)
    "max_block_steps": 50,
    "check_tol": 1e-4,      # max |Δθ| after 3 steps for a graphed / compiled step to count as equal to eager
    "compile": True,
    "compile_min_left_s": 60.0,  # no torch.compile started with less than this left in phase 1 ...
    "cell_reserve_s": 10.0,      # ... once each cell still to come has this (or the measured mean) set aside
    # phase 2: the 1-epoch time of every rule
    "epoch_rules": [],      # empty: every rule of benchmarks.rules.RULES
    "dataset": "mnist",
    "epoch_widths": [784, 256, 256, 10],
    "epoch_batch": 128,
    "epoch_validate": "default",  # "default" (None: async on CUDA) | "true" | "false" | "async"
    "train_subset": 0,
    "test_subset": 0,
    # phase 3: the comparison protocol
    "compare_config": "configs/compare.toml",
    "compare_args": [],     # more arguments for benchmarks.compare (--quick: a tiny run)
    "dtype": "float32",
    "device": "cuda",
    "threads": 0,
    "fresh": False,         # measure cells and rules again instead of keeping those already in out
    "quick": False,
    "progress": True,
    "out": "",              # "": benchmarks/results/gpu_<device> on CUDA, runs/gpu_cpu elsewhere
}
QUICK = {"sizes": [[784, 64, 10]], "batches": [1, 16], "repeats": 3, "warmup": 1, "min_repeats": 2,
         "max_seconds": 1.0, "min_block_s": 0.0, "compile": False, "budget_s": 150.0, "train_subset": 1000,
         "test_subset": 1000, "compare_args": ["--quick", "--datasets", "mnist", "--only", "sgd,fadjoint"]}

# name: (rule of benchmarks.rules, validate, mode, the autograd entry of the same mode)
VARIANTS = {
    "sgd": ("sgd", None, "eager", None),
    "sgd_graphed": ("sgd", False, "graphed", None),
    "sgd_compiled": ("sgd", False, "compiled", None),
    "fadjoint": ("fadjoint", None, "eager", None),
    "fadjoint_novalidate": ("fadjoint", False, "eager", None),
    "fadjoint_async": ("fadjoint", "async", "eager", None),
    "fadjoint_fused": ("fadjoint_fused", None, "eager", None),
    "fadjoint_graphed": ("fadjoint", False, "graphed", "sgd_graphed"),
    "fadjoint_graphed_async": ("fadjoint", "async", "graphed", "sgd_graphed"),
    "fadjoint_fused_graphed": ("fadjoint_fused", False, "graphed", "sgd_graphed"),
    "fadjoint_compiled": ("fadjoint", False, "compiled", "sgd_compiled"),
}
REFERENCE = "sgd"
PAIRS = (("reference", "paired_ratio"), ("mode_reference", "mode_paired_ratio"))
# (key, words, variant, ratio, at most, largest batch)
TARGETS = [
    ("graphed", "graphed F-adjoint step ≥ 3× faster than eager autograd at batch ≤ 256", "fadjoint_graphed",
     "paired_ratio", 1 / 3, 256),
    ("async", "eager async F-adjoint step ≤ 1.0× eager autograd at every batch", "fadjoint_async",
     "paired_ratio", 1.0, None),
    ("peak", "peak memory of the default F-adjoint step ≤ 1.0× eager autograd's at every batch", "fadjoint",
     "peak_ratio", 1.0, None),
]
BUDGET = "skipped: time budget"


class Refused(Exception):
    """A variant that cannot run here; its message is the row's one-line result."""


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "unknown"


def _validate(text):
    return {"default": None, "true": True, "false": False, "async": "async"}[str(text).lower()]


# -- environment -------------------------------------------------------------------------------
def gpu_environment(device: torch.device) -> dict:
    """``common.environment`` + driver, CUDA / cuDNN versions and the device's properties."""
    env = environment(device)
    env.update(cuda=torch.version.cuda or "none", driver="unknown", device_slug=slug(env["device_name"]))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(total_memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                   cudnn=torch.backends.cudnn.version())
        if shutil.which("nvidia-smi"):
            try:
                found = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20, check=False).stdout.split()
                env["driver"] = found[0] if found else "unknown"
            except (OSError, subprocess.SubprocessError):
                pass
    else:
        env["device_slug"] = "cpu"
    return env


# -- phase 1: step time and memory ---------------------------------------------------------------
def _model_cfg(cfg: dict, arch, validate) -> dict:
    """The config ``benchmarks.speed._make`` builds a (model, trainer) from."""
    keys = ("lr", "momentum", "foreach", "dropout", "dtype")
    return {**speed.DEFAULTS, **{k: cfg[k] for k in keys}, "validate": validate,
            "loss": cfg["model_loss"] if isinstance(arch, str) else cfg["loss"]}


def _fast_step(name: str, rule: str, mode: str, cfg: dict, device, compile_left: float):
    """``make(trainer, x, t) -> step`` of a graphed or compiled variant; raises :class:`Refused` with the reason."""
    if mode == "compiled":
        if not cfg["compile"]:
            raise Refused("skipped: compile = false" + (" (--quick: torch.compile takes 10-60 s a step on CPU)"
                                                        if cfg["quick"] else ""))
        if compile_left < cfg["compile_min_left_s"]:
            raise Refused(f"{BUDGET} (less than {cfg['compile_min_left_s']:.0f} s left for torch.compile once the "
                          "other cells' time is set aside)")
    if rule == "sgd":
        if mode == "graphed":
            if device.type != "cuda":
                raise Refused(f"refused: CUDA graphs need a CUDA device (this run: {device.type})")
            return speed.cuda_graph_step
        return lambda trainer, *_: speed.compiled_step(trainer)
    api = "graphed_step" if mode == "graphed" else "compiled_step"
    make = getattr(tfa, api, None)
    if make is None:
        raise Refused(f"not available in this version (torch_fadjoint has no {api})")
    if mode == "graphed":
        return lambda trainer, x, t: make(trainer.net, trainer.opt, x, t, warmup=3)
    return lambda trainer, *_: make(trainer.net, trainer.opt)


def _cuda_peak(device, fn) -> int | None:
    """Bytes ``fn()`` allocated at its peak above what was allocated before (CUDA only; None elsewhere)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _build(name: str, cfg: dict, arch, device, dtype, x, target, compile_left: float) -> tuple[dict, object]:
    """(entry, step) of one variant, warmed up, its peak memory measured and its timed block sized."""
    rule, validate, mode, mode_reference = VARIANTS[name]
    vcfg = _model_cfg(cfg, arch, validate)
    entry = {"variant": name, "rule": rule, "validate": repr(validate), "mode": mode, "reference": REFERENCE,
             "times": []}
    if mode_reference:
        entry["mode_reference"] = mode_reference
    if mode == "eager":
        model, trainer = speed._make(vcfg, rule, arch, device, dtype)
        entry["kept_bytes"] = speed.bytes_kept(trainer, model, x, target)
        step = trainer.step
    else:
        make = _fast_step(name, rule, mode, cfg, device, compile_left)
        entry["check_max_abs_diff"] = speed._check_equal(vcfg, rule, arch, device, dtype, make, x, target)
        entry["check_ok"] = entry["check_max_abs_diff"] <= cfg["check_tol"]
        model, trainer = speed._make(vcfg, rule, arch, device, dtype)
        built = []
        entry["cuda_build_peak_bytes"] = _cuda_peak(device, lambda: built.append(make(trainer, x, target)))
        step = built[0]
    for _ in range(cfg["warmup"]):
        step(x, target)
    if mode == "eager":  # the peak of a steady-state step (optimizer buffers exist, as in training)
        entry.update(speed.peak_step_bytes(trainer, x, target))
    else:  # a replay / compiled call: the dispatch-mode count does not see inside it
        entry.update(cuda_peak_bytes=_cuda_peak(device, lambda: step(x, target)), peak_bytes=None)
    speed._sync(device)
    tic = time.perf_counter()
    step(x, target)
    speed._sync(device)
    once = max(time.perf_counter() - tic, 1e-9)
    entry["block_steps"] = max(1, min(cfg["max_block_steps"], math.ceil(cfg["min_block_s"] / once)))
    return entry, step


def _cell_key(arch, batch: int) -> str:
    return f"{arch if isinstance(arch, str) else '-'.join(map(str, arch))}/b{batch}"


def _peak_of(entry: dict, device_type: str):
    return entry.get("cuda_peak_bytes") if device_type == "cuda" else entry.get("peak_bytes")


def measure_cell(cfg: dict, arch, batch: int, device, steps_deadline: float, reserve_s: float = 0.0) -> dict:
    """Every variant of one (model, batch) cell, timed interleaved; refused variants carry their reason.

    No variant is built after ``steps_deadline``; no ``torch.compile`` starts unless ``compile_min_left_s``
    remain before it once ``reserve_s`` (the other cells' eager and graphed variants) is set aside."""
    dtype = DTYPES[cfg["dtype"]]
    gen = torch.Generator().manual_seed(1)
    acfg = speed._arch_cfg(_model_cfg(cfg, arch, False), arch)
    x = torch.randn(batch, *input_shape(acfg), generator=gen).to(device=device, dtype=dtype)
    target = torch.randint(0, 10 if isinstance(arch, str) else arch[-1], (batch,), generator=gen).to(device)
    if cfg["compile"]:
        torch._dynamo.reset()  # a fresh recompile budget per cell (each trainer is a new set of guarded objects)
    entries, timed = {}, {}
    for name in cfg["variants"] or VARIANTS:
        time_left = steps_deadline - time.monotonic()
        if time_left <= 0:
            entries[name] = {"variant": name, "result": f"{BUDGET} (phase 1 ran out within this cell)"}
            continue
        tic = time.monotonic()
        try:
            entry, step = _build(name, cfg, arch, device, dtype, x, target, time_left - reserve_s)
        except Refused as exc:
            entry, step = {"variant": name, "result": str(exc)}, None
        except RuntimeError as exc:  # the library's one-line refusal (graphed_step on CPU, a rule it cannot capture)
            entry, step = {"variant": name, "result": f"refused: {one_line(exc)}"}, None
        except Exception as exc:  # noqa: BLE001 - any other failure is this row's result, not the command's end
            entry, step = {"variant": name, "result": f"error: {type(exc).__name__}: {one_line(exc)}"}, None
        entry["build_s"] = time.monotonic() - tic
        if step is not None:
            entry["_step"] = step
            timed[name] = entry
        entries[name] = entry
        if device.type == "cuda" and step is None:
            try:
                torch.cuda.synchronize(device)
            except RuntimeError:  # a failed capture can poison the stream: the next rows will say so
                pass

    def failed(name, exc):
        entries[name]["result"] = f"error while timing: {type(exc).__name__}: {one_line(exc)}"

    speed.time_interleaved(timed, cfg["repeats"], cfg["min_repeats"], cfg["max_seconds"], device, x, target,
                           on_error=failed)
    cell = {"models": [arch]} if isinstance(arch, str) else {"widths": list(arch)}
    cell.update(key=_cell_key(arch, batch), batch=batch, rules=entries)
    speed.add_paired_ratios({"config": {"reference": REFERENCE}, "results": [cell]}, pairs=PAIRS)
    ref = entries.get(REFERENCE, {})
    for name, entry in entries.items():
        entry.setdefault("model", arch if isinstance(arch, str) else "mlp")
        if "result" in entry:
            continue
        if "median_s" in ref and "median_s" in entry:
            entry["time_ratio"] = entry["median_s"] / ref["median_s"]
        for key, ratio in (("kept_bytes", "kept_ratio"), ("peak_bytes", "live_peak_ratio"),
                           ("cuda_peak_bytes", "cuda_peak_ratio")):
            if entry.get(key) is not None and ref.get(key):
                entry[ratio] = entry[key] / ref[key]
        if entry["mode"] == "eager":
            peak, ref_peak = _peak_of(entry, device.type), _peak_of(ref, device.type)
            if peak is not None and ref_peak:
                entry["peak_ratio"] = peak / ref_peak
        twin = entries.get(entry.get("mode_reference", ""), {})  # graphed: the capture's peak; compiled: a call's
        key = "cuda_build_peak_bytes" if entry["mode"] == "graphed" else "cuda_peak_bytes"
        if entry.get(key) is not None and twin.get(key):
            entry["mode_peak_ratio"] = entry[key] / twin[key]
        entry["result"] = "ok" if math.isfinite(entry.get("paired_ratio", float("nan"))) else \
            f"no ratio: the reference {REFERENCE} was not measured ({ref.get('result', 'no times')})"
    for entry in entries.values():
        entry.pop("_step", None)
    del timed, x, target
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return cell


def _complete(cell: dict) -> bool:
    return not any(e.get("result", "").startswith(BUDGET) for e in cell["rules"].values())


def phase_steps(cfg: dict, device, state: dict, out: Path, deadline: float) -> None:
    prior = {} if cfg["fresh"] else {c["key"]: c for c in _load(out / "steps.json").get("results", [])
                                     if _complete(c)}
    results = state["steps"]["results"] = []
    cells = [(arch, batch) for arch in [*cfg["sizes"], *cfg["models"]] for batch in cfg["batches"]]
    todo = sum(_cell_key(*c) not in prior for c in cells)
    plain = []  # seconds of each measured cell without its compiled variants: what a later cell is expected to need
    for arch, batch in cells:
        key = _cell_key(arch, batch)
        if key in prior:
            results.append({**prior[key], "kept_from_earlier_run": True})
            continue
        todo -= 1
        reserve = todo * max(sum(plain) / len(plain) if plain else 0.0, cfg["cell_reserve_s"])
        tic = time.monotonic()
        cell = measure_cell(cfg, arch, batch, device, deadline, reserve)
        spent = time.monotonic() - tic
        plain.append(spent - sum(e.get("build_s", 0.0) for e in cell["rules"].values() if e.get("mode") == "compiled"))
        results.append(cell)
        _log(cfg, f"[steps] {key}: {spent:.1f} s")
        write_json(out / "steps.json", state["steps"])
        write_gpu_md(state, out)
    write_json(out / "steps.json", state["steps"])


# -- phase 2: one epoch of every rule ------------------------------------------------------------
def phase_epochs(cfg: dict, device, state: dict, out: Path, deadline: float) -> None:
    rules = cfg["epoch_rules"] or list(RULES)
    ecfg = {**TRAIN_DEFAULTS, "dataset": cfg["dataset"], "model": "mlp", "widths": cfg["epoch_widths"],
            "batch_size": cfg["epoch_batch"], "lr": cfg["lr"], "momentum": cfg["momentum"], "epochs": 1,
            "dtype": cfg["dtype"], "device": str(device), "validate": _validate(cfg["epoch_validate"]),
            "train_subset": cfg["train_subset"], "test_subset": cfg["test_subset"], "progress": False}
    prior = {} if cfg["fresh"] else {r["rule"]: r for r in _load(out / "epochs.json").get("rules", [])
                                     if r.get("result") == "ok"}
    phase = state["epochs"]
    phase.update(config={k: v for k, v in ecfg.items() if k in ("dataset", "widths", "batch_size", "lr",
                                                                "momentum", "train_subset", "test_subset")},
                 validate=cfg["epoch_validate"], rules=[])
    splits = None
    for rule in rules:
        if rule in prior:
            phase["rules"].append({**prior[rule], "kept_from_earlier_run": True})
            continue
        row = {"rule": rule}
        if time.monotonic() > deadline:
            row["result"] = f"{BUDGET} (phase 2 ends at {cfg['epochs_share']:.0%} of the budget)"
        else:
            try:
                if splits is None:
                    splits = load_splits(ecfg, device)
                    warm = {"train": type(splits["train"])(splits["train"].x[:4 * cfg["epoch_batch"]],
                                                           splits["train"].t[:4 * cfg["epoch_batch"]]),
                            "test": splits["test"]}
                    run(ecfg, "sgd", 0, warm, device)  # CUDA context, cuBLAS handles: not in the first rule's time
                result = compare._diverged_or(lambda: run(ecfg, rule, 0, splits, device))
                if "diverged" in result:
                    row["result"] = f"diverged: {one_line(result['diverged'])}"
                else:
                    record = result["history"][0]
                    row.update(result="ok", seconds=record["seconds"], test_acc=record["test_acc"],
                               train_loss=record["train_loss"], steps=len(result["step_losses"]))
            except SystemExit as exc:  # no data set: one line for every rule
                row["result"] = f"refused: {one_line(exc)}"
            except Exception as exc:  # noqa: BLE001 - this rule's row, not the command's end
                row["result"] = f"error: {type(exc).__name__}: {one_line(exc)}"
        phase["rules"].append(row)
        _log(cfg, f"[epochs] {rule}: {row.get('seconds', row['result'])}")
        write_json(out / "epochs.json", phase)
        write_gpu_md(state, out)
    ref = next((r for r in phase["rules"] if r["rule"] == "sgd" and r.get("result") == "ok"), None)
    for row in phase["rules"]:
        if ref is not None and row.get("result") == "ok":
            row["time_ratio"] = row["seconds"] / ref["seconds"]
    write_json(out / "epochs.json", phase)


# -- phase 3: the comparison protocol ------------------------------------------------------------
def phase_compare(cfg: dict, device, state: dict, out: Path, deadline: float) -> None:
    phase = state["compare"]
    left = deadline - time.monotonic()
    target = out / "compare"
    argv = ["--config", cfg["compare_config"], "--out", str(target), "--device", str(device), "--resume",
            "--stop-after-s", f"{max(left, 1.0):.1f}", "--progress", str(cfg["progress"]).lower(),
            "--speed-results", str(out / "steps.json"), *cfg["compare_args"]]
    phase.update(argv=argv, out=str(target))
    if left <= 0:
        phase["result"] = f"{BUDGET} (none left for the comparison; rerun the command to resume it)"
        return
    tic = time.monotonic()
    threads = torch.get_num_threads()
    try:
        compare.main(argv)
        summary = _load(target / "summary.json")
        stopped = summary.get("stopped")
        phase["result"] = "ok" if not stopped else \
            f"stopped at the budget: up to {stopped['runs_not_started']} runs not started (rerun to resume)"
        phase["not_run"] = (stopped or {}).get("not_run", [])
    except SystemExit as exc:
        phase["result"] = f"refused: {one_line(exc)}"
    except Exception as exc:  # noqa: BLE001 - the phase's result
        phase["result"] = f"error: {type(exc).__name__}: {one_line(exc)}"
    finally:
        torch.set_num_threads(threads)  # the protocol's config sets its own thread count
    phase["seconds"] = time.monotonic() - tic
    phase["finished_runs"] = len(list((target / "runs").glob("*.json")))


# -- targets and the report ----------------------------------------------------------------------
def evaluate_targets(cells: list[dict], device_type: str) -> list[dict]:
    """PASS (every measured cell meets it), MISS (one does not) or unmeasured (no cell measured it)."""
    found = []
    for key, words, variant, ratio, at_most, max_batch in TARGETS:
        measured, missing = [], []
        for cell in cells:
            if max_batch is not None and cell["batch"] > max_batch:
                continue
            entry = cell["rules"].get(variant, {})
            value = entry.get(ratio)
            if entry.get("result") == "ok" and entry.get("check_ok", True) and value is not None \
                    and math.isfinite(value):
                measured.append((cell["key"], value))
            else:
                reason = entry.get("result", "not run")
                missing.append((cell["key"], "check failed" if reason == "ok" else reason))
        status = "unmeasured" if not measured else ("MISS" if any(v > at_most for _, v in measured) else "PASS")
        found.append({"key": key, "target": words, "variant": variant, "ratio": ratio, "at_most": at_most,
                      "status": status, "measured": measured, "missing": missing, "device": device_type})
    return found


def _target_line(t: dict) -> str:
    n = len(t["measured"]) + len(t["missing"])
    if not t["measured"]:
        why = t["missing"][0][1] if t["missing"] else "no cell"
        return f"- **unmeasured** — {t['target']}: no cell measured (`{t['variant']}`: {why})"
    worst_key, worst = max(t["measured"], key=lambda kv: kv[1])
    over = [k for k, v in t["measured"] if v > t["at_most"]]
    return (f"- **{t['status']}** — {t['target']}: `{t['variant']}` {t['ratio']} ≤ {t['at_most']:.3g} in "
            f"{len(t['measured']) - len(over)} of {len(t['measured'])} measured cells ({n} in all); worst "
            f"{worst:.3f} at {worst_key}" + (f"; over: {', '.join(over)}" if over else ""))


def _fmt(value, spec=".2f", scale=1.0) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else \
        format(value * scale, spec)


def write_gpu_md(state: dict, out: Path) -> Path:
    env, cfg = state["environment"], state["config"]
    mib = 2 ** 20
    cells = state["steps"].get("results", [])
    state["targets"] = evaluate_targets(cells, env["device"].split(":")[0])
    lines = ["# GPU benchmark: the F-adjoint against autograd", "",
             f"Command: `{cfg['command']}`  ",
             f"Device: {env['device_name']} ({env['device']}), driver {env['driver']}, CUDA {env['cuda']}, "
             f"torch {env['torch']}, Python {env['python']}, {env['threads']} CPU threads, {cfg['dtype']}.  ",
             f"Budget: {cfg['budget_s']:.0f} s (steps until {cfg['steps_share']:.0%}, epochs until "
             f"{cfg['epochs_share']:.0%}, then the comparison); started {state['started']}.", "",
             "## Targets", "",
             f"Computed from the ratios measured in this folder on `{env['device']}` (paired ratios: median of the "
             "per-repetition ratios of interleaved neighbours; peak: " +
             ("`torch.cuda.max_memory_allocated` above the step's starting allocation" if env["device"].startswith("cuda")
              else "the live tensor storage count of benchmarks.speed, the only peak measured off CUDA") + ").", "",
             *[_target_line(t) for t in state["targets"]], ""]
    if cells:
        lines += ["## Step time and peak memory", "",
                  "Every variant built from the same weights; repetitions interleaved per cell. Ratios are to eager "
                  "autograd (`sgd`); `vs same mode`: to autograd's graphed / compiled step. `check`: max |Δθ| "
                  "against the eager step after 3 steps.", "",
                  "| model | batch | variant | validate | step ms (IQR) | steps / block | paired ratio [q1, q3] | "
                  "vs same mode | peak MiB (CUDA) | live peak MiB | peak ratio | check | result |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for cell in cells:
            arch = cell["models"][0] if "models" in cell else "-".join(map(str, cell["widths"]))
            for name, e in cell["rules"].items():
                if e.get("result") == "ok" or "median_s" in e:
                    step = f"{_fmt(e.get('median_s'), '.3f', 1e3)} ({_fmt(e.get('iqr_s'), '.3f', 1e3)})"
                    paired = f"{_fmt(e.get('paired_ratio'))} [{_fmt(e.get('paired_ratio_q1'))}, " \
                             f"{_fmt(e.get('paired_ratio_q3'))}]"
                    check = "–" if "check_max_abs_diff" not in e else \
                        f"{e['check_max_abs_diff']:.1e}" + ("" if e["check_ok"] else " FAILED")
                    graphed = e.get("mode") == "graphed"
                    cuda_peak = _fmt(e.get("cuda_build_peak_bytes" if graphed else "cuda_peak_bytes"), ".2f", 1 / mib)
                    peak_ratio = _fmt(e.get("peak_ratio")) if "peak_ratio" in e else \
                        (f"{_fmt(e['mode_peak_ratio'])} (same mode)" if "mode_peak_ratio" in e else "–")
                    lines.append(
                        f"| {arch} | {cell['batch']} | {name} | {e.get('validate', '–')} | {step} | "
                        f"{e.get('block_steps', '–')} | {paired} | {_fmt(e.get('mode_paired_ratio'))} | "
                        f"{cuda_peak}{' (capture)' if graphed and cuda_peak != '–' else ''} | "
                        f"{_fmt(e.get('peak_bytes'), '.2f', 1 / mib)} | {peak_ratio} | {check} | {e.get('result', '–')} |")
                else:
                    lines.append(f"| {arch} | {cell['batch']} | {name} | – | – | – | – | – | – | – | – | – | "
                                 f"{e.get('result', '–')} |")
        lines.append("")
    rows = state["epochs"].get("rules", [])
    if rows:
        ecfg = state["epochs"]["config"]
        lines += ["## One MNIST epoch of every rule", "",
                  f"{'-'.join(map(str, ecfg['widths']))} ReLU, batch {ecfg['batch_size']}, lr {ecfg['lr']}, momentum "
                  f"{ecfg['momentum']}, validate {state['epochs']['validate']}, seed 0" +
                  (f", the first {ecfg['train_subset']} training images" if ecfg["train_subset"] else "") +
                  (f", the first {ecfg['test_subset']} test images" if ecfg["test_subset"] else "") +
                  "; the epoch's wall time (device synchronised at both ends).", "",
                  "| rule | s / epoch | vs sgd | test acc | result |", "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['rule']} | {_fmt(r.get('seconds'), '.3f')} | {_fmt(r.get('time_ratio'))} | "
                         f"{_fmt(r.get('test_acc'), '.4f')} | {r['result']} |")
        lines.append("")
    comp = state["compare"]
    if comp.get("result"):
        lines += ["## The comparison protocol", "",
                  f"`python -m benchmarks.compare {' '.join(comp['argv'])}`: {comp['result']}; "
                  f"{comp.get('finished_runs', 0)} run files in `{comp['out']}/runs`"
                  + (f"; not run yet: {', '.join(comp['not_run'])}" if comp.get("not_run") else "") +
                  (f". Report: [compare/REPORT.md](compare/REPORT.md)" if (out / "compare" / "REPORT.md").exists()
                   else "") + ".", ""]
    write_json(out / "gpu.json", state)
    return write_markdown(out, "GPU.md", lines)


# -- the command ---------------------------------------------------------------------------------
def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _log(cfg: dict, text: str) -> None:
    if cfg["progress"]:
        print(text, file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    started = time.monotonic()
    cfg = parse_config(DEFAULTS, __doc__.splitlines()[0], argv)
    envs = " ".join(f"{k}={os.environ[k]}" for k in ("FADJOINT_DATA", "OMP_NUM_THREADS") if k in os.environ)
    cfg["command"] = f"{envs} {cfg['command']}".strip()
    if cfg["quick"]:
        cfg.update({k: v for k, v in QUICK.items() if k != "budget_s" or "--budget-s" not in (argv or sys.argv)})
    unknown = sorted(set(cfg["variants"]) - set(VARIANTS)) + sorted(set(cfg["phases"]) - set(DEFAULTS["phases"]))
    if unknown:
        raise SystemExit(f"error: unknown variants or phases {unknown}; variants: {list(VARIANTS)}, "
                         f"phases: {DEFAULTS['phases']}")
    device = torch.device(cfg["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device here (torch.cuda.is_available() is False); "
                         "the CPU smoke test is --device cpu --quick")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    env = gpu_environment(device)
    out = Path(cfg["out"] or ("benchmarks/results/gpu_" + env["device_slug"] if device.type == "cuda"
                              else "runs/gpu_cpu"))
    cfg["out"] = str(out)
    earlier = {} if cfg["fresh"] else _load(out / "gpu.json")
    state = {"config": cfg, "environment": env, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
             "steps": {"config": {**cfg, "reference": REFERENCE}, "environment": env, "results": []},
             "epochs": {}, "compare": {}, "targets": [], "earlier_commands": earlier.get("earlier_commands", [])
             + ([earlier["config"]["command"]] if earlier.get("config") else [])}
    budget = cfg["budget_s"]
    deadlines = {"steps": started + cfg["steps_share"] * budget, "epochs": started + cfg["epochs_share"] * budget,
                 "compare": started + budget}
    phases = {"steps": phase_steps, "epochs": phase_epochs, "compare": phase_compare}
    for name in DEFAULTS["phases"]:
        if name not in cfg["phases"]:
            if name != "compare":  # keep what an earlier run measured
                state[name] = {"results": []} if name == "steps" else {}
                prior = _load(out / f"{name}.json")
                if prior:
                    state[name] = prior
            continue
        tic = time.monotonic()
        phases[name](cfg, device, state, out, deadlines[name])
        state[name]["phase_seconds"] = time.monotonic() - tic
        write_gpu_md(state, out)
        _log(cfg, f"[{name}] done in {time.monotonic() - tic:.1f} s")
    state["seconds"] = time.monotonic() - started
    report = write_gpu_md(state, out)
    print(report.read_text())
    return state


if __name__ == "__main__":
    main()
