"""Modules for networks that only autograd-free rules can train (docs/maths.md §3.4).

``Step`` is the Heaviside activation of the LFP reference code: step(y) = 1 for y > 0, else 0.
Its derivative is 0 almost everywhere, so autograd, the F-adjoint and the equilibrium rule cannot
train through it: autograd raises at ``backward()`` and the F-adjoint rules refuse it by name.
``InputNoise`` adds Gaussian noise to its input in training mode (the LFP recipe adds N(0, 0.1²)
to each Linear's input); its derivative is 1.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Step", "InputNoise"]


class _StepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return (y > 0).to(y.dtype)

    @staticmethod
    def backward(ctx, x_adj):
        raise RuntimeError(
            "Step has derivative 0 almost everywhere: autograd cannot train through it; "
            "use tfa.optim.LFP (docs/maths.md §3)"
        )


class Step(nn.Module):
    """Heaviside step activation: X = 1[Y > 0] in Y's dtype. Shape preserved.

    >>> Step()(torch.tensor([-1.0, 0.0, 2.0]))
    tensor([0., 0., 1.])
    """

    def forward(self, y: Tensor) -> Tensor:
        if torch.is_grad_enabled() and y.requires_grad and not torch._C._is_torch_function_mode_enabled():
            return _StepFunction.apply(y)  # autograd: refused by name at backward()
        # as a torch op, so that FPropagation(graph=True)'s tape records it (tfa.steps: LFP passes the reward)
        return torch.heaviside(y, y.new_zeros(()))


class InputNoise(nn.Module):
    """Adds N(0, std²) noise in training mode; the identity in eval mode. Shape preserved.

    >>> InputNoise(0.1).eval()(torch.ones(2))
    tensor([1., 1.])
    """

    def __init__(self, std: float = 0.1):
        super().__init__()
        if not std >= 0:
            raise ValueError(f"std must be >= 0, got {std}")
        self.std = std

    def forward(self, y: Tensor) -> Tensor:
        if not self.training or self.std == 0:
            return y
        return y + self.std * torch.randn_like(y)

    def extra_repr(self) -> str:
        return f"std={self.std}"
