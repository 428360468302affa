"""The step's safety net has no holes (issue 20; docs/maths.md §6.7): per rule and validate mode.

* Stale trust: whatever the step reads is read in that step. A momentum buffer or a parameter changed behind
  its version counter (``.data``, ``.numpy()``, ``vector_to_parameters``) after a step is checked like any
  other: a non-finite or overflowing update is refused, nothing is written.
* Refused, but written: a malformed loaded state (a 0-dim or Python-number momentum buffer) is refused at
  ``load_state_dict`` and at ``step`` before anything changes; under ``validate="async"`` a refused step's
  ``.grad`` and new momentum buffers are gone once its error is raised, so training continues exactly as a
  run that never saw it (dampening ≠ 0 included).
* Errors that name what was given and what is expected, in one line.
"""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_fadjoint as tfa

from .state import assert_untouched, snapshot

DT = torch.float64

RULES = {
    "fadjoint": lambda net, v, **kw: tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9, validate=v, **kw),
    "fused": lambda net, v, **kw: tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9, fuse_update=True, validate=v, **kw),
    "lfp": lambda net, v, **kw: tfa.optim.LFP(net, lr=0.1, momentum=0.9, validate=v, **kw),
    "equilibrium": lambda net, v, **kw: tfa.optim.EquilibriumFAdjoint(net, lr=0.1, momentum=0.9, loss="cross_entropy",
                                                                      validate=v, **kw),
    "equilibrium_parallel": lambda net, v, **kw: tfa.optim.EquilibriumFAdjoint(
        net, lr=0.1, momentum=0.9, loss="cross_entropy", sequential=False, validate=v, **kw),
}
MODES = [True, "async"]


def _setup(rule, validate, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 5)).to(DT)
    net = tfa.FPropagation(model)
    opt = RULES[rule](net, validate, **kw)
    x = torch.randn(3, 6, dtype=DT)  # batch 3: the fused rule keeps 0.weight's factors (3·(40+6) < 40·6)
    t = torch.tensor([0, 3, 4])
    net(x)
    opt.step(target=t)
    return model, net, opt, x, t


def _refused(net, opt, x, t, validate, model, before, match):
    """The next step (after a forward) is refused and nothing was written."""
    net(x)
    _step_refused(opt, t, validate, model, before, match, match)


def _step_refused(opt, t, validate, model, before, match, async_match):
    """``opt.step(target=t)`` is refused — now (validate=True: ``match``), or decided on the device with masked
    writes and raised by ``synchronize`` (async: ``async_match``) — and nothing was written."""
    if validate is True:
        with pytest.raises(RuntimeError, match=match):
            opt.step(target=t)
    else:
        opt.step(target=t)
        with pytest.raises(RuntimeError, match=async_match):
            opt.synchronize()
    assert_untouched(before, model, opt)


@pytest.mark.parametrize("validate", MODES)
@pytest.mark.parametrize("rule", sorted(RULES))
def test_a_momentum_buffer_poked_through_data_is_refused(rule, validate):
    """The issue's red-team case: one step, then a NaN written into a buffer through ``.data`` (no version bump);
    the old step trusted a cached bound and wrote NaN into the weight."""
    model, net, opt, x, t = _setup(rule, validate)
    opt.state[model[0].weight]["momentum_buffer"].data[0, 0] = float("nan")
    before = snapshot(model, opt, grads=validate is True)
    _refused(net, opt, x, t, validate, model, before, r"non-finite values in .*0\.weight")


@pytest.mark.parametrize("validate", MODES)
@pytest.mark.parametrize("how", ["data", "numpy", "vector_to_parameters"])
@pytest.mark.parametrize("rule", ["fadjoint", "fused", "lfp"])
def test_a_parameter_changed_behind_its_version_counter_is_refused(rule, how, validate):
    """A bias set to 1e308 after the forward, behind the version counter: with weight decay λ = 2 and lr = 1 its
    update overflows (the old step trusted its own bound from the last write and wrote −inf)."""
    model, net, opt, x, t = _setup(rule, validate, weight_decay=2.0)
    for group in opt.param_groups:
        group["lr"] = 1.0
    net(x)
    bias = model[2].bias
    if how == "data":
        bias.data.fill_(1e308)
    elif how == "numpy":
        bias.detach().numpy()[:] = 1e308
    else:
        vector = nn.utils.parameters_to_vector(model.parameters()).clone()
        vector[-5:] = 1e308
        nn.utils.vector_to_parameters(vector, model.parameters())
    before = snapshot(model, opt, grads=validate is True)
    if how == "vector_to_parameters":  # it rebinds every parameter (p.data = a view of the vector): refused at once,
        # before any check of the update, in every mode (the records hold the old memory)
        with pytest.raises(RuntimeError, match=r"the parameter 0\.weight was given other memory after the forward"):
            opt.step(target=t)
        assert_untouched(before, model, opt)
    else:
        _step_refused(opt, t, validate, model, before, r"non-finite values in the update of 2\.bias", r"2\.bias")
    assert bias.eq(1e308).all()


