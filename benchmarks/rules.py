"""Every learning rule the benchmarks know, behind one interface (a name → a trainer factory).

A trainer owns the model's optimizer and exposes ``step(x, t) -> loss`` (a 0-dim tensor, no host
sync) and ``state_dict()`` / ``load_state_dict()``. Rules added to the library register here and
then appear in ``benchmarks.train``, ``benchmarks.speed`` and ``benchmarks.compare`` automatically.

The reference is ``sgd``: standard autograd + ``torch.optim.SGD``. ``autograd`` and ``fadjoint_dropin`` take
the torch optimizer named by ``optimizer`` (``sgd`` | ``adadelta`` | ``adam``): ``loss.backward()``, resp.
``FPropagation`` + ``tfa.losses`` + ``net.adjoint`` (the drop-in swap of a stock loop, README (a)), then the
same ``opt.step()`` — pytorch/examples' MNIST recipe (Adadelta) in ``configs/mnist_cnn.toml``.

``graph = true`` in a config: every library rule's ``FPropagation`` records the user's whole graph on a tape
(``FPropagation(model, graph=True)``, docs/maths.md §7.1), which residual nets (``resnet20``, ``resnet18_tv``)
need; the autograd rules ignore it. Only the F-adjoint steps on a tape for now (``fadjoint``,
``fadjoint_unchecked``, ``fadjoint_dropin``); the other rules refuse it in one line.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import torch_fadjoint as tfa

__all__ = ["RULES", "register_rule", "build_trainer", "AutogradSGD", "DropInTrainer", "RuleTrainer",
           "torch_optimizer"]


def half_sse(x_out, target, reduction: str = "sum", validate: bool = True):
    """½ Σ‖X^L − T‖² and X*^L = X^L − T (÷ B with reduction="mean"): the reference code's loss (docs/maths.md §2.4).

    x_out: (B, n_L); target: (B,) class indices (T = onehot) or a float (B, n_L). With reduction "sum"
    and lr α this is exactly the reference's update (its X*^L = X^L − y, summed over the batch, no 1/B);
    torch's mse(reduction="sum") at lr α/2 gives the same F-adjoint step but NOT the same equilibrium
    step: the relaxation starts from X^L, which does not scale with X*^L, and the quirk's σ'(D) depends
    on D's scale.

    >>> half_sse(torch.tensor([[0.5, 0.5]]), torch.tensor([0]))
    (tensor(0.2500), tensor([[-0.5000,  0.5000]]))
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    onehot = F.one_hot(target.long(), x_out.shape[1]).to(x_out.dtype) if not target.is_floating_point() else target
    out_adj = x_out - onehot
    scale = 1.0 / x_out.shape[0] if reduction == "mean" else 1.0
    loss = 0.5 * scale * (out_adj * out_adj).sum()
    return loss, out_adj * scale if scale != 1.0 else out_adj


def _rule_loss(cfg: dict):
    """The loss for a tfa optimizer: a library loss name, or this module's ``half_sse``."""
    name = cfg.get("loss", "cross_entropy")
    return half_sse if name == "half_sse" else name


def _autograd_loss(name: str, out, target, reduction: str):
    if name == "half_sse":
        onehot = F.one_hot(target, out.shape[1]).to(out.dtype) if not target.is_floating_point() else target
        return 0.5 * F.mse_loss(out, onehot, reduction="sum") / (out.shape[0] if reduction == "mean" else 1)
    if name == "cross_entropy":
        return F.cross_entropy(out, target, reduction=reduction)
    if name == "mse":
        onehot = F.one_hot(target, out.shape[1]).to(out.dtype) if not target.is_floating_point() else target
        return F.mse_loss(out, onehot, reduction=reduction)
    if name == "nll":
        return F.nll_loss(out, target, reduction=reduction)
    raise ValueError(f"unknown loss {name!r}")


OPTIMIZERS = ("sgd", "adadelta", "adam")


