"""Consequentialism / NLMS (docs/maths.md §4): the defining property, base optimizers, state, errors."""
import copy

import pytest
import torch
from torch import nn

import torch_fadjoint as tfa
from torch_fadjoint.optim import Consequentialism, consequentialism_grads, fadjoint_grads

from .state import assert_untouched, snapshot

DT = torch.float64


def data(batch, n_in=7, n_out=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, n_in, generator=gen, dtype=DT),
            torch.randn(batch, n_out, generator=gen, dtype=DT))


def one_step_moves(mode, batch, bias=True):
    """(new Y − old Y, B·Δ) after one plain SGD step, η = 1, δ → 0, MSE on a single Linear layer."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(7, 3, bias=bias)).to(DT)
    x, target = data(batch)
    net = tfa.FPropagation(model)
    opt = Consequentialism(net, lr=1.0, mode=mode, delta=1e-12, loss="mse")
    with torch.no_grad():
        y_old = net(x)
    _, out_adj = tfa.losses.mse(y_old, target)
    opt.step(target=target)
    with torch.no_grad():
        y_new = model(x)
    return y_new - y_old, batch * out_adj


@pytest.mark.parametrize("batch,bias", [(1, True), (5, True), (8, True), (7, False)])
def test_consequentialism_moves_every_sample_by_its_own_delta(batch, bias):
    """ΔY = −η B Δ for B ≤ n_in + 1 (§4): no cross-talk between the samples."""
    moved, want = one_step_moves("consequentialism", batch, bias)
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(moved, -want, rtol=0, atol=1e-8)


def test_nlms_moves_the_sample_by_its_delta_at_batch_1_and_not_beyond():
    moved, want = one_step_moves("nlms", 1)
    torch.testing.assert_close(moved, -want, rtol=0, atol=1e-8)
    moved, want = one_step_moves("nlms", 6)  # cross-talk at B > 1: the property fails (the test can fail)
    assert (moved + want).abs().max() > 1e-3


def test_modes_agree_at_batch_1_and_lms_is_the_fadjoint_gradient():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x, target = data(1)
    grads = {}
    for mode in ("consequentialism", "nlms"):
        net = tfa.FPropagation(model)
        with torch.no_grad():
            out = net(x)
        grads[mode] = consequentialism_grads(net, tfa.losses.mse(out, target)[1], mode, delta=1e-3)
        net.remove()
    for p in model.parameters():
        torch.testing.assert_close(grads["consequentialism"][p], grads["nlms"][p], rtol=1e-12, atol=1e-14)
    x, target = data(6)
    net = tfa.FPropagation(model)
    with torch.no_grad():
        out = net(x)
    out_adj = tfa.losses.mse(out, target)[1]
    lms = consequentialism_grads(net, out_adj, "lms", retain_records=True)
    exact = fadjoint_grads(net, out_adj)
    for p in model.parameters():
        assert torch.equal(lms[p], exact[p])


def test_direction_is_the_regularised_solve_typed_out():
    """G = B Δᵀ (X̃X̃ᵀ + δI)⁻¹ X̃ with X̃ = [X, 1], δ = delta_rel · mean ‖x̃‖² (§4), against torch.linalg.solve."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(7, 3)).to(DT)
    x, target = data(10)
    net = tfa.FPropagation(model)
    with torch.no_grad():
        out = net(x)
    out_adj = tfa.losses.mse(out, target)[1]
    grads = consequentialism_grads(net, out_adj, delta_rel=0.05)
    x_tilde = torch.cat([x, torch.ones(10, 1, dtype=DT)], 1)
    delta = 0.05 * (x_tilde ** 2).sum(1).mean()
    k = x_tilde @ x_tilde.T + delta * torch.eye(10, dtype=DT)
    g = 10 * out_adj.T @ torch.linalg.solve(k, x_tilde)
    torch.testing.assert_close(grads[model[0].weight], g[:, :-1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[model[0].bias], g[:, -1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("base,kwargs", [("sgd", dict(momentum=0.9)), ("sgd", dict(momentum=0.9, nesterov=True)),
                                         ("rmsprop", {}), ("adam", dict(betas=(0.8, 0.99))), ("adamw", {})])
def test_composes_with_torch_optimizers(base, kwargs):
    """The optimizer equals the same torch optimizer fed consequentialism_grads, over 4 steps."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)).to(DT)
    twin = copy.deepcopy(model)
    net, twin_net = tfa.FPropagation(model), tfa.FPropagation(twin)
    opt = Consequentialism(net, lr=0.01, base=base, loss="mse", **kwargs)
    ref = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam,
           "adamw": torch.optim.AdamW}[base](twin.parameters(), lr=0.01, **kwargs)
    for step in range(4):
        x, target = data(5, seed=step)
        with torch.no_grad():
            net(x)
            out = twin_net(x)
        grads = consequentialism_grads(twin_net, tfa.losses.mse(out, target)[1])
        for p in twin.parameters():
            p.grad = grads[p]
        ref.step()
        opt.step(target=target)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)


def test_state_dict_round_trip_with_adam_moments():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(7, 3)).to(DT)
    net = tfa.FPropagation(model)
    opt = Consequentialism(net, lr=0.01, base="adam", loss="mse")
    x, target = data(4)
    for _ in range(2):
        with torch.no_grad():
            net(x)
        opt.step(target=target)
    state = copy.deepcopy(opt.state_dict())
    assert {"exp_avg", "exp_avg_sq"} <= set(state["state"][0])
    clone = copy.deepcopy(model)
    opt2 = Consequentialism(tfa.FPropagation(clone), lr=0.01, base="adam", loss="mse")
    opt2.load_state_dict(state)
    for net_, opt_ in ((net, opt), (opt2.net, opt2)):
        with torch.no_grad():
            net_(x)
        opt_.step(target=target)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


def test_errors_leave_parameters_and_state_untouched():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(7, 3)).to(DT)
    net = tfa.FPropagation(model)
    opt = Consequentialism(net, lr=0.1, base="sgd", momentum=0.9, loss="mse")
    x, target = data(4)
    with torch.no_grad():
        net(x)
    opt.step(target=target)
    before = snapshot(model, opt)
    with torch.no_grad():
        net(x)
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.step(out_adj=torch.full((4, 3), float("inf"), dtype=DT))
    with torch.no_grad():
        net(x)
    with pytest.raises(ValueError, match="out_adj: expected shape"):
        opt.step(out_adj=torch.zeros(4, 2, dtype=DT))
    assert_untouched(before, model, opt)


@pytest.mark.parametrize("kwargs", [dict(mode="apa"), dict(delta=0.0), dict(delta_rel=-1.0), dict(base="lbfgs"),
                                    dict(base="sgd", momentum=-1.0)])
def test_bad_arguments(kwargs):
    net = tfa.FPropagation(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(ValueError):
        Consequentialism(net, **kwargs)
