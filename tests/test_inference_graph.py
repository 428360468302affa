"""Inference learning on FPropagation(model, graph=True) (docs/maths.md §7.5): predictive coding on the tape.

What is checked, each able to fail:

* a chain recorded as a graph gives today's chain IL (tfa.rules.inference's §5.1 / §6.6 code) to rounding: MLPs,
  a CNN with strided convolutions and a flatten, several T and clamps, and the optimizer trains both alike;
* on a residual net with train-mode BatchNorm, T iterations are gradient descent on the energy
  Σ_v ½‖x̂_v − μ_v‖² + ½ CE(μ_L; x̂^L), and the update is (1/B)·∂(Σ ½‖e_v‖² + CE)/∂θ at the final states, both
  with autograd on a transcription of the forward split at the states as the oracle;
* γ = 0 keeps the forward on a graph (residual, ``+=``, cat, pooling, BatchNorm): every hidden error is 0, the
  parameters between the last states and the output get the F-adjoint's cross-entropy gradient, the others 0; the
  re-runs leave BatchNorm's running statistics alone;
* a residual MLP and a small BatchNorm ResNet learn an MNIST slice with InferenceLearning;
* the refusals, in one line, nothing written: IL-prox on a graph, no kept values, dropout in train mode, a mask
  computed from a value, probabilities at the top.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_fadjoint as tfa
from torch_fadjoint.optim import InferenceLearning, inference_grads
from torch_fadjoint.rules.inference import _il_graph

from .models import labelled, mlp
from .state import assert_untouched, snapshot

DT = torch.float64


def record(model, *inputs, graph=True, keep=True):
    net = tfa.FPropagation(model, graph=graph, keep_pre_activations=keep)
    with torch.no_grad():
        net(*inputs)
    return net


# ---------------------------------------------------------------------------------------------------- chains
def _cnn(seed=0):
    """conv-ReLU-conv(stride 2)-Tanh-flatten-linear-ReLU-linear: no pooling between an activation and the next
    layer, where §6.6 and §7.5 place the states alike (up to the flatten, a reshape)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(54, 12), nn.ReLU(), nn.Linear(12, 5)).to(DT)


CHAINS = {
    "mlp-tanh": lambda: (mlp((6, 9, 7, 4), nn.Tanh, seed=0), labelled(5, 6, 4, seed=1)),
    "mlp-relu": lambda: (mlp((6, 9, 7, 4), nn.ReLU, seed=2), labelled(7, 6, 4, seed=3)),
    "cnn": lambda: (_cnn(), labelled(6, (1, 8, 8), 5, seed=2)),
}


@pytest.mark.parametrize("T, clamp", [(0, 1.0), (3, 1.0), (25, 1.0), (25, 0.6)])
@pytest.mark.parametrize("name", sorted(CHAINS))
def test_a_chain_recorded_as_a_graph_gives_the_chain_il(name, T, clamp):
    model, (x, t) = CHAINS[name]()
    options = dict(T=T, gamma_top=0.1, gamma_bot=0.2, clamp=clamp)
    want = inference_grads(record(model, x, graph=False, keep=False), t, "il", **options)
    got = inference_grads(record(model, x), t, "il", **options)
    assert set(got) == set(want) == set(model.parameters())
    for p in model.parameters():
        if T > 0:
            assert want[p].abs().max() > 1e-6  # every layer learns: the comparison is not of zeros
        torch.testing.assert_close(got[p], want[p], rtol=1e-12, atol=1e-15 * max(want[p].abs().max().item(), 1e-3))


