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
* A trainable parameter that is all zeros when LFP first sees it (BatchNorm's β, a zero-initialised bias or class
  token) gets a warning, once: its feedback is scaled by |θ|, so LFP can never move it (docs/maths.md §7.2).

On ``FPropagation(model, graph=True)`` (docs/maths.md §7.2) the reward is swept back over the tape
(:func:`torch_fadjoint.tape_sweep.sweep_tape`) by :class:`LFPGraphRule`: summed at fan-out, and through each op by the
rule its junction entry names (``entry.lfp``): the ε-rule on parametric ops, sums, average pooling and mean; R/2 per
operand of a product of two values; AttnLRP's matmul and softmax rules; the identity through activations and Step;
the ordinary backward through rearrangements, max pooling and dropout (a parameter entering one: |θ| ⊙ J_θᵀ S). The
values the rules read are kept by the tape under ``keep_pre_activations=True``, as Y^k on chains.

Over 400 lines: LFP on the chain (§3, §6.4) and on the tape (§7.2, ``LFPGraphRule``), sharing the reward and
the ε-rule.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Callable

import torch
from torch import Tensor

from ..layers import LayerRecord
from ..losses import _check_logits, onehot
from ..sweep import Rule, accumulate_grads, check_finite, check_out_adj, check_rule, param_names, sweep_grads
from ..tape_sweep import TapeRule

__all__ = ["LFPRule", "LFPGraphRule", "lfp_grads", "lfp_backward", "lfp_reward", "clip_grads_", "REWARDS"]


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
        return _normed(reward, self.norm_backward) / _stab(layer.y, self.eps)  # S^k

    def through_layer(self, layer: LayerRecord, ratio: Tensor) -> Tensor:
        return layer.x_prev * layer.entry.input_adjoint(layer, ratio)  # R^{k-1} = X^{k-1} ⊙ J_X^T S^k

    def param_feedback(self, layer: LayerRecord, ratio: Tensor) -> dict[Tensor, Tensor]:
        scale = -1.0 / ratio.shape[0] if self.batch_reduction == "mean" else -1.0
        return {param: grad.mul_(param.abs()).mul_(scale)                           # −|θ| ⊙ J_θ^T S / B
                for param, grad in layer.entry.param_feedback(layer, ratio).items()}


def _normed(reward: Tensor, mode: str | None) -> Tensor:
    """``norm_backward``: R / max|R| over the batch ("batch") or per sample ("sample"); an all-zero R unchanged."""
    if mode == "batch":
        peak = reward.abs().amax()
        return reward / torch.where(peak > 0, peak, torch.ones_like(peak))
    if mode == "sample":
        peak = reward.abs().flatten(1).amax(1).reshape((-1,) + (1,) * (reward.dim() - 1))
        return reward / torch.where(peak > 0, peak, torch.ones_like(peak))
    return reward


_FIRST_KEYS = (0, "input", "self", "tensor")


