"""The equilibrium F-adjoint and its local rule (docs/maths.md §2.1–§2.4), float64.

Oracles: the §2.2 relaxation typed out by hand for a 3-layer sigmoid net, the F-adjoint (§1.2, itself
tested against autograd), and autograd on a graph whose forward values are the recorded ones while
its backward goes through the freshly updated upper weights (the sequential rule at K → ∞).
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_fadjoint as tfa
from torch_fadjoint.optim.equilibrium import EquilibriumFAdjoint, equilibrium_grads
from torch_fadjoint.rules.equilibrium import relaxation_factor

from .models import labelled_batches, mlp
from .state import assert_untouched, snapshot

DT = torch.float64


def make_model(output_act=True, seed=1):
    return mlp((6, 9, 7, 4), [nn.Sigmoid, nn.Tanh], last=nn.Sigmoid if output_act else None, seed=seed)


def batches(n, seed=2, b=10):
    return labelled_batches(n, b, 6, 4, seed=seed, scale=1.5)


def mse_adj(out, t):
    """X*^L of torch's mean MSE on one-hot targets, typed from §1.3."""
    return 2 * (out - F.one_hot(t, out.shape[1]).to(out.dtype)) / out.numel()


def hand_grads(model, x, out_adj, factor, init="forward", quirk=False):
    """§2.2 written out for Linear-Sigmoid-Linear-Tanh-Linear-Sigmoid, non-sequential."""
    l1, _, l2, _, l3, _ = model
    y1 = x @ l1.weight.T + l1.bias
    x1 = torch.sigmoid(y1)
    y2 = x1 @ l2.weight.T + l2.bias
    x2 = torch.tanh(y2)
    y3 = x2 @ l3.weight.T + l3.bias
    x3 = torch.sigmoid(y3)

    def relax(start, drive):
        start = start if init == "forward" else torch.zeros_like(start)
        return drive + factor * (start - drive)

    d3 = out_adj * x3 * (1 - x3)
    yt3 = relax(x3, d3)
    if quirk:
        yt3 = yt3 * torch.sigmoid(d3) * (1 - torch.sigmoid(d3))
    yt2 = relax(x2, yt3 @ l3.weight) * (1 - x2 ** 2)
    yt1 = relax(x1, yt2 @ l2.weight) * x1 * (1 - x1)
    return {l3.weight: yt3.T @ x2, l3.bias: yt3.sum(0), l2.weight: yt2.T @ x1, l2.bias: yt2.sum(0),
            l1.weight: yt1.T @ x, l1.bias: yt1.sum(0)}


def run(model, data, **kwargs):
    """The reference's literal start (init="forward", §2.4) unless a test says otherwise."""
    net = tfa.FPropagation(model)
    opt = EquilibriumFAdjoint(net, **{"init": "forward", **kwargs})
    for x, t in data:
        net(x)
        opt.step(target=t)
    return model, opt


def assert_params_close(a, b, atol):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=atol)


# -- the relaxation ---------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["forward", "zero"])
@pytest.mark.parametrize("factor_args", [dict(tau=0.1, steps=100), dict(tau=0.3, steps=5), dict(t=1.7),
                                          dict(steps=None), dict(t=math.inf), dict(tau=0.2, steps=0)],
                         ids=["tau0.1_K100", "tau0.3_K5", "t1.7", "K_none", "t_inf", "K0"])
@pytest.mark.parametrize("quirk", [False, True], ids=["equations", "quirk"])
def test_grads_equal_hand_written_relaxation(factor_args, init, quirk):
    """equilibrium_grads == §2.2 typed by hand, every factor form, both starts, quirk on/off (1e-12)."""
    model = make_model()
    x, t = batches(1)[0]
    factor = (1 - factor_args.get("tau", 0.1)) ** factor_args["steps"] if "steps" in factor_args and \
        factor_args["steps"] is not None else (math.exp(-factor_args["t"]) if "t" in factor_args else 0.0)
    net = tfa.FPropagation(model)
    out = net(x)
    adj = mse_adj(out, t)
    with torch.no_grad():
        want = hand_grads(model, x, adj, factor, init, quirk)
    got = equilibrium_grads(net, adj, init=init, reference_output_derivative=quirk, **factor_args)
    assert set(got) == set(want)
    for p, g in want.items():
        assert g.abs().max() > 1e-6 or (factor == 1.0 and init == "zero")  # K = 0 from 0: Z = 0
        torch.testing.assert_close(got[p], g, rtol=0, atol=1e-12)