def test_the_optimizer_trains_a_chain_recorded_as_a_graph_as_the_chain():
    runs = []
    for graph in (False, True):
        model, _ = CHAINS["cnn"]()
        net = tfa.FPropagation(model, graph=graph)
        opt = InferenceLearning(net, lr=0.1, T=5, momentum=0.9)
        for x, t in [labelled(6, (1, 8, 8), 5, seed=s) for s in range(3)]:
            with torch.no_grad():
                net(x)
            opt.step(target=t)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_pooling_after_the_activation_moves_the_state_and_the_rule_with_it():
    """§7.5 puts a state on the input of each weight op: after a max pooling, where §6.6 puts it before. The two
    differ (documented); with the pooling an identity (kernel 1) they agree again."""
    def cnn(pool):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), pool, nn.Conv2d(4, 6, 3), nn.Tanh(),
                             nn.Flatten(), nn.Linear(6 * (4 if pool.kernel_size == 2 else 36), 5)).to(DT)
    x, t = labelled(6, (1, 8, 8), 5, seed=4)
    for pool, same in ((nn.MaxPool2d(1), True), (nn.MaxPool2d(2), False)):
        model = cnn(pool)
        want = inference_grads(record(model, x, graph=False, keep=False), t, "il", T=10, gamma_top=0.1, gamma_bot=0.2)
        got = inference_grads(record(model, x), t, "il", T=10, gamma_top=0.1, gamma_bot=0.2)
        gap = max(((got[p] - want[p]).abs().max() / want[p].abs().max()).item() for p in model.parameters())
        assert (gap < 1e-12) if same else (gap > 1e-4), (pool, gap)


# ------------------------------------------------------------------------------------ the energy on a graph
class _ResBN(nn.Module):
    """s1 = ReLU(BN(W1 x)) (train mode); s2 = s1 + ReLU(W2 s1); logits = W4 s2 + W5 s1: the states are s1 (read by
    W2 and W5) and s2 (read by W4); the ops between (BN, ReLU, the sum) belong to the predictions."""

    def __init__(self):
        super().__init__()
        self.w1, self.bn, self.w2 = nn.Linear(5, 7, bias=False), nn.BatchNorm1d(7), nn.Linear(7, 7)
        self.w4, self.w5 = nn.Linear(7, 3), nn.Linear(7, 3, bias=False)

    def forward(self, x):
        s1 = F.relu(self.bn(self.w1(x)))
        s2 = s1 + F.relu(self.w2(s1))
        return self.w4(s2) + self.w5(s1)


def _energy_oracle(model, x, t, T, gamma, clamp):
    """The same net split at its states, typed with autograd: T steps of gradient descent (step γ) on
    E = Σ_b ½‖s1 − μ1‖² + ½‖s2 − μ2‖² + ½ CE(logits; x̂^L), then (1/B)·∂(Σ ½‖e‖² + CE(logits; x̂^L))/∂θ."""
    bn = model.bn
    params = dict(model.named_parameters())

    def predictions(s1, s2):
        mu1 = F.relu(F.batch_norm(x @ params["w1.weight"].T, None, None, params["bn.weight"], params["bn.bias"],
                                  True, 0.0, bn.eps))
        mu2 = s1 + F.relu(F.linear(s1, params["w2.weight"], params["w2.bias"]))
        return mu1, mu2, F.linear(s2, params["w4.weight"], params["w4.bias"]) + F.linear(s1, params["w5.weight"])

    def energy(s1, s2, target, half):
        mu1, mu2, logits = predictions(s1, s2)
        ce = -(target * torch.log_softmax(logits, 1)).sum()
        return 0.5 * ((s1 - mu1) ** 2).sum() + 0.5 * ((s2 - mu2) ** 2).sum() + (0.5 if half else 1.0) * ce, logits

    with torch.no_grad():
        s1 = F.relu(bn(model.w1(x)))  # the forward (bn in train mode: batch statistics; running ones not read)
        s2 = s1 + F.relu(model.w2(s1))
        logits = model.w4(s2) + model.w5(s1)
    onehot = F.one_hot(t, 3).to(DT)
    target = clamp * onehot + (1 - clamp) * torch.softmax(logits, 1)
    for _ in range(T):
        s1, s2 = s1.detach().requires_grad_(), s2.detach().requires_grad_()
        e, _ = energy(s1, s2, target, half=True)
        g1, g2 = torch.autograd.grad(e, (s1, s2))
        s1, s2 = s1 - gamma * g1, s2 - gamma * g2
    e, _ = energy(s1.detach(), s2.detach(), target, half=False)
    grads = torch.autograd.grad(e, list(params.values()))
    return {params[n]: g / x.shape[0] for n, g in zip(params, grads)}, (s1.detach(), s2.detach())


