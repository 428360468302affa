"""The equilibrium F-adjoint: its relaxation on the shared sweep (docs/maths.md §2.1–§2.4, §6.3).

Each parametric layer's adjoint state Z^k lives in X^k's shape and is a leaky integrator driven by the
layer above; after K forward-Euler steps of size τ (§2.2) it is, exactly,

    Z^k(K) = drive + f (start − drive),   f = (1 − τ)^K   (e^{−t} in continuous time; 0 at equilibrium:
                                                            steps=None or t=inf)

so the fast path is one fused op per layer (``torch.lerp``); ``relaxation="euler"`` runs the explicit
loop as the reference. Top-down, per layer (§2.2, §2.3, §6.3)::

    k = L:   D = J_maps^T X*^L (Y^L's shape);  Ỹ^L = Z^L(K) toward D, started from X^L (or Y^L when X^L's
             shape differs)    [reference_output_derivative=True: Ỹ^L ⊙ σ_L'(D), the reference quirk, §2.4]
    k < L:   drive = J_X(A_{k+1})^T Ỹ^{k+1};   Ỹ^k = J_maps^T Z^k(K)   (Z ⊙ σ'(Y^k) for an elementwise σ)
    feedback = J_θ(A_k)^T Ỹ^k  (the F-adjoint's verb)

The start (``init``, §6.3, which asks for a default that keeps the finite-K residual below 1e-3 of the
gradient for mean-reduced losses on MLPs and CNNs): ``"forward"`` is the literal X^k of §2.2 (the
reference reproduction, §2.4); ``"scaled"`` is X^k / B, the forward state in the units of a batch-MEAN
loss (what the reference's summed setting amounts to, §6.3's suggestion); ``"zero"``, THE DEFAULT,
starts at 0 (§2.1's other start). Measured at τ = 0.1, K = 100, batch 64, mean cross-entropy on MNIST
(tests/test_cnn_rules.py): "forward" misses the bound by far (784-256-10 MLP: 7.6e-2 on layer 1; a
small CNN: 8.3× on conv1); "scaled" also misses it (MLP 1.2e-3 / 2.5e-3 on layer 1; CNN 0.13 / 0.49 on
conv1: the residual f·X^k/B adds up over the batch and the output positions, X^k ≥ 0 after a ReLU,
while the drive cancels); "zero" meets it on both (1 − (1 − f)^{L−k+1} ≈ 3e-5 per layer), so it is the
default — a finding against §6.3's example, reported, not hidden.

With f = 0, no quirk and ``sequential=False`` the step IS the F-adjoint step (bit for bit).
The optimizer is ``tfa.optim.EquilibriumFAdjoint``: the joint update by default, §2.3's sequential local rule with
``sequential=True`` (which diverges where SGD trains at lr ≥ 0.1 on an MLP: issue 22,
benchmarks/results/equilibrium_stability/REPORT.md).

On a graph (``FPropagation`` recording the tape, docs/maths.md §7.4) :class:`EquilibriumGraphRule` runs the same
relaxation on the tape's sweep (:func:`torch_fadjoint.tape_sweep.sweep_tape`): a state Z_v at every value that is an input
of a parametric op and at the top, each driven by the sum over its uses of their input adjoints, computed exactly
through the parameter-free ops in between; a parametric op's feedback is J_θᵀ of the adjoint at its output. The
zero start is the default there too (the residual compounds along a path: about d·f for d states on it). The
sequential rule walks the parametric ops in reverse execution order and updates a parameter used by several ops
once, after all its uses have their feedback. ``reference_output_derivative`` is refused on a graph.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ..layers import LayerRecord
from ..sweep import Rule, check_finite, check_out_adj, check_rule, param_names, sweep_grads
from ..tape import Tape, _Op
from ..tape_sweep import TapeRule

__all__ = ["EquilibriumRule", "EquilibriumGraphRule", "equilibrium_grads", "relaxation_factor", "INITS",
           "RELAXATIONS"]

INITS = ("zero", "scaled", "forward")
RELAXATIONS = ("closed_form", "euler")


def relaxation_factor(tau: float = 0.1, steps: int | None = 100, t: float | None = None) -> float:
    """f with Z(K) = drive + f (start − drive): (1 − τ)^K, e^{−t} if ``t`` is given, 0 at equilibrium.

    >>> relaxation_factor(0.5, 2), relaxation_factor(t=0.0), relaxation_factor(steps=None)
    (0.25, 1.0, 0.0)
    """
    check_relaxation(tau, steps, t)
    if t is not None:
        return 0.0 if math.isinf(t) else math.exp(-t)
    if steps is None:
        return 0.0
    return (1.0 - tau) ** steps


def check_relaxation(tau, steps, t, init: str = "zero", relaxation: str = "closed_form") -> None:
    """ValueError naming the argument: τ ∈ (0, 1], K an int ≥ 0 or None, t ≥ 0 or None, init, relaxation."""
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0.0 < float(tau) <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0):
        raise ValueError(f"steps must be an int >= 0 or None (equilibrium), got {steps!r}")
    if t is not None and (isinstance(t, bool) or not isinstance(t, numbers.Real) or not float(t) >= 0.0):
        raise ValueError(f"t must be a number >= 0 (inf: equilibrium) or None, got {t!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if relaxation not in RELAXATIONS:
        raise ValueError(f"relaxation must be one of {RELAXATIONS}, got {relaxation!r}")
    if relaxation == "euler" and (t is not None or steps is None):
        raise ValueError("relaxation='euler' runs K = steps discrete steps: needs an int steps and t=None")


class EquilibriumRule(Rule):
    """The §2.2 relaxation plugged into the shared sweep (STYLE P6); only ``through_maps`` differs.

    ``through_maps(layer k, signal, top)``: ``signal`` is X*^L (top) or the drive J_X^T Ỹ^{k+1};
    returns Ỹ^k in Y^k's shape. ``through_layer`` and ``param_feedback`` are the F-adjoint's.
    """

    name = "the equilibrium F-adjoint"

    def __init__(self, tau: float = 0.1, steps: int | None = 100, t: float | None = None, init: str = "zero",
                 reference_output_derivative: bool = False, relaxation: str = "closed_form"):
        check_relaxation(tau, steps, t, init, relaxation)
        self.tau, self.steps, self.t, self.init = tau, steps, t, init
        self.reference_output_derivative = bool(reference_output_derivative)
        self.relaxation = relaxation
        self.factor = relaxation_factor(tau, steps, t)

    def allowed_map(self, entry) -> bool:
        return not self.reference_output_derivative or entry.elementwise  # σ'(D) needs an elementwise map

    def relax(self, start: Tensor, drive: Tensor) -> Tensor:
        """Z(K) from ``start`` (the forward state, before ``init``) under a constant drive (§2.2)."""
        if self.init == "scaled":
            start = start / start.shape[0]
        if self.relaxation == "euler":
            state = start.clone() if self.init != "zero" else torch.zeros_like(drive)
            for _ in range(self.steps):
                state = state - self.tau * (state - drive)
            return state
        if self.factor == 0.0:
            return drive  # equilibrium: exactly the F-adjoint's signal
        if self.init == "zero":
            return drive * (1.0 - self.factor)
        return torch.lerp(drive, start, self.factor)  # drive + f (start − drive), one fused op

    def through_maps(self, layer: LayerRecord, signal: Tensor, top: bool) -> Tensor:
        if not top:
            return super().through_maps(layer, self.relax(layer.x, signal), top)
        drive = super().through_maps(layer, signal, top)  # D = J_maps^T X*^L, in Y^L's shape
        start = layer.x if layer.x.shape == drive.shape else layer.y
        if start is None:
            raise RuntimeError(f"{layer.describe}: X^L's shape {tuple(layer.x.shape)} is not Y^L's "
                               f"{tuple(drive.shape)}; the top state starts from Y^L, which needs "
                               "FPropagation(model, keep_pre_activations=True)")
        y_tilde = self.relax(start, drive)
        if self.reference_output_derivative:
            for rec in reversed(layer.maps):  # the extra σ_L'(D) of the reference code (§2.4)
                y_tilde = y_tilde * rec.entry.df_at(rec.module, drive)
        return y_tilde


def check_graph_options(reference_output_derivative: bool) -> None:
    """ValueError for an option the graph rule does not define (docs/maths.md §7.4)."""
    if reference_output_derivative:
        raise ValueError("reference_output_derivative=True: the reference code's quirk (docs/maths.md §2.4) is defined "
                         "on a chain's top layer, not on a graph (FPropagation(model, graph=False) for the reference)")


class EquilibriumGraphRule(TapeRule):
    """The equilibrium F-adjoint on the tape (docs/maths.md §7.4): §2.2's relaxation at the states of the graph,
    the F-adjoint's exact adjoints through every op in between.

    States: every value that is an input of a parametric op (an op with a parameter among its inputs; not the
    model's inputs), and the top state: the output of the last parametric op when only parameter-free ops of one
    value each follow it (a chain's Y^L, §6.3), else the model's output. A state's drive is the sum over its uses
    of their input adjoints (the sweep's fan-out sum); its relaxed Z(K) is what its producing op sends back
    (:meth:`EquilibriumRule.relax`: f = 0 returns the drive itself, so K → ∞ is the F-adjoint bit for bit). The
    "forward" and "scaled" starts read the states' values (``keep_pre_activations=True``); the top state starts
    from X^L when it has X^L's shape, as on the chain.

    ``on_update(feedback, bottom)`` (the sequential rule, §2.3): at each parametric op, in reverse execution order,
    the parameter feedback J_θᵀ O* comes first; a parameter is handed to ``on_update`` once the last of its uses
    has been swept (its feedback summed over them), and the op's value adjoints are then computed with the
    updated weights; ``bottom`` marks the last update of the sweep, after which nothing more is computed.
    """

    name = "the equilibrium F-adjoint"

    def __init__(self, tau: float = 0.1, steps: int | None = 100, t: float | None = None, init: str = "zero",
                 relaxation: str = "closed_form", on_update=None):
        self.relaxer = EquilibriumRule(tau, steps, t, init, False, relaxation)  # validates them
        self.keeps_values = init != "zero"
        if self.keeps_values:
            self.name = f"the equilibrium F-adjoint with init={init!r}"
        self.on_update = on_update
        self.states: set[int] = set()
        self.top: int | None = None
        self.remaining: dict = {}    # parameter → its uses not swept yet (sequential)
        self.pending: dict = {}      # parameter → its feedback summed over the uses swept so far
        self.outstanding = 0         # parameters not handed to on_update yet
        self.done = False

    # -- the plan, before anything is computed --------------------------------------------------------------
    def check(self, tape: Tape) -> None:
        super().check(tape)
        self.states, self.top = graph_states(tape)
        self.done = False
        if self.on_update is None:
            return
        live, remaining = {tape.output}, {}  # the ops the sweep will reach (those it skips: sweep_tape's test)
        for op in reversed(tape.ops):
            if not op.needed or not any(i in live for i in op.outputs if i >= 0):
                continue
            for key in op.needed:
                kind, target = op.inputs[key]
                if kind == "value":
                    live.add(target)
                else:
                    remaining[target] = remaining.get(target, 0) + 1
        self.remaining, self.pending, self.outstanding = remaining, {}, len(remaining)

    def finish(self) -> None:
        """RuntimeError if a parameter the plan counted was never handed over (the sweep did not reach a use)."""
        if self.on_update is not None and self.outstanding:
            raise RuntimeError("the sequential equilibrium F-adjoint: a parameter's use was not reached by the sweep; "
                               "the step is undone")

    # -- the relaxation -----------------------------------------------------------------------------------
    def _start(self, tape: Tape, index: int, drive: Tensor) -> Tensor | None:
        if not self.keeps_values:
            return None  # the zero start reads nothing
        if index == self.top and index != tape.output and tape.output_tensor.shape == drive.shape:
            return tape.output_tensor  # the top state at Y^L starts from X^L (§6.3)
        return tape.kept[index][0]

    def _relax(self, tape: Tape, index: int, drive):
        if drive is None or index not in self.states:
            return drive
        return self.relaxer.relax(self._start(tape, index, drive), drive)

    def relaxed(self, tape: Tape, op: _Op, out_signal):
        """The signal at ``op``'s outputs with every state's drive replaced by its Z(K)."""
        if op.single:
            return self._relax(tape, op.outputs[0], out_signal)
        return tuple(self._relax(tape, i, s) for i, s in zip(op.outputs, out_signal))

    def through_op(self, tape: Tape, op: _Op, out_signal) -> dict:
        if self.done:
            return {}  # the last update is written: nothing below is read
        out_signal = self.relaxed(tape, op, out_signal)
        params = [key for key in op.needed if op.inputs[key][0] == "param"]
        if self.on_update is None or not params:
            return super().through_op(tape, op, out_signal)
        values = [key for key in op.needed if op.inputs[key][0] == "value"]
        feedback = self._adjoints(op, out_signal, params)
        ready = {}
        for key in params:
            param, adjoint = op.inputs[key][1], feedback.get(key)
            if adjoint is not None:
                self.pending[param] = adjoint if param not in self.pending else self.pending[param] + adjoint
            self.remaining[param] -= 1
            if self.remaining[param] == 0:  # every use has its feedback: θ is updated once (§7.4)
                self.outstanding -= 1
                if param in self.pending:
                    ready[param] = self.pending.pop(param)
        if self.remaining and (ready or self.outstanding == 0):
            self.on_update(ready, self.outstanding == 0)
        if self.outstanding == 0:
            self.done = True
            return {}
        found = {key: feedback.get(key) for key in params}
        if values:  # through the op with the weights it just updated (§2.3)
            adjoints = self._adjoints(op, out_signal, values)
            found.update({key: adjoints.get(key) for key in values})
        return found

    @staticmethod
    def _adjoints(op: _Op, out_signal, keys: list) -> dict:
        if getattr(op.entry, "takes_needed", False):
            return op.entry.input_adjoints(op.saved, out_signal, needed=frozenset(keys))
        return op.entry.input_adjoints(op.saved, out_signal)  # every input's (BatchNorm: one kernel)


def graph_states(tape: Tape) -> tuple[set[int], int]:
    """The value indices that carry an equilibrium state (docs/maths.md §7.4), the top state's included, and the
    top state's index."""
    states = {target for op in tape.ops if any(kind == "param" for kind, _ in op.inputs.values())
              for kind, target in op.inputs.values() if kind == "value"}
    top = tape.output
    if top not in states:  # walk back over a chain's top maps to Y^L (§6.3)
        producer = {i: op for op in tape.ops for i in op.outputs if i >= 0}
        uses: dict[int, int] = {}
        for op in tape.ops:
            for kind, target in op.inputs.values():
                if kind == "value":
                    uses[target] = uses.get(target, 0) + 1
        value = top
        while (op := producer.get(value)) is not None and op.single:
            if any(kind == "param" for kind, _ in op.inputs.values()):
                top = value
                break
            inputs = [target for kind, target in op.inputs.values() if kind == "value"]
            if len(inputs) != 1 or uses[inputs[0]] != 1:
                break
            value = inputs[0]
    return states | {top}, top


@torch.no_grad()
def equilibrium_grads(net, out_adj: Tensor, *, tau: float = 0.1, steps: int | None = 100, t: float | None = None,
                      init: str = "zero", reference_output_derivative: bool = False,
                      relaxation: str = "closed_form", validate: bool = True,
                      retain_records: bool = False) -> dict[Tensor, Tensor]:
    """The non-sequential equilibrium feedback (§2.2, ``sequential=False``): {param: ∂}, nothing written.

    out_adj: X*^L in the output's shape. Every drive uses the current weights, so any torch optimizer
    can consume the result. With steps=None (or t=inf) and no quirk it equals ``fadjoint_grads``.

    >>> from torch import nn
    >>> from torch_fadjoint import FPropagation
    >>> net = FPropagation(nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2)))
    >>> out = net(torch.ones(5, 3))
    >>> [tuple(g.shape) for g in equilibrium_grads(net, torch.ones(5, 2)).values()]
    [(2, 4), (2,), (4, 3), (4,)]
    """
    rule = EquilibriumRule(tau, steps, t, init, reference_output_derivative, relaxation)
    if net.graph:  # the tape (docs/maths.md §7.4)
        check_graph_options(reference_output_derivative)
        graph_rule = EquilibriumGraphRule(tau, steps, t, init, relaxation)
        grads = net.graph_grads(out_adj, retain_records=retain_records, rule=graph_rule)
        if net.reducer is not None and grads:
            net.reducer.launch(list(grads.values()))
            net.reducer.wait()
        if validate:
            check_finite(list(grads.values()), "equilibrium F-adjoint gradients",
                         names=lambda: param_names(net, grads))
        return grads
    layers = net.recorded_layers()
    out_adj = check_out_adj(net, out_adj)
    check_rule(rule, layers)
    return sweep_grads(net, layers, out_adj, rule, what="equilibrium F-adjoint gradients", validate=validate,
                       retain_records=retain_records)
