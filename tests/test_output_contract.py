"""The loss starts from the recorded output (issue 21, "output post-processed outside the recorder";
docs/maths.md §7.1): an output changed by a differentiable op after ``net(x)`` returned is refused at the loss, in
one line naming the op, before anything is written; reading it for metrics, logging its loss, or changing it under
``no_grad`` trains exactly as autograd does."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_fadjoint as tfa

from . import oracles
from .models import DT, labelled, mlp
from .state import assert_untouched, snapshot

BATCH, CLASSES = 6, 4


def _chain():
    return mlp((5, 7, CLASSES), nn.Tanh, seed=0)


class _ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.hidden, self.head = nn.Linear(5, 7), nn.Linear(7, 7), nn.Linear(7, CLASSES)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h + torch.tanh(self.hidden(h))
        return self.head(h)


def _graph():
    torch.manual_seed(0)
    return _ResidualMLP().to(DT)


MODELS = {"chain": _chain, "tape": _graph}

# what a user might do to the output and expect the loss to see: each must be refused by name
CHANGES = {
    "divide": (lambda out: out / 2, "Tensor.div"),
    "log_softmax": (lambda out: F.log_softmax(out, dim=1), "log_softmax"),
    "dtype": (lambda out: out.float(), "Tensor.float"),
    "slice": (lambda out: out[:, :2], "__getitem__"),
    "clamp": (lambda out: out.clamp(-1, 1), "clamp"),
    "add_constant": (lambda out: out + torch.ones_like(out), "Tensor.add"),
    "concatenate": (lambda out: torch.cat([out, out], dim=1), "torch.cat"),
    "functional_softmax": (lambda out: torch.softmax(out, 1), "softmax"),
}

# what a user does with the output that is not the loss's input: training must stay autograd's
READS = {
    "accuracy": lambda out, t: (out.argmax(1) == t).float().mean().item(),
    "max_with_indices": lambda out, t: out.max(1),
    "topk": lambda out, t: out.topk(2, 1),
    "no_grad_scaling": lambda out, t: _under_no_grad(lambda: out / 2),
    "detached": lambda out, t: out.detach() / 2,
    "data": lambda out, t: out.data * 3,
    "logged_loss": lambda out, t: F.cross_entropy(out, t).item(),
    "logged_loss_module": lambda out, t: nn.CrossEntropyLoss(label_smoothing=0.1)(out, t),
    "per_sample_loss": lambda out, t: F.cross_entropy(out, t, reduction="none"),
    "logged_mean": lambda out, t: out.mean().item(),
    "metadata_and_repr": lambda out, t: (out.shape, out.dtype, out.device, repr(out), out.size(0)),
    "library_closed_form": lambda out, t: tfa.losses.cross_entropy(out, t),
    "constant_like": lambda out, t: torch.zeros_like(out) + out.new_ones(()),
}


def _under_no_grad(fn):
    with torch.no_grad():
        return fn()


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("entry", ["backward", "step"])
def test_an_output_changed_before_the_loss_is_refused_naming_the_op_and_nothing_is_written(kind, change, entry):
    model = MODELS[kind]()
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9)
    x, t = labelled(BATCH, 5, CLASSES, seed=1)
    transform, op = CHANGES[change]
    before = snapshot(model, opt)
    out = net(x)
    transform(out)
    with pytest.raises(RuntimeError, match=rf"^FPropagation: the output of net\(x\) went through \S*{op}\S* after "
                                           r"net\(x\) returned, which the loss would not see") as error:
        if entry == "backward":
            net.backward(F.cross_entropy, t)
        else:
            opt.step(target=t)
    assert "\n" not in str(error.value)
    assert_untouched(before, model, opt)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("read", READS)
def test_reading_the_output_for_metrics_or_logging_trains_as_autograd(kind, read):
    model = MODELS[kind]()
    x, t = labelled(BATCH, 5, CLASSES, seed=1)
    want = oracles.autograd_grads(lambda: model(x), dict(model.named_parameters()), "cross_entropy", t)
    net = tfa.FPropagation(model)
    out = net(x)
    assert isinstance(out, torch.Tensor) and torch.equal(out, model(x).detach())
    READS[read](out, t)
    net.backward(F.cross_entropy, t)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("rule", ["lfp", "consequentialism", "equilibrium"])
def test_every_rule_that_computes_the_loss_refuses_a_changed_output(rule):
    model = _graph()
    net = tfa.FPropagation(model)
    opt = {"lfp": lambda: tfa.optim.LFP(net, lr=0.1),
           "consequentialism": lambda: tfa.optim.Consequentialism(net, lr=0.1),
           "equilibrium": lambda: tfa.optim.EquilibriumFAdjoint(net, lr=0.1)}[rule]()
    x, t = labelled(BATCH, 5, CLASSES, seed=1)
    before = snapshot(model, opt)
    out = net(x)
    _ = out * 2
    with pytest.raises(RuntimeError, match=r"went through Tensor\.mul after net\(x\) returned"):
        opt.step(target=t)
    assert_untouched(before, model, opt)


def test_the_note_is_the_last_forwards_only_and_an_explicit_adjoint_is_the_users_own():
    model = _graph()
    net = tfa.FPropagation(model)
    x, t = labelled(BATCH, 5, CLASSES, seed=1)
    _ = net(x) / 2
    out = net(x)  # a new forward: nothing was done to this output
    loss = net.backward(F.cross_entropy, t)
    assert torch.equal(loss, F.cross_entropy(out.detach(), t))
    # net.adjoint takes X*^L = ∂J/∂X^L from the user, as out.backward(gradient) would: no loss is computed here
    out = net(x)
    _, out_adj = tfa.losses.cross_entropy(out * 1.0, t)
    model.zero_grad()
    net.adjoint(out_adj)
    assert all(p.grad is not None for p in model.parameters())


def test_an_output_fed_back_as_an_input_is_recorded_as_a_plain_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).to(DT)
    x = torch.randn(3, 4, dtype=DT)
    net = tfa.FPropagation(model)
    h = net(x)
    out = net(h)
    torch.testing.assert_close(out, model(model(x)).detach(), rtol=0, atol=0)
    target = torch.tensor([0, 1, 2])
    want = oracles.autograd_grads(lambda: model(model(x).detach()), dict(model.named_parameters()),
                                  "cross_entropy", target)
    net.backward(F.cross_entropy, target)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=0, atol=1e-12, msg=name)


def test_the_output_modified_in_place_is_refused_by_its_version_as_before():
    net = tfa.FPropagation(_chain())
    x, t = labelled(BATCH, 5, CLASSES, seed=1)
    out = net(x)
    with torch.no_grad():
        out.mul_(2)  # even under no_grad: the recorded values changed
    with pytest.raises(RuntimeError, match="modified in place"):
        net.backward(F.cross_entropy, t)
