"""Consequentialism and NLMS mini-batch updates on exact F-adjoint deltas (docs/maths.md §4).

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

Beyond Linear (§6.5, our reconstruction): a convolution is a Linear layer over unfolded patches, and
patch-NLMS divides Δ at each output position by that patch's energy ‖x̃_{b,p}‖² + δ (computed without
unfolding: X² correlated with a ones kernel, ``Layer.patch_energy``); with one output position it is
§4's per-sample NLMS exactly. The B × B solve would need a (B·P) × (B·P) system, so on convolutions
``mode="consequentialism"`` uses patch-NLMS and keeps the B × B solve for Linear layers (2-d inputs).
Normalisation layers get the plain F-adjoint feedback (no input Gram is defined for them).
The optimizer is ``tfa.optim.Consequentialism``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..layers import LayerRecord
from ..sweep import Rule, check_finite, check_out_adj, check_rule, param_names, sweep_grads

__all__ = ["ConsequentialismRule", "consequentialism_grads", "check_mode", "MODES"]

MODES = ("consequentialism", "nlms", "lms")


def check_mode(mode: str, delta, delta_rel: float) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if delta is not None and (isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < math.inf):
        raise ValueError(f"delta must be a finite number > 0 or None, got {delta!r}")
    if isinstance(delta_rel, bool) or not isinstance(delta_rel, (int, float)) or not 0 < delta_rel < math.inf:
        raise ValueError(f"delta_rel must be a finite number > 0, got {delta_rel!r}")


class ConsequentialismRule(Rule):
    """The F-adjoint sweep (§1.2) with the §4 / §6.5 parameter feedback; only ``param_feedback`` differs.

    Through the layer's verbs: ``patch_energy`` (‖x̃‖² per sample, or per patch of a convolution) and, for
    the B × B solve, ``gram`` (Linear with a 2-d input only); a layer with neither (normalisation) gets the
    plain F-adjoint feedback. ``failures`` collects each Cholesky ``info`` (0 = success) for one deferred
    check, ``failure_layers`` the layers' descriptions.
    """

    name = "consequentialism"

    def __init__(self, mode: str = "consequentialism", delta: float | None = None, delta_rel: float = 1e-3):
        check_mode(mode, delta, delta_rel)
        self.mode, self.delta, self.delta_rel = mode, delta, delta_rel
        self.name = mode
        self.failures: list[Tensor] = []
        self.failure_layers: list[str] = []

    def param_feedback(self, layer: LayerRecord, y_adj: Tensor) -> dict[Tensor, Tensor]:
        energy = None if self.mode == "lms" else layer.entry.patch_energy(layer)
        if energy is None:  # lms, or a layer with no input Gram (normalisation, §6.5): plain feedback
            return super().param_feedback(layer, y_adj)
        batch = y_adj.shape[0]
        delta = self.delta if self.delta is not None else self.delta_rel * energy.mean()
        gram = getattr(layer.entry, "gram", None)
        if self.mode == "consequentialism" and gram is not None and layer.x_prev.dim() == 2:
            kernel = gram(layer)                                                    # K = X̃ X̃ᵀ + δ I
            kernel.diagonal().add_(delta)
            factor, info = torch.linalg.cholesky_ex(kernel)
            self.failures.append(info)
            self.failure_layers.append(layer.describe)
            coef = torch.cholesky_solve(y_adj, factor)                              # K⁻¹ Δ  (B, n_k)
        else:                                                                       # NLMS, per sample or patch
            coef = y_adj / (energy + delta)
        return layer.entry.param_feedback(layer, coef * batch)                      # B Δᵀ K⁻¹ X̃ (weight, bias)


@torch.no_grad()
def consequentialism_grads(net, out_adj: Tensor, mode: str = "consequentialism",
                           delta: float | None = None, *, delta_rel: float = 1e-3, validate: bool = True,
                           retain_records: bool = False, on_failures=None) -> dict[Tensor, Tensor]:
    """The §4 update directions G^k, split into weight and bias grads, from X*^L (docs/maths.md §4).

    out_adj: (B, n_L) X*^L of the batch-mean loss; mode: "consequentialism" | "nlms" | "lms";
    delta: absolute δ, or None for ``delta_rel`` · mean_b ‖x̃_b‖² per layer.
    Returns {parameter: grad}; nothing is written. With ``validate`` a non-finite result or a
    failed Cholesky factorisation raises RuntimeError; without it, ``on_failures(infos, layers)`` (if given)
    receives each factorisation's ``info`` tensor (0 = success) to decide on the device.

    >>> from torch import nn
    >>> from torch_fadjoint import FPropagation
    >>> net = FPropagation(nn.Sequential(nn.Linear(3, 2)))
    >>> out = net(torch.randn(4, 3))
    >>> grads = consequentialism_grads(net, torch.ones(4, 2) / 4)
    >>> [tuple(g.shape) for g in grads.values()]
    [(2, 3), (2,)]
    """
    rule = ConsequentialismRule(mode, delta, delta_rel)
    layers = net.recorded_layers()
    check_out_adj(net, out_adj)
    check_rule(rule, layers)
    grads = sweep_grads(net, layers, out_adj, rule, what=f"{mode} gradients", validate=False,
                        retain_records=retain_records)
    if not validate and on_failures is not None and rule.failures:
        on_failures(rule.failures, rule.failure_layers)
    if validate:  # a failed factorisation first: it is the cause of any non-finite result
        if rule.failures:
            factored = torch.stack(rule.failures).eq(0)
            if net.reducer is not None:  # K is per rank: every rank must refuse alike
                factored = net.reducer.all_ranks(factored)
            if not bool(factored.all()):
                name = rule.failure_layers[int((~factored).nonzero()[0, 0])]
                raise RuntimeError(f"{name}: {mode}'s K = X̃X̃ᵀ + δI is not positive definite "
                                   "(δ too small?); nothing was changed")
        check_finite(list(grads.values()), f"{mode} gradients", names=lambda: param_names(net, grads))
    return grads


