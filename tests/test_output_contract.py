"""The loss starts from the recorded output (issue 21, "output post-processed outside the recorder";
docs/maths.md §7.1): an output changed after ``net(x)`` returned — by any call that makes floating values from it,
whatever the grad mode — or sent into another loss than the one trained, is refused at the loss, in one line naming
the call, before anything is written; reading it for metrics or logging the trained loss trains exactly as
autograd does. Cases from a red team of the first version (grad mode off, tuples, stacked nets, `.data =`)."""
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
    "under_no_grad": (lambda out: _under_no_grad(lambda: out / 2), "Tensor.div"),  # grad mode says nothing here
    "under_inference_mode": (lambda out: _under_inference_mode(lambda: out * 2), "Tensor.mul"),
    "split": (lambda out: out.split([3, 1], dim=1), "split"),
    "chunk": (lambda out: out.chunk(2, dim=1), "chunk"),
    "data_assignment": (lambda out: setattr(out, "data", out.data / 2), r"data = … \(an assignment\)"),
    "custom_function": (lambda out: _Halve.apply(out), "Tensor.div"),
    "clone_then_change": (lambda out: out.clone().mul_(2), "Tensor.mul_"),
}  # fed into a recorded forward (another wrapped model, the same one): refused there (test_an_output_fed_…, below)

# losses the user computes from the output that are not the one trained (F.cross_entropy, mean, no smoothing)
OTHER_LOSSES = {
    "per_sample": lambda out, t: (F.cross_entropy(out, t, reduction="none") * 2).mean(),
    "smoothed": lambda out, t: F.cross_entropy(out, t, label_smoothing=0.2),
    "another_loss": lambda out, t: F.multi_margin_loss(out, t),
    "class_weights": lambda out, t: nn.CrossEntropyLoss(weight=torch.ones(CLASSES, dtype=DT))(out, t),
}

# what a user does with the output that is not the loss's input: training must stay autograd's
READS = {
    "accuracy": lambda out, t: (out.argmax(1) == t).float().mean().item(),
    "max_with_indices": lambda out, t: out.max(1),
    "topk": lambda out, t: out.topk(2, 1),
    "detached": lambda out, t: out.detach() / 2,
    "detached_confidence": lambda out, t: out.detach().softmax(1).max(1).values.mean().item(),
    "sort": lambda out, t: out.sort(1),
    "data": lambda out, t: out.data * 3,
    "logged_loss": lambda out, t: F.cross_entropy(out, t).item(),
    "logged_loss_module": lambda out, t: nn.CrossEntropyLoss()(out, t),
    "logged_loss_no_grad": lambda out, t: _under_no_grad(lambda: F.cross_entropy(out, t, reduction="mean")),
    "logged_mean": lambda out, t: out.mean().item(),
    "metadata_and_repr": lambda out, t: (out.shape, out.dtype, out.device, repr(out), out.size(0)),
    "library_closed_form": lambda out, t: tfa.losses.cross_entropy(out, t),
    "constant_like": lambda out, t: torch.zeros_like(out) + out.new_ones(()),
    "base": lambda out, t: out._base,
    "clone_kept": lambda out, t: _under_no_grad(lambda: out.clone()),
    "contiguous": lambda out, t: out.contiguous().argmax(1),
}


def _under_no_grad(fn):
    with torch.no_grad():
        return fn()


def _under_inference_mode(fn):
    with torch.inference_mode():
        return fn()


class _Halve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x / 2

    @staticmethod
    def backward(ctx, grad):
        return grad / 2


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
    with pytest.raises(RuntimeError, match=rf"^FPropagation: the output of net\(x\) went through \S*{op}\S* *\S* after "
                                           r"net\(x\) returned, which the loss would not see") as error:
        if entry == "backward":
            net.backward(F.cross_entropy, t)
        else:
            opt.step(target=t)
    assert "\n" not in str(error.value)
    assert_untouched(before, model, opt)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("loss", OTHER_LOSSES)
