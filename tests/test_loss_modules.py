"""torch's loss modules as losses: ``net.backward(criterion, t)`` and ``loss=criterion`` for instances of
``nn.CrossEntropyLoss``, ``nn.NLLLoss`` and ``nn.MSELoss`` with their own settings (``tfa.losses.ModuleLoss``),
against autograd's ``criterion(model(x), t).backward()``; what a closed form cannot honour is refused in one line.
"""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_fadjoint as tfa

from . import oracles
from .models import labelled, labelled_batches, mlp, recorded
from .state import assert_untouched, snapshot

C = 5
SUPPORTED = {
    "ce-mean": lambda: nn.CrossEntropyLoss(),
    "ce-sum": lambda: nn.CrossEntropyLoss(reduction="sum"),
    "ce-mean-ls0.1": lambda: nn.CrossEntropyLoss(label_smoothing=0.1),
    "ce-sum-ls0.1": lambda: nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.1),
    "nll-mean": lambda: nn.NLLLoss(),
    "nll-sum": lambda: nn.NLLLoss(reduction="sum"),
    "mse-mean": lambda: nn.MSELoss(),
    "mse-sum": lambda: nn.MSELoss(reduction="sum"),
}


def model_for(criterion, dtype=torch.float64, seed=0):
    """Linear → Tanh → Linear to C outputs; log-probabilities (+ LogSoftmax) for NLL."""
    last = (lambda: nn.LogSoftmax(dim=1)) if isinstance(criterion, nn.NLLLoss) else None
    return mlp((4, 8, C), nn.Tanh, last=last, seed=seed, dtype=dtype)


def batches_for(criterion, n, batch, dtype=torch.float64, seed=1):
    """``n`` (x, t): class targets, or float targets of the output's shape for MSE (as nn.MSELoss takes them)."""
    pairs = labelled_batches(n, batch, 4, C, seed=seed, dtype=dtype)
    if isinstance(criterion, nn.MSELoss):
        gen = torch.Generator().manual_seed(seed + 100)
        pairs = [(x, torch.randn(batch, C, generator=gen, dtype=dtype)) for x, _ in pairs]
    return pairs


def assert_grads_equal(got: dict, want: dict, dtype) -> None:
    """float32: bit for bit (the closed forms run autograd's own kernels); float64: ≤ 1e-12 relative."""
    assert got.keys() == want.keys()
    for name in want:
        if dtype == torch.float32:
            assert torch.equal(got[name], want[name]), name
        else:
            scale = want[name].abs().max().clamp_min(1e-300)
            assert ((got[name] - want[name]).abs().max() / scale).item() <= 1e-12, name


def one_line(exc, message, fn):
    with pytest.raises(exc, match=f"^{re.escape(message)}$") as info:
        fn()
    assert "\n" not in str(info.value)


# -- net.backward(criterion, t) ------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", SUPPORTED)
def test_backward_with_a_module_fills_autograds_grad(name, dtype, batch):
    criterion = SUPPORTED[name]()
    model = model_for(criterion, dtype)
    twin = copy.deepcopy(model)
    ((x, t),) = batches_for(criterion, 1, batch, dtype)
    want_loss, want = oracles.autograd_module_loss(lambda: twin(x), dict(twin.named_parameters()), criterion, t)
    net = recorded(model, x)
    loss = net.backward(criterion, t)
    assert torch.equal(loss, want_loss)  # criterion(out, t) bit for bit
    assert_grads_equal({n: p.grad for n, p in model.named_parameters()}, want, dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_label_smoothing_has_autograds_bits(dtype, reduction):
    """X*^L of nn.CrossEntropyLoss(label_smoothing=ε) is loss.backward()'s bit for bit: autograd's kernels on
    the constants autograd derives, (1 − ε) into nll_loss_backward and (ε/C)/B by a tensor division."""
    gen = torch.Generator().manual_seed(4)
    for batch, classes, eps in [(1, 5, 0.1), (7, 5, 0.1), (33, 17, 0.05), (7, 2, 0.3), (64, 10, 1.0), (13, 7, 0.17)]:
        criterion = nn.CrossEntropyLoss(reduction=reduction, label_smoothing=eps)
        out = torch.randn(batch, classes, generator=gen, dtype=dtype) * 3
        t = torch.randint(0, classes, (batch,), generator=gen)
        want_loss, want = oracles.autograd_output_grad(criterion, out, t)
        loss, out_adj = tfa.losses.get_loss(criterion)(out, t)
        assert torch.equal(loss, want_loss) and torch.equal(out_adj, want), (batch, classes, eps)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_a_setting_changed_between_calls_applies(dtype):
    criterion = nn.CrossEntropyLoss()
    model = model_for(criterion, dtype)
    twin = copy.deepcopy(model)
    (x, t), (x2, t2) = batches_for(criterion, 2, 7, dtype)
    net = recorded(model, x)
    net.backward(criterion, t)
    criterion.label_smoothing, criterion.reduction = 0.1, "sum"  # as criterion(out, t) would read them
    for p in model.parameters():
        p.grad = None
    net(x2)
    loss = net.backward(criterion, t2)
    want_loss, want = oracles.autograd_module_loss(lambda: twin(x2), dict(twin.named_parameters()), criterion, t2)
    assert torch.equal(loss, want_loss)
    assert_grads_equal({n: p.grad for n, p in model.named_parameters()}, want, dtype)


# -- the optimizers' loss=criterion ----------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", SUPPORTED)
def test_fadjoint_with_a_module_steps_as_sgd_after_backward(name, dtype, batch):
    criterion = SUPPORTED[name]()
    model = model_for(criterion, dtype)
    twin = copy.deepcopy(model)
    batches = batches_for(criterion, 3, batch, dtype)
    want_losses = oracles.autograd_sgd_steps(twin, criterion, batches, lr=0.1)
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1, loss=criterion)
    for (x, t), want_loss in zip(batches, want_losses):
        net(x)
        assert torch.equal(opt.step(target=t), want_loss)
    assert_grads_equal(dict(model.named_parameters()), dict(twin.named_parameters()), dtype)