class LFPGraphRule(TapeRule):
    """LFP on the tape (docs/maths.md §7.2): the reward R at each op's output goes to its inputs by the rule its
    junction entry names in ``entry.lfp`` (S = R / stab(O), O the op's output with its bias):

    ============  ============================================================  ==========================
    entry.lfp     reward to each value input V                                  feedback of a parameter θ
    ============  ============================================================  ==========================
    epsilon       V ⊙ J_Vᵀ S (sums a ± αb, mean, sum, average pooling, −x)        |θ| ⊙ J_θᵀ S
    parametric    the same, one value input (linear, conv, the normalisations)   |θ| ⊙ J_θᵀ S
    product       two values: R / 2 each; the other a constant: all of R;        |θ| ⊙ J_θᵀ S
                  the other a parameter: V ⊙ J_Vᵀ S (summed to V's shape)
    matmul        two values: V ⊙ J_Vᵀ S, S = R / stab(2 O) (AttnLRP);           |θ| ⊙ J_θᵀ S
                  otherwise the ε-rule
    softmax       z ⊙ (R − s ⊙ Σ_dim R), −inf logits read as 0 (AttnLRP)       refused
    identity      R (activations, Step)                                           refused
    rearrangement J_Vᵀ R, the ordinary backward (views, cat, indexing, max        |θ| ⊙ J_θᵀ S
                  pooling, dropout, embedding)
    None          refused, naming the op and its module
    ============  ============================================================  ==========================

    The feedback is returned as LFP's gradient, −F / B ("mean") or −F ("sum"), B the batch of the reward.
    ``norm_backward`` divides the reward at the output of every op with a parameter input by its max |R|.
    """

    name = "LFP"
    keeps_values = True

    def __init__(self, eps: float = 1e-6, batch_reduction: str = "mean", norm_backward=False, batch: int = 1):
        chain = LFPRule(eps, batch_reduction, norm_backward)  # validates them
        self.eps, self.norm_backward = chain.eps, chain.norm_backward
        self.scale = -1.0 / batch if batch_reduction == "mean" else -1.0

    def through_op(self, tape, op, reward) -> dict:
        kind = op.entry.lfp
        if kind is None:
            raise TypeError(f"{op.entry.name} in {op.where}: LFP's rule for this op is not defined (docs/maths.md "
                            "§7.2); nothing was changed")
        return getattr(self, "_" + kind)(tape, op, reward)

    # -- what the rules read ----------------------------------------------------------------------------------
    @staticmethod
    def _value(tape, source) -> Tensor:
        kind, target = source
        return tape.kept[target][0] if kind == "value" else target

    def _output(self, tape, op):
        outs = [tape.kept[i][0] if i >= 0 else None for i in op.outputs]
        return outs[0] if op.single else tuple(outs)

    def _ratio(self, reward, out, factor: float = 1.0):
        """S = R / stab(factor · O), output by output (None where an output got no reward)."""
        if isinstance(reward, tuple):
            return tuple(None if r is None else r / _stab(o * factor if factor != 1 else o, self.eps)
                         for r, o in zip(reward, out))
        return reward / _stab(out * factor if factor != 1 else out, self.eps)

    def _keys(self, op, kind: str) -> list:
        return [key for key, (k, _) in op.inputs.items() if k == kind and key in op.needed]

    def _refuse(self, op, why: str):
        raise TypeError(f"{op.entry.name} in {op.where}: {why}; LFP's rule for it is not defined (docs/maths.md "
                        "§7.2); nothing was changed")

    def _times_inputs(self, tape, op, adjoints: dict) -> dict:
        """V ⊙ J_Vᵀ S for a value input, the gradient −|θ| ⊙ J_θᵀ S / B for a parameter."""
        found = {}
        for key, adj in adjoints.items():
            source = op.inputs.get(key)
            if source is None or adj is None or key not in op.needed:
                continue
            value = self._value(tape, source)
            found[key] = value * adj if source[0] == "value" else adj * value.abs() * self.scale
        return found

    def _parameters_in(self, op) -> bool:
        return any(kind == "param" for kind, _ in op.inputs.values())

    def _norm(self, op, reward):
        if self.norm_backward is None or not self._parameters_in(op) or isinstance(reward, tuple):
            return reward
        return _normed(reward, self.norm_backward)

    # -- the rules (entry.lfp) --------------------------------------------------------------------------------
    def _epsilon(self, tape, op, reward, factor: float = 1.0) -> dict:
        reward = self._norm(op, reward)
        ratio = self._ratio(reward, self._output(tape, op), factor)
        return self._times_inputs(tape, op, super().through_op(tape, op, ratio))

    def _parametric(self, tape, op, reward) -> dict:
        extra = [key for key in self._keys(op, "value") if key not in _FIRST_KEYS]
        if extra:
            self._refuse(op, f"a computed (value) argument {extra[0]!r} besides the input")
        return self._epsilon(tape, op, reward)

    def _identity(self, tape, op, reward) -> dict:
        if self._keys(op, "param"):
            self._refuse(op, "a parameter entering it directly")
        return {key: reward for key in self._keys(op, "value")}

    def _rearrangement(self, tape, op, reward) -> dict:
        found = {key: adj for key, adj in super().through_op(tape, op, reward).items()
                 if key in op.inputs and op.inputs[key][0] == "value"}
        if self._keys(op, "param"):  # a class token, a position embedding, an embedding's rows: |θ| ⊙ J_θᵀ S
            ratio = self._ratio(reward, self._output(tape, op))
            adjoints = super().through_op(tape, op, ratio)
            found.update(self._times_inputs(tape, op, {key: adjoints.get(key) for key in self._keys(op, "param")}))
        return found

    def _product(self, tape, op, reward) -> dict:
        values, params = self._keys(op, "value"), self._keys(op, "param")
        floating = [key for key, (kind, _) in op.inputs.items() if kind in ("value", "param")]
        if len(floating) == 2 and all(op.inputs[key][0] == "value" for key in floating):
            half = reward / 2  # AttnLRP's uniform rule: R / 2 to each value, summed over its broadcast dims
            return {key: _fit(half, self._value(tape, op.inputs[key])) for key in values}
        if any(op.inputs[key][0] == "param" for key in floating):
            divided = [key for key in values if key in getattr(op.entry, "lfp_divisor", ())]
            if divided:
                self._refuse(op, "a parameter divided by a value")
            return self._epsilon(tape, op, reward)  # a bare parameter in * or /: the ε-rule of a parametric op
        return {key: _fit(reward, self._value(tape, op.inputs[key])) for key in values}  # the other a constant

    def _matmul(self, tape, op, reward) -> dict:
        floating = [key for key, (kind, _) in op.inputs.items() if kind in ("value", "param")]
        two_values = len(floating) == 2 and all(op.inputs[key][0] == "value" for key in floating)
        return self._epsilon(tape, op, reward, 2.0 if two_values else 1.0)

    def _softmax(self, tape, op, reward) -> dict:
        if self._keys(op, "param"):
            self._refuse(op, "a parameter entering it directly")
        (key,) = self._keys(op, "value")
        z, s = self._value(tape, op.inputs[key]), self._output(tape, op)
        z = torch.where(torch.isneginf(z), torch.zeros_like(z), z)  # masked logits carry no reward
        return {key: z * (reward - s * reward.sum(op.entry.reduced_dim(op.saved), keepdim=True))}


