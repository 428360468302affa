"""Layer-wise Feedback Propagation, LFP: learning by propagating a reward, never σ' (docs/maths.md §3).

LFP maximises a reward. The output reward R^L goes down the network by LRP-ε on every Linear and
unchanged through every activation; each parameter's feedback is its relevance times sign(θ)::

    R^L      = X^L ⊙ (onehot(t) − softmax(X^L))                    (B, C)   §3.1 ("softmax", default)
    for k = L..1:
        R^k      ← R at the Linear's output (identity through σ; Dropout: mask/(1−p); Flatten: reshape)
        S^k      = R^k / stab(Y^k),  stab(Y) = Y + ε·s(Y),  s(Y) = sign(Y), s(0) = +1   (B, n_k)
        F_W^k    = |W^k| ⊙ ((S^k)ᵀ X^{k-1}),   F_b^k = |b^k| ⊙ Σ_batch S^k            §3.3
        R^{k-1}  = X^{k-1} ⊙ (S^k W^k)                                                  §3.2
    p.grad = −F / B  ("mean", default) or −F ("sum")

Every F comes from the recorded forward in one sweep, before any parameter changes. Because LFP
never uses σ', it trains networks of :class:`torch_fadjoint.nn.Step` units (§3.4), which autograd
and the F-adjoint refuse.

Choices (docs/maths.md §3 names them; these are ours where it leaves room):

* Y^k (bias included) is needed, so LFP needs ``FPropagation(model, keep_pre_activations=True)``.
  :class:`LFP` switches it on for the net it is given (it only affects later forwards);
  :func:`lfp_grads` raises a ``RuntimeError`` naming the layer when a record lacks Y^k.
* Activations: every elementwise module passes the reward unchanged (our choice for all of them, §3.2);
  Dropout applies its recorded mask and 1/(1 − p), Flatten reshapes; a non-elementwise activation
  (LogSoftmax) is refused with a ``TypeError`` — the reward is defined on logits.
* ``norm_backward`` (the older zennit-based code's option, whose body the reference no longer carries):
  the reward arriving at each Linear's output, R^k, is divided by its max |R^k| — over the whole batch
  (``"batch"``, or ``True``: "its max |R|" in §3.3) or per sample (``"sample"``); an all-zero R is left as is.
* Clipping (``clip_norm``) is global over all parameters' grads, as ``torch.nn.utils.clip_grad_norm_``:
  g ← g · min(1, c / (‖g‖₂ + 1e-6)), without a host sync.
* ``LFP.step(target)`` returns the mean cross-entropy of the recorded logits (for logging only; LFP
  does not use it), so LFP's training curves read like every other rule's. ``step(reward=R)`` takes a
  precomputed R^L instead and returns None.
* The "correct_class" reward follows the reference: R_bt = sign(X^L_bt) where X^L_bt is a row maximum
  (ties count as correct), 0 elsewhere; torch's sign(0) = 0 there, as in the reference.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..layers import LayerRecord
from ..losses import _check_logits, onehot
from ..sweep import Rule, accumulate_grads, check_out_adj, check_rule, sweep_grads

__all__ = ["LFPRule", "lfp_grads", "lfp_backward", "lfp_reward", "clip_grads_", "REWARDS"]


# -- §3.1 output rewards -----------------------------------------------------------------------
def _onehot(target: Tensor, x_out: Tensor) -> Tensor:
    return onehot(target, x_out.shape[1], x_out.dtype)


def softmax_reward(x_out: Tensor, target: Tensor) -> Tensor:
    """R^L = X^L ⊙ (onehot(t) − softmax(X^L)); x_out (B, C) logits, target (B,). Returns (B, C)."""
    return x_out * (_onehot(target, x_out) - torch.softmax(x_out, dim=1))


def sigmoid_reward(x_out: Tensor, target: Tensor) -> Tensor:
    """R^L = X^L ⊙ (onehot(t) − sigmoid(X^L)). Returns (B, C)."""
    return x_out * (_onehot(target, x_out) - torch.sigmoid(x_out))


def correct_class_reward(x_out: Tensor, target: Tensor) -> Tensor:
    """R^L_bt = sign(X^L_bt) if the true logit is a row maximum, else 0; 0 off the true class. (B, C)."""
    true_logit = x_out.gather(1, target.long()[:, None])
    correct = (true_logit >= x_out.amax(1, keepdim=True)).to(x_out.dtype)
    return _onehot(target, x_out) * correct * x_out.sign()


REWARDS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "softmax": softmax_reward,
    "sigmoid": sigmoid_reward,
    "correct_class": correct_class_reward,
}


def _get_reward(reward) -> Callable[[Tensor, Tensor], Tensor]:
    if callable(reward):
        return reward
    if reward not in REWARDS:
        raise ValueError(f"reward must be one of {sorted(REWARDS)} or a callable, got {reward!r}")
    return REWARDS[reward]


def lfp_reward(x_out: Tensor, target: Tensor, reward="softmax", validate: bool = True) -> Tensor:
    """The output reward R^L (docs/maths.md §3.1) of logits ``x_out`` (B, C) for targets (B,).

    >>> lfp_reward(torch.zeros(2, 3), torch.tensor([0, 2])).shape
    torch.Size([2, 3])
    """
    fn = _get_reward(reward)
    if fn in REWARDS.values():
        _check_logits(x_out, target, f"LFP reward {fn.__name__}", validate)
    return fn(x_out, target)


# -- §3.2-3.3 the rule on the shared sweep -----------------------------------------------------
_BATCH_REDUCTIONS = ("mean", "sum")


def _stab(y: Tensor, eps: float) -> Tensor:
    """stab(Y) = Y + ε·s(Y), s(Y) = sign(Y) with s(0) = +1."""
    return torch.where(y >= 0, y + eps, y - eps)


class LFPRule(Rule):
    """LFP-ε on the shared backward sweep (docs/maths.md §3.2–§3.3, §6.4); the signal is the reward.

    ``through_maps`` takes R from the layer's chain output back to A_k's output (identity through
    activations, the ordinary backward through max pooling, views and Dropout, the ε-rule through average
    pooling) and returns S^k = R^k / stab(Y^k); ``param_feedback`` returns the GRADIENTS −|θ| ⊙ J_θ^T S / B
    (or without 1/B); ``through_layer`` gives R^{k-1} = X^{k-1} ⊙ J_X^T S. Records must hold Y^k and the
    maps' inputs and outputs (``keep_pre_activations=True``).
    """

    name = "LFP"
    needs_y = True
    differentiable = False

    def __init__(self, eps: float = 1e-6, batch_reduction: str = "mean", norm_backward=False):
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        if batch_reduction not in _BATCH_REDUCTIONS:
            raise ValueError(f"batch_reduction must be one of {_BATCH_REDUCTIONS}, got {batch_reduction!r}")
        if not (isinstance(norm_backward, bool) or norm_backward in (None, "batch", "sample")):
            raise ValueError(f"norm_backward must be False, True, 'batch' or 'sample', got {norm_backward!r}")
        self.eps = float(eps)
        self.batch_reduction = batch_reduction
        self.norm_backward = "batch" if norm_backward is True else (norm_backward or None)

    def allowed_map(self, entry) -> bool:
        return entry.lfp is not None  # LogSoftmax: the reward is defined on logits

    def through_maps(self, layer: LayerRecord, reward: Tensor, top: bool) -> Tensor:
        for rec in reversed(layer.maps):
            if rec.entry.lfp == "backward":
                reward = rec.entry.backward(rec.module, rec.saved, reward)
            elif rec.entry.lfp == "epsilon":  # average pooling: the ε-rule with the map's own adjoint (§6.4)
                reward = rec.y * rec.entry.backward(rec.module, rec.saved, reward / _stab(rec.x, self.eps))
            # "identity": every activation passes the reward unchanged (§3.2)
        if self.norm_backward == "batch":
            peak = reward.abs().amax()
            reward = reward / torch.where(peak > 0, peak, torch.ones_like(peak))
        elif self.norm_backward == "sample":
            peak = reward.abs().flatten(1).amax(1).reshape((-1,) + (1,) * (reward.dim() - 1))
            reward = reward / torch.where(peak > 0, peak, torch.ones_like(peak))
        return reward / _stab(layer.y, self.eps)  # S^k

    def through_layer(self, layer: LayerRecord, ratio: Tensor) -> Tensor:
        return layer.x_prev * layer.entry.input_adjoint(layer, ratio)  # R^{k-1} = X^{k-1} ⊙ J_X^T S^k

    def param_feedback(self, layer: LayerRecord, ratio: Tensor) -> dict[Tensor, Tensor]:
        scale = -1.0 / ratio.shape[0] if self.batch_reduction == "mean" else -1.0
        return {param: grad.mul_(param.abs()).mul_(scale)                           # −|θ| ⊙ J_θ^T S / B
                for param, grad in layer.entry.param_feedback(layer, ratio).items()}


def clip_grads_(grads: list[Tensor], max_norm: float) -> Tensor:
    """Scale ``grads`` in place so that their global 2-norm is at most ``max_norm``; returns the norm.

    Same rule as ``torch.nn.utils.clip_grad_norm_``: g ← g · min(1, max_norm / (‖g‖₂ + 1e-6)); no host sync.
    """
    if not grads:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(coef.to(grad.dtype))
    return total


@torch.no_grad()
def lfp_grads(net, target: Tensor | None = None, *, reward="softmax", eps: float = 1e-6,
              batch_reduction: str = "mean", norm_backward=False, clip_norm: float | None = None,
              validate: bool = True, retain_records: bool = False) -> dict[Tensor, Tensor]:
    """LFP's gradients −F/B for every parameter of the recorded layers (docs/maths.md §3).

    net: an ``FPropagation`` built with ``keep_pre_activations=True`` after ``net(x)``.
    target: (B,) class indices; reward: "softmax" | "sigmoid" | "correct_class" | a callable
    ``(x_out, target) -> R^L`` | a (B, C) tensor R^L (then ``target`` is ignored).
    clip_norm: global 2-norm clipping of the returned grads (None: off).
    Returns {parameter: gradient}; nothing is written. With ``validate`` a non-finite result raises.

    >>> from torch import nn
    >>> from torch_fadjoint import FPropagation
    >>> net = FPropagation(nn.Sequential(nn.Linear(3, 2)), keep_pre_activations=True)
    >>> out = net(torch.randn(4, 3))
    >>> grads = lfp_grads(net, torch.tensor([0, 1, 1, 0]))
    >>> [tuple(g.shape) for g in grads.values()]
    [(2, 3), (2,)]
    """
    rule = LFPRule(eps, batch_reduction, norm_backward)
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
    layers = net.recorded_layers()
    if isinstance(reward, Tensor):
        out_reward = reward
    else:
        if target is None:
            raise ValueError("lfp_grads needs a target (or a precomputed reward tensor)")
        out_reward = lfp_reward(net.output, target, reward, validate)
    check_out_adj(net, out_reward, "reward")
    check_rule(rule, layers)
    grads = sweep_grads(net, layers, out_reward, rule, what="LFP gradients", validate=validate,
                        retain_records=retain_records)
    if clip_norm is not None:
        clip_grads_(list(grads.values()), clip_norm)
    return grads


def lfp_backward(net, target: Tensor | None = None, **kwargs) -> None:
    """Accumulate LFP's gradients (:func:`lfp_grads`, same arguments) into ``.grad``, for any torch optimizer.

    >>> from torch import nn
    >>> from torch_fadjoint import FPropagation
    >>> model = nn.Sequential(nn.Linear(3, 2))
    >>> net = FPropagation(model, keep_pre_activations=True)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> out = net(torch.randn(4, 3)); lfp_backward(net, torch.tensor([0, 1, 1, 0])); opt.step()
    """
    accumulate_grads(lfp_grads(net, target, **kwargs))