@pytest.mark.parametrize("make_opt, criterion, name, kwargs", [
    (lambda net, loss, kw: tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9, loss=loss, loss_kwargs=kw),
     nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.1), "cross_entropy",
     {"reduction": "sum", "label_smoothing": 0.1}),
    (lambda net, loss, kw: tfa.optim.FAdjoint(net, lr=0.1, loss=loss, loss_kwargs=kw, validate="async"),
     nn.CrossEntropyLoss(label_smoothing=0.1), "cross_entropy", {"label_smoothing": 0.1}),
    (lambda net, loss, kw: tfa.optim.EquilibriumFAdjoint(net, lr=0.1, loss=loss, loss_kwargs=kw),
     nn.MSELoss(reduction="sum"), "mse", {"reduction": "sum"}),
    (lambda net, loss, kw: tfa.optim.Consequentialism(net, lr=0.1, loss=loss, loss_kwargs=kw),
     nn.CrossEntropyLoss(reduction="sum"), "cross_entropy", {"reduction": "sum"}),
], ids=["fadjoint", "fadjoint-async", "equilibrium", "consequentialism"])
def test_every_optimizer_takes_a_module_as_its_named_loss_with_those_settings(make_opt, criterion, name, kwargs):
    """loss=criterion steps as loss=<its name>, loss_kwargs=<its settings> (validate and the target's clamp too)."""
    results = []
    for loss, kw in [(criterion, None), (name, kwargs)]:
        model = model_for(criterion)
        net = tfa.FPropagation(model)
        opt = make_opt(net, loss, kw)
        losses = []
        for x, t in labelled_batches(2, 7, 4, C, seed=3):
            net(x)
            losses.append(opt.step(target=t))
        opt.synchronize()
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    (losses, params), (losses_named, params_named) = results
    assert all(torch.equal(a, b) for a, b in zip(losses, losses_named))
    assert all(torch.equal(a, b) for a, b in zip(params, params_named))


@pytest.mark.parametrize("loss", ["cross_entropy", nn.CrossEntropyLoss()], ids=["name", "module"])
def test_an_out_of_range_target_is_flagged_and_clamped_as_for_the_named_loss(loss):
    """validate='async' (CPU here; the CUDA default): the target is clamped and the step refused by its flag."""
    model = model_for(nn.CrossEntropyLoss())
    x, t = labelled(7, 4, C, seed=1)
    t[2] = C
    net = recorded(model, x)
    opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9, loss=loss, validate="async")
    before = snapshot(model, opt)
    opt.step(target=t)
    one_line(RuntimeError, "step 1 (validate='async'): target: a class outside [0, 4]; that step wrote no parameter "
             "and no state", opt.synchronize)
    assert_untouched(before, model, opt)


def test_an_optimizer_with_a_module_saves_and_loads_its_state():
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    model = model_for(criterion)
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9, loss=criterion)
    batches = batches_for(criterion, 3, 7)
    for x, t in batches[:2]:
        net(x)
        opt.step(target=t)
    state = copy.deepcopy(opt.state_dict())
    assert "loss" not in state and all("loss" not in group for group in state["param_groups"])
    twin = copy.deepcopy(model)
    twin_net = tfa.FPropagation(twin)
    twin_opt = tfa.optim.FAdjoint(twin_net, lr=0.5, momentum=0.9, loss=nn.CrossEntropyLoss(label_smoothing=0.1))
    twin_opt.load_state_dict(state)
    x, t = batches[2]
    net(x)
    twin_net(x)
    assert torch.equal(opt.step(target=t), twin_opt.step(target=t))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


