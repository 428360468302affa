"""Where the tape's recording overhead goes on torchvision's ResNet-18 (3 × 32 × 32, 2 threads), batch 16 and 128.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/results/speed_resnet18/record_overhead.py [--repeats 15]

Interleaved, under ``torch.no_grad()``: the model's forward; the forward under a pass-through ``TorchFunctionMode``
(the floor of any function-mode recorder); ``FPropagation(model, graph=True)``'s forward (tape dropped); and the same
with ``torch_fadjoint.tape.tree_flatten`` (the per-op scan of what each op saved, for the version check, and of
results) timed. An experiment: nothing in the library is changed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

import torch_fadjoint as tfa  # noqa: E402
import torch_fadjoint.tape as tape_module  # noqa: E402
from benchmarks.models import build_resnet18_tv  # noqa: E402


class PassThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = build_resnet18_tv(3)
    net = tfa.FPropagation(model, graph=True)
    library_flatten, spent = tape_module.tree_flatten, [0.0]

    def timed_flatten(*a, **k):
        tic = time.perf_counter()
        result = library_flatten(*a, **k)
        spent[0] += time.perf_counter() - tic
        return result

    @torch.no_grad()
    def run(kind, x):
        if kind == "forward":
            model(x)
        elif kind == "pass-through mode":
            with PassThrough():
                model(x)
        else:
            net(x)
            net.clear()

    kinds = ("forward", "pass-through mode", "record")
    print("| batch | forward ms | pass-through mode ms | record ms | record / forward (paired) | tree_flatten in the "
          "tape ms / forward | ops recorded |\n|---|---|---|---|---|---|---|")
    for batch in (16, 128):
        x = torch.randn(batch, 3, 32, 32)
        times = {k: [] for k in kinds}
        for kind in kinds:
            run(kind, x), run(kind, x)
        for _ in range(args.repeats):
            for kind in kinds:
                tic = time.perf_counter()
                run(kind, x)
                times[kind].append(time.perf_counter() - tic)
        tape_module.tree_flatten = timed_flatten
        spent[0] = 0.0
        with torch.no_grad():
            for _ in range(5):
                net(x)
            ops = len(net._tape.ops)
            net.clear()
        tape_module.tree_flatten = library_flatten
        med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        paired = statistics.median(r / f for r, f in zip(times["record"], times["forward"]))
        print(f"| {batch} | {med['forward']:.1f} | {med['pass-through mode']:.1f} | {med['record']:.1f} | "
              f"{paired:.2f} | {1e3 * spent[0] / 5:.1f} | {ops} |")


if __name__ == "__main__":
    main()
