"""Consequentialism and NLMS mini-batch updates on exact F-adjoint deltas (ALGORITHMS.md §4).

The backward signals are the F-adjoint's (§1.2): Δ^k = Y*^k (B, n_k). Each layer's update direction
is then normalised by the inputs it saw. With X̃ = [X^{k-1}, 1] (B, n_{k-1}+1; the bias folded in)
and δ > 0::

    lms               G^k = (Δ^k)ᵀ X̃                                         plain backprop
    nlms              G^k = B · (Δ^k)ᵀ diag(1 / (‖x̃_b‖² + δ)) X̃               per sample
    consequentialism  K = X̃ X̃ᵀ + δ I_B,   G^k = B · (Δ^k)ᵀ K⁻¹ X̃             affine projection
    grad_w = G^k[:, :-1],  grad_b = G^k[:, -1]

One plain step θ ← θ − η G moves the batch's pre-activations by ΔY = −η B X̃ X̃ᵀ K⁻¹ Δ → −η B Δ as
δ → 0 (B ≤ n_{k-1} + 1): every sample moves by its own per-sample delta B·Δ_b (Δ is the delta of the
batch-MEAN loss, hence the factor B, which puts η in NLMS units: stable for 0 < η < 2), with no
cross-talk between samples. NLMS does the same for each sample alone (exact at B = 1).

Choices (§4 names them; these are ours where it leaves room):

* δ = ``delta`` when given (absolute), else ``delta_rel`` · mean_b ‖x̃_b‖² per layer (default 1e-3),
  computed on the device without a host sync.
* K⁻¹Δ by Cholesky (``torch.linalg.cholesky_ex`` + ``cholesky_solve``), never an explicit inverse;
  with ``validate`` a failed factorisation raises (one host sync with the finite check).
* A Linear without bias uses X̃ = X^{k-1} (no column of ones).
* ``"lms"`` is NOT multiplied by B: it is exactly the F-adjoint gradient (a test checks it).
* K and ‖x̃‖² use X^{k-1}Xᵀ + 1 rather than forming [X, 1] (same numbers, no copy).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..recorder import FPropagation, LayerRecord
from ..sweep import Rule
from .base import (BASES, DelegatingRuleOptimizer, check_finite, check_out_adj, check_trainable, param_names,
                   sweep_grads)

__all__ = ["Consequentialism", "ConsequentialismRule", "consequentialism_grads", "MODES", "BASES"]

MODES = ("consequentialism", "nlms", "lms")


def _check_hyper(mode: str, delta, delta_rel: float) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if delta is not None and not delta > 0:
        raise ValueError(f"delta must be > 0 or None, got {delta}")
    if not delta_rel > 0:
        raise ValueError(f"delta_rel must be > 0, got {delta_rel}")


class ConsequentialismRule(Rule):
    """The F-adjoint sweep (§1.2) with the §4 parameter feedback; only ``param_feedback`` differs.

    ``failures`` collects each layer's Cholesky ``info`` (0 = success) for a deferred check, and
    ``failure_layers`` the qualified names of those layers (for the error message).
    """

    def __init__(self, mode: str = "consequentialism", delta: float | None = None, delta_rel: float = 1e-3):
        _check_hyper(mode, delta, delta_rel)
        self.mode, self.delta, self.delta_rel = mode, delta, delta_rel
        self.failures: list[Tensor] = []
        self.failure_layers: list[str] = []

    def param_feedback(self, layer: LayerRecord, y_adj: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.mode == "lms":
            return super().param_feedback(layer, y_adj)
        x_prev, has_bias = layer.x_prev, layer.module.bias is not None
        batch = x_prev.shape[0]
        sq_norms = x_prev.pow(2).sum(1) + (1.0 if has_bias else 0.0)            # ‖x̃_b‖²  (B,)
        delta = self.delta if self.delta is not None else self.delta_rel * sq_norms.mean()
        if self.mode == "nlms":
            coef = y_adj / (sq_norms + delta)[:, None]                             # diag(1/(‖x̃‖²+δ)) Δ
        else:
            gram = x_prev.mm(x_prev.t())                                           # K = X̃ X̃ᵀ + δ I
            if has_bias:
                gram += 1.0
            gram.diagonal().add_(delta)
            factor, info = torch.linalg.cholesky_ex(gram)
            self.failures.append(info)
            self.failure_layers.append(layer.name)
            coef = torch.cholesky_solve(y_adj, factor)                             # K⁻¹ Δ  (B, n_k)
        coef = coef * batch
        grad_w = coef.t().mm(x_prev)                                               # B Δᵀ K⁻¹ X
        grad_b = coef.sum(0) if has_bias else None                                 # bias column
        return grad_w, grad_b


@torch.no_grad()
def consequentialism_grads(net: FPropagation, out_adj: Tensor, mode: str = "consequentialism",
                           delta: float | None = None, *, delta_rel: float = 1e-3, validate: bool = True,
                           retain_records: bool = False) -> dict[Tensor, Tensor]:
    """The §4 update directions G^k, split into weight and bias grads, from X*^L (ALGORITHMS.md §4).

    out_adj: (B, n_L) X*^L of the batch-mean loss; mode: "consequentialism" | "nlms" | "lms";
    delta: absolute δ, or None for ``delta_rel`` · mean_b ‖x̃_b‖² per layer.
    Returns {parameter: grad}; nothing is written. With ``validate`` a non-finite result or a
    failed Cholesky factorisation raises RuntimeError.

    >>> from torch import nn
    >>> net = FPropagation(nn.Sequential(nn.Linear(3, 2)))
    >>> out = net(torch.randn(4, 3))
    >>> grads = consequentialism_grads(net, torch.ones(4, 2) / 4)
    >>> [tuple(g.shape) for g in grads.values()]
    [(2, 3), (2,)]
    """
    rule = ConsequentialismRule(mode, delta, delta_rel)
    layers = net.recorded_layers()
    check_out_adj(net, out_adj)
    check_trainable(layers, f"{mode} (F-adjoint deltas)")
    grads = sweep_grads(net, layers, out_adj, rule, what=f"{mode} gradients", validate=False,
                        retain_records=retain_records)
    if validate:  # a failed factorisation first: it is the cause of any non-finite result
        if rule.failures:
            factored = torch.stack(rule.failures).eq(0)
            if net.reducer is not None:  # K is per rank: every rank must refuse alike
                factored = net.reducer.all_ranks(factored)
            if not bool(factored.all()):
                name = rule.failure_layers[int((~factored).nonzero()[0, 0])]
                raise RuntimeError(f"{name} (Linear): {mode}'s K = X̃X̃ᵀ + δI is not positive definite "
                                   "(δ too small?); nothing was changed")
        check_finite(list(grads.values()), f"{mode} gradients", names=lambda: param_names(net, grads))
    return grads


class Consequentialism(DelegatingRuleOptimizer):
    r"""§4's normalised directions handed to a torch optimizer (SGD, momentum, Nesterov, RMSProp, Adam).

    .. code-block:: text

        input: recorded F-propagation, target t, mode, δ, lr η, a base optimizer
        Δ^k = Y*^k  (the F-adjoint sweep, §1.2)
        G^k = B Δᵀ K⁻¹ X̃ (consequentialism) | B Δᵀ diag(1/(‖x̃‖²+δ)) X̃ (nlms) | Δᵀ X̃ (lms)
        p.grad ← G (weight part, bias column);  base.step()

    Args:
        net: the ``FPropagation`` of the model.
        lr: η (in NLMS units for the normalised modes: 0 < η < 2 is the stable range of plain steps).
        mode: "consequentialism" | "nlms" | "lms".
        base: "sgd" | "adam" | "adamw" | "rmsprop" | a ``torch.optim.Optimizer`` class.
        delta, delta_rel: δ absolute, or relative to mean_b ‖x̃_b‖² (default 1e-3).
        **base_kwargs: the base optimizer's arguments (``momentum=0.9, nesterov=True``, ``betas=...``).

    The base optimizer (``self.inner``) shares this optimizer's ``param_groups`` list and ``state``
    dict, so schedulers and ``add_param_group`` change the lr it uses, and ``state_dict()`` /
    ``load_state_dict()`` carry its buffers (momentum, Adam moments). ``step(target)`` returns the loss.

    >>> from torch import nn
    >>> net = FPropagation(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    >>> opt = Consequentialism(net, lr=0.5, base="sgd", momentum=0.9)
    >>> out = net(torch.randn(16, 4))
    >>> loss = opt.step(torch.randint(0, 3, (16,)))
    """

    def __init__(self, net: FPropagation, lr: float = 0.1, mode: str = "consequentialism", base="sgd", *,
                 delta: float | None = None, delta_rel: float = 1e-3, loss="cross_entropy",
                 loss_kwargs: dict | None = None, validate: bool = True, params=None, **base_kwargs):
        _check_hyper(mode, delta, delta_rel)
        self.mode, self.delta, self.delta_rel = mode, delta, delta_rel
        super().__init__(net, params, lr, base, base_kwargs, loss=loss, loss_kwargs=loss_kwargs, validate=validate)

    def _rule_step(self, out_adj: Tensor) -> None:
        grads = consequentialism_grads(self.net, out_adj, self.mode, self.delta, delta_rel=self.delta_rel,
                                       validate=self.validate)
        self._apply_base(grads)
