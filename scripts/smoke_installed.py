#!/usr/bin/env python3
"""The smoke test of an INSTALLED torch_fadjoint (scripts/check_package.py runs it in a fresh environment).

    python -I scripts/smoke_installed.py      # from a folder outside the clone, with the environment's python

Checks, in this order, and exits non-zero with one line naming the first failure:

1. ``torch_fadjoint`` is imported from the environment's site-packages (not from a clone on ``sys.path``);
2. every module of the package imports (``pkgutil.walk_packages``), and every ``.py`` file installed under the
   package folder is one of those modules (a subfolder without ``__init__.py`` would be skipped silently);
3. one step of every optimizer class in ``torch_fadjoint.optim.__all__`` on a small MLP and on a small CNN
   (Conv2d/ReLU/MaxPool2d/Flatten/Linear), random data, on the CPU: the loss is finite and every parameter moved;
4. ``importlib.metadata.version("torch-fadjoint") == torch_fadjoint.__version__``, and the LICENSE is installed.

Standard library + torch only. Prints one summary line when everything passed.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import sys
import sysconfig
from pathlib import Path

DIST = "torch-fadjoint"
# Constructor arguments per optimizer (every other argument keeps its default; an optimizer added to
# torch_fadjoint.optim later runs with its defaults alone). Consequentialism and InferenceLearning take a
# torch optimizer as `base=`: one runs with Adam, one with the default SGD.
KWARGS = {
    "FAdjoint": dict(lr=0.1, momentum=0.9),
    "EquilibriumFAdjoint": dict(lr=0.1, tau=0.1, steps=20, loss="mse"),
    "LFP": dict(lr=0.1, momentum=0.9),  # trains on a reward; step(target=t) makes it from the targets
    "Consequentialism": dict(lr=0.1, base="adam"),
    "InferenceLearning": dict(variant="il_prox", T=5),
}


def fail(message: str) -> None:
    raise SystemExit(f"smoke_installed: FAILED: {message}")


def check_location(package) -> Path:
    where = Path(package.__file__).resolve()
    sites = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")}
    if not any(where.is_relative_to(site) for site in sites):
        fail(f"torch_fadjoint was imported from {where}, not from this environment's site-packages "
             f"({', '.join(map(str, sorted(sites)))}): run from a folder outside the clone, with python -I")
    return where.parent


def import_every_module(package, folder: Path) -> list[str]:
    def onerror(name):
        fail(f"importing {name} raised {sys.exc_info()[1]!r}")

    names = [package.__name__]
    for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + ".", onerror=onerror):
        try:
            importlib.import_module(info.name)
        except Exception as exc:  # noqa: BLE001 - any failure to import is the finding
            fail(f"importing {info.name} raised {exc!r}")
        names.append(info.name)
    files = {".".join((package.__name__, *path.relative_to(folder).with_suffix("").parts)).removesuffix(".__init__")
             for path in folder.rglob("*.py")}
    unseen = sorted(files - set(names))
    if unseen:
        fail(f"installed but not reachable as modules (a folder without __init__.py?): {unseen}")
    return names


def optimizer_classes(tfa, torch) -> dict:
    exported = {name: getattr(tfa.optim, name) for name in tfa.optim.__all__}
    exported = {name: obj for name, obj in exported.items()
                if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer)}
    # a base class (RuleOptimizer) is exported too: the optimizers are the classes no other one derives from
    classes = {name: cls for name, cls in exported.items()
               if not any(other is not cls and issubclass(other, cls) for other in exported.values())}
    missing = sorted(set(KWARGS) - set(classes))
    if missing:
        fail(f"torch_fadjoint.optim.__all__ lacks the optimizers {missing}")
    return classes


def one_step(tfa, torch, name: str, cls, kind: str) -> float:
    nn = torch.nn
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 10))
        x = torch.randn(16, 20)
    else:
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                              nn.Linear(4 * 6 * 6, 10))
        x = torch.randn(16, 1, 12, 12)
    t = torch.randint(0, 10, (16,))
    before = [p.detach().clone() for p in model.parameters()]
    net = tfa.FPropagation(model)
    try:
        opt = cls(net, **KWARGS.get(name, {}))
        net(x)
        loss = opt.step(target=t)
    except Exception as exc:  # noqa: BLE001 - any failure of the step is the finding
        fail(f"{name} on the {kind}: {type(exc).__name__}: {exc}")
    finally:
        net.remove()
    if loss is None or not bool(torch.isfinite(loss).all()):
        fail(f"{name} on the {kind}: step(target=t) returned the loss {loss!r}, not a finite number")
    still = [n for (n, p), old in zip(model.named_parameters(), before) if torch.equal(p.detach(), old)]
    if still:
        fail(f"{name} on the {kind}: one step left the parameters {still} unchanged")
    return float(loss)


def check_metadata(tfa) -> str:
    try:
        version = importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:
        fail(f"no installed distribution named {DIST!r}")
    if version != tfa.__version__:
        fail(f"the metadata's version {version} differs from torch_fadjoint.__version__ {tfa.__version__}")
    files = importlib.metadata.distribution(DIST).files or []
    if not any(f.name == "LICENSE" for f in files):
        fail(f"the installed {DIST} carries no LICENSE file")
    return version


def main() -> int:
    try:
        import torch
        import torch_fadjoint as tfa
    except Exception as exc:  # noqa: BLE001
        fail(f"import torch_fadjoint raised {exc!r}")
    folder = check_location(tfa)
    modules = import_every_module(tfa, folder)
    classes = optimizer_classes(tfa, torch)
    losses = {(name, kind): one_step(tfa, torch, name, cls, kind) for name, cls in classes.items()
              for kind in ("mlp", "cnn")}
    version = check_metadata(tfa)
    print(f"smoke_installed: ok: torch-fadjoint {version} from {folder} (torch {torch.__version__}): "
          f"{len(modules)} modules imported; one step of {', '.join(classes)} on an MLP and a CNN "
          f"(losses {min(losses.values()):.3g}..{max(losses.values()):.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
