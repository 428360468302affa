"""Inference learning (IL) and its implicit-SGD variant IL-prox (ALGORITHMS.md §5).

IL does not send an adjoint down: it clamps the output to the target and lets every hidden activity
settle (T parallel iterations, batched, under ``torch.no_grad()``), then updates each layer locally
from its own prediction error. The recorder supplies the input x (the first Linear's X^0) and the
forward activities; the model is a chain of Linear layers with one elementwise activation ρ after
each hidden Linear (any supported elementwise module: ρ from the module, ρ' from the derivative
table) and logits at the top.

IL (§5.1, post-activation states x̂^k, the authors' ``PC.py``)::

    x̂^0 = x,  x̂^k = X^k (forward),  x̂^L = n onehot + (1 − n) softmax(X^L)      (clamped)
    T times, all layers from the states before the iteration (a^k = x̂^{k-1} W^kᵀ + b^k):
        e^k = x̂^k − ρ(a^k)  (k < L),   e^L = ½ (x̂^L − softmax(a^L))
        x̂^k ← x̂^k − γ_top e^k + γ_bot (e^{k+1} ⊙ ρ'(a^{k+1})) W^{k+1}    (no ρ' when k + 1 = L)
    then, from fresh a^k:  e^k = x̂^k − ρ(a^k),  e^L = x̂^L − softmax(a^L)   (no ½)
        ∂W^k = −(e^k ⊙ ρ'(a^k))ᵀ x̂^{k-1} / B,   ∂b^k = −mean_b (e^k ⊙ ρ'(a^k))     (no ρ' at k = L)

With γ_top = γ_bot = γ the iteration is gradient descent with step γ on the per-sample energy
E = ½ Σ_{k<L} ‖e^k‖² + ½ CE(a^L; x̂^L) (the clamped x̂^L sums to 1), which the tests check.

IL-prox (§5.2, pre-activation states ĥ^k, the authors' ``proxPC.py``; ρ(ĥ^0) := x)::

    P^k = ρ(ĥ^{k-1}) W^kᵀ + b^k,   ĥ^k = P^k (forward),   N_0 = mean_b ‖ρ(ĥ^{L-1})_b‖² + ε
    ĥ^L = (softmax(P^L) + α N_0 onehot) / (1 + α N_0)
    T times:  1. e^k = ĥ^k − P^k (k < L),  e^L = ĥ^L − softmax(P^L)
              2. ĥ^k ← ĥ^k − γ_top e^k + γ_bot (e^{k+1} W^{k+1}) ⊙ ρ'(ĥ^k)      (1 ≤ k < L)
              3. N = mean_b ‖ρ(ĥ^{L-1})_b‖² + 1 + ε (updated ĥ^{L-1});
                 ĥ^L = (softmax(P^L) + α N onehot) / (1 + α N)       (P^L from before step 2)
              4. recompute every P^k
    step:  e^k as in 1. with the fresh P^k;  N^k = mean_b ‖ρ(ĥ^{k-1})_b‖² + 1 + ε
           W^k ← W^k + (e^k)ᵀ ρ(ĥ^{k-1}) / (B N^k),   b^k ← b^k + mean_b e^k / N^k

IL-prox's step has no learning rate: it is written as ``.grad = −step`` and the base optimizer applies
it (``base="sgd"`` with the default lr = 1 is the authors' plain step; ``base="adam"`` is their
``mom=True`` "IL-prox Adam").

Choices, as ALGORITHMS.md §5 names them: batch means where the code mixes means and sums; IL-prox's
N is a batch MEAN (the code's is a batch sum: equal at batch 1), so α means the same at every batch
size; ρ is not applied to the input x (the code applies it; identical for x ≥ 0). Where §5's text
leaves room we follow the authors' code (the source of truth): IL re-clamps x̂^L = n onehot +
(1 − n) softmax(a^L) in every iteration with a^L from before it (the same as clamping once for n = 1),
and IL-prox's "+1" in N is the bias input, so a layer without bias has none.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import nn as tfa_nn
from ..losses import _check_logits
from ..recorder import FPropagation, LayerRecord
from .base import DelegatingRuleOptimizer, check_finite, param_names

__all__ = ["InferenceLearning", "inference_grads", "VARIANTS"]

VARIANTS = ("il", "il_prox")
_NOT_STATES = (nn.Dropout, tfa_nn.InputNoise)  # stochastic in training: not a function of the state


@dataclass
class _Layer:
    """One Linear and the activation after it: ρ(h) and ρ'(h) at any point (identity at the top)."""

    name: str
    weight: Tensor
    bias: Tensor | None
    acts: list

    def linear(self, x_in: Tensor) -> Tensor:
        return F.linear(x_in, self.weight, self.bias)

    def rho(self, h: Tensor) -> Tensor:
        for act in self.acts:
            h = act.module(h)
        return h

    def drho(self, h: Tensor) -> Tensor:
        slope = torch.ones_like(h)
        for act in self.acts:
            slope = slope * act.derivative.df_at(act.module, h)
            h = act.module(h)
        return slope