@pytest.mark.parametrize("init", ["forward", "zero"])
@pytest.mark.parametrize("sequential", [True, False])
def test_closed_form_equals_euler_loop(init, sequential):
    """§2.2: drive + (1−τ)^K (X − drive) is exactly the K-step Euler process (5 steps, 1e-12)."""
    data = batches(5)
    kw = dict(lr=0.5, momentum=0.9, tau=0.1, steps=100, init=init, sequential=sequential)
    fast, _ = run(make_model(), data, **kw)
    ref, _ = run(make_model(), data, relaxation="euler", **kw)
    assert_params_close(fast, ref, 1e-12)
    assert (fast[0].weight - make_model()[0].weight).abs().max() > 1e-4


def test_continuous_time_is_exp_factor_and_limit_of_euler():
    """t form: factor e^{-t}; Euler with τ = t/K, K large approaches it (O(τ) error)."""
    assert relaxation_factor(t=2.0) == math.exp(-2.0)
    assert relaxation_factor(0.1, 100) == 0.9 ** 100
    assert relaxation_factor(1.0, 3) == 0.0 and relaxation_factor(0.5, 0) == 1.0
    model = make_model()
    x, t = batches(1)[0]
    net = tfa.FPropagation(model)
    adj = mse_adj(net(x), t)
    got = equilibrium_grads(net, adj, t=1.5, init="forward", retain_records=True)
    euler = equilibrium_grads(net, adj, tau=1.5 / 20000, steps=20000, init="forward", relaxation="euler")
    for p in got:
        torch.testing.assert_close(got[p], euler[p], rtol=1e-3, atol=1e-7)


# -- limits -----------------------------------------------------------------------------------
@pytest.mark.parametrize("equilibrium", [dict(steps=None), dict(t=math.inf), dict(tau=1.0, steps=1)])
def test_non_sequential_equilibrium_is_fadjoint_exactly(equilibrium):
    """sequential=False, factor 0: the same parameters as FAdjoint, bit for bit, momentum + weight decay."""
    data = batches(6)
    sgd = dict(lr=0.3, momentum=0.9, weight_decay=1e-2, nesterov=True)
    got, opt = run(make_model(), data, sequential=False, **equilibrium, **sgd)
    want = make_model()
    net = tfa.FPropagation(want)
    ref = tfa.optim.FAdjoint(net, loss="mse", **sgd)
    for x, t in data:
        net(x)
        ref.step(target=t)
    for p, q in zip(got.parameters(), want.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(got.parameters(), want.parameters()):
        assert torch.equal(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])
        assert torch.equal(p.grad, q.grad)


def fresh_weight_backprop(model, data, lr, momentum, weight_decay):
    """Oracle for §2.3 at K → ∞: backprop, layer by layer top-down, through the UPDATED upper weights.

    For layer k, autograd differentiates a graph whose values are the forward's (frozen) but in which
    every layer j > k maps its input through its current (already updated) weights:
        Y^j = (X^{j-1} − sg(X^{j-1})) (W^j)ᵀ + sg(Y^j_forward)
    so the value is Y^j_forward and ∂/∂X^{j-1} is W^j_new. Then torch.optim.SGD updates layer k only.
    """
    linears = [m for m in model if isinstance(m, nn.Linear)]
    acts = [model[1], model[3], model[5]]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    for x, t in data:
        with torch.no_grad():  # the recorded forward
            xs, ys = [x], []
            for lin, act in zip(linears, acts):
                ys.append(lin(xs[-1]))
                xs.append(act(ys[-1]))
        for k in reversed(range(3)):
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                x_k = acts[k](linears[k](xs[k]))
                for j in range(k + 1, 3):
                    y_j = (x_k - x_k.detach()) @ linears[j].weight.T + ys[j]
                    x_k = acts[j](y_j)
                F.mse_loss(x_k, F.one_hot(t, 4).to(DT)).backward()
            for j in range(3):
                if j != k:
                    for p in linears[j].parameters():
                        p.grad = None
            opt.step()
    return model


