"""The equilibrium F-adjoint on FPropagation(model, graph=True) (docs/maths.md §7.4), float64 unless said.

What is checked, each able to fail:

* K → ∞ (steps=None, t=inf) with sequential=False is the tape's F-adjoint bit for bit (torch.equal) on a residual
  CNN with BatchNorm and ``+=``, DenseNet-style concatenations with a gate and a layer scale, and an attention block,
  for every start; the optimizer's step is FAdjoint's step bit for bit;
* finite K: the residual shrinks with K as 1 − (1 − f)^d, d the most states on a path from the parameter's op to the
  output (≈ d·(1 − τ)^K); the Euler loop equals the closed form; every start converges;
* a chain recorded with graph=True equals the chain rule (to rounding): MLP (the reference's sigmoid output, where
  the top state sits at Y^L) and a CNN with BatchNorm, max pooling and Flatten, sequential False and True, every start;
* the sequential rule's first step on a residual net with a layer scale and a weight used by two ops, against the
  rule typed out by hand (updated downstream weights; the tied weight updated once, after both uses);
* refusals and the rollback: a non-finite update of the bottom op puts back every upper write (validate True and
  "async"), the reference quirk and a start without the kept values are refused in one line, nothing written;
* a residual net trains with the default (sequential=False, zero start, K = 100).
"""
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_fadjoint as tfa
from torch_fadjoint.losses import cross_entropy
from torch_fadjoint.optim.equilibrium import EquilibriumFAdjoint, equilibrium_grads
from torch_fadjoint.rules.equilibrium import EquilibriumGraphRule, graph_states

from .graphs import AttentionBlock, DenseGate, Residual
from .models import labelled, labelled_batches, mlp
from .state import assert_untouched, snapshot

DT = torch.float64


# ------------------------------------------------------------------------------------------------------ models
_Residual = functools.partial(Residual, down_bias=False, spread_bn=True)
_Dense = functools.partial(DenseGate, classes=5)
_Attention = functools.partial(AttentionBlock, classes=5)


GRAPHS = {"residual-bn-inplace": (_Residual, (3, 8, 8)), "dense-cat-gate": (_Dense, 6),
          "attention": (_Attention, (5, 3))}


def _graph(name, seed=0, keep=True):
    make, shape = GRAPHS[name]
    torch.manual_seed(seed)
    model = make().to(DT).train()
    x, t = labelled(6, shape, 5, seed=seed + 1)
    return model, tfa.FPropagation(model, graph=True, keep_pre_activations=keep), x, t


def _record(net, x, t):
    with torch.no_grad():
        out = net(x)
    return cross_entropy(out, t)[1]


# ------------------------------------------------------------------------------------------------- K → ∞
@pytest.mark.parametrize("init", ["zero", "forward", "scaled"])
@pytest.mark.parametrize("limit", [dict(steps=None), dict(t=math.inf)], ids=["steps=None", "t=inf"])
@pytest.mark.parametrize("name", GRAPHS)
def test_equilibrium_is_the_fadjoint_bit_for_bit(name, limit, init):
    model, net, x, t = _graph(name)
    want = net.graph_grads(_record(net, x, t))
    got = equilibrium_grads(net, _record(net, x, t), init=init, **limit)
    assert set(got) == set(want) == {p for p in model.parameters()}
    for p in want:
        assert torch.equal(got[p], want[p])


@pytest.mark.parametrize("name", GRAPHS)
def test_the_joint_step_at_equilibrium_is_the_fadjoint_step_bit_for_bit(name):
    runs = []
    for make_opt in (lambda net: tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9, loss="cross_entropy"),
                     lambda net: EquilibriumFAdjoint(net, lr=0.1, momentum=0.9, loss="cross_entropy", steps=None)):
        model, net, x, t = _graph(name, keep=False)
        opt = make_opt(net)
        for x_, t_ in labelled_batches(3, 6, GRAPHS[name][1], 5, seed=4):
            net(x_)
            opt.step(target=t_)
        runs.append(model)
    for p, q in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------------------------ finite K
