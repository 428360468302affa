"""The misuse catalogue (issue 6): one test per case. Each must raise a one-line error that names the
layer (or argument) and what was expected, and leave parameters, ``.grad`` and optimizer state bit-identical.

Decisions recorded here: a second ``adjoint`` after one forward is an error (the sweep frees the
records); ``retain_records=True`` is the documented way to run a second, accumulating one.
``validate=False`` (for CUDA-graph capture) lets a non-finite update through: documented, tested.
"""
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
    """A model, its recorder and an FAdjoint that has taken one step (so momentum state and .grad exist)."""
    model = model_() if model is None else model
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9)
    x, t = batch()
    net(x)
    opt.step(target=t)
    return model, net, opt


def snapshot(model, opt=None):
    return (copy.deepcopy([(p.detach().clone(), None if p.grad is None else p.grad.clone())
                           for p in model.parameters()]),
            None if opt is None else copy.deepcopy(opt.state_dict()))


def assert_untouched(model, before, opt=None):
    """Parameters, .grad and the optimizer's state_dict are bit-identical to the snapshot."""
    params, state = before
    for p, (value, grad) in zip(model.parameters(), params):
        assert torch.equal(p, value)
        assert (p.grad is None and grad is None) or torch.equal(p.grad, grad)
    if opt is not None:
        now = opt.state_dict()
        assert now["param_groups"] == state["param_groups"]
        assert now["state"].keys() == state["state"].keys()
        for key, entry in state["state"].items():
            assert now["state"][key].keys() == entry.keys()
            for name, value in entry.items():
                assert torch.equal(now["state"][key][name], value) if isinstance(value, torch.Tensor) \
                    else now["state"][key][name] == value


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


class FunctionalAfter(Functional):
    def forward(self, x):
        return self.b(self.a(x)).softmax(-1)


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


class MyLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("bad,match", [
    (lambda: nn.Sequential(nn.Linear(6, 5), nn.Softmax(dim=1), nn.Linear(5, 3)), r"^1 \(Softmax\) is not supported"),
    (lambda: nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)), r"^1 \(BatchNorm1d\) is not supported"),
    (lambda: nn.Sequential(MyLinear(6, 3)), r"^0 \(MyLinear\) is not supported"),
    (Skip, r"^b \(Linear\) received a tensor that the previous module did not return"),
    (Functional, r"^b \(Linear\) received a tensor that the previous module did not return"),
    (FunctionalAfter, r"output is not what its last module returned \(a functional op after b\?\)"),
    (Twice, r"^a \(Linear\) ran twice in one forward"),
    (OwnParameter, r"^<model> \(OwnParameter\) holds parameters \['scale'\] directly; only nn.Linear"),
    (lambda: nn.Sequential(nn.Linear(6, 5), nn.LogSoftmax(dim=0), nn.Linear(5, 3)),
     r"^1 \(LogSoftmax\): .*expected dim=-1 over \(batch, classes\)"),
], ids=["unsupported-activation", "unsupported-layer", "linear-subclass", "skip-connection", "functional-op",
        "functional-op-at-the-end", "module-run-twice", "container-with-parameter", "logsoftmax-over-the-batch"])
def test_unsupported_structure_is_refused_at_the_first_forward(bad, match):
    bad = bad().to(DT)
    net = tfa.FPropagation(bad)
    opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9)
    before = snapshot(bad, opt)
    raises_one_line((TypeError, ValueError), match, lambda: net(batch()[0]))
    assert net.layers == []
    assert_untouched(bad, before, opt)


def test_step_function_net_is_refused_by_the_fadjoint():
    model = nn.Sequential(nn.Linear(6, 5), tfa.nn.Step(), nn.Linear(5, 3)).to(DT)
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1)
    before = snapshot(model, opt)
    net(batch()[0])
    raises_one_line(TypeError, r"^1 \(Step\): derivative is 0 almost everywhere.*use tfa.optim.LFP", lambda: opt.step(target=batch()[1]))
    assert_untouched(model, before, opt)


