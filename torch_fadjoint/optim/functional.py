"""The functional SGD core every rule's update goes through (docs/maths.md §1.4), and the bounds the step
guard checks before it (STYLE P1: a thin optimizer class over plain functions, as ``torch/optim/sgd.py``).

    g ← −g if maximize;  g ← g + λ θ
    b ← g (first step) | μ b + (1 − dampening) g;   d ← g + μ b (Nesterov) | b
    θ ← θ − lr d

:func:`sgd_update` is torch.optim.SGD's update, bit for bit (a per-tensor loop or ``torch._foreach_*``);
``ok`` (a 0-dim bool on the device, the AND of a step's checks, like torch's ``found_inf``) makes every
write ``where(ok, new, old)``. :func:`fused_sgd_weight_update` folds the update into the GEMM that would
make a Linear weight's gradient. :func:`sgd_update_bound` states |θ'| as terms the guard evaluates.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor

from .guard import Term, scaled

__all__ = ["sgd_update", "fused_sgd_weight_update", "sgd_update_bound", "sgd_update_fits", "sgd_update_is_finite"]


def sgd_update(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor | None], *, lr: float,
               momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
               maximize: bool = False, foreach: bool | None = None, ok: Tensor | None = None) -> None:
    """θ ← θ − lr · SGD-direction(g), in place; fills ``momentum_buffers`` on the first step.

    params, grads: matching lists; momentum_buffers: the same length, ``None`` entries are replaced by
    new buffers (the caller stores them). Grads are never modified in place. ``lr`` may be a 0-dim tensor
    on the parameters' device (a captured step reads it there: ``θ.addcmul_(d, lr, value=−1)``).
    ok: a 0-dim bool tensor (validate="async"): every write becomes ``where(ok, new, old)`` — decided on the
    device, nothing changes where it is False (a new buffer is zeros) — one tensor at a time, so no copy
    of the parameters is kept.
    """
    if foreach is None:  # the batched path: fewer launches on CUDA; on CPU as fast as the loop or faster (by up to
        # 2.6 % of autograd's step, benchmarks/results/speed_default_step/versions); masked writes go one by one
        foreach = ok is None
    if foreach and ok is None and not isinstance(lr, Tensor):
        _foreach_sgd(params, grads, momentum_buffers, lr=lr, momentum=momentum, dampening=dampening,
                     weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
    else:
        _single_tensor_sgd(params, grads, momentum_buffers, lr=lr, momentum=momentum, dampening=dampening,
                           weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, ok=ok)


_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)  # torch >= 2.3; looked up once


def _compiling() -> bool:
    return _is_compiling is not None and bool(_is_compiling())


def _add(target: Tensor, other: Tensor, alpha: float, inplace: bool = False) -> Tensor:
    """target + alpha·other. Under torch.compile the product is made first: inductor's add + mm → addmm
    pattern drops ``alpha`` (torch 2.14.1, pytorch/pytorch#167313), which turns θ − lr·(Y*ᵀX) into θ + Y*ᵀX
    when the gradient feeds the update alone (measured: tests/test_graph.py)."""
    if alpha != 1 and _compiling():
        other, alpha = other * alpha, 1
    return target.add_(other, alpha=alpha) if inplace else target.add(other, alpha=alpha)


def _single_tensor_sgd(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
                       ok=None):
    """torch.optim.SGD's single-tensor loop; with ``ok`` every in-place write is ``t ← where(ok, t', t)``."""
    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        if weight_decay != 0:
            grad = _add(grad, param, weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = momentum_buffers[i] = (torch.clone(grad).detach() if ok is None else
                                             torch.where(ok, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)))
            elif ok is None:
                _add(buf.mul_(momentum), grad, 1 - dampening, inplace=True)
            else:  # one temporary at a time
                torch.where(ok, _add(buf * momentum, grad, 1 - dampening, inplace=True), buf, out=buf)
            grad = _add(grad, buf, momentum) if nesterov else buf
        if ok is not None:
            torch.where(ok, param - grad * lr if isinstance(lr, Tensor) else _add(param, grad, -lr), param, out=param)
        elif isinstance(lr, Tensor):
            param.addcmul_(grad, lr, value=-1)
        else:
            _add(param, grad, -lr, inplace=True)


def _group_by_device_dtype(tensors):
    """Indices grouped by (device, dtype): torch's own helper is private."""
    groups = defaultdict(list)
    for i, tensor in enumerate(tensors):
        groups[(tensor.device, tensor.dtype)].append(i)
    return groups.values()


