"""The backward sweep k = L..1, written once (ALGORITHMS.md §1.2); rules plug into it (STYLE P6).

A rule says what it sends down and what it makes of each layer; the sweep owns the traversal:

    signal = X*^L                                      (given: the output adjoint, reward, …)
    for k = L..1:
        y_signal   = rule.through_activations(layer k, signal, top=(k == L))      e.g. Y*^k
        release X^k, Y^k and the activation records of layer k (nothing below reads them)
        grad_w, grad_b = rule.param_feedback(layer k, y_signal)                   e.g. (Y*^k)ᵀ X^{k-1}
        [reducer: start averaging grad_w, grad_b over the ranks (async; waited for before on_layer
         when wait_each, else once after the sweep: torch_fadjoint.distributed)]
        on_layer(layer k, grad_w, grad_b)            the caller collects, or updates W^k now (§2.3)
        signal     = rule.through_linear(layer k, y_signal)    (k > 1)            e.g. Y*^k W^k
        release layer k's X^{k-1}

The default methods are the F-adjoint (§1.2); subclasses override only what differs.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from .recorder import LayerRecord

__all__ = ["Rule", "backward_sweep"]


class Rule:
    """The F-adjoint's two-step rule (ALGORITHMS.md §1.2); other rules override parts of it."""

    def through_activations(self, layer: LayerRecord, x_adj: Tensor, top: bool) -> Tensor:
        """Step 1: Y*^k = X*^k ⊙ σ_k'(Y^k), through every module after the Linear, last first."""
        for act in reversed(layer.activations):
            x_adj = act.derivative.backward(act.module, act.saved, x_adj)
        return x_adj

    def through_linear(self, layer: LayerRecord, y_adj: Tensor) -> Tensor:
        """Step 2: X*^{k-1} = Y*^k W^k, (B, n_{k-1})."""
        return y_adj.mm(layer.module.weight)

    def param_feedback(self, layer: LayerRecord, y_adj: Tensor) -> tuple[Tensor, Tensor | None]:
        """∂J/∂W^k = (Y*^k)ᵀ X^{k-1} (n_k, n_{k-1}) and ∂J/∂b^k = Σ_batch Y*^k (n_k)."""
        grad_w = y_adj.t().mm(layer.x_prev)
        grad_b = y_adj.sum(0) if layer.module.bias is not None else None
        return grad_w, grad_b


def backward_sweep(
    layers: list[LayerRecord],
    signal: Tensor,
    rule: Rule,
    on_layer: Callable[[LayerRecord, Tensor, Tensor | None], None],
    release: bool = True,
    reducer=None,
    wait_each: bool = False,
) -> None:
    """Run ``rule`` from the top layer down, calling ``on_layer`` with each layer's feedback.

    reducer: a ``torch_fadjoint.distributed.GradientAverager`` (or None); ``wait_each`` makes every
    layer's average complete before its ``on_layer`` (for rules that update during the sweep).
    """
    for k in range(len(layers) - 1, -1, -1):
        layer = layers[k]
        y_signal = rule.through_activations(layer, signal, top=k == len(layers) - 1)
        if release:
            layer.release_outputs()  # X^k, Y^k, σ' records: read by step 1 only (lower peak memory)
        grad_w, grad_b = rule.param_feedback(layer, y_signal)
        if reducer is not None:
            reducer.launch([grad_w] + ([grad_b] if grad_b is not None else []))
            if wait_each:
                reducer.wait()
        on_layer(layer, grad_w, grad_b)
        if k > 0:
            signal = rule.through_linear(layer, y_signal)
        if release:
            layer.release()
    if reducer is not None:
        reducer.wait()
