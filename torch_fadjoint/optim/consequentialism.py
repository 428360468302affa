"""``Consequentialism``: §4 / §6.5's normalised directions handed to any torch optimizer (docs/maths.md §4; on a
graph, §7.3).

A thin optimizer over :mod:`torch_fadjoint.rules.consequentialism`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..recorder import FPropagation
from ..rules.consequentialism import MODES, POSITIONS, check_mode, consequentialism_grads
from .delegating import BASES, DelegatingRuleOptimizer

__all__ = ["Consequentialism", "consequentialism_grads", "MODES", "POSITIONS", "BASES"]


class Consequentialism(DelegatingRuleOptimizer):
    r"""§4's normalised directions (patch-NLMS on convolutions, §6.5) handed to a torch optimizer.

    .. code-block:: text

        input: recorded F-propagation, target t, mode, δ, lr η, a base optimizer
        Δ^k = Y*^k  (the F-adjoint sweep, §1.2)
        G^k = B Δᵀ K⁻¹ X̃ (consequentialism, Linear) | B Σ Δ_pᵀ x̃_p / (‖x̃_p‖²+δ) (nlms; patches on convs)
              | Δᵀ X̃ (lms)
        p.grad ← G (weight part, bias column);  base.step()

    Args:
        net: the ``FPropagation`` of the model.
        lr: η (in NLMS units for the normalised modes: 0 < η < 2 is the stable range of plain steps).
        mode: "consequentialism" | "nlms" | "lms".
        base: "sgd" | "adam" | "adamw" | "rmsprop" | a ``torch.optim.Optimizer`` class.
        delta, delta_rel: δ absolute, or relative to the mean ‖x̃‖² (default 1e-3).
        positions: "sum" (§6.5 as written) | "mean": G ÷ P, the positions per sample a weight is applied at (a
            convolution's output positions, a Linear's tokens), so that η keeps §4's meaning (docs/maths.md §7.3);
            one position per sample is unchanged.
        **base_kwargs: the base optimizer's arguments (``momentum=0.9, nesterov=True``, ``betas=...``).

    ``mode``, ``delta``, ``delta_rel`` and ``positions`` live in the parameter groups (read from the first at each
    step). On a net that records a graph (``FPropagation(model, graph=True)``, or a model that is not a plain
    ``nn.Sequential``) the weight ops of the tape are normalised (docs/maths.md §7.3).
    ``step(target=t)`` returns the loss.

    >>> from torch import nn
    >>> net = FPropagation(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    >>> opt = Consequentialism(net, lr=0.5, base="sgd", momentum=0.9)
    >>> out = net(torch.randn(16, 4))
    >>> loss = opt.step(target=torch.randint(0, 3, (16,)))
    """

    def __init__(self, net: FPropagation, lr: float = 0.1, mode: str = "consequentialism", base="sgd", *,
                 delta: float | None = None, delta_rel: float = 1e-3, positions: str = "sum", loss="cross_entropy",
                 loss_kwargs: dict | None = None, validate=None, params=None, **base_kwargs):
        check_mode(mode, delta, delta_rel, positions)
        super().__init__(net, params, lr, base, base_kwargs, loss=loss, loss_kwargs=loss_kwargs, validate=validate,
                         rule_defaults=dict(mode=mode, delta=delta, delta_rel=delta_rel, positions=positions))

    def _check_groups(self) -> None:
        super()._check_groups()
        group = self.param_groups[0]
        check_mode(group["mode"], group["delta"], group["delta_rel"], group.get("positions", "sum"))

    def _rule_step(self, out_adj: Tensor) -> None:
        self.guard.commit()  # the signal's checks first: this rule decides its own with host reads
        group = self.param_groups[0]
        self._apply_base(consequentialism_grads(self.net, out_adj, group["mode"], group["delta"],
                                                delta_rel=group["delta_rel"], positions=group.get("positions", "sum"),
                                                validate=self.guard.checks_on_host,
                                                on_failures=self._flag_failures if self.guard.mode == "async" else None))

    def _flag_failures(self, infos, layers) -> None:
        """Async: a failed Cholesky factorisation (info ≠ 0) is a flag decided on the device."""
        self.guard.require(torch.stack(infos).eq(0), "consequentialism", [
            f"{layer}: K = X̃X̃ᵀ + δI is not positive definite (δ too small?)" for layer in layers])