def _foreach_sgd(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, maximize):
    for indices in _group_by_device_dtype(params):
        device_params = [params[i] for i in indices]
        device_grads = [grads[i] for i in indices]
        if maximize:
            device_grads = torch._foreach_neg(device_grads)
        if weight_decay != 0:
            device_grads = torch._foreach_add(device_grads, device_params, alpha=weight_decay)
        if momentum != 0:
            if all(momentum_buffers[i] is not None for i in indices):
                bufs = [momentum_buffers[i] for i in indices]
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, device_grads, alpha=1 - dampening)
            else:
                bufs = []
                for i, grad in zip(indices, device_grads):
                    if momentum_buffers[i] is None:
                        momentum_buffers[i] = torch.clone(grad).detach()
                    else:
                        momentum_buffers[i].mul_(momentum).add_(grad, alpha=1 - dampening)
                    bufs.append(momentum_buffers[i])
            device_grads = torch._foreach_add(device_grads, bufs, alpha=momentum) if nesterov else bufs
        torch._foreach_add_(device_params, device_grads, alpha=-lr)


def fused_sgd_weight_update(weights: list[Tensor], factors: list[tuple[Tensor, Tensor]],
                            momentum_buffers: list[Tensor | None], *, lr: float, momentum: float = 0.0,
                            dampening: float = 0.0, weight_decay: float = 0.0, maximize: bool = False,
                            foreach: bool | None = None, ok: Tensor | None = None, **_) -> None:
    """SGD on each W from the factors (Y*, X) of its gradient G = Y*ᵀ X, with G never materialised.

    The GEMM that makes G writes straight into the tensor the update reads (s = −1 if maximize else 1)::

        μ = 0:  W ← (1 − lr λ) W − lr s Y*ᵀX                   one addmm_ into W
        μ > 0:  b ← s Y*ᵀX + λ W  (first step)  |  μ b + (1 − dampening)(s Y*ᵀX + λ W)   addmm_ into b
                W ← W − lr b

    The same update as ``sgd_update`` (no Nesterov) to rounding, not bit for bit: the GEMM rounds
    ``α Y*ᵀX + β C`` once where SGD rounds G, then the update. With ``lr`` a 0-dim device tensor (a
    captured step) and μ = 0, the smaller factor is scaled by −lr s first (W ← (1 − lr λ) W first, if λ).
    With ``ok`` (validate="async") each GEMM writes a new tensor, kept where ``ok`` (see ``sgd_update``).
    """
    sign = -1.0 if maximize else 1.0
    if ok is not None:
        _masked_fused_update(weights, factors, momentum_buffers, lr=lr, momentum=momentum, dampening=dampening,
                             weight_decay=weight_decay, sign=sign, ok=ok)
        return
    for i, (weight, (y_adj, x_prev)) in enumerate(zip(weights, factors)):
        if momentum == 0 and isinstance(lr, Tensor):
            if weight_decay != 0:
                weight.mul_(1.0 - lr * weight_decay)
            if y_adj.numel() <= x_prev.numel():
                weight.addmm_((y_adj * (-sign * lr)).t(), x_prev)
            else:
                weight.addmm_(y_adj.t(), x_prev * (-sign * lr))
        elif momentum == 0:
            weight.addmm_(y_adj.t(), x_prev, beta=1.0 - lr * weight_decay, alpha=-lr * sign)
        elif momentum_buffers[i] is None:
            momentum_buffers[i] = torch.addmm(weight, y_adj.t(), x_prev, beta=weight_decay, alpha=sign)
        else:
            momentum_buffers[i].addmm_(y_adj.t(), x_prev, beta=momentum, alpha=(1 - dampening) * sign)
            if weight_decay != 0:
                momentum_buffers[i].add_(weight, alpha=(1 - dampening) * weight_decay)
    if momentum != 0:
        sgd_update(weights, momentum_buffers, [None] * len(weights), lr=lr, foreach=foreach)


