"""Data parallel without autograd (issue 6): 2 gloo ranks × batch 32 == 1 process × batch 64."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import torch_fadjoint as tfa

STEPS, BATCH = 20, 64


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).double()


def data():
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(BATCH, 10, generator=gen, dtype=torch.float64), torch.randint(0, 4, (BATCH,), generator=gen))
            for _ in range(STEPS)]


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
    per_rank = BATCH // world
    for x, t in data():
        net(x[rank * per_rank:(rank + 1) * per_rank])
        opt.step(t[rank * per_rank:(rank + 1) * per_rank])
    return model


RULES = ["fadjoint", "equilibrium", "lfp"]


def _worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        results = {}
        for rule in RULES:  # different initial weights per rank: the broadcast at wrap time aligns them
            model = train(make_model(seed=100 + rank), rule, rank, world, dist.group.WORLD)
            results[rule] = [p.detach() for p in model.parameters()]
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_ranks_equal_one_process_with_the_whole_batch(tmp_path):
    """FAdjoint with momentum (the issue's case), the sequential equilibrium rule (per-layer wait) and LFP."""
    out_file = tmp_path / "params.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    distributed = torch.load(out_file)
    for rule in RULES:
        single = train(make_model(seed=100), rule)
        for p, q in zip(single.parameters(), distributed[rule]):
            assert (p - q).abs().max() <= 1e-12, rule
        assert (single[0].weight - make_model(100)[0].weight).abs().max() > 1e-3  # it trained


def test_process_group_needs_an_initialised_backend():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(RuntimeError, match="init_process_group"):
        tfa.FPropagation(make_model(0), process_group=object())
