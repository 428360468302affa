"""Two versions of torch_fadjoint in one process: the step of issue 20's MLP, each against autograd + SGD, paired.

    git worktree add /tmp/fadjoint-6648738 6648738
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.versions --against /tmp/fadjoint-6648738=6648738 \
        --out benchmarks/results/speed_default_step/versions

On a shared 2-core machine two runs of ``benchmarks.speed`` move a ratio by ±0.05, more than the few microseconds
a change to the step's Python makes; here both versions run in the same process on copies of one model,
interleaved with autograd + ``torch.optim.SGD(foreach=True)`` (issue 20's reference) in a new random order at each
repetition (a fixed order moved one configuration by 4 % against itself), and each repetition's ratio to that
repetition's autograd step is kept. How far to trust a difference: in this checkout ``unchecked`` and ``unchecked,
loop`` are one configuration on CPU (``foreach=None`` is the loop there), and their medians differ by up to 0.02.
The other versions are the package folders of other checkouts (``--against``), imported under other names; rules
a version does not know are left out. A step is ``net(x); opt.step(target=y)`` under the user's own
``torch.no_grad()``, SGD momentum 0.9 on both sides, ``lr=0`` so that every repetition steps the same weights.
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import torch_fadjoint

# what each column runs: the FAdjoint keywords (foreach=True / False: the SGD update's two paths)
RULES = {"checked": dict(), "unchecked": dict(validate=False), "unchecked, foreach": dict(validate=False, foreach=True),
         "unchecked, loop": dict(validate=False, foreach=False)}


def load_other(root: str, name: str):
    """The package ``torch_fadjoint`` of the checkout at ``root``, imported as ``name`` (its imports are relative)."""
    folder = Path(tempfile.mkdtemp(prefix="fadjoint-versions-"))
    (folder / name).symlink_to(Path(root, "torch_fadjoint").resolve(), target_is_directory=True)
    sys.path.insert(0, str(folder))
    return importlib.import_module(name)


def build_steps(packages: dict, widths: list[int], batch: int) -> dict:
    torch.manual_seed(0)
    layers = [m for a, b in zip(widths[:-1], widths[1:]) for m in (nn.Linear(a, b), nn.ReLU())][:-1]
    model = nn.Sequential(nn.Flatten(), *layers)
    x, y = torch.randn(batch, 1, widths[0]), torch.randint(0, widths[-1], (batch,))
    reference = copy.deepcopy(model)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.0, momentum=0.9, foreach=True)

    def autograd():
        sgd.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        sgd.step()

    steps = {"autograd + SGD": autograd}
    for label, package in packages.items():
        for rule, keywords in RULES.items():
            net = package.FPropagation(copy.deepcopy(model))
            try:
                opt = package.optim.FAdjoint(net, lr=0.0, momentum=0.9, loss="cross_entropy", **keywords)
            except TypeError:  # a keyword that version does not take
                continue

            def step(net=net, opt=opt):
                with torch.no_grad():
                    net(x)
                    opt.step(target=y)

            steps[f"{label}: {rule}"] = step
    return steps


def paired(steps: dict, repeats: int, warmup: int = 10) -> dict:
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    gc.collect()
    gc.disable()  # a collection lands on one column's repetition at random; none runs inside the loop
    try:
        order = list(steps)
        shuffle = random.Random(0).shuffle
        for _ in range(repeats):
            shuffle(order)  # a fixed order favours some places (the step after autograd's pays its evictions)
            for name in order:
                start = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    reference = times["autograd + SGD"]
    rows = {}
    for name, column in times.items():
        ratios = sorted(t / r for t, r in zip(column, reference))
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        rows[name] = dict(us=1e6 * statistics.median(column), ratio=statistics.median(ratios), q1=q1, q3=q3)
    return rows


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, action="append",
                        help="the root of another checkout (a git worktree), as DIR or DIR=LABEL; may be repeated")
    parser.add_argument("--widths", default="784,256,256,10")
    parser.add_argument("--batches", default="16,128")
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/versions")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    packages = {"this checkout": torch_fadjoint}
    for i, against in enumerate(args.against):
        root, _, label = against.partition("=")
        packages[label or Path(root).resolve().name] = load_other(root, f"tfa_against_{i}")
    widths = [int(w) for w in args.widths.split(",")]
    lines = ["# Two versions in one process: step time / autograd + SGD's, paired", "",
             f"Command: `OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')} python -m benchmarks.versions "
             f"{' '.join('--against ' + a for a in args.against)} --widths {args.widths} --batches {args.batches} --repeats {args.repeats} "
             f"--threads {args.threads} --out {args.out}`  ",
             f"Machine: CPU, torch {torch.__version__}, {args.threads} threads, float32; load average "
             f"{os.getloadavg()[0]:.1f} when it ended.", "",
             "| MLP | batch | step | median µs | paired ratio [q1, q3] |", "|---|---|---|---|---|"]
    for batch in (int(b) for b in args.batches.split(",")):
        for name, row in paired(build_steps(packages, widths, batch), args.repeats).items():
            lines.append(f"| {args.widths.replace(',', '-')} | {batch} | {name} | {row['us']:.0f} | "
                         f"{row['ratio']:.3f} [{row['q1']:.3f}, {row['q3']:.3f}] |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
