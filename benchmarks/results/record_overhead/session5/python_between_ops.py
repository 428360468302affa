"""What Python run between the ops of a forward costs, whoever runs it: the language model of
``benchmarks.record_overhead`` (16 × 64 tokens, 2 threads) under a ``TorchFunctionMode`` that spends a fixed time in
Python (touching a few dicts, as a recorder does) at every torch function call, against the plain forward::

    python benchmarks/results/record_overhead/session5/python_between_ops.py

Extra wall time per forward / (calls × µs spent) says how much each µs of a recorder's Python costs the forward.
"""
import statistics
import time

import torch
from torch.overrides import TorchFunctionMode

from benchmarks.record_overhead import LanguageModel

torch.set_num_threads(2)
torch.manual_seed(0)
model = LanguageModel().train()
ids = torch.randint(0, 512, (16, 64))
junk = [{i: str(i) for i in range(200)} for _ in range(50)]


def spend(microseconds: float) -> None:
    end = time.perf_counter() + microseconds * 1e-6
    while time.perf_counter() < end:
        for d in junk:
            len(d)


class Spending(TorchFunctionMode):
    def __init__(self, microseconds: float):
        super().__init__()
        self.microseconds, self.calls = microseconds, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        spend(self.microseconds)
        return func(*args, **(kwargs or {}))


def forward_ms(microseconds, repeats=25):
    times = []
    for _ in range(repeats):
        mode = Spending(microseconds) if microseconds is not None else None
        start = time.perf_counter()
        with torch.no_grad():
            if mode is None:
                model(ids)
            else:
                with mode:
                    model(ids)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[5:]), (mode.calls if mode is not None else 0)


plain, _ = forward_ms(None)
base, calls = forward_ms(0)
print(f"plain forward {plain:.2f} ms; under a mode that does nothing {base:.2f} ms ({calls} calls)")
for microseconds in (25, 50):
    ms, calls = forward_ms(microseconds)
    spent = calls * microseconds / 1e3
    print(f"{microseconds} µs of Python per call: {ms:.2f} ms, {ms - base:.2f} ms more for {spent:.2f} ms spent "
          f"({(ms - base) / spent:.2f}x)")