@pytest.mark.parametrize("make,match", [
    (lambda net: tfa.optim.EquilibriumFAdjoint(net, lr=0.1, loss="nll"), r"^3 \(LogSoftmax\): the equilibrium"),
    (lambda net: tfa.optim.LFP(net, lr=0.1), r"^3 \(LogSoftmax\): LFP passes rewards through elementwise"),
], ids=["equilibrium", "lfp"])
def test_non_elementwise_module_is_refused_by_rules_that_need_elementwise(make, match):
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.LogSoftmax(dim=1)).to(DT)
    net = tfa.FPropagation(model)
    opt = make(net)
    before = snapshot(model, opt)
    net(batch()[0])
    raises_one_line(TypeError, match, lambda: opt.step(target=batch()[1]))
    assert_untouched(model, before, opt)


def test_optimizer_on_the_bare_model_is_refused():
    raises_one_line(TypeError, r"expected an FPropagation \(tfa.FPropagation\(model\)\), got Sequential",
                    lambda: tfa.optim.FAdjoint(model_(), lr=0.1))


# -- a step without a forward, twice, or on a changed model ------------------------------------------
def test_step_without_a_recorded_forward():
    model, net, opt = trained()
    before = snapshot(model, opt)
    raises_one_line(RuntimeError, r"no recorded forward; call net\(x\) first", lambda: opt.step(target=batch()[1]))
    raises_one_line(RuntimeError, r"no recorded forward", lambda: net.adjoint(torch.zeros(4, 3, dtype=DT)))
    assert_untouched(model, before, opt)


def test_second_adjoint_after_one_forward_is_an_error():
    """Decision: records are freed by the sweep (memory), so a second adjoint raises."""
    model, net, opt = trained()
    x, t = batch()
    net(x)
    _, out_adj = tfa.losses.cross_entropy(net.output, t)
    net.adjoint(out_adj)
    before = snapshot(model, opt)
    raises_one_line(RuntimeError, r"no recorded forward.*records are freed by each sweep", lambda: net.adjoint(out_adj))
    assert_untouched(model, before, opt)


def test_retain_records_is_the_documented_second_adjoint_and_it_accumulates():
    model = model_()
    net = tfa.FPropagation(model)
    x, t = batch()
    net(x)
    _, out_adj = tfa.losses.cross_entropy(net.output, t)
    net.adjoint(out_adj, retain_records=True)
    once = [p.grad.clone() for p in model.parameters()]
    net.adjoint(out_adj)
    for p, g in zip(model.parameters(), once):
        torch.testing.assert_close(p.grad, 2 * g, rtol=0, atol=0)
    assert any(g.abs().max() > 1e-3 for g in once)


def test_model_with_a_replaced_module_is_refused():
    model, net, opt = trained()
    old_last = model[2]
    before = snapshot(model, opt)
    model[2] = nn.Linear(5, 3).to(DT)
    raises_one_line(RuntimeError, r"modules or parameters changed after wrapping; call net.attach\(\)",
                    lambda: net(batch()[0]))
    model[2] = old_last
    assert_untouched(model, before, opt)


def test_model_with_a_replaced_parameter_is_refused():
    model, net, opt = trained()
    old = model[0].weight
    before = snapshot(model, opt)
    model[0].weight = nn.Parameter(old.detach().clone())
    raises_one_line(RuntimeError, r"changed after wrapping", lambda: net(batch()[0]))
    model[0].weight = old
    assert_untouched(model, before, opt)


def test_hooks_are_gone_after_remove():
    model, net, _ = trained()
    net.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        model(batch()[0])  # runs as a plain model
    raises_one_line(RuntimeError, r"no hooks are attached \(remove\(\) was called\); call attach\(\)",
                    lambda: net(batch()[0]))
    with tfa.FPropagation(model) as scoped:
        scoped(batch()[0])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# -- shapes, dtypes and devices of the input ---------------------------------------------------------