@pytest.mark.parametrize("T, gamma", [(1, 0.3), (6, 0.1)])
def test_the_iterations_descend_the_energy_and_the_update_is_its_parameter_gradient(T, gamma):
    torch.manual_seed(0)
    model = _ResBN().to(DT)
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    x, t = labelled(8, 5, 3, seed=5)
    want, (s1, s2) = _energy_oracle(model, x, t, T, gamma, clamp=1.0)
    net = record(model, x)
    states, errors, got = _il_graph(net, F.one_hot(t, 3).to(DT), T, gamma, gamma, 1.0)
    assert len(states) == 2
    for want_state in (s1, s2):
        closest = min(states.values(), key=lambda s: (s - want_state).abs().max().item())
        torch.testing.assert_close(closest, want_state, rtol=1e-12, atol=1e-13)
    assert set(got) == set(model.parameters())
    for p in model.parameters():
        assert want[p].abs().max() > 1e-6
        torch.testing.assert_close(got[p], want[p], rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------------------------------- γ = 0 on a graph
class _Residual(nn.Module):
    """A stem, a BasicBlock (conv-BN-ReLU-conv-BN, ``+=`` the input, ReLU in place), a concatenated side branch, max
    pooling, a flatten, and a head whose two linears read one state: fc(h) + BN(fc2(h)), so that the ops between the
    last state and the output hold parameters of several kinds."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c1, self.b1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.side = nn.Conv2d(4, 2, 1)
        self.fc, self.fc2, self.bn3 = nn.Linear(6 * 9, 5), nn.Linear(6 * 9, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        out = F.relu(self.b1(self.c1(h)))
        out = self.b2(self.c2(out))
        out += h
        out = F.relu(out, inplace=True)
        out = torch.cat([out, torch.tanh(self.side(out))], 1)
        h = F.max_pool2d(out, 2).flatten(1)
        return self.fc(h) + self.bn3(self.fc2(h))


def _residual(seed=0):
    torch.manual_seed(seed)
    model = _Residual().to(DT)
    with torch.no_grad():
        for bn in (model.bn0, model.b1, model.b2, model.bn3):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model


def test_gamma_zero_keeps_the_forward_on_a_graph_and_the_top_gets_the_gradient():
    model = _residual()
    x, t = labelled(6, (2, 6, 6), 5, seed=6)
    net = record(model, x)
    forward = {i: net._tape.kept[i][0].clone() for i in net._tape.kept}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    states, errors, grads = _il_graph(net, F.one_hot(t, 5).to(DT), 5, 0.0, 0.0, 1.0)
    assert len(states) == 4  # h (stem), the block's inner ReLU, the block's output (side conv), the flatten
    for v, state in states.items():
        assert torch.equal(state, forward[v])
        assert errors[v].abs().max() < 1e-14
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name  # the re-runs leave the running statistics alone
    # the ops between the last state and the output: the F-adjoint's cross-entropy gradient; the others: 0
    ref = record(model, x, keep=False)
    out = ref.output
    want = ref.graph_grads((torch.softmax(out, 1) - F.one_hot(t, 5).to(DT)) / 6)
    top = {model.fc.weight, model.fc.bias, model.fc2.weight, model.fc2.bias, model.bn3.weight, model.bn3.bias}
    for p in model.parameters():
        if p in top:
            torch.testing.assert_close(grads[p], want[p], rtol=1e-12, atol=1e-15)
            assert p is model.fc2.bias or grads[p].abs().max() > 1e-4  # a bias before BatchNorm: analytically 0
        else:
            assert grads[p].abs().max() < 1e-13, [n for n, q in model.named_parameters() if q is p]


def test_batchnorm_predictions_use_the_states_batch_statistics():
    """γ > 0: each re-run normalises with its current input's batch statistics (not the forward's, not the running
    ones): the errors come out as x̂ − BN_batch(…) of the states, typed here for the stem's state."""
    model = _residual()
    x, t = labelled(6, (2, 6, 6), 5, seed=7)
    net = record(model, x)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    states, errors, _ = _il_graph(net, F.one_hot(t, 5).to(DT), 4, 0.2, 0.2, 1.0)
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    stem = min(states)  # the first state: the stem's ReLU output, predicted from the clamped input
    with torch.no_grad():
        mu = F.relu(F.batch_norm(model.stem(x), None, None, model.bn0.weight, model.bn0.bias, True))
    torch.testing.assert_close(errors[stem], states[stem] - mu, rtol=1e-12, atol=1e-14)
    inner = sorted(states)[1]  # the block's inner ReLU: BN of the conv of the stem's STATE, with its batch stats
    with torch.no_grad():
        mu = F.relu(F.batch_norm(model.c1(states[stem]), None, None, model.b1.weight, model.b1.bias, True))
    torch.testing.assert_close(errors[inner], states[inner] - mu, rtol=1e-12, atol=1e-14)
    assert errors[inner].abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------ learning
