"""Every rule's §6 property on small CNNs (docs/maths.md §6.3–§6.6), float64, against independent oracles.

The oracles are autograd (through ``tests/oracles.py``, or ``torch.autograd.grad`` on a forward written out
here), closed forms derived in each docstring, ``F.unfold``, and line-by-line transcriptions of the IL
authors' ``PC_Conv.py`` / ``PC_Prox_Conv.py`` (GitHub ``nalonso2/ILTheory``, commit 76330b8). The nets are
Conv2d + ReLU/Tanh + max/average pooling + flatten + Linear, in module form and in functional form
(``F.relu``, ``F.max_pool2d``, ``torch.flatten`` between modules, recorded by the recorder's function mode).
Every reference value is checked to be far from 0 before it is compared.
"""
from __future__ import annotations

import copy
import functools
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_fadjoint as tfa
from torch_fadjoint.optim import Consequentialism, InferenceLearning
from torch_fadjoint.optim.equilibrium import EquilibriumFAdjoint
from torch_fadjoint.rules.consequentialism import consequentialism_grads
from torch_fadjoint.rules.equilibrium import equilibrium_grads, relaxation_factor
from torch_fadjoint.rules.inference import inference_grads
from torch_fadjoint.rules.lfp import lfp_grads

from . import oracles
from .models import labelled, recorded

DT = torch.float64


# -- small CNNs ---------------------------------------------------------------------------------------
def _spread(model: nn.Module, seed: int, scale: float = 1.5) -> nn.Module:
    """Weights N(0, scale² / fan_in): unsaturated, mixed-sign pre-activations (ReLU masks neither all on nor off)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else max(p.numel(), 1)
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale / fan_in ** 0.5)
    return model


_POOLS = {
    "max": (lambda: nn.MaxPool2d(2), lambda h: F.max_pool2d(h, 2)),
    "avg": (lambda: nn.AvgPool2d(2), lambda h: F.avg_pool2d(h, 2)),
    "adaptive_avg": (lambda: nn.AdaptiveAvgPool2d(3), lambda h: F.adaptive_avg_pool2d(h, 3)),
}


class FunctionalCNN(nn.Module):
    """conv1 → F.relu → pool → conv2 → F.relu → torch.flatten → fc, the way pytorch/examples writes it.

    Input (B, 2, 8, 8): conv1 (2→4, 3×3, padding 1) 8×8 → pool 4×4 (adaptive: 3×3) → conv2 (4→5, 3×3) 2×2
    (adaptive: 1×1) → flatten 20 (5) → fc → 3 logits.
    """

    def __init__(self, pool: str = "max", bias: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(4, 5, 3, bias=bias)
        self.fc = nn.Linear(5 * (1 if pool == "adaptive_avg" else 4), 3, bias=bias)
        self.pool = _POOLS[pool][1]

    def forward(self, x):
        h = self.pool(F.relu(self.conv1(x)))
        h = F.relu(self.conv2(h))
        return self.fc(torch.flatten(h, 1))


def module_cnn(pool: str = "max", bias: bool = True) -> nn.Sequential:
    """The same net as :class:`FunctionalCNN`, as an nn.Sequential of modules."""
    n_flat = 5 * (1 if pool == "adaptive_avg" else 4)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=bias), nn.ReLU(), _POOLS[pool][0](),
                         nn.Conv2d(4, 5, 3, bias=bias), nn.ReLU(), nn.Flatten(), nn.Linear(n_flat, 3, bias=bias))


def make_cnn(form: str = "functional", pool: str = "max", bias: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = FunctionalCNN(pool, bias) if form == "functional" else module_cnn(pool, bias)
    return _spread(model.to(DT), seed)


def images(batch: int, shape=(2, 8, 8), classes: int = 3, seed: int = 1, nonneg: bool = False):
    x, t = labelled(batch, shape, classes, seed=seed)
    return (x.abs() if nonneg else x), t


def assert_nonzero(tensor, floor=1e-4):
    assert tensor.abs().max() > floor, f"reference is ~0 ({tensor.abs().max():.2e}): the comparison would be vacuous"


def rel_err(got, want) -> float:
    return ((got - want).norm() / want.norm()).item()


# -- §6.3 the equilibrium F-adjoint on CNNs -------------------------------------------------------------
class EqCNN(nn.Module):
    """conv1 → tanh → max pool → conv2 → relu → avg pool → flatten → fc (functional forward), and its chain
    split by hand for the oracle: [(A_k, maps_k)], Y^k = A_k(X^{k-1}), X^k = maps_k(Y^k).

    ``conv_top``: the top layer is a convolution whose output is flattened into the logits (X^L's shape is
    not Y^L's, so §6.3's top state starts from Y^L)."""

    def __init__(self, conv_top: bool = False):
        super().__init__()
        self.conv_top = conv_top
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=1, padding=1)
        self.top = nn.Conv2d(6, 3, 2) if conv_top else nn.Linear(6 * 2 * 2, 3)

    def pieces(self):
        mid = (lambda y: torch.flatten(F.avg_pool2d(torch.relu(y), 2), 1)) if not self.conv_top else \
            (lambda y: F.avg_pool2d(torch.relu(y), 2))
        last = (lambda y: torch.flatten(y, 1)) if self.conv_top else (lambda y: y)
        return [(self.conv1, lambda y: F.max_pool2d(torch.tanh(y), 2)), (self.conv2, mid), (self.top, last)]

    def forward(self, x):
        for layer, maps in self.pieces():
            x = maps(layer(x))
        return x


def _vjp(fn, at, cotangent, wrt=()):
    """(J_at^T v, [J_θ^T v for θ in wrt]) by autograd: the oracle's adjoints."""
    at = at.detach().requires_grad_(True)
    with torch.enable_grad():
        out = fn(at)
        grads = torch.autograd.grad(out, (at,) + tuple(wrt), cotangent, allow_unused=True)
    return grads[0], list(grads[1:])