def test_a_loss_other_than_the_trained_one_is_refused_naming_both(kind, loss):
    model = MODELS[kind]()
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1)
    x, t = labelled(BATCH, 5, CLASSES, seed=1)
    before = snapshot(model, opt)
    OTHER_LOSSES[loss](net(x), t)
    with pytest.raises(RuntimeError, match=r"^FPropagation: the output of net\(x\) went into F\.\w+ \(.*\) after net\(x\) "
                                           r"returned, and the loss trained here is cross_entropy\("):
        opt.step(target=t)
    assert_untouched(before, model, opt)


def test_the_trained_loss_logged_with_its_own_settings_passes():
    """The loop that logs ``criterion(out, target)`` and trains ``net.backward(criterion, target)``."""
    model = _graph()
    x, t = labelled(BATCH, 5, CLASSES, seed=1)
    want = oracles.autograd_grads(lambda: model(x), dict(model.named_parameters()), "cross_entropy", t,
                                  label_smoothing=0.1)
    net = tfa.FPropagation(model)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    out = net(x)
    logged = criterion(out, t)
    loss = net.backward(criterion, t)
    assert torch.equal(logged, loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=0, atol=1e-12, msg=name)


def test_a_copy_or_a_saved_output_is_a_plain_tensor(tmp_path):
    import copy
    net = tfa.FPropagation(_graph())
    x, t = labelled(BATCH, 5, CLASSES, seed=1)
    out = net(x)
    for copied in (copy.deepcopy(out), copy.deepcopy({"out": out})["out"]):
        assert type(copied) is torch.Tensor and torch.equal(copied, out)
    assert repr(out) == repr(out.detach().as_subclass(torch.Tensor)) and repr(out).startswith("tensor(")
    torch.save(out, tmp_path / "out.pt")
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert type(loaded) is torch.Tensor and torch.equal(loaded, out)
    net.backward(F.cross_entropy, t)  # none of that changed the output


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


class _Recurrent(nn.Module):
    """A step of a weight-tied recurrence (its input and output alike), with a memory read from an attribute."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.memory = None

    def forward(self, x):
        h = self.a(torch.tanh(x)) + x
        return h if self.memory is None else h + self.memory


def _recurrent(kind):
    torch.manual_seed(0)
    if kind == "chain":
        return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).to(DT)
    return _Recurrent().to(DT)


# an output of a recorded forward, or a tensor computed from one, fed into a recorded forward (session 7's red team:
# each trained as if detached, silently; autograd backpropagates through both forwards)
FEEDS = {
    "itself": lambda net, x: net(net(x)),
    "a_loop": lambda net, x: [h := net(x), h := net(h), net(h)][-1],
    "computed_from_it": lambda net, x: net(net(x) * 1.0),
    "sliced_and_joined": lambda net, x: net(torch.cat([net(x)[:2], x[2:]])),
    "split_part": lambda net, x: net(torch.cat(net(x).split([1, 2]), 0)),
    "as_keyword": lambda net, x: net(input=net(x)) if not net.graph else net(x=net(x)),
    "another_wrapped_model": lambda net, x: tfa.FPropagation(_recurrent("chain"))(net(x)),
    "a_scalar_of_it": lambda net, x: net(x * net(x).mean()),
    "its_max_values": lambda net, x: net(x * net(x).max(1).values[:, None]),
    "written_into_a_buffer": lambda net, x: net(_written(lambda z, out: z.__setitem__(slice(None), out), net(x))),
    "copied_into_a_tensor": lambda net, x: net(_written(lambda z, out: z.copy_(out), net(x))),
    "added_into_a_tensor": lambda net, x: net(_written(lambda z, out: z.add_(out), net(x))),
    "copied_into_a_view": lambda net, x: net(_written_base(lambda z, out: z[:].copy_(out), net(x))),
    "added_into_a_view": lambda net, x: net(_written_base(lambda z, out: z.view(-1).add_(out.reshape(-1)), net(x))),
    "into_a_subclass": lambda net, x: net(_written_base(lambda z, out: z.copy_(out), net(x), _MyTensor)),
    "a_view_made_before_the_write": lambda net, x: net(_view_then_written(net(x))),
}


def _view_then_written(out):
    base = torch.zeros(out.shape[0] * out.shape[1], dtype=out.dtype)
    view = base.view(out.shape)  # made before base is written: a plain tensor still
    base.copy_(out.reshape(-1))
    return view


class _MyTensor(torch.Tensor):
    """A user's own tensor subclass."""


