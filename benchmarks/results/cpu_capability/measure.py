"""The spread of every learning-threshold test under CPU capabilities, seeds and rounding perturbations (issue 13).

    ATEN_CPU_CAPABILITY=avx2 FADJOINT_DATA=/work/shared/datasets \\
        python benchmarks/results/cpu_capability/measure.py lfp_step --seeds 0-9 --perturb none,ulp,float64

One JSON line per run is appended to ``measurements.jsonl`` beside this file, with the capability torch
reports. Perturbations emulate another CPU's rounding: ``ulp`` moves every initial parameter by one ulp
(``nextafter`` towards +inf), ``float64`` trains in double. MKL's GEMM rounding is moved with
``MKL_CBWR=COMPATIBLE`` in the environment (recorded as ``mkl``; ``MKL_ENABLE_INSTRUCTIONS=SSE4_2`` changed
no bit on this AMD EPYC, MKL runs its generic path there).

Also a pytest plugin: ``CPUCAP_MUTANT=flip PYTHONPATH=benchmarks/results/cpu_capability pytest -p measure ...``
flips the sign of every rule's update (the SGD helpers and the delegating rules' ``.grad``) without editing
the library, to confirm the threshold tests can fail.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

import torch  # noqa: E402
from torch import nn  # noqa: E402


# -- the mutant (pytest plugin) -------------------------------------------------------------------
def flip_updates() -> None:
    """Every rule steps uphill: negate the gradients handed to the SGD helpers and to the base optimizers."""
    from torch_fadjoint.optim import base

    single, foreach, apply_base = base._single_tensor_sgd, base._foreach_sgd, base.DelegatingRuleOptimizer._apply_base
    base._single_tensor_sgd = lambda params, grads, *a, **k: single(params, [-g for g in grads], *a, **k)
    base._foreach_sgd = lambda params, grads, *a, **k: foreach(params, [-g for g in grads], *a, **k)
    base.DelegatingRuleOptimizer._apply_base = lambda self, grads: apply_base(self, {p: -g for p, g in grads.items()})


def pytest_configure(config):
    if os.environ.get("CPUCAP_MUTANT") == "flip":
        flip_updates()


# -- perturbations ---------------------------------------------------------------------------------
def nudge_(model: nn.Module) -> None:
    """Every parameter one ulp up: the smallest rounding change there is."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))


@contextlib.contextmanager
def nudged_build_mlp(active: bool):
    """benchmarks.train.run builds its model through build_mlp; nudge what it returns."""
    from benchmarks import train

    original = train.build_mlp

    def build(*args, **kwargs):
        model = original(*args, **kwargs)
        nudge_(model)
        return model

    if active:
        train.build_mlp = build
    try:
        yield
    finally:
        train.build_mlp = original


def _data_root() -> Path:
    return Path(os.environ.get("FADJOINT_DATA", HERE.parents[3] / "shared" / "datasets"))


# -- the tests' own runs, with a seed and a perturbation --------------------------------------------
def lfp_step(seed: int, perturb: str, epochs: int = 2, n_train: int = 20000) -> dict:
    """tests/test_lfp.py::test_step_mlp_learns_mnist_subset (seed 0 there)."""
    import torch_fadjoint as tfa
    from torch_fadjoint import data as tfa_data
    from torch_fadjoint.optim import LFP

    dtype = torch.float64 if perturb == "float64" else torch.float32
    torch.set_num_threads(1)
    splits = tfa_data.load("mnist", _data_root(), download=False, dtype=dtype)
    train_x, train_t = splits["train"].x[:n_train], splits["train"].t[:n_train]
    test_x, test_t = splits["test"].x[:2000], splits["test"].t[:2000]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 120), tfa.nn.Step(), nn.Linear(120, 84), tfa.nn.Step(),
                          nn.Linear(84, 10)).to(dtype)
    if perturb == "ulp":
        nudge_(model)
    net = tfa.FPropagation(model)
    opt = LFP(net, lr=0.1, momentum=0.9, clip_norm=3.0)
    gen = torch.Generator().manual_seed(seed)
    accs = []
    for _ in range(epochs):
        for idx in torch.randperm(n_train, generator=gen).split(128):
            with torch.no_grad():
                net(train_x[idx])
            opt.step(train_t[idx])
        with torch.no_grad(), net.paused():
            accs.append((model(test_x).argmax(1) == test_t).double().mean().item())
    return {"acc": accs[-1], "acc_per_epoch": accs}


