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
