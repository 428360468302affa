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
        if how in ("chunk", "split-relu-in-place", "unbind"):  # one of several views written, only it read later
            if how == "chunk":
                a, _ = h.chunk(2, 1)
                a.mul_(2)
            elif how == "split-relu-in-place":
                a, _ = h.split(4, 1)
                F.relu(a, inplace=True)
            else:
                a = h.unbind(1)[0].unsqueeze(1)
                a.mul_(3)
            return self.l2(torch.cat([a, a], 1) if a.shape[1] == 4 else a.expand(-1, 8).contiguous())
        if how == "multiplied-by-itself":
            h = h + 0.0
            h.mul_(h)
            return self.l2(h)
        if how == "resize_-under-no_grad":
            h = h + 0.0
            with torch.no_grad():
                h.resize_(h.shape[0], 8)
            return self.l2(h)
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
    ("chunk", r"^Tensor\.mul_ in .*: writes in place into one of several views an op returned \(chunk, split, "
              r"unbind; autograd refuses it too\)"),
    ("split-relu-in-place", r"^F\.relu in .*: writes in place into one of several views an op returned"),
    ("unbind", r"^Tensor\.mul_ in .*: writes in place into one of several views an op returned"),
    ("multiplied-by-itself", r"^Tensor\.mul_ in .*: writes a value in place with an operand sharing its memory "
                             r"\(h\.mul_\(h\); autograd saves that operand and refuses it too\)"),
    ("resize_-under-no_grad", r"^Tensor\.resize_ in .*: resizes a value that needs grad \(autograd refuses it too\)"),
    ("detach-view-as-written-with-a-value", r"^Tensor\.add_ in .*: writes a value in place into the memory of a "
                                            r"tensor the tape holds as a constant .*detach\(\) alias"),
    ("no_grad-view-written-with-grad", r"^Tensor\.mul_ in .*: writes in place, with grad enabled, through a view of a "
                                       r"value made under no_grad \(autograd refuses it too\)"),
])
def test_a_write_the_tape_cannot_follow_is_refused_with_nothing_changed(how, match):
    """Before: each trained silently wrong (a gradient missing a path through the written memory, or following the
    value's old history), the frozen weight and the buffer written too; or trained where autograd refuses (one of
    several views written, a value resized)."""
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


class _TwoLayers(nn.Module):
    """l1 (6 → 8), what the subclass's forward does for ``how``, l2 (8 → ``out``)."""

    def __init__(self, how: str, out: int = 5):
        super().__init__()
        self.how, self.l1, self.l2 = how, nn.Linear(6, 8), nn.Linear(8, out)


class _Detached(_TwoLayers):
    """Writes autograd accepts, through aliases that are not values: exact as autograd has them."""

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


class _SavedThenWritten(_TwoLayers):
    """l1 → op → a write into what autograd saves for the op (its input or its output) → l2."""

    def __init__(self, how: str):
        super().__init__(how, out=8)

    def forward(self, x):
        a = self.l1(x) + 0.0
        how = self.how
        if how == "hardtanh-input":
            y = F.hardtanh(a, -0.5, 0.5)
            a.mul_(2)
        elif how == "hardtanh-output":  # autograd saves the input: writing the output is fine
            y = F.relu6(a)
            y.add_(1)
        elif how == "leaky_relu-in-place-output":
            y = F.leaky_relu(a, 0.1, inplace=True)
            y.add_(1)
        elif how == "elu-in-place-output":
            y = F.elu(a, inplace=True)
            y.mul_(2)
        elif how == "leaky_relu-in-place-negative-slope":
            y = F.leaky_relu(a, -0.1, inplace=True)
        elif how == "avg_pool1d-input":
            y = F.avg_pool1d(a[:, None], 1)[:, 0]
            a.mul_(2)
        elif how == "adaptive_avg_pool2d-input":
            y = F.adaptive_avg_pool2d(a.view(-1, 2, 2, 2), 2).reshape(-1, 8)
            a.mul_(2)
        else:  # attention's output, which autograd saves
            q = a.view(-1, 2, 4)
            y = F.scaled_dot_product_attention(q, q, q)
            y.mul_(2)
            y = y.reshape(-1, 8)
        return self.l2(y + a)


