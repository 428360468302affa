"""``validate=False`` keeps forward + step free of host synchronisations (CUDA graphs, torch.compile; issue 16).

A ``TorchDispatchMode`` counts the ops that read a device value back to the host (``_local_scalar_dense``:
``.item()``, ``bool(t)``, ``int(t)``; ``is_nonzero``) over the recorder's forward and one optimizer step, on
CPU, where the count is the same as it would be on CUDA. ``validate=True`` makes its one documented sync (the
step guard's read-back, counted by wrapping it).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torch_fadjoint as tfa

_SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default}


class CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SYNCS:
            self.count += 1
        return func(*args, **(kwargs or {}))


class Net(nn.Module):
    """A CNN with functional forwards: the function mode is active."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.max_pool2d(F.relu(self.conv(x)), 2), 1))


RULES = {
    "fadjoint": lambda net, v: tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9, validate=v),
    "fadjoint_fused": lambda net, v: tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9, fuse_update=True, validate=v),
    "equilibrium": lambda net, v: tfa.optim.EquilibriumFAdjoint(net, lr=0.1, loss="cross_entropy", validate=v),
    "lfp": lambda net, v: tfa.optim.LFP(net, lr=0.1, validate=v),
    "nlms": lambda net, v: tfa.optim.Consequentialism(net, lr=0.1, mode="nlms", validate=v),
    "il": lambda net, v: tfa.optim.InferenceLearning(net, variant="il", T=3, validate=v),
}


def _count(rule, validate, model):
    net = tfa.FPropagation(model)
    opt = RULES[rule](net, validate)
    x, t = torch.randn(4, *(1, 8, 8) if isinstance(model, Net) else (6,)), torch.randint(0, 5, (4,))
    net(x)
    opt.step(target=t)  # state exists: a steady-state step is counted
    with CountSyncs() as counter:
        net(x)
        opt.step(target=t)
    return counter.count


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_validate_false_makes_no_host_sync(rule, model):
    make = Net if model == "cnn" else lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    assert _count(rule, False, make()) == 0


def _count_reads(rule, validate, model, monkeypatch):
    """Host syncs of one steady-state step: dispatched reads (``.item()``, ``bool(t)``) plus the step guard's
    read-backs (``.tolist()`` of its one vector, which dispatches nothing on CPU and is one copy on CUDA)."""
    from torch_fadjoint.optim import guard

    reads = []
    read_back = guard._read_back
    monkeypatch.setattr(guard, "_read_back", lambda *a: reads.append(1) or read_back(*a))
    net = tfa.FPropagation(model)
    opt = RULES[rule](net, validate)
    x, t = torch.randn(4, *(1, 8, 8) if isinstance(model, Net) else (6,)), torch.randint(0, 5, (4,))
    net(x)
    opt.step(target=t)
    reads.clear()
    with CountSyncs() as counter:
        net(x)
        opt.step(target=t)
    return counter.count + len(reads)


@pytest.mark.parametrize("rule", ["fadjoint", "fadjoint_fused", "equilibrium", "lfp"])
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_validate_true_makes_one_host_sync(rule, model, monkeypatch):
    """Issue 20: the checked step decides targets, output, signal and every update bound with ONE read back."""
    make = Net if model == "cnn" else lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    assert _count_reads(rule, True, make(), monkeypatch) == 1


def test_validate_true_makes_its_documented_syncs(monkeypatch):
    """The counters see syncs where there are some (so the zero above is a measurement, not a blind spot):
    the delegated rules read their own checks back too."""
    assert _count_reads("nlms", True, nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)), monkeypatch) >= 2


# -- validate="async" (issue 16): decided on the device, never written, raised at the next step ------------
RULES_ASYNC = {name: (lambda make: lambda net, v: make(net, "async" if v else False))(make) for name, make in
               RULES.items()}
RULES_ASYNC.update({
    "equilibrium_parallel": lambda net, v: tfa.optim.EquilibriumFAdjoint(net, lr=0.1, loss="cross_entropy",
                                                                          sequential=False, validate="async"),
    "consequentialism": lambda net, v: tfa.optim.Consequentialism(net, lr=0.1, momentum=0.9, validate="async"),
    "il_prox_adam": lambda net, v: tfa.optim.InferenceLearning(net, variant="il_prox", T=3, base="adam", lr=1e-3,
                                                               validate="async"),
})


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))


@pytest.mark.parametrize("rule", sorted(set(RULES_ASYNC) - {"il_prox_adam"}))  # torch's CPU Adam reads its step
@pytest.mark.parametrize("model", ["mlp", "cnn"])                            # count (.item()); capturable on CUDA
def test_async_makes_no_host_sync(rule, model):
    net = tfa.FPropagation(Net() if model == "cnn" else _mlp())
    opt = RULES_ASYNC[rule](net, True)
    x = torch.randn(4, *((1, 8, 8) if model == "cnn" else (6,)))
    t = torch.randint(0, 5, (4,))
    net(x)
    opt.step(target=t)
    with CountSyncs() as counter:
        net(x)
        opt.step(target=t)
    assert counter.count == 0


def _state(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            {k: v.clone() for entry in opt.state.values() for k, v in entry.items() if isinstance(v, torch.Tensor)})