def _written_base(write, out, kind=None):
    """A plain tensor (or one of ``kind``) written with ``out`` through a view of it (or itself), read as is."""
    base = torch.zeros_like(out.detach())
    base = base if kind is None else base.as_subclass(kind)
    write(base, out)
    return base


def _written(write, out):
    """A plain tensor written with ``out`` in place, then read again by the user's name for it."""
    z = torch.zeros_like(out.detach())
    write(z, out)
    return z * 1.0


@pytest.mark.parametrize("kind", ["chain", "tape"])
@pytest.mark.parametrize("feed", FEEDS)
def test_an_output_fed_into_a_recorded_forward_is_refused_before_anything_is_written(kind, feed):
    model = _recurrent(kind)
    net = tfa.FPropagation(model)
    x = torch.randn(3, 4, dtype=DT)
    net(x)
    net.backward(F.cross_entropy, torch.tensor([0, 1, 2]))  # .grad to keep
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"is the output of a recorded forward \(or computed from one\) with trainable "
                                         r"parameters upstream: autograd would backpropagate through both forwards") \
            as error:
        FEEDS[feed](net, x)
    assert "\n" not in str(error.value)
    assert_untouched(before, model)


class _SumOfList(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, xs):
        return self.a(xs[0] + xs[1])


def test_an_output_fed_inside_a_list_is_refused():
    torch.manual_seed(0)
    model = _SumOfList().to(DT)
    net = tfa.FPropagation(model)
    x = torch.randn(3, 4, dtype=DT)
    with pytest.raises(ValueError, match=r"an input is the output of a recorded forward"):
        net([x, net([x, x])])
    net([x, net([x, x]).detach()])


def test_an_output_kept_in_an_attribute_and_read_by_the_next_forward_is_refused():
    model = _recurrent("tape")
    net = tfa.FPropagation(model)
    x = torch.randn(3, 4, dtype=DT)
    model.memory = net(x)
    with pytest.raises(ValueError, match=r"Tensor.add in <model> \(_Recurrent\): reads the output of a recorded forward"):
        net(x)
    model.memory = model.memory.detach()  # what the user means: the memory a constant, as autograd has it detached
    net(x)
    net.backward(F.cross_entropy, torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("kind", ["chain", "tape"])
def test_an_output_fed_in_detached_or_with_nothing_trainable_upstream_trains_as_autograd(kind):
    model = _recurrent(kind)
    x, target = torch.randn(3, 4, dtype=DT), torch.tensor([0, 1, 2])
    want = oracles.autograd_grads(lambda: model(model(x).detach()), dict(model.named_parameters()),
                                  "cross_entropy", target)
    net = tfa.FPropagation(model)
    out = net(net(x).detach())
    torch.testing.assert_close(out, model(model(x)).detach(), rtol=0, atol=0)
    net.backward(F.cross_entropy, target)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=0, atol=1e-12, msg=name)
    teacher = _recurrent(kind).requires_grad_(False)  # a frozen teacher: its output needs no gradient, in autograd too
    model.zero_grad()
    want = oracles.autograd_grads(lambda: model(teacher(x)), dict(model.named_parameters()), "cross_entropy", target)
    net(tfa.FPropagation(teacher)(x))
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


