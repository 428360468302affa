"""Data parallel without autograd (issue 6): 2 gloo ranks × batch 32 == 1 process × batch 64.

One ``torch.multiprocessing`` spawn (2 CPU processes, gloo) runs every distributed scenario once per
module (starting processes is the slow part); the tests then compare what the ranks saved with
single-process oracles. The order of the per-layer all-reduces is checked without processes, with a
recording stand-in for the averager.
"""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import torch_fadjoint as tfa
from torch_fadjoint.sweep import Rule, backward_sweep

from .models import labelled_batches, mlp
from .state import changes, snapshot

STEPS, BATCH, WORLD = 20, 64, 2
RULES = ("fadjoint", "equilibrium", "lfp")

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def make_model(seed):
    return mlp((10, 16, 12, 4), [nn.Tanh, nn.ReLU], seed=seed)


def data():
    return labelled_batches(STEPS, BATCH, 10, 4, seed=7)


def shard(tensor, rank, world):
    per_rank = len(tensor) // world
    return tensor[rank * per_rank:(rank + 1) * per_rank]


def make_opt(rule, net):
    if rule == "fadjoint":
        return tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9)
    if rule == "equilibrium":
        # sequential (per-layer wait). Exact relaxation: with finite K the start term f·X^k is not divided
        # by the batch size like the drive is, so the rule itself depends on how the batch is split.
        return tfa.optim.EquilibriumFAdjoint(net, lr=0.1, momentum=0.9, loss="cross_entropy", steps=None)
    return tfa.optim.LFP(net, lr=0.1, momentum=0.9)


def train(model, rule, rank=0, world=1, group=None):
    net = tfa.FPropagation(model, process_group=group)
    opt = make_opt(rule, net)
    for x, t in data():
        net(shard(x, rank, world))
        opt.step(target=shard(t, rank, world))
    return model


