"""Inference learning (IL) and its implicit-SGD variant IL-prox (docs/maths.md §5).

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

Choices, as docs/maths.md §5 names them: batch means where the code mixes means and sums; IL-prox's
N is a batch MEAN (the code's is a batch sum: equal at batch 1), so α means the same at every batch
size; ρ is not applied to the input x (the code applies it; identical for x ≥ 0). Where §5's text
leaves room we follow the authors' code (the source of truth): IL re-clamps x̂^L = n onehot +
(1 − n) softmax(a^L) in every iteration with a^L from before it (the same as clamping once for n = 1),
and IL-prox's "+1" in N is the bias input, so a layer without bias has none.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..layers import LayerRecord
from ..losses import _check_logits, onehot as to_onehot
from ..maps import MapRecord
from ..sweep import check_finite, param_names

__all__ = ["inference_grads", "VARIANTS", "check_inference"]

VARIANTS = ("il", "il_prox")


@dataclass
class _Block:
    """Layer k for inference learning: its structural maps' input side S_{k-1} (pooling, views of the layer
    below), the parametric layer A_k and the elementwise activation ρ_k after it (identity at the top)."""

    record: LayerRecord
    activations: list[MapRecord]  # ρ_k
    structural: list[MapRecord]   # S_k: applied to this layer's state before the next layer

    @property
    def name(self) -> str:
        return self.record.describe

    @property
    def has_bias(self) -> bool:
        return getattr(self.record.module, "bias", None) is not None

    def layer(self, x_in: Tensor) -> Tensor:
        return self.record.entry.forward(self.record, x_in)

    def layer_adjoint(self, x_in: Tensor, y_adj: Tensor) -> Tensor:
        """J_X(A_k)^T y_adj (linear layers: independent of x_in)."""
        return self.record.entry.input_adjoint(replace(self.record, x_prev=x_in, saved=None), y_adj)

    def feedback(self, x_in: Tensor, y_adj: Tensor) -> dict[Tensor, Tensor]:
        return self.record.entry.param_feedback(replace(self.record, x_prev=x_in, saved=None), y_adj)

    def rho(self, h: Tensor) -> Tensor:
        for rec in self.activations:
            h = rec.entry.forward(rec.module, h)
        return h

    def drho(self, h: Tensor) -> Tensor:
        slope = torch.ones_like(h)
        for rec in self.activations:
            slope = slope * rec.entry.df_at(rec.module, h)
            h = rec.entry.forward(rec.module, h)
        return slope

    def structure(self, h: Tensor) -> Tensor:
        """S_k(h): the pooling and views between this layer's state and the next layer."""
        for rec in self.structural:
            h = rec.entry.forward(rec.module, h)
        return h

    def structure_adjoint(self, h: Tensor, x_adj: Tensor) -> Tensor:
        """S_k(h)^T x_adj, at the state h (max pooling routes to the arg-max at h)."""
        points = []
        for rec in self.structural:
            points.append(h)
            h = rec.entry.forward(rec.module, h)
        for rec, point in zip(reversed(self.structural), reversed(points)):
            x_adj = rec.entry.vjp_at(rec.module, point, x_adj)
        return x_adj


def _chain(layers: list[LayerRecord]) -> list[_Block]:
    """Split every layer's maps into ρ (elementwise, first) and S (pooling, views, after); refuse the rest."""
    chain = []
    for i, layer in enumerate(layers):
        if layer.entry.normalization:
            raise TypeError(f"{layer.describe}: normalisation layers are not defined for inference learning "
                            "(docs/maths.md §6.6)")
        top = i == len(layers) - 1
        rho, struct = [], []
        for rec in layer.maps:
            kind = f"{rec.name} ({type(rec.module).__name__})"
            if top:
                raise TypeError(f"{kind}: inference learning needs the logits at the top; end the model with a "
                                "parametric layer")
            if rec.entry.stochastic or not rec.entry.differentiable:
                raise TypeError(f"{kind}: inference learning needs deterministic, differentiable maps")
            if rec.entry.elementwise:
                if struct:
                    raise TypeError(f"{kind}: inference learning needs the activation right after the layer "
                                    "(before pooling and views)")
                rho.append(rec)
            elif rec.entry.lfp in ("backward", "epsilon"):  # pooling and views
                struct.append(rec)
            else:
                raise TypeError(f"{kind}: inference learning cannot pass through this map")
        chain.append(_Block(layer, rho, struct))
    return chain


