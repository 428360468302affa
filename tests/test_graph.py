"""``tfa.graphed_step`` and ``tfa.compiled_step`` (issue 16).

Without a GPU the capture logic runs against ``ReplayEmulator``: a CPU stand-in for the CUDA side that
records every ATen op of the captured step (a ``TorchDispatchMode``) and, on each replay, re-runs those ops on
the same tensors and writes each result into the tensor the capture produced — what a CUDA graph does with
fixed addresses. Whatever the host decided during the capture (a learning rate passed as a Python number, a
branch, a counter) is frozen exactly as in a real graph, so a scheduler that a replay ignored, or a Python
side effect a replay skips, makes these tests fail (``test_the_emulator_catches_a_frozen_learning_rate``
shows it does). A host sync or a tensor made from host data inside the capture is an error, as on CUDA.
The same tests run on CUDA with the real graph where one is present.
"""
import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten  # tree_leaves is not in torch 2.1
from torch.utils._python_dispatch import TorchDispatchMode

import torch_fadjoint as tfa
from torch_fadjoint.graph import GraphedStep
from torch_fadjoint.optim.base import RuleOptimizer

from .models import labelled_batches, mlp
from .state import assert_untouched, snapshot

_FORBIDDEN = {torch.ops.aten._local_scalar_dense.default: "a host sync", torch.ops.aten.item.default: "a host sync",
              torch.ops.aten.is_nonzero.default: "a host sync",
              torch.ops.aten.lift_fresh.default: "a tensor made from host data",
              torch.ops.aten.lift_fresh_copy.default: "a tensor made from host data"}


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FORBIDDEN:
            raise RuntimeError(f"{func} during the capture: {_FORBIDDEN[func]}")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class _Graph:
    def __init__(self, ops):
        self.ops = ops

    @torch.no_grad()  # the ops, below autograd as in a real graph
    def replay(self):
        for func, args, kwargs, out in self.ops:
            fresh = func(*args, **kwargs)
            for old, new in zip(tree_flatten(out)[0], tree_flatten(fresh)[0]):
                if isinstance(old, torch.Tensor) and old is not new and \
                        old.untyped_storage().data_ptr() != new.untyped_storage().data_ptr():
                    old.copy_(new)


class _Done:
    def record(self):
        pass

    def query(self):
        return True

    def synchronize(self):
        pass


class ReplayEmulator:
    """The four methods of ``torch_fadjoint.graph._CUDA``, on CPU."""

    def check(self, tensors):
        pass

    side_stream = staticmethod(contextlib.nullcontext)

    def capture(self, step):
        with _Record() as record:
            result = step()
        return _Graph(record.ops), result

    def to_host(self, tensor):
        return tensor.clone(), _Done()


CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def graphed(net, opt, x, t, device, **kwargs):
    backend = ReplayEmulator() if device == "cpu" else None
    return GraphedStep(net, opt, x, t, _backend=backend, **kwargs)


def _mlp(seed=0, dtype=torch.float64, device="cpu"):
    return mlp((6, 16, 16, 5), [nn.Tanh, nn.ReLU], seed=seed, dtype=dtype, device=device)


