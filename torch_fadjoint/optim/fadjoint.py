"""``FAdjoint``: the F-adjoint sweep + torch.optim.SGD's update (docs/maths.md §1.2–§1.4, §6.2).

The rule itself is :func:`torch_fadjoint.sweep.fadjoint_grads` (below the optimizers); this module is
the thin optimizer over it, and the fused variant that folds SGD into the weight-gradient GEMM.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

from ..recorder import FPropagation
from ..sweep import FADJOINT, FAdjointRule, backward_sweep, check_out_adj, check_rule, fadjoint_grads, param_names, sweep_grads
from .base import UPDATE_FAILS, RuleOptimizer
from .functional import fused_sgd_weight_update, sgd_update_bound
from .guard import Term, _foreach_norm, rounding_slack, scaled

__all__ = ["FAdjoint", "fadjoint_grads"]


class _Factors(tuple):
    """(Y*^k, X^{k-1}) as 2-d matrices: the weight gradient Y*ᵀX left unmultiplied."""


def _smaller_factors(layer, y_adj, weight: Tensor) -> tuple[Tensor, Tensor] | None:
    """(Y*, X^{k-1}) as matrices when the layer's weight gradient Y*ᵀX has factors that hold fewer numbers than the
    ``weight`` itself (a Linear at a small batch), else None (the gradient is smaller: it is made and read)."""
    factors = getattr(layer.entry, "weight_factors", None)
    if factors is None:
        return None
    y_adj2d, x_prev2d = factors(layer, y_adj)
    return (y_adj2d, x_prev2d) if y_adj2d.numel() + x_prev2d.numel() < weight.numel() else None


class _FactoredRule(FAdjointRule):
    """The F-adjoint sweep, with each fusable weight's gradient left as its factors."""

    def __init__(self, fusable):
        self.fusable = fusable

    def param_feedback(self, layer, y_adj):
        weight = getattr(layer.module, "weight", None)
        factors = _smaller_factors(layer, y_adj, weight) if self.fusable(weight) else None
        if factors is None:
            return super().param_feedback(layer, y_adj)
        feedback = {weight: _Factors(factors)}
        bias = layer.module.bias
        if bias is not None and bias.requires_grad:
            feedback[bias] = y_adj.reshape(-1, y_adj.shape[-1]).sum(0)
        return feedback


class _BoundedRule(FAdjointRule):
    """The F-adjoint sweep, noting for each weight whose gradient G = Y*ᵀX has smaller factors than itself the
    factors' norms: every |G_ij| ≤ ‖Y*‖·‖X‖, so the update's bound reads B·(n + m) numbers, not n·m. The norms are
    taken at once (one ``_foreach_norm`` per layer): keeping Y* and X until the step's one read would hold them
    through the sweep and raise its peak (13 % at 784-1024-1024-10, batch 128)."""

    def __init__(self):
        self.norms: dict[Tensor, tuple] = {}
        self.uses: dict[int, int] = {}

    def param_feedback(self, layer, y_adj):
        feedback = super().param_feedback(layer, y_adj)
        uses = self.uses
        for param in feedback:
            uses[id(param)] = uses.get(id(param), 0) + 1
        weight = getattr(layer.module, "weight", None)
        factors = _smaller_factors(layer, y_adj, weight) if weight is not None and weight in feedback else None
        if factors is not None:  # float32 norms at least (float16)
            self.norms[weight] = (tuple(_foreach_norm(list(factors))), rounding_slack(factors[0].shape[0],
                                                                                      factors[0].dtype))
        return feedback

    def grad_terms(self) -> dict[Tensor, tuple]:
        """(the factors' norms (0-dim), the GEMM's rounding slack) of weights used once (a tied weight's summed
        gradient is read itself)."""
        return {w: norms for w, norms in self.norms.items() if self.uses[id(w)] == 1}