@pytest.mark.parametrize("how, match", [
    ("hardtanh-input", r"a tensor that F\.hardtanh in .* saved for the sweep was modified in place later"),
    ("leaky_relu-in-place-output", r"a tensor that F\.leaky_relu in .* saved for the sweep was modified in place"),
    ("elu-in-place-output", r"a tensor that F\.elu in .* saved for the sweep was modified in place later"),
    ("leaky_relu-in-place-negative-slope", r"^F\.leaky_relu: in place with negative_slope=-0\.1 \(autograd refuses "
                                           r"its backward too"),
    ("avg_pool1d-input", r"a tensor that F\.avg_pool1d in .* read was modified in place later \(autograd, which saves "
                         r"it, refuses this too\)"),
    ("adaptive_avg_pool2d-input", r"a tensor that F\.adaptive_avg_pool2d in .* read was modified in place later"),
    ("attention-output", r"a tensor that F\.scaled_dot_product_attention in .* read was modified in place later"),
])
def test_a_write_into_what_autograd_saves_is_refused_as_autograd_refuses_it(how, match):
    """The record keeps what the op's backward needs, autograd what its formula reads: where they differ, autograd's
    refusal is the tape's too (before: these trained; autograd raises 'modified by an inplace operation')."""
    torch.manual_seed(0)
    model = _SavedThenWritten(how).to(DT)
    x, t = _batch()
    with pytest.raises(RuntimeError):
        F.cross_entropy(copy.deepcopy(model)(x), t).backward()
    net = tfa.FPropagation(model, graph=True)
    before = snapshot(model)
    with pytest.raises((RuntimeError, ValueError), match=match):
        net(x)
        net.backward(F.cross_entropy, t)
    assert_untouched(before, model)


def test_an_activations_output_written_where_autograd_saves_the_input_stays_exact():
    """relu6 / hardtanh out of place: autograd saves the input, so writing the output later is fine (it was
    refused: the record was the output)."""
    torch.manual_seed(0)
    model = _SavedThenWritten("hardtanh-output").to(DT)
    x, t = _batch()
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(x), t).backward()
    net = tfa.FPropagation(model, graph=True)
    net(x)
    net.backward(F.cross_entropy, t)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12, msg=name)


class _Carries(nn.Module):
    """A state carried from one forward to the next in an attribute: detached (truncated backpropagation, which
    autograd computes too) or not (autograd refuses the second backward through the first forward's graph)."""

    def __init__(self, detached: bool):
        super().__init__()
        self.detached, self.l1, self.l2 = detached, nn.Linear(6, 8), nn.Linear(8, 5)
        self.state = None

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        out = self.l2(h if self.state is None else h + self.state)
        self.state = h.detach() if self.detached else h
        return out


@pytest.mark.parametrize("detached", [True, False], ids=["detached", "carried-with-its-graph"])
def test_a_state_carried_across_forwards_is_exact_detached_and_refused_otherwise(detached):
    torch.manual_seed(0)
    model = _Carries(detached).to(DT)
    reference = copy.deepcopy(model)
    net = tfa.FPropagation(model, graph=True)
    x, t = _batch()
    for step in range(3):
        if not detached and step == 1:
            with pytest.raises(RuntimeError, match="backward through the graph a second time"):
                F.cross_entropy(reference(x), t).backward()
            before = snapshot(model)
            with pytest.raises(ValueError, match=r"^Tensor\.add in .*: reads a tensor an earlier forward computed from "
                                                 r"the parameters \(kept in an attribute\?\)"):
                net(x)
            assert_untouched(before, model)
            return
        reference.zero_grad()
        F.cross_entropy(reference(x), t).backward()
        model.zero_grad()
        net(x)
        net.backward(F.cross_entropy, t)
        for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12, msg=name)
