"""The tape (issue 21; docs/maths.md §7.1): FPropagation(model, graph=True) records the user's whole graph and the
F-adjoint sweeps back over it, exact against autograd (float64), or the forward / sweep is refused in one line.

Gradients are compared per parameter relative to the larger of its own largest entry and 1e-8 of the model's
largest gradient (§7: a conv bias before a train-mode BatchNorm has an analytically zero gradient, and both sides
return rounding noise there).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_fadjoint as tfa

from . import oracles
from .graphs import AttentionBlock, DenseGate, Residual, TinyLM

DT = torch.float64


def _compare(model: nn.Module, x, target, *, loss=F.cross_entropy, tol=1e-10):
    """F-adjoint on the tape vs autograd from the same weights and buffers; returns the worst relative error."""
    reference = copy.deepcopy(model)
    want = oracles.autograd_grads(lambda: reference(x), dict(reference.named_parameters()), "cross_entropy", target) \
        if loss is F.cross_entropy else None
    net = tfa.FPropagation(model, graph=True)
    out = net(x)
    assert not out.requires_grad
    net.backward(loss, target)
    got = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    scale = max(g.abs().max().item() for g in want.values())
    assert scale > 1e-6, "degenerate problem: reference gradient ~0"
    worst = max(((got[n] - g).abs().max() / max(g.abs().max().item(), 1e-8 * scale)).item() for n, g in want.items())
    assert worst <= tol, worst
    for (name, b), (_, b_ref) in zip(model.named_buffers(), reference.named_buffers()):
        assert torch.equal(b, b_ref), f"buffer {name} differs from autograd's run"
    return worst


# -- hand-made graphs: every junction kind --------------------------------------------------------------------
_Residual, _DenseGate, _Attention, _TinyLM = Residual, DenseGate, AttentionBlock, TinyLM


@pytest.mark.parametrize("make, shape", [
    (_Residual, (3, 3, 8, 8)),
    (_DenseGate, (5, 6)),
    (_Attention, (3, 5, 3)),
], ids=["residual-bn-inplace", "dense-gate-split", "vit-block"])
def test_hand_made_graphs_equal_autograd(make, shape):
    torch.manual_seed(0)
    model = make().to(DT).train()
    x = torch.randn(*shape, dtype=DT)
    target = torch.randint(0, model(x).shape[-1], (shape[0],))
    _compare(model, x, target)


def test_torchs_own_transformer_layer_equals_autograd():
    """nn.TransformerEncoderLayer (nn.MultiheadAttention: F.multi_head_attention_forward's own ops are recorded)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                          nn.Flatten(), nn.Linear(40, 4)).to(DT)
    x = torch.randn(3, 5, 3, dtype=DT)
    _compare(model, x, torch.tensor([0, 1, 3]))


def test_a_tied_language_model_equals_autograd():
    torch.manual_seed(0)
    model = _TinyLM().to(DT)
    ids = torch.randint(0, 11, (3, 6))
    target = torch.randint(0, 11, (18,))
    _compare(model, ids, target)


def test_fadjoint_steps_on_a_residual_net_equal_autograd_and_sgd():
    """Three tfa.optim.FAdjoint steps on the graph = three autograd + torch.optim.SGD steps (BatchNorm statistics
    included)."""
    torch.manual_seed(0)
    model = _Residual().to(DT)
    reference = copy.deepcopy(model)
    x, t = torch.randn(4, 3, 8, 8, dtype=DT), torch.tensor([0, 1, 2, 3])
    net = tfa.FPropagation(model, graph=True)
    opt = tfa.optim.FAdjoint(net, lr=0.05)
    for _ in range(3):
        net(x)
        opt.step(target=t)
    oracles.autograd_sgd_steps(reference, nn.CrossEntropyLoss(), [(x, t)] * 3, lr=0.05)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    for b, c in zip(model.buffers(), reference.buffers()):
        assert torch.equal(b, c)


# -- refusals ------------------------------------------------------------------------------------------------
class _Sorts(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x).sort(dim=1).values


def test_an_op_outside_the_table_is_refused_naming_it_and_where():
    net = tfa.FPropagation(_Sorts().to(DT), graph=True)
    with pytest.raises(ValueError, match=r"^Tensor\.sort in <model> \(_Sorts\): not in the table of ops"):
        net(torch.randn(2, 4, dtype=DT))


class _OverwritesSaved(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.sigmoid(self.fc1(x))  # sigmoid's backward reads its output …
        h += 1                          # … which this overwrites: autograd refuses the backward too
        return self.fc2(h)


def test_an_in_place_op_overwriting_what_an_earlier_op_saved_is_refused_with_nothing_changed():
    """Refused at the end of the forward (autograd refuses its backward), so the statistics can be put back."""
    model = nn.Sequential(nn.BatchNorm1d(4), _OverwritesSaved()).to(DT)
    net = tfa.FPropagation(model, graph=True)
    before = [b.clone() for b in model.buffers()]
    with pytest.raises(RuntimeError, match=r"saved for the sweep was modified in place later"):
        net(torch.randn(3, 4, dtype=DT))
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), before))
    assert all(p.grad is None for p in model.parameters())