def _fit(reward: Tensor, value: Tensor) -> Tensor:
    """The reward summed over the dims ``value`` was broadcast along, in its dtype."""
    reward = reward if reward.shape == value.shape else reward.sum_to_size(value.shape)
    return reward if reward.dtype == value.dtype else reward.to(value.dtype)


_ZERO_CHECKED: dict[int, weakref.ref] = {}  # id(parameter) → the parameter, checked once for all zeros


def warn_zero_parameters(net, params) -> None:
    """Warn once per parameter (the first time LFP sees it) when a trainable one is all zeros: LFP scales its
    feedback by |θ| and can never move it. One host sync for the parameters not seen before."""
    fresh = [p for p in params if (ref := _ZERO_CHECKED.get(id(p))) is None or ref() is not p]
    if not fresh:
        return
    zero = torch.stack([p.detach().count_nonzero() == 0 for p in fresh]).tolist()
    for p in fresh:
        _ZERO_CHECKED[id(p)] = weakref.ref(p, lambda _, i=id(p): _ZERO_CHECKED.pop(i, None))
    dead = [p for p, z in zip(fresh, zero) if z]
    for name in param_names(net, dead) if dead else ():
        warnings.warn(f"LFP: the trainable parameter {name} is all zeros; LFP scales its feedback by |θ| and can never "
                      "move it (BatchNorm's bias, a zero-initialised bias, class token or residual branch: "
                      "docs/maths.md §7.2); initialise it away from 0 or train it by another rule", stacklevel=3)


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
    graph = getattr(net, "graph", False)
    layers = None if graph else net.recorded_layers()
    if isinstance(reward, Tensor):
        out_reward = reward
    else:
        if target is None:
            raise ValueError("lfp_grads needs a target (or a precomputed reward tensor)")
        out_reward = lfp_reward(net.loss_input(), net.loss_target(target), reward, validate)
    out_reward = check_out_adj(net, out_reward, "reward")
    if graph:  # the tape (docs/maths.md §7.2)
        batch = out_reward.shape[0] if out_reward.dim() else 1
        graph_rule = LFPGraphRule(eps, batch_reduction, norm_backward, batch)
        grads = net.graph_grads(out_reward, retain_records=retain_records, rule=graph_rule)
        if validate:
            check_finite(list(grads.values()), "LFP gradients", names=lambda: param_names(net, grads))
    else:
        check_rule(rule, layers)
        grads = sweep_grads(net, layers, out_reward, rule, what="LFP gradients", validate=validate,
                            retain_records=retain_records)
    warn_zero_parameters(net, grads)
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


