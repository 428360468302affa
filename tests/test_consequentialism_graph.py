"""Consequentialism / NLMS on FPropagation(model, graph=True) (docs/maths.md §7.3): the F-adjoint's sweep over the
tape, each weight op's parameter feedback normalised by the input its weight is applied to.

What is checked, each able to fail:

* a chain recorded as a graph gives the chain rule's updates (MLP and a BN/pooling CNN, both modes, both
  ``positions``), through the ``Consequentialism`` optimizer over several steps;
* §6.5's identity inside a residual net: a convolution with one output position (kernel = input size) gets the
  feedback of the Linear layer it equals (weight reshaped), every other parameter too;
* on a residual net with BatchNorm, a layer scale, token Linear, x @ W, W @ x and an einsum with a parameter: each
  weight op's feedback against the formula transcribed here (F.unfold for the convolutions, Δ from autograd), and
  the normalisation layers' and bare parameters' feedback equal to the F-adjoint's bit for bit;
* ``positions="mean"``: one position per sample is unchanged; at batch 1 a convolution's top gain is ≤ 1 (η keeps
  §4's meaning), where "sum" gives a gain of order P;
* the optimizer trains a residual BN net on the graph; the refusals, one line naming the op and its module.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_fadjoint as tfa
from torch_fadjoint.optim import Consequentialism
from torch_fadjoint.rules.consequentialism import ConsequentialismGraphRule, consequentialism_grads

DT = torch.float64


def _mlp():
    return nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def _cnn():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(20, 3)).to(DT)


# ---------------------------------------------------------------------------- a chain recorded as a graph
@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("mode", ["consequentialism", "nlms"])
@pytest.mark.parametrize("positions", ["sum", "mean"])
def test_a_chain_recorded_as_a_graph_gets_the_chain_updates(name, mode, positions):
    torch.manual_seed(0)
    model = _mlp() if name == "mlp" else _cnn()
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    nets = [tfa.FPropagation(model, graph=False), tfa.FPropagation(twin, graph=True)]
    assert [net.graph for net in nets] == [False, True]
    opts = [Consequentialism(net, lr=0.05, mode=mode, positions=positions, base="sgd", momentum=0.9) for net in nets]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn((6, 7) if name == "mlp" else (6, 2, 8, 8), generator=gen, dtype=DT)
        t = torch.randint(0, 3, (6,), generator=gen)
        for net, opt in zip(nets, opts):
            net(x)
            opt.step(target=t)
    assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), start.parameters())) > 1e-3
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- §6.5's identity in a residual net
class _OnePosition(nn.Module):
    """A residual conv block, then a head that is either a convolution with one output position or the Linear
    layer it equals; the head's output goes on through a residual Linear."""

    def __init__(self, conv_head: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Conv2d(3, 5, 4) if conv_head else nn.Linear(48, 5)
        self.fc = nn.Linear(5, 5)
        self.conv_head = conv_head

    def forward(self, x):
        h = torch.relu(self.stem(x)) + x
        z = self.head(h).flatten(1) if self.conv_head else self.head(h.flatten(1))
        return self.fc(torch.relu(z)) + z


@pytest.mark.parametrize("positions", ["sum", "mean"])
def test_a_one_position_convolution_is_nlms_inside_a_residual_net(positions):
    torch.manual_seed(1)
    conv_net = _OnePosition(True).to(DT)
    linear_net = _OnePosition(False).to(DT)
    with torch.no_grad():
        for name in ("stem", "fc"):
            getattr(linear_net, name).load_state_dict(getattr(conv_net, name).state_dict())
        linear_net.head.weight.copy_(conv_net.head.weight.reshape(5, 48))
        linear_net.head.bias.copy_(conv_net.head.bias)
    x, t = torch.randn(6, 3, 4, 4, dtype=DT), torch.randint(0, 5, (6,))
    got = {}
    for label, model, mode in (("conv", conv_net, "nlms"), ("linear", linear_net, "nlms"),
                               ("conv-conseq", conv_net, "consequentialism")):
        net = tfa.FPropagation(model, graph=True)
        out = net(x)
        got[label] = consequentialism_grads(net, tfa.losses.cross_entropy(out, t)[1], mode, positions=positions)
        net.remove()
    pairs = [(conv_net.stem.weight, linear_net.stem.weight), (conv_net.stem.bias, linear_net.stem.bias),
             (conv_net.fc.weight, linear_net.fc.weight), (conv_net.fc.bias, linear_net.fc.bias),
             (conv_net.head.bias, linear_net.head.bias)]
    for p, q in pairs:
        torch.testing.assert_close(got["conv"][p], got["linear"][q], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got["conv"][conv_net.head.weight].reshape(5, 48), got["linear"][linear_net.head.weight],
                               rtol=1e-12, atol=1e-14)
    # consequentialism uses patch-NLMS on a convolution: the head's feedback is NLMS's; the 2-d fc solves B × B
    torch.testing.assert_close(got["conv-conseq"][conv_net.head.weight], got["conv"][conv_net.head.weight],
                               rtol=1e-12, atol=1e-14)
    assert (got["conv-conseq"][conv_net.fc.weight] - got["conv"][conv_net.fc.weight]).abs().max() > 1e-3


# ---------------------------------------------------------------------------- every weight op against its formula
class _Mixed(nn.Module):
    """BN stem, a residual conv block with a layer scale (+=), tokens through a Linear, x @ W, W @ x, an einsum with
    a parameter, a position table, and a 2-d Linear head. ``keep``: the weight ops' (input, output) for autograd."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.gamma = nn.Parameter(torch.rand(4) + 0.5)
        self.pos = nn.Parameter(torch.randn(16, 4) * 0.1)
        self.tok = nn.Linear(4, 5)
        self.w = nn.Parameter(torch.randn(5, 6) / 5 ** 0.5)
        self.v = nn.Parameter(torch.randn(3, 16) / 4)
        self.e = nn.Parameter(torch.randn(6, 4) / 6 ** 0.5)
        self.head = nn.Linear(12, 3)

    def forward(self, x, keep=None):
        keep = {} if keep is None else keep

        def mark(name, inp, out):
            keep[name] = (inp, out)
            return out

        h = torch.relu(self.bn(mark("stem", x, self.stem(x))))
        r = self.bn2(mark("conv", h, self.conv(h)))
        r = self.gamma.view(1, -1, 1, 1) * r
        r += h
        h = r
        t = torch.relu(h).flatten(2).transpose(1, 2) + self.pos   # (B, 16, 4)
        t = torch.relu(mark("tok", t, self.tok(t)))                # (B, 16, 5)
        t = mark("w", t, t @ self.w)                               # (B, 16, 6)
        t = mark("v", t, self.v @ t)                               # (B, 3, 6)
        t = mark("e", t, torch.einsum("btd,de->bte", t, self.e))   # (B, 3, 4)
        flat = t.flatten(1)
        return mark("head", flat, self.head(flat))


def _rows_nlms(x_rows, d_rows, delta_rel, bias, batch, positions, extra=None):
    """G = B Σ_r Δ_r x̃_rᵀ / (‖x̃_r‖² + δ), x̃ = [x, 1] with a bias; δ = delta_rel · mean ‖x̃‖²; ÷ P for "mean"."""
    xt = torch.cat([x_rows, torch.ones(len(x_rows), 1, dtype=DT)], 1) if bias else x_rows
    energy = (xt ** 2).sum(1)
    g = batch * (d_rows / (energy + delta_rel * energy.mean())[:, None]).T @ xt
    return g / (len(x_rows) / batch if positions == "mean" else 1)


def _conv_nlms(conv, x, d, delta_rel, batch, positions):
    """§6.5 typed with F.unfold: the patches x̃_{b,p}, their energies, B Σ Δ_{b,p} x̃_{b,p}ᵀ / (‖x̃‖² + δ)."""
    cols = F.unfold(x, conv.kernel_size, padding=conv.padding, stride=conv.stride)   # (B, C·k·k, P)
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    g = _rows_nlms(rows, d.flatten(2).transpose(1, 2).reshape(-1, d.shape[1]), delta_rel, conv.bias is not None,
                   batch, positions)
    return g


@pytest.mark.parametrize("mode", ["nlms", "consequentialism"])
@pytest.mark.parametrize("positions", ["sum", "mean"])
def test_every_weight_op_against_its_formula_and_the_rest_is_the_fadjoint(mode, positions):
    torch.manual_seed(2)
    model = _Mixed().to(DT)
    x, t = torch.randn(5, 2, 4, 4, dtype=DT), torch.randint(0, 3, (5,))
    keep = {}
    outs = model(x, keep)                     # autograd: Δ at every weight op's output, of the batch-mean loss
    names = list(keep)
    deltas = dict(zip(names, torch.autograd.grad(F.cross_entropy(outs, t), [keep[n][1] for n in names])))
    inputs = {n: keep[n][0].detach() for n in names}
    net = tfa.FPropagation(model, graph=True)
    with torch.no_grad():
        out = net(x)
    out_adj = tfa.losses.cross_entropy(out, t)[1]
    got = consequentialism_grads(net, out_adj, mode, positions=positions, retain_records=True)
    plain = net.graph_grads(out_adj)
    b, rel = 5, 1e-3
    for name in ("stem", "conv"):
        conv = getattr(model, name)
        g = _conv_nlms(conv, inputs[name], deltas[name], rel, b, positions)
        torch.testing.assert_close(got[conv.weight], g[:, :conv.weight[0].numel()].reshape(conv.weight.shape),
                                   rtol=1e-10, atol=1e-12)
        if conv.bias is not None:
            torch.testing.assert_close(got[conv.bias], g[:, -1], rtol=1e-10, atol=1e-12)
    g = _rows_nlms(inputs["tok"].reshape(-1, 4), deltas["tok"].reshape(-1, 5), rel, True, b, positions)
    torch.testing.assert_close(got[model.tok.weight], g[:, :-1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[model.tok.bias], g[:, -1], rtol=1e-10, atol=1e-12)
    g = _rows_nlms(inputs["w"].reshape(-1, 5), deltas["w"].reshape(-1, 6), rel, False, b, positions)  # x @ W
    torch.testing.assert_close(got[model.w], g.T, rtol=1e-10, atol=1e-12)
    cols, dcols = inputs["v"].transpose(1, 2).reshape(-1, 16), deltas["v"].transpose(1, 2).reshape(-1, 3)  # W @ x
    torch.testing.assert_close(got[model.v], _rows_nlms(cols, dcols, rel, False, b, positions), rtol=1e-10, atol=1e-12)
    g = _rows_nlms(inputs["e"].reshape(-1, 6), deltas["e"].reshape(-1, 4), rel, False, b, positions)  # einsum
    torch.testing.assert_close(got[model.e], g.T, rtol=1e-10, atol=1e-12)
    xh, dh = inputs["head"], deltas["head"]                                   # the 2-d head: §4 as typed
    if mode == "nlms":
        g = _rows_nlms(xh, dh, rel, True, b, positions)
    else:
        xt = torch.cat([xh, torch.ones(b, 1, dtype=DT)], 1)
        k = xt @ xt.T + rel * (xt ** 2).sum(1).mean() * torch.eye(b, dtype=DT)
        g = b * dh.T @ torch.linalg.solve(k, xt)
    torch.testing.assert_close(got[model.head.weight], g[:, :-1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[model.head.bias], g[:, -1], rtol=1e-10, atol=1e-12)
    for p in (model.bn.weight, model.bn.bias, model.bn2.weight, model.bn2.bias, model.gamma, model.pos):
        assert torch.equal(got[p], plain[p])  # the F-adjoint's own feedback: the same sweep, the same O*
    assert set(got) == set(plain) == set(model.parameters())


# ---------------------------------------------------------------------------- positions="mean"
def test_positions_mean_leaves_one_position_unchanged():
    torch.manual_seed(3)
    for model, x in ((_mlp(), torch.randn(6, 7, dtype=DT)), (_OnePosition(True).to(DT), torch.randn(6, 3, 4, 4,
                                                                                                     dtype=DT))):
        grads = {}
        for positions in ("sum", "mean"):
            net = tfa.FPropagation(model, graph=True)
            out = net(x)
            adj = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=DT)
            grads[positions] = consequentialism_grads(net, adj, "nlms", positions=positions)
            net.remove()
        if isinstance(model, nn.Sequential):
            assert all(torch.equal(grads["sum"][p], grads["mean"][p]) for p in model.parameters())
        else:  # the head (one position) and fc unchanged; the stem (16 positions) ÷ 16
            for p in (model.head.weight, model.head.bias, model.fc.weight, model.fc.bias):
                assert torch.equal(grads["sum"][p], grads["mean"][p])
            torch.testing.assert_close(grads["mean"][model.stem.weight], grads["sum"][model.stem.weight] / 16,
                                       rtol=1e-14, atol=0)


def _conv_gains(positions, batch=1, iterations=60):
    """(γ, λ) of an η = 1 step on a convolution's output (docs/maths.md §7.3): γ along the op's own −BΔ, λ the top
    eigenvalue of D ↦ J_θ G(D) / B by power iteration, through the rule's own through_op."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).to(DT)
    x = torch.rand(batch, 3, 6, 6, dtype=DT)  # smooth positive inputs: neighbouring patches alike
    net = tfa.FPropagation(model, graph=True)
    out = net(x)
    op = next(op for op in net._tape.ops if op.entry.nlms == "conv")
    rule = ConsequentialismGraphRule("nlms", None, 1e-3, positions, batch)
    conv = model[0]

    def moved(d):
        g, keys = rule.through_op(net._tape, op, d), dict(op.saved[0])
        return conv._conv_forward(x, g[keys["weight"]], g[keys["bias"]])

    d = torch.autograd.functional.vjp(lambda y: model[3](model[2](model[1](y))), conv(x),
                                      tfa.losses.cross_entropy(out, torch.zeros(batch, dtype=torch.long))[1])[1]
    gamma = ((moved(d) * d * batch).sum() / (d * batch).pow(2).sum()).item()
    v = torch.randn_like(d)
    for _ in range(iterations):
        v = moved(v / v.norm()) / batch
    lam = v.norm().item()
    net.remove()
    return gamma, lam


def test_positions_mean_keeps_the_top_gain_of_a_one_sample_step_at_most_1():
    """At batch 1 a plain η = 1 step of NLMS moves one position's output by exactly its delta; the P patches of a
    convolution share the weight, so "sum" moves the output by up to P times (λ = 24 of P = 36 here, γ = 1.3), and
    "mean" brings every direction's gain to ≤ 1: 0 < η < 2 is stable again, as in §4."""
    gamma_sum, lam_sum = _conv_gains("sum")
    gamma_mean, lam_mean = _conv_gains("mean")
    assert lam_sum > 10 and gamma_sum > 1
    assert 0 < gamma_mean <= lam_mean <= 1 + 1e-9
    assert lam_mean == pytest.approx(lam_sum / 36, rel=1e-6)


# ---------------------------------------------------------------------------- training and refusals
class _ResBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(h + self.bn2(self.conv(h)))
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("mode", ["consequentialism", "nlms"])
def test_the_optimizer_trains_a_residual_bn_net_on_the_graph(mode):
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(5)
    t = torch.randint(0, 3, (48,), generator=gen)
    x = torch.randn(48, 1, 6, 6, generator=gen, dtype=DT) * 0.5 + t.to(DT).view(-1, 1, 1, 1)  # the class in the mean
    model = _ResBN().to(DT)
    net = tfa.FPropagation(model)  # not a plain Sequential: recorded on the tape
    assert net.graph
    opt = Consequentialism(net, lr=0.2, mode=mode, positions="mean", base="sgd", momentum=0.9)
    losses = []
    for _ in range(30):
        net(x)
        losses.append(float(opt.step(target=t)))
    assert losses[-1] < 0.3 * losses[0]


class _Refused(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))
        self.c = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        if self.kind == "computed-weight":
            return F.linear(x, self.a * 2, self.b)
        if self.kind == "weight-norm":
            return F.linear(x, self.a / (self.a * self.a).sum(1, keepdim=True))  # a normalised weight
        if self.kind == "constant-weight":
            return F.linear(x, torch.ones(4, 4, dtype=x.dtype), self.b)
        if self.kind == "two-parameters":
            return x @ (self.a @ self.c)
        return torch.einsum("bij,jk->bk", x.view(-1, 1, 4).expand(-1, 3, 4), self.a)  # "alone": i summed in x only