class _ReturnsATuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x), 1


def test_a_model_returning_something_else_than_a_value_is_refused():
    net = tfa.FPropagation(_ReturnsATuple().to(DT), graph=True)
    with pytest.raises(ValueError, match=r"^FPropagation: the model returned tuple, expected a tensor computed"):
        net(torch.randn(2, 4, dtype=DT))


def test_frozen_layers_and_the_input_send_no_adjoint_and_the_rest_is_exact():
    """Ops with no trainable parameter upstream (the model's input, a frozen stem) are skipped by the sweep, as
    autograd skips them; the trainable parameters' gradients stay exact and the frozen ones get none."""
    torch.manual_seed(0)
    model = _Residual().to(DT)
    for p in [*model.conv1.parameters(), *model.bn1.parameters()]:
        p.requires_grad_(False)
    x, t = torch.randn(3, 3, 8, 8, dtype=DT), torch.tensor([0, 1, 2])
    _compare(model, x, t)
    assert model.conv1.weight.grad is None and model.bn1.weight.grad is None
    net = tfa.FPropagation(model, graph=True)
    net(x)
    tape = net._tape
    assert not tape.ops[0].needed  # conv1: its input is the model's and its weight is frozen


class _PartlyWithoutGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        with torch.no_grad():
            h = h + self.b(h)  # autograd: no gradient through here, to b or to a
        return self.c(h)


def test_a_no_grad_block_inside_the_forward_is_autograds():
    """Issue 21's red team: the chain recorder trained `b` (autograd gives it no gradient). On the tape what a no_grad
    block computes is a constant: b and a get no .grad, c's is exact."""
    torch.manual_seed(0)
    model = _PartlyWithoutGrad().to(DT)
    reference = copy.deepcopy(model)
    x, t = torch.randn(3, 4, dtype=DT), torch.tensor([0, 1, 2])
    with torch.enable_grad():
        F.cross_entropy(reference(x), t).backward()
    net = tfa.FPropagation(model, graph=True)
    net(x)
    net.backward(F.cross_entropy, t)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)
    assert model.a.weight.grad is None and model.b.weight.grad is None


def test_a_forward_called_under_no_grad_records_everything():
    """The optimizers' own loops may wrap forward + step in no_grad: the whole forward is recorded."""
    torch.manual_seed(0)
    model = _Residual().to(DT)
    net = tfa.FPropagation(model, graph=True)
    x, t = torch.randn(2, 3, 8, 8, dtype=DT), torch.tensor([0, 1])
    with torch.no_grad():
        net(x)
        net.backward(F.cross_entropy, t)
    assert all(p.grad is not None for p in model.parameters())