@pytest.mark.parametrize("rule", sorted(RULES_ASYNC))
def test_async_finite_steps_equal_the_checked_steps_bit_for_bit(rule):
    runs = []
    for validate in ("async", True):
        model = _mlp()
        net = tfa.FPropagation(model)
        opt = RULES_ASYNC[rule](net, True)
        opt.validate = validate
        gen = torch.Generator().manual_seed(3)
        for _ in range(3):
            net(torch.randn(4, 6, generator=gen))
            opt.step(target=torch.randint(0, 5, (4,), generator=gen))
        opt.synchronize() if validate == "async" else None
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rule", sorted(RULES_ASYNC))
def test_async_never_writes_a_non_finite_step_and_raises_at_the_next(rule):
    model = _mlp()
    net = tfa.FPropagation(model)
    opt = RULES_ASYNC[rule](net, True)
    x, t = torch.randn(4, 6), torch.randint(0, 5, (4,))
    net(x)
    opt.step(target=t)  # step 1: state exists
    before = _state(model, opt)
    net(torch.full((4, 6), float("nan")))
    opt.step(target=t)  # step 2: decided on the device, nothing raised yet
    after = _state(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert before[1].keys() == after[1].keys()
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    net(x)
    with pytest.raises(RuntimeError, match=r"^step 2 \(validate='async'\): .*non-finite values in .*; that step wrote "
                                           r"no parameter and no state$"):
        opt.step(target=t)  # step 3 reads step 2's flags before anything
    opt.synchronize()  # nothing pending any more
    net(x)
    opt.step(target=t)
    opt.synchronize()


def test_async_out_of_range_target_is_skipped_and_named():
    model = _mlp()
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1, validate="async")
    before = [p.clone() for p in model.parameters()]
    net(torch.randn(4, 6))
    opt.step(target=torch.tensor([0, 1, 7, 2]))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(RuntimeError, match=r"^step 1 \(validate='async'\): target: a class outside \[0, 4\]; "
                                           r"that step wrote no parameter"):
        opt.synchronize()


def test_the_default_on_cpu_is_the_immediate_check():
    net = tfa.FPropagation(_mlp())
    opt = tfa.optim.FAdjoint(net, lr=0.1)
    assert opt.validate is None
    net(torch.full((4, 6), float("nan")))
    with pytest.raises(RuntimeError, match=r"^step: non-finite values in X\^L"):
        opt.step(target=torch.zeros(4, dtype=torch.long))


def test_async_errors_of_steps_still_in_flight_are_kept_in_order(monkeypatch):
    """On CUDA the CPU runs ahead: several steps' flags can be on their way at once. None may be dropped: the
    first failed step is raised once its flags arrive (here: held back until ``synchronize``)."""
    from torch_fadjoint.optim.guard import PendingFlags
    monkeypatch.setattr(PendingFlags, "ready", lambda self: False)  # nothing has arrived yet
    net = tfa.FPropagation(_mlp())
    opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9, validate="async")
    x, t = torch.randn(4, 6), torch.randint(0, 5, (4,))
    for inputs in (x, torch.full_like(x, float("nan")), x, torch.full_like(x, float("inf")), x):
        net(inputs)
        opt.step(target=t)  # steps 1..5: none raises, the flags are "in flight"
    assert [p.step for p in opt.guard.pending] == [1, 2, 3, 4, 5]
    with pytest.raises(RuntimeError, match=r"^step 2 \(validate='async'\)"):
        opt.synchronize()
    with pytest.raises(RuntimeError, match=r"^step 4 \(validate='async'\)"):
        opt.synchronize()
    opt.synchronize()
    assert not opt.guard.pending


def _wide():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 5))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_async_fused_products_are_masked_and_equal_the_checked_step(momentum):
    """Batch 2 on a wide layer: the update is made inside the GEMM (fused), each write masked by the checks."""
    runs = []
    for validate in ("async", True):
        model = _wide()
        net = tfa.FPropagation(model)
        opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=momentum, weight_decay=1e-3, fuse_update=True,
                                 validate=validate)
        gen = torch.Generator().manual_seed(3)
        for _ in range(3):
            net(torch.randn(2, 6, generator=gen))
            opt.step(target=torch.randint(0, 5, (2,), generator=gen))
        runs.append((model, opt))
    (model, opt), (checked, _) = runs
    opt.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), checked.parameters()))
    before = _state(model, opt)
    net = opt.net
    net(torch.full((2, 6), float("nan")))
    opt.step(target=torch.zeros(2, dtype=torch.long))
    after = _state(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    with pytest.raises(RuntimeError, match=r"^step 4 \(validate='async'\)"):
        opt.synchronize()


def test_a_failed_async_first_step_leaves_zero_buffers():
    model = _wide()
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9, validate="async")
    before = [p.clone() for p in model.parameters()]
    net(torch.full((2, 6), float("inf")))
    opt.step(target=torch.zeros(2, dtype=torch.long))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(not opt.state[p]["momentum_buffer"].any() for p in model.parameters())
    with pytest.raises(RuntimeError, match=r"^step 1 \(validate='async'\)"):
        opt.synchronize()
