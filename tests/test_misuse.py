"""The misuse catalogue (issue 6): one test per case. Each must raise a one-line error that names the
layer (or input) and what was expected, and leave parameters, ``.grad`` and optimizer state bit-identical."""
import copy

import pytest
import torch
from torch import nn

import torch_fadjoint as tfa

DT = torch.float64


def model_():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).to(DT)


def batch(n=4):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=gen, dtype=DT), torch.randint(0, 3, (n,), generator=gen)


def trained(model=None):
    """A model, its recorder and an FAdjoint that has taken one step (so momentum state exists)."""
    model = model_() if model is None else model
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9)
    x, t = batch()
    net(x)
    opt.step(t)
    return model, net, opt


def snapshot(model, opt=None):
    return (copy.deepcopy([(p.detach().clone(), None if p.grad is None else p.grad.clone())
                           for p in model.parameters()]),
            None if opt is None else copy.deepcopy(opt.state_dict()))


def assert_untouched(model, before, opt=None):
    params, state = before
    for p, (value, grad) in zip(model.parameters(), params):
        assert torch.equal(p, value)
        assert (p.grad is None and grad is None) or torch.equal(p.grad, grad)
    if opt is not None:
        now = opt.state_dict()
        assert now["param_groups"] == state["param_groups"]
        for key, entry in state["state"].items():
            for name, value in entry.items():
                assert torch.equal(now["state"][key][name], value)


def raises_one_line(exc, match, fn):
    with pytest.raises(exc, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


# -- unsupported modules and topologies (detected at the first forward) ----------------------------
class Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) + x)


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(self.a(x) * 2)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)

    def forward(self, x):
        return self.a(torch.relu(self.a(x)))


class OwnParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.a = nn.Linear(6, 3)

    def forward(self, x):
        return self.a(x) * self.scale


@pytest.mark.parametrize("bad,match", [
    (nn.Sequential(nn.Linear(6, 5), nn.Softmax(dim=1), nn.Linear(5, 3)), r"1 \(Softmax\).*support"),
    (nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)), r"1 \(BatchNorm1d\)"),
    (Skip(), r"b|a"),
    (Functional(), r"b"),
    (Twice(), r"a"),
    (OwnParameter(), r"parameter|scale"),
    (nn.Sequential(nn.Linear(6, 5), nn.LogSoftmax(dim=0), nn.Linear(5, 3)), r"LogSoftmax"),
], ids=["unsupported-activation", "unsupported-layer", "skip-connection", "functional-op", "module-run-twice",
        "container-with-parameter", "logsoftmax-over-the-batch"])
def test_unsupported_structure_is_refused_at_the_first_forward(bad, match):
    bad = bad.to(DT)
    before = snapshot(bad)
    net = tfa.FPropagation(bad)
    raises_one_line((TypeError, RuntimeError, ValueError), match, lambda: net(batch()[0]))
    assert_untouched(bad, before)


# -- a step without a forward, twice, or on a changed model ------------------------------------------
def test_step_without_a_recorded_forward():
    model, net, opt = trained()
    before = snapshot(model, opt)
    raises_one_line(RuntimeError, "forward", lambda: opt.step(batch()[1]))
    raises_one_line(RuntimeError, "forward", lambda: net.adjoint(torch.zeros(4, 3, dtype=DT)))
    assert_untouched(model, before, opt)


def test_second_adjoint_after_one_forward_is_an_error():
    """Decision: records are freed by the sweep (memory), so a second adjoint raises; retain_records=True
    keeps them for a documented second, accumulating adjoint."""
    model, net, opt = trained()
    x, t = batch()
    net(x)
    _, out_adj = tfa.losses.cross_entropy(net.output, t)
    net.adjoint(out_adj)
    before = snapshot(model, opt)
    raises_one_line(RuntimeError, "forward", lambda: net.adjoint(out_adj))
    assert_untouched(model, before, opt)


def test_model_changed_after_wrapping():
    model, net, opt = trained()
    old_last = model[2]
    before = snapshot(model, opt)
    model[2] = nn.Linear(5, 3).to(DT)
    raises_one_line(RuntimeError, r"changed", lambda: net(batch()[0]))
    model[2] = old_last
    assert_untouched(model, before, opt)


def test_hooks_are_gone_after_remove():
    model, net, _ = trained()
    net.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        model(batch()[0])  # runs as a plain model
    with tfa.FPropagation(model) as scoped:
        scoped(batch()[0])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# -- shapes, dtypes and devices --------------------------------------------------------------------