def test_the_models_input_gets_no_adjoint_computed_and_an_mlp_stays_exact():
    """The first F.linear's input is the model's: its adjoint (a B × n × m product autograd skips too) is not
    asked of the entry; the parameters' adjoints are exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).to(DT)
    x, t = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    _compare(model, x, t)
    net = tfa.FPropagation(model, graph=True)
    net(x)
    assert net._tape.ops[0].needed == frozenset({1, 2})  # F.linear(input, weight, bias): not the input


# -- the red team of the tape (each case gave a silent wrong gradient before it was refused or made exact) -----
class _Hostile(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.a, self.b, self.p, self.how = nn.Linear(5, 6), nn.Linear(6, 3), nn.Parameter(torch.rand(6)), how

    def forward(self, x):
        h = self.a(x)
        how = self.how
        if how == "setitem":
            h[:, 0] = 0
        elif how == "setitem_into_constant":
            z = torch.zeros(4, 6, dtype=h.dtype)
            z[:, 1:] = h[:, 1:]
            h = z
        elif how == "complex":
            h = torch.fft.fft(h).abs()
        elif how == "in_place_on_base_with_a_view":
            v = h.view(4, 6)
            h.mul_(2)
            h = v
        elif how == "in_place_on_a_view":
            h[:, :3].mul_(3)
        elif how == "in_place_on_a_parameter":
            self.p.mul_(2)
            h = h * self.p
        elif how == "register_hook":
            h.register_hook(lambda g: g * 0)
        elif how == "grad_fn":
            h = h if h.grad_fn is None else h * 2
        return self.b(h)


@pytest.mark.parametrize("how, match", [
    ("setitem", r"^Tensor\.__setitem__ in <model> \(_Hostile\): not in the table"),
    ("setitem_into_constant", r"^Tensor\.__setitem__ in .*: not in the table"),
    ("complex", r"^torch\.fft_fft in .*: not in the table|^fft_fft in .*: not in the table"),
    ("in_place_on_base_with_a_view", r"^\S+ in .*: reads a value that Tensor\.mul_ in .* overwrote through a view"),
    ("in_place_on_a_view", r"^\S+ in .*: reads a value that Tensor\.mul_ in .* overwrote through a view"),
    ("in_place_on_a_parameter", r"^Tensor\.mul_ in .*: writes in place into the parameter p"),
    ("register_hook", r"^Tensor\.register_hook in .*: a tensor hook on a value would not be called"),
    ("grad_fn", r"^Tensor\.grad_fn in .*: the tape's values have no grad_fn"),
])
def test_hostile_forwards_are_refused_in_one_line_with_nothing_changed(how, match):
    model = _Hostile(how).to(DT)
    before = [p.detach().clone() for p in model.parameters()]
    net = tfa.FPropagation(model, graph=True)
    with pytest.raises(ValueError, match=match):
        net(torch.randn(4, 5, dtype=DT))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())


class _BranchesOnRequiresGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(h * 2 if h.requires_grad else h)


def test_requires_grad_of_a_value_is_autograds_answer():
    torch.manual_seed(0)
    _compare(_BranchesOnRequiresGrad().to(DT), torch.randn(4, 5, dtype=DT), torch.tensor([0, 1, 2, 0]))


def test_an_output_modified_in_place_after_the_forward_is_refused():
    model = nn.Sequential(nn.Linear(5, 3)).to(DT)
    net = tfa.FPropagation(model, graph=True)
    out = net(torch.randn(4, 5, dtype=DT))
    out.mul_(2)
    with pytest.raises(RuntimeError, match=r"^FPropagation: the model's output was modified in place after the "
                                           r"forward"):
        net.backward(F.cross_entropy, torch.tensor([0, 1, 2, 0]))
    assert all(p.grad is None for p in model.parameters())


def test_a_no_grad_block_is_a_constant_whatever_the_callers_grad_mode():
    """The forward runs with grad enabled inside the tape, so a no_grad block in it is told apart even when the caller
    wrapped forward + step in no_grad (the optimizers' loops): b and a get nothing, as autograd has it."""
    torch.manual_seed(0)
    model = _PartlyWithoutGrad().to(DT)
    x, t = torch.randn(3, 4, dtype=DT), torch.tensor([0, 1, 2])
    net = tfa.FPropagation(model, graph=True)
    with torch.no_grad():
        out = net(x)
        assert not out.requires_grad and not torch.is_grad_enabled()
        net.backward(F.cross_entropy, t)
    assert model.a.weight.grad is None and model.b.weight.grad is None and model.c.weight.grad is not None


class _ReversedGradient(torch.autograd.Function):
    """Identity forward, negated backward: what autograd trains is not what the forward computes."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x) * 1.0

    @staticmethod
    def backward(ctx, grad):
        return -grad


class _StraightThrough(torch.autograd.Function):
    """A straight-through estimator: the forward returns the quantised values it is given (computed from
    ``h.detach()``: a constant), the backward passes the gradient to ``h``. Its forward calls torch on constants
    only (``clone``), or on nothing (returned as is: autograd's own ``view_as``)."""

    @staticmethod
    def forward(ctx, h, quantised, copy):
        return quantised.clone() if copy else quantised

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _WithAutogradFunction(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.a, self.c, self.how = nn.Linear(4, 5), nn.Linear(5, 3), how

    def forward(self, x):
        h = self.a(x)
        if self.how == "function":
            h = _ReversedGradient.apply(h)
        elif self.how.startswith("straight_through"):
            h = _StraightThrough.apply(h, torch.round(h.detach() * 4) / 4, self.how.endswith("copy"))
        else:
            h = torch.utils.checkpoint.checkpoint(torch.tanh, h, use_reentrant=True)
        return self.c(h)


@pytest.mark.parametrize("how", ["function", "checkpoint_reentrant", "straight_through_copy", "straight_through"])
@pytest.mark.parametrize("caller_grad", [True, False])
def test_an_autograd_function_in_the_forward_is_refused(how, caller_grad):
    """Before: its inside ran under a grad mode the tape took for the user's no_grad, so `a` silently got no
    gradient (autograd gives it one, through the function's own backward). Now one line, nothing written. A
    function whose forward reads constants only (a straight-through estimator) was still taken for a constant
    until session 7 (its red team: `a`'s gradient silently None); every call under a grad mode switched off
    unseen is refused now, a constant's too."""
    import warnings
    torch.manual_seed(0)
    model = _WithAutogradFunction(how).to(DT)
    net = tfa.FPropagation(model, graph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.set_grad_enabled(caller_grad), pytest.raises(ValueError, match="autograd.Function"):
            net(torch.randn(3, 4, dtype=DT))
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="no recorded forward"):
        net.backward(F.cross_entropy, torch.tensor([0, 1, 2]))


def test_a_constant_made_under_inference_mode_in_the_forward_stays_a_constant():
    """The refusal of calls under a grad mode switched off unseen spares inference_mode's constants (a shift made
    there, added to a value: autograd's constant too)."""
    torch.manual_seed(0)

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            with torch.inference_mode():
                shift = torch.linspace(-1, 1, 5, dtype=x.dtype)
            return self.c(torch.tanh(self.a(x) + shift))

    _compare(Shifted().to(DT), torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,)))


def test_checkpoint_without_reentrance_stays_exact():
    torch.manual_seed(0)

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.c(torch.utils.checkpoint.checkpoint(torch.tanh, self.a(x), use_reentrant=False))

    _compare(Checkpointed().to(DT), torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,)))


