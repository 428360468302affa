"""MaxPool records the forward's own arg-max indices (autograd's choice): the pooling runs once per step.

The record is ``(Y, indices)``; the sweep calls only ``max_pool2d_with_indices_backward``. Module forms
(``nn.MaxPool1d/2d``, hook-recorded, also in an ``nn.Sequential`` run without the function mode) run the
module's own forward with ``return_indices`` set for that call only; functional forms (``F.max_pool1d/2d``)
run the same functional with ``return_indices=True``. Gradients equal autograd's bit for bit, ties included.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torch_fadjoint as tfa

GEOMETRIES = {  # (kernel, stride, padding, dilation, ceil_mode)
    "k2": (2, None, 0, 1, False),
    "overlap_ceil": (3, 2, 1, 1, True),
    "dilated": (2, 1, 1, 2, False),
    "rect": ((3, 2), (2, 1), (1, 0), (1, 2), True),
}


class _Ops(TorchDispatchMode):
    """Counts the aten ops dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _pool_args(n, geometry):
    kernel, stride, padding, dilation, ceil_mode = geometry
    if n == 1:
        pick = (lambda v: v[0] if isinstance(v, tuple) else v)
        kernel, stride, padding, dilation = map(pick, (kernel, stride, padding, dilation))
    return dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)


class Functional(nn.Module):
    """conv → relu → F.max_poolNd → flatten → Linear, the pool as a functional (recorded under the mode)."""

    def __init__(self, n, geometry, relu=True):
        super().__init__()
        self.n, self.args, self.relu = n, _pool_args(n, geometry), relu
        self.conv = (nn.Conv1d if n == 1 else nn.Conv2d)(2, 3, 3, padding=1)
        self.fc = nn.LazyLinear(4)

    def forward(self, x):
        h = self.conv(x)
        if self.relu:
            h = F.relu(h)
        h = (F.max_pool1d if self.n == 1 else F.max_pool2d)(h, **self.args)
        return self.fc(torch.flatten(h, 1))


def _sequential(n, geometry, relu=True):
    pool = (nn.MaxPool1d if n == 1 else nn.MaxPool2d)(**_pool_args(n, geometry))
    conv = (nn.Conv1d if n == 1 else nn.Conv2d)(2, 3, 3, padding=1)
    return nn.Sequential(conv, *([nn.ReLU()] if relu else []), pool, nn.Flatten(), nn.LazyLinear(4))


class Contained(nn.Module):
    """The module form inside a non-Sequential container: hook-recorded while the function mode is on."""

    def __init__(self, n, geometry):
        super().__init__()
        self.body = _sequential(n, geometry)

    def forward(self, x):
        return self.body(x)


FORMS = {"functional": Functional, "sequential": _sequential, "contained": Contained}


def _build(form, n, geometry, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = FORMS[form](n, GEOMETRIES[geometry])
    x = torch.randn((3, 2, 9) if n == 1 else (3, 2, 7, 6), dtype=dtype)
    model.to(dtype)(x)  # materialise the lazy Linear
    return model, x


def _pool_record(net):
    (rec,) = [rec for layer in net.layers for rec in layer.maps if "ax" in type(rec.module).__name__]
    return rec


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_recorded_indices_are_the_forwards(form, n, geometry):
    model, x = _build(form, n, geometry)
    net = tfa.FPropagation(model, graph=False)
    with torch.no_grad():
        out = net(x)
        assert isinstance(out, torch.Tensor) and torch.equal(out, model(x))  # the user gets the output alone
    rec = _pool_record(net)
    y, indices = rec.saved
    relu = net.layers[0].maps[0]
    assert y is relu.saved  # the pool's input is the ReLU's record: kept once
    pool = F.max_pool1d if n == 1 else F.max_pool2d
    want_x, want_indices = pool(y, **_pool_args(n, GEOMETRIES[geometry]), return_indices=True)
    assert indices.dtype == torch.int64 and torch.equal(indices, want_indices)
    for module in model.modules():  # the module form's return_indices is restored
        if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d)):
            assert module.return_indices is False


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_pooling_runs_once_per_step_as_under_autograd(form, n):
    """One ``max_pool2d_with_indices`` at the forward, one ``max_pool2d_with_indices_backward`` at the sweep."""
    model, x = _build(form, n, "overlap_ceil")
    twin = copy.deepcopy(model)
    with _Ops() as theirs:
        twin(x.clone().requires_grad_()).sum().backward()
    net = tfa.FPropagation(model, graph=False)
    with _Ops() as ours:
        with torch.no_grad():
            out = net(x)
        net.adjoint(torch.ones_like(out))
    names = ("max_pool2d_with_indices", "max_pool2d_with_indices_backward")
    assert [theirs.counts.get(name, 0) for name in names] == [1, 1]
    assert [ours.counts.get(name, 0) for name in names] == [1, 1]