def _gammas(variant: str, gamma_top: float | None, gamma_bot: float | None) -> tuple[float, float]:
    """The authors' γ's where not given: γ_top = 0.015; γ_bot = 0.02 (il) | 0.015 (il_prox)."""
    top = 0.015 if gamma_top is None else gamma_top
    bot = (0.02 if variant == "il" else 0.015) if gamma_bot is None else gamma_bot
    return top, bot


def check_inference(variant, T, gamma_top, gamma_bot, clamp, alpha, prox_eps) -> None:
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


def _il(chain: list[_Block], x: Tensor, states: list[Tensor], onehot: Tensor, T: int, gamma_top: float,
        gamma_bot: float, clamp: float) -> list[tuple[Tensor, Tensor]]:
    """§5.1 / §6.6: returns per layer (e^k ⊙ ρ'(a^k), S_{k-1}(x̂^{k-1})), the factors of the local update."""
    L = len(chain)
    xs = [x] + states  # x̂^0..x̂^L
    xs[L] = clamp * onehot + (1 - clamp) * torch.softmax(xs[L], dim=1)

    def inputs():  # S_{k-1}(x̂^{k-1}) for k = 1..L
        return [x] + [chain[k - 1].structure(xs[k]) for k in range(1, L)]

    def errors(final: bool):
        ins = inputs()
        pre = [chain[k].layer(ins[k]) for k in range(L)]  # a^1..a^L
        errs = [xs[k + 1] - chain[k].rho(pre[k]) for k in range(L - 1)]
        errs.append((1.0 if final else 0.5) * (xs[L] - torch.softmax(pre[L - 1], dim=1)))
        return ins, pre, errs

    for _ in range(T):
        ins, pre, errs = errors(final=False)
        for k in range(1, L):  # state x̂^k, fed by layer k + 1 (chain index k)
            signal = errs[k] if k == L - 1 else errs[k] * chain[k].drho(pre[k])
            feedback = chain[k - 1].structure_adjoint(xs[k], chain[k].layer_adjoint(ins[k], signal))
            xs[k] = xs[k] - gamma_top * errs[k - 1] + gamma_bot * feedback
        if clamp != 1.0:  # PC.py re-clamps every iteration, from the logits before the update
            xs[L] = clamp * onehot + (1 - clamp) * torch.softmax(pre[L - 1], dim=1)
    ins, pre, errs = errors(final=True)
    return [(errs[k] * chain[k].drho(pre[k]) if k < L - 1 else errs[k], ins[k]) for k in range(L)]


def _il_prox(chain: list[_Block], x: Tensor, states: list[Tensor], onehot: Tensor, T: int, gamma_top: float,
             gamma_bot: float, alpha: float, prox_eps: float, conv_details: bool) -> list[tuple[Tensor, Tensor]]:
    """§5.2 / §6.6: returns per layer (e^k / N^k, S_{k-1}(ρ(ĥ^{k-1}))), the factors of the normalised step."""
    L = len(chain)
    hs = [None] + states  # ĥ^1..ĥ^L (pre-activations; ĥ^0 is not a state)

    def inputs():  # S_{k-1}(ρ(ĥ^{k-1})) for k = 1..L, with ρ(ĥ^0) := x
        return [x] + [chain[k - 1].structure(chain[k - 1].rho(hs[k])) for k in range(1, L)]

    def sq_norm(v: Tensor) -> Tensor:  # mean over the batch (and positions) of Σ_channels v²
        return v.pow(2).sum(1).mean()

    def ones(k: int) -> float:  # the "+1" of N is the bias input of layer k (proxPC.py adds it with the bias)
        return 1.0 if chain[k].has_bias else 0.0

    def output_target(p_top: Tensor, norm: Tensor) -> Tensor:
        return (torch.softmax(p_top, dim=1) + alpha * norm * onehot) / (1 + alpha * norm)

    top_scale = 0.5 if conv_details else 1.0  # PC_Prox_Conv.py halves e^L during the iterations
    ins = inputs()
    preds = [chain[k].layer(ins[k]) for k in range(L)]  # P^1..P^L
    hs[L] = output_target(preds[L - 1], sq_norm(ins[L - 1]) + (ones(L - 1) if conv_details else 0.0) + prox_eps)
    for _ in range(T):
        errs = [hs[k + 1] - preds[k] for k in range(L - 1)]
        errs.append(top_scale * (hs[L] - torch.softmax(preds[L - 1], dim=1)))
        for k in range(1, L):
            state = chain[k - 1].rho(hs[k])
            feedback = chain[k - 1].structure_adjoint(state, chain[k].layer_adjoint(ins[k], errs[k]))
            hs[k] = hs[k] - gamma_top * errs[k - 1] + gamma_bot * feedback * chain[k - 1].drho(hs[k])
        ins = inputs()
        hs[L] = output_target(preds[L - 1], sq_norm(ins[L - 1]) + ones(L - 1) + prox_eps)
        preds = [chain[k].layer(ins[k]) for k in range(L)]
    errs = [hs[k + 1] - preds[k] for k in range(L - 1)] + [hs[L] - torch.softmax(preds[L - 1], dim=1)]
    return [(errs[k] / (sq_norm(ins[k]) + ones(k) + prox_eps), ins[k]) for k in range(L)]


