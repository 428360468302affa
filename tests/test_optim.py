"""tfa.optim.FAdjoint keeps torch.optim.SGD's contract and trajectory (docs/maths.md §1.4)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_fadjoint as tfa
from torch_fadjoint.optim.functional import _foreach_sgd, _single_tensor_sgd

from .models import labelled_batches, mlp
from .state import assert_untouched, snapshot

SGD_SETTINGS = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.05, momentum=0.9),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True),
    "weight_decay": dict(lr=0.05, momentum=0.5, weight_decay=1e-2),
    "dampening": dict(lr=0.05, momentum=0.9, dampening=0.3),
    "maximize": dict(lr=-0.0 + 0.01, maximize=True),
}


def make_model(dtype=torch.float64):
    return mlp((8, 16, 16, 4), [nn.Tanh, nn.ReLU], seed=1, dtype=dtype)


def batches(n_steps, dtype=torch.float64):
    return labelled_batches(n_steps, 12, 8, 4, seed=2, dtype=dtype)


def autograd_run(model, data, scheduler=None, **kwargs):
    opt = torch.optim.SGD(model.parameters(), **kwargs)
    sched = scheduler(opt) if scheduler else None
    for x, t in data:
        opt.zero_grad()
        F.cross_entropy(model(x), t).backward()
        opt.step()
        if sched:
            sched.step()
    return model


def fadjoint_run(model, data, scheduler=None, **kwargs):
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, **kwargs)
    sched = scheduler(opt) if scheduler else None
    for x, t in data:
        with torch.no_grad():
            net(x)
        opt.step(target=t)
        if sched:
            sched.step()
    return model


@pytest.mark.parametrize("setting", SGD_SETTINGS, ids=str)
def test_training_run_equals_autograd_sgd(setting):
    """300 steps: the same parameters as torch.optim.SGD + loss.backward(), float64, 1e-9."""
    data = batches(300)
    want = autograd_run(make_model(), data, **SGD_SETTINGS[setting])
    got = fadjoint_run(make_model(), data, **SGD_SETTINGS[setting])
    moved = max((p - q).abs().max().item() for p, q in zip(make_model().parameters(), want.parameters()))
    assert moved > 1e-2, "the parameters should have moved"
    for p, q in zip(got.parameters(), want.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-9)


@pytest.mark.parametrize("setting", ["momentum", "nesterov", "weight_decay", "maximize"])
def test_single_tensor_and_foreach_paths_agree(setting):
    kwargs = {k: v for k, v in SGD_SETTINGS[setting].items()}
    kwargs = dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False) | kwargs
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen),
              torch.randn(2, 2, generator=gen, dtype=torch.float64)]
    results = []
    for impl in (_single_tensor_sgd, _foreach_sgd):
        ps = [p.clone() for p in params]
        bufs = [None] * 3
        for step in range(3):
            grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(step), dtype=p.dtype) for p in ps]
            impl(ps, grads, bufs, **kwargs)
        results.append((ps, bufs))
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


def test_state_dict_round_trip_mid_run_continues_identically():
    data = batches(20)
    model = make_model()
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.05, momentum=0.9, nesterov=True)
    for x, t in data[:10]:
        net(x)
        opt.step(target=t)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for x, t in data[10:]:
        net(x)
        opt.step(target=t)
    fresh = make_model()
    fresh.load_state_dict(saved_model)
    fresh_net = tfa.FPropagation(fresh)
    fresh_opt = tfa.optim.FAdjoint(fresh_net, lr=0.05, momentum=0.9, nesterov=True)
    fresh_opt.load_state_dict(saved_opt)
    assert len(fresh_opt.state) == 6
    for x, t in data[10:]:
        fresh_net(x)
        fresh_opt.step(target=t)
    for p, q in zip(fresh.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("scheduler", [
    lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5),
    lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=40),
], ids=["StepLR", "OneCycleLR"])
def test_lr_schedulers_drive_the_step(scheduler):
    data = batches(40)
    want = autograd_run(make_model(), data, scheduler, lr=0.1, momentum=0.9)
    got = fadjoint_run(make_model(), data, scheduler, lr=0.1, momentum=0.9)
    for p, q in zip(got.parameters(), want.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-9)


def test_param_groups_and_zero_grad():
    model = make_model()
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1, params=[{"params": model[0].parameters(), "lr": 0.0},
                                                  {"params": list(model[2].parameters()) + list(model[4].parameters())}])
    before = [p.clone() for p in model.parameters()]
    x, t = batches(1)[0]
    net(x)
    loss = opt.step(target=t)
    assert loss.shape == () and loss.requires_grad is False
    after = list(model.parameters())
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert not torch.equal(after[2], before[2])
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_step_with_out_adj_and_closure():
    model, data = make_model(), batches(2)
    ref = copy.deepcopy(model)
    net, ref_net = tfa.FPropagation(model), tfa.FPropagation(ref)
    opt, ref_opt = tfa.optim.FAdjoint(net, lr=0.1), tfa.optim.FAdjoint(ref_net, lr=0.1)
    x, t = data[0]
    assert opt.step(target=t, closure=lambda: net(x)) is not None
    ref_net(x)
    _, out_adj = tfa.losses.cross_entropy(ref_net.output, t)
    assert ref_opt.step(out_adj=out_adj) is None
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_mse_and_nll_losses_and_label_smoothing():
    data = batches(30)
    for loss, kwargs in (("mse", {}), ("cross_entropy", {"label_smoothing": 0.1})):
        model, ref = make_model(), make_model()
        net = tfa.FPropagation(model)
        opt = tfa.optim.FAdjoint(net, lr=0.1, loss=loss, loss_kwargs=kwargs)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        for x, t in data:
            net(x)
            opt.step(target=t)
            ref_opt.zero_grad()
            out = ref(x)
            value = F.mse_loss(out, F.one_hot(t, 4).double()) if loss == "mse" else F.cross_entropy(out, t, **kwargs)
            value.backward()
            ref_opt.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1.0), r"^lr must be a finite number in \[0, inf\], got -1.0$"),
    (dict(lr=0.1, momentum=-0.1), r"^momentum must be a finite number in \[0, inf\], got -0.1$"),
    (dict(lr=0.1, weight_decay=-1.0), r"^weight_decay must be a finite number in \[0, inf\], got -1.0$"),
    (dict(lr=0.1, nesterov=True), "Nesterov momentum requires"),
    (dict(lr=0.1, loss="hinge"), "loss must be one of"),
])
def test_invalid_hyper_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tfa.optim.FAdjoint(tfa.FPropagation(make_model()), **kwargs)


def test_optimizer_needs_an_fpropagation():
    with pytest.raises(TypeError, match="expected an FPropagation"):
        tfa.optim.FAdjoint(make_model(), lr=0.1)


def _bad_cases():
    x = torch.randn(12, 8, dtype=torch.float64)
    t = torch.randint(0, 4, (12,))
    return {
        "no-forward": (None, dict(target=t), RuntimeError, "no recorded forward"),
        "target-out-of-range": (x, dict(target=t + 4), ValueError, r"targets must lie in \[0, 3\]"),
        "target-float": (x, dict(target=t.double()), ValueError, "expected integer class targets"),
        "target-shape": (x, dict(target=t[:5]), ValueError, r"expected targets of shape \(12,\)"),
        "no-target": (x, dict(), ValueError, r"needs target="),
        "out-adj-shape": (x, dict(out_adj=torch.zeros(12, 5, dtype=torch.float64)), ValueError,
                          r"out_adj: expected shape \(12, 4\)"),
        "out-adj-dtype": (x, dict(out_adj=torch.zeros(12, 4)), ValueError, "torch.float64"),
        "out-adj-device": (x, dict(out_adj=torch.zeros(12, 4, dtype=torch.float64, device="meta")), ValueError,
                           "on meta"),
        "out-adj-nan": (x, dict(out_adj=torch.full((12, 4), float("nan"), dtype=torch.float64)), RuntimeError,
                        "non-finite"),
        "input-inf": (x.clone().index_fill_(0, torch.tensor([3]), float("inf")), dict(target=t), RuntimeError,
                      "non-finite"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()), ids=str)
def test_bad_input_is_a_clear_error_and_leaves_everything_untouched(case):
    model, data = make_model(), batches(2)
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9)
    net(data[0][0])
    opt.step(target=data[0][1])  # momentum buffers exist
    before = snapshot(model, opt)
    x, kwargs, error, message = _bad_cases()[case]
    if x is not None:
        net(x)
    with pytest.raises(error, match=message) as info:
        opt.step(**kwargs)
    assert "\n" not in str(info.value)
    assert_untouched(before, model, opt)


def test_non_finite_gradient_is_refused_before_any_write():
    model = make_model()
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1)
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")  # finite output adjoint, non-finite gradients below layer 2
    before = snapshot(model, opt)
    net(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.step(out_adj=torch.ones(3, 4, dtype=torch.float64))
    assert_untouched(before, model, opt)


def test_check_finite_fast_path_has_no_false_alarm_and_misses_nothing():
    """The sum-based fast path: finite tensors whose sum overflows pass (exact fallback decides);
    a single NaN, +Inf or -Inf anywhere is caught and the entry named."""
    from torch_fadjoint.sweep import check_finite

    big = torch.full((4, 4), 3e38, dtype=torch.float32)  # finite, but the sum overflows to inf
    check_finite([torch.ones(3), big, torch.ones(2, dtype=torch.float64)], "g")
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(5, 7, dtype=torch.float64)
        t[3, 2] = bad
        with pytest.raises(RuntimeError, match=r"^g: non-finite values in entry 1;"):
            check_finite([torch.ones(3, dtype=torch.float64), t], "g")
    inf_pair = torch.tensor([float("inf"), -float("inf")])  # inf - inf in the sum: still caught
    with pytest.raises(RuntimeError, match="entry 0"):
        check_finite([inf_pair], "g")
