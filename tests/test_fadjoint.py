"""The F-adjoint equals backpropagation (docs/maths.md §1.2): every gradient against autograd."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_fadjoint as tfa
from torch_fadjoint.sweep import Rule

from . import oracles
from .problems import Problem, random_problems

PROBLEMS = random_problems(200)
LOSS_FNS = {
    "cross_entropy": tfa.losses.cross_entropy, "nll": tfa.losses.nll,
    "mse": tfa.losses.mse, "mse_float": tfa.losses.mse,
}


def fadjoint_grads(problem: Problem, dtype=torch.float64):
    """(F-adjoint grads, autograd grads) for one problem, same weights, input and dropout masks."""
    model, x, target = problem.build(dtype)
    net = tfa.FPropagation(model)
    params = dict(model.named_parameters())
    kwargs = {"label_smoothing": problem.label_smoothing} if problem.loss == "cross_entropy" else {}
    torch.manual_seed(problem.seed)
    want = oracles.autograd_grads(lambda: model(x), params, problem.loss, target, problem.label_smoothing)
    torch.manual_seed(problem.seed)
    with torch.no_grad():
        out = net(x)
    _, out_adj = LOSS_FNS[problem.loss](out, target, **kwargs)
    net.adjoint(out_adj)
    got = {name: p.grad for name, p in params.items()}
    return got, want


def max_relative_error(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    worst = 0.0
    for name, g in want.items():
        assert got[name].shape == g.shape, name
        scale = g.abs().max().item()
        if scale > 0:
            worst = max(worst, (got[name] - g).abs().max().item() / scale)
    return worst


@pytest.mark.parametrize("problem", PROBLEMS, ids=str)
def test_fadjoint_grads_equal_autograd_float64(problem):
    got, want = fadjoint_grads(problem, torch.float64)
    assert any(g.abs().max() > 1e-6 for g in want.values()), "degenerate problem: reference gradient ~0"
    assert max_relative_error(got, want) <= 1e-10


@pytest.mark.parametrize("problem", PROBLEMS[::4], ids=str)
def test_fadjoint_grads_equal_autograd_float32(problem):
    got, want = fadjoint_grads(problem, torch.float32)
    assert max_relative_error(got, want) <= 1e-5


def test_fadjoint_bfloat16_close_to_autograd():
    problem = Problem(seed=7, widths=[16, 32, 32, 5], activations=["relu", "gelu", "relu"], bias=[True] * 3,
                      batch=32, loss="cross_entropy")
    got, want = fadjoint_grads(problem, torch.bfloat16)
    assert all(g.dtype == torch.bfloat16 for g in got.values())
    assert max_relative_error(got, want) <= 2e-2


def test_max_error_over_the_problem_set_is_reported(capsys):
    """A summary figure (printed with -s) of the worst float64 / float32 errors over 40 problems."""
    worst64 = max(max_relative_error(*fadjoint_grads(p, torch.float64)) for p in PROBLEMS[:40])
    worst32 = max(max_relative_error(*fadjoint_grads(p, torch.float32)) for p in PROBLEMS[:40])
    print(f"max relative error float64 {worst64:.2e}, float32 {worst32:.2e}")
    assert worst64 <= 1e-10 and worst32 <= 1e-5


class _CountingRule(Rule):
    def __init__(self):
        self.calls = 0

    def through_layer(self, layer, y_adj):
        self.calls += 1
        return super().through_layer(layer, y_adj)


def test_first_layer_needs_no_input_adjoint():
    """Three GEMMs per layer and none for X*^0: through_layer runs L − 1 times."""
    from torch_fadjoint.sweep import backward_sweep

    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    net = tfa.FPropagation(model)
    with torch.no_grad():
        out = net(torch.randn(6, 5, dtype=torch.float64))
    rule = _CountingRule()
    backward_sweep(net.layers, torch.ones_like(out), rule, lambda *args: None)
    assert rule.calls == 2


def test_adjoint_never_calls_autograd(monkeypatch):
    """The forward under inference_mode (no graph can exist), autograd patched to raise: still exact."""
    problem = Problem(seed=3, widths=[10, 12, 9, 4], activations=["relu", "sigmoid", "x"], bias=[True, False, True],
                      batch=9, loss="cross_entropy")
    got_ref, want = fadjoint_grads(problem)
    model, x, target = problem.build()
    net = tfa.FPropagation(model)

    def refuse(*args, **kwargs):
        raise AssertionError("autograd was called")

    monkeypatch.setattr(torch.autograd, "backward", refuse)
    monkeypatch.setattr(torch.autograd, "grad", refuse)
    monkeypatch.setattr(torch.Tensor, "backward", refuse)
    with torch.inference_mode():
        out = net(x)
    _, out_adj = tfa.losses.cross_entropy(out, target)
    net.adjoint(out_adj)
    got = {name: p.grad for name, p in model.named_parameters()}
    assert max_relative_error(got, want) <= 1e-10


def test_adjoint_accumulates_like_backward():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    net = tfa.FPropagation(model)
    x, t = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    with torch.no_grad():
        _, out_adj = tfa.losses.cross_entropy(net(x), t)
    net.adjoint(out_adj)
    once = [p.grad.clone() for p in model.parameters()]
    with torch.no_grad():
        net(x)
    net.adjoint(out_adj)
    for p, g in zip(model.parameters(), once):
        torch.testing.assert_close(p.grad, 2 * g, rtol=0, atol=1e-15)


def test_adjoint_twice_after_one_forward_is_an_error():
    """Decision: the sweep frees the records, so a second adjoint needs a new forward."""
    model = nn.Sequential(nn.Linear(4, 3)).double()
    net = tfa.FPropagation(model)
    with torch.no_grad():
        out = net(torch.randn(2, 4, dtype=torch.float64))
    net.adjoint(torch.ones_like(out))
    with pytest.raises(RuntimeError, match="no recorded forward"):
        net.adjoint(torch.ones_like(out))


def test_retain_records_keeps_them_for_a_second_sweep():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    net = tfa.FPropagation(model)
    with torch.no_grad():
        out = net(torch.randn(2, 4, dtype=torch.float64))
    net.adjoint(torch.ones_like(out), retain_records=True)
    first = [p.grad.clone() for p in model.parameters()]
    net.adjoint(torch.ones_like(out))
    for p, g in zip(model.parameters(), first):
        torch.testing.assert_close(p.grad, 2 * g)


def test_step_activation_is_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 5), tfa.nn.Step(), nn.Linear(5, 3))
    net = tfa.FPropagation(model)
    with torch.no_grad():
        out = net(torch.randn(2, 4))
    with pytest.raises(TypeError, match=r"^1 \(Step\): derivative is 0 almost everywhere"):
        net.adjoint(torch.ones_like(out))
    assert all(p.grad is None for p in model.parameters())


def test_step_activation_is_refused_by_autograd():
    model = nn.Sequential(nn.Linear(4, 5), tfa.nn.Step(), nn.Linear(5, 3))
    with pytest.raises(RuntimeError, match="autograd cannot train through it"):
        model(torch.randn(2, 4)).sum().backward()


@pytest.mark.parametrize("loss", ["torch-nll", "tfa-nll", "name"])
def test_one_call_backward_equals_loss_backward(loss):
    """``net.backward(F.nll_loss, t)``: the loss of the recorded output and its sweep, as ``loss.backward()``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.LogSoftmax(dim=1)).double()
    x, t = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    with torch.enable_grad():
        want_loss = F.nll_loss(model(x), t)
        want_loss.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    net = tfa.FPropagation(model)
    net(x)
    fn = {"torch-nll": F.nll_loss, "tfa-nll": tfa.losses.nll, "name": "nll"}[loss]
    got_loss = net.backward(fn, t)
    assert torch.equal(got_loss, want_loss.detach())
    for p, g in zip(model.parameters(), want):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("graph", [False, True], ids=["chain", "tape"])
