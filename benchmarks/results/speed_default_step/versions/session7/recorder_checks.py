# Session 7: what each of the chain recorder's per-forward checks costs (784-256-256-10, batch 16, one thread): the recorded
# forward minus the plain one, with each check replaced by a no-op in turn (5 rounds, 20th percentiles). Run from the
# repository root: PYTHONPATH=. python benchmarks/results/speed_default_step/versions/session7/recorder_checks.py
import torch, time, gc, copy, random
from torch import nn
import torch_fadjoint as tfa
from torch_fadjoint import recorder as R, chain as C, output as O, layers as L
torch.set_num_threads(1); torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
x = torch.randn(16, 1, 784)
net = tfa.FPropagation(model)
m2 = copy.deepcopy(model)
def plain():
    with torch.no_grad(): m2(x)
def rec():
    with torch.no_grad(): net(x)
def timeit(f, n=3000):
    ts = []
    for _ in range(n):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    return sorted(ts)[n // 5] * 1e6
patches = {
  "none": [],
  "no fingerprint": [(R.FPropagation, "_changed", lambda self: False)],
  "no settings": [(C, "_settings", lambda m: ())],
  "no watch": [(C.ChainRecorder, "_watch_tensor", lambda self, *a, **k: None)],
  "no read_through": [(C, "_read_through", lambda m, n: (type(m),) + (None, False) * len(n))],
  "no unwatched/watch_output": [(R, "unwatched", lambda v, m, i=0: v), (R, "watch_output", lambda o, n: o)],
  "no check_input": [(L._Linear, "check_input", lambda self, m, x: None)],
  "no runstats/check_inputs": [(C, "_running_statistics", lambda m: []), (C, "_check_inputs", lambda i: None)],
  "no consume": [(C.ChainRecorder, "_consume", lambda self, w, i: i[0])],
  "no advance": [(C.ChainRecorder, "_advance", lambda self, o, s: setattr(self, "_last", o))],
}
import itertools
gc.disable()
res = {k: [] for k in patches}
for rep in range(5):
    for k, ps in patches.items():
        saved = [(o, a, getattr(o, a)) for o, a, _ in ps]
        for o, a, v in ps: setattr(o, a, v)
        for _ in range(200): rec()
        res[k].append(timeit(rec) - timeit(plain))
        for o, a, v in saved: setattr(o, a, v)
for k, v in res.items(): print(f"{k:18s} overhead {sorted(v)[2]:.1f} us  (all: {[round(t) for t in v]})")