class Residual(nn.Module):
    """Not a plain Sequential: FPropagation records it on the tape."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(10, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = h + torch.relu(self.b(h))
        return self.head(h)


def make_graph(seed):
    torch.manual_seed(seed)
    return Residual().double()


def train_graph(model, rank=0, world=1, group=None):
    net = tfa.FPropagation(model, process_group=group)
    assert net.graph
    opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9)
    for x, t in data():
        net(shard(x, rank, world).double())
        opt.step(target=shard(t, rank, world))
    return model


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # a missed collective fails, never hangs
    torch.set_num_threads(1)
    group, out = dist.group.WORLD, {}
    try:
        for rule in RULES:  # different inits on each rank: the broadcast at wrap time aligns them
            out[rule] = params(train(make_model(seed=100 + rank), rule, rank, world, group))

        # a graph (a residual block on the tape): the same average, once per sweep
        out["graph"] = params(train_graph(make_graph(seed=100 + rank), rank, world, group))

        # net.adjoint + a torch optimizer: .grad is already the average when adjoint returns
        x, t = data()[0]
        model = make_model(seed=100 + rank)
        net = tfa.FPropagation(model, process_group=group)
        _, out_adj = tfa.losses.cross_entropy(net(shard(x, rank, world)), shard(t, rank, world))
        net.adjoint(out_adj)
        out["adjoint_grads"] = [p.grad.clone() for p in model.parameters()]

        # a rule whose feedback is not a batch mean: .grad is still the average of the ranks' feedback
        model = make_model(seed=100)
        net = tfa.FPropagation(model, process_group=group)
        _, out_adj = tfa.losses.cross_entropy(net(shard(x, rank, world)), shard(t, rank, world))
        grads = tfa.optim.consequentialism_grads(net, out_adj)
        out["consequentialism_grads"] = [grads[p] for p in model.parameters()]

        # NaN on rank 1 only: every rank refuses the step (the check is OR-ed over the ranks), nothing changes
        model = make_model(seed=100)
        net = tfa.FPropagation(model, process_group=group)
        opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9)
        net(shard(x, rank, world))
        opt.step(target=shard(t, rank, world))
        before = snapshot(model, opt)
        x_bad = shard(x, rank, world).clone()
        if rank == 1:
            x_bad[3, 2] = float("nan")
        net(x_bad)
        try:
            opt.step(target=shard(t, rank, world))
            out["nan_error"] = None
        except RuntimeError as exc:
            out["nan_error"] = str(exc)
        out["nan_changes"] = changes(before, model, opt)  # parameters, .grad, optimizer state: [] when untouched
        opt.step(target=shard(t, rank, world), closure=lambda: net(shard(x, rank, world)))  # the group still works
        out["after_nan"] = params(model)
    finally:
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 ranks saved (one spawn for the whole module)."""
    out_dir = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(WORLD, str(out_dir / "init"), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def assert_close(got, want, tol=1e-12):
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and (g - w).abs().max() <= tol


@pytest.mark.parametrize("rule", RULES)
def test_two_ranks_equal_one_process_with_the_whole_batch(ranks, rule):
    single = params(train(make_model(seed=100), rule))
    assert max((p - q).abs().max() for p, q in zip(single, params(make_model(100)))) > 1e-3  # it trained
    for rank in ranks:
        assert_close(rank[rule], single)


def test_a_graph_on_two_ranks_equals_one_process_with_the_whole_batch(ranks):
    single = params(train_graph(make_graph(seed=100)))
    assert max((p - q).abs().max() for p, q in zip(single, params(make_graph(100)))) > 1e-3  # it trained
    for rank in ranks:
        assert_close(rank["graph"], single)


def test_adjoint_returns_with_averaged_grads(ranks):
    x, t = data()[0]
    model = make_model(seed=100)  # rank 0's init, broadcast to rank 1
    net = tfa.FPropagation(model)
    _, out_adj = tfa.losses.cross_entropy(net(x), t)  # the whole batch: mean over 64
    net.adjoint(out_adj)
    for rank in ranks:
        assert_close(rank["adjoint_grads"], [p.grad for p in model.parameters()])


def test_consequentialism_grads_are_the_mean_of_the_ranks_directions(ranks):
    """Consequentialism normalises per rank (K is B×B of the rank's batch): not the global-batch rule,
    but .grad must be exactly the mean of what each rank computes alone."""
    x, t = data()[0]
    per_rank = []
    for r in range(WORLD):
        model = make_model(seed=100)
        net = tfa.FPropagation(model)
        _, out_adj = tfa.losses.cross_entropy(net(shard(x, r, WORLD)), shard(t, r, WORLD))
        grads = tfa.optim.consequentialism_grads(net, out_adj)
        per_rank.append([grads[p] for p in model.parameters()])
    mean = [(a + b) / 2 for a, b in zip(*per_rank)]
    assert max((a - b).abs().max() for a, b in zip(*per_rank)) > 1e-3  # the ranks do differ
    for rank in ranks:
        assert_close(rank["consequentialism_grads"], mean)


def test_nan_on_one_rank_makes_every_rank_refuse_with_nothing_changed(ranks):
    for rank in ranks:
        assert rank["nan_error"] is not None and "non-finite values in X^L" in rank["nan_error"]
        assert rank["nan_changes"] == []
    assert_close(ranks[0]["after_nan"], ranks[1]["after_nan"], tol=0)


# -- the order of the all-reduces, without processes --------------------------------------------------
class RecordingAverager:
    """Stands in for GradientAverager: records launches and waits, leaves values as they are."""

    def __init__(self, events):
        self.events = events

    def launch(self, tensors):
        self.events.append(("launch", len(tensors)))

    def wait(self):
        self.events.append(("wait",))

    def all_ranks(self, flags):
        return flags


class RecordingRule(Rule):
    def __init__(self, events):
        self.events = events

    def param_feedback(self, layer, y_adj):
        self.events.append(("feedback", layer.k))
        return super().param_feedback(layer, y_adj)


def recorded(model):
    net = tfa.FPropagation(model)
    x = torch.randn(5, 10, dtype=torch.float64)
    net(x)
    return net, torch.randn(5, 4, dtype=torch.float64)


def test_each_layer_is_launched_as_soon_as_its_gradients_exist_and_waited_once():
    """Layer L first; layer k's all-reduce starts before layer k−1's feedback is computed (overlap);
    one wait, after the last layer, before anything reads the gradients."""
    events = []
    net, out_adj = recorded(make_model(0))
    backward_sweep(net.layers, out_adj, RecordingRule(events), lambda *a: events.append(("on_layer",)),
                   reducer=RecordingAverager(events))
    assert events == [("feedback", 3), ("launch", 2), ("on_layer",), ("feedback", 2), ("launch", 2), ("on_layer",),
                      ("feedback", 1), ("launch", 2), ("on_layer",), ("wait",)]


def test_wait_each_completes_a_layer_before_its_update():
    events = []
    net, out_adj = recorded(make_model(0))
    backward_sweep(net.layers, out_adj, RecordingRule(events), lambda *a: events.append(("on_layer",)),
                   reducer=RecordingAverager(events), wait_each=True)
    assert events[:4] == [("feedback", 3), ("launch", 2), ("wait",), ("on_layer",)]


@pytest.mark.parametrize("call", [
    lambda net, out_adj: net.adjoint(out_adj),
    lambda net, out_adj: tfa.optim.FAdjoint(net, lr=0.1).step(out_adj=out_adj),
    lambda net, out_adj: tfa.optim.EquilibriumFAdjoint(net, lr=0.1).step(out_adj=out_adj),
    lambda net, out_adj: tfa.optim.Consequentialism(net, lr=0.1).step(out_adj=out_adj),
    lambda net, out_adj: tfa.optim.LFP(net, lr=0.1).step(out_adj=out_adj),
], ids=["adjoint", "fadjoint", "equilibrium-sequential", "consequentialism", "lfp"])
def test_every_rule_averages_every_layer_through_the_recorder(call):
    """Every path that writes .grad launches each layer's all-reduce and waits before returning."""
    events = []
    model = make_model(0)
    net = tfa.FPropagation(model, keep_pre_activations=True)
    net.reducer = RecordingAverager(events)
    net(torch.randn(5, 10, dtype=torch.float64))
    call(net, torch.randn(5, 4, dtype=torch.float64) / 5)
    assert [e for e in events if e[0] == "launch"] == [("launch", 2)] * 3
    assert events[-1] == ("wait",)


def test_process_group_needs_an_initialised_backend():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(RuntimeError, match="init_process_group"):
        tfa.FPropagation(make_model(0), process_group=object())