def test_sequential_equilibrium_is_backprop_with_fresh_upper_weights():
    """§2.3, K → ∞: each layer's update = autograd through the already-updated W^{k+1} (1e-10, 6 steps)."""
    data = batches(6)
    sgd = dict(lr=2.0, momentum=0.9, weight_decay=1e-2)
    got, _ = run(make_model(), data, steps=None, sequential=True, **sgd)
    want = fresh_weight_backprop(make_model(), data, **sgd)
    assert_params_close(got, want, 1e-10)
    # and sequential really differs from the joint update (the test can fail)
    joint, _ = run(make_model(), data, steps=None, sequential=False, **sgd)
    assert max((p - q).abs().max().item() for p, q in zip(got.parameters(), joint.parameters())) > 1e-6


def test_quirk_scales_top_delta_by_sigmoid_derivative_of_drive():
    """§2.4: Ỹ^L = Z ⊙ σ'(D), ≈ 0.25 × the equations' top delta for a sigmoid output and small D."""
    model = make_model()
    x, t = batches(1)[0]
    net = tfa.FPropagation(model)
    out = net(x)
    adj = out - F.one_hot(t, 4).to(DT)  # the reference's X^L − y
    plain = equilibrium_grads(net, adj, steps=None, retain_records=True)
    quirk = equilibrium_grads(net, adj, steps=None, reference_output_derivative=True)
    drive = adj * out * (1 - out)
    factor = torch.sigmoid(drive) * (1 - torch.sigmoid(drive))
    top = model[4]
    torch.testing.assert_close(quirk[top.bias], (drive * factor).sum(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(plain[top.bias], drive.sum(0), rtol=0, atol=1e-12)
    ratio = quirk[top.weight] / plain[top.weight]
    assert 0.2 < ratio.min() and ratio.max() <= 0.25


def test_output_without_activation_quirk_is_noop():
    """No output activation: σ_L' = 1 so the quirk changes nothing (bit for bit)."""
    model = make_model(output_act=False)
    x, t = batches(1)[0]
    net = tfa.FPropagation(model)
    adj = mse_adj(net(x), t)
    a = equilibrium_grads(net, adj, retain_records=True)
    b = equilibrium_grads(net, adj, reference_output_derivative=True)
    for p in a:
        assert torch.equal(a[p], b[p])


# -- Optimizer contract -----------------------------------------------------------------------
@pytest.mark.parametrize("sequential", [True, False])
def test_state_dict_round_trip_mid_run(sequential):
    """Reload a mid-run state_dict into a fresh optimizer on a copy: the next steps match exactly."""
    data = batches(6)
    kw = dict(lr=0.5, momentum=0.9, dampening=0.1, sequential=sequential, tau=0.2, steps=7)
    model, opt = run(make_model(), data[:3], **kw)
    clone = copy.deepcopy(model)
    state = copy.deepcopy(opt.state_dict())
    net2 = tfa.FPropagation(clone)
    opt2 = EquilibriumFAdjoint(net2, **kw)
    opt2.load_state_dict(state)
    for x, t in data[3:]:
        opt.net(x)
        opt.step(target=t)
        net2(x)
        opt2.step(target=t)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("sequential", [True, False])
def test_lr_scheduler_and_param_groups(sequential):
    """StepLR halves the lr of step 2; a group with lr 0 keeps its parameters while feedback flows."""
    data = batches(2)
    model = make_model()
    net = tfa.FPropagation(model)
    opt = EquilibriumFAdjoint(net, lr=0.8, sequential=sequential)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for x, t in data:
        net(x)
        opt.step(target=t)
        sched.step()
    ref = make_model()
    for i, (x, t) in enumerate(data):
        net2 = tfa.FPropagation(ref)
        net2(x)
        EquilibriumFAdjoint(net2, lr=0.8 * 0.5 ** i, sequential=sequential).step(target=t)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)

    frozen = make_model()
    first = list(frozen[0].parameters())
    net3 = tfa.FPropagation(frozen)
    opt3 = EquilibriumFAdjoint(net3, params=[{"params": first, "lr": 0.0},
                                             {"params": list(frozen[2].parameters()) + list(frozen[4].parameters())}],
                               lr=0.8, sequential=sequential)
    net3(data[0][0])
    opt3.step(target=data[0][1])
    assert torch.equal(frozen[0].weight, make_model()[0].weight)
    assert frozen[0].weight.grad is not None and frozen[0].weight.grad.abs().max() > 0


# -- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(tau=0.0), dict(tau=1.5), dict(steps=-1), dict(steps=2.5), dict(t=-1.0),
                                    dict(init="random"), dict(relaxation="rk4"), dict(relaxation="euler", t=1.0),
                                    dict(relaxation="euler", steps=None), dict(lr=-1.0), dict(sequential="yes"),
                                    dict(momentum=-0.1)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        EquilibriumFAdjoint(tfa.FPropagation(make_model()), **kwargs)


@pytest.mark.parametrize("sequential", [True, False])
def test_no_forward_and_step_module_refused(sequential):
    net = tfa.FPropagation(make_model())
    opt = EquilibriumFAdjoint(net, lr=0.1, sequential=sequential)
    with pytest.raises(RuntimeError, match="no recorded forward"):
        opt.step(target=torch.zeros(3, dtype=torch.long))
    model = nn.Sequential(nn.Linear(6, 5), tfa.nn.Step(), nn.Linear(5, 4)).to(DT)
    net = tfa.FPropagation(model)
    opt = EquilibriumFAdjoint(net, lr=0.1, sequential=sequential)
    net(torch.randn(3, 6, dtype=DT))
    before = snapshot(model, opt)
    with pytest.raises(TypeError, match="Step"):
        opt.step(target=torch.tensor([0, 1, 2]))
    assert_untouched(before, model, opt)


@pytest.mark.parametrize("sequential", [True, False])
def test_nan_out_adj_leaves_everything_untouched(sequential):
    data = batches(3)
    model, opt = run(make_model(), data[:2], lr=0.5, momentum=0.9, sequential=sequential)
    before = snapshot(model, opt)
    x, t = data[2]
    out = opt.net(x)
    adj = mse_adj(out, t)
    adj[3, 1] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.step(out_adj=adj)
    assert_untouched(before, model, opt)


@pytest.mark.parametrize("steps_before", [0, 2], ids=["first_step", "mid_run"])
def test_overflow_in_bottom_layer_rolls_back_updated_upper_layers(steps_before):
    """Sequential: layers 3 and 2 are already updated when layer 1's ∂W overflows; all is restored."""
    data = batches(3, b=40)
    # steps=0: Z = X^k, so Ỹ^1 = X^1 σ'(Y^1) > 0 and its batch sum times 1e308 overflows
    model, opt = run(make_model(), data[:steps_before], lr=0.05, momentum=0.9, sequential=True, steps=0)
    with torch.no_grad():
        model[0].weight[:, 0] = 0.0  # feature 0 does not reach Y^1, but ∂W^1[:, 0] = Ỹ^1ᵀ x[:, 0]
    before = snapshot(model, opt)
    x, t = data[2]
    x = x.clone()
    x[:, 0] = 1e308
    out = opt.net(x)
    assert out.isfinite().all()
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.step(target=t)
    assert_untouched(before, model, opt)
    # the same step with validate=False does write (so the rollback above was real)
    opt.validate = False
    opt.net(x)
    opt.step(target=t)
    assert not torch.equal(model[4].weight, before.params["4.weight"])
    assert not model[0].weight.isfinite().all()
