"""F-propagation recorder (docs/maths.md §1.1, §6.1): what the chain recorder (``graph=False``) records, for modules
and functionals, and its hooks; which recorder ``FPropagation(model)`` picks (the tape's own tests: test_tape.py).

Every refusal (non-chains, unsupported modules, in-place ops, foreign hooks, changes after wrapping) is in
the misuse catalogue, tests/test_misuse.py.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_fadjoint as tfa
from .state import assert_untouched, snapshot


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Sequential(nn.Linear(5, 4), nn.GELU()),
                         nn.Linear(4, 3)).double()


def test_net_output_equals_model_output_and_records_have_the_right_shapes():
    model = mlp()
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    net = tfa.FPropagation(model, graph=False)
    with torch.no_grad():
        out = net(x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    layers = net.layers
    assert [layer.name for layer in layers] == ["1", "3.0", "4"]
    assert [tuple(layer.x_prev.shape) for layer in layers] == [(7, 6), (7, 5), (7, 4)]
    assert [tuple(layer.x.shape) for layer in layers] == [(7, 5), (7, 4), (7, 3)]
    def same_storage(a, b):
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()

    assert same_storage(layers[1].x_prev, layers[0].maps[0].saved)  # X^1 kept once (ReLU's record)
    assert same_storage(layers[1].y, layers[1].maps[0].saved)  # GELU records Y^2, kept once
    assert layers[0].y is None  # ReLU needs no Y: not kept
    assert set(net.records) == {"1", "3.0", "4"}
    assert not any(t.requires_grad for layer in layers for t in (layer.x_prev, layer.x))


def test_keep_pre_activations_records_y():
    net = tfa.FPropagation(mlp(), keep_pre_activations=True, graph=False)
    with torch.no_grad():
        net(torch.randn(3, 6, dtype=torch.float64))
    for layer in net.layers:
        torch.testing.assert_close(layer.y, F.linear(layer.x_prev, layer.module.weight, layer.module.bias))


def test_remove_and_context_manager_leave_no_hooks():
    model = mlp()
    with tfa.FPropagation(model, graph=False) as net:
        assert any(m._forward_hooks for m in model.modules())
        net(torch.randn(2, 6, dtype=torch.float64))
    assert not any(m._forward_hooks for m in model.modules())
    assert net.layers == []
    with pytest.raises(RuntimeError, match="no hooks are attached"):
        net(torch.randn(2, 6, dtype=torch.float64))


def test_attach_twice_is_idempotent():
    model = mlp()
    net = tfa.FPropagation(model, graph=False)
    net.attach()
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert hooks == len(net._handles) == 2 * 6  # a pre-hook (the chain and input checks) and a hook per leaf


def test_paused_records_nothing():
    net = tfa.FPropagation(mlp(), graph=False)
    with net.paused():
        net(torch.randn(2, 6, dtype=torch.float64))
    assert net.layers == []
    with pytest.raises(RuntimeError, match="no recorded forward"):
        net.output


class Chain(nn.Module):
    """A custom module calling its submodules in chain order is supported."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_custom_chain_module_is_supported():
    net = tfa.FPropagation(Chain(), graph=False)
    with torch.no_grad():
        net(torch.randn(3, 4))
    assert [layer.name for layer in net.layers] == ["fc1", "fc2"]


def test_eval_mode_dropout_records_nothing_and_train_mode_records_its_mask():
    model = nn.Sequential(nn.Linear(3, 40), nn.Dropout(0.5), nn.Linear(40, 2))
    net = tfa.FPropagation(model, graph=False)
    with torch.no_grad():
        out = net(torch.randn(50, 3))
    mask = net.layers[0].maps[0].saved
    assert set(mask.unique().tolist()) == {0.0, 2.0}
    model.eval()
    with torch.no_grad():
        out = net(torch.randn(50, 3))
    assert net.layers[0].maps[0].saved is None
    assert out.shape == (50, 2)