class _CountsThenRefuses(nn.Module):
    """Writes its own buffers in the forward (a counter, an `out=` target, a rebinding, BatchNorm's statistics),
    then calls an op outside the table."""

    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("ema", torch.zeros(4))
        self.register_buffer("last", torch.zeros(4))

    def forward(self, x):
        self.count += 1
        torch.add(self.ema, 1.0, out=self.ema)
        self.last = torch.ones(4)
        h = self.bn(self.a(x))
        return torch.special.erf(h)


def test_a_refused_forward_puts_back_every_buffer_it_wrote():
    """Issue 21: 'a refused forward changes nothing': not only BatchNorm's statistics, every buffer the model's own
    forward writes (in place, through out=, or rebound) holds its old value afterwards."""
    from .state import assert_untouched, snapshot
    model = _CountsThenRefuses().to(DT)
    net = tfa.FPropagation(model, graph=True)
    before = snapshot(model)
    last = model.last
    with pytest.raises(ValueError, match="special_erf"):
        net(torch.randn(3, 4, dtype=DT))
    assert_untouched(before, model)
    assert model.last is last and float(model.count) == 0 and int(model.bn.num_batches_tracked) == 0


# -- issue 21's second red team (each a silent difference or a state change before) -------------------------------
class _Two(nn.Module):
    """l1 → relu → (what `how` does) → l2, with a buffer and a module-level parameter to hand."""

    def __init__(self, how, outside=None):
        super().__init__()
        self.l1, self.l2, self.how = nn.Linear(4, 5), nn.Linear(5, 3), how
        self.__dict__["outside"] = outside  # not registered: a parameter of no module of the model
        self.register_buffer("buf", torch.zeros(5))

    def forward(self, x):
        h = torch.relu(self.l1(x))
        if self.how == "view-of-constant":
            z = torch.zeros_like(h)
            z[0:].add_(h)
            h = z
        elif self.how == "vmap":
            h = h + torch.vmap(lambda r: r * 2 + torch.tanh(r))(h)
        elif self.how == "outside-parameter":
            h = h * self.outside
        elif self.how == "weight-view-in-place":
            self.l1.weight[0].mul_(2)
        elif self.how == "numpy":
            h = h + torch.from_numpy(h.numpy())
        elif self.how == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.l2(h)
        elif self.how.startswith("write-then-refuse"):
            if self.how.endswith("buffer-view"):
                self.buf[0] += 1
            elif self.how.endswith("buffer-data"):
                self.buf.data.add_(1)
            elif self.how.endswith("buffer-set"):
                self.buf.data = torch.ones(5, dtype=self.buf.dtype)
            else:
                with torch.no_grad():
                    self.l1.weight.clamp_(-0.01, 0.01)
            h = torch.sort(h, 1).values  # not in the table: refused after the write
        return self.l2(h)