# -- refusals ---------------------------------------------------------------------------------------------
class SubclassedCE(nn.CrossEntropyLoss):
    pass


def hooked_ce():
    criterion = nn.CrossEntropyLoss()
    criterion.register_forward_hook(lambda module, args, out: out * 2)
    return criterion


def instance_forward_ce():  # a temperature written into the instance's forward (red team, session 7)
    criterion = nn.CrossEntropyLoss()
    criterion.forward = lambda out, t: F.cross_entropy(out / 0.3, t)
    return criterion


_LIST = "nn.CrossEntropyLoss, nn.NLLLoss, nn.MSELoss (reduction 'mean' or 'sum', label_smoothing; weight=None, " \
        "ignore_index=-100)"
REFUSED = {
    "ce-weight": (lambda: nn.CrossEntropyLoss(weight=torch.ones(C, dtype=torch.float64)), ValueError,
                  "loss: nn.CrossEntropyLoss with a class weight is not supported (no closed form here); use weight=None"),
    "nll-weight": (lambda: nn.NLLLoss(weight=torch.ones(C, dtype=torch.float64)), ValueError,
                   "loss: nn.NLLLoss with a class weight is not supported (no closed form here); use weight=None"),
    "ce-ignore-index": (lambda: nn.CrossEntropyLoss(ignore_index=0), ValueError,
                        "loss: nn.CrossEntropyLoss with ignore_index=0 is not supported; use torch's default -100 "
                        "(a target equal to it is refused, not ignored)"),
    "nll-ignore-index": (lambda: nn.NLLLoss(ignore_index=-1), ValueError,
                         "loss: nn.NLLLoss with ignore_index=-1 is not supported; use torch's default -100 (a target "
                         "equal to it is refused, not ignored)"),
    "ce-none": (lambda: nn.CrossEntropyLoss(reduction="none"), ValueError,
                "loss: nn.CrossEntropyLoss with reduction='none' is not supported (no scalar loss); use 'mean' or 'sum'"),
    "nll-none": (lambda: nn.NLLLoss(reduction="none"), ValueError,
                 "loss: nn.NLLLoss with reduction='none' is not supported (no scalar loss); use 'mean' or 'sum'"),
    "mse-none": (lambda: nn.MSELoss(reduction="none"), ValueError,
                 "loss: nn.MSELoss with reduction='none' is not supported (no scalar loss); use 'mean' or 'sum'"),
    "ce-smoothing": (lambda: nn.CrossEntropyLoss(label_smoothing=1.5), ValueError,
                     "loss: nn.CrossEntropyLoss with label_smoothing=1.5 is not supported; it must lie in [0, 1]"),
    "ce-hook": (hooked_ce, ValueError,
                "loss: nn.CrossEntropyLoss with hooks is not supported (they would not run); remove them or pass a "
                "callable returning (loss, out_adj)"),
    "forward-on-instance": (instance_forward_ce, ValueError,
                            "loss: nn.CrossEntropyLoss, its forward is replaced on the instance, is not supported (the "
                            "closed form would train another loss); pass a callable returning (loss, out_adj)"),
    "subclass": (SubclassedCE, TypeError,
                 "loss: SubclassedCE, a subclass of nn.CrossEntropyLoss, is not supported (its forward may differ); "
                 "pass nn.CrossEntropyLoss itself or a callable returning (loss, out_adj)"),
    "bce": (nn.BCEWithLogitsLoss, TypeError,
            f"loss: nn.BCEWithLogitsLoss has no closed-form output adjoint here; supported modules: {_LIST}"),
    "l1": (nn.L1Loss, TypeError, f"loss: nn.L1Loss has no closed-form output adjoint here; supported modules: {_LIST}"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_an_unsupported_module_or_setting_is_refused_by_backward_and_changes_nothing(name):
    make, exc, message = REFUSED[name]
    model = model_for(nn.CrossEntropyLoss())
    x, t = labelled(7, 4, C, seed=1)
    net = recorded(model, x)
    net.backward("cross_entropy", t)  # a .grad to keep
    net(x)
    before = snapshot(model)
    one_line(exc, message, lambda: net.backward(make(), t))
    assert_untouched(before, model)
    one_line(exc, message, lambda: tfa.losses.get_loss(make()))


@pytest.mark.parametrize("name", REFUSED)
def test_an_unsupported_module_or_setting_is_refused_at_the_optimizers_construction(name):
    make, exc, message = REFUSED[name]
    model = model_for(nn.CrossEntropyLoss())
    net = tfa.FPropagation(model)
    before = snapshot(model)
    one_line(exc, message, lambda: tfa.optim.FAdjoint(net, lr=0.1, loss=make()))
    assert_untouched(before, model)


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c, "reduction", "none"),
     "loss: nn.CrossEntropyLoss with reduction='none' is not supported (no scalar loss); use 'mean' or 'sum'"),
    (lambda c: setattr(c, "weight", torch.ones(C, dtype=torch.float64)),
     "loss: nn.CrossEntropyLoss with a class weight is not supported (no closed form here); use weight=None"),
    (lambda c: setattr(c, "ignore_index", 3),
     "loss: nn.CrossEntropyLoss with ignore_index=3 is not supported; use torch's default -100 (a target equal to it "
     "is refused, not ignored)"),
    (lambda c: setattr(c, "label_smoothing", -0.1),
     "loss: nn.CrossEntropyLoss with label_smoothing=-0.1 is not supported; it must lie in [0, 1]"),
    (lambda c: setattr(c, "forward", lambda out, t: F.cross_entropy(out / 0.3, t)),
     "loss: nn.CrossEntropyLoss, its forward is replaced on the instance, is not supported (the closed form would "
     "train another loss); pass a callable returning (loss, out_adj)"),
    (lambda c: setattr(c, "__class__", SubclassedCE),
     "loss: nn.CrossEntropyLoss, its class was swapped for SubclassedCE, is not supported (the closed form would "
     "train another loss); pass a callable returning (loss, out_adj)"),
], ids=["reduction", "weight", "ignore-index", "smoothing", "forward-on-instance", "class-swapped"])
def test_a_setting_that_became_unsupported_refuses_the_step_and_changes_nothing(change, message):
    criterion = nn.CrossEntropyLoss()
    model = model_for(criterion)
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9, loss=criterion)
    (x, t), (x2, t2) = batches_for(criterion, 2, 7)
    net(x)
    opt.step(target=t)  # momentum buffers and .grad to keep
    change(criterion)
    net(x2)
    before = snapshot(model, opt)
    one_line(ValueError, message, lambda: opt.step(target=t2))
    assert_untouched(before, model, opt)