class FAdjoint(RuleOptimizer):
    r"""F-adjoint sweep + ``torch.optim.SGD``'s update (docs/maths.md §1.2–§1.4, §6.2).

    .. code-block:: text

        input: recorded F-propagation, target t, lr, μ, dampening, λ, nesterov
        X*^L = ∂J/∂X^L (closed form, §1.3)
        for k = L..1:  Y*^k = J_maps^T X*^k;  g_θ = J_θ(A_k)^T Y*^k;  X*^{k-1} = J_X(A_k)^T Y*^k
        θ ← SGD(θ, g)  (momentum, dampening, Nesterov, weight decay, maximize)

    ``step(target=t)`` writes g into ``.grad`` (replacing it) and updates the parameters this forward
    used (frozen ones get neither); it equals ``opt.zero_grad(); loss.backward(); torch.optim.SGD.step()``
    to rounding.

    ``fuse_update=True`` folds each Linear weight's update into the GEMM that would make its gradient
    (``fused_sgd_weight_update``): ∂J/∂W is never materialised and ``.grad`` is not written. A weight
    whose factors (Y*, X^{k-1}) hold more numbers than the weight itself (small layers, large batches)
    has its gradient made at once instead, so the step never keeps more than the unfused one; other
    layers (convolutions, normalisation) and tied weights use the unfused update, in the same step. Parameters change only after the whole sweep (an exception inside it leaves them as they were,
with or without ``validate``); the factors wait until then. With ``validate`` every update is
    bounded before any write (B·max|Y*|·max|X| for a fused product); equal to the unfused step to
    rounding, not bit for bit. Not with Nesterov or a process group.

    >>> from torch import nn
    >>> net = FPropagation(nn.Sequential(nn.Linear(4, 3)))
    >>> opt = FAdjoint(net, lr=0.1, momentum=0.9)
    >>> out = net(torch.randn(8, 4))
    >>> loss = opt.step(target=torch.randint(0, 3, (8,)))
    """

    consumes_signal = True  # X*^L is freed once the top layer has read it (sweep.take)

    def __init__(self, net: FPropagation, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, loss="cross_entropy", loss_kwargs: dict | None = None,
                 validate=None, fuse_update: bool = False, params=None):
        defaults = self._sgd_defaults(lr, momentum, dampening, weight_decay, nesterov, maximize, foreach)
        super().__init__(net, params, defaults, loss=loss, loss_kwargs=loss_kwargs, validate=validate)
        self.fuse_update = bool(fuse_update)
        if fuse_update:
            self._check_fusable()
            net.require_chain("FAdjoint(fuse_update=True)")  # last: the fused update runs inside the chain's sweep

    def _rule_step(self, out_adj: Tensor) -> None:
        if self.net.graph:  # the tape's sweep (docs/maths.md §7.1); the gradient is read by its bound
            if self.fuse_update:
                raise ValueError("fuse_update=True: not on a graph (FPropagation(graph=True)) yet; use fuse_update=False")
            self._apply_sgd(self.net.graph_grads(out_adj))
            return
        if self.fuse_update:
            self._fused_step(out_adj)
        else:
            self._unfused_step(out_adj)

    def _unfused_step(self, out_adj: Tensor) -> None:
        """The sweep, then SGD; with validate each update is bounded from the weights' factors where they are
        smaller than the gradient (no process group: there the update reads the averaged gradient), else
        from the gradient itself (NaN/Inf in either make the bound fail: no separate gradient check)."""
        if not self.guard.active or self.net.reducer is not None:
            self._apply_sgd(fadjoint_grads(self.net, out_adj, validate=False))
            return
        layers = self.net.recorded_layers()
        out_adj = check_out_adj(self.net, out_adj)
        check_rule(FADJOINT, layers)
        rule = _BoundedRule()
        grads = sweep_grads(self.net, layers, out_adj, rule, what="F-adjoint gradients", validate=False)
        self._apply_sgd(grads, grad_terms=rule.grad_terms())

    def _check_fusable(self) -> None:
        if self.net.reducer is not None:
            raise ValueError("fuse_update=True: not with a process_group (each rank's gradient must be averaged "
                             "before the update); use fuse_update=False")
        if any(group["nesterov"] for group in self.param_groups):
            raise ValueError("fuse_update=True: Nesterov momentum needs the gradient itself; use nesterov=False or "
                             "fuse_update=False")

    def _fused_step(self, out_adj: Tensor) -> None:
        """Every update is applied after the sweep (so an exception inside it changes nothing), fused products
        first; with ``validate`` after every bound is checked."""
        self._check_fusable()
        layers = self.net.recorded_layers()
        check_rule(FADJOINT, layers)
        group_of = self._group_of()
        uses = Counter(p for layer in layers for p in layer.params)
        rule = _FactoredRule(lambda w: w is not None and w.requires_grad and uses[w] == 1 and w in group_of)
        fused: list[tuple[Tensor, _Factors]] = []
        grads: dict[Tensor, Tensor] = {}

        def collect(layer, feedback):
            for param, update in feedback.items():
                if isinstance(update, _Factors):
                    fused.append((param, update))
                elif param in group_of:
                    grads[param] = update if param not in grads else grads[param] + update

        try:
            backward_sweep(layers, out_adj, rule, collect)
        except BaseException:
            self.net.clear()
            raise
        self.net.clear()
        fused_bufs = {w: self._momentum_buffer(w, group_of[w]) for w, _ in fused}  # checked before any write
        if self.guard.active and fused:
            entries = []
            for weight, (y_adj, x_prev) in fused:  # every entry of Y*ᵀX: ≤ B·max|Y*|·max|X|, ≤ ‖Y*‖·‖X‖
                group = group_of[weight]
                term = Term(1, y_adj, x_prev, rows=y_adj.shape[0])
                slack = rounding_slack(y_adj.shape[0] + 1, y_adj.dtype)  # one addmm rounds every value it makes
                for terms in sgd_update_bound(weight, term, fused_bufs[weight], **self._hyper(group)):
                    entries.append((weight, scaled(terms, slack)))
            self.guard.require_bounded(entries, "F-adjoint step", lambda: [
                f"the update of {name} (fused: {UPDATE_FAILS})" for name in param_names(self.net, [w for w, _ in entries])])
        self.guard.require_finite(list(grads.values()), "F-adjoint gradients",  # top layer first (read once)
                                  names=lambda: param_names(self.net, grads))
        plan = self._sgd_plan(grads)
        self._require_sgd_bounds(plan)  # bounds every materialised update
        self.guard.commit()
        for weight, factors in fused:
            self._fused_update(group_of[weight], weight, factors, fused_bufs[weight])
        self._write_sgd(plan, write_grad=False)

    def _fused_update(self, group, weight, factors, buf) -> None:
        bufs = [buf]
        guard = self.guard
        ok = guard.ok()  # async: every check is in; the writes are masked by it
        if guard.mode == "async":
            guard.undo.append(self._undo_of([], [weight] if group["momentum"] and buf is None else []))
        fused_sgd_weight_update([weight], [factors], bufs, **self._hyper(group), foreach=False, ok=ok)
        if group["momentum"] != 0:
            self.state[weight]["momentum_buffer"] = bufs[0]