@pytest.mark.parametrize("validate", MODES)
@pytest.mark.parametrize("rule", ["fadjoint", "fused", "lfp"])
def test_a_weight_poked_to_nan_through_numpy_is_refused(rule, validate):
    model, net, opt, x, t = _setup(rule, validate)
    net(x)  # the forward saw finite weights; the poke comes between forward and step
    model[0].weight.detach().numpy()[1, 1] = np.nan
    before = snapshot(model, opt, grads=validate is True)
    _step_refused(opt, t, validate, model, before, r"non-finite values in the update of 0\.weight", r"0\.weight")


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("value", [torch.tensor(0.5, dtype=DT), 0.5], ids=["0-dim", "float"])
def test_a_malformed_momentum_buffer_is_refused_at_load_and_at_step(rule, value):
    """A 0-dim buffer passed the shape check and the step failed with torch's broadcast error after 0.weight was
    stepped; a Python float gave "aminmax(): argument 'input' must be Tensor"."""
    model, net, opt, x, t = _setup(rule, True)
    state = opt.state_dict()
    state["state"][0]["momentum_buffer"] = value  # 0.weight: the first parameter
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"^\w+\.load_state_dict: 0\.weight: momentum_buffer .*, expected a floating "
                                         r"tensor of shape \(40, 6\)$"):
        opt.load_state_dict(state)
    assert_untouched(before, model, opt)
    opt.state[model[0].weight]["momentum_buffer"] = value  # set by hand: refused by the step, named
    net(x)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"^\w+\.step: the momentum_buffer of 0\.weight is a .*, expected a tensor of "
                                         r"shape \(40, 6\), torch.float64 on cpu .*; nothing was changed$"):
        opt.step(target=t)
    assert_untouched(before, model, opt)


@pytest.mark.parametrize("rule", ["fadjoint", "fused", "lfp", "equilibrium", "equilibrium_parallel"])
def test_an_async_refused_first_step_leaves_nothing_that_changes_training(rule):
    """validate="async", dampening 0.5: the first step is refused (a NaN top signal). Once its error is raised,
    ``.grad`` is what it was and no momentum buffer exists, so the next steps equal those of a run that never
    saw the refused step, bit for bit (with a zero buffer left behind, b = 0.9·0 + 0.5·g instead of b = g)."""
    def fresh():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 5)).to(DT)
        net = tfa.FPropagation(model)
        return model, net, RULES[rule](net, "async", dampening=0.5)

    x, t = torch.randn(3, 6, dtype=DT), torch.tensor([0, 3, 4])
    model, net, opt = fresh()
    twin, twin_net, twin_opt = fresh()
    out = net(x)
    opt.step(out_adj=torch.full_like(out, float("nan")))
    net(x)
    with pytest.raises(RuntimeError, match=r"^step 1 \(validate='async'\): step: non-finite values in (out_adj|reward) "):
        opt.step(target=t)  # the error of step 1, raised before step 2 does anything
    assert all(p.grad is None for p in model.parameters())
    assert not opt.state
    for _ in range(3):
        net(x)
        opt.step(target=t)
        twin_net(x)
        twin_opt.step(target=t)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)  # fused weights have none


def test_an_async_refused_later_step_gives_back_the_previous_grad():
    model, net, opt, x, t = _setup("fadjoint", "async")
    grads = [p.grad for p in model.parameters()]
    out = net(x)
    opt.step(out_adj=torch.full_like(out, float("nan")))
    with pytest.raises(RuntimeError, match=r"^step 2 \(validate='async'\)"):
        opt.synchronize()
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))


# -- errors that name what was given -----------------------------------------------------------------------
def _recorded():
    net = tfa.FPropagation(nn.Sequential(nn.Linear(4, 3)).to(DT))
    net(torch.randn(2, 4, dtype=DT))
    return net