class _ResMLP(nn.Module):
    def __init__(self, width=64):
        super().__init__()
        self.inp, self.f1, self.f2, self.out = (nn.Linear(784, width), nn.Linear(width, width),
                                                 nn.Linear(width, width), nn.Linear(width, 10))

    def forward(self, x):
        h = F.relu(self.inp(x.flatten(1)))
        h = h + F.relu(self.f1(h))
        h = h + F.relu(self.f2(h))
        return self.out(h)


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        out += x
        return F.relu(out)


class _ResNet(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(_Block(c), _Block(c))
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = F.avg_pool2d(x.reshape(-1, 1, 28, 28), 2)  # 14 × 14: an op of the input alone, clamped
        h = F.relu(self.bn(self.stem(x)))
        return self.fc(self.blocks(h).mean((2, 3)))


def _train(model, data_root, n, T, gamma, lr, seed=0):
    from torch_fadjoint import data as tfa_data

    splits = tfa_data.load("mnist", data_root, download=False)
    x, t = splits["train"].x[:n], splits["train"].t[:n]  # float32: the speed of a training run
    net = tfa.FPropagation(model, graph=True)
    opt = InferenceLearning(net, lr=lr, T=T, gamma_top=gamma, gamma_bot=gamma, momentum=0.9)
    losses = []
    for idx in torch.randperm(n, generator=torch.Generator().manual_seed(seed)).split(32):
        with torch.no_grad():
            net(x[idx])
        losses.append(opt.step(target=t[idx]).item())
    model.eval()
    with torch.no_grad(), net.paused():
        acc = (model(splits["test"].x[:1000]).argmax(1) == splits["test"].t[:1000]).double().mean().item()
    return sum(losses[:10]) / 10, sum(losses[-10:]) / 10, acc


def test_a_residual_mlp_learns_an_mnist_slice(data_root):
    """784-64-(+64)-(+64)-10 ReLU with two residual sums, 2000 images at batch 32, one epoch of IL (T = 20,
    γ = 0.1, SGD lr 0.05, momentum 0.9), float32. Measured, seeds 0-4, AVX2 and default kernels: accuracy
    0.80-0.85, cross-entropy of the last ten steps 0.20-0.27 of the first ten's (chance 0.1)."""
    torch.manual_seed(0)
    first, last, acc = _train(_ResMLP(), data_root, 2000, 20, 0.1, 0.05)
    assert last < 0.5 * first and acc > 0.6, (first, last, acc)


def test_a_batchnorm_resnet_learns_an_mnist_slice(data_root):
    """A stem and two BasicBlocks (8 channels, train-mode BatchNorm, ``+=``), a mean and a linear head on 14 × 14
    images; 2000 images at batch 32, one epoch of IL (T = 8, γ = 0.2, SGD lr 0.1, momentum 0.9), float32. Measured,
    seeds 0-4, AVX2 and default kernels: accuracy 0.23-0.42, the last ten steps' cross-entropy 0.61-0.75 of the
    first ten's (seed 0: 0.232, 0.61)."""
    torch.manual_seed(0)
    first, last, acc = _train(_ResNet(), data_root, 2000, 8, 0.2, 0.1)
    assert last < 0.85 * first and acc > 0.15, (first, last, acc)


# ------------------------------------------------------------------------------------------------ refusals
def test_il_prox_on_a_graph_is_refused_in_one_line_and_nothing_is_written():
    model = _residual()
    x, t = labelled(6, (2, 6, 6), 5, seed=8)
    net = record(model, x)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^IL-prox \(docs/maths.md §5.2\) is defined on chains of layers .*"
                                         r"variant='il'") as info:
        inference_grads(net, t, "il_prox")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"^IL-prox \(docs/maths.md §5.2\) is defined on chains"):
        InferenceLearning(tfa.FPropagation(model, graph=True), variant="il_prox")
    assert_untouched(before, model)


