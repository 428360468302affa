"""Aliases on the tape: writes through views, rebinding and memory the tape does not own (issue 21, the third red
team of the tape: each case below trained silently wrong, left a refused forward's state changed, or refused a read
that autograd accepts, before).

The rule (docs/graphs.md, "In-place writes and views"): a value may be written in place when its memory is a
value's; the aliases it shares memory with become stale and are refused when read, except for their metadata. A
write into memory the tape holds as a constant (a view of ``torch.zeros``, of a buffer or of a frozen parameter), a
value changed by a call the tape does not see (``Tensor.set_``), a view made under ``no_grad`` written with grad
enabled, and a parameter given other memory between the forward and the sweep are refused, with nothing changed.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_fadjoint as tfa

from .state import assert_untouched, snapshot

DT = torch.float64


class _Writes(nn.Module):
    """l1 → (what ``how`` does) → l2; a frozen weight, a buffer, BatchNorm and two small buffers to write."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.l1, self.l2 = how, nn.Linear(6, 8), nn.Linear(8, 5)
        self.frozen = nn.Parameter(torch.randn(8, 8) * 0.3, requires_grad=False)
        self.register_buffer("buf", torch.zeros(4, 8))
        self.register_buffer("b1", torch.zeros(3))
        self.register_buffer("b2", torch.zeros(3))
        self.bn = nn.BatchNorm1d(8)

    def to(self, *args, **kwargs):  # BatchNorm's statistics as two views of one flat buffer, in the model's dtype
        model = super().to(*args, **kwargs)
        if self.how == "bn-statistics-in-one-storage":
            flat = torch.cat([torch.zeros(8), torch.ones(8)]).to(self.l1.weight.dtype)
            self.bn.running_mean, self.bn.running_var = flat[:8], flat[8:]
        return model

    def forward(self, x):
        how, h = self.how, self.l1(x)
        if how == "frozen-weight-row":
            self.frozen[0].add_(h[0])
            return self.l2(F.linear(h, self.frozen))
        if how == "frozen-weight-view-as":
            self.frozen[:4].view_as(h).mul_(h)
            return self.l2(F.linear(h, self.frozen))
        if how.startswith("constant-"):
            z = torch.zeros(4, 8, dtype=h.dtype)
            getattr(z, how.split("-")[1] + "_as")(h).add_(h)
            return self.l2(z)
        if how == "buffer-view-as":
            self.buf.view_as(h).add_(h)
            return self.l2(self.buf + h)
        if how == "set_":
            h.set_(self.l1(x * 2) * 3)
            return self.l2(h)
        if how == "set_-under-no_grad":  # autograd accepts it (a constant write), but no mode sees set_ at all
            h = h + 0.0
            with torch.no_grad():
                h.set_(h * 2)
            return self.l2(torch.tanh(h))
        if how == "detach-view-as-written-with-a-value":  # autograd sends g's gradient through d; the tape would not
            d = h.detach()
            d.view_as(h).add_(torch.tanh(self.l1(2 * x)))
            return self.l2(d * 1)
        if how == "no_grad-view-written-with-grad":
            h = h + 0.0
            with torch.no_grad():
                a = h[:, :4]
            a.mul_(2)
            return self.l2(h)
        # the forward writes a buffer, then is refused by an op outside the table
        if how == "bn-statistics-in-one-storage":
            h = self.bn(h)
        elif how == "foreach-add_":
            torch._foreach_add_([self.b1, self.b2], 1.0)
        elif how == "aten-overload-add_":
            torch.ops.aten.add_.Tensor(self.b1, torch.ones(3, dtype=self.b1.dtype))
        elif how == "native_batch_norm":
            return torch.native_batch_norm(h, self.bn.weight, self.bn.bias, self.bn.running_mean, self.bn.running_var,
                                           True, 0.1, 1e-5)[0]
        elif how == "numpy":
            self.b1.numpy()[0] = 7.0
        return torch.sort(h, 1).values


def _batch(n: int = 4):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=gen, dtype=DT), torch.randint(0, 5, (n,), generator=gen)