def test_backward_with_a_loss_that_has_no_closed_form_names_it():
    net = _recorded()
    with pytest.raises(TypeError, match=r"^loss: torch's binary_cross_entropy_with_logits has no closed-form output "
                                        r"adjoint here; expected one of \['cross_entropy', 'mse_loss', 'nll_loss'\]"):
        net.backward(F.binary_cross_entropy_with_logits, torch.rand(2, 3, dtype=DT))


def test_backward_with_a_loss_returning_one_tensor_names_it():
    net = _recorded()
    with pytest.raises(TypeError, match=r"^FPropagation.backward: <lambda> returned Tensor, expected \(loss, out_adj\)"):
        net.backward(lambda out, t: (out - t).pow(2).mean(), torch.rand(2, 3, dtype=DT))


def test_backward_on_an_empty_batch_names_it():
    net = tfa.FPropagation(nn.Sequential(nn.Linear(4, 3)).to(DT))
    net(torch.randn(0, 4, dtype=DT))
    with pytest.raises(ValueError, match=r"^FPropagation.backward: the recorded forward has batch size 0"):
        net.backward(F.cross_entropy, torch.zeros(0, dtype=torch.long))


def test_a_target_equal_to_torchs_ignore_index_is_refused_not_ignored():
    """-100 is torch's ignore_index: its kernels skip that row silently, while the step's 1/B counts it."""
    model, net, opt, x, t = _setup("fadjoint", True)
    net(x)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"^cross_entropy: targets must lie in \[0, 4\]$"):
        opt.step(target=torch.tensor([0, -100, 4]))
    assert_untouched(before, model, opt)


# -- the red team of issue 20's guard (each case broke the first version of it) ---------------------------------
@pytest.mark.parametrize("validate", MODES)
@pytest.mark.parametrize("rule", ["fadjoint", "fused", "lfp", "equilibrium_parallel"])
def test_an_overflow_on_the_way_is_refused_though_the_new_value_would_fit(rule, validate):
    """lr = 0.1, λ = 2, a bias poked to 1e308: g' = g + λθ overflows before θ − lr·g' would fit (1.2e308); the
    first guard bounded only θ' and wrote −inf."""
    model, net, opt, x, t = _setup(rule, validate, weight_decay=2.0)
    net(x)
    model[2].bias.data.fill_(1e308)
    before = snapshot(model, opt, grads=validate is True)
    _step_refused(opt, t, validate, model, before, r"non-finite values in the update of 2\.bias", r"2\.bias")