class _CNN(nn.Module):
    """Functional forward with a BatchNorm (running statistics are module buffers the capture must undo)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.max_pool2d(F.relu(self.bn(self.conv(x))), 2), 1))


def _cnn(seed=0, dtype=torch.float64, device="cpu"):
    torch.manual_seed(seed)
    return _CNN().to(device, dtype)


RULES = {
    "fadjoint": lambda net, v: tfa.optim.FAdjoint(net, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3,
                                                  validate=v),
    "fadjoint_nesterov": lambda net, v: tfa.optim.FAdjoint(net, lr=0.05, momentum=0.9, nesterov=True, validate=v),
    "fadjoint_plain": lambda net, v: tfa.optim.FAdjoint(net, lr=0.05, weight_decay=1e-3, validate=v),
    "fused": lambda net, v: tfa.optim.FAdjoint(net, lr=0.05, momentum=0.9, weight_decay=1e-3, fuse_update=True,
                                               validate=v),
    "fused_plain": lambda net, v: tfa.optim.FAdjoint(net, lr=0.05, weight_decay=1e-3, fuse_update=True, validate=v),
    "equilibrium": lambda net, v: tfa.optim.EquilibriumFAdjoint(net, lr=0.05, momentum=0.9, loss="cross_entropy",
                                                                validate=v),
    "equilibrium_parallel": lambda net, v: tfa.optim.EquilibriumFAdjoint(net, lr=0.05, loss="cross_entropy",
                                                                         sequential=False, validate=v),
    "lfp": lambda net, v: tfa.optim.LFP(net, lr=0.05, validate=v),
}


def _batches(n, device, dtype, cnn=False, batch=8, seed=1):
    return labelled_batches(n, batch, (1, 8, 8) if cnn else 6, 5, seed=seed, dtype=dtype, device=device)


def _run(rule, device, graph, steps=100, validate="async", cnn=False, scheduler=True, batches=None, batch=8):
    """``steps`` steps of ``rule`` (an lr schedule halving every 10), eager or graphed; parameters, buffers, losses."""
    model = (_cnn if cnn else _mlp)(device=device)
    net = tfa.FPropagation(model)
    opt = RULES[rule](net, validate)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5) if scheduler else None
    batches = batches or _batches(steps, device, torch.float64, cnn, batch=batch)
    step = graphed(net, opt, *batches[0], device) if graph else None
    losses = []
    for x, t in batches:
        if graph:
            loss = step(x, t)
        else:
            net(x)
            loss = opt.step(target=t)
        losses.append(loss.clone())
        if sched is not None:
            sched.step()
    if validate == "async":
        opt.synchronize()
    return model, opt, torch.stack(losses), step


def _max_diff(model_a, model_b):
    pairs = list(zip(model_a.state_dict().values(), model_b.state_dict().values()))
    return max(float((a.double() - b.double()).abs().max()) for a, b in pairs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", sorted(RULES))
def test_replays_equal_the_eager_steps_over_100_steps_with_a_scheduler(rule, device):
    eager, eager_opt, eager_losses, _ = _run(rule, device, graph=False)
    replayed, opt, losses, step = _run(rule, device, graph=True)
    first_eager = 1 if opt.param_groups[0]["momentum"] else 0  # a fresh optimizer's step 1 makes its buffers
    assert (step.eager_steps, step.replays, step.captures) == (first_eager, 100 - first_eager, 1)
    assert _max_diff(eager, replayed) < 1e-10
    assert float((eager_losses - losses).abs().max()) < 1e-10
    for p, q in zip(eager.parameters(), replayed.parameters()):
        buf_a, buf_b = eager_opt.state[p].get("momentum_buffer"), opt.state[q].get("momentum_buffer")
        assert (buf_a is None) == (buf_b is None)
        if buf_a is not None:
            assert float((buf_a - buf_b).abs().max()) < 1e-10
    assert opt.guard.steps == eager_opt.guard.steps == 100


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("validate", [False, "async"])
@pytest.mark.parametrize("rule", ["fused", "fused_plain"])
def test_fused_products_replay_as_eager(rule, validate, device):
    """Batch 2: every weight's factors are smaller than the weight, so the update is made inside the GEMM (with
    the lr a device tensor, and masked by the checks with async)."""
    eager, *_ = _run(rule, device, graph=False, steps=40, batch=2, validate=validate)
    replayed, *_ = _run(rule, device, graph=True, steps=40, batch=2, validate=validate)
    assert _max_diff(eager, replayed) < 1e-10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", ["fadjoint", "fused", "equilibrium", "lfp"])
def test_a_cnn_with_batchnorm_replays_as_eager(rule, device):
    eager, *_ = _run(rule, device, graph=False, steps=30, cnn=True)
    replayed, *_ = _run(rule, device, graph=True, steps=30, cnn=True)
    assert _max_diff(eager, replayed) < 1e-10  # running statistics included (state_dict)


@pytest.mark.parametrize("validate", [False, "async"])
def test_validate_false_and_async_replay_alike(validate):
    eager, *_ = _run("fadjoint", "cpu", graph=False, steps=20, validate=validate)
    replayed, *_ = _run("fadjoint", "cpu", graph=True, steps=20, validate=validate)
    assert _max_diff(eager, replayed) < 1e-10


def test_the_schedule_reaches_the_replays():
    """Halving the lr every 10 steps changes the result, and the replays follow it (so a frozen lr would fail)."""
    constant, *_ = _run("fadjoint_plain", "cpu", graph=False, steps=40, scheduler=False)
    scheduled, *_ = _run("fadjoint_plain", "cpu", graph=True, steps=40)
    assert _max_diff(constant, scheduled) > 1e-3


def test_the_emulator_catches_a_frozen_learning_rate(monkeypatch):
    """With the lr read as a host number (what a graph would freeze), the replays miss the schedule: the test
    of the emulator itself."""
    monkeypatch.setattr(RuleOptimizer, "_hyper", lambda self, group: dict(
        lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"], weight_decay=group["weight_decay"],
        nesterov=group["nesterov"], maximize=group["maximize"]))
    eager, *_ = _run("fadjoint_plain", "cpu", graph=False, steps=40)
    replayed, *_ = _run("fadjoint_plain", "cpu", graph=True, steps=40)
    assert _max_diff(eager, replayed) > 1e-3


def _fresh(rule, validate, steps):
    """A new MLP, its recorder, ``rule``'s optimizer and ``steps`` batches."""
    model = _mlp()
    net = tfa.FPropagation(model)
    return model, net, RULES[rule](net, validate), _batches(steps, "cpu", torch.float64)