def test_the_steps_top_signal_is_freed_once_the_top_layer_has_read_it(graph, monkeypatch):
    """X*^L (the size of the logits: large for a language model) lives no longer than autograd keeps the loss's
    gradient: every sweep step below the top one runs without it (before: the step's frames and the guard kept it
    to the end)."""
    import weakref

    from torch_fadjoint import sweep, tape_sweep

    signals, alive = [], []

    def loss(output, target):
        value, out_adj = tfa.losses.cross_entropy(output, target)
        signals.append(weakref.ref(out_adj))
        return value, out_adj

    def watching(original):
        def through(self, *args, **kwargs):
            alive.append(signals[-1]() is not None)
            return original(self, *args, **kwargs)
        return through

    monkeypatch.setattr(sweep.FAdjointRule, "through_layer", watching(sweep.FAdjointRule.through_layer))
    monkeypatch.setattr(tape_sweep.TapeRule, "through_op", watching(tape_sweep.TapeRule.through_op))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    net = tfa.FPropagation(model, graph=graph)
    opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9, loss=loss)
    x, t = torch.randn(5, 6), torch.randint(0, 4, (5,))
    for _ in range(2):
        net(x)
        opt.step(target=t)
    per_step = len(alive) // 2  # the chain: layers 3 and 2 send X* down; the tape: its five ops
    assert per_step == (2 if not graph else 5) and alive == ([True] + [False] * (per_step - 1)) * 2, alive
