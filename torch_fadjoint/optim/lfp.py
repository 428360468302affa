"""Layer-wise Feedback Propagation, LFP: learning by propagating a reward, never σ' (ALGORITHMS.md §3).

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

Choices (ALGORITHMS.md §3 names them; these are ours where it leaves room):

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
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import _check_logits
from ..recorder import FPropagation, LayerRecord
from ..sweep import Rule
from .base import RuleOptimizer, accumulate_grads, check_finite_output, sweep_grads

__all__ = ["LFP", "LFPRule", "lfp_grads", "lfp_backward", "lfp_reward", "clip_grads_", "REWARDS"]


# -- §3.1 output rewards -----------------------------------------------------------------------
def _onehot(target: Tensor, x_out: Tensor) -> Tensor:
    return F.one_hot(target.long(), x_out.shape[1]).to(x_out.dtype)


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
    """The output reward R^L (ALGORITHMS.md §3.1) of logits ``x_out`` (B, C) for targets (B,).

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
    """LFP-ε on the shared backward sweep (ALGORITHMS.md §3.2–§3.3); the signal is the reward.

    ``through_activations`` turns R arriving at the layer's output into S^k = R^k / stab(Y^k);
    ``param_feedback`` returns the GRADIENTS −F/B (or −F); ``through_linear`` gives
    R^{k-1} = X^{k-1} ⊙ (S^k W^k). Records must hold Y^k (``keep_pre_activations=True``).
    """

    def __init__(self, eps: float = 1e-6, batch_reduction: str = "mean", norm_backward=False):
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if batch_reduction not in _BATCH_REDUCTIONS:
            raise ValueError(f"batch_reduction must be one of {_BATCH_REDUCTIONS}, got {batch_reduction!r}")
        if not (isinstance(norm_backward, bool) or norm_backward in (None, "batch", "sample")):
            raise ValueError(f"norm_backward must be False, True, 'batch' or 'sample', got {norm_backward!r}")
        self.eps = eps
        self.batch_reduction = batch_reduction
        self.norm_backward = "batch" if norm_backward is True else (norm_backward or None)

    @staticmethod
    def check(layers: list[LayerRecord]) -> None:
        """Refuse, before any sweep, records LFP cannot use (no Y^k, a non-elementwise activation)."""
        for layer in layers:
            if layer.y is None:
                raise RuntimeError(
                    f"{layer.name} (Linear): no Y^k recorded; LFP needs "
                    "FPropagation(model, keep_pre_activations=True) (tfa.optim.LFP sets it)"
                )
            for act in layer.activations:
                if type(act.module) not in (nn.Dropout, nn.Flatten) and not act.derivative.elementwise:
                    raise TypeError(
                        f"{act.name} ({type(act.module).__name__}): LFP passes rewards through elementwise "
                        "activations, Dropout and Flatten only; end the model with the logits"
                    )

    def through_activations(self, layer: LayerRecord, reward: Tensor, top: bool) -> Tensor:
        for act in reversed(layer.activations):
            if type(act.module) in (nn.Dropout, nn.Flatten):
                reward = act.derivative.backward(act.module, act.saved, reward)
            # every elementwise activation: the reward passes unchanged (§3.2)
        if self.norm_backward == "batch":
            peak = reward.abs().amax()
            reward = reward / torch.where(peak > 0, peak, torch.ones_like(peak))
        elif self.norm_backward == "sample":
            peak = reward.abs().amax(1, keepdim=True)
            reward = reward / torch.where(peak > 0, peak, torch.ones_like(peak))
        return reward / _stab(layer.y, self.eps)  # S^k

    def through_linear(self, layer: LayerRecord, ratio: Tensor) -> Tensor:
        return layer.x_prev * ratio.mm(layer.module.weight)  # R^{k-1} = X^{k-1} ⊙ (S^k W^k)

    def param_feedback(self, layer: LayerRecord, ratio: Tensor) -> tuple[Tensor, Tensor | None]:
        scale = -1.0 / ratio.shape[0] if self.batch_reduction == "mean" else -1.0
        weight, bias = layer.module.weight, layer.module.bias
        grad_w = ratio.t().mm(layer.x_prev).mul_(weight.abs()).mul_(scale)        # −|W| ⊙ (Sᵀ X) / B
        grad_b = ratio.sum(0).mul_(bias.abs()).mul_(scale) if bias is not None else None
        return grad_w, grad_b


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
def lfp_grads(net: FPropagation, target: Tensor | None = None, *, reward="softmax", eps: float = 1e-6,
              batch_reduction: str = "mean", norm_backward=False, clip_norm: float | None = None,
              validate: bool = True, retain_records: bool = False) -> dict[Tensor, Tensor]:
    """LFP's gradients −F/B for every parameter of the recorded layers (ALGORITHMS.md §3).

    net: an ``FPropagation`` built with ``keep_pre_activations=True`` after ``net(x)``.
    target: (B,) class indices; reward: "softmax" | "sigmoid" | "correct_class" | a callable
    ``(x_out, target) -> R^L`` | a (B, C) tensor R^L (then ``target`` is ignored).
    clip_norm: global 2-norm clipping of the returned grads (None: off).
    Returns {parameter: gradient}; nothing is written. With ``validate`` a non-finite result raises.

    >>> from torch import nn
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
    output = net.output
    if isinstance(reward, Tensor):
        out_reward = reward
    else:
        if target is None:
            raise ValueError("lfp_grads needs a target (or a precomputed reward tensor)")
        out_reward = lfp_reward(output, target, reward, validate)
    if out_reward.shape != output.shape or out_reward.dtype != output.dtype or out_reward.device != output.device:
        raise ValueError(
            f"reward: expected shape {tuple(output.shape)}, {output.dtype} on {output.device} (the output of "
            f"{layers[-1].name}), got {tuple(out_reward.shape)}, {out_reward.dtype} on {out_reward.device}"
        )
    rule.check(layers)
    grads = sweep_grads(net, layers, out_reward, rule, what="LFP gradients", validate=validate,
                        retain_records=retain_records)
    if clip_norm is not None:
        clip_grads_(list(grads.values()), clip_norm)
    return grads


def lfp_backward(net: FPropagation, target: Tensor | None = None, **kwargs) -> None:
    """Accumulate LFP's gradients (:func:`lfp_grads`, same arguments) into ``.grad``, for any torch optimizer.

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 2))
    >>> net = FPropagation(model, keep_pre_activations=True)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> out = net(torch.randn(4, 3)); lfp_backward(net, torch.tensor([0, 1, 1, 0])); opt.step()
    """
    accumulate_grads(lfp_grads(net, target, **kwargs))


# -- the optimizer ------------------------------------------------------------------------------
class LFP(RuleOptimizer):
    r"""LFP's feedback (ALGORITHMS.md §3) + global grad-norm clipping + ``torch.optim.SGD``'s update.

    .. code-block:: text

        input: recorded F-propagation with Y^k, targets t, reward r, ε, lr, μ, clip c
        R^L = r(X^L, t);  for k = L..1:  S^k = R^k / stab(Y^k);  g_W = −|W| ⊙ (S^k)ᵀX^{k-1} / B;
                                          g_b = −|b| ⊙ Σ S^k / B;  R^{k-1} = X^{k-1} ⊙ (S^k W^k)
        g ← g · min(1, c / (‖g‖ + 1e-6))          (clip_norm=c, global; None: off)
        θ ← SGD(θ, g)  (momentum, dampening, Nesterov, weight decay)

    Defaults are the reference code's (SGD lr 0.1, momentum 0.9, clip 3.0). The net is switched to
    ``keep_pre_activations=True``. ``step(target)`` writes g into ``.grad`` (replacing it), updates,
    and returns the mean cross-entropy of the recorded logits (logging only); ``step(reward=R)``
    uses a precomputed R^L and returns None. Errors leave parameters, ``.grad`` and state untouched.

    >>> from torch import nn
    >>> import torch_fadjoint as tfa
    >>> model = nn.Sequential(nn.Linear(4, 8), tfa.nn.Step(), nn.Linear(8, 3))
    >>> net = FPropagation(model)
    >>> opt = LFP(net, lr=0.1, momentum=0.9)
    >>> out = net(torch.randn(16, 4))
    >>> loss = opt.step(torch.randint(0, 3, (16,)))
    """

    def __init__(self, net: FPropagation, lr: float = 0.1, momentum: float = 0.9, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, reward="softmax", eps: float = 1e-6,
                 clip_norm: float | None = 3.0, batch_reduction: str = "mean", norm_backward=False,
                 foreach: bool | None = None, validate: bool = True, params=None):
        defaults = self._sgd_defaults(lr, momentum, dampening, weight_decay, nesterov, False, foreach)
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
        self.rule = LFPRule(eps, batch_reduction, norm_backward)  # validates eps, reduction, norm_backward
        self._reward_fn = _get_reward(reward)
        self.reward = reward
        self.clip_norm = clip_norm
        super().__init__(net, params, defaults, loss="cross_entropy", validate=validate)
        net.keep_pre_activations = True

    @torch.no_grad()
    def step(self, target: Tensor | None = None, closure=None, *, reward: Tensor | None = None):
        """One LFP step from the last recorded forward; returns the mean CE of X^L (None with ``reward=``)."""
        if closure is not None:
            closure()
        output = self.net.output
        if reward is None:
            if target is None:
                raise ValueError("step() needs a target (or a precomputed reward=)")
            reward = lfp_reward(output, target, self._reward_fn, validate=self.validate)
            loss = F.cross_entropy(output, target.long())
        else:
            loss = None
        if self.validate and isinstance(reward, Tensor):
            check_finite_output(self.net, reward, "reward", reducer=self.net.reducer)
        grads = lfp_grads(self.net, reward=reward, eps=self.rule.eps, batch_reduction=self.rule.batch_reduction,
                          norm_backward=self.rule.norm_backward or False, validate=self.validate)
        mine = {p for group in self.param_groups for p in group["params"]}
        grads = {p: g for p, g in grads.items() if p in mine}
        if self.clip_norm is not None:
            clip_grads_(list(grads.values()), self.clip_norm)
        self._apply_sgd(grads)
        return loss