def test_settings_come_from_the_module_only():
    """loss_kwargs (an optimizer) or keywords (net.backward) beside a module are refused: it holds its settings."""
    model = model_for(nn.CrossEntropyLoss())
    x, t = labelled(7, 4, C, seed=1)
    net = recorded(model, x)
    before = snapshot(model)
    one_line(ValueError, "loss_kwargs: nn.CrossEntropyLoss takes no argument(s) ['reduction']",
             lambda: tfa.optim.FAdjoint(net, lr=0.1, loss=nn.CrossEntropyLoss(), loss_kwargs={"reduction": "sum"}))
    one_line(ValueError, "loss_kwargs: nn.MSELoss takes no argument(s) ['label_smoothing', 'reduction']",
             lambda: tfa.optim.EquilibriumFAdjoint(net, lr=0.1, loss=nn.MSELoss(),
                                                   loss_kwargs={"reduction": "mean", "label_smoothing": 0.0}))
    one_line(TypeError, "loss: nn.CrossEntropyLoss takes its settings from the module, not as arguments "
             "['label_smoothing']; set them on the module (criterion.reduction = 'sum')",
             lambda: net.backward(nn.CrossEntropyLoss(), t, label_smoothing=0.1))
    assert_untouched(before, model)


# -- CUDA (skipped without a device) -------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("name", SUPPORTED)
def test_on_cuda_a_module_has_autograds_bits_and_its_default_async_step_flags_a_bad_target(name):
    criterion = SUPPORTED[name]()
    model = model_for(criterion, torch.float32).cuda()
    twin = copy.deepcopy(model)
    x, t = [v.cuda() for v in batches_for(criterion, 1, 33, torch.float32)[0]]
    out = twin(x).detach()
    want_loss, want = oracles.autograd_output_grad(criterion, out, t)
    loss, out_adj = tfa.losses.get_loss(criterion)(out, t)
    assert torch.equal(loss, want_loss) and torch.equal(out_adj, want)
    if isinstance(criterion, nn.MSELoss):
        return
    net = recorded(model, x)
    opt = tfa.optim.FAdjoint(net, lr=0.1, loss=criterion)  # validate=None: async on CUDA, the target clamped
    bad = t.clone()
    bad[0] = C
    before = snapshot(model, opt)
    opt.step(target=bad)
    with pytest.raises(RuntimeError, match=r"^step 1 \(validate='async'\): target: "):
        opt.synchronize()
    assert_untouched(before, model, opt)
