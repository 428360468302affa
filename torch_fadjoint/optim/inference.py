"""``InferenceLearning``: IL and IL-prox's local updates handed to a torch optimizer (docs/maths.md §5, §6.6, §7.5).

A thin optimizer over :mod:`torch_fadjoint.rules.inference`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..recorder import FPropagation
from ..rules.inference import IL_PROX_ON_GRAPHS, VARIANTS, _gammas, check_inference, inference_grads
from ..losses import _check_logits
from .base import _as_target
from .delegating import DelegatingRuleOptimizer

__all__ = ["InferenceLearning", "inference_grads", "VARIANTS"]


class InferenceLearning(DelegatingRuleOptimizer):
    r"""IL / IL-prox (docs/maths.md §5, §6.6): T inference iterations, then a local update via a base optimizer.

    .. code-block:: text

        input: recorded F-propagation (x, forward activities), targets t; T, γ_top, γ_bot, n | α, ε
        il:      clamp x̂^L, relax hidden x̂^k T times, g_θ = −J_θ^T(e^k ⊙ ρ'(a^k)) / B
        il_prox: proximal output target, relax ĥ^k T times, g_θ = −J_θ^T e^k / (B N^k)
        p.grad ← g;  base.step()        (il_prox: SGD lr = 1 is the authors' plain step)

    Args:
        net: the ``FPropagation`` of a chain of Linear / Conv layers, each followed by an elementwise
            activation and optionally pooling and views (they belong to the next layer's map, §6.6),
            ending in logits. Normalisation layers, Dropout and noise are refused. On a net that records the
            tape (``graph=True``, or a model that is not a chain), variant "il" runs on the graph (docs/maths.md
            §7.5: states on the inputs of the weight ops, BatchNorm allowed; the net is switched to
            ``keep_pre_activations=True``); "il_prox" claims the chain of a net left to choose and refuses a graph.
        lr: the base optimizer's learning rate (default 0.05 for il, 1.0 for il_prox).
        variant: "il" | "il_prox";  T: inference iterations;  gamma_top, gamma_bot: the γ's;
        clamp: n, the output clamp of il;  alpha, prox_eps: α and ε of il_prox;
        conv_details: PC_Prox_Conv.py's two differences (§6.6), off by default.
        base: "sgd" | "adam" | "adamw" | "rmsprop" | an Optimizer class;  **base_kwargs go to it.

    The rule's hyper-parameters live in the parameter groups (read from the first at each step).
    ``step(target=t)`` returns the cross-entropy of the recorded logits (logging; IL does not use it).

    >>> net = FPropagation(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    >>> opt = InferenceLearning(net, variant="il_prox", T=5)
    >>> out = net(torch.randn(16, 4))
    >>> loss = opt.step(target=torch.randint(0, 3, (16,)))
    """

    _RULE_KEYS = ("variant", "T", "gamma_top", "gamma_bot", "clamp", "alpha", "prox_eps", "conv_details")

    chain_only = False  # IL runs on the tape (docs/maths.md §7.5); IL-prox claims the chain (set per instance)

    def __init__(self, net: FPropagation, lr: float | None = None, variant: str = "il", *, T: int = 25,
                 gamma_top: float | None = None, gamma_bot: float | None = None, clamp: float = 1.0,
                 alpha: float = 5.0, prox_eps: float = 0.25, conv_details: bool = False, base="sgd",
                 validate=None, params=None, **base_kwargs):
        gamma_top, gamma_bot = _gammas(variant, gamma_top, gamma_bot)
        check_inference(variant, T, gamma_top, gamma_bot, clamp, alpha, prox_eps)
        lr = (0.05 if variant == "il" else 1.0) if lr is None else lr
        rule = dict(variant=variant, T=T, gamma_top=gamma_top, gamma_bot=gamma_bot, clamp=clamp, alpha=alpha,
                    prox_eps=prox_eps, conv_details=bool(conv_details))
        self.chain_only = variant == "il_prox"  # a net left to choose (graph=None) records a chain for IL-prox
        if self.chain_only and isinstance(net, FPropagation) and net.graph and getattr(net, "graph_choice", True):
            raise ValueError(IL_PROX_ON_GRAPHS)  # asked for a graph (graph=True): refused, saying why
        super().__init__(net, params, lr, base, base_kwargs, loss="cross_entropy", validate=validate,
                         rule_defaults=rule)
        if net.graph:
            net.keep_pre_activations = True  # IL re-runs the recorded ops from the kept values (§7.5)

    def _check_groups(self) -> None:
        super()._check_groups()
        group = self.param_groups[0]
        check_inference(*(group[k] for k in self._RULE_KEYS[:-1]))

    def _signal(self, target, out_adj):
        """IL's top signal is the target itself (the output is clamped to it): checked here, named."""
        if out_adj is not None:
            raise ValueError("InferenceLearning.step(): inference learning clamps the output to target=; it takes no "
                             "out_adj")
        if target is None:
            raise ValueError("step() needs target= (the (B,) class indices)")
        target = _as_target(target)
        output = self.net.loss_input()
        if output.shape[0] == 0:
            raise ValueError("step: the recorded forward has batch size 0; nothing to learn from")
        _check_logits(output, target, f"{self.param_groups[0]['variant']} target", self._target_validate())
        target = self._safe_target(output, target)
        return F.cross_entropy(output, target.long()), target

    def _rule_step(self, target: Tensor) -> None:
        self.guard.commit()  # the signal's checks first: this rule decides its own with host reads
        group = self.param_groups[0]
        self._apply_base(inference_grads(self.net, target, **{k: group[k] for k in self._RULE_KEYS},
                                         validate=self.guard.checks_on_host))
