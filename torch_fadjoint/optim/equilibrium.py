"""``EquilibriumFAdjoint``: the learning rule of the equilibrium F-adjoint (docs/maths.md §2.3), its local,
sequential form behind ``sequential=True``.

A thin optimizer over :mod:`torch_fadjoint.rules.equilibrium` (the relaxation on the shared sweep).
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

from ..recorder import FPropagation
from ..rules.equilibrium import (EquilibriumGraphRule, EquilibriumRule, check_graph_options, check_relaxation,
                                 equilibrium_grads)
from ..sweep import backward_sweep, check_rule, param_names
from .base import UPDATE_FAILS, RuleOptimizer

__all__ = ["EquilibriumFAdjoint", "equilibrium_grads"]


class EquilibriumFAdjoint(RuleOptimizer):
    r"""The equilibrium F-adjoint's learning rule (docs/maths.md §2.3, §6.3) with SGD's update (§1.4).

    .. code-block:: text

        input: recorded F-propagation, target, lr, μ, dampening, λ, nesterov; τ, K (or t), init
        f = (1 − τ)^K | e^{−t} | 0;   signal = X*^L (closed form, §1.3)
        for k = L..1:
            drive = J_maps^T X*^L (k = L) | J_X(A_{k+1})^T Ỹ^{k+1} (k < L; A_{k+1} already updated if sequential)
            Z = drive + f (start − drive),  start = 0 ("zero") | X^k / B ("scaled") | X^k ("forward")
            Ỹ^k = Z (k = L; ⊙ σ_L'(drive) with reference_output_derivative) | J_maps^T Z (k < L)
            g = J_θ(A_k)^T Ỹ^k;   θ_k ← SGD(θ_k; g)   (sequential=True: now, before layer k−1's drive)
        sequential=False (THE DEFAULT): every drive uses the old weights, then all layers update together.

    Args (beyond FAdjoint's): ``tau`` ∈ (0, 1], ``steps`` K ≥ 0 (None: equilibrium), ``t`` ≥ 0 continuous
    time (overrides tau/steps; inf: equilibrium), ``init`` "zero" | "scaled" | "forward" (§6.3: the default
    changed from "forward", which stays the reference reproduction; "zero" is the start measured to keep the
    finite-K residual below 1e-3 of the gradient on MLPs and CNNs, see torch_fadjoint.rules.equilibrium),
    ``sequential`` (default False, issue 22; True is §2.3's local rule), ``reference_output_derivative``
    (§2.4's quirk), ``relaxation`` "closed_form" | "euler". They live in each parameter group (``state_dict``
    carries them; a scheduler may change them) and are read from the group of the top layer's first parameter
    at every step.

    Why the joint update is the default (benchmarks/results/equilibrium_stability/REPORT.md): the sequential
    look-ahead changes layer k's feedback by a term of order lr (on an MLP's first layer exactly
    −lr·∇_{W¹} ½‖g²‖², g² the top layer's feedback), so each update adds lr² × a gradient ASCENT step on
    ‖g²‖², which feeds itself. With mean cross-entropy, momentum 0, one epoch of 20 000 MNIST images, 3 seeds,
    ``sequential=True`` diverged on a 784-256-10 ReLU MLP at lr 0.1 and 0.3 and on a small CNN at lr ≥ 0.03
    where SGD trains (every start; "forward" only delays it), while ``sequential=False`` trained wherever SGD
    did. With the default start its step is the F-adjoint's times (1 − f)^{L−k+1} per layer.

    ``.grad`` holds each parameter's g after the step. In sequential mode the parameters, ``.grad`` and
    momentum buffers of layers L..2 are copied before their in-place update and restored if anything
    raises later in the step (one copy of those tensors per step); with ``validate`` a non-finite g or
    update raises before layer 1 is written. A parameter used by two layers is refused in sequential mode.

    On a graph (docs/maths.md §7.4: any model ``FPropagation`` records on the tape) the states sit at the inputs of
    the parametric ops and at the top; ``sequential=True`` walks the parametric ops in reverse execution order,
    updates a parameter used by several ops once, after the last of its uses has its feedback, and gives the
    same guarantee (every write but the last copied first and put back if anything raises later). The starts
    "forward" and "scaled" read the recorded values: the optimizer sets ``keep_pre_activations`` on a graph net
    for them. ``reference_output_derivative`` is refused on a graph.

    >>> from torch import nn
    >>> net = FPropagation(nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 3), nn.Sigmoid()))
    >>> opt = EquilibriumFAdjoint(net, lr=0.5, tau=0.1, steps=100, loss="mse")
    >>> out = net(torch.randn(16, 4))
    >>> loss = opt.step(target=torch.randint(0, 3, (16,)))
    """

    def __init__(self, net: FPropagation, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, tau: float = 0.1, steps: int | None = 100,
                 t: float | None = None, init: str = "zero", sequential: bool = False,
                 reference_output_derivative: bool = False, relaxation: str = "closed_form",
                 maximize: bool = False, foreach: bool | None = None, loss="mse", loss_kwargs: dict | None = None,
                 validate=None, params=None):
        check_relaxation(tau, steps, t, init, relaxation)
        if not isinstance(sequential, bool):
            raise ValueError(f"sequential must be True or False, got {sequential!r}")
        defaults = self._sgd_defaults(lr, momentum, dampening, weight_decay, nesterov, maximize, foreach)
        defaults.update(tau=tau, steps=steps, t=t, init=init, sequential=sequential, relaxation=relaxation,
                        reference_output_derivative=bool(reference_output_derivative))
        super().__init__(net, params, defaults, loss=loss, loss_kwargs=loss_kwargs, validate=validate)
        if net.graph and init != "zero":
            net.keep_pre_activations = True  # the start reads the states' values (§7.4); for later forwards

    def _check_groups(self) -> None:
        super()._check_groups()
        for group in self.param_groups:
            check_relaxation(group["tau"], group["steps"], group["t"], group["init"], group["relaxation"])

    def _group(self, param) -> dict:
        group = self._group_of().get(param) if param is not None else None
        return group if group is not None else self.param_groups[0]

    def _rule(self, layers) -> tuple[EquilibriumRule, bool]:
        top = layers[-1].params
        group = self._group(top[0] if top else None)
        rule = EquilibriumRule(group["tau"], group["steps"], group["t"], group["init"],
                               group["reference_output_derivative"], group["relaxation"])
        return rule, group["sequential"]

    def _graph_group(self) -> dict:
        """The group of the last parametric op's first parameter (the graph's top layer)."""
        tape = self.net._tape
        for op in reversed(tape.ops if tape is not None else []):
            for kind, target in op.inputs.values():
                if kind == "param":
                    return self._group(target)
        return self._group(None)

    def _rule_step(self, out_adj: Tensor) -> None:
        if self.net.graph:
            return self._graph_step(out_adj)
        layers = self.net.recorded_layers()
        rule, sequential = self._rule(layers)
        check_rule(rule, layers)
        if not sequential:
            self._apply_sgd(equilibrium_grads(self.net, out_adj, tau=rule.tau, steps=rule.steps, t=rule.t,
                                              init=rule.init, relaxation=rule.relaxation,
                                              reference_output_derivative=rule.reference_output_derivative,
                                              validate=False))  # the update bounds check them
            return
        tied = [p for p, n in Counter(p for layer in layers for p in layer.params).items() if n > 1]
        if tied:
            raise ValueError(f"EquilibriumFAdjoint(sequential=True): {param_names(self.net, tied)[0]} is used by two "
                             "layers, and the sequential rule updates each layer during the sweep; use sequential=False")
        undo: list[tuple] = []
        try:
            backward_sweep(layers, out_adj, rule, lambda layer, feedback: self._update_now(
                feedback, layer is layers[0], undo), reducer=self.net.reducer, wait_each=True)
        except BaseException:
            self._undo(undo)
            raise
        finally:
            self.net.clear()

    def _graph_step(self, out_adj: Tensor) -> None:
        """The rule on the tape (docs/maths.md §7.4)."""
        group = self._graph_group()
        check_graph_options(group["reference_output_derivative"])
        kwargs = dict(tau=group["tau"], steps=group["steps"], t=group["t"], init=group["init"],
                      relaxation=group["relaxation"])
        if not group["sequential"]:
            self._apply_sgd(equilibrium_grads(self.net, out_adj, **kwargs, validate=False))  # the bounds check them
            return
        undo: list[tuple] = []
        reducer = self.net.reducer

        def update_now(feedback, bottom) -> None:
            if reducer is not None and feedback:
                reducer.launch(list(feedback.values()))
                reducer.wait()
            self._update_now(feedback, bottom, undo)

        rule = EquilibriumGraphRule(**kwargs, on_update=update_now)
        try:
            self.net.graph_grads(out_adj, rule=rule)
            rule.finish()
        except BaseException:
            self._undo(undo)
            raise
        finally:
            self.net.clear()

    def _update_now(self, feedback: dict, bottom: bool, undo: list) -> None:
        """§2.3's update of one layer (or of the parameters whose last use a graph's sweep just passed) during the
        sweep. Every write but the last (``bottom``) is copied first into ``undo`` (param, old value, old .grad, old
        momentum buffer, had state) and checked; the last is decided with every check in, before it is written."""
        plan = self._sgd_plan(feedback)
        if bottom or not self.guard.checks_on_host:  # bounds read before the write (async: on the device now)
            self._require_sgd_bounds(plan, "EquilibriumFAdjoint step")  # the gradient is in each bound
        if bottom:  # every check is in: decide before the last write
            self.guard.commit()
        else:
            for _, params, _, bufs in plan:
                for param, buf in zip(params, bufs):
                    undo.append((param, param.clone(), param.grad, None if buf is None else buf.clone(),
                                 param in self.state))
        self._write_sgd(plan, masked=bottom)  # upper layers are written before the checks: kept, put back
        if not bottom and self.guard.checks_on_host:  # validate=True reads at the bottom: what was written
            written = [t for _, params, _, _ in plan for p in params
                       for t in (p, self.state.get(p, {}).get("momentum_buffer")) if t is not None]
            self.guard.require_finite(written, "EquilibriumFAdjoint step", names=lambda: [
                f"the update of {n} ({UPDATE_FAILS})" for _, params, _, _ in plan
                for n, p in zip(param_names(self.net, params), params)
                for t in (p, self.state.get(p, {}).get("momentum_buffer")) if t is not None])

    def _undo(self, undo: list) -> None:
        """Put back what the sequential step wrote before it raised."""
        for param, value, grad, buf, had_state in reversed(undo):
            param.copy_(value)
            param.grad = grad
            if buf is not None:
                self.state[param]["momentum_buffer"] = buf
            elif not had_state:
                self.state.pop(param, None)
            else:
                self.state[param].pop("momentum_buffer", None)
