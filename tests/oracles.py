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
