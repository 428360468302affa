"""The activation-derivative table: sigma'(Y) from what the forward recorded (ALGORITHMS.md §1.1).

One small class per module type, looked up by exact type (a subclass may change ``forward``).
Each entry says what the recorder keeps for it (``record``) and how an adjoint goes through it
(``backward``: Y*^k = X*^k ⊙ σ'(Y^k), step 1 of §1.2; ``backward_`` writes it into X*^k's
buffer when the caller owns it, with the same kernel).

The elementwise backward kernels are the ones autograd itself calls (``torch.ops.aten.*_backward``),
so the F-adjoint reproduces ``loss.backward()`` bit for bit where autograd uses the same kernel.
What each entry records is the cheapest sufficient quantity of the §1.1 table:

=====================  =====================================  ==========================
module                 σ'(Y) from the record                  record
=====================  =====================================  ==========================
ReLU                   1[Y > 0]                               X (the next layer's input)
LeakyReLU(a), a > 0    1 if Y > 0 else a                      X
Sigmoid                X (1 − X)                              X
Tanh                   1 − X²                                 X
ELU(α)                 1 if Y > 0 else X + α                  X
Softplus(β, thr)       sigmoid(βY) (1 where βY > thr)         Y
SiLU                   s(Y)(1 + Y(1 − s(Y)))                  Y
GELU (both)            Φ(Y) + Y φ(Y) / tanh form              Y
Identity, InputNoise   1                                      nothing
Dropout (train)        mask / (1 − p)                         the mask (drawn by the hook)
Flatten                reshape                                the input shape
LogSoftmax(dim=-1)     Y* = X* − softmax(Y) Σ X*  (row-wise)   X
Step (tfa.nn)          0 almost everywhere: not trainable     nothing
=====================  =====================================  ==========================

Users extend the table with :func:`register_derivative`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import nn as tfa_nn

__all__ = ["Derivative", "DERIVATIVES", "register_derivative", "derivative_for", "supported_modules"]

_aten = torch.ops.aten


class Derivative:
    """Base class of a derivative-table entry.

    ``saves`` names what ``record`` keeps: ``"input"`` (Y^k), ``"output"`` (X^k) or ``"none"``.
    Subclasses implement :meth:`backward`; :meth:`df` and :meth:`df_at` follow from it.
    ``elementwise`` is False for row-wise maps (LogSoftmax) and shape maps (Flatten);
    ``differentiable`` is False where σ' is 0 almost everywhere (Step).
    """

    saves = "output"
    elementwise = True
    differentiable = True

    def record(self, module: nn.Module, y: Tensor, x: Tensor):
        """What the forward hook keeps, given the module's input ``y`` and output ``x``."""
        if self.saves == "input":
            return y
        if self.saves == "output":
            return x
        return None

    def hook_output(self, module: nn.Module, y: Tensor, x: Tensor):
        """Return ``(output, record)``; an entry may replace the module's output (Dropout does)."""
        return x, self.record(module, y, x)

    def backward(self, module: nn.Module, saved, x_adj: Tensor) -> Tensor:
        """Y* = X* ⊙ σ'(Y), shape of ``x_adj`` (step 1 of ALGORITHMS.md §1.2)."""
        raise NotImplementedError

    def backward_(self, module: nn.Module, saved, x_adj: Tensor) -> Tensor:
        """Like :meth:`backward`, but may overwrite and return ``x_adj`` (the caller owns it).

        Entries with an ``out=`` form of autograd's kernel write into ``x_adj`` (the same kernel, so
        the result is bit-identical to :meth:`backward`); the default allocates, as ``backward``.
        """
        return self.backward(module, saved, x_adj)

    def df(self, module: nn.Module, saved) -> Tensor:
        """σ'(Y) itself, from the record (elementwise entries only)."""
        if not self.elementwise:
            raise TypeError(f"{type(module).__name__} is not elementwise: it has no σ'(Y) tensor")
        ref = saved if isinstance(saved, Tensor) else None
        if ref is None:
            raise TypeError(f"{type(module).__name__}: df needs a recorded tensor; use backward()")
        return self.backward(module, saved, torch.ones_like(ref))

    def df_at(self, module: nn.Module, y: Tensor) -> Tensor:
        """σ'(y) at an arbitrary point y (ALGORITHMS.md §2.4 needs σ' at the output drive)."""
        if self.saves == "none":
            return self.backward(module, None, torch.ones_like(y))
        x = module(y) if self.saves == "output" else None
        return self.df(module, y if self.saves == "input" else x)