@pytest.mark.parametrize("nesterov", [False, True])
def test_a_float16_momentum_buffer_that_would_overflow_is_refused(nesterov):
    """μ = 0.99 and gradients ~1e4 in float16: the buffer passes 65504 after a few steps (with Nesterov the
    direction g' + μb' first) while lr·d still fits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).half()
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=1e-4, momentum=0.99, nesterov=nesterov)
    x = torch.randn(8, 4).half()
    refused = False
    for _ in range(12):
        out = net(x)
        before = snapshot(model, opt)
        try:
            opt.step(out_adj=torch.full_like(out, 2e3))
        except RuntimeError as exc:
            assert "non-finite values in the update of 0." in str(exc)
            assert_untouched(before, model, opt)
            refused = True
            break
        assert all(p.isfinite().all() and opt.state[p]["momentum_buffer"].isfinite().all()
                   for p in model.parameters())
    assert refused


def test_a_hyper_parameter_past_the_dtype_is_refused():
    model = nn.Sequential(nn.Linear(6, 5))
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=1e-20, momentum=0.9)
    opt.param_groups[0]["momentum"] = 1e39  # a float32 inf inside torch's kernels: every parameter became NaN
    net(torch.randn(3, 6))
    t = torch.tensor([0, 3, 4])
    with pytest.raises(ValueError, match=r"^momentum=1e\+39 overflows torch.float32, the dtype of 0\.weight$"):
        opt.step(target=t)


def test_async_undo_leaves_a_checkpoint_loaded_after_the_refused_step():
    """The undo of a refused async step removes only what that step left: a state_dict loaded (or zero_grad called)
    in between stays."""
    model, net, opt, x, t = _setup("fadjoint", "async")
    checkpoint = copy.deepcopy(opt.state_dict())
    out = net(x)
    opt.step(out_adj=torch.full_like(out, float("nan")))
    opt.load_state_dict(checkpoint)
    opt.zero_grad()
    with pytest.raises(RuntimeError, match=r"^step 2 \(validate='async'\)"):
        opt.synchronize()
    assert len(opt.state) == 4 and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("how, why", [("inference_mode", "inference_mode"), ("expand", "share memory"),
                                      ("float32", r"float32 on cpu, expected")])
def test_a_momentum_buffer_that_cannot_be_written_in_place_is_refused_before_anything(how, why):
    """Each says what is wrong with it (a float32 buffer was said to share memory)."""
    model, net, opt, x, t = _setup("fadjoint", True)
    weight = model[0].weight
    if how == "inference_mode":
        with torch.inference_mode():
            opt.state[weight]["momentum_buffer"] = opt.state[weight]["momentum_buffer"].clone()
    elif how == "expand":
        opt.state[weight]["momentum_buffer"] = torch.zeros(1, 6, dtype=DT).expand(40, 6)
    else:
        opt.state[weight]["momentum_buffer"] = torch.zeros(40, 6, dtype=torch.float32)
    net(x)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"^FAdjoint\.step: the momentum_buffer of 0\.weight is a tensor "
                                         rf"(?!.*share memory).*{why}.*; nothing was changed$" if how == "float32"
                       else rf"^FAdjoint\.step: the momentum_buffer of 0\.weight is a tensor .*{why}.*; nothing was "
                            "changed$"):
        opt.step(target=t)
    assert_untouched(before, model, opt)


def test_fused_unchecked_step_checks_every_buffer_before_writing():
    model, net, opt, x, t = _setup("fused", False)
    opt.state[model[0].weight]["momentum_buffer"] = 0.5
    net(x)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"momentum_buffer of 0\.weight is a float"):
        opt.step(target=t)
    assert_untouched(before, model, opt)


def test_a_delegated_async_step_that_raises_inside_torchs_step_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)).to(DT)
    net = tfa.FPropagation(model)
    opt = tfa.optim.Consequentialism(net, lr=0.1, base="adam", validate="async")
    x, t = torch.randn(4, 6, dtype=DT), torch.tensor([0, 1, 2, 3])
    net(x)
    opt.step(target=t)
    opt.synchronize()
    opt.state[model[2].weight]["exp_avg"] = torch.zeros(3, dtype=DT)  # malformed: torch's step would fail half-way
    net(x)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"^Consequentialism\.step: the exp_avg of 2\.weight is a tensor of shape "
                                         r"\(3,\)"):
        opt.step(target=t)
    assert_untouched(before, model, opt)


def test_large_float16_activations_do_not_refuse_a_finite_update():
    """‖X‖ past 65504 in float16 (std 400 over 4096 features): the factor bound read in float32, and the exact
    re-check reads the gradient itself; torch's max|G| is ~10."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4096, 64)).half()
    with torch.no_grad():
        model[0].weight.mul_(0.01)
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=0.01)
    x = (torch.randn(8, 4096) * 400).half()
    net(x)
    opt.step(target=torch.randint(0, 64, (8,)))
    assert model[0].weight.isfinite().all()


def test_sequential_equilibrium_accepts_an_upper_update_near_the_dtype_limit():
    """The upper layers are written during the sweep: validate=True checks what was written, not a bound read
    after the write (≈ 2|θ'|, which refused a bias update 0 → 40000 in float16)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).half()
    for p in [*model[0].parameters(), model[2].weight]:
        p.requires_grad_(False)
    with torch.no_grad():
        model[2].bias.zero_()
    net = tfa.FPropagation(model)
    opt = tfa.optim.EquilibriumFAdjoint(net, lr=1.0, loss="mse", sequential=True)
    out = net(torch.randn(2, 4).half())
    opt.step(out_adj=torch.full_like(out, -20000.0))
    assert model[2].bias.eq(40000).all()


def test_async_refuses_a_bool_target_by_its_dtype():
    model, net, opt, x, t = _setup("fadjoint", "async")
    net(x)
    with pytest.raises(ValueError, match=r"^cross_entropy: expected integer class targets, got dtype torch.bool$"):
        opt.step(target=torch.tensor([True, False, True]))


@pytest.mark.parametrize("validate", MODES)
def test_a_2_norm_whose_squares_underflow_still_bounds_the_update(validate):
    """‖[1e-23]·4‖ is 0 in float32 (the squares underflow): the fast bound adds √tiny to every norm it reads, so
    a weight at the top of float32's range plus lr·G (which overflows to −inf) is refused."""
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(-torch.finfo(torch.float32).max)
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=1e36, validate=validate)
    out = net(torch.full((1, 4), 1e-23))
    before = snapshot(model, opt, grads=validate is True)
    with pytest.raises(RuntimeError, match=r"0\.weight"):
        opt.step(out_adj=torch.full_like(out, 5e18))
        opt.synchronize()
    assert_untouched(before, model, opt)


