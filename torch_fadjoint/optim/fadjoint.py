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
from ..sweep import Rule, backward_sweep
from .base import (RuleOptimizer, check_finite, check_out_adj, check_trainable, fused_sgd_weight_update,
                   param_names, sgd_update, sweep_grads)

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


class _FactoredRule(_FAdjointRule):
    """The same sweep, but ∂J/∂W^k is left as its factors (Y*^k, X^{k-1}) for the fused update."""

    def param_feedback(self, layer, y_adj):
        return y_adj, (y_adj.sum(0) if layer.module.bias is not None else None)


_FADJOINT = _FAdjointRule()
_FACTORED = _FactoredRule()


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

    ``fuse_update=True`` folds each weight's update into the GEMM that would make its gradient
    (``fused_sgd_weight_update``: ``W.addmm_(Y*ᵀ, X, alpha=−lr)``, or ``addmm_`` into the momentum
    buffer): ∂J/∂W is never materialised and ``.grad`` is not written. W^k changes only after the
    sweep has read it for X*^{k-1}; the factors Y*^k and X^{k-1} wait until then (with ``validate``,
    until every layer's are checked).
    With ``validate`` each product is bounded before any write (B·max|Y*^k|·max|X^{k-1}| must be
    finite: NaN/Inf factors, or a product that could overflow, change nothing). Equal to the unfused
    step to rounding, not bit for bit. Not with Nesterov or a process group.

    >>> from torch import nn
    >>> net = FPropagation(nn.Sequential(nn.Linear(4, 3)))
    >>> opt = FAdjoint(net, lr=0.1, momentum=0.9)
    >>> out = net(torch.randn(8, 4))
    >>> loss = opt.step(torch.randint(0, 3, (8,)))
    """

    def __init__(self, net: FPropagation, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, loss="cross_entropy", loss_kwargs: dict | None = None,
                 validate: bool = True, fuse_update: bool = False, params=None):
        defaults = self._sgd_defaults(lr, momentum, dampening, weight_decay, nesterov, maximize, foreach)
        super().__init__(net, params, defaults, loss=loss, loss_kwargs=loss_kwargs, validate=validate)
        self.fuse_update = fuse_update
        if fuse_update:
            self._check_fusable()

    def _rule_step(self, out_adj: Tensor) -> None:
        if self.fuse_update:
            self._fused_step(out_adj)
            return
        grads = fadjoint_grads(self.net, out_adj, validate=self.validate)
        self._apply_sgd(grads)

    def _check_fusable(self) -> None:
        if self.net.reducer is not None:
            raise ValueError("fuse_update=True: not with a process_group (each rank's gradient must be "
                             "averaged before the update); use fuse_update=False")
        if any(group["nesterov"] for group in self.param_groups):
            raise ValueError("fuse_update=True: Nesterov momentum needs the gradient itself; "
                             "use nesterov=False or fuse_update=False")

    def _fused_step(self, out_adj: Tensor) -> None:
        """The sweep hands over (Y*^k, X^{k-1}, ∂J/∂b^k); ``_fused_layer_update`` forms Y*ᵀX in place.

        With ``validate`` every layer's factors are kept until all are checked (one host sync), then
        applied; without it layer k+1 is updated as soon as the sweep has read W^{k+1} (X*^k made), so
        at most one layer's factors wait (peak 0.20–0.75× autograd's at 784-1024-1024-10, batch 128–1024).
        """
        self._check_fusable()
        layers = self.net.recorded_layers()
        check_trainable(layers, "the F-adjoint")
        group_of = {param: group for group in self.param_groups for param in group["params"]}
        pending: list[tuple] = []

        def collect(layer, y_adj, grad_b):
            if pending and not self.validate:  # X*^{k} = Y*^{k+1} W^{k+1} is made: W^{k+1} may change
                self._fused_layer_update(group_of, *pending.pop())
            pending.append((layer, y_adj, layer.x_prev, grad_b))

        backward_sweep(layers, out_adj, _FACTORED, collect)
        self.net.clear()
        if self.validate:  # before any write: every update's bound and every bias gradient
            biased = [(layer, grad_b) for layer, _, _, grad_b in pending if grad_b is not None]
            tensors = [_product_bound(y_adj, x_prev) for _, y_adj, x_prev, _ in pending] + [g for _, g in biased]
            params = [layer.module.weight for layer, *_ in pending] + [layer.module.bias for layer, _ in biased]
            check_finite(tensors, "F-adjoint step", names=lambda: [
                name + (" (fused: B·max|Y*^k|·max|X^{k-1}| bounds its update)" if i < len(pending) else "")
                for i, name in enumerate(param_names(self.net, params))])
        for item in pending:
            self._fused_layer_update(group_of, *item)

    def _fused_layer_update(self, group_of, layer, y_adj, x_prev, grad_b) -> None:
        for param, update in ((layer.module.weight, (y_adj, x_prev)), (layer.module.bias, grad_b)):
            group = group_of.get(param)
            if group is None or update is None:  # not optimized by this optimizer, or no bias
                continue
            bufs = [self.state.get(param, {}).get("momentum_buffer")]
            hyper = dict(lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                         weight_decay=group["weight_decay"], maximize=group["maximize"], foreach=False)
            if param is layer.module.weight:
                fused_sgd_weight_update([param], [update], bufs, **hyper)
            else:
                sgd_update([param], [update], bufs, **hyper)
            if group["momentum"] != 0:
                self.state[param]["momentum_buffer"] = bufs[0]


def _product_bound(y_adj: Tensor, x_prev: Tensor) -> Tensor:
    """B · max|Y*| · max|X| in the factors' dtype, a bound on every entry of Y*ᵀX: finite when both factors
    are finite and no entry can overflow (it may refuse a product that would just fit, only when the bound
    itself leaves the dtype's range); two ``aminmax`` reads, no temporaries."""
    y_min, y_max = torch.aminmax(y_adj)
    x_min, x_max = torch.aminmax(x_prev)
    return torch.maximum(y_min.abs(), y_max.abs()) * torch.maximum(x_min.abs(), x_max.abs()) * y_adj.shape[0]