def _tie_heavy(model, x, kind):
    """Inputs whose pooling windows hold ties: all-equal values, or ReLU zeros (a negative conv bias)."""
    conv = model.conv if hasattr(model, "conv") else next(m for m in model.modules() if isinstance(m, (nn.Conv1d,
                                                                                                      nn.Conv2d)))
    with torch.no_grad():
        if kind == "equal":
            conv.weight.fill_(0.25)
            conv.bias.fill_(0.5)
            x = torch.ones_like(x)
        else:  # most ReLU outputs are 0: whole windows of zeros
            conv.bias.fill_(-1.0)
    return x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["equal", "relu_zeros"])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_tie_heavy_inputs_equal_autograd_bit_for_bit(form, n, kind, dtype):
    model, x = _build(form, n, "overlap_ceil", dtype=dtype)
    x = _tie_heavy(model, x, kind)
    twin = copy.deepcopy(model)
    probe = x.clone().requires_grad_()
    out_adj = torch.randn(3, 4, dtype=dtype, generator=torch.Generator().manual_seed(1))
    twin(probe).backward(out_adj)
    net = tfa.FPropagation(model, graph=False)
    with torch.no_grad():
        out = net(x)
    rec = _pool_record(net)
    if kind == "equal":  # (almost) every window ties: torch takes the first maximum of each window
        assert rec.saved[0].unique().numel() <= 4
    else:
        assert (rec.saved[0] == 0).float().mean() > 0.5
    net.adjoint(out_adj)
    conv = next(q for q in twin.modules() if isinstance(q, (nn.Conv1d, nn.Conv2d)))
    assert conv.weight.grad.abs().max() > 0  # the adjoint does pass through the ties
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_entry_used_outside_the_recorder_still_takes_a_bare_input():
    """``record`` (the table harness) and a bare Y (earlier records) recompute the indices: same gradient."""
    module = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
    entry = tfa.maps.map_for(module)
    y = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    x, indices = F.max_pool2d(y, 3, 2, 1, ceil_mode=True, return_indices=True)
    x_adj = torch.randn_like(x)
    saved = entry.record(module, y, x)
    assert saved[0] is y and torch.equal(saved[1], indices)
    want = entry.backward(module, (y, indices), x_adj)
    assert torch.equal(entry.backward(module, y, x_adj), want)
    assert torch.equal(entry.vjp_at(module, y, x_adj), want)


def test_module_return_indices_is_restored_when_the_forward_raises():
    pool = nn.MaxPool2d(2)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), pool, nn.Flatten(), nn.Linear(8, 3))
    net = tfa.FPropagation(model, graph=False)
    with pytest.raises(RuntimeError, match="too small"):
        net(torch.randn(2, 1, 3, 3))  # a 1×1 map: the pool itself raises, between the recorder's two hooks
    assert pool.return_indices is False
    with pytest.raises(ValueError, match="expected a"):
        net(torch.randn(2, 1, 9, 9))  # the pool has run, the Linear refuses its input (18 features, not 8)
    assert pool.return_indices is False
    out = net(torch.randn(2, 1, 6, 6))
    assert isinstance(out, torch.Tensor) and pool.return_indices is False
    with net.paused():
        assert isinstance(model(torch.randn(2, 1, 6, 6)), torch.Tensor)


def test_return_indices_stays_refused():
    with pytest.raises(ValueError, match=r"1 \(MaxPool2d\): MaxPool with return_indices=True"):
        tfa.FPropagation(nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2, return_indices=True)), graph=False)
    pool = nn.MaxPool2d(2)
    net = tfa.FPropagation(nn.Sequential(nn.Conv2d(1, 2, 3), pool, nn.Flatten(), nn.Linear(8, 3)), graph=False)
    pool.return_indices = True  # set after wrapping: refused at the forward, naming the module
    with pytest.raises(ValueError, match=r"1 \(MaxPool2d\): MaxPool with return_indices=True"):
        net(torch.randn(2, 1, 6, 6))
    assert pool.return_indices is True  # the user's setting, untouched

    class Indices(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(8, 3)

        def forward(self, x):
            h, _ = F.max_pool2d(self.conv(x), 2, return_indices=True)
            return self.fc(h.flatten(1))

    with pytest.raises(ValueError, match="not a map of the chain"):
        tfa.FPropagation(Indices(), graph=False)(torch.randn(2, 1, 6, 6))
