"""Fuzz: 1000 random MLPs (depth, widths, activations, bias, dropout, loss, batch, dtype) exact against autograd.

The first 200 run in the default suite; all 1000 with ``-m slow``. float64 problems must agree to 1e-10
(relative to the largest gradient entry), float32 ones to 1e-5.
"""
import pytest
import torch

from .problems import random_problems
from .test_fadjoint import fadjoint_grads, max_relative_error

FUZZ = random_problems(1000, seed=2024)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def _dtype(problem):
    return torch.float32 if problem.seed % 3 == 0 else torch.float64


@pytest.mark.parametrize("problem", FUZZ[:200], ids=str)
def test_fuzz_default(problem):
    dtype = _dtype(problem)
    assert max_relative_error(*fadjoint_grads(problem, dtype)) <= TOLERANCE[dtype]


@pytest.mark.slow
@pytest.mark.parametrize("problem", FUZZ[200:], ids=str)
def test_fuzz_slow(problem):
    dtype = _dtype(problem)
    assert max_relative_error(*fadjoint_grads(problem, dtype)) <= TOLERANCE[dtype]