def _chain(layers: list[LayerRecord]) -> list[_Layer]:
    chain = []
    for i, layer in enumerate(layers):
        top = i == len(layers) - 1
        for act in layer.activations:
            if top:
                raise TypeError(f"{act.name} ({type(act.module).__name__}): inference learning needs the logits at "
                                "the top; end the model with a Linear")
            if (isinstance(act.module, _NOT_STATES) or not act.derivative.elementwise
                    or not act.derivative.differentiable):
                raise TypeError(f"{act.name} ({type(act.module).__name__}): inference learning needs elementwise, "
                                "deterministic, differentiable activations between the Linear layers")
        chain.append(_Layer(layer.name, layer.module.weight, layer.module.bias, list(layer.activations)))
    return chain


def _gammas(variant: str, gamma_top: float | None, gamma_bot: float | None) -> tuple[float, float]:
    """The authors' γ's where not given: γ_top = 0.015; γ_bot = 0.02 (il) | 0.015 (il_prox)."""
    top = 0.015 if gamma_top is None else gamma_top
    bot = (0.02 if variant == "il" else 0.015) if gamma_bot is None else gamma_bot
    return top, bot


def _check(variant, T, gamma_top, gamma_bot, clamp, alpha, prox_eps) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if isinstance(T, bool) or not isinstance(T, int) or T < 0:
        raise ValueError(f"T must be an int >= 0, got {T!r}")
    for name, value in (("gamma_top", gamma_top), ("gamma_bot", gamma_bot)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if not 0.0 <= clamp <= 1.0:
        raise ValueError(f"clamp (n) must be in [0, 1], got {clamp}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if not prox_eps >= 0:
        raise ValueError(f"prox_eps must be >= 0, got {prox_eps}")


def _il(chain: list[_Layer], x: Tensor, states: list[Tensor], onehot: Tensor, T: int, gamma_top: float,
        gamma_bot: float, clamp: float) -> list[tuple[Tensor, Tensor]]:
    """§5.1: returns per layer (e^k ⊙ ρ'(a^k), x̂^{k-1}), the factors of the local update."""
    L = len(chain)
    xs = [x] + states  # x̂^0..x̂^L
    xs[L] = clamp * onehot + (1 - clamp) * torch.softmax(xs[L], dim=1)

    def errors(final: bool):
        pre = [chain[k].linear(xs[k]) for k in range(L)]  # a^1..a^L
        errs = [xs[k + 1] - chain[k].rho(pre[k]) for k in range(L - 1)]
        errs.append((1.0 if final else 0.5) * (xs[L] - torch.softmax(pre[L - 1], dim=1)))
        return pre, errs

    for _ in range(T):
        pre, errs = errors(final=False)
        for k in range(1, L):  # state x̂^k, fed by layer k + 1 (chain index k)
            feedback = errs[k] if k == L - 1 else errs[k] * chain[k].drho(pre[k])
            xs[k] = xs[k] - gamma_top * errs[k - 1] + gamma_bot * feedback.mm(chain[k].weight)
        if clamp != 1.0:  # PC.py re-clamps every iteration, from the logits before the update
            xs[L] = clamp * onehot + (1 - clamp) * torch.softmax(pre[L - 1], dim=1)
    pre, errs = errors(final=True)
    return [(errs[k] * chain[k].drho(pre[k]) if k < L - 1 else errs[k], xs[k]) for k in range(L)]


def _il_prox(chain: list[_Layer], x: Tensor, states: list[Tensor], onehot: Tensor, T: int, gamma_top: float,
             gamma_bot: float, alpha: float, prox_eps: float) -> list[tuple[Tensor, Tensor]]:
    """§5.2: returns per layer (e^k / N^k, ρ(ĥ^{k-1})), the factors of the normalised step."""
    L = len(chain)
    hs = [None] + states  # ĥ^1..ĥ^L (pre-activations; ĥ^0 is not a state)

    def inputs():  # ρ(ĥ^{k-1}) for k = 1..L, with ρ(ĥ^0) := x
        return [x] + [chain[k - 1].rho(hs[k]) for k in range(1, L)]

    def sq_norm(v: Tensor) -> Tensor:
        return v.pow(2).sum(1).mean()

    def ones(k: int) -> float:  # the "+1" of N is the bias input of layer k (proxPC.py adds it with the bias)
        return 1.0 if chain[k].bias is not None else 0.0

    def output_target(p_top: Tensor, norm: Tensor) -> Tensor:
        return (torch.softmax(p_top, dim=1) + alpha * norm * onehot) / (1 + alpha * norm)

    ins = inputs()
    preds = [chain[k].linear(ins[k]) for k in range(L)]  # P^1..P^L
    hs[L] = output_target(preds[L - 1], sq_norm(ins[L - 1]) + prox_eps)
    for _ in range(T):
        errs = [hs[k + 1] - preds[k] for k in range(L - 1)] + [hs[L] - torch.softmax(preds[L - 1], dim=1)]
        for k in range(1, L):
            hs[k] = (hs[k] - gamma_top * errs[k - 1]
                     + gamma_bot * errs[k].mm(chain[k].weight) * chain[k - 1].drho(hs[k]))
        ins = inputs()
        hs[L] = output_target(preds[L - 1], sq_norm(ins[L - 1]) + ones(L - 1) + prox_eps)
        preds = [chain[k].linear(ins[k]) for k in range(L)]
    errs = [hs[k + 1] - preds[k] for k in range(L - 1)] + [hs[L] - torch.softmax(preds[L - 1], dim=1)]
    return [(errs[k] / (sq_norm(ins[k]) + ones(k) + prox_eps), ins[k]) for k in range(L)]


@torch.no_grad()
def inference_grads(net: FPropagation, target: Tensor, variant: str = "il", *, T: int = 25,
                    gamma_top: float | None = None, gamma_bot: float | None = None, clamp: float = 1.0,
                    alpha: float = 5.0, prox_eps: float = 0.25, validate: bool = True) -> dict[Tensor, Tensor]:
    """The §5 local updates as gradients {param: grad} from the recorded forward and targets (B,).

    il: ∂W^k = −(e^k ⊙ ρ'(a^k))ᵀ x̂^{k-1} / B after T inference iterations (hand to any optimizer);
    il_prox: −(the normalised proximal step), so that SGD with lr = 1 applies the step exactly.
    Defaults: γ_top = 0.015, γ_bot = 0.02 (il) | 0.015 (il_prox), the authors' values. Nothing is written.

    >>> net = FPropagation(nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)))
    >>> out = net(torch.randn(4, 3))
    >>> grads = inference_grads(net, torch.tensor([0, 1, 1, 0]), "il_prox", T=5)
    >>> [tuple(g.shape) for g in grads.values()]
    [(5, 3), (5,), (2, 5), (2,)]
    """
    gamma_top, gamma_bot = _gammas(variant, gamma_top, gamma_bot)
    _check(variant, T, gamma_top, gamma_bot, clamp, alpha, prox_eps)
    layers = net.recorded_layers()
    chain = _chain(layers)
    output = net.output
    _check_logits(output, target, f"{variant} target", validate)
    x = layers[0].x_prev
    onehot = F.one_hot(target.long(), output.shape[1]).to(output.dtype)
    if variant == "il":
        factors = _il(chain, x, [layer.x for layer in layers], onehot, T, gamma_top, gamma_bot, clamp)
    else:
        states = [_pre_activation(chain[k], layers[k]) for k in range(len(layers))]
        factors = _il_prox(chain, x, states, onehot, T, gamma_top, gamma_bot, alpha, prox_eps)
    scale = -1.0 / output.shape[0]  # both updates are batch means, written as gradients
    grads: dict[Tensor, Tensor] = {}
    for layer, (delta, x_in) in zip(chain, factors):
        grads[layer.weight] = delta.t().mm(x_in).mul_(scale)
        if layer.bias is not None:
            grads[layer.bias] = delta.sum(0).mul_(scale)
    net.clear()
    if net.reducer is not None:  # no sweep here: average every layer at once
        net.reducer.launch(list(grads.values()))
        net.reducer.wait()
    if validate:
        check_finite(list(grads.values()), f"{variant} gradients", names=lambda: param_names(net, grads))
    return grads


def _pre_activation(layer: _Layer, record: LayerRecord) -> Tensor:
    """Y^k: kept by the recorder when it had to, else recomputed from X^{k-1} (one GEMM)."""
    return record.y if record.y is not None else layer.linear(record.x_prev)


class InferenceLearning(DelegatingRuleOptimizer):
    r"""IL / IL-prox (ALGORITHMS.md §5): T inference iterations, then a local update via a base optimizer.

    .. code-block:: text

        input: recorded F-propagation (x, forward activities), targets t; T, γ_top, γ_bot, n | α, ε
        il:      clamp x̂^L, relax hidden x̂^k T times, g_W = −(e^k ⊙ ρ'(a^k))ᵀ x̂^{k-1} / B
        il_prox: proximal output target, relax ĥ^k T times, g_W = −(e^k)ᵀ ρ(ĥ^{k-1}) / (B N^k)
        p.grad ← g;  base.step()        (il_prox: SGD lr = 1 is the authors' plain step)

    Args:
        net: the ``FPropagation`` of a Linear / activation chain ending in logits.
        lr: the base optimizer's learning rate (default 0.05 for il, 1.0 for il_prox).
        variant: "il" | "il_prox";  T: inference iterations;  gamma_top, gamma_bot: the γ's;
        clamp: n, the output clamp of il;  alpha, prox_eps: α and ε of il_prox.
        base: "sgd" | "adam" | "adamw" | "rmsprop" | an Optimizer class;  **base_kwargs go to it.

    ``step(target)`` returns the cross-entropy of the recorded logits (logging; IL does not use it).
    Parameters, ``.grad`` and state are untouched when a check fails.

    >>> net = FPropagation(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    >>> opt = InferenceLearning(net, variant="il_prox", T=5)
    >>> out = net(torch.randn(16, 4))
    >>> loss = opt.step(torch.randint(0, 3, (16,)))
    """

    def __init__(self, net: FPropagation, lr: float | None = None, variant: str = "il", *, T: int = 25,
                 gamma_top: float | None = None, gamma_bot: float | None = None, clamp: float = 1.0,
                 alpha: float = 5.0, prox_eps: float = 0.25, base="sgd", validate: bool = True, params=None,
                 **base_kwargs):
        gamma_top, gamma_bot = _gammas(variant, gamma_top, gamma_bot)
        _check(variant, T, gamma_top, gamma_bot, clamp, alpha, prox_eps)
        lr = (0.05 if variant == "il" else 1.0) if lr is None else lr
        self.variant, self.T, self.gamma_top, self.gamma_bot = variant, T, gamma_top, gamma_bot
        self.clamp, self.alpha, self.prox_eps = clamp, alpha, prox_eps
        super().__init__(net, params, lr, base, base_kwargs, loss="cross_entropy", validate=validate)

    @torch.no_grad()
    def step(self, target: Tensor | None = None, closure: Callable | None = None):
        """One IL step from the last recorded forward; returns the mean cross-entropy of the logits."""
        if closure is not None:
            closure()
        if target is None:
            raise ValueError("step() needs the targets (B,) class indices")
        output = self.net.output
        grads = inference_grads(self.net, target, self.variant, T=self.T, gamma_top=self.gamma_top,
                                gamma_bot=self.gamma_bot, clamp=self.clamp, alpha=self.alpha,
                                prox_eps=self.prox_eps, validate=self.validate)  # checks the targets
        self._apply_base(grads)
        return F.cross_entropy(output, target.long())
