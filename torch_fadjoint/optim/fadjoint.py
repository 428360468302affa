"""The F-adjoint: backpropagation as a two-step rule, exact (ALGORITHMS.md §1.2, §1.4).

Given X*^L = ∂J/∂X^L, for k = L..1::

    Y*^k     = X*^k ⊙ σ_k'(Y^k)          step 1, through the activation        (B, n_k)
    X*^{k-1} = Y*^k W^k                  step 2, through the weights (k > 1)   (B, n_{k-1})
    ∂J/∂W^k  = (Y*^k)ᵀ X^{k-1},  ∂J/∂b^k = Σ_batch Y*^k

These are autograd's own kernels in autograd's order (three GEMMs per layer, none for X*^0), so the
gradients equal ``loss.backward()``'s to rounding, with no graph and no autograd call.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..recorder import FPropagation
from ..sweep import Rule
from .base import RuleOptimizer, check_out_adj, check_trainable, sweep_grads

__all__ = ["FAdjoint", "fadjoint_grads"]

class _FAdjointRule(Rule):
    """The two-step rule with in-place adjoint buffers (the numbers are those of ``Rule``).

    Below the top layer X*^k is the fresh ``Y*^{k+1} W^{k+1}`` that ``through_linear`` just made, so
    step 1 writes Y*^k into that buffer (``Derivative.backward_``: autograd's own kernel, ``out=`` form)
    instead of allocating one more (B, n_k) tensor per module. X*^L belongs to the caller: never written.
    """

    def through_activations(self, layer, x_adj, top):
        if top:
            return super().through_activations(layer, x_adj, top)
        for act in reversed(layer.activations):
            x_adj = act.derivative.backward_(act.module, act.saved, x_adj)
        return x_adj


_FADJOINT = _FAdjointRule()


@torch.no_grad()
def fadjoint_grads(net: FPropagation, out_adj: Tensor, *, validate: bool = True,
                   retain_records: bool = False) -> dict[Tensor, Tensor]:
    """∂J/∂θ for every parameter of the recorded layers, from X*^L (ALGORITHMS.md §1.2).

    out_adj: (B, n_L) on the output's device and dtype. Returns {parameter: gradient}.
    Nothing is written; with ``validate`` a non-finite gradient raises RuntimeError.

    >>> from torch import nn
    >>> net = FPropagation(nn.Sequential(nn.Linear(3, 2)))
    >>> out = net(torch.ones(4, 3))
    >>> grads = fadjoint_grads(net, torch.ones(4, 2))
    >>> [tuple(g.shape) for g in grads.values()]
    [(2, 3), (2,)]
    """
    layers = net.recorded_layers()
    check_out_adj(net, out_adj)
    check_trainable(layers, "the F-adjoint")
    return sweep_grads(net, layers, out_adj, _FADJOINT, what="F-adjoint gradients", validate=validate,
                       retain_records=retain_records)


class FAdjoint(RuleOptimizer):
    r"""F-adjoint sweep + ``torch.optim.SGD``'s update (ALGORITHMS.md §1.2–§1.4).

    .. code-block:: text

        input: recorded F-propagation (X^{k-1}, Y^k, X^k), target t, lr, μ, dampening, λ, nesterov
        X*^L = ∂J/∂X^L (closed form, §1.3)
        for k = L..1:  Y*^k = X*^k ⊙ σ'(Y^k);  g_W = (Y*^k)ᵀ X^{k-1};  g_b = Σ Y*^k;  X*^{k-1} = Y*^k W^k
        θ ← SGD(θ, g)  (momentum, dampening, Nesterov, weight decay, maximize)

    ``step`` writes g into ``.grad`` (replacing what was there) and updates; it equals
    ``opt.zero_grad(); loss.backward(); torch.optim.SGD.step()`` to rounding.

    >>> from torch import nn
    >>> net = FPropagation(nn.Sequential(nn.Linear(4, 3)))
    >>> opt = FAdjoint(net, lr=0.1, momentum=0.9)
    >>> out = net(torch.randn(8, 4))
    >>> loss = opt.step(torch.randint(0, 3, (8,)))
    """

    def __init__(self, net: FPropagation, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, loss="cross_entropy", loss_kwargs: dict | None = None,
                 validate: bool = True, params=None):
        defaults = self._sgd_defaults(lr, momentum, dampening, weight_decay, nesterov, maximize, foreach)
        super().__init__(net, params, defaults, loss=loss, loss_kwargs=loss_kwargs, validate=validate)

    def _rule_step(self, out_adj: Tensor) -> None:
        grads = fadjoint_grads(self.net, out_adj, validate=self.validate)
        self._apply_sgd(grads)