@pytest.mark.parametrize("kind", ["chain", "tape"])
def test_a_top_signal_or_target_computed_from_an_output_leaves_plain_tensors_in_the_library(kind):
    """A stand-in computed from an output with trainable parameters upstream is watched (above); given to the library
    as the top signal (``net.adjoint``, ``step(out_adj=)``) or as a target made from another net's output, it is taken
    as a plain tensor: the gradients, momentum buffers and parameters stay plain ``torch.Tensor``s and parameters."""
    model, other = _recurrent(kind), _recurrent(kind)
    net, other_net = tfa.FPropagation(model), tfa.FPropagation(other)
    opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9, loss="mse")
    x, target = torch.randn(3, 4, dtype=DT), torch.tensor([0, 1, 2])
    want = oracles.autograd_grads(lambda: model(x), dict(model.named_parameters()), "cross_entropy", target)
    out = net(x)
    out_adj = (torch.softmax(out, 1) - F.one_hot(target, 4)) / 3
    assert isinstance(out_adj, tfa.output.RecordedOutput)
    net.adjoint(out_adj)
    for name, p in model.named_parameters():
        assert type(p.grad) is torch.Tensor
        torch.testing.assert_close(p.grad, want[name], rtol=0, atol=1e-12, msg=name)
    for signal in ("out_adj", "target"):
        out = net(x)
        if signal == "out_adj":
            opt.step(out_adj=(out - 1.0) * 0.5)
        else:
            opt.step(target=(other_net(x) * 0.5).detach())
        assert all(type(p.grad) is torch.Tensor and type(p) is nn.Parameter for p in model.parameters())
        assert all(type(state["momentum_buffer"]) is torch.Tensor for state in opt.state.values())


@pytest.mark.parametrize("kind", ["chain", "tape"])
@pytest.mark.parametrize("entry", ["backward", "step", "step_under_no_grad"])
def test_a_target_computed_from_a_trainable_output_is_refused_before_anything_is_written(kind, entry):
    """Autograd differentiates a loss through its target too when the target needs a gradient (session 7's second
    red team: ``net.backward(F.mse_loss, net(x2).softmax(1))`` was off by 0.055, a trainable teacher's gradient
    None); the library's losses take the target as a constant: refused unless detached."""
    model, teacher = _recurrent(kind), _recurrent(kind)
    net, teacher_net = tfa.FPropagation(model), tfa.FPropagation(teacher)
    opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9, loss="mse")
    x = torch.randn(3, 4, dtype=DT)
    net(x)
    opt.step(target=torch.zeros(3, 4, dtype=DT))  # momentum buffers and .grad to keep
    for make_target in (lambda: teacher_net(x).softmax(1), lambda: net(x).softmax(1)):
        target = make_target()
        net(x)
        before = snapshot(model, opt)
        with pytest.raises(ValueError, match=r"^target: computed from the output of a recorded forward with trainable "
                                             r"parameters upstream: autograd would differentiate the loss through it"):
            if entry == "backward":
                net.backward(F.mse_loss, target)
            elif entry == "step":
                opt.step(target=target)
            else:
                with torch.no_grad():
                    opt.step(target=target)
        assert_untouched(before, model, opt)
        opt.step(target=target.detach())


@pytest.mark.parametrize("kind", ["chain", "tape"])
def test_an_output_made_under_no_grad_is_a_constant_as_in_autograd(kind):
    """``with torch.no_grad(): fake = G(z)`` then ``D(fake)`` (a GAN's discriminator step), features extracted into a
    preallocated tensor, a teacher's soft targets, a buffer updated from the output (DINO's centre): autograd gives
    them no gradient, and neither does the library (session 7's third red team: refused for good at first)."""
    model, other = _recurrent(kind), _recurrent(kind)
    net, other_net = tfa.FPropagation(model), tfa.FPropagation(other)
    x, target = torch.randn(3, 4, dtype=DT), torch.tensor([0, 1, 2])
    with torch.no_grad():
        fake = other_net(x)
        features = torch.empty(3, 4, dtype=DT)
        features[:2] = other_net(x[:2])
        features[2:].copy_(other_net(x[2:]))
        centre = torch.zeros(4, dtype=DT)
        centre.mul_(0.9).add_(0.1 * other_net(x).mean(0))
    for given in (fake, features, x + centre):
        want = oracles.autograd_grads(lambda: model(given.detach()), dict(model.named_parameters()), "cross_entropy",
                                      target)
        model.zero_grad()
        net(given)
        net.backward(F.cross_entropy, target)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[name], rtol=0, atol=1e-12, msg=name)
    net(x)
    net.backward(F.mse_loss, fake.softmax(1))  # soft targets made under no_grad: a constant