def hand_equilibrium(model: EqCNN, x, out_adj, factor: float, init: str) -> dict:
    """§6.3 typed out: per layer a state Z^k in X^k's shape relaxes toward the drive J_X(A_{k+1})^T Ỹ^{k+1}
    (the top one toward D = J_maps^T X*^L in Y^L's shape, from X^L or, if its shape differs, from Y^L);
    Z(K) = drive + f (start − drive) with start = X^k (forward), X^k / B (scaled), 0 (zero);
    Ỹ^k = J_maps^T Z^k(K); feedback J_θ(A_k)^T Ỹ^k. Every J^T by autograd; non-sequential."""
    pieces = model.pieces()
    xs, ys = [x], []
    with torch.no_grad():
        for layer, maps in pieces:
            ys.append(layer(xs[-1]))
            xs.append(maps(ys[-1]))
    batch = x.shape[0]

    def relax(start, drive):
        start = {"forward": start, "scaled": start / batch, "zero": torch.zeros_like(start)}[init]
        return drive + factor * (start - drive)

    top = len(pieces) - 1
    drive, _ = _vjp(pieces[top][1], ys[top], out_adj)
    y_tilde = relax(xs[-1] if xs[-1].shape == drive.shape else ys[top], drive)
    grads = {}
    for k in range(top, -1, -1):
        layer, _ = pieces[k]
        drive, feedback = _vjp(layer, xs[k], y_tilde, list(layer.parameters()))
        grads.update(zip(layer.parameters(), feedback))
        if k > 0:
            y_tilde, _ = _vjp(pieces[k - 1][1], ys[k - 1], relax(xs[k], drive))
    return grads


def eq_cnn(conv_top=False, seed=3):
    torch.manual_seed(seed)
    return _spread(EqCNN(conv_top).to(DT), seed)


@pytest.mark.parametrize("equilibrium", [dict(steps=None), dict(t=math.inf), dict(tau=1.0, steps=1)],
                         ids=["K_none", "t_inf", "tau1_K1"])
@pytest.mark.parametrize("init", ["scaled", "forward", "zero"])
@pytest.mark.parametrize("form", ["functional", "modules"])
def test_equilibrium_at_k_infinity_is_the_fadjoint_bit_for_bit_on_a_cnn(equilibrium, init, form):
    """§6.3: K → ∞ (factor f = 0) makes every state its drive, so the non-sequential equilibrium feedback IS
    the F-adjoint's (§6.2), whatever the start: the same tensors bit for bit, and both equal autograd."""
    model = make_cnn(form, "max")
    x, t = images(6)
    net = recorded(model, x)
    _, out_adj = tfa.losses.cross_entropy(net.output, t)
    exact = tfa.sweep.fadjoint_grads(net, out_adj, retain_records=True)
    got = equilibrium_grads(net, out_adj, init=init, **equilibrium)
    want = oracles.autograd_grads(lambda: model(x), dict(model.named_parameters()), "cross_entropy", t)
    assert len(got) == len(exact) == len(want) == 6
    for name, p in model.named_parameters():
        assert_nonzero(want[name])
        torch.testing.assert_close(exact[p], want[name], rtol=0, atol=1e-12)
        assert torch.equal(got[p], exact[p]), name


@pytest.mark.parametrize("equilibrium", [dict(steps=None), dict(t=math.inf)], ids=["K_none", "t_inf"])
def test_non_sequential_equilibrium_optimizer_is_the_fadjoint_optimizer_on_a_cnn(equilibrium):
    """EquilibriumFAdjoint(sequential=False, K → ∞) takes FAdjoint's steps bit for bit on a CNN (momentum,
    Nesterov, weight decay), with the default init."""
    sgd = dict(lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-2)
    got, want = make_cnn(pool="avg"), make_cnn(pool="avg")
    net_got, net_want = tfa.FPropagation(got, graph=False), tfa.FPropagation(want, graph=False)
    opt_got = EquilibriumFAdjoint(net_got, sequential=False, loss="cross_entropy", **equilibrium, **sgd)
    opt_want = tfa.optim.FAdjoint(net_want, loss="cross_entropy", **sgd)
    for seed in range(3):
        x, t = images(5, seed=10 + seed)
        net_got(x)
        net_want(x)
        opt_got.step(target=t)
        opt_want.step(target=t)
    for p, q in zip(got.parameters(), want.parameters()):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
    assert (got.conv1.weight - make_cnn(pool="avg").conv1.weight).abs().max() > 1e-3


@pytest.mark.parametrize("init", ["scaled", "forward", "zero"])
@pytest.mark.parametrize("factor_args", [dict(tau=0.3, steps=5), dict(tau=0.1, steps=100)],
                         ids=["tau0.3_K5", "tau0.1_K100"])
@pytest.mark.parametrize("conv_top", [False, True], ids=["linear_top", "conv_top"])
def test_finite_k_equals_the_relaxation_typed_by_hand_on_a_cnn(init, factor_args, conv_top):
    """Finite K on a CNN: equilibrium_grads (closed form) and relaxation="euler" (the K-step loop) both equal
    §6.3 typed out with autograd adjoints (tanh → max pool and relu → avg pool between the states; the conv
    top's state starts from Y^L). At τ = 0.3, K = 5 the start's share is large, so a wrong start fails."""
    model = eq_cnn(conv_top)
    x, t = images(4, shape=(2, 8, 8), seed=4)
    net = recorded(model, x, keep_pre_activations=True)
    _, out_adj = tfa.losses.cross_entropy(net.output, t)
    factor = relaxation_factor(**factor_args)
    want = hand_equilibrium(model, x, out_adj, factor, init)
    exact = tfa.sweep.fadjoint_grads(net, out_adj, retain_records=True)
    closed = equilibrium_grads(net, out_adj, init=init, retain_records=True, **factor_args)
    euler = equilibrium_grads(net, out_adj, init=init, relaxation="euler", **factor_args)
    for p, g in want.items():
        assert_nonzero(g, 1e-5)
        scale = g.abs().max().item()
        torch.testing.assert_close(closed[p], g, rtol=0, atol=1e-12 * scale)
        torch.testing.assert_close(euler[p], g, rtol=0, atol=1e-12 * scale)
    if factor_args["steps"] == 5 and init != "zero":  # the start matters here: the oracle is not the F-adjoint
        assert rel_err(want[model.conv1.weight], exact[model.conv1.weight]) > 1e-2


