"""How far inference learning's update on a graph is from the gradient, layer by layer (docs/maths.md §7.5).

    FADJOINT_DATA=/work/shared/datasets python -m benchmarks.il_graph_alignment \\
        --out benchmarks/results/il_graph_alignment

For each model (a plain MLP recorded as a graph, a residual MLP, a small BatchNorm ResNet), from its initial weights
(seeds 0-2) and the first MNIST training batch of 64 (float64): IL's update g_IL (``inference_grads``, variant "il",
γ_top = γ_bot = γ, T iterations, n = 1) against the gradient of the mean cross-entropy g (the F-adjoint on the same
tape, ``net.graph_grads``), per layer (a module's weight and bias together): the cosine cos(g_IL, g) and the norm
ratio ‖g_IL‖ / ‖g‖. No training. Writes ``results.json`` and ``REPORT.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import torch_fadjoint as tfa
from torch_fadjoint import data as tfa_data
from torch_fadjoint.optim import inference_grads

DT = torch.float64
SETTINGS = [(0.1, 5), (0.1, 20), (0.1, 50), (0.1, 100), (0.2, 10), (0.5, 20)]  # (γ, T): γ·T = 0.5, 2, 5, 10, 2, 10


class ResMLP(nn.Module):
    """784-64, two residual blocks h + ReLU(W h), 64-10."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.inp, self.f1, self.f2 = nn.Linear(784, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, 10)

    def forward(self, x):
        h = F.relu(self.inp(x.flatten(1)))
        h = h + F.relu(self.f1(h))
        h = h + F.relu(self.f2(h))
        return self.out(h)


class Block(nn.Module):
    """torchvision's BasicBlock: conv-BN-ReLU-conv-BN, ``+=`` the input, ReLU."""

    def __init__(self, c: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        out += x
        return F.relu(out)


class ResNet(nn.Module):
    """14 × 14 input (2 × 2 average of MNIST), a stride-2 stem with BatchNorm, two BasicBlocks, a mean, a linear."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(Block(c), Block(c))
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = F.avg_pool2d(x.reshape(-1, 1, 28, 28), 2)
        h = F.relu(self.bn(self.stem(x)))
        return self.fc(self.blocks(h).mean((2, 3)))


MODELS = {
    "mlp (chain)": lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                         nn.Linear(64, 10)),
    "residual mlp": ResMLP,
    "bn resnet": ResNet,
}


def _layers(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """(module name, its own parameters) in registration order, modules with parameters only."""
    return [(name, list(m.parameters(recurse=False))) for name, m in model.named_modules()
            if any(True for _ in m.parameters(recurse=False))]


def _flat(grads: dict, params: list) -> torch.Tensor:
    return torch.cat([grads.get(p, torch.zeros_like(p)).reshape(-1) for p in params])


def measure(name: str, seed: int, x: torch.Tensor, t: torch.Tensor) -> dict:
    torch.manual_seed(seed)
    model = MODELS[name]().to(DT)
    net = tfa.FPropagation(model, graph=True, keep_pre_activations=True)
    with torch.no_grad():
        out = net(x)
    grad = net.graph_grads((torch.softmax(out, 1) - F.one_hot(t, 10).to(DT)) / x.shape[0])
    rows = {}
    for gamma, T in SETTINGS:
        with torch.no_grad():
            net(x)  # the same batch again (BatchNorm's running statistics move by the forward alone)
        il = inference_grads(net, t, "il", T=T, gamma_top=gamma, gamma_bot=gamma)
        per_layer = {}
        for layer, params in _layers(model):
            a, b = _flat(il, params), _flat(grad, params)
            per_layer[layer] = {"cos": (a @ b / (a.norm() * b.norm()).clamp_min(1e-300)).item(),
                                "ratio": (a.norm() / b.norm()).item()}
        rows[f"γ={gamma}, T={T}"] = per_layer
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/il_graph_alignment")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    splits = tfa_data.load("mnist", tfa_data.data_root(), download=False)
    x, t = splits["train"].x[:args.batch].to(DT), splits["train"].t[:args.batch]
    started = time.time()
    results = {name: [measure(name, seed, x, t) for seed in range(args.seeds)] for name in MODELS}
    meta = {"command": "python -m benchmarks.il_graph_alignment " + " ".join(argv if argv is not None else sys.argv[1:]),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "seconds": round(time.time() - started, 1), "batch": args.batch,
            "seeds": args.seeds, "settings": SETTINGS}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, ensure_ascii=False))
    (out / "REPORT.md").write_text(report(meta, results))
    print((out / "REPORT.md").read_text())
    return results


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def report(meta: dict, results: dict) -> str:
    settings = [f"γ={g}, T={T}" for g, T in meta["settings"]]
    lines = ["# Inference learning on graphs: the update against the gradient, per layer (docs/maths.md §7.5)", "",
             f"`FADJOINT_DATA=/work/shared/datasets {meta['command']}` — torch {meta['torch']}, CPU kernels "
             f"`{meta['cpu_capability']}`, {meta['seconds']} s. The first {meta['batch']} MNIST training images, "
             f"float64, initial weights of seeds 0–{meta['seeds'] - 1}; g_IL = `inference_grads(net, t, 'il', T, "
             "γ_top = γ_bot = γ)`, g = the gradient of the mean cross-entropy (the F-adjoint on the same tape). Each "
             "cell: cos(g_IL, g) / ‖g_IL‖ ÷ ‖g‖, the mean over the seeds, per layer (weight and bias together), "
             "input side first. No training.", ""]
    for name, runs in results.items():
        lines += [f"## {name}", "", "| layer | " + " | ".join(settings) + " |",
                  "|---|" + "---|" * len(settings)]
        for layer in runs[0][settings[0]]:
            cells = []
            for s in settings:
                cos = _mean([run[s][layer]["cos"] for run in runs])
                ratio = _mean([run[s][layer]["ratio"] for run in runs])
                cells.append(f"{cos:.3f} / {ratio:.2g}")
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
