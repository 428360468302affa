"""The recorded forward's cost above the plain one, 784-256-256-10 MLP at batch 16, one thread (session 8, as run).

    PYTHONPATH=<checkout> python forward_overhead.py none        # that checkout's FPropagation(model)(x) - model(x)
    PYTHONPATH=<checkout> python forward_overhead.py nohooks     # this session's chain: its hooks' bodies skipped
    PYTHONPATH=<checkout> python forward_overhead.py nochanged   # the fingerprint check skipped

150 rounds of 30 calls of each, the order alternating; the median and lower quartile of the per-round difference.
"""
import torch, time, sys, statistics
import torch_fadjoint as tfa
import torch_fadjoint.chain as ch, torch_fadjoint.recorder as rc
from torch import nn
torch.set_num_threads(1)
which = sys.argv[1]
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(784,256), nn.ReLU(), nn.Linear(256,256), nn.ReLU(), nn.Linear(256,10))
net = tfa.FPropagation(model)
rec = getattr(net, "_recorder", None)
if which == "nohooks":
    steps, mods = rec._steps
    skip = lambda *args: None  # noqa: E731 - the hooks called, their bodies skipped
    rec._steps = (tuple((m, skip, skip) for m, _, _ in steps), mods)
    rec._finish = lambda out: None
if which == "nochanged":
    rc.FPropagation._changed = lambda self: False; net._pristine = True
x = torch.randn(16,784)
def ng():
    with torch.no_grad(): model(x)
def fa(): net(x)
d=[]
for _ in range(200): ng(); fa()
for r in range(150):
    ts = {}
    for k,f in (('ng',ng),('fa',fa)) if r%2 else (('fa',fa),('ng',ng)):
        t0=time.perf_counter()
        for _ in range(30): f()
        ts[k] = (time.perf_counter()-t0)/30*1e6
    d.append(ts['fa']-ts['ng'])
d.sort()
print("%-10s overhead median %.1f  q25 %.1f us" % (which, statistics.median(d), d[len(d)//4]))