class _Identity(Derivative):
    saves = "none"

    def backward(self, module, saved, x_adj):
        return x_adj

    def backward_(self, module, saved, x_adj):
        return x_adj


class _ReLU(Derivative):
    def backward(self, module, saved, x_adj):
        return _aten.threshold_backward(x_adj, saved, 0)

    def backward_(self, module, saved, x_adj):
        return _aten.threshold_backward.grad_input(x_adj, saved, 0, grad_input=x_adj)


class _LeakyReLU(Derivative):
    # The sign of X equals the sign of Y for a positive slope; autograd records Y, we record X.
    def record(self, module, y, x):
        if module.negative_slope <= 0:
            raise ValueError(
                f"LeakyReLU(negative_slope={module.negative_slope}): expected a positive slope "
                "(the record is X, whose sign must equal Y's)"
            )
        return x

    def backward(self, module, saved, x_adj):
        return _aten.leaky_relu_backward(x_adj, saved, module.negative_slope, True)

    def backward_(self, module, saved, x_adj):
        return _aten.leaky_relu_backward.grad_input(x_adj, saved, module.negative_slope, True, grad_input=x_adj)


class _Sigmoid(Derivative):
    def backward(self, module, saved, x_adj):
        return _aten.sigmoid_backward(x_adj, saved)

    def backward_(self, module, saved, x_adj):
        return _aten.sigmoid_backward.grad_input(x_adj, saved, grad_input=x_adj)


class _Tanh(Derivative):
    def backward(self, module, saved, x_adj):
        return _aten.tanh_backward(x_adj, saved)

    def backward_(self, module, saved, x_adj):
        return _aten.tanh_backward.grad_input(x_adj, saved, grad_input=x_adj)


class _ELU(Derivative):
    def backward(self, module, saved, x_adj):
        return _aten.elu_backward(x_adj, module.alpha, 1.0, 1.0, True, saved)

    def backward_(self, module, saved, x_adj):
        return _aten.elu_backward.grad_input(x_adj, module.alpha, 1.0, 1.0, True, saved, grad_input=x_adj)


class _Softplus(Derivative):
    saves = "input"

    def backward(self, module, saved, x_adj):
        return _aten.softplus_backward(x_adj, saved, module.beta, module.threshold)

    def backward_(self, module, saved, x_adj):
        return _aten.softplus_backward.grad_input(x_adj, saved, module.beta, module.threshold, grad_input=x_adj)


class _SiLU(Derivative):
    saves = "input"

    def backward(self, module, saved, x_adj):
        return _aten.silu_backward(x_adj, saved)

    def backward_(self, module, saved, x_adj):
        return _aten.silu_backward.grad_input(x_adj, saved, grad_input=x_adj)


class _GELU(Derivative):
    saves = "input"

    def backward(self, module, saved, x_adj):
        return _aten.gelu_backward(x_adj, saved, approximate=module.approximate)

    def backward_(self, module, saved, x_adj):
        return _aten.gelu_backward.grad_input(x_adj, saved, approximate=module.approximate, grad_input=x_adj)


