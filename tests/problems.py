"""Test problems: random MLPs × activations × losses × batch sizes (STYLE T1).

A ``Problem`` is a readable settings record; ``build(dtype)`` makes the model, input and target from
its own seed, so every test (and the autograd oracle) sees the same numbers.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "elu": lambda: nn.ELU(0.7),
    "softplus": lambda: nn.Softplus(beta=2.0, threshold=3.0),
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "identity": nn.Identity,
}
LOSSES = ("cross_entropy", "mse", "nll", "mse_float")


@dataclass
class Problem:
    seed: int
    widths: list[int]
    activations: list[str]
    bias: list[bool]
    batch: int
    loss: str
    dropout: float = 0.0
    flatten: bool = False
    label_smoothing: float = 0.0
    extra: dict = field(default_factory=dict)

    def __str__(self) -> str:
        acts = "-".join(a[:4] for a in self.activations)
        return f"s{self.seed}-w{'x'.join(map(str, self.widths))}-{acts}-B{self.batch}-{self.loss}"

    def build(self, dtype=torch.float64, device="cpu"):
        """(model, x, target) from this problem's seed."""
        gen = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        layers: list[nn.Module] = [nn.Flatten()] if self.flatten else []
        n_layers = len(self.widths) - 1
        for k in range(n_layers):
            layers.append(nn.Linear(self.widths[k], self.widths[k + 1], bias=self.bias[k]))
            if k < n_layers - 1:
                layers.append(ACTIVATIONS[self.activations[k]]())
                if self.dropout:
                    layers.append(nn.Dropout(self.dropout))
        if self.loss == "nll":
            layers.append(nn.LogSoftmax(dim=-1))
        model = nn.Sequential(*layers).to(device=device, dtype=dtype)
        with torch.no_grad():  # a wider spread than the default init: unsaturated, mixed-sign pre-activations
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) / max(p.shape[-1], 1) ** 0.5 * 1.5)
        in_shape = (self.batch, 2, self.widths[0] // 2) if self.flatten else (self.batch, self.widths[0])
        x = torch.randn(in_shape, generator=gen, dtype=dtype).to(device)
        n_out = self.widths[-1]
        if self.loss == "mse_float":
            target = torch.randn(self.batch, n_out, generator=gen, dtype=dtype).to(device)
        else:
            target = torch.randint(0, n_out, (self.batch,), generator=gen).to(device)
        return model, x, target


def random_problems(n: int, seed: int = 1234, max_depth: int = 6, max_width: int = 64) -> list[Problem]:
    """``n`` random problems: depth 1–6, widths 1–64, every activation, bias on/off, batch 1–33."""
    rng = random.Random(seed)
    names = list(ACTIVATIONS)
    problems = []
    for i in range(n):
        depth = rng.randint(1, max_depth)
        loss = LOSSES[i % len(LOSSES)]
        widths = [rng.randint(1, max_width) for _ in range(depth + 1)]
        if loss != "mse_float":
            widths[-1] = max(widths[-1], 2)
        flatten = i % 5 == 0
        if flatten:
            widths[0] = 2 * max(1, widths[0] // 2)
        problems.append(Problem(
            seed=seed + i, widths=widths, activations=[names[(i + k) % len(names)] for k in range(depth)],
            bias=[rng.random() < 0.8 for _ in range(depth)], batch=rng.randint(1, 33), loss=loss,
            dropout=0.25 if i % 7 == 3 else 0.0, flatten=flatten,
            label_smoothing=0.1 if i % 11 == 0 and loss == "cross_entropy" else 0.0,
        ))
    return problems


# -- random CNNs (issue 14): Conv1d/2d of every geometry, pooling, BatchNorm, LayerNorm, module and functional forms
_CNN_ACTS = [("module", nn.ReLU), ("module", nn.Tanh), ("module", lambda: nn.LeakyReLU(0.1)), ("module", nn.GELU),
             ("module", nn.SiLU), ("functional", F.relu), ("functional", torch.tanh), ("functional", torch.sigmoid),
             ("functional", F.gelu), ("method", "relu")]


class RandomCNN(nn.Module):
    """A chain from a seed: conv blocks (conv [norm] act [pool]) → flatten → Linear [act Linear] [log_softmax].

    Each step is a registered module or a functional call written in ``forward`` as a user would."""

    def __init__(self, seed: int, dims: int, in_shape: tuple, batch: int):
        super().__init__()
        rng = random.Random(seed)
        self.plan: list = []
        self.parts = nn.ModuleList()
        channels, spatial = in_shape[0], list(in_shape[1:])
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        probe = torch.zeros((batch,) + tuple(in_shape))
        self.description = []
        for _ in range(rng.randint(1, 3)):
            out_channels = rng.choice([2, 3, 4, 6])
            groups = 2 if channels % 2 == 0 and out_channels % 2 == 0 and rng.random() < 0.3 else 1
            kernel = rng.randint(1, 3)
            stride = rng.choice([1, 1, 2])
            dilation = rng.choice([1, 1, 2]) if kernel > 1 else 1
            padding = rng.choice([0, 1, "same"]) if stride == 1 else rng.choice([0, 1])
            if padding == "same" and kernel % 2 == 0:
                kernel += 1
            if min(spatial) + 2 * (padding if isinstance(padding, int) else 0) < dilation * (kernel - 1) + 1:
                kernel, dilation, padding = 1, 1, 0
            self._add(conv(channels, out_channels, kernel, stride=stride, padding=padding, dilation=dilation,
                           groups=groups, bias=rng.random() < 0.8), f"conv(k{kernel}s{stride}p{padding}d{dilation}g{groups})")
            probe = self._run(probe)
            channels, spatial = out_channels, list(probe.shape[2:])
            norm = rng.random()
            if norm < 0.2 and batch * probe[0, 0].numel() > 1:
                bn = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(channels)
                if rng.random() < 0.5:
                    with torch.no_grad():
                        bn.running_mean.uniform_(-0.5, 0.5)
                        bn.running_var.uniform_(0.5, 2.0)
                    bn.eval()
                self._add(bn, "bn-train" if bn.training else "bn-eval")
            elif norm < 0.3:
                self._add(nn.LayerNorm(list(probe.shape[1:]), elementwise_affine=rng.random() < 0.7), "ln")
            self._act(rng)
            probe = self._run(probe)
            if min(spatial) >= 2 and rng.random() < 0.6:
                kind = rng.choice(["max", "avg", "adaptive"])
                functional = rng.random() < 0.5
                pools = {1: (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, F.max_pool1d, F.avg_pool1d,
                             F.adaptive_avg_pool1d),
                         2: (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, F.max_pool2d, F.avg_pool2d,
                             F.adaptive_avg_pool2d)}[dims]
                index = ["max", "avg", "adaptive"].index(kind) + (3 if functional else 0)
                arg = max(1, min(spatial) // 2) if kind == "adaptive" else 2
                if functional:
                    self.plan.append(lambda h, f=pools[index], a=arg: f(h, a))
                else:
                    self._add(pools[index](arg), None)
                self.description.append(f"{kind}pool{'-f' if functional else ''}")
                probe = self._run(probe)
                spatial = list(probe.shape[2:])
        flat = rng.choice(["module", "torch.flatten", "view"])
        self.plan.append({"module": self._module(nn.Flatten()), "torch.flatten": lambda h: torch.flatten(h, 1),
                          "view": lambda h: h.view(h.size(0), -1)}[flat])
        width = probe[0].numel()
        hidden = rng.choice([3, 5, 8])
        if rng.random() < 0.6:
            self._add(nn.Linear(width, hidden), "fc")
            if rng.random() < 0.3 and batch > 1:
                self._add(nn.BatchNorm1d(hidden), "bn1d")
            self._act(rng)
            width = hidden
        self._add(nn.Linear(width, 4), "fc-out")
        self.log_softmax = rng.random() < 0.3
        if self.log_softmax:
            if rng.random() < 0.5:
                self.plan.append(lambda h: F.log_softmax(h, dim=1))
            else:
                self._add(nn.LogSoftmax(dim=1), None)

    def _module(self, module):
        self.parts.append(module)
        return module

    def _add(self, module, label):
        self.plan.append(self._module(module))
        if label:
            self.description.append(label)

    def _act(self, rng):
        form, act = rng.choice(_CNN_ACTS)
        if form == "module":
            self._add(act(), None)
        elif form == "functional":
            self.plan.append(act)
        else:
            self.plan.append(lambda h: getattr(h, act)())

    def _run(self, probe):
        with torch.no_grad():
            training = [m.training for m in self.parts]
            for m in self.parts:
                m.eval()
            out = probe
            for step in self.plan[self._done if hasattr(self, "_done") else 0:]:
                out = step(out)
            for m, mode in zip(self.parts, training):
                m.train(mode)
        self._done = len(self.plan)
        self._probe_out = out
        return out

    def forward(self, x):
        for step in self.plan:
            x = step(x)
        return x


@dataclass
class CNNProblem:
    seed: int
    dims: int
    batch: int

    def __str__(self) -> str:
        return f"cnn{self.dims}d-s{self.seed}-B{self.batch}"

    def build(self, dtype=torch.float64):
        rng = random.Random(self.seed)
        torch.manual_seed(self.seed)
        channels = rng.randint(1, 3)
        spatial = [rng.randint(5, 9) for _ in range(self.dims)]
        model = RandomCNN(self.seed, self.dims, (channels, *spatial), self.batch).to(dtype)
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.randn((self.batch, channels, *spatial), generator=gen, dtype=dtype)
        target = torch.randint(0, 4, (self.batch,), generator=gen)
        return model, x, target, ("nll" if model.log_softmax else "cross_entropy")


def random_cnn_problems(n: int, seed: int = 4321) -> list[CNNProblem]:
    """``n`` random CNNs: Conv1d and Conv2d alternately, batch 1–9."""
    rng = random.Random(seed)
    return [CNNProblem(seed=seed + i, dims=1 + i % 2, batch=rng.randint(1, 9)) for i in range(n)]