def il_prox(seed: int, perturb: str) -> dict:
    """tests/test_inference.py::test_il_prox_learns_mnist_subset (seed 0 there)."""
    import torch_fadjoint as tfa
    from torch_fadjoint import data as tfa_data
    from torch_fadjoint.optim import InferenceLearning

    dtype = torch.float64 if perturb == "float64" else torch.float32
    splits = tfa_data.load("mnist", _data_root(), download=False, dtype=dtype)
    train_x, train_t = splits["train"].x[:3000], splits["train"].t[:3000]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10)).to(dtype)
    if perturb == "ulp":
        nudge_(model)
    net = tfa.FPropagation(model)
    opt = InferenceLearning(net, variant="il_prox", T=10, alpha=1.0)
    for idx in torch.randperm(3000, generator=torch.Generator().manual_seed(seed)).split(16):
        with torch.no_grad():
            net(train_x[idx])
        opt.step(train_t[idx])
    with torch.no_grad(), net.paused():
        acc = (model(splits["test"].x[:2000]).argmax(1) == splits["test"].t[:2000]).double().mean().item()
    return {"acc": acc}


def train_float64(seed: int, perturb: str) -> dict:
    """tests/test_train.py::test_float64_losses_agree_at_every_step (seed 0 there)."""
    from benchmarks import train

    dtype = "float32" if perturb == "float32" else "float64"
    with tempfile.TemporaryDirectory() as out, nudged_build_mlp(perturb == "ulp"):
        fadjoint, sgd = train.main(["--data-root", str(_data_root()), "--dtype", dtype, "--widths", "784,32,10",
                                    "--train-subset", "3000", "--epochs", "2", "--momentum", "0.9",
                                    "--progress", "false", "--out", out, "--seeds", str(seed)])
    return {"acc": fadjoint["history"][-1]["test_acc"], "sgd_acc": sgd["history"][-1]["test_acc"],
            "max_step_loss_diff_sgd": sgd["max_step_loss_diff_vs_fadjoint"]}


def train_float32(seed: int, perturb: str) -> dict:
    """tests/test_train.py::test_float32_one_epoch_agrees_to_1e_4 and benchmarks.train on configs/mnist_mlp.toml."""
    from benchmarks import train

    with tempfile.TemporaryDirectory() as out, nudged_build_mlp(perturb == "ulp"):
        results = train.main(["--config", "configs/mnist_mlp.toml", "--data-root", str(_data_root()),
                              "--progress", "false", "--out", out, "--seeds", str(seed)])
    by = {r["variant"]: r for r in results}
    return {"acc": by["fadjoint"]["history"][-1]["test_acc"], "sgd_acc": by["sgd"]["history"][-1]["test_acc"],
            "fused_acc": by["fadjoint_fused"]["history"][-1]["test_acc"],
            "max_step_loss_diff_sgd": by["sgd"]["max_step_loss_diff_vs_fadjoint"],
            "max_step_loss_diff_fused": by["fadjoint_fused"]["max_step_loss_diff_vs_fadjoint"]}


