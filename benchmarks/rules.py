"""Every learning rule the benchmarks know, behind one interface (a name → a trainer factory).

A trainer owns the model's optimizer and exposes ``step(x, t) -> loss`` (a 0-dim tensor, no host
sync) and ``state_dict()`` / ``load_state_dict()``. Rules added to the library register here and
then appear in ``benchmarks.train``, ``benchmarks.speed`` and ``benchmarks.compare`` automatically.

The reference is ``sgd``: standard autograd + ``torch.optim.SGD``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import torch_fadjoint as tfa

__all__ = ["RULES", "register_rule", "build_trainer", "AutogradSGD", "RuleTrainer"]


def _autograd_loss(name: str, out, target, reduction: str):
    if name == "cross_entropy":
        return F.cross_entropy(out, target, reduction=reduction)
    if name == "mse":
        onehot = F.one_hot(target, out.shape[1]).to(out.dtype) if not target.is_floating_point() else target
        return F.mse_loss(out, onehot, reduction=reduction)
    if name == "nll":
        return F.nll_loss(out, target, reduction=reduction)
    raise ValueError(f"unknown loss {name!r}")


class AutogradSGD:
    """The reference: ``loss.backward()`` + ``torch.optim.SGD``."""

    uses_autograd = True

    def __init__(self, model: nn.Module, cfg: dict):
        self.model = model
        self.loss, self.reduction = cfg.get("loss", "cross_entropy"), cfg.get("reduction", "mean")
        self.opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg.get("momentum", 0.0),
                                   weight_decay=cfg.get("weight_decay", 0.0),
                                   nesterov=cfg.get("nesterov", False), foreach=cfg.get("foreach"))

    def step(self, x, target):
        out = self.model(x)
        loss = _autograd_loss(self.loss, out, target, self.reduction)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def state_dict(self):
        return self.opt.state_dict()

    def load_state_dict(self, state):
        self.opt.load_state_dict(state)


class RuleTrainer:
    """A ``tfa.optim`` optimizer on an ``FPropagation`` of the model: forward, then ``opt.step(t)``."""

    uses_autograd = False

    def __init__(self, model: nn.Module, make_optimizer: Callable[[tfa.FPropagation], torch.optim.Optimizer],
                 keep_pre_activations: bool = False):
        self.model = model
        self.net = tfa.FPropagation(model, keep_pre_activations=keep_pre_activations)
        self.opt = make_optimizer(self.net)

    @torch.no_grad()
    def step(self, x, target):
        self.net(x)
        return self.opt.step(target)

    def state_dict(self):
        return self.opt.state_dict()

    def load_state_dict(self, state):
        self.opt.load_state_dict(state)


def _sgd_kwargs(cfg: dict) -> dict:
    return dict(lr=cfg["lr"], momentum=cfg.get("momentum", 0.0), weight_decay=cfg.get("weight_decay", 0.0),
                nesterov=cfg.get("nesterov", False), foreach=cfg.get("foreach"),
                validate=cfg.get("validate", True), loss=cfg.get("loss", "cross_entropy"),
                loss_kwargs={"reduction": cfg.get("reduction", "mean")})


RULES: dict[str, Callable[[nn.Module, dict], object]] = {
    "sgd": AutogradSGD,
    "fadjoint": lambda model, cfg: RuleTrainer(model, lambda net: tfa.optim.FAdjoint(net, **_sgd_kwargs(cfg))),
}


def register_rule(name: str, factory: Callable[[nn.Module, dict], object]) -> None:
    """Add a rule to the benchmarks; refuses to replace an existing name."""
    if name in RULES:
        raise ValueError(f"rule {name!r} is already registered")
    RULES[name] = factory


def build_trainer(name: str, model: nn.Module, cfg: dict):
    """The trainer of rule ``name`` for ``model`` with hyper-parameters ``cfg``."""
    if name not in RULES:
        raise ValueError(f"unknown rule {name!r}; known: {', '.join(sorted(RULES))}")
    return RULES[name](model, cfg)