@pytest.mark.parametrize("x,match", [
    (torch.zeros(4, 7, dtype=DT), r"^0 \(Linear\): expected a \(batch, 6\) input, got shape \(4, 7\)$"),
    (torch.zeros(2, 4, 6, dtype=DT), r"^0 \(Linear\): expected a \(batch, 6\) input, got shape \(2, 4, 6\); "
                                     r"put an nn.Flatten before it"),
    (torch.zeros(4, 6, dtype=torch.float32), r"^0 \(Linear\): expected a torch.float64 input on cpu \(its weight's\), "
                                              r"got torch.float32 on cpu"),
    (torch.zeros(4, 6, dtype=DT, device="meta"), r"^0 \(Linear\): expected a torch.float64 input on cpu .*got "
                                                 r"torch.float64 on meta"),
], ids=["width", "rank-3", "dtype", "device"])
def test_input_mismatch_names_the_layer(x, match):
    model, net, opt = trained()
    before = snapshot(model, opt)
    raises_one_line(ValueError, match, lambda: net(x))
    assert net.layers == []
    assert_untouched(model, before, opt)


def test_model_of_mixed_dtypes_names_the_layer_that_does_not_fit():
    model = nn.Sequential(nn.Linear(6, 5).to(DT), nn.ReLU(), nn.Linear(5, 3))  # the last layer is float32
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1)
    before = snapshot(model, opt)
    raises_one_line(ValueError, r"^2 \(Linear\): expected a torch.float32 input .* got torch.float64",
                    lambda: net(batch()[0]))
    assert_untouched(model, before, opt)


# -- shapes, dtypes and devices of out_adj and the target -------------------------------------------
@pytest.mark.parametrize("out_adj,match", [
    (torch.zeros(4, 2, dtype=DT), r"^out_adj: expected shape \(4, 3\), torch.float64 on cpu \(the output of 2\), "
                                  r"got \(4, 2\)"),
    (torch.zeros(4, 3, dtype=torch.float32), r"^out_adj: expected .*torch.float64.*got \(4, 3\), torch.float32"),
    (torch.zeros(4, 3, dtype=DT, device="meta"), r"^out_adj: expected .* on cpu .*got .* on meta"),
    ([[0.0] * 3] * 4, r"^out_adj: expected a tensor, got list"),
], ids=["shape", "dtype", "device", "not-a-tensor"])
def test_out_adj_mismatch(out_adj, match):
    model, net, opt = trained()
    net(batch()[0])
    before = snapshot(model, opt)
    raises_one_line(ValueError, match, lambda: opt.step(out_adj=out_adj))
    assert_untouched(model, before, opt)


@pytest.mark.parametrize("target,match", [
    (torch.tensor([0, 1, 2, 3]), r"^cross_entropy: targets must lie in \[0, 2\]"),
    (torch.tensor([0.0, 1.0, 2.0, 1.0]), r"^cross_entropy: expected integer class targets, got dtype torch.float32"),
    (torch.tensor([0, 1, 2]), r"^cross_entropy: expected targets of shape \(4,\), got \(3,\)"),
    (torch.tensor([0, 1, 2, 1], device="meta"), r"^cross_entropy: targets on meta, output on cpu"),
], ids=["out-of-range", "float-classes", "batch-size", "device"])
def test_bad_targets(target, match):
    model, net, opt = trained()
    net(batch()[0])
    before = snapshot(model, opt)
    raises_one_line(ValueError, match, lambda: opt.step(target=target))
    assert_untouched(model, before, opt)


def test_step_without_target_or_out_adj():
    model, net, opt = trained()
    net(batch()[0])
    before = snapshot(model, opt)
    raises_one_line(ValueError, r"step\(\) needs a target \(or a precomputed out_adj=\)", lambda: opt.step())
    assert_untouched(model, before, opt)


# -- numerical faults --------------------------------------------------------------------------------
def test_nan_in_the_input_is_refused_before_any_write():
    model, net, opt = trained()
    before = snapshot(model, opt)
    net(torch.full((4, 6), float("nan"), dtype=DT))
    raises_one_line(RuntimeError, r"non-finite values in X\^L, the recorded output of 2 \(Linear\)",
                    lambda: opt.step(target=batch()[1]))
    assert_untouched(model, before, opt)