@pytest.mark.parametrize("how, match", [
    ("view-of-constant", r"writes a value in place into a tensor the tape holds as a constant"),
    ("vmap", r"runs under a torch.func transform"),
    ("outside-parameter", r"reads a tensor that requires grad and is not a parameter of the model"),
    ("weight-view-in-place", r"writes in place into a view of a parameter that requires grad"),
    ("numpy", r"^Tensor.numpy in .*: takes a value out of torch"),
    ("autocast", r"runs under torch.autocast"),
    ("write-then-refuse-buffer-view", r"^torch.sort in"),
    ("write-then-refuse-buffer-data", r"^torch.sort in"),
    ("write-then-refuse-buffer-set", r"^torch.sort in"),
    ("write-then-refuse-parameter", r"^torch.sort in"),
])
def test_the_second_red_teams_forwards_are_refused_with_nothing_changed(how, match):
    """Before: a value written into a view of a constant, a vmap branch and a module-level parameter trained
    silently wrong (no gradient where autograd gives one); a view of a weight was written in place; numpy round
    trips were constants; autocast failed in the sweep without a name; a buffer written through a view, .data or a
    setter, or a weight clamped under no_grad, stayed changed after the refusal."""
    from .state import assert_untouched, snapshot
    torch.manual_seed(0)
    outside = nn.Parameter(torch.ones(5, dtype=torch.float32 if how == "autocast" else DT))
    model = _Two(how, outside).to(torch.float32 if how == "autocast" else DT)
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=match) as info:
        net(torch.randn(3, 4, dtype=torch.float32 if how == "autocast" else DT))
    assert "\n" not in str(info.value)
    assert_untouched(before, model, opt)
    assert outside.grad is None


