"""LFP (docs/maths.md §3): closed forms, the §3.4 identity with backprop, Step nets, the optimizer contract."""
import copy
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_fadjoint as tfa
from torch_fadjoint.optim.fadjoint import fadjoint_grads
from torch_fadjoint.optim.lfp import LFP, lfp_backward, lfp_grads
from torch_fadjoint.rules.lfp import lfp_reward

from . import oracles
from .models import labelled, mlp, recorded
from .state import assert_untouched, snapshot

DT = torch.float64


def relu_mlp(bias=True, widths=(6, 9, 7, 4)):
    return mlp(widths, nn.ReLU, bias=bias)


def step_mlp(widths=(6, 12, 10, 4)):
    return mlp(widths, tfa.nn.Step)


def data(batch=10, n_in=6, classes=4, seed=3):
    return labelled(batch, n_in, classes, seed=seed)


def record(model, x):
    return recorded(model, x, keep_pre_activations=True)


# -- §3.4: on ReLU, ε → 0, no bias, LFP is backprop rescaled by |W| ----------------------------------
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("batch_reduction", ["mean", "sum"])
def test_relu_feedback_is_abs_w_times_gradient(batch_reduction, bias):
    """F_W = −|W| ⊙ B·∂J/∂W (§3.4): grad = −F/B = |W| ⊙ ∂J/∂W ('mean'), −F = B|W| ⊙ ∂J/∂W ('sum').

    Exact with a bias too (as §3.4 says): S^k = R^k / Y^k divides by the pre-activation INCLUDING the bias, and
    for ReLU X/Y = 1[Y > 0] = σ'(Y).
    """
    model = relu_mlp(bias=bias)
    x, t = data()
    params = dict(model.named_parameters())
    want = oracles.autograd_grads(lambda: model(x), params, "cross_entropy", t)
    net = record(model, x)
    got = lfp_grads(net, t, eps=1e-13, batch_reduction=batch_reduction)
    scale = 1.0 if batch_reduction == "mean" else float(len(t))
    assert len(got) == len(params) == (6 if bias else 3)
    for name, p in params.items():
        assert want[name].abs().max() > 1e-3
        expected = scale * p.detach().abs() * want[name]
        assert got[p].shape == p.shape
        torch.testing.assert_close(got[p], expected, rtol=0, atol=1e-8)


def test_tanh_feedback_is_not_the_gradient():
    """The §3.4 identity needs σ(Y)/Y = σ'(Y) (ReLU); with tanh LFP uses the secant slope: a guard that
    the test above can fail."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 4, bias=False)).to(DT)
    x, t = data()
    x = 2 * x
    params = dict(model.named_parameters())
    want = oracles.autograd_grads(lambda: model(x), params, "cross_entropy", t)
    got = lfp_grads(record(model, x), t, eps=1e-13)
    diff = max((got[p] - p.detach().abs() * want[n]).abs().max().item() for n, p in params.items())
    assert diff > 1e-4


# -- §3.1 rewards vs hand-typed formulas ---------------------------------------------------------------
LOGITS = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0], [1.0, 1.0, -0.5], [-1.0, -2.0, -3.0]], dtype=DT)
TARGET = torch.tensor([0, 2, 1, 0])


def test_softmax_reward():
    exp = LOGITS.exp()
    probs = exp / exp.sum(1, keepdim=True)
    onehot = torch.tensor([[1, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=DT)
    torch.testing.assert_close(lfp_reward(LOGITS, TARGET, "softmax"), LOGITS * (onehot - probs), rtol=0, atol=1e-14)


def test_sigmoid_reward():
    onehot = torch.tensor([[1, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=DT)
    sig = 1 / (1 + (-LOGITS).exp())
    torch.testing.assert_close(lfp_reward(LOGITS, TARGET, "sigmoid"), LOGITS * (onehot - sig), rtol=0, atol=1e-14)


def test_correct_class_reward():
    """Row 0: right, logit +2 → +1. Row 1: wrong → 0. Row 2: tie at the max counts as right, +1. Row 3: right, −1."""
    want = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 1, 0], [-1, 0, 0]], dtype=DT)
    torch.testing.assert_close(lfp_reward(LOGITS, TARGET, "correct_class"), want, rtol=0, atol=0)


def test_single_layer_closed_form_and_eps():
    """One Linear with bias: grad_w = −|W| ⊙ (R/stab(Y))ᵀX / B, stab(Y) = Y + ε sign(Y), typed out here."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 3)).to(DT)
    x, t = data(batch=7, n_in=5, classes=3)
    eps = 0.3  # large, so that the ε term matters
    with torch.no_grad():
        y = x @ model[0].weight.T + model[0].bias
        probs = torch.softmax(y, 1)
        reward = y * (F.one_hot(t, 3).to(DT) - probs)
        ratio = reward / (y + eps * torch.where(y >= 0, 1.0, -1.0).to(DT))
        want_w = -model[0].weight.abs() * (ratio.T @ x) / 7
        want_b = -model[0].bias.abs() * ratio.sum(0) / 7
    got = lfp_grads(record(model, x), t, eps=eps)
    torch.testing.assert_close(got[model[0].weight], want_w, rtol=0, atol=1e-14)
    torch.testing.assert_close(got[model[0].bias], want_b, rtol=0, atol=1e-14)


