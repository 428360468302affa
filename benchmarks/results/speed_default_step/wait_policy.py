"""Autograd + torch.optim.SGD's step time on the 784-256-256-10 MLP at batch 16, 2 threads: run it twice, with and
without ``OMP_WAIT_POLICY=PASSIVE`` (which every benchmark command here sets), to see what the policy does to small
steps on this machine::

    python benchmarks/results/speed_default_step/wait_policy.py
    OMP_WAIT_POLICY=PASSIVE python benchmarks/results/speed_default_step/wait_policy.py
"""
import os
import statistics
import time

import torch
from torch import nn

torch.set_num_threads(2)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
x, t = torch.randn(16, 784), torch.randint(0, 10, (16,))
criterion = nn.CrossEntropyLoss()


def step():
    opt.zero_grad()
    criterion(model(x), t).backward()
    opt.step()


for _ in range(50):
    step()
blocks = []
for _ in range(10):
    start = time.perf_counter()
    for _ in range(100):
        step()
    blocks.append((time.perf_counter() - start) / 100)
print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}: autograd + SGD step "
      f"{statistics.median(blocks) * 1e3:.2f} ms (median of 10 blocks of 100 steps)")