def torch_optimizer(name: str, params, cfg: dict) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` (lr, momentum, weight_decay, nesterov), ``Adadelta`` or ``Adam`` (lr, weight_decay;
    torch's other defaults) with ``cfg``'s hyper-parameters."""
    common = dict(lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0), foreach=cfg.get("foreach"))
    if name == "sgd":
        return torch.optim.SGD(params, momentum=cfg.get("momentum", 0.0), nesterov=cfg.get("nesterov", False), **common)
    if name == "adadelta":
        return torch.optim.Adadelta(params, **common)
    if name == "adam":
        return torch.optim.Adam(params, **common)
    raise SystemExit(f"error: optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")


class AutogradSGD:
    """The reference: ``loss.backward()`` + ``torch.optim.SGD`` (or the torch optimizer named by ``optimizer``)."""

    uses_autograd = True

    def __init__(self, model: nn.Module, cfg: dict, optimizer: str = "sgd"):
        # under torchrun: DistributedDataParallel, the autograd reference for tfa.distributed
        self.model = nn.parallel.DistributedDataParallel(model) if _distributed() else model
        self.loss, self.reduction = cfg.get("loss", "cross_entropy"), cfg.get("reduction", "mean")
        self.opt = torch_optimizer(optimizer, model.parameters(), cfg)

    def loss_of(self, out, target):
        return _autograd_loss(self.loss, out, target, self.reduction)

    def step(self, x, target):
        out = self.model(x)
        loss = self.loss_of(out, target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def state_dict(self):
        return self.opt.state_dict()

    def load_state_dict(self, state):
        self.opt.load_state_dict(state)


class DropInTrainer:
    """The drop-in swap (README (a)): ``out = net(x)``; ``loss, out_adj = tfa.losses.<loss>(out, t)``;
    ``net.adjoint(out_adj)`` fills ``.grad`` as ``loss.backward()`` would; then any torch optimizer's step."""

    uses_autograd = False

    def __init__(self, model: nn.Module, cfg: dict):
        self.model = model
        self.net = tfa.FPropagation(model, process_group=dist.group.WORLD if _distributed() else None,
                                    graph=_graph(cfg))
        name = cfg.get("loss", "cross_entropy")
        self.loss = half_sse if name == "half_sse" else getattr(tfa.losses, name)
        self.reduction, self.validate = cfg.get("reduction", "mean"), cfg.get("validate", True)
        self.opt = torch_optimizer(cfg.get("optimizer", "sgd"), model.parameters(), cfg)

    @torch.no_grad()
    def step(self, x, target):
        out = self.net(x)
        loss, out_adj = self.loss(out, target, reduction=self.reduction, validate=self.validate)
        self.opt.zero_grad(set_to_none=True)
        self.net.adjoint(out_adj, validate=self.validate)
        self.opt.step()
        return loss

    def state_dict(self):
        return self.opt.state_dict()

    def load_state_dict(self, state):
        self.opt.load_state_dict(state)


class RuleTrainer:
    """A ``tfa.optim`` optimizer on an ``FPropagation`` of the model: forward, then ``opt.step(target=t)``.

    ``graph``: ``FPropagation(model, graph=True)``, the whole graph on a tape (the config key ``graph``)."""

    uses_autograd = False

    def __init__(self, model: nn.Module, make_optimizer: Callable[[tfa.FPropagation], torch.optim.Optimizer],
                 keep_pre_activations: bool = False, graph: bool = False):
        self.model = model
        self.net = tfa.FPropagation(model, keep_pre_activations=keep_pre_activations,
                                    process_group=dist.group.WORLD if _distributed() else None, graph=graph)
        self.opt = make_optimizer(self.net)

    @torch.no_grad()
    def step(self, x, target):
        self.net(x)
        return self.opt.step(target=target)

    def state_dict(self):
        return self.opt.state_dict()

    def load_state_dict(self, state):
        self.opt.load_state_dict(state)


def _graph(cfg: dict) -> bool:
    """The config key ``graph``: every library rule's ``FPropagation`` records the whole graph on a tape
    (``tfa.tape``, docs/maths.md §7.1). Only the F-adjoint steps on it for now (``fadjoint``, ``fadjoint_unchecked``,
    ``fadjoint_dropin``); the other rules refuse it in one line at their first step."""
    return bool(cfg.get("graph", False))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sgd_kwargs(cfg: dict) -> dict:
    return dict(lr=cfg["lr"], momentum=cfg.get("momentum", 0.0), weight_decay=cfg.get("weight_decay", 0.0),
                nesterov=cfg.get("nesterov", False), foreach=cfg.get("foreach"),
                validate=cfg.get("validate", True), loss=_rule_loss(cfg),
                loss_kwargs={"reduction": cfg.get("reduction", "mean")})


def _equilibrium_kwargs(cfg: dict, reference_output_derivative: bool | None = None) -> dict:
    """§2 hyper-parameters from cfg: tau, steps (< 0: equilibrium, None), sequential, relax_init, quirk.

    The relaxation's start is read from ``relax_init`` ("forward" | "zero"): ``init`` already names the
    weight initialisation in ``benchmarks.train``.
    """
    steps = cfg.get("steps", 100)
    quirk = cfg.get("reference_output_derivative", False) if reference_output_derivative is None \
        else reference_output_derivative
    return dict(tau=cfg.get("tau", 0.1), steps=None if steps is None or steps < 0 else steps,
                relaxation=cfg.get("relaxation", "closed_form"),
                sequential=cfg.get("sequential", True), init=cfg.get("relax_init", "forward"),
                reference_output_derivative=quirk)


def _lfp(model: nn.Module, cfg: dict) -> RuleTrainer:
    """LFP (§3): SGD + momentum on −F/B with global clipping (``clip_norm``, ≤ 0 switches it off)."""
    clip = cfg.get("clip_norm", 3.0)
    return RuleTrainer(model, lambda net: tfa.optim.LFP(
        net, lr=cfg["lr"], momentum=cfg.get("momentum", 0.0), weight_decay=cfg.get("weight_decay", 0.0),
        nesterov=cfg.get("nesterov", False), reward=cfg.get("reward", "softmax"), eps=cfg.get("eps", 1e-6),
        batch_reduction=cfg.get("batch_reduction", "mean"),
        clip_norm=clip if clip and clip > 0 else None, foreach=cfg.get("foreach"),
        validate=cfg.get("validate", True)), keep_pre_activations=True, graph=_graph(cfg))


def _consequentialism(mode: str) -> Callable[[nn.Module, dict], RuleTrainer]:
    """§4 with a base optimizer (``base`` = sgd | adam | …; momentum/nesterov go to SGD only); ``positions``
    "sum" | "mean" (docs/maths.md §7.3: "mean" divides a weight's feedback by its positions per sample)."""
    def factory(model: nn.Module, cfg: dict) -> RuleTrainer:
        base = cfg.get("base", "sgd")
        base_kwargs = {"weight_decay": cfg.get("weight_decay", 0.0)}
        if base == "sgd":
            base_kwargs.update(momentum=cfg.get("momentum", 0.0), nesterov=cfg.get("nesterov", False))
        return RuleTrainer(model, lambda net: tfa.optim.Consequentialism(
            net, lr=cfg["lr"], mode=mode, base=base, delta_rel=cfg.get("delta_rel", 1e-3),
            positions=cfg.get("positions", "sum"), loss=_rule_loss(cfg),
            loss_kwargs={"reduction": cfg.get("reduction", "mean")}, validate=cfg.get("validate", True),
            **base_kwargs), graph=_graph(cfg))
    return factory


def _inference(variant: str, base: str = "sgd") -> Callable[[nn.Module, dict], RuleTrainer]:
    """§5: il (base SGD at ``lr``), il_prox (its own step: SGD lr 1), il_prox_adam (Adam at ``lr``);
    ``momentum`` goes to the SGD base of both (il_prox with momentum: the rules3ep ``mom09`` run).

    ``gamma_top`` / ``gamma_bot`` < 0 mean the authors' defaults.
    """
    def factory(model: nn.Module, cfg: dict) -> RuleTrainer:
        gammas = {k: cfg[k] for k in ("gamma_top", "gamma_bot") if cfg.get(k, -1.0) >= 0}
        lr = 1.0 if (variant == "il_prox" and base == "sgd") else cfg["lr"]
        base_kwargs = {"momentum": cfg.get("momentum", 0.0)} if base == "sgd" else {}
        return RuleTrainer(model, lambda net: tfa.optim.InferenceLearning(
            net, lr=lr, variant=variant, T=cfg.get("T", 25), clamp=cfg.get("clamp", 1.0),
            alpha=cfg.get("alpha", 5.0), prox_eps=cfg.get("prox_eps", 0.25), base=base,
            validate=cfg.get("validate", True), **gammas, **base_kwargs), graph=_graph(cfg))
    return factory


RULES: dict[str, Callable[[nn.Module, dict], object]] = {
    "sgd": AutogradSGD,
    "autograd": lambda model, cfg: AutogradSGD(model, cfg, optimizer=cfg.get("optimizer", "sgd")),
    "fadjoint_dropin": DropInTrainer,
    "fadjoint": lambda model, cfg: RuleTrainer(model, lambda net: tfa.optim.FAdjoint(net, **_sgd_kwargs(cfg)),
                                               graph=_graph(cfg)),
    "fadjoint_fused": lambda model, cfg: RuleTrainer(model, lambda net: tfa.optim.FAdjoint(
        net, **_sgd_kwargs(cfg), fuse_update=True), graph=_graph(cfg)),
    # the same, whatever the config's validate: the default step's two opt-outs beside it (issue 20's table)
    "fadjoint_unchecked": lambda model, cfg: RuleTrainer(model, lambda net: tfa.optim.FAdjoint(
        net, **{**_sgd_kwargs(cfg), "validate": False}), graph=_graph(cfg)),
    "fadjoint_fused_unchecked": lambda model, cfg: RuleTrainer(model, lambda net: tfa.optim.FAdjoint(
        net, **{**_sgd_kwargs(cfg), "validate": False}, fuse_update=True), graph=_graph(cfg)),
    "equilibrium": lambda model, cfg: RuleTrainer(model, lambda net: tfa.optim.EquilibriumFAdjoint(
        net, **_sgd_kwargs(cfg), **_equilibrium_kwargs(cfg)), graph=_graph(cfg)),
    "equilibrium_ref": lambda model, cfg: RuleTrainer(model, lambda net: tfa.optim.EquilibriumFAdjoint(
        net, **_sgd_kwargs(cfg), **_equilibrium_kwargs(cfg, reference_output_derivative=True)), graph=_graph(cfg)),
    "equilibrium_euler": lambda model, cfg: RuleTrainer(model, lambda net: tfa.optim.EquilibriumFAdjoint(
        net, **_sgd_kwargs(cfg), **{**_equilibrium_kwargs(cfg), "relaxation": "euler"}), graph=_graph(cfg)),
    "lfp": _lfp,
    "consequentialism": _consequentialism("consequentialism"),
    "nlms": _consequentialism("nlms"),
    "il": _inference("il"),
    "il_prox": _inference("il_prox"),
    "il_prox_adam": _inference("il_prox", base="adam"),
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