def test_the_picker_reads_the_exact_types_and_an_instance_forward():
    """A forward replaced on an instance, or a subclass of a table module, is not provably what the table says: the
    tape records it (before: the chain applied ReLU's rule to sigmoid's output, or crashed with an AttributeError)."""
    torch.manual_seed(0)
    patched = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).to(DT)
    patched[1].forward = torch.sigmoid
    reference = nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3)).to(DT)
    reference.load_state_dict(patched.state_dict())

    class OddDropout(nn.Dropout):
        def forward(self, x):
            return torch.sigmoid(x)

    odd = nn.Sequential(nn.Linear(4, 5), OddDropout(), nn.Linear(5, 3)).to(DT)
    odd.load_state_dict(patched.state_dict())
    x, t = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    F.cross_entropy(reference(x), t).backward()
    for model in (patched, odd):
        net = tfa.FPropagation(model)
        assert net.graph
        net(x)
        net.backward(F.cross_entropy, t)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)
    with pytest.raises(TypeError, match=r"^1 \(ReLU\): its forward is replaced on the instance"):
        tfa.FPropagation(patched, graph=False)
    with pytest.raises(TypeError, match=r"^1 \(OddDropout\) is not supported"):
        net = tfa.FPropagation(odd, graph=False)
        net(x)


