# Session 7's ad-hoc measurement behind README.md (run from the repository root: PYTHONPATH=. python benchmarks/results/record_overhead/session7/faults_resnet18.py [args]).
import gc, random, resource, sys, time, torch
import torch_fadjoint as tfa
from benchmarks.models import build_resnet18_tv
torch.manual_seed(0); torch.set_num_threads(int(__import__("os").environ.get("NT", "2")))
model = build_resnet18_tv().train()
x = torch.randn(128, 3, 32, 32)
net = tfa.FPropagation(model)
def plain():
    with torch.no_grad(): model(x)
def rec():
    with torch.no_grad(): net(x)
    net.clear()
def ag(): model(x)
from torch.overrides import TorchFunctionMode
class PT(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))
def passthru():
    with torch.no_grad(), PT(): model(x)
fw = {"plain": plain, "autograd": ag, "tape": rec, "pt": passthru}
names = sys.argv[1].split(",")
fw = {n: fw[n] for n in names}
for _ in range(3):
    for f in fw.values(): f()
flt = {n: [] for n in fw}; tm = {n: [] for n in fw}
gc.disable(); order = list(fw)
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 15):
    random.shuffle(order)
    for n in order:
        a = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; t = time.perf_counter()
        fw[n]()
        tm[n].append(time.perf_counter() - t); flt[n].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - a)
for n in fw:
    k = len(tm[n])
    print(sys.argv[1], n, "faults med", sorted(flt[n])[k//2], "ms med", round(1e3 * sorted(tm[n])[k//2], 1), "p10", round(1e3 * sorted(tm[n])[k//10], 1))
