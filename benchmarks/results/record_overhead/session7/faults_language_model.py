# Session 7's ad-hoc measurement behind README.md (run from the repository root: PYTHONPATH=. python benchmarks/results/record_overhead/session7/faults_language_model.py [args]).
import gc, random, resource, sys, time, torch
import torch_fadjoint as tfa
from benchmarks.record_overhead import LanguageModel
torch.set_num_threads(1)
torch.manual_seed(0)
model, ids = LanguageModel().train(), torch.randint(0, 512, (16, 64))
net = tfa.FPropagation(model)
variant = sys.argv[1] if len(sys.argv) > 1 else ""
if "nowatch" in variant:
    from torch_fadjoint.junctions import Junction
    import torch_fadjoint.activations as A
    for cls in list(vars(A).values()):
        if isinstance(cls, type) and issubclass(cls, Junction) and "autograd_saves" in vars(cls):
            cls.autograd_saves = lambda self, a, k, o: ()
def tape():
    with torch.no_grad():
        net(ids)
    net.clear()
def plain():
    with torch.no_grad(): model(ids)
def ag():
    model(ids)
fw = {"plain": plain, "autograd": ag, "tape": tape}
names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(fw)
fw = {n: fw[n] for n in names}
for _ in range(5):
    for f in fw.values(): f()
flt = {n: [] for n in fw}; tm = {n: [] for n in fw}
gc.disable()
order = list(fw)
for _ in range(60):
    random.shuffle(order)
    for n in order:
        a = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; t = time.perf_counter()
        fw[n]()
        tm[n].append(time.perf_counter() - t); flt[n].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - a)
for n in fw:
    print(variant, n, "faults med", sorted(flt[n])[30], "ms p10", round(1e3 * sorted(tm[n])[6], 2))