class _TiedProjection(nn.Module):
    """y = x Wᵀ with W the parameter of an earlier Linear, held under another name (a tied decoder)."""

    def __init__(self, weight):
        super().__init__()
        self.w = weight

    def forward(self, x):
        return x @ self.w.t()


class _TiedProjectionLayer(tfa.layers.Layer):
    param_names = ("w",)

    def input_adjoint(self, rec, y_adj):
        return y_adj @ rec.module.w

    def param_feedback(self, rec, y_adj):
        return {rec.module.w: y_adj.t() @ rec.x_prev}


@pytest.mark.parametrize("validate", MODES)
def test_a_weight_tied_under_another_name_is_bounded_by_its_whole_gradient(validate):
    """The factor bound of one use (‖Y*₁‖·‖X₁‖ ≈ 0.04) must not stand for the gradient of both (G₂ ≈ 1e30)."""
    if _TiedProjection not in tfa.layers.LAYERS:
        tfa.register_layer(_TiedProjection, _TiedProjectionLayer())
    linear = nn.Linear(4, 4)
    with torch.no_grad():
        linear.weight.fill_(1e-12)
        linear.bias.fill_(1.0)
    linear.bias.requires_grad_(False)
    model = nn.Sequential(linear, _TiedProjection(linear.weight))
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=1e9, validate=validate)
    out = net(torch.full((1, 4), 1e-20))
    before = snapshot(model, opt, grads=validate is True)
    with pytest.raises(RuntimeError, match=r"0\.weight"):
        opt.step(out_adj=torch.full_like(out, 1e30))
        opt.synchronize()
    assert_untouched(before, model, opt)


def test_the_numbers_form_of_the_sgd_bound_decides_as_its_terms_do():
    """``sgd_update_fits`` (validate=True's one formula per parameter) and ``sgd_update_bound``'s terms (the fused
    step's and async's) are one bound written twice: on random norms, hyper-parameters and limits near the
    bound they decide alike (a drift between them would let one path write what the other refuses)."""
    from torch_fadjoint.optim.functional import sgd_update_bound, sgd_update_fits

    gen = torch.Generator().manual_seed(0)
    theta_t, buf_t, y_t, x_t = (torch.zeros(1) for _ in range(4))
    decided = set()
    for _ in range(4000):
        u = torch.rand(10, generator=gen, dtype=torch.float64).tolist()
        nesterov = u[0] < 0.3
        hyper = dict(lr=10 ** (4 * u[1] - 3), momentum=0.0 if u[2] < 0.2 else u[2], nesterov=nesterov and u[2] >= 0.2,
                     dampening=0.0 if nesterov else 2 * u[3] - 0.5, weight_decay=0.0 if u[4] < 0.5 else u[4],
                     maximize=False)
        norms = {id(theta_t): 10 ** (6 * u[5]), id(buf_t): 10 ** (6 * u[6]), id(y_t): 10 ** (3 * u[7]),
                 id(x_t): 10 ** (3 * u[8])}
        has_buf = u[9] < 0.7
        slack = 1 + u[8] * 1e-3
        entries = sgd_update_bound(theta_t, (slack, (y_t, x_t), 1, None), buf_t if has_buf else None, **hyper)
        largest = max(sum(c * math.prod(norms[id(t)] for t in ts) for c, ts, _, _ in terms) for terms in entries)
        limit = largest * (1 + (u[9] - 0.5) * 1e-6)  # just above or below the largest value made
        values = [norms[id(theta_t)]] + ([norms[id(buf_t)]] if has_buf else []) + [norms[id(y_t)], norms[id(x_t)]]
        by_terms = largest <= limit
        assert sgd_update_fits((has_buf, hyper, slack), values, limit) == by_terms, (hyper, values, limit)
        decided.add(by_terms)
    assert decided == {True, False}


