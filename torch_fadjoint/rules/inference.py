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

On ``FPropagation(model, graph=True)`` (docs/maths.md §7.5) IL is predictive coding on the tape: states on every
value a weight op reads (``entry.nlms``) and on the output, the model's inputs clamped, and every other op part of
a prediction μ_v, re-run from the upstream states by :func:`torch_fadjoint.tape.rerun` (out of place; BatchNorm in
train mode on the states' batch statistics, its running ones untouched). Each error goes back through the exact
adjoints of the ops between its state and the states upstream (:class:`_GraphIL`); the update is
−(1/B) J_θᵀ e_v for every parameter between them. On a chain without pooling after an activation it is §5.1 / §6.6
to the bit. IL-prox is defined on chains and refused on a graph, in one line.

Over 400 lines: the rule on the chain (§5.1, §6.6) and on the tape (§7.5) share the relaxation and its checks;
the tape's half (``_GraphIL``) is the part to move out next.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..layers import LayerRecord
from ..losses import _check_logits, onehot as to_onehot
from ..maps import MapRecord
from ..sweep import check_finite, param_names
from ..tape import rerun

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


# -- §7.5: inference learning on the graph ------------------------------------------------------------------
_PROBABILITIES = ("softmax", "log_softmax", "sigmoid")
IL_PROX_ON_GRAPHS = ("IL-prox (docs/maths.md §5.2) is defined on chains of layers (pre-activation states, one "
                     "normaliser per layer input); on a graph (FPropagation(graph=True)) use variant='il' "
                     "(docs/maths.md §7.5) or record the model as a chain (graph=False)")


def _weight_inputs(op) -> list[int]:
    """The value indices that ``op`` multiplies by a parameter (the weight ops, ``entry.nlms``): the input of the
    linear and convolution entries whose weight is a parameter, the value operand of a matmul / einsum of a
    parameter."""
    kind = getattr(op.entry, "nlms", None)
    if kind in ("linear", "conv"):
        weight = op.inputs.get(1, op.inputs.get("weight"))
        value = op.inputs.get(0, op.inputs.get("input"))
        if weight is not None and weight[0] == "param" and value is not None and value[0] == "value":
            return [value[1]]
    elif kind is not None:
        sources = list(op.inputs.values())
        values = [target for k, target in sources if k == "value"]
        if len(sources) == 2 and len(values) == 1:
            return values
    return []


class _GraphIL:
    """The tape read for inference learning (docs/maths.md §7.5): the clamped values (the model's inputs and what
    is computed from them alone), the states (every other value that a weight op reads, and the output), the ops
    that lead to a state, and for each op the input keys whose adjoint a state's drive (``drive``) or a parameter's
    update (``param``) needs (a state cuts: what reaches it goes to its drive, not further down)."""

    def __init__(self, tape):
        self.tape = tape
        self.top = tape.output
        produced: dict[int, object] = {}
        for op in tape.ops:
            for index in op.outputs:
                if index >= 0:
                    produced[index] = op
        clamped = {i for i in range(tape.count) if i not in produced}  # the model's inputs
        for op in tape.ops:
            if all(kind == "value" and target in clamped for kind, target in op.inputs.values()):
                clamped.update(i for i in op.outputs if i >= 0)  # a function of the inputs alone: no state
        self.clamped = clamped
        states = {i for op in tape.ops for i in _weight_inputs(op) if i not in clamped}
        self.hidden = sorted(states - {self.top})
        hidden = set(self.hidden)
        live = {self.top} | hidden  # the ops that lead to a state (the others are not re-run)
        self.ops = []
        for op in reversed(tape.ops):  # an op of the inputs alone is not re-run: its kept output is read
            if any(i in live and i not in clamped for i in op.outputs if i >= 0):
                self.ops.append(op)
                live.update(target for kind, target in op.inputs.values() if kind == "value" and target not in hidden)
        self.ops.reverse()
        to_state, to_param = {}, {}
        self.needed = {}
        for op in self.ops:
            drive, param = set(), set()
            for key, (kind, target) in op.inputs.items():
                if kind == "param":
                    if target.requires_grad:
                        param.add(key)
                elif target in hidden:
                    drive.add(key)
                elif target not in clamped:
                    if to_state.get(target):
                        drive.add(key)
                    if to_param.get(target):
                        param.add(key)
            for index in op.outputs:
                to_state[index], to_param[index] = bool(drive), bool(param)
            self.needed[id(op)] = {"drive": frozenset(drive), "param": frozenset(param)}
        self._check()

    def _check(self) -> None:
        """Refuse, before anything runs, what a re-run cannot repeat or IL cannot read."""
        for op in self.ops:
            if getattr(op.entry, "kernels", None) and op.entry.name.startswith("F.dropout") and op.saved[1] is not None:
                raise TypeError(f"{op.entry.name} in {op.where}: inference learning re-runs the recorded ops, and a "
                                "random mask would be drawn again; it needs deterministic ops (put the model in eval "
                                "mode or drop the dropout; docs/maths.md §7.5)")
            if self.top in op.outputs and op.entry.name.rsplit(".", 1)[-1] in _PROBABILITIES:
                raise TypeError(f"{op.entry.name} in {op.where}: inference learning needs the logits at the top (it "
                                "takes their softmax itself); return the logits")

    def predict(self, inputs: dict, states: dict) -> tuple[dict, list]:
        """The ops re-run (out of place, tfa.tape.rerun) with each state's value in place of the value the forward
        computed there: {value: tensor} (a state's entry: its prediction μ_v) and each op's record."""
        env = dict(inputs)
        records = []
        for op in self.ops:
            values = {key: states[target] if target in states else env[target]
                      for key, (kind, target) in op.inputs.items() if kind == "value"}
            out, saved = rerun(op, values)
            for index, tensor in zip(op.outputs, [out] if op.single else list(out)):
                if index >= 0:
                    env[index] = tensor
            records.append(saved)
        return env, records

    def pull(self, records: list, signals: dict, what: str) -> dict:
        """Each state's error sent back through the ops between it and the states upstream (their exact adjoints):
        ``what="drive"``: {state: Σ_uses J_{μ_c, x̂_v}ᵀ e_c}; ``"param"``: {parameter: Σ J_θᵀ e_v}."""
        adjoints = dict(signals)
        found: dict = {}
        for op, saved in zip(reversed(self.ops), reversed(records)):
            outs = [adjoints.pop(i, None) if i >= 0 else None for i in op.outputs]
            needed = self.needed[id(op)][what]
            if not needed or all(o is None for o in outs):
                continue
            out = outs[0] if op.single else tuple(outs)
            if getattr(op.entry, "takes_needed", False):
                adjs = op.entry.input_adjoints(saved, out, needed=needed)
            else:
                adjs = op.entry.input_adjoints(saved, out)
            for key, adj in adjs.items():
                if adj is None or key not in needed:
                    continue
                kind, target = op.inputs[key]
                into = found if kind == "param" or target in signals else adjoints
                into[target] = adj if target not in into else into[target] + adj
        return found


def _recorded_tape(net):
    """The last forward's tape after the recorder's checks (nothing recorded, a record overwritten, a backward hook
    the sweep would not call: refused, records cleared)."""
    from torch.nn.modules import module as module_globals

    from ..tape_sweep import check_versions

    net.output  # noqa: B018 - raises when nothing is recorded
    tape = net._tape
    hook = None
    if module_globals._global_backward_hooks or module_globals._global_backward_pre_hooks:
        hook = "a global module backward hook is registered (register_module_full_backward_hook)"
    for name, module in net.model.named_modules():
        if hook is None and (module._backward_hooks or module._backward_pre_hooks):
            hook = f"{name or '<model>'} ({type(module).__name__}) has a backward hook"
    for name, param in net.model.named_parameters():
        if hook is None and (param._backward_hooks or getattr(param, "_post_accumulate_grad_hooks", None)):
            hook = f"{name} has a gradient hook (register_hook / register_post_accumulate_grad_hook)"
    try:
        if hook is not None:
            raise RuntimeError(f"FPropagation: {hook}, which autograd would call and inference learning does not; "
                               "records cleared, nothing was changed")
        if not tape.keep:
            raise RuntimeError("inference learning re-runs the recorded ops: it needs FPropagation(model, graph=True, "
                               "keep_pre_activations=True) (InferenceLearning sets it); run the forward again")
        check_versions(tape)
    except RuntimeError:
        net.clear()
        raise
    return tape


def _il_graph(net, onehot: Tensor, T: int, gamma_top: float, gamma_bot: float, clamp: float):
    """§7.5: (the states, their final errors, {parameter: −J_θᵀ e_v / B}) on the last forward's tape."""
    tape = _recorded_tape(net)
    graph = _GraphIL(tape)
    kept = {i: tape.kept[i][0] for i in graph.clamped if i in tape.kept}
    states = {v: tape.kept[v][0] for v in graph.hidden}
    logits = tape.kept[graph.top][0]
    target = clamp * onehot + (1 - clamp) * torch.softmax(logits, dim=1)  # x̂^L, held fixed (n = 1)
    for _ in range(T):
        env, records = graph.predict(kept, states)
        logits = env[graph.top]
        errors = {v: states[v] - env[v] for v in graph.hidden}
        errors[graph.top] = 0.5 * (target - torch.softmax(logits, dim=1))
        drive = graph.pull(records, errors, "drive")
        states = {v: states[v] - gamma_top * errors[v] + gamma_bot * drive[v] if v in drive
                  else states[v] - gamma_top * errors[v] for v in graph.hidden}
        if clamp != 1.0:  # PC.py re-clamps every iteration, from the logits before the update
            target = clamp * onehot + (1 - clamp) * torch.softmax(logits, dim=1)
    env, records = graph.predict(kept, states)
    errors = {v: states[v] - env[v] for v in graph.hidden}
    errors[graph.top] = target - torch.softmax(env[graph.top], dim=1)
    scale = -1.0 / onehot.shape[0]
    grads = {param: grad * scale for param, grad in graph.pull(records, errors, "param").items()}
    return states, errors, grads


@torch.no_grad()
def inference_grads(net, target: Tensor, variant: str = "il", *, T: int = 25, gamma_top: float | None = None,
                    gamma_bot: float | None = None, clamp: float = 1.0, alpha: float = 5.0, prox_eps: float = 0.25,
                    conv_details: bool = False, validate: bool = True) -> dict[Tensor, Tensor]:
    """The §5 / §6.6 local updates as gradients {param: grad} from the recorded forward and targets (B,); on a net
    that records the tape, IL on the graph (§7.5: needs ``keep_pre_activations=True``; IL-prox refused).

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
    if getattr(net, "graph", False):
        return _graph_grads(net, target, variant, T, gamma_top, gamma_bot, clamp, validate)
    layers = net.recorded_layers()
    chain = _chain(layers)
    output = net.loss_input()
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


def _graph_grads(net, target, variant, T, gamma_top, gamma_bot, clamp, validate) -> dict[Tensor, Tensor]:
    """inference_grads on FPropagation(graph=True) (docs/maths.md §7.5)."""
    if variant == "il_prox":
        net.clear()
        raise ValueError(IL_PROX_ON_GRAPHS)
    output = net.loss_input()
    if not isinstance(target, Tensor):
        raise ValueError(f"{variant} target: expected a tensor, got {type(target).__name__}")
    _check_logits(output, target, f"{variant} target", validate)
    onehot = to_onehot(target, output.shape[1], output.dtype)
    try:
        grads = _il_graph(net, onehot, T, gamma_top, gamma_bot, clamp)[2]
    finally:
        net.clear()
    if net.reducer is not None:
        net.reducer.launch(list(grads.values()))
        net.reducer.wait()
    if validate:
        check_finite(list(grads.values()), f"{variant} gradients", names=lambda: param_names(net, grads))
    return grads
