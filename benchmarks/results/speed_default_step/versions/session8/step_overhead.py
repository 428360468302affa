"""The step's cost (sweep + update, the forward excluded) above autograd's loss.backward() + SGD.step(), 784-256-256-10
MLP at batch 16, one thread, validate=False (session 8, as run): PYTHONPATH=<checkout> python step_overhead.py
"""
import torch, time, statistics
import torch_fadjoint as tfa
from torch import nn
import torch.nn.functional as F
torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(784,256), nn.ReLU(), nn.Linear(256,256), nn.ReLU(), nn.Linear(256,10))
m1 = nn.Sequential(nn.Linear(784,256), nn.ReLU(), nn.Linear(256,256), nn.ReLU(), nn.Linear(256,10))
net = tfa.FPropagation(model)
opt = tfa.optim.FAdjoint(net, lr=0.01, momentum=0.9, foreach=True, validate=False)
sgd = torch.optim.SGD(m1.parameters(), lr=0.01, momentum=0.9, foreach=True)
x = torch.randn(16,784); t = torch.randint(0,10,(16,))
d = []
for r in range(400):
    net(x)
    t0 = time.perf_counter(); opt.step(target=t); a = time.perf_counter() - t0
    out = m1(x); loss = F.cross_entropy(out, t)
    t0 = time.perf_counter(); sgd.zero_grad(); loss.backward(); sgd.step(); b = time.perf_counter() - t0
    if r > 50: d.append((a - b) * 1e6)
d.sort(); print("step - (backward+SGD): median %.1f us, q25 %.1f" % (statistics.median(d), d[len(d)//4]))
