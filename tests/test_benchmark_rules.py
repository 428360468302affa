"""benchmarks.rules: the registry builds each library rule as the tests do (tests/trainers.py), step for step."""
import pytest
import torch
from torch import nn

from benchmarks.rules import RULES, build_trainer

from . import trainers
from .models import labelled_batches, mlp
from .state import assert_untouched, snapshot

SETTINGS = {  # name → (settings, steps): two steps where the first leaves momentum state for the second
    "misuse": (dict(lr=0.1, momentum=0.9, loss="cross_entropy"), 2),
    "plain-unchecked-unclipped": (dict(lr=1e-3, momentum=0.0, validate=False, clip_norm=0), 1),
}


# benchmark rules the misuse catalogue does not run: autograd or a torch optimizer's own step, and the
# equilibrium rule with the reference code's σ'(D) quirk (docs/maths.md §2.4) or the Euler relaxation
# the unchecked variants are "fadjoint" / "fadjoint_fused" with validate=False (the speed table's opt-outs): nothing
# to refuse, so not in the misuse catalogue
NOT_IN_THE_CATALOGUE = {"sgd", "autograd", "fadjoint_dropin", "equilibrium_ref", "equilibrium_euler",
                        "fadjoint_unchecked", "fadjoint_fused_unchecked"}


def test_every_library_rule_of_the_benchmarks_is_in_the_tests_registry():
    """A rule added to the benchmarks' registry must be added to tests/trainers.py too (or be listed above),
    else it escapes the misuse catalogue."""
    assert set(RULES) - NOT_IN_THE_CATALOGUE <= set(trainers.RULES)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("rule", sorted(trainers.RULES))
def test_the_tests_trainers_are_the_benchmarks(rule, setting):
    """Same optimizer class, recorder setting and hyper-parameters; after the same steps from the same weights
    the same parameters, .grad and optimizer state, bit for bit."""
    cfg, steps = SETTINGS[setting]
    ours = trainers.build(rule, mlp((6, 5, 3), nn.Tanh, seed=0), **cfg)
    name, bcfg = ("equilibrium", {**cfg, "sequential": False}) if rule == "equilibrium_parallel" else (rule, cfg)
    theirs = build_trainer(name, mlp((6, 5, 3), nn.Tanh, seed=0), bcfg)
    assert type(ours.opt) is type(theirs.opt)
    assert ours.net.keep_pre_activations == theirs.net.keep_pre_activations
    assert (ours.opt.validate, ours.opt.loss) == (theirs.opt.validate, theirs.opt.loss)
    for x, t in labelled_batches(steps, 4, 6, 3, seed=1):
        ours.step(x, t)
        theirs.step(x, t)
    assert_untouched(snapshot(theirs.model, theirs.opt), ours.model, ours.opt)


def test_benchmark_rule_is_the_fused_optimizer():
    trainer = build_trainer("fadjoint_fused", nn.Sequential(nn.Linear(3, 2)), dict(lr=0.1))
    assert trainer.opt.fuse_update is True
    assert torch.is_tensor(trainer.step(torch.randn(4, 3), torch.tensor([0, 1, 1, 0])))
