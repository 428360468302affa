"""Every rule of the library as a small trainer, for the tests that run one case for every rule.

``build(rule, model, lr=0.1, momentum=0.9)`` is a :class:`Trainer`: ``model``, its ``net``
(``tfa.FPropagation``), the rule's ``opt``, and ``step(x, t)`` (a no-grad forward, then
``opt.step(target=t)``). The settings are those the benchmarks' registry (``benchmarks.rules``) gives each
rule, so a case that holds here holds for what the benchmarks run; tests/test_benchmark_rules.py checks
that the two build the same optimizers, step for step.

Settings read (the rest are the benchmarks' defaults): ``lr``, ``momentum``, ``loss`` (default
``cross_entropy``), ``validate`` (default True) and, for LFP, ``clip_norm`` (default 3.0; 0 switches it off).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

import torch_fadjoint as tfa


class Trainer:
    """A tfa optimizer on an FPropagation of ``model``."""

    def __init__(self, model: nn.Module, make_opt: Callable[[tfa.FPropagation], torch.optim.Optimizer],
                 keep_pre_activations: bool = False):
        self.model = model
        self.net = tfa.FPropagation(model, keep_pre_activations=keep_pre_activations)
        self.opt = make_opt(self.net)

    @torch.no_grad()
    def step(self, x, target):
        self.net(x)
        return self.opt.step(target=target)


def _sgd(cfg: dict) -> dict:
    return dict(lr=cfg["lr"], momentum=cfg.get("momentum", 0.0), weight_decay=0.0, nesterov=False, foreach=None,
                validate=cfg.get("validate", True), loss=cfg.get("loss", "cross_entropy"),
                loss_kwargs={"reduction": "mean"})


def _equilibrium(cfg: dict, sequential: bool) -> Callable:
    return lambda net: tfa.optim.EquilibriumFAdjoint(net, **_sgd(cfg), tau=0.1, steps=100, relaxation="closed_form",
                                                      sequential=sequential, init="forward",
                                                      reference_output_derivative=False)


def _lfp(cfg: dict) -> Callable:
    clip = cfg.get("clip_norm", 3.0)
    return lambda net: tfa.optim.LFP(net, lr=cfg["lr"], momentum=cfg.get("momentum", 0.0), weight_decay=0.0,
                                     nesterov=False, reward="softmax", eps=1e-6, batch_reduction="mean",
                                     clip_norm=clip if clip and clip > 0 else None, foreach=None,
                                     validate=cfg.get("validate", True))


def _consequentialism(cfg: dict, mode: str) -> Callable:
    return lambda net: tfa.optim.Consequentialism(
        net, lr=cfg["lr"], mode=mode, base="sgd", delta_rel=1e-3, loss=cfg.get("loss", "cross_entropy"),
        loss_kwargs={"reduction": "mean"}, validate=cfg.get("validate", True), weight_decay=0.0,
        momentum=cfg.get("momentum", 0.0), nesterov=False)


def _inference(cfg: dict, variant: str, base: str = "sgd") -> Callable:
    lr = 1.0 if (variant == "il_prox" and base == "sgd") else cfg["lr"]
    base_kwargs = {"momentum": cfg.get("momentum", 0.0)} if base == "sgd" else {}
    return lambda net: tfa.optim.InferenceLearning(net, lr=lr, variant=variant, T=25, clamp=1.0, alpha=5.0,
                                                   prox_eps=0.25, base=base, validate=cfg.get("validate", True),
                                                   **base_kwargs)


# rule → (cfg → a function of the net making the optimizer, keep_pre_activations)
RULES: dict[str, Callable[[dict], tuple[Callable, bool]]] = {
    "fadjoint": lambda cfg: (lambda net: tfa.optim.FAdjoint(net, **_sgd(cfg)), False),
    "fadjoint_fused": lambda cfg: (lambda net: tfa.optim.FAdjoint(net, **_sgd(cfg), fuse_update=True), False),
    "equilibrium": lambda cfg: (_equilibrium(cfg, sequential=True), False),
    "equilibrium_parallel": lambda cfg: (_equilibrium(cfg, sequential=False), False),
    "lfp": lambda cfg: (_lfp(cfg), True),
    "consequentialism": lambda cfg: (_consequentialism(cfg, "consequentialism"), False),
    "nlms": lambda cfg: (_consequentialism(cfg, "nlms"), False),
    "il": lambda cfg: (_inference(cfg, "il"), False),
    "il_prox": lambda cfg: (_inference(cfg, "il_prox"), False),
    "il_prox_adam": lambda cfg: (_inference(cfg, "il_prox", base="adam"), False),
}


def build(rule: str, model: nn.Module, **cfg) -> Trainer:
    """The trainer of ``rule`` for ``model`` with the settings ``cfg`` (``lr`` required)."""
    make_opt, keep_pre_activations = RULES[rule](cfg)
    return Trainer(model, make_opt, keep_pre_activations)