def test_a_batch_of_another_shape_is_an_eager_step():
    batches = _batches(6, "cpu", torch.float64)
    batches[3] = (batches[3][0][:5], batches[3][1][:5])  # a partial batch
    eager, *_ = _run("fadjoint", "cpu", graph=False, steps=6, batches=batches)
    replayed, _, _, step = _run("fadjoint", "cpu", graph=True, steps=6, batches=batches)
    assert (step.eager_steps, step.replays) == (2, 4)
    assert _max_diff(eager, replayed) < 1e-12


def test_an_optimizer_with_state_is_captured_at_once_and_its_first_replay_is_the_next_step():
    model, net, opt, batches = _fresh("fadjoint", "async", 5)
    net(batches[0][0])
    opt.step(target=batches[0][1])  # the state exists
    before = snapshot(model, opt, grads=False)  # the capture's warm-up leaves its .grad (the next step rewrites it)
    step = graphed(net, opt, *batches[1], "cpu")
    assert step.captures == 1 and opt.guard.steps == 1  # warm-up and capture undone
    assert_untouched(before, model, opt)
    for x, t in batches[1:]:
        step(x, t)
    assert step.replays == 4 and step.eager_steps == 0

    reference = _mlp()
    ref_net = tfa.FPropagation(reference)
    ref_opt = RULES["fadjoint"](ref_net, "async")
    for x, t in batches:
        ref_net(x)
        ref_opt.step(target=t)
    assert _max_diff(reference, model) < 1e-12