def _masked_fused_update(weights, factors, momentum_buffers, *, lr, momentum, dampening, weight_decay, sign, ok):
    for i, (weight, (y_adj, x_prev)) in enumerate(zip(weights, factors)):
        if momentum == 0:
            if isinstance(lr, Tensor):
                scaled = (1.0 - lr * weight_decay) * weight if weight_decay != 0 else weight
                new = torch.addmm(scaled, (y_adj * (-sign * lr)).t(), x_prev)
            else:
                new = torch.addmm(weight, y_adj.t(), x_prev, beta=1.0 - lr * weight_decay, alpha=-lr * sign)
            torch.where(ok, new, weight, out=weight)
            continue
        buf = momentum_buffers[i]
        if buf is None:
            new = torch.addmm(weight, y_adj.t(), x_prev, beta=weight_decay, alpha=sign)
            momentum_buffers[i] = torch.where(ok, new, torch.zeros((), dtype=new.dtype, device=new.device))
        else:
            new = torch.addmm(buf, y_adj.t(), x_prev, beta=momentum, alpha=(1 - dampening) * sign)
            if weight_decay != 0:
                new.add_(weight, alpha=(1 - dampening) * weight_decay)
            torch.where(ok, new, buf, out=buf)
    if momentum != 0:
        sgd_update(weights, momentum_buffers, [None] * len(weights), lr=lr, ok=ok)



def sgd_update_bound(param: Tensor, grad_term: tuple, buf: Tensor | None, *, lr, momentum: float = 0.0,
                     dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, **_) -> list[list]:
    """Bounds on every value :func:`sgd_update` (or the fused update) makes, in the order it makes them, each of
    which must fit θ's dtype: a later value may fit while an earlier one overflowed (lr < 1). From a term
    bounding the gradient, G (``Term(1, g)``, or the norms of its factors Y*, X)::

        |g'| ≤ G + λ|θ|;   |b'| ≤ μ|b| + |1 − dampening| |g'|  (a new buffer: |g'|)
        |d| ≤ |g'| + μ|b'| (Nesterov) | |b'|;   |θ'| ≤ |θ| + lr |d|
    """
    grad = [grad_term] + ([Term(weight_decay, param)] if weight_decay else [])
    bounds, direction = [grad], grad
    if momentum:
        new_buf = grad if buf is None else [Term(momentum, buf)] + scaled(grad, abs(1 - dampening))
        direction = grad + scaled(new_buf, momentum) if nesterov else new_buf
        bounds += [new_buf, direction] if nesterov else [new_buf]
    bounds.append([Term(1, param)] + scaled(direction, lr))
    return bounds


def sgd_update_fits(args: tuple, values: list[float], limit: float) -> bool:
    """:func:`sgd_update_bound` decided from numbers (``StepGuard.require_fit``): ``values`` bound max|t| of θ, of
    b when ``args[0]`` (a buffer exists), then of the gradient's factors (their product, times ``args[2]``, bounds
    |g|: ``rounding_slack`` of the GEMM that made g from them); ``args[1]`` the hyper-parameters. True iff every
    value the update makes fits ``limit`` (NaN anywhere: False)."""
    has_buf, hyper, slack = args
    theta, grad = values[0], math.prod(values[2 if has_buf else 1:]) * slack
    # Python floats: a numpy scalar in a group (a scheduler's) would compute in its own dtype, and numpy compares a
    # float32 with the float64 limit cast to float32 (inf), passing an inf bound
    lr, momentum, dampening, weight_decay = (float(hyper[k]) for k in ("lr", "momentum", "dampening", "weight_decay"))
    grad = grad + weight_decay * theta if weight_decay else grad
    made = [grad]
    direction = grad
    if momentum:
        new_buf = momentum * values[1] + abs(1 - dampening) * grad if has_buf else grad
        direction = grad + momentum * new_buf if hyper["nesterov"] else new_buf
        made += [new_buf, direction] if hyper["nesterov"] else [new_buf]
    made.append(theta + lr * direction)
    return all(value <= limit for value in made)


def sgd_update_is_finite(param: Tensor, grad: Tensor, buf: Tensor | None, **hyper) -> bool:
    """Whether :func:`sgd_update` would write only finite values into ``param`` and its momentum buffer: the same
    update, run on copies of the two (the exact decision of a step whose bound failed: no bound's looseness, no
    rounding margin, refuses it). ``hyper``: the group's hyper-parameters and ``foreach``, as the step passes them."""
    theta = param.detach().clone()
    bufs = [None if buf is None else buf.detach().clone()]
    sgd_update([theta], [grad], bufs, **hyper)
    return bool(theta.isfinite().all()) and (bufs[0] is None or bool(bufs[0].isfinite().all()))
