"""What the tape costs per recorded op, and the least a TorchFunctionMode recorder pays: the language model of
``benchmarks.record_overhead`` at a tiny size (1 × 4 tokens, where the kernels cost little) and at the issue's size
(16 × 64), one thread, in one process, each forward timed 300 times, in a new random order with the others each time (10th percentiles)::

    PYTHONPATH=. python benchmarks/results/record_overhead/session6/per_op.py \
        > benchmarks/results/record_overhead/session6/per_op.txt

plain: the model under no_grad; pass-through mode: under a TorchFunctionMode that only calls each function;
holding: that mode keeping every output alive (what keeping records costs in memory traffic); autograd: the
forward with grad enabled; tape: FPropagation's recorded forward (records dropped).
"""
import gc
import random
import time

import torch
from torch.overrides import TorchFunctionMode

import torch_fadjoint as tfa
from benchmarks.record_overhead import LanguageModel


class PassThrough(TorchFunctionMode):
    def __init__(self, hold=False):
        super().__init__()
        self.hold, self.held = hold, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.hold:
            self.held.append(out)
        return out


def main(repeats=300):
    torch.set_num_threads(1)
    for batch, length in ((1, 4), (16, 64)):
        torch.manual_seed(0)
        model, ids = LanguageModel().train(), torch.randint(0, 512, (batch, length))
        net = tfa.FPropagation(model)
        with torch.no_grad():
            net(ids)
        ops = len(net._tape.ops)
        net.clear()

        def tape():
            with torch.no_grad():
                net(ids)
            net.clear()

        def run(mode=None, grad=False):
            def forward():
                with torch.set_grad_enabled(grad), (mode() if mode else torch.no_grad()):
                    model(ids)
            return forward

        forwards = {"plain": run(), "pass-through mode": run(PassThrough),
                    "holding every output": run(lambda: PassThrough(hold=True)), "autograd": run(grad=True),
                    "tape": tape}
        for _ in range(5):
            for forward in forwards.values():
                forward()
        times = {name: [] for name in forwards}
        gc.collect()
        gc.disable()
        order, shuffle = list(forwards), random.Random(0).shuffle
        for _ in range(repeats):
            shuffle(order)  # a fixed order favours some places (benchmarks/versions.py)
            for name in order:
                forward = forwards[name]
                start = time.perf_counter()
                forward()
                times[name].append(time.perf_counter() - start)
        gc.enable()
        p10 = {name: sorted(t)[repeats // 10] for name, t in times.items()}
        print(f"language model, {batch} x {length} tokens, {ops} recorded ops, 1 thread (10th percentiles):")
        for name, t in p10.items():
            print(f"  {name:22s} {1e3 * t:7.2f} ms  {t / p10['plain']:.3f}x plain  "
                  f"{1e6 * (t - p10['plain']) / ops:6.1f} us per recorded op above plain")


if __name__ == "__main__":
    main()