def test_a_torchscript_submodule_is_refused_at_wrapping():
    class Traced(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.sub = nn.Linear(4, 5), torch.jit.trace(nn.Linear(5, 5), torch.randn(2, 5))

        def forward(self, x):
            h = self.a(x)
            return h + self.sub(h)

    with pytest.raises(TypeError, match=r"^sub \(.*\): a TorchScript module .* runs a graph the tape cannot see"):
        tfa.FPropagation(Traced())


def test_a_claim_refused_at_construction_leaves_the_net_as_it_was():
    """FAdjoint(fuse_update=True, loss_kwargs={bad}) used to switch the net to the chain (dropping its recorded
    forward) before refusing; the claim is now the constructor's last act, and a chain refusal names the claimant."""
    torch.manual_seed(0)
    model = _Residual().to(DT)
    net = tfa.FPropagation(model)
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    net(x)
    with pytest.raises(ValueError):
        tfa.optim.FAdjoint(net, lr=0.1, fuse_update=True, loss_kwargs={"bogus": 1})
    assert net.graph and net._tape is not None
    tfa.optim.FAdjoint(net, lr=0.1, fuse_update=True)
    assert not net.graph
    with pytest.raises(ValueError, match=r"because FAdjoint\(fuse_update=True\) sweeps one"):
        net(x)


def test_aten_ops_are_named_as_aten_names_them():
    class Sin(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)

        def forward(self, x):
            return torch.ops.aten.sin(self.a(x))

    with pytest.raises(ValueError, match=r"^aten.sin in <model> \(Sin\): not in the table"):
        tfa.FPropagation(Sin().to(DT))(torch.randn(2, 4, dtype=DT))



def test_signals_summed_in_place_never_write_a_shared_one():
    """The sweep adds a value's second signal into the first in place when the first is its own (autograd's input
    buffer does the same). Signals shared between values (x + x, a sum's expanded adjoint, a view's) must not be
    written: a graph made of such fan-outs stays exact."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = self.a(x)
            s = h + h                        # add's adjoint: the same O* for both uses of h
            m = s.mean(1, keepdim=True)      # an expanded adjoint
            v = s.view(-1, 2, 2).reshape(-1, 4)  # a view's adjoint
            u = torch.relu(h) + v + m + s    # h, s used three times
            return self.b(u + h * s)

    torch.manual_seed(0)
    _compare(Shared().to(DT), torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,)), tol=1e-12)


class _InnerNoGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.skip = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3), nn.Linear(4, 4)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        with torch.no_grad():
            cut = self.b(h)  # a constant for autograd: b gets no gradient, and nothing flows back through it
        return self.c(cut + self.skip(h))


@pytest.mark.parametrize("caller", ["grad", "no_grad", "step_closure"])
def test_an_inner_no_grad_block_is_a_constant_whatever_the_callers_grad_mode(caller):
    """The recorded forward runs with grad enabled inside, so the user's own no_grad block is seen as one even when
    net(x) is called under no_grad (the optimizers' step runs a closure so): autograd's gradients, b none."""
    torch.manual_seed(0)
    model = _InnerNoGrad().double()
    x, t = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    want = oracles.autograd_grads(lambda: model(x), dict(model.named_parameters()), "cross_entropy", t)
    net = tfa.FPropagation(model)
    if caller == "step_closure":
        tfa.optim.FAdjoint(net, lr=0.0).step(lambda: net(x), target=t)
    else:
        with torch.set_grad_enabled(caller == "grad"):
            net(x)
        net.backward(F.cross_entropy, t)
    got = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and "b.weight" not in got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-12, msg=name)



class _WritesThroughViews(nn.Module):
    """Writes in place into views whose bases are never read again (EfficientNet's classifier: an in-place Dropout
    on the flattened pooling) — exact — or reads a base after writing through its view — refused."""

    def __init__(self, how):
        super().__init__()
        self.how, self.conv, self.fc = how, nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        pooled = F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1)
        flat = torch.flatten(pooled, 1)  # a view of pooled
        if self.how == "dropout_in_place_on_a_view":
            flat = F.dropout(flat, 0.0, self.training, inplace=True)
        elif self.how == "scaled_view":
            flat.mul_(2.0)
        elif self.how == "base_read_after":
            flat.mul_(2.0)
            return self.fc(flat) + pooled.sum()
        return self.fc(flat)


@pytest.mark.parametrize("how", ["dropout_in_place_on_a_view", "scaled_view"])
def test_a_write_through_a_view_whose_base_is_not_read_again_is_exact(how):
    torch.manual_seed(0)
    model = _WritesThroughViews(how).to(DT)
    x, t = torch.randn(3, 2, 5, 5, dtype=DT), torch.tensor([0, 2, 1])
    want = oracles.autograd_grads(lambda: model(x), dict(model.named_parameters()), "cross_entropy", t)
    net = tfa.FPropagation(model)
    net(x)
    net.backward(F.cross_entropy, t)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=0, atol=1e-12, msg=name)


def test_a_base_read_after_a_write_through_its_view_is_refused():
    torch.manual_seed(0)
    model = _WritesThroughViews("base_read_after").to(DT)
    net = tfa.FPropagation(model)
    with pytest.raises(ValueError, match=r"^\S+ in .*: reads a value that Tensor\.mul_ in .* overwrote through a "
                                         r"view of the same memory \(the tape does not follow views\)"):
        net(torch.randn(3, 2, 5, 5, dtype=DT))


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_the_tapes_sweep_with_grad_enabled_leaves_plain_gradients():
    """``net.backward`` called with grad enabled (the README's form) swept the tape with grad enabled: every gradient
    upstream of the last layer carried an autograd graph (the parameters require grad), growing as gradients
    accumulated, and a later in-place accumulation into the gradients a step wrote raised torch's view error (session
    7's red team). The sweep runs under no_grad, as the chain's does."""
    torch.manual_seed(1)
    model = _TwoLayers().to(DT)
    net = tfa.FPropagation(model, graph=True)
    x, t = torch.randn(8, 5, dtype=DT), torch.randint(0, 3, (8,))
    for _ in range(2):
        net(x)
        net.backward(F.cross_entropy, t)
    assert all(not p.grad.requires_grad and p.grad.grad_fn is None for p in model.parameters())
    opt = tfa.optim.FAdjoint(net, lr=0.1)
    net(x)
    opt.step(target=t)
    net(x)
    net.backward(F.cross_entropy, t)  # accumulates into what the step wrote
    assert all(not p.grad.requires_grad for p in model.parameters())


def test_a_forward_under_inference_mode_is_an_evaluation_on_the_tape():
    """``with torch.inference_mode(): net(x_test)`` raised torch's "Inference tensors do not track version counter"
    from inside the tape (session 7's red team): it runs unrecorded now, its output the model's, and the last records
    are dropped, so that a step cannot train on another forward than the last one."""
    torch.manual_seed(1)
    model = _TwoLayers().to(DT)
    net = tfa.FPropagation(model, graph=True)
    opt = tfa.optim.FAdjoint(net, lr=0.1)
    x, t = torch.randn(8, 5, dtype=DT), torch.randint(0, 3, (8,))
    net(x)
    with torch.inference_mode():
        out = net(x)
    assert type(out) is torch.Tensor and torch.equal(out, model(x).detach())
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="no recorded forward"):
        opt.step(target=t)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    net(x)
    opt.step(target=t)
