"""Where a training step's time goes: torch.profiler self time per op, several rules side by side (issue 16).

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.profile_step --batch 1024 --steps 12 [--rules sgd,fadjoint_fused]
                                                              [--widths 784,1024,1024,10] [--shapes]

Each rule is built as ``benchmarks.speed`` builds it (same weights, lr 0.01, momentum 0.9, foreach, float32, CPU,
``validate=False``) and warmed up; then every step is profiled on its own, the rules interleaved (A, B, A, B, …;
the order alternates), so load that drifts hits every rule alike. Printed per rule, in ms per step: every op's
self time and calls (``--shapes``: split by input shapes), the GEMMs (mm, addmm, addmm_), all ops, the step's wall
time and the rest (Python, the autograd engine's bookkeeping, dispatch, the profiler's own cost). Rows named
``[py/engine]`` are annotations (``Optimizer.step#…``, autograd nodes): their self time is the Python and engine
work between the ops they contain.
"""
from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from .speed import DEFAULTS, _make

GEMMS = ("aten::mm", "aten::addmm", "aten::addmm_")


def _is_annotation(key: str) -> bool:
    return key.startswith(("Optimizer.", "autograd::engine")) or key[0].isupper() or key == "detach"


def profile_rules(rules, widths, batch: int, steps: int, threads: int = 2, shapes: bool = False) -> dict:
    """{rule: (Counter{op: self ms summed}, Counter{op: calls}, wall ms summed)} over ``steps`` interleaved steps."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _profile(rules, widths, batch, steps, shapes)
    finally:
        torch.set_num_threads(previous)


def _profile(rules, widths, batch: int, steps: int, shapes: bool) -> dict:
    cfg = {**DEFAULTS, "lr": 0.01, "momentum": 0.9, "foreach": True, "validate": False}
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, widths[0], generator=gen)
    target = torch.randint(0, widths[-1], (batch,), generator=gen)
    trainers = {rule: _make(cfg, rule, list(widths), torch.device("cpu"), torch.float32)[1] for rule in rules}
    for trainer in trainers.values():
        for _ in range(5):
            trainer.step(x, target)
    result = {rule: (collections.Counter(), collections.Counter(), [0.0]) for rule in rules}
    for i in range(steps):
        for rule in rules if i % 2 == 0 else rules[::-1]:
            with profile(activities=[ProfilerActivity.CPU], record_shapes=shapes) as prof:
                with record_function("STEP"):
                    trainers[rule].step(x, target)
            self_ms, calls, wall = result[rule]
            for event in prof.key_averages(group_by_input_shape=shapes):
                if event.key == "STEP":
                    wall[0] += event.cpu_time_total / 1e3
                    continue
                key = ("[py/engine] " if _is_annotation(event.key) else "") + event.key
                if shapes and event.input_shapes:
                    key += " " + str(event.input_shapes)
                self_ms[key] += event.self_cpu_time_total / 1e3
                calls[key] += event.count
    return result


def report(result: dict, steps: int, min_ms: float = 0.01) -> str:
    rules = list(result)
    keys = sorted(set().union(*(r[0] for r in result.values())), key=lambda k: -max(result[r][0][k] for r in rules))
    lines = [f"ms per step (calls per step), {steps} interleaved steps per rule",
             f"{'op':70s} " + " ".join(f"{rule:>22s}" for rule in rules)]
    for key in keys:
        if max(result[r][0][key] for r in rules) / steps >= min_ms:
            lines.append(f"{key[:70]:70s} " + " ".join(
                f"{result[r][0][key] / steps:14.3f} ({result[r][1][key] / steps:4.0f})" for r in rules))
    gemm = {r: sum(v for k, v in result[r][0].items() if k.split(" ")[0] in GEMMS) for r in rules}
    ops = {r: sum(v for k, v in result[r][0].items() if not k.startswith("[py")) for r in rules}
    wall = {r: result[r][2][0] for r in rules}
    for name, values in (("GEMM (mm, addmm, addmm_)", gemm), ("all ops", ops), ("step (wall)", wall),
                         ("rest: step - ops (Python, engine, dispatch, profiler)", {r: wall[r] - ops[r] for r in rules})):
        lines.append(f"{name:70s} " + " ".join(f"{values[r] / steps:14.3f}       " for r in rules))
    ref = rules[0]
    lines.append(f"step / {ref}'s step: " + ", ".join(f"{r} {wall[r] / wall[ref]:.3f}" for r in rules))
    lines.append(f"GEMM / {ref}'s step: " + ", ".join(f"{r} {gemm[r] / wall[ref]:.3f}" for r in rules))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rules", default="sgd,fadjoint_fused")
    parser.add_argument("--widths", default="784,1024,1024,10")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", action="store_true", help="split every op by its input shapes")
    args = parser.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    result = profile_rules(args.rules.split(","), widths, args.batch, args.steps, args.threads, args.shapes)
    print(f"{'-'.join(map(str, widths))} MLP, batch {args.batch}, {args.threads} threads, CPU, float32")
    print(report(result, args.steps))


if __name__ == "__main__":
    main()