@pytest.mark.parametrize("how, match", [
    ("frozen-weight-row", r"^Tensor\.add_ in .*: writes a value in place into the memory of a tensor the tape holds "
                          r"as a constant"),
    ("frozen-weight-view-as", r"^Tensor\.mul_ in .*: writes a value in place into the memory of a tensor"),
    ("constant-view", r"^Tensor\.add_ in .*: writes a value in place into the memory of a tensor"),
    ("constant-reshape", r"^Tensor\.add_ in .*: writes a value in place into the memory of a tensor"),
    ("constant-expand", r"^Tensor\.add_ in .*: writes a value in place into the memory of a tensor"),
    ("buffer-view-as", r"^Tensor\.add_ in .*: writes a value in place into the memory of a tensor"),
    ("set_", r"^torch\.linear in l2 \(Linear\): reads a value changed in place by a call the tape did not see "
             r"\(Tensor\.set_"),
    ("set_-under-no_grad", r"^torch\.tanh in .*: reads a value changed in place by a call the tape did not see"),
    ("detach-view-as-written-with-a-value", r"^Tensor\.add_ in .*: writes a value in place into the memory of a "
                                            r"tensor the tape holds as a constant .*detach\(\) alias"),
    ("no_grad-view-written-with-grad", r"^Tensor\.mul_ in .*: writes in place, with grad enabled, through a view of a "
                                       r"value made under no_grad \(autograd refuses it too\)"),
])
def test_a_write_the_tape_cannot_follow_is_refused_with_nothing_changed(how, match):
    """Before: each trained silently wrong (a gradient missing a path through the written memory, or following the
    value's old history), the frozen weight and the buffer written too."""
    torch.manual_seed(0)
    model = _Writes(how).to(DT)
    net = tfa.FPropagation(model, graph=True)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        net(_batch()[0])
    assert_untouched(before, model)


@pytest.mark.parametrize("how", ["bn-statistics-in-one-storage", "foreach-add_", "aten-overload-add_",
                                 "native_batch_norm", "numpy"])
def test_a_refused_forward_puts_back_what_it_wrote_through_any_call(how):
    """Before: statistics sharing one storage (one put back), a list of buffers (``_foreach_add_``), an aten overload
    (``add_.Tensor``), ``torch.native_batch_norm`` (refused after it ran) and a write through ``.numpy()`` stayed."""
    torch.manual_seed(0)
    model = _Writes(how).to(DT)
    net = tfa.FPropagation(model, graph=True)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"not in the table of ops"):
        net(_batch()[0])
    assert_untouched(before, model)


class _Detached(nn.Module):
    """Writes autograd accepts, through aliases that are not values: exact as autograd has them."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.l1, self.l2 = how, nn.Linear(6, 8), nn.Linear(8, 5)

    def forward(self, x):
        h = self.l1(x) + 0.0
        if self.how == "detach":
            h.detach().mul_(2)
        elif self.how == "view-of-a-detach":
            h.detach()[:, :2].zero_()
        elif self.how == "view-of-numpy":
            torch.from_numpy(h.detach().numpy())[:, :2].mul_(2)
        elif self.how == "no_grad":
            with torch.no_grad():
                h[:, :4].mul_(2)
        elif self.how == "metadata-of-a-stale-base":
            x = x + 0.0
            a = x[:, :3]
            a.mul_(2)
            h = self.l1(torch.cat([a, a], 1))
            return self.l2(h).view(x.size(0), x.shape[1] - 1)
        return self.l2(torch.tanh(h))


@pytest.mark.parametrize("how", ["detach", "view-of-a-detach", "view-of-numpy", "no_grad", "metadata-of-a-stale-base"])
def test_writes_through_aliases_autograd_accepts_stay_exact(how):
    """A write through ``detach()`` or under ``no_grad`` is a constant write (autograd reads the new entries and
    sends no gradient through the write); the shape of a stale base may be read (it was refused)."""
    torch.manual_seed(0)
    model = _Detached(how).to(DT)
    x, t = _batch()
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(x.clone()), t).backward()
    net = tfa.FPropagation(model, graph=True)
    net(x.clone())
    net.backward(F.cross_entropy, t)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert q.grad is not None
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("rebind", ["data", "set_", "vector_to_parameters"])
@pytest.mark.parametrize("through", ["backward", "step"])
@pytest.mark.parametrize("graph", [True, False], ids=["tape", "chain"])
def test_a_parameter_given_other_memory_after_the_forward_is_refused(rebind, through, graph):
    """``p.data = …`` between ``net(x)`` and the sweep: autograd reads the new tensor, the records hold the old one;
    refused, nothing changed (before: the old weight's gradient, silently, on the tape and on the chain)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).to(DT)
    net = tfa.FPropagation(model, graph=graph)
    opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9)
    x, t = _batch()
    net(x)
    opt.step(target=t)  # a momentum buffer to keep
    net(x)
    weight = model[2].weight
    with torch.no_grad():
        if rebind == "data":
            weight.data = weight.detach() * 2
        elif rebind == "set_":
            weight.set_(weight.detach() * 2)
        else:  # it rebinds every parameter (param.data = a view of the vector): the first one is named
            vector = torch.nn.utils.parameters_to_vector(model.parameters()) * 2
            torch.nn.utils.vector_to_parameters(vector, model.parameters())
    before = snapshot(model, opt)
    name = "0.weight" if rebind == "vector_to_parameters" else "2.weight"
    match = (rf"the parameter {name} was given other memory after the forward \(p\.data = …, vector_to_parameters\)"
             if rebind != "set_" else r"modified in place (later|after the forward)")  # set_ bumps the version too
    with pytest.raises(RuntimeError, match=match):
        if through == "backward":
            net.backward(F.cross_entropy, t)
        else:
            opt.step(target=t)
    assert_untouched(before, model, opt)
