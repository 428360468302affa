"""The equilibrium F-adjoint and its local, sequential learning rule (ALGORITHMS.md §2.1–§2.4).

Each layer's adjoint state is a leaky integrator (§2.1) started at the forward activation X^k and
driven by the layer above; after K forward-Euler steps of size τ (§2.2) it is, exactly,

    Z^k(K) = drive + f (start − drive),   f = (1 − τ)^K   (f = e^{−t} in continuous time t; f = 0 at
                                                           equilibrium: steps=None or t=inf)
    start  = X^k (init="forward") | 0 (init="zero")

so the fast path is one fused op per layer (``torch.lerp``), and ``relaxation="euler"`` runs the
explicit loop as the reference. Top-down, per layer (§2.2, §2.3)::

    k = L:   D = X*^L ⊙ σ_L'(Y^L)  (F-adjoint through the output activations);  Ỹ^L = Z^L(K) from drive D
             [reference_output_derivative=True: Ỹ^L = Z^L(K) ⊙ σ_L'(D), the reference code's quirk, §2.4]
    k < L:   drive = Ỹ^{k+1} W^{k+1};   Ỹ^k = Z^k(K) ⊙ σ_k'(Y^k)
    ∂W^k = (Ỹ^k)ᵀ X^{k-1},  ∂b^k = Σ_batch Ỹ^k;   sequential=True: update W^k, b^k NOW (SGD, §1.4), so
             layer k−1's drive already uses the new W^k

With f = 0, no quirk and ``sequential=False`` the step IS the F-adjoint step (bit for bit).

Deliberate differences from the reference code (``ahmadbougham/F-adjoint-Learning``, ``*_local.py``):
the default follows the equations (no σ'(D) factor; the quirk is an option), the loss is the
library's (pass ``out_adj=X^L − y`` and lr = α to reproduce its summed-batch squared error), biases
are separate parameters (same maths as a folded bias), and the update is torch.optim.SGD's (momentum,
weight decay) rather than plain SGD only.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..recorder import FPropagation, LayerRecord
from ..sweep import Rule, backward_sweep
from .base import RuleOptimizer, check_finite, check_out_adj, check_trainable, param_names, sweep_grads

__all__ = ["EquilibriumFAdjoint", "EquilibriumRule", "equilibrium_grads", "relaxation_factor"]

_INITS = ("forward", "zero")
_RELAXATIONS = ("closed_form", "euler")


def relaxation_factor(tau: float = 0.1, steps: int | None = 100, t: float | None = None) -> float:
    """f with Z(K) = drive + f (start − drive): (1 − τ)^K, e^{−t} if ``t`` is given, 0 at equilibrium.

    >>> relaxation_factor(0.5, 2), relaxation_factor(t=0.0), relaxation_factor(steps=None)
    (0.25, 1.0, 0.0)
    """
    _check_relaxation_args(tau, steps, t)
    if t is not None:
        return 0.0 if math.isinf(t) else math.exp(-t)
    if steps is None:
        return 0.0
    return (1.0 - tau) ** steps


def _check_relaxation_args(tau, steps, t) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"steps must be an int >= 0 or None (equilibrium), got {steps!r}")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0.0):
        raise ValueError(f"t must be a number >= 0 (inf: equilibrium) or None, got {t!r}")


class EquilibriumRule(Rule):
    """The §2.2 relaxation plugged into the shared sweep (STYLE P6); only ``through_activations`` differs.

    ``through_activations(layer k, signal, top)``: ``signal`` is X*^L (top) or the drive Ỹ^{k+1} W^{k+1};
    returns Ỹ^k (B, n_k). ``through_linear`` and ``param_feedback`` are the F-adjoint's (§1.2).
    """

    def __init__(self, tau: float = 0.1, steps: int | None = 100, t: float | None = None, init: str = "forward",
                 reference_output_derivative: bool = False, relaxation: str = "closed_form"):
        _check_relaxation_args(tau, steps, t)
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        if relaxation not in _RELAXATIONS:
            raise ValueError(f"relaxation must be one of {_RELAXATIONS}, got {relaxation!r}")
        if relaxation == "euler" and (t is not None or steps is None):
            raise ValueError("relaxation='euler' runs K = steps discrete steps: needs an int steps and t=None")
        self.tau, self.steps, self.t, self.init = tau, steps, t, init
        self.reference_output_derivative = bool(reference_output_derivative)
        self.relaxation = relaxation
        self.factor = relaxation_factor(tau, steps, t)

    def relax(self, x: Tensor, drive: Tensor) -> Tensor:
        """Z(K) from start X^k (or 0) under a constant drive (§2.2); shapes (B, n_k)."""
        if self.relaxation == "euler":
            state = x.clone() if self.init == "forward" else torch.zeros_like(drive)
            for _ in range(self.steps):
                state = state - self.tau * (state - drive)
            return state
        if self.factor == 0.0:
            return drive  # equilibrium: exactly the F-adjoint's signal
        if self.init == "zero":
            return drive * (1.0 - self.factor)
        return torch.lerp(drive, x, self.factor)  # drive + f (X^k − drive), one fused op

    def through_activations(self, layer: LayerRecord, signal: Tensor, top: bool) -> Tensor:
        if top:
            drive = super().through_activations(layer, signal, top)  # D = X*^L ⊙ σ_L'(Y^L)
            y_tilde = self.relax(layer.x, drive)
            if self.reference_output_derivative:
                for act in reversed(layer.activations):  # the extra σ_L'(D) of the reference code (§2.4)
                    y_tilde = y_tilde * act.derivative.df_at(act.module, drive)
            return y_tilde
        return super().through_activations(layer, self.relax(layer.x, signal), top)


def _check_shapes(layers: list[LayerRecord]) -> None:
    """The relaxed state lives where X^k does: every module after a Linear must be elementwise."""
    for layer in layers:
        for act in layer.activations:
            if not act.derivative.elementwise:
                raise TypeError(
                    f"{act.name} ({type(act.module).__name__}): the equilibrium F-adjoint relaxes X*^k in "
                    "the space of X^k; only elementwise modules may follow a Linear"
                )


@torch.no_grad()
def equilibrium_grads(net: FPropagation, out_adj: Tensor, *, tau: float = 0.1, steps: int | None = 100,
                      t: float | None = None, init: str = "forward", reference_output_derivative: bool = False,
                      relaxation: str = "closed_form", validate: bool = True,
                      retain_records: bool = False) -> dict[Tensor, Tensor]:
    """The non-sequential equilibrium feedback (ALGORITHMS.md §2.2, ``sequential=False``): {param: ∂}.

    out_adj: X*^L, (B, n_L). Every drive uses the current weights; nothing is written, so any torch
    optimizer can consume the result (``tfa.optim.base.accumulate_grads`` fills ``.grad``).
    With steps=None (or t=inf) and no quirk it equals ``fadjoint_grads`` bit for bit.

    >>> from torch import nn
    >>> net = FPropagation(nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2)))
    >>> out = net(torch.ones(5, 3))
    >>> grads = equilibrium_grads(net, torch.ones(5, 2), tau=0.1, steps=100)
    >>> [tuple(g.shape) for g in grads.values()]
    [(2, 4), (2,), (4, 3), (4,)]
    """
    rule = EquilibriumRule(tau, steps, t, init, reference_output_derivative, relaxation)
    layers = net.recorded_layers()
    check_out_adj(net, out_adj)
    check_trainable(layers, "the equilibrium F-adjoint")
    _check_shapes(layers)
    return sweep_grads(net, layers, out_adj, rule, what="equilibrium F-adjoint gradients", validate=validate,
                       retain_records=retain_records)


class EquilibriumFAdjoint(RuleOptimizer):
    r"""The local learning rule of the equilibrium F-adjoint (ALGORITHMS.md §2.3) with SGD's update (§1.4).

    .. code-block:: text

        input: recorded F-propagation, target, lr, μ, dampening, λ, nesterov; τ, K (or t), init
        f = (1 − τ)^K | e^{−t} | 0;   signal = X*^L (closed form, §1.3)
        for k = L..1:
            drive = X*^L ⊙ σ_L'(Y^L) (k = L) | Ỹ^{k+1} W^{k+1} (k < L, W^{k+1} already updated)
            Z = drive + f (X^k − drive)                                       (start 0 with init="zero")
            Ỹ^k = Z (k = L; ⊙ σ_L'(drive) with reference_output_derivative) | Z ⊙ σ_k'(Y^k) (k < L)
            g_W = (Ỹ^k)ᵀ X^{k-1},  g_b = Σ Ỹ^k;   W^k, b^k ← SGD(W^k, b^k; g)   (sequential)
        sequential=False: every drive uses the old weights, then all layers update together.

    Args (beyond FAdjoint's): ``tau`` ∈ (0, 1], ``steps`` K ≥ 0 (None: equilibrium), ``t`` ≥ 0 continuous
    time (overrides tau/steps; inf: equilibrium), ``init`` "forward" | "zero", ``sequential``,
    ``reference_output_derivative`` (§2.4's quirk), ``relaxation`` "closed_form" | "euler" (the explicit
    K-step loop, a reference). These are fixed at construction (not per parameter group); lr, momentum,
    dampening, weight decay, nesterov and maximize are read per group at each layer's update.

    ``.grad`` holds each parameter's g after the step. With ``validate=True`` a non-finite g raises
    RuntimeError and leaves parameters, ``.grad`` and momentum buffers untouched: in sequential mode the
    parameters and buffers of layers L..2 are copied before their in-place update (layer 1's update is
    applied only after every g has been checked, so it needs no copy) and restored on error; this
    costs one copy of those tensors per step, and nothing with ``validate=False``.

    >>> from torch import nn
    >>> net = FPropagation(nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 3), nn.Sigmoid()))
    >>> opt = EquilibriumFAdjoint(net, lr=0.5, tau=0.1, steps=100, loss="mse")
    >>> out = net(torch.randn(16, 4))
    >>> loss = opt.step(torch.randint(0, 3, (16,)))
    """

    def __init__(self, net: FPropagation, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, tau: float = 0.1, steps: int | None = 100,
                 t: float | None = None, init: str = "forward", sequential: bool = True,
                 reference_output_derivative: bool = False, relaxation: str = "closed_form",
                 maximize: bool = False, foreach: bool | None = None, loss="mse", loss_kwargs: dict | None = None,
                 validate: bool = True, params=None):
        rule = EquilibriumRule(tau, steps, t, init, reference_output_derivative, relaxation)
        if not isinstance(sequential, bool):
            raise ValueError(f"sequential must be True or False, got {sequential!r}")
        defaults = self._sgd_defaults(lr, momentum, dampening, weight_decay, nesterov, maximize, foreach)
        super().__init__(net, params, defaults, loss=loss, loss_kwargs=loss_kwargs, validate=validate)
        self.rule = rule
        self.sequential = sequential

    def _rule_step(self, out_adj: Tensor) -> None:
        if not self.sequential:
            rule = self.rule
            grads = equilibrium_grads(self.net, out_adj, tau=rule.tau, steps=rule.steps, t=rule.t, init=rule.init,
                                      reference_output_derivative=rule.reference_output_derivative,
                                      relaxation=rule.relaxation, validate=self.validate)
            self._apply_sgd(grads)
            return
        layers = self.net.recorded_layers()
        check_trainable(layers, "the equilibrium F-adjoint")
        _check_shapes(layers)
        all_grads: list[Tensor] = []
        all_params: list[Tensor] = []
        undo: list[tuple] = []  # (param, old value, old .grad, old momentum buffer) of layers already updated

        def update_now(layer: LayerRecord, grad_w: Tensor, grad_b: Tensor | None) -> None:
            pairs = [(layer.module.weight, grad_w)] + ([(layer.module.bias, grad_b)] if grad_b is not None else [])
            all_grads.extend(g for _, g in pairs)
            all_params.extend(p for p, _ in pairs)
            if self.validate:
                if layer.k == 1:  # every g is known now: check before the last in-place write
                    check_finite(all_grads, "equilibrium F-adjoint gradients",
                                 names=lambda: param_names(self.net, all_params))
                else:
                    for param, _ in pairs:
                        buf = self.state.get(param, {}).get("momentum_buffer")
                        undo.append((param, param.clone(), param.grad,
                                     None if buf is None else buf.clone(), param in self.state))
            self._apply_sgd(dict(pairs))  # each parameter with its own group's hyper-parameters (§1.4)

        try:
            backward_sweep(layers, out_adj, self.rule, update_now, reducer=self.net.reducer, wait_each=True)
        except BaseException:
            for param, value, grad, buf, had_state in reversed(undo):
                param.copy_(value)
                param.grad = grad
                if buf is not None:
                    self.state[param]["momentum_buffer"].copy_(buf)
                elif not had_state:
                    self.state.pop(param, None)
                else:
                    self.state[param].pop("momentum_buffer", None)
            raise
        finally:
            self.net.clear()
