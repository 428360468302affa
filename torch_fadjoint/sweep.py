"""The backward sweep k = L..1, written once, and the F-adjoint on it (docs/maths.md §1.2, §6.1–§6.2).

A rule says what it sends down and what it makes of each layer (STYLE P6); the sweep owns the
traversal and speaks to the layers only through the tables' verbs (``tfa.layers``, ``tfa.maps``)::

    signal = X*^L                                         (the output adjoint, LFP's reward, …)
    for k = L..1:
        y_signal = rule.through_maps(layer k, signal, top=(k == L))      e.g. Y*^k = J_maps^T X*^k
        release X^k, Y^k and the map records of layer k (nothing below reads them)
        feedback = rule.param_feedback(layer k, y_signal)                e.g. {W: Y*ᵀ X^{k-1}, b: Σ Y*}
        [reducer: start averaging the feedback over the ranks (torch_fadjoint.distributed)]
        on_layer(layer k, feedback)            the caller collects, or updates layer k now (§2.3)
        signal = rule.through_layer(layer k, y_signal)   (k > 1)         e.g. X*^{k-1} = J_X^T Y*^k
        release layer k's X^{k-1}

The default methods are the F-adjoint (§1.2, §6.2); subclasses override only what differs. A rule
declares what it needs (``needs_y``: Y^k records; ``differentiable``: no Step-like map;
``allowed_map``: which maps it can pass through) and :func:`check_rule` enforces it before any sweep.

Exception safety (STYLE P11): :func:`sweep_grads` writes nothing until the sweep has finished; if
anything raises inside it, the records are cleared (a retry is the clear "no recorded forward" error).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .layers import LayerRecord

__all__ = ["Rule", "FAdjointRule", "backward_sweep", "sweep_grads", "fadjoint_grads", "check_rule",
           "check_out_adj", "check_finite", "accumulate_grads", "param_names"]


class Rule:
    """The F-adjoint's two-step rule through the tables' verbs (docs/maths.md §1.2, §6.2)."""

    name = "the F-adjoint"
    needs_y = False
    differentiable = True
    consumes_records = False  # step 1 reads only the map records, and may free each once used (FAdjointRule)

    def allowed_map(self, entry) -> bool:
        """Whether this rule can pass its signal through a map with this table entry."""
        return True

    def through_maps(self, layer: LayerRecord, x_adj: Tensor, top: bool) -> Tensor:
        """Step 1: Y*^k = J^T X*^k through every map after the layer, last first."""
        for rec in reversed(layer.maps):
            x_adj = rec.entry.backward(rec.module, rec.saved, x_adj)
        return x_adj

    def through_layer(self, layer: LayerRecord, y_adj: Tensor) -> Tensor:
        """Step 2: X*^{k-1} = J_X(A_k)^T Y*^k."""
        return layer.entry.input_adjoint(layer, y_adj)

    def param_feedback(self, layer: LayerRecord, y_adj: Tensor) -> dict[Tensor, Tensor]:
        """{θ: J_θ(A_k)^T Y*^k} (Linear: Y*ᵀ X^{k-1} and Σ Y*), parameters that require grad only."""
        return layer.entry.param_feedback(layer, y_adj)


class FAdjointRule(Rule):
    """The two-step rule with in-place adjoint buffers (the numbers are ``Rule``'s).

    Below the top layer X*^k is the fresh J_X^T Y*^{k+1} that ``through_layer`` just made, so step 1
    writes into that buffer (``Map.backward_``: autograd's own kernel, ``out=`` form) instead of
    allocating one more tensor per map. X*^L belongs to the caller: never written.

    With ``consume`` (a releasing sweep) each map record is dropped as soon as its backward has run, so
    a pooling's backward does not share the peak with the records above it (autograd frees alike).
    """

    consumes_records = True

    def through_maps(self, layer, x_adj, top, consume: bool = False):
        maps = layer.maps
        if consume:
            layer.maps = []
        for i in range(len(maps) - 1, -1, -1):
            rec = maps.pop() if consume else maps[i]
            x_adj = (rec.entry.backward if top else rec.entry.backward_)(rec.module, rec.saved, x_adj)
        return x_adj


def check_rule(rule: Rule, layers: list[LayerRecord]) -> None:
    """Refuse, before any sweep, records the rule cannot use (one check for every rule's declarations)."""
    for layer in layers:
        if rule.needs_y and layer.y is None:
            raise RuntimeError(f"{layer.describe}: no Y^{layer.k} recorded; {rule.name} needs "
                               "FPropagation(model, keep_pre_activations=True) (its optimizer sets it)")
        for rec in layer.maps:
            kind = type(rec.module).__name__
            if rule.differentiable and not rec.entry.differentiable:
                raise TypeError(f"{rec.name} ({kind}): derivative is 0 almost everywhere, {rule.name} cannot "
                                "train through it; use tfa.optim.LFP")
            if not rule.allowed_map(rec.entry):
                raise TypeError(f"{rec.name} ({kind}): {rule.name} cannot pass its signal through this map")


def peek(signal):
    """The top signal, given as a tensor or in a one-element list (see :func:`take`)."""
    return signal[0] if isinstance(signal, list) else signal


def take(signal):
    """The top signal, emptying the one-element list it may come in: an optimizer's step hands X*^L down so, and
    the sweep then holds its only reference, which it drops once the top op has read it (autograd frees the
    loss's gradient alike; for a language model X*^L is as large as the logits)."""
    return signal.pop() if isinstance(signal, list) else signal


def check_out_adj(net, signal, what: str = "out_adj"):
    """The top signal must have the recorded output's shape, dtype and device. Returns it (a tensor, or the
    one-element list it came in) as a plain ``torch.Tensor``: one computed from a net's returned output is watched
    (``tfa.output``), and the sweep's every tensor would be too, the gradients included."""
    output, tensor = net.output, peek(signal)
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{what}: expected a tensor, got {type(tensor).__name__}")
    if tensor.shape != output.shape or tensor.dtype != output.dtype or tensor.device != output.device:
        raise ValueError(f"{what}: expected shape {tuple(output.shape)}, {output.dtype} on {output.device} (the output "
                         f"of {net.layers[-1].describe if net.layers else 'the model'}), got {tuple(tensor.shape)}, {tensor.dtype} on {tensor.device}")
    if type(tensor) is Tensor or not hasattr(tensor, "_fadjoint_note"):
        return signal
    plain = tensor.as_subclass(Tensor)
    if isinstance(signal, list):
        signal[0] = plain
        return signal
    return plain


def param_names(net, params) -> list[str]:
    """The qualified names (``"2.weight"``) of ``params`` in the wrapped model, for error messages."""
    names: dict[int, str] = {}
    for name, param in net.model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), name)  # a tied parameter is named where it first appears
    return [names.get(id(p), "an unnamed parameter") for p in params]


def check_finite(tensors: list[Tensor], what: str, names=None, reducer=None) -> None:
    """Raise RuntimeError if any tensor holds NaN/Inf (one host sync for the whole list).

    names: where each tensor comes from (a list, or a callable building it, called only on failure).
    reducer: a ``tfa.distributed.GradientAverager``: the flags are AND-ed over the ranks so that every
    rank raises the same error. Fast path: one ``sum`` per tensor (NaN/Inf always make it non-finite);
    a non-finite sum triggers the exact elementwise check, which decides (no false alarm).
    """
    if not tensors:
        return
    fast = torch.stack([t.sum().float() for t in tensors]).isfinite()
    if reducer is not None:
        fast = reducer.all_ranks(fast)
    if bool(fast.all()):
        return
    flags = torch.stack([t.isfinite().all() for t in tensors])
    if reducer is not None:
        flags = reducer.all_ranks(flags)
    if not bool(flags.all()):
        first = int((~flags).nonzero()[0, 0])
        if callable(names):
            names = names()
        where = names[first] if names is not None else f"entry {first}"
        raise RuntimeError(f"{what}: non-finite values in {where}; nothing was changed")


def backward_sweep(layers: list[LayerRecord], signal: Tensor, rule: Rule,
                   on_layer: Callable[[LayerRecord, dict], None], release: bool = True, reducer=None,
                   wait_each: bool = False) -> None:
    """Run ``rule`` from the top layer down, calling ``on_layer(layer, {param: feedback})`` per layer.

    reducer: a ``GradientAverager`` (or None); ``wait_each`` completes every layer's average before its
    ``on_layer`` (for rules that update during the sweep). ``signal``: X*^L, or a one-element list holding it
    (:func:`take`).
    """
    signal = take(signal)
    for k in range(len(layers) - 1, -1, -1):
        layer = layers[k]
        if release and rule.consumes_records:
            layer.x = layer.y = None  # not read by step 1: freed before it
            y_signal = rule.through_maps(layer, signal, top=k == len(layers) - 1, consume=True)
        else:
            y_signal = rule.through_maps(layer, signal, top=k == len(layers) - 1)
        if release:
            layer.release_outputs()  # X^k, Y^k, map records: read by step 1 only (lower peak memory)
        feedback = rule.param_feedback(layer, y_signal)
        if reducer is not None and feedback:
            reducer.launch(list(feedback.values()))
            if wait_each:
                reducer.wait()
        on_layer(layer, feedback)
        if k > 0:
            signal = rule.through_layer(layer, y_signal)
        if release:
            layer.release()
    if reducer is not None:
        reducer.wait()


def sweep_grads(net, layers: list[LayerRecord], signal: Tensor, rule: Rule, *, what: str, validate: bool = True,
                retain_records: bool = False) -> dict[Tensor, Tensor]:
    """Run ``rule`` down the sweep and collect {parameter: feedback}, summing a parameter's contributions
    from several layers (tied weights). Frees the records unless ``retain_records``; clears them if
    anything raises. With ``validate`` a non-finite result raises RuntimeError naming the parameter."""
    grads: dict[Tensor, Tensor] = {}

    def collect(layer, feedback):
        for param, grad in feedback.items():
            grads[param] = grad if param not in grads else grads[param] + grad

    try:
        backward_sweep(layers, signal, rule, collect, release=not retain_records, reducer=net.reducer)
    except BaseException:
        net.clear()
        raise
    if not retain_records:
        net.clear()
    if validate:
        check_finite(list(grads.values()), what, names=lambda: param_names(net, grads))
    return grads


def accumulate_grads(grads: dict[Tensor, Tensor]) -> None:
    """p.grad += g (or p.grad = g when None), as ``loss.backward()`` accumulates."""
    for param, grad in grads.items():
        if param.grad is None:
            param.grad = grad
        else:
            param.grad.add_(grad)


FADJOINT = FAdjointRule()


@torch.no_grad()
def fadjoint_grads(net, out_adj: Tensor, *, validate: bool = True, retain_records: bool = False) -> dict:
    """∂J/∂θ for every parameter of the recorded layers that requires grad, from X*^L (§1.2, §6.2).

    net: an ``FPropagation`` after ``net(x)``; out_adj: X*^L in the output's shape, dtype and device.
    Returns {parameter: gradient}; nothing is written. With ``validate`` a non-finite gradient raises.

    >>> from torch import nn
    >>> from torch_fadjoint import FPropagation
    >>> net = FPropagation(nn.Sequential(nn.Linear(3, 2)))
    >>> out = net(torch.ones(4, 3))
    >>> [tuple(g.shape) for g in fadjoint_grads(net, torch.ones(4, 2)).values()]
    [(2, 3), (2,)]
    """
    layers = net.recorded_layers()
    out_adj = check_out_adj(net, out_adj)
    check_rule(FADJOINT, layers)
    return sweep_grads(net, layers, out_adj, FADJOINT, what="F-adjoint gradients", validate=validate,
                       retain_records=retain_records)
