"""Every entry of the two tables against autograd, one BackPACK-style harness (STYLE P9, T1; docs/maths.md §6.1).

Maps: ``backward`` (and ``backward_``, ``df_at``) = autograd's vector-Jacobian product of the module at
the same input. Layers: ``input_adjoint`` and ``param_feedback`` = autograd's grads w.r.t. the input and
the parameters. Functionals: each entry of ``tfa.maps.FUNCTIONALS`` builds the module that computes what
the function computes. All in float64 with mixed-sign inputs; the reference is checked to be non-zero.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_fadjoint as tfa
from torch_fadjoint.layers import LAYERS, LayerRecord, layer_for
from torch_fadjoint.maps import FUNCTIONALS, MAPS, VIEWS, Map, Reshape, map_for, register_map

DT = torch.float64

MAP_CASES = {
    "relu": (nn.ReLU(), (4, 7)),
    "leaky_relu": (nn.LeakyReLU(0.1), (4, 7)),
    "sigmoid": (nn.Sigmoid(), (4, 7)),
    "tanh": (nn.Tanh(), (4, 7)),
    "elu": (nn.ELU(0.7), (4, 7)),
    "softplus": (nn.Softplus(beta=2.0, threshold=3.0), (4, 7)),
    "silu": (nn.SiLU(), (4, 7)),
    "gelu": (nn.GELU(), (4, 7)),
    "gelu_tanh": (nn.GELU(approximate="tanh"), (4, 7)),
    "identity": (nn.Identity(), (4, 7)),
    "log_softmax": (nn.LogSoftmax(dim=1), (4, 7)),
    "flatten": (nn.Flatten(), (3, 2, 4, 5)),
    "unflatten": (nn.Unflatten(1, (2, 3)), (3, 6)),
    "maxpool1d": (nn.MaxPool1d(3, stride=2, padding=1), (2, 3, 11)),
    "maxpool2d": (nn.MaxPool2d(2), (2, 3, 6, 6)),
    "maxpool2d_overlap": (nn.MaxPool2d(3, stride=2, padding=1, dilation=1, ceil_mode=True), (2, 3, 7, 7)),
    "avgpool1d": (nn.AvgPool1d(3, stride=2, padding=1, count_include_pad=False), (2, 3, 11)),
    "avgpool2d": (nn.AvgPool2d(2), (2, 3, 6, 6)),
    "avgpool2d_divisor": (nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, divisor_override=2), (2, 3, 7, 7)),
    "adaptive_avg1d": (nn.AdaptiveAvgPool1d(4), (2, 3, 10)),
    "adaptive_avg2d": (nn.AdaptiveAvgPool2d((3, 2)), (2, 3, 7, 5)),
    "input_noise_eval": (tfa.nn.InputNoise(0.1).eval(), (4, 7)),
}


def _input(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=DT) * 2


def _vjp(fn, inputs, x_adj):
    inputs = [t.detach().requires_grad_() for t in inputs]
    with torch.enable_grad():
        out = fn(*inputs)
        return torch.autograd.grad(out, inputs, x_adj, allow_unused=True)


@pytest.mark.parametrize("name", sorted(MAP_CASES))
def test_map_backward_equals_autograds_vjp(name):
    module, shape = MAP_CASES[name]
    entry = map_for(module)
    y = _input(shape)
    x = module(y)
    x_adj = _input(x.shape, seed=1)
    (want,) = _vjp(module, [y], x_adj)
    assert want.abs().max() > 1e-3
    saved = entry.record(module, y, x)
    got = entry.backward(module, saved, x_adj)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    buffer = x_adj.clone()
    assert torch.equal(entry.backward_(module, saved, buffer), got)  # the in-place form: same kernel, same bits
    torch.testing.assert_close(entry.vjp_at(module, y, x_adj), want, rtol=0, atol=1e-12)
    if entry.elementwise:
        (slope,) = _vjp(lambda v: module(v), [y], torch.ones_like(y))
        torch.testing.assert_close(entry.df_at(module, y), slope, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", [nn.Dropout, nn.Dropout1d, nn.Dropout2d])
def test_dropout_backward_is_its_recorded_mask(cls):
    module = cls(0.4)
    shape = (50, 6) if cls is nn.Dropout else ((50, 6, 5) if cls is nn.Dropout1d else (50, 6, 3, 3))
    y = _input(shape)
    entry = map_for(module)
    x, mask = entry.run(module, y, lambda: pytest.fail("the module's own draw must not run"))
    scale = 1 / 0.6
    assert set(mask.unique().tolist()) == {0.0, scale}
    if cls is not nn.Dropout:  # one draw per channel
        assert mask.shape == shape[:2] + (1,) * (len(shape) - 2)
    torch.testing.assert_close(x, y * mask, rtol=0, atol=0)
    x_adj = _input(shape, seed=1)
    torch.testing.assert_close(entry.backward(module, mask, x_adj), x_adj * mask, rtol=0, atol=0)


def test_records_are_the_cheapest_sufficient_quantity():
    assert {t.__name__: MAPS[t].saves for t in (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.LeakyReLU)} == \
        dict.fromkeys(["ReLU", "Sigmoid", "Tanh", "ELU", "LeakyReLU"], "output")
    assert {MAPS[t].saves for t in (nn.GELU, nn.SiLU, nn.Softplus, nn.MaxPool2d)} == {"input"}
    assert {MAPS[t].saves for t in (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)} == {"shape"}
    assert MAPS[nn.Identity].saves == "none"


LAYER_CASES = {
    "linear": (lambda: nn.Linear(5, 4), (3, 5)),
    "linear_nobias_3d": (lambda: nn.Linear(5, 4, bias=False), (3, 2, 5)),
    "conv1d": (lambda: nn.Conv1d(2, 4, 3, stride=2, padding=1), (3, 2, 9)),
    "conv2d": (lambda: nn.Conv2d(2, 4, 3), (2, 2, 6, 6)),
    "conv2d_geometry": (lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2,
                                          bias=False), (2, 4, 8, 7)),
    "conv2d_same_even": (lambda: nn.Conv2d(2, 3, 4, padding="same", dilation=1), (2, 2, 7, 6)),
    "conv2d_same_odd": (lambda: nn.Conv2d(2, 3, 3, padding="same", dilation=2), (2, 2, 7, 6)),
    "conv2d_valid": (lambda: nn.Conv2d(2, 3, 3, padding="valid"), (2, 2, 7, 6)),
    "conv3d": (lambda: nn.Conv3d(2, 2, 2), (2, 2, 4, 4, 3)),
    "batchnorm1d_train": (lambda: nn.BatchNorm1d(5), (6, 5)),
    "batchnorm1d_train_3d": (lambda: nn.BatchNorm1d(3), (4, 3, 5)),
    "batchnorm2d_train": (lambda: nn.BatchNorm2d(3), (4, 3, 3, 3)),
    "batchnorm2d_no_running_stats": (lambda: nn.BatchNorm2d(3, track_running_stats=False), (4, 3, 3, 3)),
    "batchnorm2d_eval": (lambda: _eval_bn(), (4, 3, 3, 3)),
    "batchnorm2d_no_affine": (lambda: nn.BatchNorm2d(3, affine=False), (4, 3, 3, 3)),
    "layernorm": (lambda: nn.LayerNorm(5), (3, 5)),
    "layernorm_2d": (lambda: nn.LayerNorm((3, 4)), (2, 2, 3, 4)),
    "layernorm_no_affine": (lambda: nn.LayerNorm(5, elementwise_affine=False), (3, 5)),
}


def _eval_bn():
    module = nn.BatchNorm2d(3)
    with torch.no_grad():
        module.running_mean.uniform_(-1, 1)
        module.running_var.uniform_(0.5, 2)
    return module.eval()


@pytest.mark.parametrize("name", sorted(LAYER_CASES))
def test_layer_adjoints_equal_autograds(name):
    make, shape = LAYER_CASES[name]
    torch.manual_seed(0)
    module = make().to(DT)
    with torch.no_grad():  # non-trivial affine parameters
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    entry = layer_for(module)
    x_prev = _input(shape)
    params = entry.params(module)
    with torch.enable_grad():
        probe = x_prev.clone().requires_grad_()
        y = module(probe)
    y_adj = _input(y.shape, seed=1)
    grads = torch.autograd.grad(y, [probe] + params, y_adj)
    want_x, want_params = grads[0], grads[1:]
    module.zero_grad()
    with torch.no_grad():
        y_ours = module(x_prev)
    rec = LayerRecord(k=1, name=name, module=module, entry=entry, x_prev=x_prev,
                      saved=entry.record(module, x_prev, y_ours))
    assert want_x.abs().max() > 1e-6
    torch.testing.assert_close(entry.input_adjoint(rec, y_adj), want_x, rtol=0, atol=1e-10)
    got = entry.param_feedback(rec, y_adj)
    assert list(got) == params
    for param, want in zip(params, want_params):
        torch.testing.assert_close(got[param], want, rtol=0, atol=1e-10)
    torch.testing.assert_close(entry.forward(rec, x_prev), y_ours, rtol=0, atol=0)


def test_conv_patch_energy_is_the_unfolded_patch_norm():
    """§6.5: ‖x̃_{b,p}‖² by a ones kernel equals the explicit unfold, per group, + 1 for the bias."""
    module = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2).to(DT)
    x_prev = _input((2, 4, 9, 8))
    rec = LayerRecord(k=1, name="conv", module=module, entry=layer_for(module), x_prev=x_prev)
    energy = rec.entry.patch_energy(rec)
    y = module(x_prev)
    patches = F.unfold(x_prev, 3, dilation=2, padding=1, stride=2)  # (B, C·9, P)
    per_group = patches.reshape(2, 2, 2 * 9, -1).pow(2).sum(2) + 1.0  # (B, groups, P)
    want = per_group.repeat_interleave(3, dim=1).reshape(y.shape)
    torch.testing.assert_close(energy, want, rtol=0, atol=1e-12)


FUNCTIONAL_CALLS = {
    "F.relu": lambda h: F.relu(h), "torch.relu": lambda h: torch.relu(h), "Tensor.relu": lambda h: h.relu(),
    "F.relu_inplace": lambda h: F.relu(h, inplace=True), "torch.relu_": lambda h: torch.relu_(h),
    "F.leaky_relu": lambda h: F.leaky_relu(h, 0.2), "F.elu": lambda h: F.elu(h, 0.5), "F.gelu": lambda h: F.gelu(h),
    "F.gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "F.silu": lambda h: F.silu(h),
    "F.softplus": lambda h: F.softplus(h, beta=2.0), "torch.sigmoid": lambda h: torch.sigmoid(h),
    "Tensor.sigmoid": lambda h: h.sigmoid(), "torch.tanh": lambda h: torch.tanh(h), "Tensor.tanh": lambda h: h.tanh(),
    "F.max_pool2d": lambda h: F.max_pool2d(h, 2), "F.max_pool2d_kw": lambda h: F.max_pool2d(h, kernel_size=3, stride=1,
                                                                                            padding=1),
    "F.avg_pool2d": lambda h: F.avg_pool2d(h, 2), "F.adaptive_avg_pool2d": lambda h: F.adaptive_avg_pool2d(h, (2, 1)),
    "F.max_pool1d": lambda h: F.max_pool1d(h.flatten(2), 3), "F.avg_pool1d": lambda h: F.avg_pool1d(h.flatten(2), 2),
    "F.adaptive_avg_pool1d": lambda h: F.adaptive_avg_pool1d(h.flatten(2), 3),
    "torch.flatten": lambda h: torch.flatten(h, 1), "Tensor.flatten": lambda h: h.flatten(1),
    "Tensor.view": lambda h: h.view(h.size(0), -1), "Tensor.reshape": lambda h: h.reshape(h.shape[0], -1),
    "torch.reshape": lambda h: torch.reshape(h, (h.shape[0], -1)), "Tensor.unflatten": lambda h: h.unflatten(1, (2, 2)),
    "F.log_softmax": lambda h: F.log_softmax(h.flatten(1), dim=1),
    "Tensor.log_softmax": lambda h: h.flatten(1).log_softmax(1),
    "F.dropout_eval": lambda h: F.dropout(h, 0.5, training=False),
}


class Wrapped(nn.Module):
    """conv → call(h) → flatten → Linear: the functional sits between two parametric layers."""

    def __init__(self, call):
        super().__init__()
        self.call = call
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        with torch.no_grad():
            probe = self.call(self.conv(torch.zeros(1, 1, 4, 4)))
        self.fc = nn.Linear(probe.flatten(1).shape[1], 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.call(self.conv(x)), 1))


@pytest.mark.parametrize("name", sorted(FUNCTIONAL_CALLS))
def test_every_functional_is_recorded_exactly(name):
    torch.manual_seed(0)
    model = Wrapped(FUNCTIONAL_CALLS[name]).to(DT)
    x, t = _input((3, 1, 4, 4)), torch.tensor([0, 2, 1])
    params = dict(model.named_parameters())
    with torch.enable_grad():
        F.cross_entropy(model(x), t).backward()
    want = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad()
    net = tfa.FPropagation(model)
    _, out_adj = tfa.losses.cross_entropy(net(x), t)
    net.adjoint(out_adj)
    for n, p in params.items():
        torch.testing.assert_close(p.grad, want[n], rtol=0, atol=1e-12)


def test_every_functional_of_the_table_is_exercised():
    exercised = {F.relu, torch.relu, torch.Tensor.relu, torch.relu_, F.leaky_relu, F.elu, F.gelu, F.silu, F.softplus,
                 torch.sigmoid, torch.Tensor.sigmoid, torch.tanh, torch.Tensor.tanh, F.max_pool2d, F.avg_pool2d,
                 F.adaptive_avg_pool2d, F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.log_softmax,
                 torch.Tensor.log_softmax, F.dropout,
                 F.relu6, F.hardtanh, F.hardtanh_, F.hardswish, F.hardsigmoid, F.mish}  # the last: tests/test_maps_more.py
    untested = set(FUNCTIONALS) - exercised - {F.relu_, torch.Tensor.relu_, F.sigmoid, F.tanh, torch.log_softmax,
                                               F.dropout1d, F.dropout2d}  # aliases of tested ones
    assert not untested, untested
    assert {torch.flatten, torch.Tensor.flatten, torch.Tensor.view, torch.Tensor.reshape, torch.reshape,
            torch.Tensor.unflatten} <= VIEWS


def test_register_map_extends_the_table_and_refuses_silent_overwrite():
    class Square(nn.Module):
        def forward(self, y):
            return y * y

    class SquareMap(Map):
        saves = "input"

        def backward(self, module, y, x_adj):
            return 2 * y * x_adj

    register_map(Square, SquareMap())
    try:
        with pytest.raises(ValueError, match="^Square already has a map entry; pass overwrite=True"):
            register_map(Square, SquareMap())
        register_map(Square, SquareMap(), overwrite=True)
        model = nn.Sequential(nn.Linear(3, 4), Square(), nn.Linear(4, 2)).double()
        x = _input((5, 3))
        net = tfa.FPropagation(model)
        net.adjoint(torch.ones_like(net(x)))
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        with torch.enable_grad():
            model(x).sum().backward()
        for g, p in zip(got, model.parameters()):
            torch.testing.assert_close(g, p.grad)
    finally:
        MAPS.pop(Square)
    with pytest.raises(ValueError, match="^Linear is a parametric layer"):
        register_map(nn.Linear, SquareMap())
    with pytest.raises(TypeError, match="^expected a Map instance"):
        register_map(Square, object())


def test_register_layer_extends_the_table():
    class Scale(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.linspace(0.5, 1.5, n))

        def forward(self, x):
            return x * self.weight

    class ScaleLayer(tfa.Layer):
        param_names = ("weight",)

        def input_adjoint(self, rec, y_adj):
            return y_adj * rec.module.weight

        def param_feedback(self, rec, y_adj):
            return {rec.module.weight: (y_adj * rec.x_prev).sum(0)} if rec.module.weight.requires_grad else {}

    tfa.register_layer(Scale, ScaleLayer())
    try:
        with pytest.raises(ValueError, match="^Scale already has a layer entry"):
            tfa.register_layer(Scale, ScaleLayer())
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), Scale(4), nn.Linear(4, 2)).double()
        x, t = _input((5, 3)), torch.tensor([0, 1, 1, 0, 1])
        net = tfa.FPropagation(model)
        _, out_adj = tfa.losses.cross_entropy(net(x), t)
        net.adjoint(out_adj)
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        with torch.enable_grad():
            F.cross_entropy(model(x), t).backward()
        for g, p in zip(got, model.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=0, atol=1e-12)
    finally:
        LAYERS.pop(Scale)
    with pytest.raises(ValueError, match="^ReLU is a parameter-free map"):
        tfa.register_layer(nn.ReLU, ScaleLayer())