def test_il_on_a_graph_needs_the_kept_values():
    model = _residual()
    x, t = labelled(6, (2, 6, 6), 5, seed=8)
    with pytest.raises(RuntimeError, match=r"^inference learning re-runs the recorded ops: it needs "
                                           r"FPropagation\(model, graph=True, keep_pre_activations=True\)"):
        inference_grads(record(model, x, keep=False), t, "il")
    net = tfa.FPropagation(model, graph=True)
    InferenceLearning(net)
    assert net.keep_pre_activations  # the optimizer sets it


class _Refused(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind, self.a, self.b = kind, nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.kind == "dropout":
            h = F.dropout(h, 0.3, training=True)
        elif self.kind == "mask":
            h = h * (h > 0)
        out = self.b(h)
        return torch.log_softmax(out, 1) if self.kind == "probabilities" else out


@pytest.mark.parametrize("kind, message", [
    ("dropout", r"^F.dropout in .*: inference learning re-runs the recorded ops, and a random mask would be drawn"),
    ("mask", r"^Tensor.mul in .*: reads a tensor computed from values outside the table"),
    ("probabilities", r"^torch.log_softmax in .*: inference learning needs the logits at the top"),
])
def test_what_a_rerun_cannot_repeat_is_refused_in_one_line_and_nothing_is_written(kind, message):
    model = _Refused(kind).to(DT)
    x, t = labelled(5, 6, 4, seed=9)
    net = tfa.FPropagation(model, graph=True)
    opt = InferenceLearning(net, T=3)
    with torch.no_grad():
        net(x)
    before = snapshot(model, opt)
    with pytest.raises((TypeError, ValueError), match=message) as info:
        opt.step(target=t)
    assert "\n" not in str(info.value)
    assert_untouched(before, model, opt)


def test_a_default_net_keeps_the_chain_for_il_prox_and_the_graph_for_il():
    """FPropagation(model) left to choose (graph=None): IL runs on whatever was recorded; IL-prox claims the chain."""
    if not hasattr(tfa.FPropagation, "require_chain"):
        pytest.skip("FPropagation.require_chain is not there yet")
    model = _residual()
    net = tfa.FPropagation(model)
    assert net.graph  # not a plain chain: the tape
    InferenceLearning(net)
    assert net.graph
    chain, (x, t) = CHAINS["mlp-relu"]()
    net = tfa.FPropagation(chain, graph=True)
    net.graph_choice = None  # as left to choose, then recorded as a graph
    InferenceLearning(net, variant="il_prox")
    assert not net.graph