@pytest.mark.parametrize("kind,message", [
    ("computed-weight", r"^F\.linear in <model> \(_Refused\): its weight is computed from parameters \(weight "
                        r"normalisation, a hypernetwork\), not a parameter; nlms cannot normalise its update by an "
                        r"input \(docs/maths.md §7.3\); nothing was changed$"),
    ("weight-norm", r"^F\.linear in <model> \(_Refused\): its weight is computed from parameters"),
    ("constant-weight", r"^F\.linear in <model> \(_Refused\): its weight is not a parameter; nlms cannot"),
    ("two-parameters", r"^Tensor\.matmul in <model> \(_Refused\): a product of two parameters"),
    ("alone", r"^torch\.einsum in <model> \(_Refused\): it sums the label 'i' of one operand alone"),
])
def test_an_op_it_cannot_normalise_is_refused_in_one_line_and_nothing_is_written(kind, message):
    torch.manual_seed(6)
    model = _Refused(kind).to(DT)
    net = tfa.FPropagation(model, graph=True)
    opt = Consequentialism(net, lr=0.1, mode="nlms")
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        out = net(torch.randn(4, 4, dtype=DT))
    with pytest.raises(TypeError, match=message) as info:
        opt.step(out_adj=torch.randn_like(out))
    assert "\n" not in str(info.value)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    net(torch.randn(4, 4, dtype=DT))  # lms is the F-adjoint: nothing to normalise, nothing refused
    used = {"computed-weight": {model.a, model.b}, "two-parameters": {model.a, model.c}, "alone": {model.a},
            "weight-norm": {model.a}, "constant-weight": {model.b}}[kind]
    assert set(consequentialism_grads(net, torch.randn_like(out), "lms")) == used


def test_a_failed_factorisation_on_the_graph_names_the_op():
    model = _OnePosition(False).to(DT)
    net = tfa.FPropagation(model, graph=True)
    opt = Consequentialism(net, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    net(torch.randn(4, 3, 4, 4, dtype=DT) * 1e300)
    with pytest.raises(RuntimeError, match=r"^F\.linear in .*fc.*: consequentialism's K = .* is not positive "
                                           r"definite") as info:
        opt.step(target=torch.zeros(4, dtype=torch.long))
    assert "\n" not in str(info.value)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_bad_positions_is_refused():
    net = tfa.FPropagation(nn.Sequential(nn.Linear(3, 2)), graph=True)
    with pytest.raises(ValueError, match="positions must be one of"):
        Consequentialism(net, positions="max")