def _depths(tape):
    """The most states on a path from each parameter's op to the output (the op's output state included)."""
    states, _ = graph_states(tape)
    depth, found = {tape.output: int(tape.output in states)}, {}
    for op in reversed(tape.ops):
        reached = [depth[i] for i in op.outputs if i in depth]
        if not reached:
            continue
        d = max(reached)
        for kind, target in op.inputs.values():
            if kind == "value":
                depth[target] = max(depth.get(target, 0), d + (target in states))
            else:
                found[target] = max(found.get(target, 0), d)
    return found


def _relative(got, want):
    """Per parameter, max |got − want| over the larger of its own largest entry and 1e-8 of the model's (§7.1)."""
    floor = 1e-8 * max(w.abs().max().item() for w in want.values())
    return {p: (got[p] - want[p]).abs().max().item() / max(want[p].abs().max().item(), floor) for p in want}


@pytest.mark.parametrize("name", GRAPHS)
def test_finite_k_converges_as_one_minus_f_to_the_depth(name):
    """Zero start: a state multiplies what it passes on by 1 − f, so a path through d states keeps (1 − f)^d of its
    share, and the residual is Σ_paths c_p (1 − (1 − f)^{d_p}) ≈ d·f. It is exactly 1 − (1 − f)^d where the paths
    of an op carry d states alike (the dense and attention nets here: the worst ratio 1.000); where paths of several
    lengths partly cancel in the gradient (the residual block's shortcut against its branch) it exceeds the longest
    path's share a little (measured up to 1.23× on three seeds). At τ = 0.1, K = 100: 1.3e-4 to 2.2e-4 here (up to
    9 states on a path)."""
    model, net, x, t = _graph(name)
    want = net.graph_grads(_record(net, x, t))
    _record(net, x, t)
    depth = _depths(net._tape)
    assert max(depth.values()) >= 4
    previous = math.inf
    for steps in (10, 20, 50, 100):
        f = 0.9 ** steps
        relative = _relative(equilibrium_grads(net, _record(net, x, t), tau=0.1, steps=steps), want)
        ratios = [relative[p] / (1 - (1 - f) ** depth[p]) for p in want]
        assert 0.999 < max(ratios) < 1.3, (steps, max(ratios))
        worst = max(relative.values())
        assert worst < previous
        previous = worst
    assert previous < 2.5e-4


@pytest.mark.parametrize("init", ["zero", "forward", "scaled"])
def test_the_euler_loop_equals_the_closed_form_and_every_start_converges(init):
    model, net, x, t = _graph("residual-bn-inplace")
    loop = equilibrium_grads(net, _record(net, x, t), tau=0.3, steps=7, init=init, relaxation="euler")
    closed = equilibrium_grads(net, _record(net, x, t), tau=0.3, steps=7, init=init)
    for p in loop:
        torch.testing.assert_close(loop[p], closed[p], rtol=1e-12, atol=1e-14)
    want = net.graph_grads(_record(net, x, t))
    residuals = [max(_relative(equilibrium_grads(net, _record(net, x, t), steps=k, init=init), want).values())
                 for k in (20, 100, 300)]
    assert residuals[0] > residuals[1] > residuals[2]
    assert residuals[2] < 1e-9


# ----------------------------------------------------------------------------------------- chains as graphs
class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(4, 6, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 2 * 2, 12), nn.ReLU(),
                                 nn.Linear(12, 5))

    def forward(self, x):
        return self.net(x)


CHAINS = {"mlp-sigmoid-output": (lambda: mlp((6, 9, 7, 5), [nn.Sigmoid, nn.Tanh], last=nn.Sigmoid, seed=1), 6, "mse"),
          "cnn-bn-maxpool": (lambda: (torch.manual_seed(1), _CNN().to(DT))[1].net, (1, 8, 8), "cross_entropy")}


