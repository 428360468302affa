"""The F-adjoint on 320 random CNNs equals autograd (issue 14; docs/maths.md §6.2).

Conv1d and Conv2d with every geometry option (stride, padding ints / "same", dilation, groups, bias on
and off), max / average / adaptive pooling, BatchNorm in train and eval mode, LayerNorm, activations and
pooling as modules, functionals and tensor methods, three flattening forms, batch 1–9: float64 ≤ 1e-10
(absolute, on gradients of order 1e-1), float32 ≤ 1e-5; the BatchNorm running statistics the module
updates in train mode are the same with and without the recorder.
"""
import copy

import pytest
import torch

import torch_fadjoint as tfa

from . import oracles
from .problems import random_cnn_problems

PROBLEMS = random_cnn_problems(320)


def _grads(problem, dtype):
    model, x, target, loss = problem.build(dtype)
    twin = copy.deepcopy(model)
    want = oracles.autograd_grads(lambda: twin(x), dict(twin.named_parameters()), loss, target)
    net = tfa.FPropagation(model)
    out = net(x)
    _, out_adj = tfa.losses.get_loss(loss)(out, target)
    net.adjoint(out_adj)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    buffers = [(a, b) for a, b in zip(model.buffers(), twin.buffers())]
    return got, want, buffers


@pytest.mark.parametrize("problem", PROBLEMS, ids=str)
def test_fadjoint_equals_autograd_on_random_cnns(problem):
    got, want, buffers = _grads(problem, torch.float64)
    assert got.keys() == want.keys() and want
    scale = max(g.abs().max().item() for g in want.values())
    assert scale > 1e-6
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-10, msg=f"{problem} {name}")
    for mine, theirs in buffers:  # BatchNorm running statistics: updated by the module itself, identically
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("problem", PROBLEMS[::4], ids=str)
def test_fadjoint_equals_autograd_on_random_cnns_in_float32(problem):
    got, want, _ = _grads(problem, torch.float32)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=f"{problem} {name}")