def test_conv_top_start_needs_pre_activations():
    """§6.3: when X^L's shape is not Y^L's (a conv top flattened into logits) the top state starts from Y^L,
    which the recorder keeps only with keep_pre_activations=True; without it: a clear error, not a guess."""
    model = eq_cnn(conv_top=True)
    x, t = images(4, seed=4)
    net = recorded(model, x)
    _, out_adj = tfa.losses.cross_entropy(net.output, t)
    with pytest.raises(RuntimeError, match="keep_pre_activations"):
        equilibrium_grads(net, out_adj, tau=0.1, steps=100)


@pytest.mark.parametrize("init", ["scaled", "forward", "zero"])
@pytest.mark.parametrize("sequential", [False, True])
def test_closed_form_equals_euler_in_the_optimizer_on_a_cnn(init, sequential):
    """§2.2 on a CNN through the optimizer: the fused closed form and the explicit Euler loop give the same
    parameters after 3 steps with momentum, sequential or not (the sequential drive sees the new W^{k+1})."""
    kw = dict(lr=0.05, momentum=0.9, tau=0.2, steps=20, init=init, sequential=sequential, loss="cross_entropy")
    models = []
    for relaxation in ("closed_form", "euler"):
        model = make_cnn(pool="max")
        net = tfa.FPropagation(model, graph=False)
        opt = EquilibriumFAdjoint(net, relaxation=relaxation, **kw)
        for seed in range(3):
            x, t = images(5, seed=20 + seed)
            net(x)
            opt.step(target=t)
        models.append(model)
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert all(p.abs().max() < 10 for p in models[0].parameters())  # a stable run, not a blow-up
    assert (models[0].conv1.weight - make_cnn(pool="max").conv1.weight).abs().max() > 1e-3


def test_zero_start_is_the_fadjoint_times_a_power_of_one_minus_f_on_a_cnn():
    """From Z(0) = 0 every state is (1 − f) × its drive, and the drives compound: layer k of L gets exactly
    (1 − f)^{L−k+1} × the F-adjoint gradient (a closed form for the finite-K residual on any chain)."""
    model = make_cnn(pool="avg")
    x, t = images(6)
    net = recorded(model, x)
    _, out_adj = tfa.losses.cross_entropy(net.output, t)
    exact = tfa.sweep.fadjoint_grads(net, out_adj, retain_records=True)
    f = relaxation_factor(0.3, 4)
    got = equilibrium_grads(net, out_adj, tau=0.3, steps=4, init="zero")
    for power, layer in ((3, model.conv1), (2, model.conv2), (1, model.fc)):
        for p in layer.parameters():
            assert_nonzero(exact[p])
            torch.testing.assert_close(got[p], (1 - f) ** power * exact[p], rtol=1e-13,
                                       atol=1e-14 * exact[p].abs().max().item())


# The finite-K residual of the default start with a batch-MEAN loss (§6.3: "the DEFAULT becomes a start that keeps
# the finite-K residual below 1e-3 of the gradient for mean-reduced losses, on MLPs and CNNs alike").
def _residual_models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)).to(DT)
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 10)).to(DT)
    return {"mlp": mlp, "cnn": cnn}


@functools.lru_cache(maxsize=2)
def _first_mnist_images(data_root: str, batch: int):
    from torch_fadjoint import data as tfa_data

    train = tfa_data.load("mnist", data_root, download=False)["train"]
    return train.x[:batch].to(DT), train.t[:batch]


