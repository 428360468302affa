"""One step of configs/speed_resnet18.toml's entries under torch.profiler (issue 21's hotspot hunt).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/results/speed_resnet18/profile_one_step.py [--steps 4]
                                                                                [--rules sgd,fadjoint,forward,record]

Each entry is built as ``benchmarks.speed`` builds it (same weights, same random 128 × 3 × 32 × 32 batch, 2 threads,
the config's validate) and warmed up; then ``--steps`` steps of each are profiled, the entries interleaved (the
order alternates). Printed per entry, in ms per step: the ops by self CPU time and calls, the sum of the ops' self
times against the step's wall time (the rest is Python: the tape, the optimizer's checks, autograd's engine), and
``aten::convolution_backward`` split by input shapes (where the tape and autograd differ).
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # the repository root

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks import speed  # noqa: E402
from benchmarks.common import DTYPES  # noqa: E402
from benchmarks.models import input_shape  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/speed_resnet18.toml")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rules", default="sgd,fadjoint,forward,record")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    cfg = {**speed.DEFAULTS, **tomllib.loads(Path(args.config).read_text())}
    torch.set_num_threads(cfg["threads"])
    dtype, arch, batch = DTYPES[cfg["dtype"]], cfg["models"][0], cfg["batches"][0]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *input_shape({**cfg, "model": arch}), generator=gen).to(dtype=dtype)
    target = torch.randint(0, 10, (batch,), generator=gen)
    rules = args.rules.split(",")
    trainers = {rule: speed._make(cfg, rule, arch, torch.device("cpu"), dtype)[1] for rule in rules}
    for trainer in trainers.values():
        for _ in range(cfg["warmup"]):
            trainer.step(x, target)
    ops = {rule: collections.Counter() for rule in rules}
    calls = {rule: collections.Counter() for rule in rules}
    convs = {rule: collections.Counter() for rule in rules}
    wall = collections.Counter()
    for step in range(args.steps):
        for rule in (rules if step % 2 == 0 else rules[::-1]):
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                tic = time.perf_counter()
                trainers[rule].step(x, target)
                wall[rule] += time.perf_counter() - tic
            for event in prof.key_averages(group_by_input_shape=True):
                ops[rule][event.key] += event.self_cpu_time_total / 1e3
                calls[rule][event.key] += event.count
                if event.key == "aten::convolution_backward":
                    grad, x_in, weight = event.input_shapes[:3]
                    convs[rule][f"O* {grad}, X {x_in}, W {weight}"] += event.self_cpu_time_total / 1e3
    n = args.steps
    print(f"# One step of {arch}, batch {batch}, {cfg['dtype']}, {cfg['threads']} threads, validate={cfg['validate']}, "
          f"graph={cfg['graph']}: torch.profiler, {n} steps per entry, interleaved (torch {torch.__version__})\n")
    print("| entry | wall ms / step (under the profiler) | ops' self time ms / step | rest (Python, engine) |")
    print("|---|---|---|---|")
    for rule in rules:
        total = sum(ops[rule].values()) / n
        print(f"| {rule} | {1e3 * wall[rule] / n:.1f} | {total:.1f} | {1e3 * wall[rule] / n - total:.1f} |")
    print()
    for rule in rules:
        print(f"## {rule}\n\n| op | self ms / step | calls / step |\n|---|---|---|")
        for key, ms in ops[rule].most_common(args.top):
            print(f"| {key} | {ms / n:.2f} | {calls[rule][key] / n:g} |")
        print()
    with_convs = [rule for rule in rules if convs[rule]]
    if with_convs:
        print("## aten::convolution_backward by shapes (ms / step)\n")
        print("| shapes | " + " | ".join(with_convs) + " |\n|---|" + "---|" * len(with_convs))
        keys = sorted(set().union(*(convs[r] for r in with_convs)), key=lambda k: -convs[with_convs[0]][k])
        for key in keys:
            print(f"| {key} | " + " | ".join(f"{convs[r][key] / n:.2f}" for r in with_convs) + " |")
        print("| total | " + " | ".join(f"{sum(convs[r].values()) / n:.2f}" for r in with_convs) + " |")


if __name__ == "__main__":
    main()