@pytest.mark.parametrize("second_wrapper", [False, True])
@pytest.mark.parametrize("change", ["replace_child", "insert_child", "dtype", "delete_bias", "nested_append"])
def test_every_kind_of_change_after_wrapping_is_detected(change, second_wrapper):
    """(The one refusal kept here: it is about the fingerprint the recorder takes at attach.) A second wrapper's
    hooks change every module's signature without changing the model: the dtype change went unseen behind them
    (session 6's red team, on the per-module signatures)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))
    net = tfa.FPropagation(model, graph=False)
    other = tfa.FPropagation(model) if second_wrapper else None  # noqa: F841 (its hooks stay on the model)
    with torch.no_grad():
        net(torch.randn(1, 3))
    if change == "replace_child":
        model[1] = nn.Tanh()
    elif change == "insert_child":
        model.insert(2, nn.Identity())
    elif change == "dtype":
        model.double()  # same parameter objects, new dtype
    elif change == "delete_bias":
        model[0].bias = None
    else:
        model[2].append(nn.ReLU())
    with pytest.raises(RuntimeError, match="changed after wrapping"):
        net(torch.randn(1, 3, dtype=torch.float64 if change == "dtype" else torch.float32))


class ExamplesNet(nn.Module):
    """pytorch/examples' mnist Net, as written there: functional forwards between modules."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, 1)
        self.conv2 = nn.Conv2d(4, 8, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(8 * 5 * 5, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


def test_functional_forwards_are_recorded_through_the_map_table():
    model = ExamplesNet()
    net = tfa.FPropagation(model, graph=False)
    with torch.no_grad():
        out = net(torch.randn(3, 1, 14, 14))
    assert [layer.name for layer in net.layers] == ["conv1", "conv2", "fc1", "fc2"]
    assert [[rec.name for rec in layer.maps] for layer in net.layers] == [
        ["F.relu after conv1 (Conv2d)"],
        ["F.relu after conv2 (Conv2d)", "F.max_pool2d after F.relu after conv2 (Conv2d)", "dropout1",
         "torch.flatten after dropout1 (Dropout)"],
        ["F.relu after fc1 (Linear)", "dropout2"],
        ["F.log_softmax after fc2 (Linear)"]]
    assert [type(rec.module).__name__ for rec in net.layers[1].maps] == ["ReLU", "MaxPool2d", "Dropout", "Reshape"]
    assert net.layers[1].maps[1].saved[0] is net.layers[1].maps[0].saved  # the pool's input is the ReLU's record
    assert out.shape == (3, 10)


def test_models_of_sequentials_run_without_the_function_mode():
    """nn.Sequential's forward only calls its children: no mode (no per-op overhead); other containers need it."""
    assert not tfa.FPropagation(mlp(), graph=False)._recorder._needs_mode
    assert tfa.FPropagation(ExamplesNet(), graph=False)._recorder._needs_mode
    assert tfa.FPropagation(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.Linear(4, 2)), graph=False)._recorder._needs_mode


def test_state_dict_is_the_wrapped_models():
    """A checkpoint saved through the recorder loads into the bare model and back (issue 15)."""
    model = mlp()
    net = tfa.FPropagation(model, graph=False)
    assert list(net.state_dict()) == list(model.state_dict())
    other = mlp()
    other.load_state_dict(net.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))
    fresh = mlp()
    net.load_state_dict(fresh.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))


# -- the forward (issue 21): no autograd graph, named inputs, a refused forward changes nothing, no leak ---------
def test_the_recorded_forward_builds_no_autograd_graph_even_with_grad_enabled():
    """A stock loop calls net(x) with grad enabled: nothing uses autograd's graph, so none is built (the output
    has requires_grad=False; the model's own forward outside the recorder is unchanged)."""
    model = mlp()
    net = tfa.FPropagation(model, graph=False)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    assert torch.is_grad_enabled()
    out = net(x)
    assert not out.requires_grad and out.grad_fn is None
    assert model(x).grad_fn is not None  # not the recorder's: autograd as usual
    net.backward(F.cross_entropy, torch.tensor([0, 1, 2, 0]))
    assert all(p.grad is not None for p in model.parameters())


def test_an_input_that_requires_grad_is_refused_in_one_line():
    """Autograd would fill x.grad; the F-adjoint fills only the parameters': refused, not silently left None."""
    net = tfa.FPropagation(mlp(), graph=False)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"^FPropagation: input 0 requires grad: autograd would fill its \.grad, the "
                                         r"F-adjoint fills the parameters' only; pass it detached \(x\.detach\(\)\)$"):
        net(x)
    net(x.detach())


class _ScaledBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x)) * 2  # arithmetic after the BatchNorm: refused, after bn updated its statistics


def test_a_refused_forward_leaves_batchnorm_statistics_as_they_were():
    model = _ScaledBatchNorm().double().train()
    net = tfa.FPropagation(model, graph=False)
    before = {name: b.clone() for name, b in model.named_buffers()}
    with pytest.raises(ValueError, match="not a map of the chain"):
        net(torch.randn(8, 6, dtype=torch.float64))
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), name
    assert model.bn.num_batches_tracked.item() == 0


class _ScheduledDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.p = nn.Linear(6, 5), nn.Linear(5, 3), 0.0

    def forward(self, x):
        return self.fc2(F.dropout(self.fc1(x), self.p, self.training))


