"""The autograd reference: the only place in the tests where ``.backward()`` is called (STYLE T1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def autograd_loss(loss: str, out, target, label_smoothing: float = 0.0, reduction: str = "mean"):
    if loss == "cross_entropy":
        return F.cross_entropy(out, target, label_smoothing=label_smoothing, reduction=reduction)
    if loss == "nll":
        return F.nll_loss(out, target, reduction=reduction)
    if loss == "mse":
        return F.mse_loss(out, F.one_hot(target, out.shape[1]).to(out.dtype), reduction=reduction)
    if loss == "mse_float":
        return F.mse_loss(out, target, reduction=reduction)
    raise ValueError(loss)


def autograd_grads(forward, params: dict, loss: str, target, label_smoothing: float = 0.0) -> dict:
    """{name: ∂J/∂p} by ``loss.backward()``; ``forward()`` runs the model with grad enabled."""
    for p in params.values():
        p.grad = None
    with torch.enable_grad():
        out = forward()
        value = autograd_loss(loss, out, target, label_smoothing)
        value.backward()
    grads = {name: p.grad.clone() for name, p in params.items() if p.grad is not None}
    for p in params.values():
        p.grad = None
    return grads


def autograd_module_loss(forward, params: dict, criterion, target) -> tuple:
    """``(criterion(forward(), target), {name: ∂J/∂p})`` by ``.backward()``: one of torch's loss modules with its
    own settings (``nn.CrossEntropyLoss(label_smoothing=0.1)``, …); ``.grad`` is left as it was found (None)."""
    for p in params.values():
        p.grad = None
    with torch.enable_grad():
        value = criterion(forward(), target)
        value.backward()
    grads = {name: p.grad.clone() for name, p in params.items() if p.grad is not None}
    for p in params.values():
        p.grad = None
    return value.detach(), grads


def autograd_sgd_steps(model, criterion, batches, lr: float) -> list:
    """``torch.optim.SGD(model.parameters(), lr)`` after ``criterion(model(x), t).backward()`` for each (x, t)
    of ``batches`` (``model`` is trained in place); returns the losses, detached."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for x, t in batches:
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            value = criterion(model(x), t)
            value.backward()
        opt.step()
        losses.append(value.detach())
    return losses


def autograd_output_grad(criterion, out, target) -> tuple:
    """``(criterion(out, target), ∂J/∂out)`` by ``.backward()`` on a leaf copy of ``out``."""
    leaf = out.detach().clone().requires_grad_()
    with torch.enable_grad():
        value = criterion(leaf, target)
        value.backward()
    return value.detach(), leaf.grad


def vjp(fn, inputs, out_adj):
    """``(out, grads)``: ``out = fn(*inputs)`` and autograd's J^T O* for each input, the gradient of
    ``Σ (out ⊙ O*)`` (tests/test_junctions.py). ``out_adj``: a tensor, or for a tuple output a tuple with None
    where an output gets no adjoint. A grad is None where autograd does not reach that input."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    with torch.enable_grad():
        out = fn(*leaves)
        outs, adjs = (out, out_adj) if isinstance(out, tuple) else ((out,), (out_adj,))
        loss = sum((o * a).sum() for o, a in zip(outs, adjs) if a is not None)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    detached = tuple(o.detach() for o in outs)
    return (detached if isinstance(out, tuple) else detached[0]), list(grads)