@pytest.mark.parametrize("key", ["momentum", "dampening", "weight_decay"])
@pytest.mark.parametrize("rule", ["fadjoint", "lfp", "equilibrium"])
def test_hyper_parameters_held_as_numpy_scalars_do_not_switch_the_bound_off(rule, key):
    """A param group may hold numpy scalars (a scheduler's values; torch.optim.SGD takes them as they are): the
    bound is Python floats whatever they are, so an inf momentum buffer is still refused (with a numpy float32
    momentum, numpy compared the bound with the float64 limit cast to float32, inf <= inf, and the step wrote -inf:
    session 5's red team)."""
    values = {"momentum": np.float32(0.9), "dampening": np.float32(0.1), "weight_decay": np.float32(1e-4)}
    model, net, opt, x, t = _setup(rule, True)
    opt.param_groups[0][key] = values[key]
    opt.state[model[2].bias]["momentum_buffer"].data[1] = float("inf")
    before = snapshot(model, opt)
    _refused(net, opt, x, t, True, model, before, r"non-finite values in the update of 2\.bias")


@pytest.mark.parametrize("fused", [False, True])
def test_a_gemm_that_rounds_up_past_the_dtype_is_refused_though_its_factors_bound_fits(fused):
    """The factor bound ‖Y*‖·‖X‖ bounds the exact Y*ᵀX; float32's GEMM may round above it by up to γ_B (B the
    batch, Higham §3.1). Crafted here: one column whose products each round up, so that lr·G overflows to -inf in
    autograd + SGD too while lr·‖Y*‖·‖X‖ fits by ~150 ulps: refused (it was written: session 5's red team)."""
    batch, n = 255, 512  # batch·(n + n) < n·n: 0.weight's bound reads its factors
    top, ulp, lr = torch.finfo(torch.float32).max, 2.0 ** 104, 2.0 ** 28
    c = math.sqrt(2.0 ** 103) * (1 + 2 ** -12)
    column = torch.full((batch,), c, dtype=torch.float64)
    column[0] = math.sqrt(top - 30 * ulp - (batch - 1) * c * c)
    x, out_adj = torch.zeros(batch, n), torch.zeros(batch, n)
    x[:, 0], out_adj[:, 0] = (column * 2.0 ** -14 / 1.5).float(), (column * 2.0 ** -14 * 1.5).float()
    assert lr * float((x[:, 0].double() * out_adj[:, 0].double()).sum()) < top  # exact: fits by 30 ulps
    reference = nn.Linear(n, n, bias=False)
    with torch.no_grad():
        reference.weight.zero_()
    reference(x).backward(out_adj)
    torch.optim.SGD(reference.parameters(), lr=lr).step()
    assert not reference.weight.isfinite().all()  # autograd + SGD writes -inf
    model = nn.Sequential(nn.Linear(n, n, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=lr, validate=True, fuse_update=fused)
    net(x)
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"the update of 0\.weight"):
        opt.step(out_adj=out_adj)
    assert_untouched(before, model, opt)


@pytest.mark.parametrize("validate", MODES)
def test_a_float16_update_that_rounds_past_the_dtype_is_refused(validate):
    """A bound holds for the exact values; each op of the update rounds up to half an ulp. float16, lr = 3, a
    momentum buffer of 43 648 and a gradient of 8.25: the exact θ' = −3·(0.5·43 648 + 8.25) = −65 496.75 fits
    (max 65 504), but b' rounds up to 21 840 and −3·21 840 = −65 520 rounds to −inf (autograd + SGD writes it).
    The bound leaves room for the update's roundings, (1 + u)^8: refused (it was written: session 5)."""
    model = nn.Sequential(nn.Linear(1, 1, bias=False)).to(torch.float16)
    with torch.no_grad():
        model[0].weight.zero_()
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=3.0, momentum=0.5, validate=validate)
    x = torch.ones(1, 1, dtype=torch.float16)
    net(x)
    opt.step(out_adj=torch.zeros(1, 1, dtype=torch.float16))
    opt.synchronize()
    opt.state[model[0].weight]["momentum_buffer"].data.fill_(43648.0)
    reference = torch.optim.SGD([torch.zeros(1, 1, dtype=torch.float16)], lr=3.0, momentum=0.5, foreach=True)
    reference.param_groups[0]["params"][0].grad = torch.full((1, 1), 8.25, dtype=torch.float16)
    reference.state[reference.param_groups[0]["params"][0]]["momentum_buffer"] = torch.full(
        (1, 1), 43648.0, dtype=torch.float16)
    reference.step()
    assert reference.param_groups[0]["params"][0].isinf().all()  # what autograd + SGD writes
    net(x)
    before = snapshot(model, opt)
    out_adj = torch.full((1, 1), 8.25, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"the update of 0\.weight"):
        opt.step(out_adj=out_adj)
        opt.synchronize()  # async: decided on the device, raised here
    assert_untouched(before, model, opt)


