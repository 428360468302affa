"""Random graphs on the tape against autograd (issue 21; docs/maths.md §7.1): residual additions (in place and
not), concatenations and splits, gates, layer scale, bare parameters, a matmul of two values, softmax, attention
with masks, broadcasting. Each graph is a small module whose forward draws its ops from a seeded generator; the
same seed gives the same graph. Float64 ≤ 1e-10, float32 ≤ 1e-5, relative to the larger of the parameter's own largest
entry and 1e-6 (float32: 1e-3) of the model's largest gradient: a key projection's bias before a softmax has an
analytically zero gradient, where both sides return rounding noise (~1e-17, float32 ~1e-9, of the model's scale).
The default suite runs 120 graphs; ``-m slow`` runs 1000.
"""
import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_fadjoint as tfa

from . import oracles

WIDTH = 6


class RandomGraph(nn.Module):
    """A stack of random blocks on (B, T, WIDTH) tokens; every block keeps the shape."""

    KINDS = ("residual", "residual_inplace", "concat_split", "gate", "layer_scale", "bare_bias", "matmul_values",
             "softmax_mix", "attention", "attention_mask", "broadcast_row", "sub_div")

    def __init__(self, seed: int, depth: int = 4):
        super().__init__()
        rng = random.Random(seed)
        self.kinds = [rng.choice(self.KINDS) for _ in range(depth)]
        self.inp = nn.Linear(3, WIDTH)
        self.lins = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(depth))
        self.lins2 = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(depth))
        self.scales = nn.ParameterList(nn.Parameter(torch.rand(WIDTH) + 0.5) for _ in range(depth))
        self.biases = nn.ParameterList(nn.Parameter(torch.randn(1, 1, WIDTH) * 0.1) for _ in range(depth))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, 4)
        self.act = rng.choice([torch.tanh, F.gelu, F.silu, torch.relu])

    def block(self, i: int, kind: str, h):
        lin, lin2, act = self.lins[i], self.lins2[i], self.act
        if kind == "residual":
            return h + act(lin(h))
        if kind == "residual_inplace":
            out = lin(h)
            out += h
            return act(out)
        if kind == "concat_split":
            a, b = torch.cat([act(lin(h)), lin2(h)], dim=-1).split(WIDTH, dim=-1)
            return a * 0.5 + b
        if kind == "gate":
            return act(lin(h)) * torch.sigmoid(lin2(h))
        if kind == "layer_scale":
            return h + self.scales[i] * act(lin(h))
        if kind == "bare_bias":
            return act(lin(h) + self.biases[i])
        if kind == "matmul_values":
            return h + torch.matmul(lin(h), lin2(h).transpose(-1, -2)) @ h / WIDTH
        if kind == "softmax_mix":
            return h + torch.softmax(lin(h), dim=-1) * lin2(h)
        if kind in ("attention", "attention_mask"):
            t = h.shape[1]
            mask = torch.ones(t, t, dtype=torch.bool).tril() if kind == "attention_mask" else None
            return h + F.scaled_dot_product_attention(lin(h), lin2(h), h, attn_mask=mask)
        if kind == "broadcast_row":
            return act(lin(h) - lin2(h).mean(dim=1, keepdim=True))
        return lin(h) - lin2(h) / (2.0 + torch.sigmoid(h))  # sub_div

    def forward(self, x):
        h = self.inp(x)
        for i, kind in enumerate(self.kinds):
            h = self.block(i, kind, h)
        return self.head(self.norm(h).sum(dim=1))


def _check(seed: int, dtype, tol: float):
    torch.manual_seed(seed)
    model = RandomGraph(seed).to(dtype)
    reference = copy.deepcopy(model)
    x = torch.randn(3, 4, 3, dtype=dtype)
    target = torch.randint(0, 4, (3,))
    want = oracles.autograd_grads(lambda: reference(x), dict(reference.named_parameters()), "cross_entropy", target)
    net = tfa.FPropagation(model, graph=True)
    net(x)
    net.backward("cross_entropy", target)
    scale = max(g.abs().max().item() for g in want.values())
    floor = 1e-6 if dtype == torch.float64 else 1e-3  # analytically zero gradients: rounding noise on both sides
    for name, p in model.named_parameters():
        g = want.get(name)
        if g is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        error = ((p.grad - g).abs().max() / max(g.abs().max().item(), floor * scale)).item()
        assert error <= tol, (seed, model.kinds, name, error)


@pytest.mark.parametrize("seed", range(120))
def test_random_graphs_equal_autograd_float64(seed):
    _check(seed, torch.float64, 1e-10)


@pytest.mark.parametrize("seed", range(0, 120, 6))
def test_random_graphs_equal_autograd_float32(seed):
    _check(seed, torch.float32, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1000))
def test_random_graphs_equal_autograd_float64_1000(seed):
    _check(seed + 10_000, torch.float64, 1e-10)