def test_inf_in_the_output_adjoint_is_refused():
    model, net, opt = trained()
    net(batch()[0])
    before = snapshot(model, opt)
    out_adj = torch.zeros(4, 3, dtype=DT)
    out_adj[1, 2] = float("inf")
    raises_one_line(RuntimeError, r"non-finite values in out_adj \(the signal at the output of 2 \(Linear\)\)",
                    lambda: opt.step(out_adj=out_adj))
    assert_untouched(model, before, opt)


def test_overflowing_update_is_refused_before_any_write():
    """Finite X*^L but gradients that overflow (huge input): the finite check names the parameter."""
    model, net, opt = trained()
    net(torch.full((4, 6), 1e300, dtype=DT))
    before = snapshot(model, opt)
    raises_one_line(RuntimeError, r"^F-adjoint gradients: non-finite values in 2\.weight; nothing was changed",
                    lambda: opt.step(out_adj=torch.full((4, 3), 1e10, dtype=DT)))
    assert_untouched(model, before, opt)


OPTIMIZERS = {
    "fadjoint": lambda net: tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9),
    "fadjoint-fused": lambda net: tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9, fuse_update=True),
    "equilibrium": lambda net: tfa.optim.EquilibriumFAdjoint(net, lr=0.1, momentum=0.9, loss="cross_entropy"),
    "equilibrium-parallel": lambda net: tfa.optim.EquilibriumFAdjoint(net, lr=0.1, momentum=0.9, sequential=False,
                                                                      loss="cross_entropy"),
    "lfp": lambda net: tfa.optim.LFP(net, lr=0.1),
    "consequentialism": lambda net: tfa.optim.Consequentialism(net, lr=0.1, momentum=0.9),
    "nlms": lambda net: tfa.optim.Consequentialism(net, lr=0.1, mode="nlms", base="adam"),
    "il": lambda net: tfa.optim.InferenceLearning(net, variant="il"),
}


def _stepped(make):
    """A fresh model, recorder and optimizer that has taken one finite step (state exists)."""
    model = model_()
    net = tfa.FPropagation(model, keep_pre_activations=True)
    opt = make(net)
    x, t = batch()
    net(x)
    opt.step(target=t)
    return model, net, opt


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_refuses_a_nan_input(name):
    model, net, opt = _stepped(OPTIMIZERS[name])
    before = snapshot(model, opt)
    net(torch.full((4, 6), float("nan"), dtype=DT))
    raises_one_line(RuntimeError, r"non-finite values in (X\^L, the recorded output of 2 \(Linear\)|0\.weight)",
                    lambda: opt.step(target=batch()[1]))
    assert_untouched(model, before, opt)


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "il"])  # IL takes no top signal
def test_every_optimizer_refuses_an_overflowing_update(name):
    """Finite input and a finite (huge) top signal: the overflow appears in the gradients themselves, so
    the check after the sweep (before any parameter is written) must catch it. In sequential equilibrium
    layer 2 is checked only with layer 1's gradient: its update is undone."""
    model, net, opt = _stepped(OPTIMIZERS[name])
    before = snapshot(model, opt)
    net(batch()[0])
    top = torch.full((4, 3), 1e308, dtype=DT)
    step = (lambda: opt.step(out_adj=top)) if name == "lfp" else (lambda: opt.step(out_adj=top))
    raises_one_line(RuntimeError, r"(gradients|step): non-finite values in 2\.weight( \(fused: [^)]*\))?; nothing "
                    "was changed", step)
    assert_untouched(model, before, opt)


def test_failed_factorisation_names_the_layer():
    model, net, opt = _stepped(OPTIMIZERS["consequentialism"])
    before = snapshot(model, opt)
    net(batch()[0] * 1e300)  # finite logits through ReLU, but K = X̃X̃ᵀ overflows
    raises_one_line(RuntimeError, r"^2 \(Linear\): consequentialism's K = .* is not positive definite",
                    lambda: opt.step(target=batch()[1]))
    assert_untouched(model, before, opt)


def test_validate_false_lets_a_non_finite_update_through():
    """Documented: validate=False (CUDA-graph capture: no host sync) skips the finite checks."""
    model = model_()
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1, validate=False)
    net(torch.full((4, 6), float("nan"), dtype=DT))
    opt.step(target=batch()[1])
    assert not all(bool(p.isfinite().all()) for p in model.parameters())