def _residual_ratios(arch: str, data_root, init: str, batch: int = 64) -> dict[str, float]:
    """‖g_eq − g_bp‖ / ‖g_bp‖ per parameter, τ = 0.1, K = 100, non-sequential, mean cross-entropy, on the first
    ``batch`` MNIST training images (normalised as pytorch/examples does), torch's default init (seed 0)."""
    x, t = _first_mnist_images(str(data_root), batch)
    model = _residual_models()[arch]
    net = recorded(model, x)
    _, out_adj = tfa.losses.cross_entropy(net.output, t)
    exact = tfa.sweep.fadjoint_grads(net, out_adj, retain_records=True)
    got = equilibrium_grads(net, out_adj, tau=0.1, steps=100, init=init)
    for p in model.parameters():
        assert_nonzero(exact[p], 1e-6)
    return {name: rel_err(got[p], exact[p]) for name, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_default_start_keeps_the_finite_k_residual_below_1e_3(arch, data_root):
    """§6.3's requirement on the default start (so the default is init="zero"), as written: every parameter's ‖g_eq − g_bp‖ / ‖g_bp‖ < 1e-3 at
    τ = 0.1, K = 100, batch 64, batch-mean loss, on a 784-256-10 ReLU MLP and on a small ReLU/max-pool CNN.

    Measured (this file's models, first 64 MNIST images): init="scaled" MLP 1.19e-3 / 2.51e-3 / 7.4e-5 / 2.0e-4,
    CNN 1.29e-1 / 4.94e-1 / 1.0e-2 / 2.9e-2 / 1.4e-4 / 2.4e-4 (weights and biases, bottom up); init="forward"
    64–66× those (MLP 7.6e-2 / 1.6e-1 / 4.5e-3 / 1.2e-2; CNN 8.3 / 32 / 0.65 / 1.9 / 9.5e-3 / 1.6e-2). The
    residual f·X^k/B adds coherently over the batch AND the output positions (ReLU states are ≥ 0), while the
    drive's share per position shrinks with their number, so dividing by B alone is not the loss's
    normalisation on a convolution (even X^k·‖drive‖/‖X^k‖ leaves 9e-3 on conv1's bias); init="zero" meets the
    bound exactly: 1 − (1 − f)^{L−k+1} ≈ 3e-5 per layer (see the zero-start test).
    """
    default = inspect.signature(tfa.optim.EquilibriumFAdjoint).parameters["init"].default
    assert default == "zero"  # the only start measured to meet the bound (the finding above)
    ratios = _residual_ratios(arch, data_root, default)
    assert max(ratios.values()) < 1e-3, ratios
    assert max(_residual_ratios(arch, data_root, "scaled").values()) > 1e-3  # the finding stays true


def test_forward_start_swamps_the_first_conv_and_scaled_shrinks_every_residual(data_root):
    """The literal start (init="forward", the reference reproduction) with a mean loss: at batch 64 the first
    conv's update is more than its gradient away from it (§6.3's measurement: "13×" on its CNN; 8.3× here),
    and X^k / B shrinks every parameter's residual by more than 10× (measured: 64–66×)."""
    forward = _residual_ratios("cnn", data_root, "forward")
    scaled = _residual_ratios("cnn", data_root, "scaled")
    assert forward["1.weight"] > 1.0, forward
    for name in forward:
        assert scaled[name] < forward[name] / 10, (name, scaled[name], forward[name])


# -- §6.4 LFP on CNNs: with ε → 0 on ReLU nets it is the gradient rescaled by |θ| ---------------------------
@pytest.mark.parametrize("batch_reduction", ["mean", "sum"])
@pytest.mark.parametrize("batch", [1, 6])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("pool", ["max", "avg", "adaptive_avg"])
@pytest.mark.parametrize("form", ["functional", "modules"])
def test_lfp_on_relu_cnn_is_abs_theta_times_the_cross_entropy_gradient(form, pool, bias, batch, batch_reduction):
    """§3.4 / §6.4 on a ReLU CNN (conv → relu → pool → conv → relu → flatten → fc), ε = 1e-12:
    F_θ = −|θ| ⊙ B·∂J/∂θ for every parameter, J the MEAN cross-entropy of the logits.

    Why that J: lfp_grads's default reward is R^L = X^L ⊙ (onehot − softmax(X^L)) and the top layer has no map,
    so S^L = R^L / Y^L = onehot − softmax(X^L) = −B·X*^L, X*^L = (softmax − onehot) / B being ∂J/∂X^L of the
    mean cross-entropy (§1.3): the loss "whose output adjoint matches the reward". Induction S^k = −B·Y*^k:
    R^{k-1} = X^{k-1} ⊙ J_X^T S^k = X^{k-1} ⊙ (−B X*^{k-1}); flatten reshapes it; max pooling routes it to the
    arg-max, where its input equals X^{k-1}, and average pooling's ε-rule gives P_in ⊙ pool^T(R / P_out) =
    P_in ⊙ pool^T(−B X*); so the reward at the conv output is relu(Y) ⊙ pool^T(−B X*), and S = that / Y =
    1[Y > 0] ⊙ pool^T(−B X*) = −B·Y*^{k-1} (the bias inside Y does not matter: relu(Y)/Y = 1[Y > 0]). Then
    F_θ = |θ| ⊙ J_θ^T S = −B |θ| ⊙ ∂J/∂θ, and lfp_grads returns −F/B = |θ| ⊙ ∂J/∂θ ("mean") or −F ("sum").
    The residual is linear in ε (S = R / (Y ± ε)); the oracle is autograd.
    """
    model = make_cnn(form, pool, bias, seed=2)
    x, t = images(batch, seed=5)
    params = dict(model.named_parameters())
    want = oracles.autograd_grads(lambda: model(x), params, "cross_entropy", t)
    net = recorded(model, x, keep_pre_activations=True)
    got = lfp_grads(net, t, eps=1e-12, batch_reduction=batch_reduction)
    scale = 1.0 if batch_reduction == "mean" else float(batch)
    assert len(got) == len(params) == (6 if bias else 3)
    for name, p in params.items():
        assert_nonzero(want[name], 1e-3)
        torch.testing.assert_close(got[p], scale * p.detach().abs() * want[name], rtol=0, atol=1e-9)


def test_lfp_on_tanh_cnn_is_not_the_gradient():
    """The identity needs σ(Y)/Y = σ'(Y): with tanh LFP uses the secant slope, and it fails (the test above
    can fail)."""
    model = make_cnn("modules", "max", seed=2)
    model[1] = nn.Tanh()
    x, t = images(6, seed=5)
    params = dict(model.named_parameters())
    want = oracles.autograd_grads(lambda: model(x), params, "cross_entropy", t)
    got = lfp_grads(recorded(model, x, keep_pre_activations=True), t, eps=1e-12)
    assert rel_err(got[model[0].weight], model[0].weight.detach().abs() * want["0.weight"]) > 1e-2
    torch.testing.assert_close(got[model[6].weight], model[6].weight.detach().abs() * want["6.weight"],
                               rtol=0, atol=1e-9)  # above the first tanh it still holds


# -- §6.5 patch-NLMS on convolutions ------------------------------------------------------------------------
def _layer_delta(prefix, suffix, x, t):
    """(Y, Δ = ∂J/∂Y) of the layer ``prefix`` ends with, J the mean cross-entropy of suffix(Y): by autograd."""
    with torch.enable_grad():
        y = prefix(x).detach().requires_grad_(True)
        loss = F.cross_entropy(suffix(y), t)
        (delta,) = torch.autograd.grad(loss, y)
    return delta


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_patch_nlms_with_one_output_position_is_per_sample_nlms(batch, bias):
    """§6.5: a Conv2d whose kernel covers its whole input (one output position) is a Linear over the flattened
    input, and patch-NLMS is then §4's per-sample NLMS: G = B Δᵀ diag(1 / (‖x̃_b‖² + δ)) X̃, X̃ = [X, 1] (the 1
    only with a bias). Checked against (a) mode="nlms" on the equivalent Linear net (conv weight reshaped),
    with the default δ = 1e-3 · mean_b ‖x̃_b‖², and (b) the formula typed here with Δ from autograd."""
    torch.manual_seed(4)
    conv_net = _spread(nn.Sequential(nn.Conv2d(3, 5, (4, 3), bias=bias), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(5, 4, bias=bias)).to(DT), 4)
    conv = conv_net[0]
    lin_net = nn.Sequential(nn.Flatten(), nn.Linear(36, 5, bias=bias), nn.ReLU(), nn.Linear(5, 4, bias=bias)).to(DT)
    with torch.no_grad():
        lin_net[1].weight.copy_(conv.weight.reshape(5, 36))
        if bias:
            lin_net[1].bias.copy_(conv.bias)
        lin_net[3].load_state_dict(conv_net[3].state_dict())
    x, t = images(batch, shape=(3, 4, 3), classes=4, seed=6)
    grads = {}
    for name, model in (("conv", conv_net), ("linear", lin_net)):
        net = recorded(model, x)
        _, out_adj = tfa.losses.cross_entropy(net.output, t)
        grads[name] = consequentialism_grads(net, out_adj, "nlms")
    got_w = grads["conv"][conv.weight].reshape(5, 36)
    torch.testing.assert_close(got_w, grads["linear"][lin_net[1].weight], rtol=1e-13, atol=1e-15)
    for p, q in zip(conv_net[3].parameters(), lin_net[3].parameters()):
        torch.testing.assert_close(grads["conv"][p], grads["linear"][q], rtol=1e-13, atol=1e-15)
    # (b) §4 typed out
    delta_out = _layer_delta(conv, conv_net[1:], x, t).reshape(batch, 5)
    x_tilde = x.reshape(batch, 36)
    if bias:
        x_tilde = torch.cat([x_tilde, torch.ones(batch, 1, dtype=DT)], 1)
    energy = (x_tilde ** 2).sum(1)
    reg = 1e-3 * energy.mean()
    g = batch * delta_out.T @ (x_tilde / (energy + reg)[:, None])
    assert_nonzero(g, 1e-3)
    torch.testing.assert_close(got_w, g[:, :36], rtol=1e-12, atol=1e-15)
    if bias:
        torch.testing.assert_close(grads["conv"][conv.bias], g[:, 36], rtol=1e-12, atol=1e-15)


def unfold_patch_nlms(conv: nn.Conv2d, x_prev, delta_out, delta=None, delta_rel=1e-3):
    """§6.5 with explicit patches: G = B Σ_{b,p} Δ_{b,p}ᵀ x̃_{b,p} / (‖x̃_{b,p}‖² + δ) per group (F.unfold),
    x̃ = [patch, 1] with a bias; δ = delta, or delta_rel × the mean of ‖x̃‖² over batch, positions and groups.
    Returns (grad_w in conv.weight's shape, grad_b or None)."""
    batch, groups = x_prev.shape[0], conv.groups
    c_in, c_out = conv.in_channels // groups, conv.out_channels // groups
    patches, energies = [], []
    for g in range(groups):
        cols = F.unfold(x_prev[:, g * c_in:(g + 1) * c_in], conv.kernel_size, dilation=conv.dilation,
                        padding=conv.padding, stride=conv.stride)  # (B, c_in·kh·kw, P)
        if conv.bias is not None:
            cols = torch.cat([cols, torch.ones_like(cols[:, :1])], 1)
        patches.append(cols)
        energies.append((cols ** 2).sum(1))  # (B, P)
    reg = delta if delta is not None else delta_rel * torch.stack(energies).mean()
    delta_out = delta_out.flatten(2)  # (B, C_out, P)
    grad_w, grad_b = [], []
    for g in range(groups):
        d_g = delta_out[:, g * c_out:(g + 1) * c_out] / (energies[g] + reg)[:, None, :]
        full = batch * torch.einsum("bop,bip->oi", d_g, patches[g])
        grad_w.append(full[:, :c_in * conv.kernel_size[0] * conv.kernel_size[1]])
        grad_b.append(full[:, -1])
    grad_w = torch.cat(grad_w).reshape(conv.weight.shape)
    return grad_w, (torch.cat(grad_b) if conv.bias is not None else None)


@pytest.mark.parametrize("delta", [None, 0.7], ids=["default_delta", "delta0.7"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_patch_nlms_equals_an_explicit_unfold(bias, delta):
    """§6.5 on conv1 (stride 2, padding 1, dilation 2, groups 2) and on conv2 (its input a ReLU + max-pool
    map): consequentialism_grads(mode="nlms") equals the patch sums typed with F.unfold, Δ from autograd;
    mode="consequentialism" uses the same patch-NLMS on convolutions (and the B × B solve on the Linear)."""
    torch.manual_seed(5)
    model = _spread(nn.Sequential(
        nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2, bias=bias), nn.ReLU(),    # 9×9 → 4×4
        nn.Conv2d(6, 4, 2, bias=bias), nn.ReLU(), nn.MaxPool2d(2, stride=1), nn.Flatten(),   # 3×3 → 2×2
        nn.Linear(16, 3, bias=bias)).to(DT), 5)
    x, t = images(3, shape=(4, 9, 9), seed=7)
    net = recorded(model, x)
    _, out_adj = tfa.losses.cross_entropy(net.output, t)
    got = consequentialism_grads(net, out_adj, "nlms", delta, retain_records=True)
    conseq = consequentialism_grads(net, out_adj, "consequentialism", delta)
    conv1, conv2 = model[0], model[2]
    with torch.no_grad():
        x1 = torch.relu(conv1(x))
    for conv, x_prev, prefix, suffix in ((conv1, x, conv1, model[1:]), (conv2, x1, conv2, model[3:])):
        want_w, want_b = unfold_patch_nlms(conv, x_prev, _layer_delta(prefix, suffix, x_prev, t), delta)
        assert_nonzero(want_w, 1e-3)
        torch.testing.assert_close(got[conv.weight], want_w, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(conseq[conv.weight], got[conv.weight], rtol=0, atol=0)
        if bias:
            assert_nonzero(want_b, 1e-3)
            torch.testing.assert_close(got[conv.bias], want_b, rtol=1e-12, atol=1e-15)
    assert rel_err(conseq[model[6].weight], got[model[6].weight]) > 1e-3  # the Linear: the B × B solve


# -- §6.6 inference learning on CNNs ------------------------------------------------------------------------
def _cnn_layers(model):
    """(conv1, conv2, fc) of make_cnn's net in either form."""
    return (model.conv1, model.conv2, model.fc) if isinstance(model, FunctionalCNN) else (model[0], model[3], model[6])


def _cnn_top_input(model, x):
    """r = flatten(relu(conv2(pool(relu(conv1(x)))))), the fc's input, computed from the modules."""
    with torch.no_grad():
        if isinstance(model, FunctionalCNN):
            h = model.pool(F.relu(model.conv1(x)))
            return torch.flatten(F.relu(model.conv2(h)), 1)
        return model[:6](x)


@pytest.mark.parametrize("T", [0, 7])
@pytest.mark.parametrize("clamp", [1.0, 0.6])
@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize("form", ["functional", "modules"])
def test_il_without_inference_keeps_the_forward_states_on_a_cnn(form, pool, clamp, T):
    """§5.1 / §6.6 with γ_top = γ_bot = 0: no state moves, so every hidden state equals its prediction
    (x̂^k = ρ(a^k) = X^k, through the pooling too) and every hidden error is exactly 0; the clamped top
    x̂^L = n onehot + (1 − n) softmax(X^L) (re-clamped from the unchanged logits) leaves e^L = n (onehot −
    softmax(X^L)), also with T = 0 (the initial clamp alone). So only fc learns: ∂W = −e^Lᵀ r / B,
    ∂b = −mean_b e^L, r the fc's input from the forward."""
    model = make_cnn(form, pool, seed=6)
    x, t = images(5, seed=8)
    grads = inference_grads(recorded(model, x), t, "il", T=T, gamma_top=0.0, gamma_bot=0.0, clamp=clamp)
    conv1, conv2, fc = _cnn_layers(model)
    r = _cnn_top_input(model, x)
    with torch.no_grad():
        e_top = clamp * (F.one_hot(t, 3).to(DT) - torch.softmax(fc(r), 1))
    assert_nonzero(e_top, 1e-2)
    torch.testing.assert_close(grads[fc.weight], -e_top.T @ r / 5, rtol=0, atol=1e-15)
    torch.testing.assert_close(grads[fc.bias], -e_top.mean(0), rtol=0, atol=1e-15)
    for p in (*conv1.parameters(), *conv2.parameters()):
        assert torch.equal(grads[p], torch.zeros_like(p))
    assert len(grads) == 6


@pytest.mark.parametrize("conv_details", [False, True])
@pytest.mark.parametrize("T", [0, 3])
def test_il_prox_proximal_output_target_at_batch_1_on_a_cnn(T, conv_details):
    """§5.2 / §6.6 at batch 1 with γ = 0 (the hidden states stay ĥ^k = P^k, hidden errors 0): the output target
    is ĥ^L = (softmax(P^L) + α N onehot) / (1 + α N) with N = N_0 = ‖ρ(ĥ^{L-1})‖² + ε before any iteration
    (+1 with conv_details, PC_Prox_Conv.py's initial N_0) and N = ‖ρ(ĥ^{L-1})‖² + 1 + ε once step 3 ran; the
    step W^L += e rᵀ / N^L, b^L += e / N^L, N^L = ‖r‖² + 1 + ε, r = flatten(ρ(ĥ^{L-1})) the fc's input, moves the
    logits to P^L + e (‖r‖² + 1) / N^L: the proximal target P^L + e up to ε / N^L (SGD lr = 1, the authors' step)."""
    model = make_cnn("functional", "max", seed=7)
    x, t = images(1, seed=9)
    alpha, eps = 2.5, 0.25
    r = _cnn_top_input(model, x)
    with torch.no_grad():
        logits = model(x)
    old = copy.deepcopy(model)
    net = tfa.FPropagation(model, graph=False)
    opt = InferenceLearning(net, variant="il_prox", T=T, gamma_top=0.0, gamma_bot=0.0, alpha=alpha, prox_eps=eps,
                            conv_details=conv_details)
    net(x)
    opt.step(target=t)
    sq = (r ** 2).sum()
    norm = sq + (1.0 if (T > 0 or conv_details) else 0.0) + eps
    target = (torch.softmax(logits, 1) + alpha * norm * F.one_hot(t, 3).to(DT)) / (1 + alpha * norm)
    e = target - torch.softmax(logits, 1)
    n_top = sq + 1 + eps
    assert_nonzero(e, 1e-2)
    torch.testing.assert_close(model.fc.weight - old.fc.weight, e.T @ r / n_top, rtol=0, atol=1e-15)
    torch.testing.assert_close(model.fc.bias - old.fc.bias, e[0] / n_top, rtol=0, atol=1e-15)
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits + e * (sq + 1) / n_top, rtol=0, atol=1e-14)
    for p, q in zip((*model.conv1.parameters(), *model.conv2.parameters()),
                    (*old.conv1.parameters(), *old.conv2.parameters())):
        assert torch.equal(p, q)


# -- transcriptions of the authors' CNN files (nalonso2/ILTheory @ 76330b8) at batch 1 ----------------------
# Where the two files differ from PC.py / proxPC.py and from us (line numbers of the files at that commit):
# * PC_Conv.py l. 94 clamps with the raw logits, n·onehot + (1 − n)·h[-1] (PC.py l. 94: softmax(h[-1])), and never
#   re-clamps in the loop (PC.py l. 130 does). We follow PC.py (§5.1): equal only at n = 1, the clamp of the
#   authors' CNN runs (train_MLP_Conv.py l. 125, main.py l. 66–67); at n = 0.35 the updates differ by ~100 %.
# * PC_Prox_Conv.py l. 101 halves e^L during the iterations and l. 89 adds +1 (``self.bias``) to N_0: §6.6's two
#   details, ``conv_details=True``. l. 119 sums over the batch (ours: mean; equal at batch 1).
# * PC_Prox_Conv.py l. 223/227 normalise layer 1 by relu(x)², although block 0 (l. 36–38) feeds x to the conv without
#   a ReLU; we use x (§5.2): identical for x ≥ 0 (their CIFAR pixels, and the inputs here).
# * Neither file has pooling. With a pooling at the head of the next block (§6.6's placement) PC_Conv.py's code
#   computes exactly our IL (tested below); PC_Prox_Conv.py's normaliser, relu(targ[i]) (l. 223/227), would then be
#   taken over the UNPOOLED state, ours over the pooled input of the layer (as for Flatten, where the two agree).
_softmax = nn.Softmax(dim=1)
_mse = nn.MSELoss(reduction="sum")
_relu = nn.ReLU()


def _pc_conv_reference(wts, x, global_target, n_iter, bot_gamma, top_gamma, n, lr):
    """PC_Conv.py's PC.train_wts with t_type=2, smax=True, crossEnt=True, adam=False, line by line: compute_values
    (l. 74–84), compute_PC_targets (l. 89–130), PC_update (l. 210–230) with its per-block SGD(lr) (l. 62–71).
    ``wts``: the authors' nn.Sequential of blocks (updated in place); returns the targets."""
    num_layers = len(wts) + 1
    with torch.no_grad():                                                   # compute_values
        h = [torch.randn(1, 1) for i in range(num_layers)]
        h[0] = x.clone()
        for i in range(1, num_layers):
            h[i] = wts[i - 1](h[i - 1].detach())
    with torch.no_grad():                                                   # compute_PC_targets
        targ = [h[i].clone() for i in range(num_layers)]
        eps = [torch.zeros_like(h[i]) for i in range(num_layers)]
        p = [h[i].clone() for i in range(num_layers)]
        targ[-1] = n * global_target.clone() + (1 - n) * h[-1]
    for i in range(n_iter):
        with torch.no_grad():
            for layer in range(1, num_layers - 1):
                eps[layer] = targ[layer] - p[layer]
            eps[-1] = (targ[-1] - _softmax(p[-1])) * .5
        for layer in range(1, num_layers - 1):
            _, epsdfdt = torch.autograd.functional.vjp(wts[layer], targ[layer], eps[layer + 1])
            with torch.no_grad():
                dt = top_gamma * -eps[layer] + bot_gamma * epsdfdt
                targ[layer] = targ[layer] + dt
        with torch.no_grad():
            for layer in range(1, num_layers):
                p[layer] = wts[layer - 1](targ[layer - 1].detach())
    optims = [torch.optim.SGD(wts[k].parameters(), lr=lr) for k in range(len(wts))]
    for i in range(num_layers - 1):                                         # PC_update
        if i < (num_layers - 2):
            pred = wts[i](targ[i].detach())
            loss = .5 * _mse(pred, targ[i + 1].detach()) / pred.size(0)
        else:
            pred = wts[i](targ[i].detach())
            loss = -torch.mean((targ[-1].detach() * torch.log(_softmax(pred))).sum(1))
        optims[i].zero_grad()
        params = list(wts[i].parameters())
        for prm, g in zip(params, torch.autograd.grad(loss, params)):      # loss.backward()
            prm.grad = g
        optims[i].step()
    return targ


def _pc_prox_conv_reference(wts, x, global_target, n_iter, bot_gamma, top_gamma, l_rate, eps_, bias=True):
    """PC_Prox_Conv.py's PC_prox.train_wts with t_type=2, smax=True, crossEnt=True, adam=False, line by line:
    compute_values (l. 71–81), compute_PC_targets (l. 84–127), PC_update (l. 201–231) with SGD(lr=1) per block
    (l. 60–68); ``l_rate`` is α, ``eps_`` is ε, ``bias`` the +1. The parametric module of block i is
    ``wts[i][-2]`` for i == 2 (its block ends in Flatten) else ``wts[i][-1]``, as l. 222–229 index it."""
    num_layers = len(wts) + 1
    with torch.no_grad():                                                   # compute_values
        h = [torch.randn(1, 1) for i in range(num_layers)]
        h[0] = x.clone()
        for i in range(1, num_layers):
            h[i] = wts[i - 1](h[i - 1].detach())
    with torch.no_grad():                                                   # compute_PC_targets
        targ = [h[i].clone() for i in range(num_layers)]
        eps = [torch.zeros_like(h[i]) for i in range(num_layers)]
        p = [h[i].clone() for i in range(num_layers)]
        nm = torch.mean(torch.square(_relu(h[-2])).sum(1)).item() + eps_ + bias
        targ[-1] = (1 / (1 + nm * l_rate)) * _softmax(h[-1]) + (nm * l_rate / (1 + nm * l_rate)) * global_target.clone()
    for i in range(n_iter):
        with torch.no_grad():
            for layer in range(1, num_layers - 1):
                eps[layer] = targ[layer] - p[layer]
            eps[-1] = (targ[-1] - _softmax(p[-1])) * .5
        for layer in range(1, num_layers - 1):
            _, epsdfdt = torch.autograd.functional.vjp(wts[layer], targ[layer], eps[layer + 1])
            with torch.no_grad():
                dt = top_gamma * -eps[layer] + bot_gamma * epsdfdt
                targ[layer] = targ[layer] + dt
        with torch.no_grad():
            nm = torch.mean(torch.square(_relu(targ[-2])).sum()).item() + bias + eps_
            targ[-1] = ((1 / (1 + nm * l_rate)) * _softmax(p[-1])
                        + (nm * l_rate / (1 + nm * l_rate)) * global_target.clone())
        with torch.no_grad():
            for layer in range(1, num_layers):
                p[layer] = wts[layer - 1](targ[layer - 1].detach())
    optims = [torch.optim.SGD(wts[k].parameters(), lr=1) for k in range(len(wts))]
    for i in range(num_layers - 1):                                         # PC_update
        if i < (num_layers - 2):
            pred = wts[i](targ[i].detach())
            loss = .5 * _mse(pred, targ[i + 1].detach()) / pred.size(0)
        else:
            pred = wts[i](targ[i].detach())
            loss = -torch.mean((targ[-1].detach() * torch.log(_softmax(pred))).sum(1))
        optims[i].zero_grad()
        params = list(wts[i].parameters())
        for prm, g in zip(params, torch.autograd.grad(loss, params)):      # loss.backward()
            prm.grad = g
        with torch.no_grad():
            layer = wts[i][-2] if i == 2 else wts[i][-1]
            nm = torch.mean(torch.square(_relu(targ[i])).sum(1)) + bias + eps_
            layer.weight.grad /= nm
            layer.bias.grad /= nm
        optims[i].step()
    return targ


def _authors_convs(seed):
    """Their CIFAR net's geometry with fewer channels: 3×32×32 → conv 5×5/2 (4) 14×14 → conv 5×5/2 (6) 5×5 →
    conv 3×3/2 (8) 2×2 → flatten 32 → Linear → 5 logits; all with bias, as the authors'."""
    torch.manual_seed(seed)
    mods = [nn.Conv2d(3, 4, (5, 5), stride=(2, 2)), nn.Conv2d(4, 6, (5, 5), stride=(2, 2)),
            nn.Conv2d(6, 8, (3, 3), stride=(2, 2)), nn.Linear(32, 5)]
    return [_spread(m.to(DT), seed + i, scale=2.0) for i, m in enumerate(mods)]


def _il_pooled_convs(seed):
    """A pooled variant: 3×16×16 → conv 3×3 pad 1 (4) → max pool 2 → conv 3×3 (6) 6×6 → avg pool 2 → conv 3×3 (8)
    1×1 → Linear → 5."""
    torch.manual_seed(seed)
    mods = [nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 3), nn.Conv2d(6, 8, 3), nn.Linear(8, 5)]
    return [_spread(m.to(DT), seed + i, scale=2.0) for i, m in enumerate(mods)]


def _il_nets(arch: str, seed: int = 11):
    """(our model, the authors' wts over deep copies of the same layers, input shape), for PC_Conv.py.

    PC_Conv.py's blocks are [conv, ReLU] ×2, [conv, ReLU, Flatten], [Linear]; the pooled variant puts each
    pooling at the head of the next block, which is where §6.6 puts it (the next layer's map), so both
    parametrise the same states x̂^k = ρ(a^k) (before pooling)."""
    if arch == "authors":
        c1, c2, c3, fc = _authors_convs(seed)
        ours = nn.Sequential(c1, nn.ReLU(), c2, nn.ReLU(), c3, nn.ReLU(), nn.Flatten(), fc)
        d1, d2, d3, dfc = copy.deepcopy([c1, c2, c3, fc])
        wts = nn.Sequential(nn.Sequential(d1, nn.ReLU()), nn.Sequential(d2, nn.ReLU()),
                            nn.Sequential(d3, nn.ReLU(), nn.Flatten()), nn.Sequential(dfc))
        return ours, wts, (3, 32, 32)
    c1, c2, c3, fc = _il_pooled_convs(seed)
    ours = nn.Sequential(c1, nn.ReLU(), nn.MaxPool2d(2), c2, nn.ReLU(), nn.AvgPool2d(2), c3, nn.ReLU(),
                         nn.Flatten(), fc)
    d1, d2, d3, dfc = copy.deepcopy([c1, c2, c3, fc])
    wts = nn.Sequential(nn.Sequential(d1, nn.ReLU()), nn.Sequential(nn.MaxPool2d(2), d2, nn.ReLU()),
                        nn.Sequential(nn.AvgPool2d(2), d3, nn.ReLU(), nn.Flatten()), nn.Sequential(dfc))
    return ours, wts, (3, 16, 16)


def _parametric(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("arch", ["authors", "pooled"])
def test_il_matches_transcribed_pc_conv_py(arch, batch):
    """InferenceLearning(variant="il") against PC_Conv.py typed out (n = 1, their CIFAR runs' clamp): the ½ on
    e^L only during the iterations, the parallel state update with autograd's vjp of each block at the states
    before the iteration, the local losses' SGD step. PC_Conv.py averages over the batch everywhere, so
    batch 3 matches too. x ≥ 0 (pixels). (With γ_top = 0.1, γ_bot = 0.2 the pooled net's inference nears
    instability and rounding grows to ~1e-11; the authors' γ's keep it at ~1e-15.)"""
    ours, wts, shape = _il_nets(arch)
    x, t = images(batch, shape=shape, classes=5, seed=12, nonneg=True)
    onehot = F.one_hot(t, 5).to(DT)
    T, g_top, g_bot, lr = 25, 0.005, 0.02, 0.05  # train_MLP_Conv.py l. 146–147 (IL-SGD); lr as §5.1's MNIST
    before = copy.deepcopy(_parametric(ours))
    _pc_conv_reference(wts, x, onehot, T, g_bot, g_top, 1.0, lr)
    net = tfa.FPropagation(ours, graph=False)
    opt = InferenceLearning(net, lr=lr, variant="il", T=T, gamma_top=g_top, gamma_bot=g_bot, clamp=1.0)
    net(x)
    opt.step(target=t)
    for mine, theirs, old in zip(_parametric(ours), _parametric(wts), before):
        for p, q, o in zip(mine.parameters(), theirs.parameters(), old.parameters()):
            assert_nonzero(q - o, 1e-5)  # every layer learns, the hidden ones through the inference
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-12)


def test_il_prox_matches_transcribed_pc_prox_conv_py_batch1():
    """InferenceLearning(variant="il_prox", conv_details=True) against PC_Prox_Conv.py typed out at batch 1 (its
    step-3 batch SUM then equals our mean; x ≥ 0, so its relu(x) in the normaliser is x): the ½ on e^L during
    the iterations and the +1 in the initial N_0 (conv_details), the normaliser of a conv layer = mean over the
    positions of Σ_channels ρ(ĥ^{k-1})² + 1 + ε, the stale P^L in step 3, the normalised step with lr = 1."""
    c1, c2, c3, fc = _authors_convs(13)
    ours = nn.Sequential(c1, nn.ReLU(), c2, nn.ReLU(), c3, nn.ReLU(), nn.Flatten(), fc)
    d1, d2, d3, dfc = copy.deepcopy([c1, c2, c3, fc])
    wts = nn.Sequential(nn.Sequential(d1), nn.Sequential(nn.ReLU(), d2), nn.Sequential(nn.ReLU(), d3, nn.Flatten()),
                        nn.Sequential(nn.ReLU(), dfc))
    x, t = images(1, shape=(3, 32, 32), classes=5, seed=14, nonneg=True)
    T, g_top, g_bot, alpha, eps = 25, 0.1, 0.2, 2.5, 0.25
    before = copy.deepcopy(_parametric(ours))
    _pc_prox_conv_reference(wts, x, F.one_hot(t, 5).to(DT), T, g_bot, g_top, alpha, eps)
    net = tfa.FPropagation(ours, graph=False)
    opt = InferenceLearning(net, variant="il_prox", T=T, gamma_top=g_top, gamma_bot=g_bot, alpha=alpha,
                            prox_eps=eps, conv_details=True)
    net(x)
    opt.step(target=t)
    for mine, theirs, old in zip(_parametric(ours), _parametric(wts), before):
        for p, q, o in zip(mine.parameters(), theirs.parameters(), old.parameters()):
            assert_nonzero(q - o, 1e-5)
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-12)
