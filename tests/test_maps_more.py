"""The activations of torchvision's MobileNet / EfficientNet / MNASNet / ConvNeXt / ViT as maps of the chain
(issue 21): ReLU6, Hardtanh (any bounds), Hardswish, Hardsigmoid, Mish and SiLU, out of place and in place, as
modules and as functionals, against autograd (tests/oracles.py).

Every case puts the activation between two parametric layers (Linear → σ → Linear, Conv2d → σ → Flatten → Linear)
whose first layer is set so that its output Y spans every piece of σ: below, between and above the kinks, and
on the kinks exactly (units with zero weights and the kink as bias). float64: ``.grad`` within 1e-10 of
``loss.backward()``'s, relative; float32: bit for bit (the entries call autograd's own backward kernels).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_fadjoint as tfa
from torch_fadjoint.maps import FUNCTIONALS, MAPS

from . import oracles
from .models import labelled, labelled_batches

DT = torch.float64
WIDTH = 32  # the MLP's hidden units (four of them sit on the kinks)

# name → (module factory taking inplace, the kinks its first layer's output must straddle)
MODULES = {
    "ReLU6": (lambda inplace: nn.ReLU6(inplace), (0.0, 6.0)),
    "Hardtanh": (lambda inplace: nn.Hardtanh(inplace=inplace), (-1.0, 1.0)),
    "Hardtanh(-0.5,2)": (lambda inplace: nn.Hardtanh(-0.5, 2.0, inplace), (-0.5, 2.0)),
    "Hardtanh(-1.1,2.3)": (lambda inplace: nn.Hardtanh(-1.1, 2.3, inplace), (-1.1, 2.3)),  # bounds no float holds
    "Hardswish": (lambda inplace: nn.Hardswish(inplace), (-3.0, 3.0)),
    "Hardsigmoid": (lambda inplace: nn.Hardsigmoid(inplace), (-3.0, 3.0)),
    "Mish": (lambda inplace: nn.Mish(inplace), (-3.0, 3.0)),  # smooth: the range is spanned all the same
    "SiLU": (lambda inplace: nn.SiLU(inplace), (-3.0, 3.0)),
}

# name → (the functional call on the chain tensor, its kinks, whether it writes in place)
FUNCTIONAL_FORMS = {
    "F.relu6": (lambda h: F.relu6(h), (0.0, 6.0), False),
    "F.relu6_inplace": (lambda h: F.relu6(h, inplace=True), (0.0, 6.0), True),
    "F.hardtanh": (lambda h: F.hardtanh(h), (-1.0, 1.0), False),
    "F.hardtanh_bounds": (lambda h: F.hardtanh(h, -0.5, 2.0), (-0.5, 2.0), False),
    "F.hardtanh_kw": (lambda h: F.hardtanh(h, min_val=-1.1, max_val=2.3), (-1.1, 2.3), False),
    "F.hardtanh_inplace": (lambda h: F.hardtanh(h, -1.1, 2.3, True), (-1.1, 2.3), True),
    "F.hardtanh_": (lambda h: F.hardtanh_(h, -0.5, 2.0), (-0.5, 2.0), True),
    "F.hardswish": (lambda h: F.hardswish(h), (-3.0, 3.0), False),
    "F.hardswish_inplace": (lambda h: F.hardswish(h, inplace=True), (-3.0, 3.0), True),
    "F.hardsigmoid": (lambda h: F.hardsigmoid(h), (-3.0, 3.0), False),
    "F.hardsigmoid_inplace": (lambda h: F.hardsigmoid(h, inplace=True), (-3.0, 3.0), True),
    "F.mish": (lambda h: F.mish(h), (-3.0, 3.0), False),
    "F.mish_inplace": (lambda h: F.mish(h, inplace=True), (-3.0, 3.0), True),
    "F.silu": (lambda h: F.silu(h), (-3.0, 3.0), False),
    "F.silu_inplace": (lambda h: F.silu(h, inplace=True), (-3.0, 3.0), True),
}


class Call(nn.Module):
    """A functional form as the forward of a module (``self.first`` → call → ``self.rest``)."""

    def __init__(self, first, call, rest):
        super().__init__()
        self.first, self.call, self.rest = first, call, rest

    def forward(self, x):
        return self.rest(self.call(self.first(x)))


def spread(layer: nn.Module, kinks: tuple) -> None:
    """Set ``layer`` (Linear or Conv2d) so that its output spans every piece of σ: two units (channels) with zero
    weights and a kink as bias, the rest with biases from below the lower kink to above the upper one."""
    lo, hi = kinks
    margin = 2.0 + (hi - lo) / 2
    with torch.no_grad():
        layer.weight.mul_(0.5)
        layer.weight[:2] = 0.0
        layer.bias[:2] = torch.tensor([lo, hi], dtype=layer.bias.dtype)
        layer.bias[2:] = torch.linspace(lo - margin, hi + margin, layer.bias.numel() - 2)


def chain(act: nn.Module | None, kinks: tuple, kind: str, dtype=DT, call=None) -> nn.Module:
    """``kind``: "mlp" (Linear(6, 32) → σ → Linear(32, 3)) or "cnn" (Conv2d(2, 6, 3, padding=1) → σ → Flatten →
    Linear(96, 3)); σ a module (``act``) or a functional call (``call``)."""
    torch.manual_seed(0)
    first, rest = ((nn.Linear(6, WIDTH), nn.Sequential(nn.Linear(WIDTH, 3))) if kind == "mlp" else
                   (nn.Conv2d(2, 6, 3, padding=1), nn.Sequential(nn.Flatten(), nn.Linear(6 * 16, 3))))
    model = (nn.Sequential(first, act, *rest) if call is None else Call(first, call, rest)).to(dtype)
    spread(first, kinks)
    return model


def inputs(kind: str, batch: int, dtype=DT) -> tuple:
    return labelled(batch, 6 if kind == "mlp" else (2, 4, 4), 3, seed=1, dtype=dtype)


def first_of(model: nn.Module) -> nn.Module:
    return model[0] if isinstance(model, nn.Sequential) else model.first


def assert_spans(before: nn.Module, x, kinks: tuple) -> None:
    """Y = before(x), σ's input, has values below, between, above and on both kinks."""
    lo, hi = kinks
    with torch.no_grad():
        y = before(x)
    lo, hi = torch.tensor(lo, dtype=y.dtype), torch.tensor(hi, dtype=y.dtype)
    pieces = {"below": y < lo, "between": (y > lo) & (y < hi), "above": y > hi, "on lo": y == lo, "on hi": y == hi}
    assert all(mask.any() for mask in pieces.values()), {k: int(m.sum()) for k, m in pieces.items()}