@pytest.mark.parametrize("norm", ["batch", "sample"])
def test_norm_backward_on_one_layer(norm):
    """One layer: the output reward is divided by max|R| (whole batch, or each row) before S = R/stab(Y)."""
    model = nn.Sequential(nn.Linear(5, 3)).to(DT)
    x, t = data(batch=6, n_in=5, classes=3)
    net = record(model, x)
    reward = lfp_reward(net.output, t)
    peak = reward.abs().amax() if norm == "batch" else reward.abs().amax(1, keepdim=True)
    want = lfp_grads(net, reward=reward / peak, retain_records=True)
    got = lfp_grads(net, t, norm_backward=norm)
    for p in model.parameters():
        torch.testing.assert_close(got[p], want[p], rtol=0, atol=1e-14)
    assert (want[model[0].weight] - lfp_grads(record(model, x), t)[model[0].weight]).abs().max() > 1e-6


def test_dropout_applies_recorded_mask():
    """Dropout's reward backward is its mask/(1−p): the same grads as a net with the mask folded in by hand."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 4)).to(DT)
    x, t = data()
    net = record(model, x)
    mask = net.layers[0].maps[1].saved.clone()
    got = lfp_grads(net, t)
    # reference: the same forward with the mask applied by a fixed elementwise multiply is the same chain,
    # so compute the two-layer LFP by hand
    with torch.no_grad():
        w1, b1, w2, b2 = model[0].weight, model[0].bias, model[3].weight, model[3].bias
        y1 = x @ w1.T + b1
        x1 = torch.relu(y1) * mask
        y2 = x1 @ w2.T + b2
        stab = lambda y: y + 1e-6 * torch.where(y >= 0, 1.0, -1.0)  # noqa: E731
        s2 = lfp_reward(y2, t) / stab(y2)
        r1 = (x1 * (s2 @ w2)) * mask
        s1 = r1 / stab(y1)
    torch.testing.assert_close(got[w2], -w2.abs() * (s2.T @ x1) / 10, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[w1], -w1.abs() * (s1.T @ x) / 10, rtol=0, atol=1e-12)


# -- Step nets: only LFP trains them -------------------------------------------------------------------
def test_step_net_refused_by_fadjoint_and_autograd():
    model = step_mlp()
    x, t = data()
    net = tfa.FPropagation(model)
    with torch.no_grad():
        out = net(x)
    with pytest.raises(TypeError, match="Step"):
        fadjoint_grads(net, torch.ones_like(out))
    with pytest.raises(RuntimeError, match="Step"):
        with torch.enable_grad():
            F.cross_entropy(model(x), t).backward()


def test_step_net_lfp_grads_nonzero():
    model = step_mlp()
    x, t = data()
    grads = lfp_grads(record(model, x), t)
    assert len(grads) == 6 and all(g.abs().max() > 0 for g in grads.values())


def test_lfp_backward_accumulates_and_works_with_torch_sgd():
    model = step_mlp()
    x, t = data()
    want = lfp_grads(record(model, x), t)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    record_net = record(model, x)
    lfp_backward(record_net, t)
    for p in model.parameters():
        torch.testing.assert_close(p.grad, want[p] + 1, rtol=0, atol=1e-14)


# -- the optimizer --------------------------------------------------------------------------------------
def manual_lfp_sgd(model, batches, lr, momentum, clip_norm):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for x, t in batches:
        grads = lfp_grads(record(model, x), t)
        for p in model.parameters():
            p.grad = grads[p].clone()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip_norm)
        opt.step()


@pytest.mark.parametrize("clip_norm", [None, 0.05, 1e6])
def test_optimizer_equals_lfp_grads_clip_and_torch_sgd(clip_norm):
    """LFP.step = lfp_grads → torch.nn.utils.clip_grad_norm_ → torch.optim.SGD (momentum), over 5 steps."""
    model_a = step_mlp()
    model_b = copy.deepcopy(model_a)
    batches = [data(seed=s) for s in range(5)]
    manual_lfp_sgd(model_a, batches, 0.1, 0.9, clip_norm)
    net = tfa.FPropagation(model_b)
    opt = LFP(net, lr=0.1, momentum=0.9, clip_norm=clip_norm)
    for x, t in batches:
        with torch.no_grad():
            net(x)
        opt.step(target=t)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=0, atol=1e-13)


def test_clipping_bounds_global_norm():
    model = step_mlp()
    x, t = data()
    raw = lfp_grads(record(model, x), t)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in raw.values()]))
    assert norm > 0.02
    clipped = lfp_grads(record(model, x), t, clip_norm=0.01)
    new_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in clipped.values()]))
    torch.testing.assert_close(new_norm, torch.tensor(0.01, dtype=DT), rtol=1e-6, atol=0)
    for p in raw:  # direction kept
        torch.testing.assert_close(clipped[p], raw[p] * 0.01 / (norm + 1e-6), rtol=0, atol=1e-15)


def test_step_returns_ce_and_sets_keep_pre_activations():
    model = relu_mlp()
    net = tfa.FPropagation(model)
    opt = LFP(net)
    assert net.keep_pre_activations
    x, t = data()
    with torch.no_grad():
        out = net(x).clone()
    loss = opt.step(target=t)
    torch.testing.assert_close(loss, F.cross_entropy(out, t), rtol=0, atol=1e-14)


def test_state_dict_round_trip():
    model = step_mlp()
    net = tfa.FPropagation(model)
    opt = LFP(net, lr=0.05, momentum=0.9)
    batches = [data(seed=s) for s in range(4)]
    for x, t in batches[:2]:
        with torch.no_grad():
            net(x)
        opt.step(target=t)
    model_b = copy.deepcopy(model)
    net_b = tfa.FPropagation(model_b)
    opt_b = LFP(net_b, lr=0.05, momentum=0.9)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))
    for n_, o_ in ((net, opt), (net_b, opt_b)):
        for x, t in batches[2:]:
            with torch.no_grad():
                n_(x)
            o_.step(target=t)
    for pa, pb in zip(model.parameters(), model_b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=0, atol=0)


def test_errors_leave_everything_untouched():
    model = step_mlp()
    net = tfa.FPropagation(model)
    opt = LFP(net, lr=0.1, momentum=0.9)
    x, t = data()
    with torch.no_grad():
        net(x)
    opt.step(target=t)  # creates momentum buffers and .grad
    before = snapshot(model, opt)
    assert all(p.grad is not None for p in model.parameters())
    bad = [
        (ValueError, lambda: opt.step(target=torch.full_like(t, 7))),         # target out of range
        (ValueError, lambda: opt.step(target=t[:3])),                         # wrong batch
        (ValueError, lambda: opt.step(out_adj=torch.ones(10, 3, dtype=DT))),
        (RuntimeError, lambda: opt.step(out_adj=torch.full((10, 4), float("nan"), dtype=DT))),
        (ValueError, lambda: opt.step()),
    ]
    for exc, call in bad:
        with torch.no_grad():
            net(x)
        with pytest.raises(exc):
            call()
        assert_untouched(before, model, opt)
    with pytest.raises(RuntimeError, match="no recorded forward"):
        net.clear()
        opt.step(target=t)


def test_missing_pre_activations_and_bad_modules():
    model = relu_mlp()
    net = tfa.FPropagation(model)  # keep_pre_activations=False
    x, t = data()
    with torch.no_grad():
        net(x)
    with pytest.raises(RuntimeError, match="keep_pre_activations"):
        lfp_grads(net, t)
    model = nn.Sequential(nn.Linear(6, 4), nn.LogSoftmax(dim=-1)).to(DT)
    with pytest.raises(TypeError, match="LogSoftmax"):
        lfp_grads(record(model, x), t)


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(eps=-1.0), dict(clip_norm=0.0), dict(reward="nope"),
                                    dict(batch_reduction="max"), dict(norm_backward="layer")])
def test_bad_hyper_parameters(kwargs):
    with pytest.raises(ValueError):
        LFP(tfa.FPropagation(relu_mlp()), **kwargs)


# -- a Step net learns MNIST --------------------------------------------------------------------------
def _step_mlp_accuracy(splits: dict, seed: int) -> float:
    """784-120-84-10 Step MLP, 20k training images, 2 epochs of LFP (lr 0.1, momentum 0.9, clip 3) from
    ``seed`` (init and batch order); the accuracy on 2000 test images."""
    train_x, train_t = splits["train"].x[:20000], splits["train"].t[:20000]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 120), tfa.nn.Step(), nn.Linear(120, 84), tfa.nn.Step(),
                          nn.Linear(84, 10))
    net = tfa.FPropagation(model)
    opt = LFP(net, lr=0.1, momentum=0.9, clip_norm=3.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(2):
        for idx in torch.randperm(20000, generator=gen).split(128):
            with torch.no_grad():
                net(train_x[idx])
            opt.step(target=train_t[idx])
    with torch.no_grad(), net.paused():
        return (model(splits["test"].x[:2000]).argmax(1) == splits["test"].t[:2000]).double().mean().item()


def test_step_mlp_learns_mnist_subset(data_root):
    """A Step MLP trained by LFP from seeds 0, 1, 2: the median accuracy is far above chance.

    Step nets learn slowly under LFP (the reference recipe runs 400 epochs; benchmarks/results/lfp_step has
    the long curve), and their first epochs are chaotic: one run moves by 0.2 under a rounding change
    (issue 13: seed 0 gave 0.489 under AVX2, 0.2695 under AVX512). Measured for one run
    (benchmarks/results/cpu_capability, 70 runs: seeds 0-9 x ATEN_CPU_CAPABILITY default / avx2 x {as is,
    init + 1 ulp, float64, MKL_CBWR=COMPATIBLE}): 0.23-0.65, median 0.45. The median of seeds 0, 1, 2:
    0.30-0.50 over those 7 settings (worst: avx2, init + 1 ulp). Threshold 0.2 (chance 0.1), below every
    single run seen. With the update's sign flipped every run collapses to one class (0.0875-0.117).
    """
    from torch_fadjoint import data as tfa_data

    torch.set_num_threads(1)
    splits = tfa_data.load("mnist", data_root, download=False)
    accs = [_step_mlp_accuracy(splits, seed) for seed in (0, 1, 2)]
    assert statistics.median(accs) > 0.2, accs
