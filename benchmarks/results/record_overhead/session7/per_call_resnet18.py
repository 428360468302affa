# Session 7's ad-hoc measurement behind README.md (run from the repository root: PYTHONPATH=. python benchmarks/results/record_overhead/session7/per_call_resnet18.py [args]).
import time, torch, collections, os
import torch_fadjoint as tfa
from torch_fadjoint import tape as T
from benchmarks.models import build_resnet18_tv
from torch.overrides import TorchFunctionMode
torch.manual_seed(0); torch.set_num_threads(int(os.environ.get("NT", "2")))
model = build_resnet18_tv().train(); x = torch.randn(128, 3, 32, 32)
net = tfa.FPropagation(model)
acc = {"tape": collections.Counter(), "pt": collections.Counter(), "ag": collections.Counter()}
orig = T.TapeMode.__torch_function__
depth = [0]
def timed(self, func, types, args=(), kwargs=None):
    depth[0] += 1
    t = time.perf_counter()
    try: return orig(self, func, types, args, kwargs)
    finally:
        depth[0] -= 1
        if depth[0] == 0: acc["tape"][T._op_name(func)] += time.perf_counter() - t
T.TapeMode.__torch_function__ = timed
class PT(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        t = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        acc["ag" if torch.is_grad_enabled() else "pt"][T._op_name(func)] += time.perf_counter() - t
        return out
def rec():
    with torch.no_grad(): net(x)
    net.clear()
def ag():
    with PT(): model(x)
def pt():
    with torch.no_grad(), PT(): model(x)
for f in (rec, pt, ag): f()
for c in acc.values(): c.clear()
wall = collections.Counter()
for _ in range(8):
    for n, f in (("tape", rec), ("pt", pt), ("ag", ag)):
        t = time.perf_counter(); f(); wall[n] += time.perf_counter() - t
for n in acc: print(n, "wall/fw", round(wall[n] / 8 * 1e3, 1), "in ops", round(sum(acc[n].values()) / 8 * 1e3, 1))
for k in sorted(acc["tape"], key=lambda k: -acc["tape"][k])[:12]:
    print(f"{k:40s} tape {acc['tape'][k]/8*1e3:7.2f} pt {acc['pt'][k]/8*1e3:7.2f} ag {acc['ag'][k]/8*1e3:7.2f}")
