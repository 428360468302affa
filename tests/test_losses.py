"""Output adjoints in closed form (docs/maths.md §1.3), typed here by hand, and against autograd."""
import pytest
import torch
import torch.nn.functional as F

import torch_fadjoint as tfa

B, C = 6, 4


@pytest.fixture
def logits():
    return torch.randn(B, C, dtype=torch.float64) * 2


@pytest.fixture
def target():
    return torch.tensor([0, 3, 1, 1, 2, 0])


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_adjoint_is_softmax_minus_q_over_b(logits, target, eps, reduction):
    loss, out_adj = tfa.losses.cross_entropy(logits, target, label_smoothing=eps, reduction=reduction)
    q = (1 - eps) * F.one_hot(target, C).double() + eps / C
    want = (torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True) - q) / (B if reduction == "mean" else 1)
    torch.testing.assert_close(out_adj, want, rtol=0, atol=1e-15)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, label_smoothing=eps, reduction=reduction))


def test_nll_adjoint_is_minus_onehot_over_b(logits, target):
    log_probs = logits.log_softmax(1)
    loss, out_adj = tfa.losses.nll(log_probs, target)
    torch.testing.assert_close(out_adj, -F.one_hot(target, C).double() / B, rtol=0, atol=0)
    torch.testing.assert_close(loss, F.nll_loss(log_probs, target))


def test_mse_adjoint_float_and_class_targets(logits, target):
    dense = torch.randn(B, C, dtype=torch.float64)
    loss, out_adj = tfa.losses.mse(logits, dense)
    torch.testing.assert_close(out_adj, 2 * (logits - dense) / (B * C), rtol=0, atol=1e-15)
    torch.testing.assert_close(loss, F.mse_loss(logits, dense))
    _, out_adj = tfa.losses.mse(logits, target, reduction="sum")
    torch.testing.assert_close(out_adj, 2 * (logits - F.one_hot(target, C).double()), rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", ["cross_entropy", "mse"])
def test_adjoint_equals_autograd(logits, target, name):
    leaf = logits.clone().requires_grad_()
    ref = F.cross_entropy(leaf, target) if name == "cross_entropy" else F.mse_loss(leaf, F.one_hot(target, C).double())
    (want,) = torch.autograd.grad(ref, leaf)
    _, got = tfa.losses.get_loss(name)(logits, target)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-16)


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([0, 1, 2, 3, 4, 0]), r"targets must lie in \[0, 3\]"),
    (torch.tensor([0, 1, 2, 3, -1, 0]), r"targets must lie in \[0, 3\]"),
    (torch.zeros(6), "expected integer class targets"),
    (torch.zeros(5, dtype=torch.long), r"expected targets of shape \(6,\)"),
])
def test_bad_targets_are_one_line_errors(logits, bad, message):
    with pytest.raises(ValueError, match=message):
        tfa.losses.cross_entropy(logits, bad)


def test_unknown_loss_and_reduction():
    with pytest.raises(ValueError, match="loss must be one of"):
        tfa.losses.get_loss("hinge")
    with pytest.raises(ValueError, match="reduction must be one of"):
        tfa.losses.mse(torch.zeros(2, 2), torch.zeros(2, 2), reduction="none")


@pytest.mark.parametrize("name", ["cross_entropy", "nll", "mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_output_adjoint_has_autograds_bits_in_float32(name, reduction):
    """X*^L comes from autograd's own backward kernels, so it equals loss.backward()'s bit for bit."""
    import torch.nn.functional as F

    torch.manual_seed(3)
    x = torch.randn(37, 10)
    if name == "nll":
        x = torch.log_softmax(x, 1)
    t = torch.randint(0, 10, (37,))
    target = torch.randn(37, 10) if name == "mse" else t
    leaf = x.clone().requires_grad_()
    {"cross_entropy": F.cross_entropy, "nll": F.nll_loss, "mse": F.mse_loss}[name](
        leaf, target, reduction=reduction).backward()
    _, out_adj = getattr(tfa.losses, name)(x, target, reduction=reduction)
    assert torch.equal(out_adj, leaf.grad)


def test_a_loss_callable_returning_a_tensor_is_refused_by_the_step_naming_its_type():
    """A callable without a ``__name__`` (``functools.partial``, a compiled loss module) is named by its type."""
    import functools

    torch.manual_seed(0)
    net = tfa.FPropagation(torch.nn.Sequential(torch.nn.Linear(4, 3)))
    opt = tfa.optim.FAdjoint(net, lr=0.1, loss=functools.partial(F.cross_entropy))
    net(torch.randn(2, 4))
    with pytest.raises(TypeError, match=r"^loss partial: expected a callable returning \(loss, out_adj\), got Tensor$"):
        opt.step(target=torch.tensor([0, 1]))