def test_a_changed_momentum_or_mode_recaptures():
    model, net, opt, batches = _fresh("fadjoint", False, 8)
    step = graphed(net, opt, *batches[0], "cpu")
    reference = _mlp()
    ref_net = tfa.FPropagation(reference)
    ref_opt = RULES["fadjoint"](ref_net, False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (x, t) in enumerate(batches):
            for o in (opt, ref_opt):
                o.param_groups[0]["momentum"] = 0.9 if i < 3 else 0.5
            if i == 5:
                model.eval(), reference.eval()
            step(x, t)
            ref_net(x)
            ref_opt.step(target=t)
    assert step.captures == 3 and step.eager_steps == 1
    assert any("re-captured 2 times" in str(w.message) for w in caught)
    assert _max_diff(reference, model) < 1e-12


def test_a_loaded_optimizer_state_recaptures():
    """load_state_dict puts new buffer tensors in place: the graph must write those, not the old ones."""
    model, net, opt, batches = _fresh("fadjoint", False, 6)
    ref_model, ref_net, ref_opt, _ = _fresh("fadjoint", False, 0)
    step = graphed(net, opt, *batches[0], "cpu")
    for i, (x, t) in enumerate(batches):
        if i in (2, 4):  # the same tensors back (new group dicts only), then copies (new state tensors)
            opt.load_state_dict(opt.state_dict() if i == 2 else copy.deepcopy(opt.state_dict()))
            ref_opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
            for o in (opt, ref_opt):
                o.param_groups[0]["lr"] = 0.02  # and the new group dict's lr reaches the replays
        step(x, t)
        ref_net(x)
        ref_opt.step(target=t)
    assert step.captures == 2
    assert _max_diff(ref_model, model) < 1e-12
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert float((opt.state[p]["momentum_buffer"] - ref_opt.state[q]["momentum_buffer"]).abs().max()) < 1e-12


def test_async_replays_never_write_a_non_finite_step_and_raise_later():
    model, net, opt, batches = _fresh("fadjoint", "async", 6)
    step = graphed(net, opt, *batches[0], "cpu")
    step(*batches[0])  # eager: the state
    step(*batches[1])  # replay: step 2
    before = snapshot(model, opt, grads=False)  # .grad is the step's scratch: written, then not applied
    step(torch.full_like(batches[2][0], float("nan")), batches[2][1])  # step 3: decided on the device
    assert_untouched(before, model, opt)
    with pytest.raises(RuntimeError, match=r"^step 3 \(validate='async'\): step: non-finite values in X\^L, the "
                                           r"recorded output of 4 \(Linear\)"):
        step(*batches[3])  # the next call reads the record before replaying
    step(*batches[3])  # the record was reset: training goes on
    opt.synchronize()


def test_synchronize_raises_a_replays_error():
    model, net, opt, batches = _fresh("fused", "async", 3)
    step = graphed(net, opt, *batches[0], "cpu")
    step(*batches[0])
    step(torch.full_like(batches[1][0], float("inf")), batches[1][1])
    with pytest.raises(RuntimeError, match=r"^step 2 \(validate='async'\)"):
        step.synchronize()


def test_a_failed_capture_changes_nothing(monkeypatch):
    model = _mlp()
    net = tfa.FPropagation(model)
    opt = RULES["fadjoint"](net, False)
    x, t = _batches(1, "cpu", torch.float64)[0]
    net(x)
    opt.step(target=t)
    before = snapshot(model, opt)
    grads = [p.grad for p in model.parameters()]
    original = tfa.losses.cross_entropy

    def syncing_loss(output, target, **kwargs):
        loss, out_adj = original(output, target, **kwargs)
        float(loss)  # a host read: not allowed inside a graph
        return loss, out_adj

    monkeypatch.setattr(opt, "_loss_fn", syncing_loss)
    with pytest.raises(RuntimeError, match=r"^graphed_step: capturing the FAdjoint step failed, nothing was changed: "
                                           r"RuntimeError: aten._local_scalar_dense.default during the capture: a "
                                           r"host sync$"):
        graphed(net, opt, x, t, "cpu")
    assert_untouched(before, model, opt)
    assert all(g is p.grad for g, p in zip(grads, model.parameters())) and opt.guard.steps == 1


# -- refusals ------------------------------------------------------------------------------------------
def _net_opt(make):
    net = tfa.FPropagation(_mlp(dtype=torch.float32))
    return net, make(net)


X, T = torch.randn(8, 6), torch.randint(0, 5, (8,))


@pytest.mark.skipif(CUDA, reason="the CPU refusal")
def test_on_cpu_graphed_step_is_refused_in_one_line():
    net, opt = _net_opt(lambda n: tfa.optim.FAdjoint(n, lr=0.1, validate=False))
    before = snapshot(net, opt)
    with pytest.raises(RuntimeError, match=r"^graphed_step: CUDA graphs need CUDA tensors; the example input is on "
                                           r"cpu \(on CPU use opt.step\(\), or tfa.compiled_step\)$"):
        tfa.graphed_step(net, opt, X, T)
    assert_untouched(before, net, opt)
    assert not opt.state


@pytest.mark.parametrize("make, message", [
    (lambda n: tfa.optim.Consequentialism(n, lr=0.1, validate=False),
     r"^graphed_step: Consequentialism cannot be captured: its update is the base torch optimizer's own step"),
    (lambda n: tfa.optim.InferenceLearning(n, variant="il", validate=False),
     r"^graphed_step: InferenceLearning cannot be captured: its update is the base torch optimizer's own step"),
    (lambda n: tfa.optim.FAdjoint(n, lr=0.1, validate=True),
     r"^graphed_step: validate=True checks on the host in every step, which a graph cannot hold; use "
     r"validate='async' \(the default on CUDA\) or validate=False$"),
    (lambda n: tfa.optim.FAdjoint(n, lr=0.1), r"^graphed_step: validate=True checks on the host"),  # None on CPU
    (lambda n: torch.optim.SGD(n.parameters(), lr=0.1),
     r"^graphed_step: expected a tfa.optim optimizer of this net, got SGD"),
    (lambda n: tfa.optim.FAdjoint(tfa.FPropagation(_mlp(dtype=torch.float32)), lr=0.1, validate=False),
     r"^graphed_step: the optimizer belongs to another FPropagation$"),
])
def test_what_cannot_be_captured_is_refused_in_one_line(make, message):
    net, opt = _net_opt(make)
    with pytest.raises((RuntimeError, TypeError, ValueError), match=message):
        GraphedStep(net, opt, X, T, _backend=ReplayEmulator())


def test_a_bad_warmup_is_refused():
    net, opt = _net_opt(lambda n: tfa.optim.FAdjoint(n, lr=0.1, validate=False))
    with pytest.raises(ValueError, match=r"^graphed_step: warmup must be an int >= 1, got 0$"):
        GraphedStep(net, opt, X, T, warmup=0, _backend=ReplayEmulator())


# -- torch.compile of the whole step ------------------------------------------------------------------
_OLD_TORCH = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < tfa.graph.COMPILE_MIN_TORCH


def test_compiled_step_is_refused_below_its_torch_version(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.4.1")
    with pytest.raises(RuntimeError, match=r"^compiled_step: torch.compile of the whole step needs torch >= 2.14, "
                                           r"found 2.4.1; use the eager step$"):
        tfa.compiled_step(None, None)


def test_compiled_step_checks_its_argument():
    net, opt = _net_opt(lambda n: tfa.optim.FAdjoint(n, lr=0.1, validate=False))
    with pytest.raises(ValueError, match=r"^compiled_step: check_steps must be an int >= 0, got -1$"):
        tfa.compiled_step(net, opt, check_steps=-1)


def _compiled_run(rule, steps=5, cnn=False, **kwargs):
    torch._dynamo.reset()
    model = (_cnn if cnn else _mlp)()
    net = tfa.FPropagation(model)
    opt = RULES[rule](net, False)
    step = tfa.compiled_step(net, opt, **kwargs)
    for x, t in _batches(steps, "cpu", torch.float64, cnn):
        step(x, t)
    return model, step


@pytest.mark.slow
@pytest.mark.skipif(_OLD_TORCH, reason="torch.compile of the whole step needs torch >= 2.14")
@pytest.mark.parametrize("rule", ["fadjoint", "fused"])
def test_compiled_step_equals_eager(rule):
    """Slow (inductor on 2 cores). The fused rule on this small MLP materialises its gradients (factors larger than
    the weights), which feed the update alone: the pattern inductor miscompiles, here avoided."""
    eager, *_ = _run(rule, "cpu", graph=False, steps=5, validate=False, scheduler=False)
    compiled, step = _compiled_run(rule)
    assert step.checked == 3
    assert _max_diff(eager, compiled) < 1e-12


@pytest.mark.slow
@pytest.mark.skipif(_OLD_TORCH, reason="torch.compile of the whole step needs torch >= 2.14")
def test_compiled_step_refuses_a_miscompiled_step_and_changes_nothing():
    """A compiled step that computes another update than the eager one (as inductor's dropped ``alpha`` did,
    pytorch/pytorch#167313; simulated here by a loss whose X*^L doubles under compilation) is refused at step 1,
    the state intact."""
    def drifting_cross_entropy(output, target, validate=True):
        loss, out_adj = tfa.losses.cross_entropy(output, target, validate=validate)
        return loss, out_adj * (2.0 if torch.compiler.is_compiling() else 1.0)

    torch._dynamo.reset()
    model = _mlp()
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1, validate=False, loss=drifting_cross_entropy)
    before = snapshot(model, opt)
    step = tfa.compiled_step(net, opt)
    x, t = _batches(1, "cpu", torch.float64)[0]
    with pytest.raises(RuntimeError, match=r"^compiled_step: torch.compile changed step 1: 0.weight differs from the "
                                           r"eager step's by .*; nothing was changed; use the eager step"):
        step(x, t)
    assert_untouched(before, model, opt)


@pytest.mark.skipif(_OLD_TORCH, reason="torch.compile of the whole step needs torch >= 2.14")
def test_a_compiled_step_that_fails_part_way_is_refused_and_changes_nothing():
    """A trace that fails after running some segments eagerly (graph breaks: the forward, a .grad) is put back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5)).double()
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9)
    step = tfa.compiled_step(net, opt)
    x, t = _batches(1, "cpu", torch.float64)[0]

    def fails_part_way(x, t):
        net(x)  # BatchNorm's running statistics move
        model[0].weight.grad = torch.ones_like(model[0].weight)
        raise torch._dynamo.exc.TorchRuntimeError("Dynamo failed to run FX node with fake tensors\nmore")

    step._compiled = fails_part_way
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"^compiled_step: torch.compile could not run step 1 \(TorchRuntimeError: "
                                           r"Dynamo failed to run FX node with fake tensors\); nothing was changed"):
        step(x, t)
    assert_untouched(before, model, opt)


@pytest.mark.slow
@pytest.mark.skipif(_OLD_TORCH, reason="torch.compile of the whole step needs torch >= 2.14")
def test_compiled_dropout_net_passes_the_check():
    """Dropout masks come from torch's generator under compiled_step, so a dropout net's checked steps agree."""
    class DropNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.drop, self.fc2 = nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 5)

        def forward(self, x):
            return self.fc2(self.drop(F.relu(self.fc1(x))))

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = tfa.FPropagation(DropNet().double())
    step = tfa.compiled_step(net, tfa.optim.FAdjoint(net, lr=0.05, momentum=0.9, validate=False))
    for x, t in _batches(3, "cpu", torch.float64):
        step(x, t)
    assert step.checked == 3

