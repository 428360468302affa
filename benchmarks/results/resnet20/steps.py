"""The per-step comparison of benchmarks/results/resnet20 (fadjoint vs sgd), its plot, and the gradient check.

    python benchmarks/results/resnet20/steps.py summarize            # the table of README.md, losses.png
    FADJOINT_DATA=/work/shared/datasets python benchmarks/results/resnet20/steps.py grads --steps 5 [--dtype float64]

``summarize`` reads the committed JSONs (``step_losses``: every step's loss) and prints, per data set, the max
|Δloss| over the steps, the first step where the losses differ, and the test accuracies; it draws ``losses.png``.

``grads`` replays the first ``--steps`` steps of configs/resnet.toml (same seed, same permutation, same batches as
benchmarks.train) with both trainers side by side and compares, after every step, the gradients each wrote
(``.grad``: autograd's ``loss.backward()``; the F-adjoint's sweep over the tape, which FAdjoint writes too) and the
parameters: max over parameters of max|Δg| / max|g|, and max|Δθ|. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # the repository root: benchmarks, torch_fadjoint


def summarize() -> None:
    from benchmarks.common import pyplot

    plt = pyplot()
    datasets = ("mnist", "fashion_mnist")
    fig, axes = (plt.subplots(2, len(datasets), figsize=(10, 6), sharex=True) if plt else (None, None))
    print("| data set | steps | max \\|Δloss\\| | first step that differs | sgd test acc | fadjoint test acc |")
    print("|---|---|---|---|---|---|")
    for col, dataset in enumerate(datasets):
        runs = {rule: json.loads((HERE / f"{dataset}_{rule}_seed0.json").read_text()) for rule in ("sgd", "fadjoint")}
        a, b = runs["sgd"]["step_losses"], runs["fadjoint"]["step_losses"]
        diffs = [abs(x - y) for x, y in zip(a, b)]
        first = next((i + 1 for i, d in enumerate(diffs) if d != 0.0), None)
        acc = {rule: run["history"][-1]["test_acc"] for rule, run in runs.items()}
        print(f"| {dataset} | {len(a)} | {max(diffs):.3g} | {first or 'none'} | {acc['sgd']:.4f} | "
              f"{acc['fadjoint']:.4f} |")
        if plt:
            steps = range(1, len(a) + 1)
            axes[0][col].plot(steps, a, label="sgd (autograd)", lw=2.5, alpha=0.5)
            axes[0][col].plot(steps, b, label="fadjoint (tape)", lw=1, ls="--")
            axes[0][col].set_title(f"ResNet-20, {dataset}", fontsize=9)
            axes[0][col].set_ylabel("training loss")
            axes[0][col].legend(fontsize=7)
            axes[1][col].plot(steps, diffs, marker=".", lw=0.5)
            axes[1][col].set_ylabel("|Δloss| (float32)")
            axes[1][col].set_xlabel("step")
    if plt:
        fig.tight_layout()
        fig.savefig(HERE / "losses.png", dpi=100)


def grads(steps: int, dtype_name: str, config: str) -> None:
    import tomllib

    import torch

    from benchmarks import train
    from benchmarks.common import DTYPES
    from benchmarks.models import build_model
    from benchmarks.rules import build_trainer

    cfg = {**train.DEFAULTS, **tomllib.loads(Path(config).read_text()), "dtype": dtype_name}
    torch.set_num_threads(cfg["threads"] or torch.get_num_threads())
    dtype, seed = DTYPES[dtype_name], cfg["seeds"][0]
    print(f"| data set | dtype | step | loss (sgd) | \\|Δloss\\| | max rel. \\|Δg\\| (param) | max \\|Δθ\\| |")
    print("|---|---|---|---|---|---|---|")
    for dataset in cfg["datasets"]:
        dcfg = {**cfg, "dataset": dataset}
        splits = train.load_splits(dcfg, torch.device("cpu"))
        models, trainers = {}, {}
        for rule in cfg["rules"]:
            torch.manual_seed(seed)  # as benchmarks.train.run: the same initial weights
            models[rule] = build_model(dcfg).to(dtype=dtype)
            trainers[rule] = build_trainer(rule, models[rule], dcfg)
        batches = torch.Generator().manual_seed(seed)
        ref, other = cfg["rules"]
        for step, (x, t) in enumerate(splits["train"].batches(cfg["batch_size"], generator=batches), start=1):
            if step > steps:
                break
            losses = {rule: trainers[rule].step(x, t) for rule in cfg["rules"]}
            worst, where = 0.0, "every parameter"
            named = dict(models[other].named_parameters())
            for name, p in models[ref].named_parameters():
                q = named[name]
                rel = ((p.grad - q.grad).abs().max() / p.grad.abs().max().clamp_min(1e-300)).item()
                if rel > worst:
                    worst, where = rel, name
            dtheta = max((p - named[n]).abs().max().item() for n, p in models[ref].named_parameters())
            print(f"| {dataset} | {dtype_name} | {step} | {losses[ref].item():.6f} | "
                  f"{(losses[ref] - losses[other]).abs().item():.3g} | {worst:.3g} ({where}) | {dtheta:.3g} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["summarize", "grads"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--config", default="configs/resnet.toml")
    args = parser.parse_args()
    if args.what == "summarize":
        summarize()
    else:
        grads(args.steps, args.dtype, args.config)
