"""Small models and seeded data that many test files build the same way.

The sizes, activations and seeds stay in each test file, next to the property they were chosen for
(``mlp((6, 9, 7, 4), [nn.Sigmoid, nn.Tanh], last=nn.Sigmoid)`` for the equilibrium's smooth maps, ReLU
nets for LFP, a Step net where σ' is 0); this module only builds them::

    mlp((6, 9, 7, 4), nn.Tanh, seed=0)              Linear → Tanh → Linear → Tanh → Linear, float64
    labelled(5, 6, 4, seed=1)                       x ~ N(0, 1) of shape (5, 6), class targets in [0, 4)
    labelled_batches(3, 10, (1, 8, 8), 5, seed=2)   three such batches from one generator
    recorded(model, x)                              an FPropagation after one no-grad forward of x

Every function draws from its own ``torch.Generator`` (data) or seeds torch's generator first (``seed=``
of :func:`mlp`), so a test sees the same numbers whatever ran before it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

import torch_fadjoint as tfa

DT = torch.float64


def mlp(widths: Sequence[int], act: Callable[[], nn.Module] | Sequence[Callable[[], nn.Module]] = nn.ReLU, *,
        bias: bool = True, last: Callable[[], nn.Module] | None = None, seed: int | None = None,
        dtype: torch.dtype = DT, device=None) -> nn.Sequential:
    """``Linear(widths[0], widths[1]) → act → … → Linear(widths[-2], widths[-1])`` [→ ``last``].

    ``act``: one module factory for every hidden layer, or one per hidden layer (``[nn.Tanh, nn.ReLU]``);
    ``seed``: ``torch.manual_seed(seed)`` before the layers are made (their default init), else torch's
    generator as it is."""
    hidden = len(widths) - 2
    acts = list(act) if isinstance(act, Sequence) else [act] * hidden
    if len(acts) != hidden:
        raise ValueError(f"{len(acts)} activations for {hidden} hidden layers")
    if seed is not None:
        torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(n_in, n_out, bias=bias))
        if i < hidden:
            layers.append(acts[i]())
    if last is not None:
        layers.append(last())
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


def labelled_batches(n: int, batch: int, shape: int | Sequence[int], classes: int, *, seed: int,
                     dtype: torch.dtype = DT, scale: float | None = None, device=None) -> list[tuple]:
    """``n`` pairs (x, t), drawn in turn from ``torch.Generator().manual_seed(seed)``: x ~ N(0, 1) (times
    ``scale``) of shape ``(batch, *shape)`` and ``dtype``, t uniform class indices in [0, classes)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    pairs = []
    for _ in range(n):
        x = torch.randn((batch, *shape), generator=gen, dtype=dtype)
        if scale is not None:
            x = x * scale
        t = torch.randint(0, classes, (batch,), generator=gen)
        pairs.append((x, t) if device is None else (x.to(device), t.to(device)))
    return pairs


def labelled(batch: int, shape: int | Sequence[int], classes: int, *, seed: int, dtype: torch.dtype = DT,
             scale: float | None = None, device=None) -> tuple:
    """One pair (x, t) of :func:`labelled_batches`."""
    return labelled_batches(1, batch, shape, classes, seed=seed, dtype=dtype, scale=scale, device=device)[0]


def recorded(model: nn.Module, x: torch.Tensor, **kwargs) -> tfa.FPropagation:
    """``tfa.FPropagation(model, **kwargs)`` after one forward of ``x`` under ``torch.no_grad()``; the chain recorder
    (``graph=False``) unless ``graph`` is given: the tests that use it check the rules of docs/maths.md §6."""
    kwargs.setdefault("graph", False)
    net = tfa.FPropagation(model, **kwargs)
    with torch.no_grad():
        net(x)
    return net