def test_a_tensor_written_with_an_output_stays_the_users_object_and_detach_makes_it_a_constant():
    model = _recurrent("tape")
    net, other_net = tfa.FPropagation(model), tfa.FPropagation(_recurrent("tape"))
    x = torch.randn(3, 4, dtype=DT)
    buffer = torch.zeros(3, 4, dtype=DT)
    assert buffer.copy_(other_net(x)) is buffer and isinstance(buffer, tfa.output.RecordedOutput)
    with pytest.raises(ValueError, match="is the output of a recorded forward"):
        net(buffer)
    buffer.detach_()
    assert type(buffer) is torch.Tensor
    net(buffer)
    net.backward(F.cross_entropy, torch.tensor([0, 1, 2]))
    leaf = torch.zeros(3, 4, dtype=DT, requires_grad=True)
    with torch.no_grad():
        leaf.copy_(other_net(x) * 1.0)  # under no_grad: a constant, the leaf untouched as a leaf
    assert type(leaf) is torch.Tensor and leaf.is_leaf


def test_an_output_copied_into_a_predictions_buffer_is_a_read_not_a_change():
    """``preds[i:j].copy_(out)`` (a metric's buffer) reads the output, as ``preds[i:j] = out`` does: the loss passes."""
    import copy
    model = _chain()
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1)
    x, t = labelled(BATCH, 5, CLASSES, seed=1)
    preds = torch.zeros(2 * BATCH, CLASSES, dtype=DT)
    out = net(x)
    preds[:BATCH].copy_(out)
    preds[BATCH:] = out
    opt.step(target=t)
    kept = copy.deepcopy({"preds": preds, "view": preds[:BATCH]})
    assert type(kept["preds"]) is torch.Tensor and kept["view"].data_ptr() == kept["preds"].data_ptr()


@pytest.mark.parametrize("kind", ["chain", "tape"])
def test_detach_in_place_and_formatting_work_on_outputs_as_on_tensors(kind):
    """``h.detach_()`` (truncated backpropagation through time) makes the output a constant, as autograd's does (it
    raised torch's "Can't detach views in-place" on the output's alias); ``f"{out.mean():.3f}"`` formats the number;
    ``tfa.losses.mse`` refuses a target that needs a gradient, as the library's other losses do."""
    model = _recurrent(kind)
    net = tfa.FPropagation(model)
    x, target = torch.randn(3, 4, dtype=DT), torch.tensor([0, 1, 2])
    want = oracles.autograd_grads(lambda: model(model(x).detach()), dict(model.named_parameters()), "cross_entropy",
                                  target)
    h = net(x)
    assert h.detach_() is h
    net(h)
    net.backward(F.cross_entropy, target)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=0, atol=1e-12, msg=name)
    derived = net(x) * 2
    derived.detach_()
    assert type(derived) is torch.Tensor
    out = net(x)
    assert f"{out.mean():.3f}" == f"{out.detach().mean().item():.3f}" and f"{out[0, 0]:.2f}"
    with pytest.raises(ValueError, match="^mse: the target is computed from the output of a recorded forward"):
        tfa.losses.mse(out.detach(), tfa.FPropagation(_recurrent(kind))(x))
