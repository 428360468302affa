"""Consequentialism and NLMS mini-batch updates on exact F-adjoint deltas (docs/maths.md §4).

The backward signals are the F-adjoint's (§1.2): Δ^k = Y*^k (B, n_k). Each layer's update direction
is then normalised by the inputs it saw. With X̃ = [X^{k-1}, 1] (B, n_{k-1}+1; the bias folded in)
and δ > 0::

    lms               G^k = (Δ^k)ᵀ X̃                                         plain backprop
    nlms              G^k = B · (Δ^k)ᵀ diag(1 / (‖x̃_b‖² + δ)) X̃               per sample
    consequentialism  K = X̃ X̃ᵀ + δ I_B,   G^k = B · (Δ^k)ᵀ K⁻¹ X̃             affine projection
    grad_w = G^k[:, :-1],  grad_b = G^k[:, -1]

One plain step θ ← θ − η G moves the batch's pre-activations by ΔY = −η B X̃ X̃ᵀ K⁻¹ Δ → −η B Δ as
δ → 0 (B ≤ n_{k-1} + 1): every sample moves by its own per-sample delta B·Δ_b (Δ is the delta of the
batch-MEAN loss, hence the factor B, which puts η in NLMS units: stable for 0 < η < 2), with no
cross-talk between samples. NLMS does the same for each sample alone (exact at B = 1).

Choices (§4 names them; these are ours where it leaves room):

* δ = ``delta`` when given (absolute), else ``delta_rel`` · mean_b ‖x̃_b‖² per layer (default 1e-3),
  computed on the device without a host sync.
* K⁻¹Δ by Cholesky (``torch.linalg.cholesky_ex`` + ``cholesky_solve``), never an explicit inverse;
  with ``validate`` a failed factorisation raises (one host sync with the finite check).
* A Linear without bias uses X̃ = X^{k-1} (no column of ones).
* ``"lms"`` is NOT multiplied by B: it is exactly the F-adjoint gradient (a test checks it).
* K and ‖x̃‖² use X^{k-1}Xᵀ + 1 rather than forming [X, 1] (same numbers, no copy).

Beyond Linear (§6.5, our reconstruction): a convolution is a Linear layer over unfolded patches, and
patch-NLMS divides Δ at each output position by that patch's energy ‖x̃_{b,p}‖² + δ (computed without
unfolding: X² correlated with a ones kernel, ``Layer.patch_energy``); with one output position it is
§4's per-sample NLMS exactly. The B × B solve would need a (B·P) × (B·P) system, so on convolutions
``mode="consequentialism"`` uses patch-NLMS and keeps the B × B solve for Linear layers (2-d inputs).
Normalisation layers get the plain F-adjoint feedback (no input Gram is defined for them).
The optimizer is ``tfa.optim.Consequentialism``.

``positions="mean"`` divides G by P, the number of positions per sample the weight is applied at (a convolution's
output positions, a Linear's or a matmul's tokens): the P patches of one sample share one weight, so a plain η = 1
step moves each output by up to P times its delta ("sum", the default, is §6.5 as written); with one position
per sample (an MLP) both are the same.

On a graph (``FPropagation(model, graph=True)``, docs/maths.md §7.3) the sweep is the F-adjoint's over the tape
(:func:`torch_fadjoint.tape_sweep.sweep_tape`): :class:`ConsequentialismGraphRule` changes only the parameter feedback of
the weight ops (``entry.nlms``: linear, convolution, a matmul or einsum with a parameter), normalised by the
input the weight is applied to, as above; every other op's feedback (normalisation layers, bare parameters,
embeddings) is the F-adjoint's, and so is every value's adjoint. B is the first dimension of the model's output.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..layers import LayerRecord
from ..sweep import Rule, check_finite, check_out_adj, check_rule, param_names, sweep_grads
from ..tape_sweep import TapeRule

__all__ = ["ConsequentialismRule", "ConsequentialismGraphRule", "consequentialism_grads", "check_mode", "MODES",
           "POSITIONS"]

MODES = ("consequentialism", "nlms", "lms")
POSITIONS = ("sum", "mean")


def check_mode(mode: str, delta, delta_rel: float, positions: str = "sum") -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if delta is not None and (isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < math.inf):
        raise ValueError(f"delta must be a finite number > 0 or None, got {delta!r}")
    if isinstance(delta_rel, bool) or not isinstance(delta_rel, (int, float)) or not 0 < delta_rel < math.inf:
        raise ValueError(f"delta_rel must be a finite number > 0, got {delta_rel!r}")


class ConsequentialismRule(Rule):
    """The F-adjoint sweep (§1.2) with the §4 / §6.5 parameter feedback; only ``param_feedback`` differs.

    Through the layer's verbs: ``patch_energy`` (‖x̃‖² per sample, or per patch of a convolution) and, for
    the B × B solve, ``gram`` (Linear with a 2-d input only); a layer with neither (normalisation) gets the
    plain F-adjoint feedback. ``failures`` collects each Cholesky ``info`` (0 = success) for one deferred
    check, ``failure_layers`` the layers' descriptions.
    """

    name = "consequentialism"

    def __init__(self, mode: str = "consequentialism", delta: float | None = None, delta_rel: float = 1e-3,
                 positions: str = "sum"):
        check_mode(mode, delta, delta_rel, positions)
        self.mode, self.delta, self.delta_rel, self.positions = mode, delta, delta_rel, positions
        self.name = mode
        self.failures: list[Tensor] = []
        self.failure_layers: list[str] = []

    def param_feedback(self, layer: LayerRecord, y_adj: Tensor) -> dict[Tensor, Tensor]:
        energy = None if self.mode == "lms" else layer.entry.patch_energy(layer)
        if energy is None:  # lms, or a layer with no input Gram (normalisation, §6.5): plain feedback
            return super().param_feedback(layer, y_adj)
        batch = y_adj.shape[0]
        delta = self.delta if self.delta is not None else self.delta_rel * energy.mean()
        gram = getattr(layer.entry, "gram", None)
        if self.mode == "consequentialism" and gram is not None and layer.x_prev.dim() == 2:
            kernel = gram(layer)                                                    # K = X̃ X̃ᵀ + δ I
            kernel.diagonal().add_(delta)
            factor, info = torch.linalg.cholesky_ex(kernel)
            self.failures.append(info)
            self.failure_layers.append(layer.describe)
            coef = torch.cholesky_solve(y_adj, factor)                              # K⁻¹ Δ  (B, n_k)
        else:                                                                       # NLMS, per sample or patch
            coef = y_adj / (energy + delta)
        scale = batch
        if self.positions == "mean":  # ÷ P, the positions per sample (Y is (B, P·…, out) or (B, out, *P))
            outputs = getattr(layer.module, "out_channels", None) or layer.module.out_features
            scale = batch * batch * outputs / y_adj.numel()
        return layer.entry.param_feedback(layer, coef * scale)                      # B Δᵀ K⁻¹ X̃ (weight, bias)


class ConsequentialismGraphRule(TapeRule):
    """The F-adjoint's sweep over the tape with §4 / §6.5's feedback on every weight op (docs/maths.md §7.3).

    ``entry.nlms`` names the weight ops; on each, the parameter W applied to an input X (a value, a constant or
    another parameter) gets G = B Σ_r Δ_r x̃_rᵀ / (‖x̃_r‖² + δ) over its rows r (NLMS) — or B Δᵀ K⁻¹ X̃ (the B × B
    solve, mode "consequentialism") where X is a matrix of samples — with x̃ = [x, 1] when the op's bias is a
    parameter:

    =========  ====================================================  =========================================
    entry      rows r (x̃_r)                                           the solve (consequentialism)
    =========  ====================================================  =========================================
    linear     each row of the input (any rank), + 1 with a bias       a 2-d input
    conv       each patch (§6.5, ones-kernel energies), + 1 with bias   never: patch-NLMS
    matmul     X @ W: each row of X; W @ X: each column of X           X @ W with a 2-d X and W
    einsum     each index of X's labels not contracted with W          never
    =========  ====================================================  =========================================

    Every value's adjoint and every other parameter's feedback is the F-adjoint's. ``positions="mean"`` divides G by
    P = (rows of the op) / B. The entries' verbs give the energies and Gram: ``input_energy``, ``input_gram``.
    Refused in one line naming the op and its module: a linear or convolution entry whose
    weight is computed from parameters (weight normalisation, a hypernetwork), or is a constant while its bias is a
    parameter; a matmul or einsum of two parameters; an einsum that sums a label of one operand alone. ``failures``/``failure_layers``: the Cholesky ``info`` of each solve and the op's description.
    """

    def __init__(self, mode: str = "consequentialism", delta: float | None = None, delta_rel: float = 1e-3,
                 positions: str = "sum", batch: int = 1):
        check_mode(mode, delta, delta_rel, positions)
        self.mode, self.delta, self.delta_rel, self.positions, self.batch = mode, delta, delta_rel, positions, batch
        self.name = mode
        self.failures: list[Tensor] = []
        self.failure_layers: list[str] = []

    def _refuse(self, op, why: str):
        raise TypeError(f"{op.entry.name} in {op.where}: {why}; {self.mode} cannot normalise its update by an input "
                        "(docs/maths.md §7.3); nothing was changed")

    def through_op(self, tape, op, out_adj) -> dict:
        kind = getattr(op.entry, "nlms", None)
        if kind is None or self.mode == "lms":
            return super().through_op(tape, op, out_adj)  # the F-adjoint's feedback (norms, bare parameters, …)
        params = [key for key, (k, _) in op.inputs.items() if k == "param" and key in op.needed]
        if kind in ("linear", "conv"):
            weight = dict(op.saved[0]).get("weight")
            if weight in op.needed and op.inputs[weight][0] == "value":
                self._refuse(op, "its weight is computed from parameters (weight normalisation, a hypernetwork), "
                                 "not a parameter")
        if not params:
            return super().through_op(tape, op, out_adj)
        return getattr(self, "_" + kind)(tape, op, out_adj, params)

    # -- the normalised coefficient B · K⁻¹Δ or B · Δ / (‖x̃‖² + δ), ÷ P with positions="mean" -----------------
    def _coef(self, op, out_adj: Tensor, energy: Tensor, weight: Tensor, contracted: int, gram=None) -> Tensor:
        delta = self.delta if self.delta is not None else self.delta_rel * energy.mean()
        if gram is not None and self.mode == "consequentialism":
            kernel = gram()                                                          # K = X̃ X̃ᵀ + δ I
            kernel.diagonal().add_(delta)
            factor, info = torch.linalg.cholesky_ex(kernel)
            self.failures.append(info)
            self.failure_layers.append(f"{op.entry.name} in {op.where}")
            coef = torch.cholesky_solve(out_adj, factor)
        else:
            coef = out_adj / (energy + delta)
        scale = self.batch
        if self.positions == "mean":  # P = out.numel() · contracted / (W.numel() · B): the rows per sample
            scale = self.batch * self.batch * weight.numel() / (out_adj.numel() * contracted)
        return coef * scale

    def _split(self, op, found: dict, params: list) -> dict:
        return {key: adj for key, adj in found.items() if key not in params}

    # -- linear and convolution entries: saved = (keys, x, weight, bias, …) (tfa.functionals) ---------------------
    def _weight_and_bias(self, op, params):
        keys = dict(op.saved[0])
        weight, bias = op.inputs.get(keys.get("weight")), op.inputs.get(keys.get("bias"))
        if weight is None or weight[0] != "param":
            self._refuse(op, "its weight is not a parameter")
        return keys, bias is not None and bias[0] == "param"

    def _linear(self, tape, op, out_adj, params):
        keys, bias = self._weight_and_bias(op, params)
        weight = op.saved[2]
        others = op.needed - set(params)
        found = op.entry.input_adjoints(op.saved, out_adj, needed=others) if others else {}
        gram = (lambda: op.entry.input_gram(op.saved, bias)) if op.saved[1].dim() == 2 else None
        coef = self._coef(op, out_adj, op.entry.input_energy(op.saved, bias), weight, weight.shape[1], gram)
        found.update(op.entry.input_adjoints(op.saved, coef, needed=frozenset(params)))
        return found

    def _conv(self, tape, op, out_adj, params):
        keys, bias = self._weight_and_bias(op, params)
        weight = op.saved[2]
        others = op.needed - set(params)
        found = op.entry.input_adjoints(op.saved, out_adj, needed=others) if others else {}
        coef = self._coef(op, out_adj, op.entry.input_energy(op.saved, bias), weight, weight[0].numel())
        found.update(op.entry.input_adjoints(op.saved, coef, needed=frozenset(params)))
        return found

    # -- matmul: saved = (key_a, a, key_b, b) (tfa.arithmetic) ---------------------------------------------------
    def _matmul(self, tape, op, out_adj, params):
        ka, a, kb, b = op.saved
        side = [key for key in (ka, kb) if key is not None and op.inputs.get(key, ("",))[0] == "param"]
        if len(side) == 2:
            self._refuse(op, "a product of two parameters (which is the weight is not defined)")
        others = op.needed - set(params)  # the values' adjoints (and a frozen operand's none): the F-adjoint's
        found = op.entry.input_adjoints((ka if ka in others else None, a, kb if kb in others else None, b), out_adj)
        gram = None
        if side[0] == kb:  # X @ W: the rows of X
            weight, contracted, saved = b, b.shape[-2] if b.dim() > 1 else b.shape[0], (None, a, kb, b)
            if a.dim() == 2 and b.dim() == 2:
                gram = lambda: op.entry.input_gram(op.saved, kb)  # noqa: E731
        else:              # W @ X: the columns of X
            weight, contracted, saved = a, a.shape[-1], (ka, a, None, b)
        coef = self._coef(op, out_adj, op.entry.input_energy(op.saved, side[0]), weight, contracted, gram)
        found.update(op.entry.input_adjoints(saved, coef))
        return found

    # -- einsum: saved = ([(key, subscripts, operand)] × 2, output subscripts) (tfa.arithmetic) -----------------
    def _einsum(self, tape, op, out_adj, params):
        operands, out_sub = op.saved
        if len(params) == 2 or all(op.inputs.get(key, ("",))[0] == "param" for key, _, _ in operands):
            self._refuse(op, "a product of two parameters (which is the weight is not defined)")
        (wkey, wsub, weight), (_, xsub, x) = operands if operands[0][0] in params else operands[::-1]
        alone = [c for sub, other in ((xsub, wsub), (wsub, xsub)) for c in sub if c not in other and c not in out_sub]
        if alone:
            self._refuse(op, f"it sums the label {alone[0]!r} of one operand alone")
        contracted = math.prod(x.shape[xsub.index(c)] for c in xsub if c in wsub and c not in out_sub)
        found = self._split(op, super().through_op(tape, op, out_adj), params)
        coef = self._coef(op, out_adj, op.entry.input_energy(op.saved, wkey), weight, contracted)
        found[wkey] = op.entry.input_adjoints(op.saved, coef)[wkey]
        return found


@torch.no_grad()
def consequentialism_grads(net, out_adj: Tensor, mode: str = "consequentialism",
                           delta: float | None = None, *, delta_rel: float = 1e-3, validate: bool = True,
                           retain_records: bool = False, on_failures=None,
                           positions: str = "sum") -> dict[Tensor, Tensor]:
    """The §4 update directions G^k, split into weight and bias grads, from X*^L (docs/maths.md §4; on a graph
    recorded on the tape, §7.3: :class:`ConsequentialismGraphRule`).

    out_adj: (B, n_L) X*^L of the batch-mean loss; mode: "consequentialism" | "nlms" | "lms";
    delta: absolute δ, or None for ``delta_rel`` · mean_b ‖x̃_b‖² per layer.
    positions: "sum" (§6.5 as written) or "mean" (G ÷ P, the positions per sample: one position is unchanged).
    Returns {parameter: grad}; nothing is written. With ``validate`` a non-finite result or a
    failed Cholesky factorisation raises RuntimeError; without it, ``on_failures(infos, layers)`` (if given)
    receives each factorisation's ``info`` tensor (0 = success) to decide on the device.

    >>> from torch import nn
    >>> from torch_fadjoint import FPropagation
    >>> net = FPropagation(nn.Sequential(nn.Linear(3, 2)))
    >>> out = net(torch.randn(4, 3))
    >>> grads = consequentialism_grads(net, torch.ones(4, 2) / 4)
    >>> [tuple(g.shape) for g in grads.values()]
    [(2, 3), (2,)]
    """
    rule = ConsequentialismRule(mode, delta, delta_rel, positions)
    if getattr(net, "graph", False):  # the tape (docs/maths.md §7.3)
        out_adj = check_out_adj(net, out_adj)
        rule = ConsequentialismGraphRule(mode, delta, delta_rel, positions, out_adj.shape[0] if out_adj.dim() else 1)
        grads = net.graph_grads(out_adj, retain_records=retain_records, rule=rule)
    else:
        layers = net.recorded_layers()
        out_adj = check_out_adj(net, out_adj)
        check_rule(rule, layers)
        grads = sweep_grads(net, layers, out_adj, rule, what=f"{mode} gradients", validate=False,
                            retain_records=retain_records)
    if not validate and on_failures is not None and rule.failures:
        on_failures(rule.failures, rule.failure_layers)
    if validate:  # a failed factorisation first: it is the cause of any non-finite result
        if rule.failures:
            factored = torch.stack(rule.failures).eq(0)
            if net.reducer is not None:  # K is per rank: every rank must refuse alike
                factored = net.reducer.all_ranks(factored)
            if not bool(factored.all()):
                name = rule.failure_layers[int((~factored).nonzero()[0, 0])]
                raise RuntimeError(f"{name}: {mode}'s K = X̃X̃ᵀ + δI is not positive definite "
                                   "(δ too small?); nothing was changed")
        check_finite(list(grads.values()), f"{mode} gradients", names=lambda: param_names(net, grads))
    return grads