def compare_quick(seed: int, perturb: str, only: str = "", extra: dict | None = None) -> dict:
    """tests/test_compare.py::test_quick_compare_...: the selection from seed 0, the final run from `seed`.

    `extra` = {variant: {key: TOML value}} adds keys to a variant's table (e.g. its own `epochs`). The
    test's ``--train-subset 1500`` is overridden by ``--quick`` (QUICK sets 3000), so it is not varied here.
    """
    from benchmarks import compare

    extra = extra or {}
    lines = []
    for line in Path("configs/compare.toml").read_text().splitlines():
        lines.append(line)
        if line.startswith("[variants."):
            name = line.split("]")[0][len("[variants."):]
            keys = {"seeds": f"[{seed}]", **extra.get(name, {})}  # QUICK sets seeds = [0]; a variant's own wins
            lines += [f"{k} = {v}" for k, v in keys.items()]
    with tempfile.TemporaryDirectory() as out, nudged_build_mlp(perturb == "ulp"):
        config = Path(out) / "c.toml"
        config.write_text("\n".join(lines) + "\n")
        args = ["--config", str(config), "--quick", "--data-root", str(_data_root()), "--datasets", "mnist",
                "--train-subset", "1500", "--out", out, "--progress", "false"]
        if perturb == "float64":
            args += ["--dtype", "float64"]
        if only:
            args += ["--only", only]
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            compare.main(args)
        summary = json.loads((Path(out) / "summary.json").read_text())
    variants = summary["datasets"]["mnist"]
    return {name: {"acc": res["histories"][0][-1]["test_acc"], "chosen": res["chosen"],
                   "acc_per_epoch": [h["test_acc"] for h in res["histories"][0]]}
            for name, res in variants.items()}


TARGETS = {"lfp_step": lfp_step, "il_prox": il_prox, "train_float64": train_float64,
           "train_float32": train_float32, "compare_quick": compare_quick}


def _ints(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--perturb", default="none", help="comma-separated: none, ulp, float64, float32")
    parser.add_argument("--kwargs", default="{}", help="JSON keyword arguments for the target")
    parser.add_argument("--tag", default="")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--out", default=str(HERE / "measurements.jsonl"))
    args = parser.parse_args(argv)
    if os.environ.get("CPUCAP_MUTANT") == "flip":
        flip_updates()
    if args.threads:
        torch.set_num_threads(args.threads)
    capability = torch.backends.cpu.get_cpu_capability()
    mkl = ",".join(f"{k}={os.environ[k]}" for k in ("MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS") if k in os.environ)
    for perturb in args.perturb.split(","):
        for seed in _ints(args.seeds):
            start = time.perf_counter()
            try:
                result = TARGETS[args.target](seed, perturb, **json.loads(args.kwargs))
            except Exception as exc:  # a mutant may diverge: the rule's own non-finite check
                result = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            row = {"target": args.target, "capability": capability, "mkl": mkl, "perturb": perturb, "seed": seed,
                   "threads": torch.get_num_threads(), "mutant": os.environ.get("CPUCAP_MUTANT", ""),
                   "tag": args.tag, "kwargs": json.loads(args.kwargs),
                   "seconds": round(time.perf_counter() - start, 2), "result": result}
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")


def summarize(path: Path = HERE / "measurements.jsonl") -> None:
    """Print min / median / max of `acc` per (target, tag, capability, mkl, perturb, mutant)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    groups: dict = {}
    for r in rows:
        res = r["result"]
        if "error" in res:
            continue
        items = res.items() if r["target"] == "compare_quick" else [("", res)]
        for name, value in items:
            key = (r["target"] + (":" + name if name else ""), json.dumps(r["kwargs"].get("extra", {})) if
                   r["kwargs"].get("extra") else "", r["capability"], r["mkl"], r["perturb"], r["mutant"])
            groups.setdefault(key, []).append((r["seed"], value["acc"]))
    for key, values in sorted(groups.items()):
        accs = [a for _, a in values]
        print(" | ".join(map(str, key)), "| seeds", [s for s, _ in values],
              f"| min {min(accs):.4f} median {statistics.median(accs):.4f} max {max(accs):.4f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["summarize"]:
        summarize()
    else:
        main()