class _LogSoftmax(Derivative):
    elementwise = False

    def record(self, module, y, x):
        if module.dim not in (-1, 1) or (module.dim == 1 and x.dim() != 2):
            raise ValueError(f"LogSoftmax(dim={module.dim}): expected dim=-1 over (batch, classes)")
        return x

    def backward(self, module, saved, x_adj):
        # Y* = X* - softmax(Y) Σ_j X*_j, with softmax(Y) = exp(X) (ALGORITHMS.md §1.3)
        return x_adj - saved.exp() * x_adj.sum(-1, keepdim=True)

    def df_at(self, module, y):
        raise TypeError("LogSoftmax is not elementwise: σ'(y) is a Jacobian, not a tensor")


class _Flatten(Derivative):
    saves = "shape"
    elementwise = False

    def record(self, module, y, x):
        return y.shape

    def backward(self, module, saved, x_adj):
        return x_adj.reshape(saved)


class _Dropout(Derivative):
    """Dropout in train mode: the hook draws the mask itself so that it can keep it.

    The module's own draw is discarded and the output is replaced by ``y · mask / (1 − p)``
    (same distribution; the mask cannot be read back from the module's output where Y = 0).
    In eval mode (or p = 0) Dropout is the identity and nothing is recorded.
    """

    saves = "mask"

    def hook_output(self, module, y, x):
        if not module.training or module.p == 0:
            return x, None
        if module.p == 1:
            return torch.zeros_like(y), torch.zeros_like(y)
        keep = torch.empty_like(y).bernoulli_(1 - module.p)
        scaled_mask = keep.div_(1 - module.p)
        return y * scaled_mask, scaled_mask

    def backward(self, module, saved, x_adj):
        return x_adj if saved is None else x_adj * saved

    def backward_(self, module, saved, x_adj):
        return x_adj if saved is None else x_adj.mul_(saved)

    def df_at(self, module, y):
        raise TypeError("Dropout's derivative is its recorded mask; there is no σ'(y) at a new point")


class _Step(Derivative):
    saves = "none"
    differentiable = False

    def backward(self, module, saved, x_adj):
        return torch.zeros_like(x_adj)


DERIVATIVES: dict[type, Derivative] = {
    nn.Identity: _Identity(),
    nn.ReLU: _ReLU(),
    nn.LeakyReLU: _LeakyReLU(),
    nn.Sigmoid: _Sigmoid(),
    nn.Tanh: _Tanh(),
    nn.ELU: _ELU(),
    nn.Softplus: _Softplus(),
    nn.SiLU: _SiLU(),
    nn.GELU: _GELU(),
    nn.LogSoftmax: _LogSoftmax(),
    nn.Flatten: _Flatten(),
    nn.Dropout: _Dropout(),
    tfa_nn.InputNoise: _Identity(),
    tfa_nn.Step: _Step(),
}


def register_derivative(module_type: type, derivative: Derivative, overwrite: bool = False) -> None:
    """Add a module type to the table (ALGORITHMS.md §1.1); refuses a silent overwrite.

    >>> class Square(nn.Module):
    ...     def forward(self, y): return y * y
    >>> class SquareDeriv(Derivative):
    ...     saves = "input"
    ...     def backward(self, module, y, x_adj): return 2 * y * x_adj
    >>> register_derivative(Square, SquareDeriv())
    """
    if not isinstance(derivative, Derivative):
        raise TypeError(f"expected a Derivative instance, got {type(derivative).__name__}")
    if module_type is nn.Linear:
        raise ValueError("nn.Linear is the layer itself, not an activation; it cannot be registered")
    if module_type in DERIVATIVES and not overwrite:
        raise ValueError(f"{module_type.__name__} already has a derivative; pass overwrite=True to replace it")
    DERIVATIVES[module_type] = derivative


def derivative_for(module: nn.Module) -> Derivative | None:
    """The table entry for ``module``'s exact type, or None."""
    return DERIVATIVES.get(type(module))


def supported_modules() -> str:
    """A comma-separated list of every supported module type, for error messages."""
    return ", ".join(["Linear"] + sorted(t.__name__ for t in DERIVATIVES))
