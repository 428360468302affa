"""F-propagation recorder (ALGORITHMS.md §1.1): records, hooks, chain detection, one-line errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_fadjoint as tfa


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Sequential(nn.Linear(5, 4), nn.GELU()),
                         nn.Linear(4, 3)).double()


def test_net_output_equals_model_output_and_records_have_the_right_shapes():
    model = mlp()
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    net = tfa.FPropagation(model)
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
    net = tfa.FPropagation(mlp(), keep_pre_activations=True)
    with torch.no_grad():
        net(torch.randn(3, 6, dtype=torch.float64))
    for layer in net.layers:
        torch.testing.assert_close(layer.y, F.linear(layer.x_prev, layer.weight, layer.bias))


def test_remove_and_context_manager_leave_no_hooks():
    model = mlp()
    with tfa.FPropagation(model) as net:
        assert any(m._forward_hooks for m in model.modules())
        net(torch.randn(2, 6, dtype=torch.float64))
    assert not any(m._forward_hooks for m in model.modules())
    assert net.layers == []
    with pytest.raises(RuntimeError, match="no hooks are attached"):
        net(torch.randn(2, 6, dtype=torch.float64))


def test_attach_twice_is_idempotent():
    model = mlp()
    net = tfa.FPropagation(model)
    net.attach()
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert hooks == len(net._handles) == 6 + 3  # one forward hook per leaf, one input check per Linear


def test_paused_records_nothing():
    net = tfa.FPropagation(mlp())
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
    net = tfa.FPropagation(Chain())
    with torch.no_grad():
        net(torch.randn(3, 4))
    assert [layer.name for layer in net.layers] == ["fc1", "fc2"]


class FunctionalBetween(Chain):
    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)) * 2)


class Skip(Chain):
    def forward(self, x):
        h = self.act(self.fc1(x))
        return self.fc2(h + self.act(h))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


class OwnParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.fc(x) * self.scale


class FunctionalAfter(Chain):
    def forward(self, x):
        return super().forward(x).softmax(-1)


@pytest.mark.parametrize("model, message", [
    (FunctionalBetween(), r"^fc2 \(Linear\) received a tensor that the previous module did not return"),
    (Skip(), r"^act \(Tanh\) ran twice"),
    (Twice(), r"^fc \(Linear\) ran twice in one forward"),
    (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), r"^1 \(BatchNorm1d\) is not supported"),
    (nn.Sequential(nn.Linear(4, 4), nn.Softmax(-1)), r"^1 \(Softmax\) is not supported"),
    (OwnParameter(), r"^<model> \(OwnParameter\) holds parameters \['scale'\] directly"),
    (FunctionalAfter(), r"the model's output is not what its last module returned"),
], ids=["functional-between", "skip", "param-twice", "batchnorm", "softmax", "own-parameter", "functional-after"])
def test_non_chains_and_unsupported_modules_are_refused_in_one_line(model, message):
    net = tfa.FPropagation(model)
    with pytest.raises((TypeError, ValueError), match=message) as info:
        with torch.no_grad():
            net(torch.randn(3, 4))
    assert "\n" not in str(info.value)
    assert net.layers == []


def test_linear_subclass_is_not_silently_treated_as_linear():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    net = tfa.FPropagation(nn.Sequential(MyLinear(3, 2)))
    with pytest.raises(TypeError, match=r"^0 \(MyLinear\)"):
        net(torch.randn(1, 3))


def test_linear_needs_a_2d_input():
    net = tfa.FPropagation(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(ValueError, match=r"^0 \(Linear\): expected a \(batch, 3\) input, got shape \(2, 5, 3\)"):
        net(torch.randn(2, 5, 3))


def test_model_changed_after_wrapping_is_detected():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    net = tfa.FPropagation(model)
    model.append(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="changed after wrapping"):
        net(torch.randn(1, 3))
    net.attach()
    assert net(torch.randn(1, 3)).shape == (1, 2)
    model[0].weight = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="changed after wrapping"):
        net(torch.randn(1, 3))


def test_inplace_relu_is_supported_and_exact():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).double()
    ref = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    ref.load_state_dict(model.state_dict())
    x, t = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    net = tfa.FPropagation(model)
    with torch.no_grad():
        _, out_adj = tfa.losses.cross_entropy(net(x), t)
    net.adjoint(out_adj)
    F.cross_entropy(ref(x), t).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-15)


def test_inplace_activation_that_destroys_a_needed_y_is_refused():
    net = tfa.FPropagation(nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)),
                           keep_pre_activations=True)
    with pytest.raises(ValueError, match=r"^1 \(ReLU\): an in-place activation overwrites Y"):
        net(torch.randn(2, 3))


def test_eval_mode_dropout_records_nothing_and_train_mode_records_its_mask():
    model = nn.Sequential(nn.Linear(3, 40), nn.Dropout(0.5), nn.Linear(40, 2))
    net = tfa.FPropagation(model)
    with torch.no_grad():
        out = net(torch.randn(50, 3))
    mask = net.layers[0].maps[0].saved
    assert set(mask.unique().tolist()) == {0.0, 2.0}
    model.eval()
    with torch.no_grad():
        out = net(torch.randn(50, 3))
    assert net.layers[0].maps[0].saved is None
    assert out.shape == (50, 2)


@pytest.mark.parametrize("change", ["replace_child", "insert_child", "dtype", "delete_bias", "nested_append"])
def test_every_kind_of_change_after_wrapping_is_detected(change):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))
    net = tfa.FPropagation(model)
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