@pytest.mark.parametrize("out_adj,match", [
    (torch.zeros(4, 2, dtype=DT), r"out_adj: expected shape \(4, 3\)"),
    (torch.zeros(4, 3, dtype=torch.float32), r"out_adj: expected .*float64"),
    (torch.zeros(4, 3, dtype=DT, device="meta"), r"out_adj: expected .* on cpu"),
], ids=["shape", "dtype", "device"])
def test_out_adj_mismatch(out_adj, match):
    model, net, opt = trained()
    net(batch()[0])
    before = snapshot(model, opt)
    raises_one_line(ValueError, match, lambda: opt.step(out_adj=out_adj))
    assert_untouched(model, before, opt)


@pytest.mark.parametrize("target,match", [
    (torch.tensor([0, 1, 2, 3]), r"must lie in \[0, 2\]"),
    (torch.tensor([0.0, 1.0, 2.0, 1.0]), r"integer"),
    (torch.tensor([0, 1, 2]), r"4|batch|shape"),
], ids=["out-of-range", "float-classes", "batch-size"])
def test_bad_targets(target, match):
    model, net, opt = trained()
    net(batch()[0])
    before = snapshot(model, opt)
    raises_one_line(ValueError, match, lambda: opt.step(target))
    assert_untouched(model, before, opt)


def test_input_of_the_wrong_shape_names_the_layer():
    model, net, opt = trained()
    before = snapshot(model, opt)
    raises_one_line((ValueError, RuntimeError), r"0 \(Linear\)|\b0\b", lambda: net(torch.zeros(2, 4, 6, dtype=DT)))
    assert_untouched(model, before, opt)


def test_input_dtype_mismatch_is_an_error():
    model, net, opt = trained()
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="dtype|Double|Float"):
        net(torch.zeros(4, 6, dtype=torch.float32))
    assert_untouched(model, before, opt)


# -- numerical faults --------------------------------------------------------------------------------
def test_nan_in_the_input_is_refused_before_any_write():
    model, net, opt = trained()
    before = snapshot(model, opt)
    net(torch.full((4, 6), float("nan"), dtype=DT))
    raises_one_line(RuntimeError, "non-finite", lambda: opt.step(batch()[1]))
    assert_untouched(model, before, opt)


def test_inf_in_the_output_adjoint_is_refused():
    model, net, opt = trained()
    net(batch()[0])
    before = snapshot(model, opt)
    out_adj = torch.zeros(4, 3, dtype=DT)
    out_adj[1, 2] = float("inf")
    raises_one_line(RuntimeError, "out_adj.*non-finite", lambda: opt.step(out_adj=out_adj))
    assert_untouched(model, before, opt)


def test_overflowing_update_is_refused_before_any_write():
    """Finite X*^L but gradients that overflow (huge input): the finite check catches the would-be update."""
    model, net, opt = trained()
    net(torch.full((4, 6), 1e300, dtype=DT))
    before = snapshot(model, opt)
    raises_one_line(RuntimeError, "non-finite", lambda: opt.step(out_adj=torch.full((4, 3), 1e10, dtype=DT)))
    assert_untouched(model, before, opt)


@pytest.mark.parametrize("make", [
    lambda net: tfa.optim.FAdjoint(net, lr=0.1),
    lambda net: tfa.optim.EquilibriumFAdjoint(net, lr=0.1, loss="cross_entropy"),
    lambda net: tfa.optim.LFP(net, lr=0.1),
    lambda net: tfa.optim.Consequentialism(net, lr=0.1),
    lambda net: tfa.optim.InferenceLearning(net, variant="il"),
], ids=["fadjoint", "equilibrium", "lfp", "consequentialism", "il"])
def test_every_optimizer_refuses_a_non_finite_update(make):
    model = model_()
    net = tfa.FPropagation(model, keep_pre_activations=True)
    opt = make(net)
    before = snapshot(model, opt)
    net(torch.full((4, 6), float("nan"), dtype=DT))
    raises_one_line(RuntimeError, "non-finite", lambda: opt.step(batch()[1]))
    assert_untouched(model, before, opt)


def test_step_function_net_is_refused_by_the_fadjoint():
    model = nn.Sequential(nn.Linear(6, 5), tfa.nn.Step(), nn.Linear(5, 3)).to(DT)
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1)
    before = snapshot(model, opt)
    net(batch()[0])
    raises_one_line(TypeError, r"1 \(Step\).*LFP", lambda: opt.step(batch()[1]))
    assert_untouched(model, before, opt)