@pytest.mark.parametrize("validate", MODES)
@pytest.mark.parametrize("fused", [False, True])
def test_a_float64_update_one_half_ulp_past_the_dtype_is_refused(fused, validate):
    """float64, lr = 3: θ = −(2¹⁰²² + 2⁹⁷¹), g = 2⁹⁷⁰(2⁵² − 1), so the exact θ − 3g is the largest float64 plus half an
    ulp. Where torch's add rounds once (an FMA: AVX2 kernels) SGD writes −inf; where it rounds twice
    (``ATEN_CPU_CAPABILITY=default``) it writes the largest value. The bound's own float64 sum on the host rounded
    it back onto the largest value, and (1 + u)⁸ is 1.0 in float64: −inf was accepted and written (session 5's
    second red team). Now the step never writes a non-finite value: refused where SGD overflows, and where it does
    not, refused or equal to SGD. Every dtype's limit leaves room below its largest value."""
    from torch_fadjoint.optim.guard import _limit

    assert all(_limit(dtype) < torch.finfo(dtype).max
               for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64))
    theta, grad = -(2.0 ** 1022 + 2.0 ** 971), 2.0 ** 970 * (2 ** 52 - 1)
    reference = torch.full((1, 1), theta, dtype=DT, requires_grad=True)
    reference.grad = torch.full((1, 1), grad, dtype=DT)
    torch.optim.SGD([reference], lr=3.0, foreach=True).step()
    model = nn.Sequential(nn.Linear(1, 1, bias=False)).to(DT)
    model[0].weight.data.fill_(theta)
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=3.0, validate=validate, fuse_update=fused)
    net(torch.ones(1, 1, dtype=DT))
    before = snapshot(model, opt)
    try:
        opt.step(out_adj=torch.full((1, 1), grad, dtype=DT))
        opt.synchronize()  # async: decided on the device, raised here
    except RuntimeError as error:
        assert "the update of 0.weight" in str(error)
        assert_untouched(before, model, opt)
        return
    assert reference.isfinite().all(), "accepted a step that SGD computes as -inf"
    assert torch.equal(model[0].weight, reference.detach())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", ["apart", "near-the-largest"])
def test_a_finite_update_whose_bound_fails_is_decided_by_the_update_itself(dtype, case):
    """validate=True: a parameter whose fast bound fails is decided by running its update on copies, so the bound's
    looseness refuses nothing. ``apart``: θ = [0.6·max, 0] and g = [0, 0.6·max] (|θ| + lr·|g| adds peaks of
    different entries: refused before, though SGD writes ±0.6·max); ``near-the-largest``: θ at 0.97·max, inside the
    limit's rounding margin (4.7 % of the range in bfloat16: refused before). Both equal torch.optim.SGD's step."""
    top = torch.finfo(dtype).max
    theta, grad = ([0.6 * top, 0.0], [0.0, 0.6 * top]) if case == "apart" else ([0.97 * top, 0.0], [1.0, 1.0])
    model = nn.Sequential(nn.Linear(2, 1, bias=False)).to(dtype)
    model[0].weight.data.copy_(torch.tensor([theta], dtype=dtype))
    net = tfa.FPropagation(model)
    opt = tfa.optim.FAdjoint(net, lr=1.0, validate=True)
    net(torch.tensor([grad], dtype=dtype))  # out_adj = 1: the weight's gradient is the input x = g
    expected = torch.tensor([theta], dtype=dtype, requires_grad=True)
    expected.grad = torch.tensor([grad], dtype=dtype)
    torch.optim.SGD([expected], lr=1.0, foreach=True).step()
    assert expected.isfinite().all()
    opt.step(out_adj=torch.ones(1, 1, dtype=dtype))
    assert torch.equal(model[0].weight, expected.detach())
