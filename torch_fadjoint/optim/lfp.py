"""``LFP``: layer-wise feedback propagation's feedback + clipping + SGD (docs/maths.md §3, §6.4).

A thin optimizer over :mod:`torch_fadjoint.rules.lfp` (the ε-rule on the shared sweep).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..recorder import FPropagation
from ..rules.lfp import LFPRule, _get_reward, clip_grads_, lfp_backward, lfp_grads, lfp_reward
from .base import RuleOptimizer

__all__ = ["LFP", "lfp_grads", "lfp_backward"]


class LFP(RuleOptimizer):
    r"""LFP's feedback (docs/maths.md §3, §6.4) + global grad-norm clipping + ``torch.optim.SGD``'s update.

    .. code-block:: text

        input: recorded F-propagation with Y^k, targets t, reward r, ε, lr, μ, clip c
        R^L = r(X^L, t);  for k = L..1:  R^k ← R through the maps;  S^k = R^k / stab(Y^k);
                                          g_θ = −|θ| ⊙ J_θ^T S^k / B;  R^{k-1} = X^{k-1} ⊙ J_X^T S^k
        g ← g · min(1, c / (‖g‖ + 1e-6))          (clip_norm=c, global; None: off)
        θ ← SGD(θ, g)  (momentum, dampening, Nesterov, weight decay)

    Defaults are the reference code's (SGD lr 0.1, momentum 0.9, clip 3.0). The net is switched to
    ``keep_pre_activations=True``. ``step(target=t)`` writes g into ``.grad``, updates, and returns the
    mean cross-entropy of the recorded logits (logging only); ``step(out_adj=R)`` takes the reward R^L
    itself and returns None. ``eps``, ``clip_norm``, ``batch_reduction`` and ``norm_backward`` live in the
    parameter groups (read from the first at each step); ``reward`` is an attribute.

    >>> from torch import nn
    >>> import torch_fadjoint as tfa
    >>> model = nn.Sequential(nn.Linear(4, 8), tfa.nn.Step(), nn.Linear(8, 3))
    >>> net = FPropagation(model)
    >>> opt = LFP(net, lr=0.1, momentum=0.9)
    >>> out = net(torch.randn(16, 4))
    >>> loss = opt.step(target=torch.randint(0, 3, (16,)))
    """

    signal = "reward"

    def __init__(self, net: FPropagation, lr: float = 0.1, momentum: float = 0.9, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, reward="softmax", eps: float = 1e-6,
                 clip_norm: float | None = 3.0, batch_reduction: str = "mean", norm_backward=False,
                 foreach: bool | None = None, validate=None, params=None):
        defaults = self._sgd_defaults(lr, momentum, dampening, weight_decay, nesterov, False, foreach)
        LFPRule(eps, batch_reduction, norm_backward)  # validates them
        self._check_clip(clip_norm)
        defaults.update(eps=eps, clip_norm=clip_norm, batch_reduction=batch_reduction, norm_backward=norm_backward)
        self._reward_fn = _get_reward(reward)
        self.reward = reward
        super().__init__(net, params, defaults, loss="cross_entropy", validate=validate)
        net.keep_pre_activations = True

    @staticmethod
    def _check_clip(clip_norm) -> None:
        if clip_norm is not None and (isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float))
                                      or not 0 < clip_norm < math.inf):
            raise ValueError(f"clip_norm must be a finite number > 0 or None, got {clip_norm!r}")

    def _check_groups(self) -> None:
        super()._check_groups()
        group = self.param_groups[0]
        LFPRule(group["eps"], group["batch_reduction"], group["norm_backward"])
        self._check_clip(group["clip_norm"])

    def _top_signal(self, output: Tensor, target: Tensor):
        target = self._safe_target(output, target)
        reward = lfp_reward(output, target, self._reward_fn, validate=self._target_validate())
        return F.cross_entropy(output, target.long()), reward

    def _rule_step(self, reward: Tensor) -> None:
        group = self.param_groups[0]
        grads = lfp_grads(self.net, reward=reward, eps=group["eps"], batch_reduction=group["batch_reduction"],
                          norm_backward=group["norm_backward"], validate=False)  # the update bounds check them
        mine = self._group_of()
        grads = {p: g for p, g in grads.items() if p in mine}
        if group["clip_norm"] is not None:
            clip_grads_(list(grads.values()), group["clip_norm"])
        self._apply_sgd(grads)