@pytest.mark.parametrize("init", ["zero", "forward", "scaled"])
@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("name", CHAINS)
def test_a_chain_recorded_as_a_graph_is_the_chain_rule(name, sequential, init):
    """Three optimizer steps (momentum, weight decay) and the feedback of a fourth forward: graph = chain to rounding.
    The MLP's top maps (a sigmoid) put the chain's top state at Y^L started from X^L (§6.3); the graph's too."""
    make, shape, loss = CHAINS[name]
    data = labelled_batches(4, 8, shape, 5, seed=3)
    results = []
    for graph in (False, True):
        model = make()
        net = tfa.FPropagation(model, graph=graph)
        opt = EquilibriumFAdjoint(net, lr=0.3, momentum=0.5, weight_decay=1e-3, tau=0.2, steps=6, init=init,
                                  sequential=sequential, loss=loss)
        assert net.graph is graph
        for x, t in data[:3]:
            net(x)
            opt.step(target=t)
        x, t = data[3]
        with torch.no_grad():
            out = net(x)
        grads = equilibrium_grads(net, tfa.losses.mse(out, t)[1] if loss == "mse" else cross_entropy(out, t)[1],
                                  tau=0.2, steps=6, init=init)
        results.append((model, [grads[p] for p in model.parameters()]))
    (chain, chain_grads), (graph, graph_grads) = results
    for p, q in zip(chain.parameters(), graph.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    for g, h in zip(chain_grads, graph_grads):
        torch.testing.assert_close(g, h, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------- the sequential rule by hand
class _Tied(nn.Module):
    """h1 = tanh(A x); h2 = h1 + γ ⊙ relu(B h1); out = H relu(B h2): a residual, a layer scale and B used twice."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 4)
        self.gamma = nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x):
        h1 = torch.tanh(self.a(x))
        h2 = h1 + self.gamma * F.relu(self.b(h1))
        return self.head(F.relu(self.b(h2)))


def _sgd(p, g, lr):
    return p - lr * g


def _by_hand(model, x, t, lr, f, init):
    """§7.4's sequential rule typed out for _Tied: states h3, h2, r = relu(B h1), h1 and the output, each
    Z = drive + f (start − drive) (start 0 or the value); each op's value adjoint with the weights already updated;
    B updated once, after its second (upper-most) use."""
    gamma = model.gamma.detach().clone()
    Wa, ba, Wb, bb, Wh, bh = (p.detach().clone() for p in (model.a.weight, model.a.bias, model.b.weight,
                                                           model.b.bias, model.head.weight, model.head.bias))
    y1 = x @ Wa.T + ba
    h1 = torch.tanh(y1)
    y2 = h1 @ Wb.T + bb
    r = torch.relu(y2)
    h2 = h1 + gamma * r
    y3 = h2 @ Wb.T + bb
    h3 = torch.relu(y3)
    out = h3 @ Wh.T + bh
    x_star = cross_entropy(out, t)[1]

    def relax(start, drive):
        return drive + f * ((start if init == "forward" else torch.zeros_like(drive)) - drive)

    new = {}
    z_out = relax(out, x_star)
    new["head.weight"], new["head.bias"] = _sgd(Wh, z_out.T @ h3, lr), _sgd(bh, z_out.sum(0), lr)
    z_h3 = relax(h3, z_out @ new["head.weight"])
    y3_star = z_h3 * (y3 > 0)
    g_wb, g_bb = y3_star.T @ h2, y3_star.sum(0)          # B's upper use: not updated yet
    z_h2 = relax(h2, y3_star @ Wb)                       # so its value adjoint uses the old B
    new["gamma"] = _sgd(gamma, (z_h2 * r).sum(0), lr)
    z_r = relax(r, z_h2 * new["gamma"])
    y2_star = z_r * (y2 > 0)
    new["b.weight"] = _sgd(Wb, g_wb + y2_star.T @ h1, lr)   # both uses in: updated once
    new["b.bias"] = _sgd(bb, g_bb + y2_star.sum(0), lr)
    z_h1 = relax(h1, z_h2 + y2_star @ new["b.weight"])
    y1_star = z_h1 * (1 - h1 ** 2)
    new["a.weight"], new["a.bias"] = _sgd(Wa, y1_star.T @ x, lr), _sgd(ba, y1_star.sum(0), lr)
    return new


@pytest.mark.parametrize("init", ["zero", "forward"])
@pytest.mark.parametrize("relaxation", [dict(steps=None), dict(tau=0.5, steps=3)], ids=["K=inf", "K=3"])
def test_the_sequential_first_step_on_a_residual_net_is_the_rule_by_hand(relaxation, init):
    torch.manual_seed(0)
    model = _Tied().to(DT)
    x, t = labelled(7, 5, 4, seed=5)
    f = 0.5 ** 3 if relaxation.get("steps") else 0.0
    want = _by_hand(model, x, t, 0.7, f, init)
    net = tfa.FPropagation(model, graph=True)
    opt = EquilibriumFAdjoint(net, lr=0.7, sequential=True, init=init, loss="cross_entropy", **relaxation)
    net(x)
    opt.step(target=t)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[name], rtol=0, atol=1e-13)
    # the rule can fail: the joint update differs from it
    torch.manual_seed(0)
    joint = _Tied().to(DT)
    net = tfa.FPropagation(joint, graph=True)
    opt = EquilibriumFAdjoint(net, lr=0.7, sequential=False, init=init, loss="cross_entropy", **relaxation)
    net(x)
    opt.step(target=t)
    assert (joint.a.weight - want["a.weight"]).abs().max() > 1e-4
    assert (joint.b.weight - want["b.weight"]).abs().max() > 1e-4


# --------------------------------------------------------------------------------------- refusals, rollback
@pytest.mark.parametrize("validate", [True, "async"])
def test_an_overflow_at_the_bottom_op_puts_back_every_upper_write(validate):
    """Sequential: the head, B and γ are written when A's update overflows (its input's feature 0 is 1e308 and its
    group's lr 1e10); everything is put back (validate=True: raised at once; "async": the writes restored on the
    device, the error raised by synchronize)."""
    torch.manual_seed(0)
    model = _Tied().to(DT)
    net = tfa.FPropagation(model, graph=True)
    rest = [p for n, p in model.named_parameters() if not n.startswith("a.")]
    opt = EquilibriumFAdjoint(net, lr=0.05, momentum=0.9, sequential=True, loss="cross_entropy", validate=validate,
                              params=[{"params": list(model.a.parameters())}, {"params": rest}])
    data = labelled_batches(2, 7, 5, 4, seed=6)
    net(data[0][0])
    opt.step(target=data[0][1])  # momentum buffers exist
    opt.synchronize()
    opt.param_groups[0]["lr"] = 1e10
    with torch.no_grad():
        model.a.weight[:, 0] = 0.0  # x[:, 0] does not reach the forward, but A's ∂W[:, 0] = Ỹᵀ x[:, 0] does
    x, t = data[1][0].clone(), data[1][1]
    x[:, 0] = 1e308
    assert net(x).isfinite().all()
    before = snapshot(model, opt)
    if validate is True:
        with pytest.raises(RuntimeError, match="non-finite"):
            opt.step(target=t)
    else:
        opt.step(target=t)
        with pytest.raises(RuntimeError, match="non-finite"):
            opt.synchronize()
    assert_untouched(before, model, opt)
    opt.validate = False  # the same step unchecked does write (the rollback above was real)
    net(x)
    opt.step(target=t)
    assert not torch.equal(model.head.weight, before.params["head.weight"])
    assert not model.a.weight.isfinite().all()


def test_an_error_after_the_upper_writes_puts_them_back(monkeypatch):
    """An exception in the sweep after the head, B and γ were written (here: at the tanh, below them) puts them back."""
    torch.manual_seed(0)
    model = _Tied().to(DT)
    net = tfa.FPropagation(model, graph=True)
    opt = EquilibriumFAdjoint(net, lr=0.1, momentum=0.9, sequential=True, loss="cross_entropy")
    x, t = labelled(7, 5, 4, seed=5)
    net(x)
    before = snapshot(model, opt)
    relaxed = EquilibriumGraphRule.relaxed

    def fail_at_tanh(self, tape, op, signal):
        if "tanh" in op.entry.name:
            assert self.outstanding == 2  # A's weight and bias: the rest is written
            raise RuntimeError("boom")
        return relaxed(self, tape, op, signal)

    monkeypatch.setattr(EquilibriumGraphRule, "relaxed", fail_at_tanh)
    with pytest.raises(RuntimeError, match="^boom$"):
        opt.step(target=t)
    assert_untouched(before, model, opt)


def test_the_reference_quirk_is_refused_on_a_graph_in_one_line():
    model, net, x, t = _graph("residual-bn-inplace", keep=False)
    opt = EquilibriumFAdjoint(net, lr=0.1, loss="cross_entropy", reference_output_derivative=True)
    net(x)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"^reference_output_derivative=True: the reference code's quirk .* not on "
                                         r"a graph \(FPropagation\(model, graph=False\) for the reference\)$"):
        opt.step(target=t)
    assert_untouched(before, model, opt)
    with pytest.raises(ValueError, match=r"^reference_output_derivative=True"):
        equilibrium_grads(net, _record(net, x, t), reference_output_derivative=True)


def test_a_start_from_the_values_needs_them_kept_and_the_optimizer_keeps_them():
    model, net, x, t = _graph("dense-cat-gate", keep=False)
    with pytest.raises(RuntimeError, match=r"^the equilibrium F-adjoint with init='forward' reads the recorded values: "
                                           r"it needs FPropagation\(model, graph=True, keep_pre_activations=True\)"):
        equilibrium_grads(net, _record(net, x, t), init="forward")
    assert not net.keep_pre_activations
    EquilibriumFAdjoint(net, init="scaled")
    assert net.keep_pre_activations
    assert equilibrium_grads(net, _record(net, x, t), init="scaled")


def test_a_tied_weight_is_still_refused_on_a_chain_under_the_sequential_rule():
    """On the chain the sequential rule updates each layer during the sweep and refuses a tied weight (unchanged);
    on the graph it is updated once after its uses (the hand-typed test above)."""
    lin = nn.Linear(4, 4).to(DT)
    net = tfa.FPropagation(nn.Sequential(lin, nn.Tanh(), lin), graph=False)
    opt = EquilibriumFAdjoint(net, lr=0.1, sequential=True, loss="cross_entropy")
    net(torch.randn(3, 4, dtype=DT))
    with pytest.raises(ValueError, match=r"^EquilibriumFAdjoint\(sequential=True\): 0.weight is used by two layers"):
        opt.step(target=torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------------------------------------------- training
def _train(sequential, steps=50, seed=0):
    torch.manual_seed(seed)
    model = _Residual().train()  # float32
    net = tfa.FPropagation(model, graph=True)
    opt = EquilibriumFAdjoint(net, lr=0.05, momentum=0.9, loss="cross_entropy", sequential=sequential)
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, 3, 8, 8, generator=gen)
    losses = []
    for _ in range(steps):
        t = torch.randint(0, 5, (32,), generator=gen)
        x = centres[t] + 0.5 * torch.randn(32, 3, 8, 8, generator=gen)
        net(x)
        losses.append(float(opt.step(target=t)))
    return losses


@pytest.mark.parametrize("sequential", [False, True], ids=["joint (default)", "sequential"])
def test_a_residual_net_trains_with_the_default(sequential):
    """Five noisy class centres, batch 32, lr 0.05, momentum 0.9, 50 steps: the mean of the last 10 losses is below
    half the first (ln 5 ≈ 1.61)."""
    losses = _train(sequential)
    first, last = losses[0], sum(losses[-10:]) / 10
    assert math.isfinite(last) and last < 0.5 * first, (first, last)
