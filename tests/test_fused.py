"""FAdjoint(fuse_update=True): SGD folded into the weight-gradient GEMM (tfa.optim.base.fused_sgd_weight_update).

Every result is compared with autograd + torch.optim.SGD (float64, to rounding: the fused GEMM rounds
α Y*ᵀX + β C once, so not bit for bit), and the contract of the unfused step is kept: state_dict,
schedulers, parameter groups, bad input refused before any write. (Its peak memory against the
unfused step's and autograd's, measured with the benchmarks' counter: tests/test_speed.py.)
"""
import copy

import pytest
import torch

import torch_fadjoint as tfa

from .state import assert_untouched, snapshot
from .test_optim import autograd_run, batches, make_model

SETTINGS = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.05, momentum=0.9),
    "dampening+decay": dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=1e-2),
    "decay": dict(lr=0.05, weight_decay=0.1),
    "maximize": dict(lr=0.01, maximize=True, weight_decay=1e-3),
    "momentum+maximize": dict(lr=0.01, momentum=0.5, maximize=True, weight_decay=1e-3),
}


def fused_run(model, data, scheduler=None, validate=True, **kwargs):
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, fuse_update=True, validate=validate, **kwargs)
    sched = scheduler(opt) if scheduler else None
    for x, t in data:
        net(x)
        opt.step(target=t)
        if sched:
            sched.step()
    return model, opt


@pytest.mark.parametrize("validate", [True, False], ids=["validate", "no-validate"])
@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_fused_run_equals_autograd_sgd(setting, validate):
    """100 steps; validate=False takes the other schedule (each layer updated as soon as the sweep has
    read its weight), validate=True the check-then-apply one: both equal SGD."""
    data = batches(100)
    want = autograd_run(make_model(), data, **SETTINGS[setting])
    got, opt = fused_run(make_model(), data, validate=validate, **SETTINGS[setting])
    moved = max((p - q).abs().max().item() for p, q in zip(make_model().parameters(), want.parameters()))
    assert moved > 1e-2, "the parameters should have moved"
    for p, q in zip(got.parameters(), want.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
        assert p.grad is None, ".grad is not written by the fused step"
    assert len(opt.state) == (6 if SETTINGS[setting].get("momentum") else 0)


def test_fused_and_unfused_state_dicts_are_interchangeable():
    """Momentum buffers live under the same key: 10 fused steps, then 10 unfused from its state_dict, equal a
    straight unfused run."""
    data, kwargs = batches(20), dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    model, opt = fused_run(make_model(), data[:10], **kwargs)
    net = tfa.FPropagation(model)
    unfused = tfa.optim.FAdjoint(net, **kwargs)
    unfused.load_state_dict(copy.deepcopy(opt.state_dict()))
    for x, t in data[10:]:
        net(x)
        unfused.step(target=t)
    want = autograd_run(make_model(), data, **kwargs)
    for p, q in zip(model.parameters(), want.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_scheduler_and_parameter_groups_drive_the_fused_step():
    """StepLR halves the lr every 5 steps; layer 0 has its own lr 0 (frozen) and layer 4 is not optimized."""
    data = batches(20)
    model = make_model()
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9, fuse_update=True,
                             params=[{"params": model[0].parameters(), "lr": 0.0},
                                     {"params": model[2].parameters()}])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    ref = make_model()
    ref_opt = torch.optim.SGD([{"params": ref[0].parameters(), "lr": 0.0}, {"params": ref[2].parameters()}],
                              lr=0.1, momentum=0.9)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=5, gamma=0.5)
    for x, t in data:
        net(x)
        opt.step(target=t)
        sched.step()
        ref_opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), t).backward()
        ref_opt.step()
        ref_sched.step()
    for p, q, p0 in zip(model.parameters(), ref.parameters(), make_model().parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert torch.equal(model[0].weight, make_model()[0].weight) and torch.equal(model[4].weight, make_model()[4].weight)
    assert not torch.equal(model[2].weight, make_model()[2].weight)


def test_nesterov_is_refused_at_construction_and_when_a_group_adds_it():
    net = tfa.FPropagation(make_model())
    with pytest.raises(ValueError, match="^fuse_update=True: Nesterov momentum needs the gradient itself"):
        tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9, nesterov=True, fuse_update=True)
    model = make_model()
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9, fuse_update=True, params=model[0].parameters())
    x, t = batches(1)[0]
    net(x)
    opt.step(target=t)
    opt.add_param_group({"params": model[2].parameters(), "nesterov": True})
    before = snapshot(model, opt)
    net(x)
    with pytest.raises(ValueError, match="Nesterov"):
        opt.step(target=t)
    assert_untouched(before, model, opt)


def _stepped_fused():
    model = make_model()
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9, fuse_update=True)
    x, t = batches(1)[0]
    net(x)
    opt.step(target=t)  # momentum buffers exist
    return model, net, opt, t


@pytest.mark.parametrize("case", ["nan-input", "overflow-at-the-top", "overflow-below-the-top"])
def test_non_finite_or_overflowing_fused_update_is_refused_before_any_write(case):
    """NaN in the input (caught at X^L); a finite but huge X*^L, so that layer 4's Y*ᵀX overflows (caught by
    its bound); finite layer-4 factors whose X*^3 = Y*^4 W^4 overflows (caught by layer 2's bound)."""
    model, net, opt, t = _stepped_fused()
    x = batches(1)[0][0]
    if case == "overflow-below-the-top":
        with torch.no_grad():
            model[4].weight.mul_(1e10)
    before = snapshot(model, opt)
    net(torch.full_like(x, float("nan")) if case == "nan-input" else x)
    top = {"nan-input": 1.0, "overflow-at-the-top": 1e308, "overflow-below-the-top": 1e300}[case]
    match = {"nan-input": r"^step: non-finite values in X\^L",
             "overflow-at-the-top": r"^F-adjoint (step|gradients): non-finite values in 4\.weight",
             "overflow-below-the-top": r"^F-adjoint (step|gradients): non-finite values in 2\.weight"}[case]
    with pytest.raises(RuntimeError, match=match) as info:
        opt.step(out_adj=torch.full((12, 4), top, dtype=torch.float64))
    assert "\n" not in str(info.value) and str(info.value).endswith("nothing was changed")
    assert_untouched(before, model, opt)


def test_fused_refuses_a_process_group(monkeypatch):
    net = tfa.FPropagation(make_model())
    monkeypatch.setattr(net, "reducer", object(), raising=False)
    with pytest.raises(ValueError, match="^fuse_update=True: not with a process_group"):
        tfa.optim.FAdjoint(net, lr=0.1, fuse_update=True)
