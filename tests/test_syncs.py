"""``validate=False`` keeps forward + step free of host synchronisations (CUDA graphs, torch.compile; issue 16).

A ``TorchDispatchMode`` counts the ops that read a device value back to the host (``_local_scalar_dense``:
``.item()``, ``bool(t)``, ``int(t)``; ``is_nonzero``) over the recorder's forward and one optimizer step, on
CPU, where the count is the same as it would be on CUDA. ``validate=True`` makes its one documented sync.
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


def test_validate_true_makes_its_documented_syncs():
    """The counter sees syncs where there are some (so the zero above is a measurement, not a blind spot)."""
    assert _count("fadjoint", True, nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))) >= 1
