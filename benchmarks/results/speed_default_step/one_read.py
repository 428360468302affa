"""What one read of every parameter and momentum buffer costs at memory speed, against autograd + SGD's step, in each
cell of issue 20's table: one reduction over a single contiguous buffer of 2P floats (P the parameter count), with
no per-tensor dispatch — the least that any check bounding θ' = θ − lr·b' before writing it can add, however it is
written (a fused kernel included), since nothing cached across steps survives a write through ``.data``::

    python benchmarks/results/speed_default_step/one_read.py
    OMP_WAIT_POLICY=PASSIVE python benchmarks/results/speed_default_step/one_read.py
"""
import os
import statistics
import time

import torch
from torch import nn

torch.set_num_threads(2)
CELLS = (([784, 256, 256, 10], 16), ([784, 256, 256, 10], 128), ([784, 1024, 1024, 10], 128),
         ([784, 1024, 1024, 10], 1024))


def measure(widths, batch, repeats=200):
    torch.manual_seed(0)
    layers = [m for a, b in zip(widths[:-1], widths[1:]) for m in (nn.Linear(a, b), nn.ReLU())][:-1]
    model = nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
    x, t = torch.randn(batch, widths[0]), torch.randint(0, widths[-1], (batch,))
    flat = torch.randn(2 * sum(p.numel() for p in model.parameters()))

    def sgd():
        loss = nn.functional.cross_entropy(model(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def read():
        flat.sum().item()

    times = {sgd: [], read: []}
    for _ in range(20):
        sgd(), read()
    for _ in range(repeats):  # interleaved
        for f in times:
            tic = time.perf_counter()
            f()
            times[f].append(time.perf_counter() - tic)
    return flat.numel() // 2, statistics.median(times[sgd]), statistics.median(times[read])


print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, 2 threads, torch {torch.__version__}")
for widths, batch in CELLS:
    params, step, read = measure(widths, batch)
    print(f"{'-'.join(map(str, widths))}, batch {batch}: P = {params}, autograd + SGD step {step * 1e3:.3f} ms, "
          f"one read of 2P floats {read * 1e3:.3f} ms = {read / step:.3f} of the step")
