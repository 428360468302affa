"""The activation-derivative table (ALGORITHMS.md §1.1) against autograd, entry by entry."""
import pytest
import torch
from torch import nn

import torch_fadjoint as tfa
from torch_fadjoint.maps import MAPS as DERIVATIVES, Derivative, map_for as derivative_for, register_derivative

from .problems import ACTIVATIONS


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_df_and_df_at_equal_autograd(name):
    module = ACTIVATIONS[name]().double()
    y = torch.linspace(-4, 4, 41, dtype=torch.float64).requires_grad_()
    (want,) = torch.autograd.grad(module(y).sum(), y)
    deriv = derivative_for(module)
    y = y.detach()
    saved = deriv.record(module, y, module(y))
    torch.testing.assert_close(deriv.df(module, saved) if deriv.saves != "none" else deriv.df_at(module, y), want)
    torch.testing.assert_close(deriv.df_at(module, y), want)


def test_records_are_the_cheapest_sufficient_quantity():
    assert {t.__name__: DERIVATIVES[t].saves for t in (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.LeakyReLU)} == \
        dict.fromkeys(["ReLU", "Sigmoid", "Tanh", "ELU", "LeakyReLU"], "output")
    assert {DERIVATIVES[t].saves for t in (nn.GELU, nn.SiLU, nn.Softplus)} == {"input"}
    assert DERIVATIVES[nn.Identity].saves == "none"


def test_leaky_relu_with_a_negative_slope_is_refused():
    net = tfa.FPropagation(nn.Sequential(nn.Linear(2, 2), nn.LeakyReLU(-0.5), nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="expected a positive slope"):
        net(torch.randn(1, 2))


class Square(nn.Module):
    def forward(self, y):
        return y * y


class SquareDerivative(Derivative):
    saves = "input"

    def backward(self, module, saved, x_adj):
        return 2 * saved * x_adj


def test_register_derivative_extends_the_table_and_refuses_silent_overwrite():
    register_derivative(Square, SquareDerivative())
    try:
        with pytest.raises(ValueError, match="already has a derivative"):
            register_derivative(Square, SquareDerivative())
        model = nn.Sequential(nn.Linear(3, 4), Square(), nn.Linear(4, 2)).double()
        x = torch.randn(5, 3, dtype=torch.float64)
        net = tfa.FPropagation(model)
        with torch.no_grad():
            out = net(x)
        net.adjoint(torch.ones_like(out))
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model(x).sum().backward()
        for g, p in zip(got, model.parameters()):
            torch.testing.assert_close(g, p.grad)
    finally:
        DERIVATIVES.pop(Square)
    with pytest.raises(ValueError, match="nn.Linear is the layer itself"):
        register_derivative(nn.Linear, SquareDerivative())


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_in_place_backward_is_bit_identical_and_writes_into_the_buffer(name):
    """``backward_`` (the F-adjoint's in-place step 1) uses the same kernel as ``backward``: equal to the bit."""
    module = ACTIVATIONS[name]().double()
    y = torch.linspace(-4, 4, 41, dtype=torch.float64).reshape(1, 41)
    deriv = derivative_for(module)
    if not deriv.differentiable:
        pytest.skip("not trainable")
    saved = deriv.record(module, y, module(y))
    x_adj = torch.randn(1, 41, dtype=torch.float64)
    want = deriv.backward(module, saved, x_adj)
    buffer = x_adj.clone()
    got = deriv.backward_(module, saved, buffer)
    assert torch.equal(got, want)
    if name in ("relu", "leaky_relu", "sigmoid", "tanh", "elu", "softplus", "silu", "gelu", "gelu_tanh"):
        assert got.data_ptr() == buffer.data_ptr()  # written in place: no new (B, n) tensor
