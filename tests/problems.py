"""Test problems: random MLPs × activations × losses × batch sizes (STYLE T1).

A ``Problem`` is a readable settings record; ``build(dtype)`` makes the model, input and target from
its own seed, so every test (and the autograd oracle) sees the same numbers.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
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