@torch.no_grad()
def inference_grads(net, target: Tensor, variant: str = "il", *, T: int = 25, gamma_top: float | None = None,
                    gamma_bot: float | None = None, clamp: float = 1.0, alpha: float = 5.0, prox_eps: float = 0.25,
                    conv_details: bool = False, validate: bool = True) -> dict[Tensor, Tensor]:
    """The §5 / §6.6 local updates as gradients {param: grad} from the recorded forward and targets (B,).

    il: ∂θ_k = −J_θ^T(e^k ⊙ ρ'(a^k)) / B after T inference iterations (hand to any optimizer);
    il_prox: −(the normalised proximal step), so that SGD with lr = 1 applies the step exactly.
    conv_details: PC_Prox_Conv.py's two differences from proxPC.py (e^L halved during the iterations, +1 in
    the initial N_0; §6.6), off by default so that an MLP and a CNN of one rule mean the same thing.
    Defaults: γ_top = 0.015, γ_bot = 0.02 (il) | 0.015 (il_prox), the authors' values. Nothing is written.

    >>> from torch_fadjoint import FPropagation
    >>> net = FPropagation(nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)))
    >>> out = net(torch.randn(4, 3))
    >>> grads = inference_grads(net, torch.tensor([0, 1, 1, 0]), "il_prox", T=5)
    >>> [tuple(g.shape) for g in grads.values()]
    [(5, 3), (5,), (2, 5), (2,)]
    """
    gamma_top, gamma_bot = _gammas(variant, gamma_top, gamma_bot)
    check_inference(variant, T, gamma_top, gamma_bot, clamp, alpha, prox_eps)
    layers = net.recorded_layers()
    chain = _chain(layers)
    output = net.output
    if not isinstance(target, Tensor):
        raise ValueError(f"{variant} target: expected a tensor, got {type(target).__name__}")
    _check_logits(output, target, f"{variant} target", validate)
    x = layers[0].x_prev
    onehot = to_onehot(target, output.shape[1], output.dtype)
    try:
        if variant == "il":
            states = [_post_activation(block) for block in chain[:-1]] + [layers[-1].x]
            factors = _il(chain, x, states, onehot, T, gamma_top, gamma_bot, clamp)
        else:
            states = [_pre_activation(block) for block in chain]
            factors = _il_prox(chain, x, states, onehot, T, gamma_top, gamma_bot, alpha, prox_eps, conv_details)
        scale = -1.0 / output.shape[0]  # both updates are batch means, written as gradients
        grads: dict[Tensor, Tensor] = {}
        for block, (delta, x_in) in zip(chain, factors):
            for param, grad in block.feedback(x_in, delta).items():
                grad = grad * scale
                grads[param] = grad if param not in grads else grads[param] + grad
    finally:
        net.clear()
    if net.reducer is not None:  # no sweep here: average every layer at once
        net.reducer.launch(list(grads.values()))
        net.reducer.wait()
    if validate:
        check_finite(list(grads.values()), f"{variant} gradients", names=lambda: param_names(net, grads))
    return grads


def _pre_activation(block: _Block) -> Tensor:
    """Y^k: kept by the recorder when it had to, else recomputed from X^{k-1} (one layer forward)."""
    return block.record.y if block.record.y is not None else block.layer(block.record.x_prev)


def _post_activation(block: _Block) -> Tensor:
    """ρ_k(Y^k), the state before any pooling: X^k when the layer has no structural map."""
    if not block.structural:
        return block.record.x
    return block.rho(_pre_activation(block))