def fadjoint_and_autograd(model: nn.Module, x, t) -> tuple:
    """({name: .grad} of the F-adjoint's ``net.backward(F.cross_entropy, t)``, autograd's; the output)."""
    params = dict(model.named_parameters())
    want = oracles.autograd_grads(lambda: model(x), params, "cross_entropy", t)
    net = tfa.FPropagation(model)
    out = net(x)
    net.backward(F.cross_entropy, t)
    got = {name: p.grad.clone() for name, p in params.items()}
    net.remove()
    model.zero_grad(set_to_none=True)
    assert got.keys() == want.keys()
    return got, want, out


def assert_exact(got: dict, want: dict, dtype) -> None:
    assert any(g.abs().max() > 1e-3 for g in want.values()), "degenerate case: autograd's gradient ~0"
    for name, g in want.items():
        if dtype == torch.float64:
            assert (got[name] - g).abs().max() <= 1e-10 * g.abs().max(), name
        else:
            assert torch.equal(got[name], g), name


# -- modules, out of place and in place --------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("inplace", [False, True], ids=["", "inplace"])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_grads_equal_autograd(name, inplace, kind, batch, dtype):
    make, kinks = MODULES[name]
    model = chain(make(inplace), kinks, kind, dtype)
    x, t = inputs(kind, batch, dtype)
    assert_spans(first_of(model), x, kinks)
    got, want, _ = fadjoint_and_autograd(model, x, t)
    assert_exact(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("inplace", [False, True], ids=["", "inplace"])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_map_after_the_top_layer_equals_autograd(name, inplace, dtype):
    """σ on the logits: the sweep's first step (``backward``, the caller's X*; below the top, ``backward_``)."""
    make, kinks = MODULES[name]
    model = chain(make(inplace), kinks, "mlp", dtype)
    torch.manual_seed(1)
    model[2] = nn.Linear(WIDTH, 8).to(dtype)
    spread(model[2], kinks)
    model.append(make(inplace))
    x, t = inputs("mlp", 5, dtype)
    assert_spans(model[:3], x, kinks)
    got, want, _ = fadjoint_and_autograd(model, x, t)
    assert_exact(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_inplace_module_output_and_grads_equal_the_out_of_place_model(name, kind, dtype):
    """The in-place model's recorded output is the out-of-place model's, bit for bit, and so are its gradients;
    the module's ``inplace`` is still set after the forward (the recorder's one-call change is undone)."""
    make, kinks = MODULES[name]
    model = chain(make(True), kinks, kind, dtype)
    plain = chain(make(False), kinks, kind, dtype)
    x, t = inputs(kind, 5, dtype)
    got, _, out = fadjoint_and_autograd(model, x, t)
    want = oracles.autograd_grads(lambda: plain(x), dict(plain.named_parameters()), "cross_entropy", t)
    with torch.no_grad():
        assert torch.equal(out, plain(x))
    assert model[1].inplace
    assert_exact(got, want, dtype)


@pytest.mark.parametrize("name", ["SiLU", "Hardswish", "Hardsigmoid", "Mish", "Hardtanh(-1.1,2.3)"])
def test_an_inplace_map_that_needs_its_input_keeps_it_untouched(name):
    """σ'(Y) needs Y: the in-place module runs out of place for the recorded call, its record is the layer's
    output Y as it was, and the layer keeps that one tensor as Y^1 (no copy)."""
    make, kinks = MODULES[name]
    model = chain(make(True), kinks, "mlp")
    x, _ = inputs("mlp", 5)
    net = tfa.FPropagation(model, keep_pre_activations=True)
    out = net(x)
    layer = net.layers[0]
    record = layer.maps[0].saved
    with torch.no_grad():
        y = model[0](x)
    if name.startswith("Hardtanh"):  # float64 holds the bounds: X, the next layer's input, is the record
        assert record is net.layers[1].x_prev
    else:
        assert torch.equal(record, y) and layer.y is record
    assert torch.equal(layer.y, y) and not torch.equal(net.layers[1].x_prev, y)
    assert out.data_ptr() == net.output.data_ptr() and torch.equal(out, net.output) and model[1].inplace


@pytest.mark.parametrize("name", ["ReLU6", "Hardtanh", "Hardtanh(-0.5,2)"])
def test_inplace_hardtanh_writes_in_place_and_records_its_output(name):
    """X = clamp(Y) carries Y's mask: the in-place module overwrites Y (as under autograd) and X is the record."""
    make, kinks = MODULES[name]
    model = chain(make(True), kinks, "mlp")
    net = tfa.FPropagation(model)
    net(inputs("mlp", 5)[0])
    first, second = net.layers
    assert first.maps[0].saved is second.x_prev
    assert second.x_prev._version == 1  # Y^1, written once, by the map


# -- functional forms --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("name", sorted(FUNCTIONAL_FORMS))
def test_functional_grads_equal_autograd(name, kind, batch, dtype):
    call, kinks, _ = FUNCTIONAL_FORMS[name]
    model = chain(None, kinks, kind, dtype, call=call)
    x, t = inputs(kind, batch, dtype)
    assert_spans(first_of(model), x, kinks)
    got, want, _ = fadjoint_and_autograd(model, x, t)
    assert_exact(got, want, dtype)


@pytest.mark.parametrize("name", sorted(n for n, (_, _, inplace) in FUNCTIONAL_FORMS.items() if inplace))
def test_inplace_functional_output_and_grads_equal_the_out_of_place_form(name):
    call, kinks, _ = FUNCTIONAL_FORMS[name]
    plain_name = {"F.hardtanh_": "F.hardtanh_bounds"}.get(name, name.removesuffix("_inplace"))
    plain_call = FUNCTIONAL_FORMS[plain_name][0]
    if name == "F.hardtanh_inplace":
        plain_call = FUNCTIONAL_FORMS["F.hardtanh_kw"][0]
    model = chain(None, kinks, "cnn", torch.float32, call=call)
    plain = chain(None, kinks, "cnn", torch.float32, call=plain_call)
    x, t = inputs("cnn", 5, torch.float32)
    got, _, out = fadjoint_and_autograd(model, x, t)
    want = oracles.autograd_grads(lambda: plain(x), dict(plain.named_parameters()), "cross_entropy", t)
    with torch.no_grad():
        assert torch.equal(out, plain(x))
    assert_exact(got, want, torch.float32)


def test_every_new_functional_builds_its_module():
    built = {
        F.relu6: (FUNCTIONALS[F.relu6](None, inplace=True), nn.ReLU6, True),
        F.hardtanh: (FUNCTIONALS[F.hardtanh](None, -0.5, max_val=2.0), nn.Hardtanh, False),
        F.hardtanh_: (FUNCTIONALS[F.hardtanh_](None, -0.5, 2.0), nn.Hardtanh, True),
        F.hardswish: (FUNCTIONALS[F.hardswish](None, True), nn.Hardswish, True),
        F.hardsigmoid: (FUNCTIONALS[F.hardsigmoid](None), nn.Hardsigmoid, False),
        F.mish: (FUNCTIONALS[F.mish](None, inplace=True), nn.Mish, True),
        F.silu: (FUNCTIONALS[F.silu](None, inplace=True), nn.SiLU, True),
    }
    for func, (module, cls, inplace) in built.items():
        assert type(module) is cls and module.inplace is inplace, func
    assert (built[F.hardtanh][0].min_val, built[F.hardtanh][0].max_val) == (-0.5, 2.0)
    assert (built[F.hardtanh_][0].min_val, built[F.hardtanh_][0].max_val) == (-0.5, 2.0)


# -- the entries: records, rules, forward at a new point ---------------------------------------------
NEW = (nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.SiLU)


def test_entries_declare_records_and_rules():
    assert {t.__name__: MAPS[t].saves for t in NEW} == {"ReLU6": "output", "Hardtanh": "output",
                                                        "Hardswish": "input", "Hardsigmoid": "input",
                                                        "Mish": "input", "SiLU": "input"}
    for t in NEW:  # elementwise activations: LFP's identity (§3.2), IL's ρ, the equilibrium's σ'(D)
        entry = MAPS[t]
        assert entry.lfp == "identity" and entry.elementwise and entry.differentiable and not entry.stochastic


@pytest.mark.parametrize("name", sorted(MODULES))
def test_forward_and_derivative_at_a_new_point_never_write_in_place(name):
    """``forward`` / ``df_at`` (inference learning's ρ and ρ', §5) of an in-place module leave their point as it
    was and equal the out-of-place module's; ``df_at`` is autograd's σ' on every piece."""
    make, (lo, hi) = MODULES[name]
    module, plain = make(True), make(False)
    entry = MAPS[type(module)]
    y = torch.cat([torch.linspace(lo - 3, hi + 3, 41, dtype=DT), torch.tensor([lo, hi], dtype=DT)])
    kept = y.clone()
    assert torch.equal(entry.forward(module, y), plain(kept)) and torch.equal(y, kept)
    slope = entry.df_at(module, y)
    assert torch.equal(y, kept)
    _, (want,) = oracles.vjp(plain, [kept], torch.ones_like(kept))
    assert torch.equal(slope, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("inplace", [False, True], ids=["", "inplace"])
@pytest.mark.parametrize("bounds", [(-1.1, 2.3), (0.0, 6.0)], ids=["-1.1,2.3", "0,6"])
def test_hardtanh_in_half_types_is_autograds_bit_for_bit(bounds, inplace, dtype):
    """In float16 / bfloat16 the forward clamps to the bound rounded to the dtype and hardtanh_backward compares
    in float32 with the exact bound: for a bound the dtype cannot hold, X's mask is not Y's, so the record is Y
    (and ``inplace=True`` runs out of place); (0, 6), which every dtype holds, keeps X and writes in place."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 256), nn.Hardtanh(*bounds, inplace), nn.Linear(256, 3)).to(dtype)
    with torch.no_grad():
        model[0].weight.mul_(4)
    x = torch.randn(64, 6, dtype=dtype)
    params = dict(model.named_parameters())
    names = list(params)
    out_adj = torch.randn(64, 3, dtype=dtype)
    _, want = oracles.vjp(lambda *ps: torch.func.functional_call(model, dict(zip(names, ps)), (x,)),
                          list(params.values()), out_adj)
    net = tfa.FPropagation(model)
    net(x)
    assert (net.layers[0].maps[0].saved is net.layers[1].x_prev) is (bounds == (0.0, 6.0))
    net.adjoint(out_adj)
    for p, g in zip(params.values(), want):
        assert torch.equal(p.grad, g)


# -- rules through the new maps ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["SiLU", "Hardswish", "Hardsigmoid", "Mish"])
def test_lfp_through_an_inplace_map_equals_lfp_through_the_out_of_place_one(name):
    """LFP passes the reward through activations unchanged and needs Y^k: the in-place map keeps Y untouched."""
    make, kinks = MODULES[name]
    models = [chain(make(inplace), kinks, "mlp") for inplace in (True, False)]
    x, t = inputs("mlp", 5)
    for model in models:
        net = tfa.FPropagation(model, keep_pre_activations=True)
        opt = tfa.optim.LFP(net, lr=0.1)
        net(x)
        opt.step(target=t)
    for p, q in zip(*(model.parameters() for model in models)):
        assert torch.equal(p, q)
    assert not torch.equal(models[0][0].weight, chain(make(False), kinks, "mlp")[0].weight)  # it trained


def test_lfp_through_an_inplace_relu6_is_refused_as_relu_is():
    """ReLU6(inplace=True) overwrites Y^1, which LFP keeps: refused at the forward, naming it, as ReLU(inplace=True)
    (until session 8 at the step, as "modified after the forward", which running the forward again never fixed)."""
    model = chain(nn.ReLU6(True), (0.0, 6.0), "mlp")
    net = tfa.FPropagation(model, keep_pre_activations=True)
    tfa.optim.LFP(net, lr=0.1)
    x, _ = inputs("mlp", 5)
    with pytest.raises(ValueError, match=r"^1 \(ReLU6\): an in-place map overwrites its input Y\^1, which "
                                         r"keep_pre_activations keeps"):
        net(x)


@pytest.mark.parametrize("form", ["module", "functional"])
def test_an_inplace_relu6_over_another_record_is_refused_as_autograd_does(form):
    """Tanh records its output X; ReLU6(inplace=True) after it overwrites X (autograd refuses this too)."""
    torch.manual_seed(0)
    act = nn.ReLU6(True) if form == "module" else Call(nn.Identity(), lambda h: F.relu6(h, inplace=True),
                                                       nn.Identity())
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), act, nn.Linear(5, 3)).to(DT)
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1)
    x, t = inputs("mlp", 5)
    if net.graph:  # a Call module: the tape records the model, and refuses at the end of the forward
        with pytest.raises(RuntimeError, match=r"^FPropagation: a tensor that torch.tanh in 1 \(Tanh\) saved for the "
                                               r"sweep was modified in place later"):
            net(x)
        return
    net(x)
    with pytest.raises(RuntimeError, match=r"^FPropagation: the record of 1 \(Tanh\) was modified in place"):
        opt.step(target=t)


# -- training ------------------------------------------------------------------------------------------
def mobilenet_block() -> nn.Module:
    """Conv2d → BatchNorm2d → Hardswish → Conv2d → ReLU6 → AdaptiveAvgPool → Flatten → Linear, the activations in
    place as torchvision's Conv2dNormActivation has them."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8),
                         nn.Hardswish(inplace=True), nn.Conv2d(8, 12, 1), nn.ReLU6(inplace=True),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4)).to(DT)


def test_fadjoint_trains_a_mobilenet_block_as_sgd_after_backward():
    model = mobilenet_block()
    twin = copy.deepcopy(model)
    batches = labelled_batches(3, 6, (3, 8, 8), 4, seed=2, scale=3.0)
    want_losses = oracles.autograd_sgd_steps(twin, nn.CrossEntropyLoss(), batches, lr=0.1)
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.1)
    for (x, t), want_loss in zip(batches, want_losses):
        net(x)
        assert (opt.step(target=t) - want_loss).abs() <= 1e-12
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert (p - q).abs().max() <= 1e-12 * q.abs().max(), name
    for b, c in zip(model.buffers(), twin.buffers()):
        assert torch.equal(b, c)
    assert not torch.equal(model[0].weight, mobilenet_block()[0].weight)
