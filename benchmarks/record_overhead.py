"""The tape's recording overhead on a language model (issue 21): recorded forward / plain forward, paired.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.record_overhead --out benchmarks/results/record_overhead

A decoder-only language model in plain torch (token embedding tied to the head, learned positions, pre-LayerNorm
blocks, causal ``F.scaled_dot_product_attention``, a GELU MLP, residuals: the model the issue names, at a small
GPT-like size) and, for comparison, torchvision's ResNet-18 (``benchmarks.models.build_resnet18_tv``, 32 × 32).
For each: ``forward`` = the model's own forward under ``torch.no_grad()``; ``record`` = ``FPropagation(model)``'s
forward (the tape; records dropped); beside them, autograd's own forward with grad enabled (its graph built and
dropped): what keeping the backward's tensors costs any recorder. The three run in a new random order at each
repetition (a fixed order favours some places: ``benchmarks.versions``), and the paired ratio (median and quartiles
of record / forward of one repetition) is the overhead; the issue's targets: ≤ 1.15 on the language model, ≤ 1.05
on ResNet-18. The record is also divided by autograd's forward of its repetition: the part of the overhead that is
the tape's own, not the price of keeping what the backward reads. The machine (a shared 2-core VM) is named in the report with its load average.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import torch_fadjoint as tfa

from .models import build_resnet18_tv


class LanguageModel(nn.Module):
    """Decoder-only, pre-LayerNorm; the head is the token embedding (tied)."""

    def __init__(self, vocab: int = 512, dim: int = 128, context: int = 64, blocks: int = 4, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Parameter(torch.randn(context, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(n1=nn.LayerNorm(dim), qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim),
                               n2=nn.LayerNorm(dim), up=nn.Linear(dim, 4 * dim), down=nn.Linear(4 * dim, dim)))
            for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        batch, length = ids.shape
        h = self.tokens(ids) + self.positions[:length]
        for block in self.blocks:
            q, k, v = block["qkv"](block["n1"](h)).chunk(3, dim=-1)
            q, k, v = (t.reshape(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, length, -1)
            h = h + block["proj"](attended)
            h = h + block["down"](F.gelu(block["up"](block["n2"](h))))
        return F.linear(self.norm(h), self.tokens.weight).flatten(0, 1)  # (B·T, vocab)


def paired(model: nn.Module, x: torch.Tensor, repeats: int, warmup: int = 3) -> dict:
    net = tfa.FPropagation(model)
    assert net.graph, "the tape"
    with torch.no_grad():
        net(x)
    ops = len(net._tape.ops)
    net.clear()

    def forward():
        with torch.no_grad():
            model(x)

    def record():
        with torch.no_grad():
            net(x)
        net.clear()

    def autograd_forward():  # what autograd's own forward costs over the plain one (its graph built, then dropped)
        with net.paused(), torch.enable_grad():
            model(x)

    for _ in range(warmup):
        forward(), record(), autograd_forward()
    plain, recorded, graph = [], [], []
    order, shuffle = [(forward, plain), (record, recorded), (autograd_forward, graph)], random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for fn, into in order:
            start = time.perf_counter()
            fn()
            into.append(time.perf_counter() - start)

    def ratio(times, reference=plain):
        ratios = sorted(r / p for r, p in zip(times, reference))
        quartiles = statistics.quantiles(ratios, n=4)
        return statistics.median(ratios), quartiles[0], quartiles[2]

    (r, q1, q3), (a, _, _), (own, own_q1, own_q3) = ratio(recorded), ratio(graph), ratio(recorded, graph)
    return dict(forward_ms=1e3 * statistics.median(plain), record_ms=1e3 * statistics.median(recorded),
                autograd_ms=1e3 * statistics.median(graph), ratio=r, q1=q1, q3=q3, autograd_ratio=a, ops=ops,
                own=own, own_q1=own_q1, own_q3=own_q3)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/record_overhead")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    lm = LanguageModel().train()
    ids = torch.randint(0, 512, (16, 64))
    rows.append(("language model (4 blocks, d 128, 16 × 64 tokens)", paired(lm, ids, args.repeats), 1.15))
    resnet = build_resnet18_tv().train()
    images = torch.randn(128, 3, 32, 32)
    rows.append(("torchvision resnet18 (128 × 3 × 32 × 32)", paired(resnet, images, max(10, args.repeats // 3)), 1.05))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = ["# Recording overhead of the tape: recorded forward / plain forward under no_grad", "",
             "Command: `OMP_WAIT_POLICY=PASSIVE python -m benchmarks.record_overhead --out " + str(out) + "`  ",
             f"Machine: CPU, torch {torch.__version__}, {args.threads} threads, float32, train mode; load average "
             f"{load:.1f} when it ended (a shared 2-core VM: read the paired ratio).", "",
             "| model | plain forward ms | recorded forward ms | recorded ops | paired ratio [q1, q3] | target | verdict "
             "| autograd's forward (grad enabled) / plain | recorded / autograd's forward, paired [q1, q3] |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r, target in rows:
        verdict = "met" if r["ratio"] <= target else "MISSED"
        lines.append(f"| {name} | {r['forward_ms']:.1f} | {r['record_ms']:.1f} | {r['ops']} | {r['ratio']:.3f} "
                     f"[{r['q1']:.3f}, {r['q3']:.3f}] | ≤ {target} | {verdict} | {r['autograd_ratio']:.3f} "
                     f"({r['autograd_ms']:.1f} ms) | {r['own']:.3f} [{r['own_q1']:.3f}, {r['own_q3']:.3f}] |")
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