def test_functional_stand_ins_are_not_kept_one_per_scheduled_value():
    """F.dropout(h, self.p, …) with a scheduled p made one cached stand-in module per step (201 after 200 steps)."""
    model = _ScheduledDropout().double()
    net = tfa.FPropagation(model, graph=False)
    x = torch.randn(4, 6, dtype=torch.float64)
    for step in range(200):
        model.p = step / 1000
        net(x)
    assert len(net._recorder._standins) <= 64


@pytest.mark.parametrize("change", ["bn.eps", "leaky.negative_slope", "train->eval", "fc2.weight replaced",
                                    "pool.kernel_size", "fc2.weight shadowed"])
def test_a_module_changed_between_forward_and_sweep_is_refused(change):
    """Autograd uses what the forward used; the sweep read the module at sweep time (0.23 off for a changed eps,
    torch's shape error for a changed kernel size; a tensor put in the module's ``__dict__`` under its weight's name,
    which ``module.weight`` then reads, sent the earlier layers a wrong adjoint and left fc2.weight without a
    gradient). Now refused in one line, nothing written."""
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.LeakyReLU(0.1), nn.Unflatten(1, (1, 8)),
                          nn.AvgPool1d(2), nn.Flatten(), nn.Linear(4, 3)).double()
    net = tfa.FPropagation(model, graph=False)
    net(torch.randn(5, 6, dtype=torch.float64))
    if change == "bn.eps":
        model[1].eps = 0.1
    elif change == "leaky.negative_slope":
        model[2].negative_slope = 0.5
    elif change == "train->eval":
        model.eval()
    elif change == "fc2.weight replaced":
        model[6].weight = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    elif change == "fc2.weight shadowed":  # no __setattr__: _parameters still holds the weight the forward used
        model[6].__dict__["weight"] = torch.randn(3, 4, dtype=torch.float64)
    else:
        model[4].kernel_size = (4,)
    with pytest.raises(RuntimeError, match=r"^FPropagation: \S+ \(\w+\) was changed between the forward and the sweep "
                                           r"\(.+\); the sweep would use what the forward did not; records cleared"):
        net.backward(F.cross_entropy, torch.tensor([0, 1, 2, 0, 1]))
    assert all(p.grad is None for p in model.parameters())


class _SlopeProperty(nn.LeakyReLU):
    negative_slope = property(lambda self: 0.9, lambda self, value: None)  # what the sweep would read


@pytest.mark.parametrize("change", ["bn.running_var shadowed", "bn.running_mean shadowed", "leaky class swapped",
                                    "fc1.weight unfrozen"])
def test_what_the_chains_sweep_reads_through_a_module_is_what_the_forward_read(change):
    """Session 6's red team: an eval-mode BatchNorm's running_var put in its ``__dict__``, a LeakyReLU's class swapped
    for a subclass whose negative_slope is a property, each between forward and step, went unseen (the settings
    compare the instance's own attributes): 0.08-0.24 off autograd, silently; a weight frozen at the forward and
    unfrozen before the step got a gradient and an update autograd would not give. Now refused, nothing written."""
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.LeakyReLU(0.1), nn.Linear(8, 3)).double()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model[1].eval()
    if change == "fc1.weight unfrozen":
        model[0].weight.requires_grad_(False)
    net = tfa.FPropagation(model, graph=False)
    opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    net(x)
    opt.step(target=y)
    net(x)
    if change == "bn.running_var shadowed":
        model[1].__dict__["running_var"] = model[1].running_var * 4
    elif change == "bn.running_mean shadowed":
        model[1].__dict__["running_mean"] = model[1].running_mean + 1
    elif change == "leaky class swapped":
        model[2].__class__ = _SlopeProperty
    else:
        model[0].weight.requires_grad_(True)
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"^FPropagation: \S+ \(\w+\) was changed between the forward and the sweep "
                                           r"\(.+\); the sweep would use what the forward did not; records cleared"):
        opt.step(target=y)
    assert_untouched(before, model, opt)


def test_a_weight_frozen_between_forward_and_step_gets_no_gradient_as_with_autograd():
    """The other direction is autograd's too: a parameter frozen after the forward gets no gradient from
    ``loss.backward()``; the chain's sweep skips it and the other gradients are autograd's (session 6's second red
    team: the first fix refused this)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.LeakyReLU(0.1), nn.Linear(8, 3)).double()
    reference = copy.deepcopy(model)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    out = reference(x)
    reference[0].weight.requires_grad_(False)
    F.cross_entropy(out, y).backward()
    net = tfa.FPropagation(model, graph=False)
    net(x)
    model[0].weight.requires_grad_(False)
    net.backward(F.cross_entropy, y)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)


# -- computation the recorder does not see, and backward-side hooks (issue 21's red team) ------------------------
class _ReadsAParameter(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.a, self.b, self.how = nn.Linear(6, 5), nn.Linear(5, 3), how

    def forward(self, x):
        if self.how == "functional":
            h = F.linear(x, self.a.weight, self.a.bias)
        elif self.how == "forward":
            h = self.a.forward(x)
        else:
            h = x @ self.a.weight.T + self.a.bias
        return self.b(torch.relu(h))


@pytest.mark.parametrize("how", ["functional", "forward", "matmul"])
def test_a_parameter_read_outside_its_modules_recorded_forward_is_refused(how):
    """Autograd trains `a`; the chain never saw it, so `a` silently never learned."""
    model = _ReadsAParameter(how).double()
    net = tfa.FPropagation(model, graph=False)
    with pytest.raises(ValueError, match=r"reads the parameter a\.(weight|bias) outside its module's recorded forward"):
        net(torch.randn(4, 6, dtype=torch.float64))


class _FunctionalCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)
        self.register_buffer("other", torch.randn(3, 5))

    def forward(self, x):  # (2 * self.b.weight here is refused as a parameter read outside its module)
        return torch.func.functional_call(self.b, {"weight": self.other, "bias": self.b.bias}, (torch.relu(self.a(x)),))


def test_a_layer_run_with_other_tensors_than_its_parameters_is_refused():
    """torch.func.functional_call(b, {"weight": w, …}) inside the forward: the sweep would update b.weight from a
    forward that used w."""
    net = tfa.FPropagation(_FunctionalCall().double(), graph=False)
    with pytest.raises(ValueError, match=r"^b \(Linear\): its weight is not the parameter it was wrapped with"):
        net(torch.randn(4, 6, dtype=torch.float64))


class _ViewsAsAnotherDtype(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 4), nn.Linear(2, 3)

    def forward(self, x):
        return self.b(self.a(x).view(torch.float32))


def test_a_view_to_another_dtype_is_refused():
    net = tfa.FPropagation(_ViewsAsAnotherDtype().double(), graph=False)
    with pytest.raises(ValueError, match=r"a view to another dtype reinterprets the bits"):
        net(torch.randn(4, 6, dtype=torch.float64))


@pytest.mark.parametrize("hook", ["tensor", "post_accumulate", "module_full", "global"])
def test_a_backward_side_hook_is_refused_at_the_sweep(hook):
    """A user clipping or freezing through a hook got 0.37 where autograd gives 0: refused, nothing written."""
    model = mlp()
    net = tfa.FPropagation(model, graph=False)
    net(torch.randn(4, 2, 3, dtype=torch.float64))
    weight = model[1].weight
    if hook == "tensor":
        handle = weight.register_hook(lambda g: g * 0)
    elif hook == "post_accumulate":
        handle = weight.register_post_accumulate_grad_hook(lambda p: None)
    elif hook == "module_full":
        handle = model[1].register_full_backward_hook(lambda m, gi, go: None)
    else:
        handle = nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: None)
    try:
        with pytest.raises(RuntimeError, match=r"^FPropagation: .*(hook).*, which autograd would call and the "
                                               r"F-adjoint does not; records cleared, nothing was changed"):
            net.backward(F.cross_entropy, torch.tensor([0, 1, 2, 0]))
        assert all(p.grad is None for p in model.parameters())
    finally:
        handle.remove()


def test_the_default_records_a_plain_sequential_as_a_chain_and_anything_else_on_the_tape():
    """Issue 21: FPropagation(model) picks the recorder from the model: a plain nn.Sequential of table entries is
    provably a chain (net.layers, every rule of §6); a custom forward, an unsupported module or a forward hook goes
    to the tape. graph=True/False force one; a chain-only optimizer claims a net left to choose."""
    assert not tfa.FPropagation(mlp()).graph
    assert tfa.FPropagation(ExamplesNet()).graph
    assert tfa.FPropagation(nn.Sequential(nn.Linear(3, 4), nn.Softmax(1))).graph  # no chain entry
    hooked = mlp()
    hooked[0].register_forward_hook(lambda m, i, o: o * 2)
    assert tfa.FPropagation(hooked).graph
    assert tfa.FPropagation(mlp(), graph=True).graph and not tfa.FPropagation(ExamplesNet(), graph=False).graph
    with pytest.raises(TypeError, match="graph must be True, False or None"):
        tfa.FPropagation(mlp(), graph="yes")
    net = tfa.FPropagation(ExamplesNet())
    tfa.optim.FAdjoint(net, lr=0.1, fuse_update=True)  # the fused update runs in the chain's sweep
    assert not net.graph and net.graph_choice is False
    forced = tfa.FPropagation(ExamplesNet(), graph=True)
    with pytest.raises(ValueError, match=r"^FAdjoint\(fuse_update=True\) sweeps a chain of layers"):
        tfa.optim.FAdjoint(forced, lr=0.1, fuse_update=True)
