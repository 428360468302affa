"""Junction entries for activations, softmax and attention, called as functions (docs/maths.md §7.1).

Added to :data:`torch_fadjoint.junctions.JUNCTIONS` on import; the verbs, keys and in-place rules are
``junctions.py``'s. These overlap tfa.maps (a module table); this table is by function. Each activation's
adjoint is autograd's own kernel on what autograd keeps (so float32 results are bit-identical):

    =========================================  =============================  ===========================
    function                                   kernel                         record
    =========================================  =============================  ===========================
    F.relu, torch.relu, relu_                  threshold_backward             the output
    F.hardtanh, F.relu6                        hardtanh_backward              the input; in place, the output
    torch.sigmoid, torch.tanh (and ``_``)      sigmoid_backward, tanh_backward  the output
    F.hardswish, F.hardsigmoid, F.silu, F.mish  hardswish_backward, …         the input (a copy, inplace)
    F.gelu (approximate "none" / "tanh")       gelu_backward                  the input
    F.leaky_relu, F.elu                        leaky_relu_backward, …         the input; in place, the output
    F.softplus                                 softplus_backward              the input
    softmax, log_softmax (dim; dtype=None)     _softmax_backward_data, …      the output
    F.scaled_dot_product_attention            composed: P = softmax(q kᵀ s + mask); v* = Pᵀ O*,
                                               S* = softmax'ᵀ(O* vᵀ), q* = s S* k, k* = s S*ᵀ q   q, k, v, mask
    =========================================  =============================  ===========================

``inplace=True`` on an activation that reads its input (SiLU, Hardswish, Hardsigmoid, Mish: torchvision's
EfficientNet and MobileNetV3) needs the input from before the write: :meth:`Junction.run` clones it first,
as autograd does. Attention keeps q, k, v (autograd: q, k, v and the output with its log-sum-exp) and
recomputes P in the backward; its float32 adjoints equal autograd's to rounding, not bit for bit.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .junctions import FIRST, JUNCTIONS, Junction, argument, entries, fit, is_floating, refuse_dtype_change

_aten = torch.ops.aten


class _Activation(Junction):
    """σ entry by entry: the adjoint is :meth:`kernel` (autograd's) on the record, the call's output
    (``saves = "output"``) or its input (``"input"``, copied first by ``run`` when the call is in place)."""

    saves = "output"
    lfp = "identity"  # every activation passes LFP's reward unchanged (docs/maths.md §3.2, §7.2)

    def reads_first(self, args, kwargs):
        return self.saves == "input"

    def options(self, args, kwargs) -> tuple:
        """The call's own constants the kernel needs (hardtanh's bounds, gelu's approximation)."""
        return ()

    def record(self, args, kwargs, out):
        self._check_kept(args, kwargs, out)
        key, x = argument(args, kwargs, 0, FIRST)
        return key, (x if self.saves == "input" else out), self.options(args, kwargs)

    def input_adjoints(self, saved, out_adj):
        key, value, options = saved
        return {key: self.kernel(out_adj, value, *options)}

    def kernel(self, out_adj: Tensor, value: Tensor, *options) -> Tensor:
        raise NotImplementedError


class _ReLU(_Activation):
    def kernel(self, out_adj, out):
        return _aten.threshold_backward(out_adj, out, 0)


class _Hardtanh(_Activation):
    """The mask min < · < max is the same on the output as on the input; the record is autograd's: the input out
    of place, the output in place (so an in-place write after it is refused exactly where autograd refuses)."""

    def record(self, args, kwargs, out):
        self._check_kept(args, kwargs, out)
        key, x = argument(args, kwargs, 0, FIRST)
        return key, (out if self.writes_first(args, kwargs) else x), self.options(args, kwargs)

    def options(self, args, kwargs):
        return argument(args, kwargs, 1, "min_val", -1.0)[1], argument(args, kwargs, 2, "max_val", 1.0)[1]

    def kernel(self, out_adj, out, low, high):
        return _aten.hardtanh_backward(out_adj, out, low, high)


class _ReLU6(_Hardtanh):
    def options(self, args, kwargs):
        return 0.0, 6.0


class _Sigmoid(_Activation):
    def kernel(self, out_adj, out):
        return _aten.sigmoid_backward(out_adj, out)


class _Tanh(_Activation):
    def kernel(self, out_adj, out):
        return _aten.tanh_backward(out_adj, out)


class _Hardswish(_Activation):
    saves, inplace = "input", 1

    def kernel(self, out_adj, x):
        return _aten.hardswish_backward(out_adj, x)


class _Hardsigmoid(_Hardswish):
    def kernel(self, out_adj, x):
        return _aten.hardsigmoid_backward(out_adj, x)


class _SiLU(_Hardswish):
    def kernel(self, out_adj, x):
        return _aten.silu_backward(out_adj, x)


class _Mish(_Hardswish):
    def kernel(self, out_adj, x):
        return _aten.mish_backward(out_adj, x)


class _LeakyReLU(_Activation):
    """Out of place the record is the input, in place the output (``is_result``), as autograd keeps them. In
    place, a negative slope makes the output ambiguous: autograd refuses it in its backward, this entry at the
    call."""

    saves, inplace = "input", 2
    slope = ("negative_slope", 0.01)

    def reads_first(self, args, kwargs):
        return False  # in place, the output is the record

    def check(self, args, kwargs):
        name, default = self.slope
        slope = argument(args, kwargs, 1, name, default)[1]
        if self.writes_first(args, kwargs) and isinstance(slope, (int, float)) and slope < 0:
            raise ValueError(f"{self.name}: in place with {name}={slope} (autograd refuses its backward too: the "
                             "output does not tell the input's sign); expected inplace=False or a slope >= 0")

    def record(self, args, kwargs, out):
        self.check(args, kwargs)
        in_place = self.writes_first(args, kwargs)
        key, x = argument(args, kwargs, 0, FIRST)
        name, default = self.slope
        return key, (out if in_place else x), (argument(args, kwargs, 1, name, default)[1], in_place)

    def kernel(self, out_adj, value, slope, is_result):
        return _aten.leaky_relu_backward(out_adj, value, slope, is_result)


class _ELU(_LeakyReLU):
    """As leaky_relu, with ``alpha`` for the slope."""

    slope = ("alpha", 1.0)

    def kernel(self, out_adj, value, alpha, is_result):
        return _aten.elu_backward(out_adj, alpha, 1.0, 1.0, is_result, value)


def _in_place_flag(entry: type, position: int) -> type:
    """``entry`` for a call whose ``inplace`` flag is at ``position`` (or the keyword): it writes its input when set."""
    return type(entry.__name__ + "Flag", (entry,), {"inplace": position})


def _always_in_place(entry: type) -> type:
    """The ``F.leaky_relu_`` form of an entry: the call always writes its input."""
    return type(entry.__name__ + "_", (entry,), {"inplace": True})


class _Softplus(_Activation):
    saves = "input"

    def options(self, args, kwargs):
        return argument(args, kwargs, 1, "beta", 1.0)[1], argument(args, kwargs, 2, "threshold", 20.0)[1]

    def kernel(self, out_adj, x, beta, threshold):
        return _aten.softplus_backward(out_adj, x, beta, threshold)


class _GELU(_Activation):
    saves = "input"

    def options(self, args, kwargs):
        return (argument(args, kwargs, 1, "approximate", "none")[1],)

    def kernel(self, out_adj, x, approximate):
        return _aten.gelu_backward(out_adj, x, approximate=approximate)


class _Softmax(Junction):
    """softmax(z, dim) and (``log=True``) log_softmax: autograd's ``_softmax_backward_data`` /
    ``_log_softmax_backward_data`` on the output. ``dim=None`` (F.softmax's implicit dim) is resolved as torch
    does; a ``dtype`` that changes the dtype is refused."""

    def __init__(self, log=False):
        self.kernel = _aten._log_softmax_backward_data if log else _aten._softmax_backward_data
        self.lfp = None if log else "softmax"  # LFP's reward is defined on logits: log_softmax refused

    @staticmethod
    def reduced_dim(saved) -> int:
        """The dim the softmax normalises over (LFP's softmax rule sums the reward over it)."""
        return saved[2]

    def check(self, args, kwargs):
        refuse_dtype_change(self.name, args, kwargs, 2)

    def record(self, args, kwargs, out):
        self.check(args, kwargs)
        key, z = argument(args, kwargs, 0, FIRST)
        dim = argument(args, kwargs, 1, "dim", None)[1]
        dim = (0 if z.dim() in (0, 1, 3) else 1) if dim is None else dim
        return key, out, dim % max(z.dim(), 1)

    def input_adjoints(self, saved, out_adj):
        key, out, dim = saved
        return {key: self.kernel(out_adj, out, dim, out.dtype)}


class _Attention(Junction):
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=0, is_causal, scale)``, composed from the
    math (see the module's table); a boolean or causal mask is a constant, an additive float mask gets the
    adjoint of the scores, S*, as autograd gives it (the tape ignores it where the mask is a constant)."""

    def check(self, args, kwargs):
        dropout = argument(args, kwargs, 4, "dropout_p", 0.0)[1]
        if dropout > 0:
            raise ValueError(f"{self.name}: dropout_p={dropout} drops at random and keeps no mask; expected "
                             "dropout_p=0.0")
        if kwargs.get("enable_gqa", False):
            raise ValueError(f"{self.name}: enable_gqa=True is not in the table; expected enable_gqa=False")

    def autograd_saves(self, args, kwargs, out):
        return (out,)  # with q, k, v and the log-sum-exp; the record recomputes P instead

    def record(self, args, kwargs, out):
        self.check(args, kwargs)
        qkv = [argument(args, kwargs, i, name) for i, name in enumerate(("query", "key", "value"))]
        mask = argument(args, kwargs, 3, "attn_mask", None)
        causal = bool(argument(args, kwargs, 5, "is_causal", False)[1])
        scale = kwargs.get("scale")
        return qkv, mask, causal, 1 / math.sqrt(qkv[0][1].shape[-1]) if scale is None else scale

    def input_adjoints(self, saved, out_adj):
        ((kq, q), (kk, k), (kv, v)), (km, mask), causal, scale = saved
        scores = (q @ k.mT) * scale
        if causal:  # top-left aligned, as torch's
            mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask
        attn = torch.softmax(scores, -1)
        scores_adj = _aten._softmax_backward_data(out_adj @ v.mT, attn, -1, attn.dtype)
        adjs = {kv: fit(attn.mT @ out_adj, v.shape, v.dtype)}
        if is_floating(mask):  # an additive mask (a relative-position bias may be a parameter)
            adjs[km] = fit(scores_adj, mask.shape, mask.dtype)
        scores_adj = scores_adj * scale
        adjs.update({kq: fit(scores_adj @ k, q.shape, q.dtype), kk: fit(scores_adj.mT @ q, k.shape, k.dtype)})
        return adjs


JUNCTIONS.update(entries({
    "torch.relu Tensor.relu": _ReLU,
    "F.relu": _in_place_flag(_ReLU, 1),  # F.relu(x, inplace=True) writes x: a new version of it (the tape's keep)
    "F.relu_ torch.relu_ Tensor.relu_": _always_in_place(_ReLU),
    "F.hardtanh": _in_place_flag(_Hardtanh, 3),
    "F.hardtanh_": _always_in_place(_Hardtanh),
    "F.relu6": _in_place_flag(_ReLU6, 1),
    "torch.sigmoid Tensor.sigmoid F.sigmoid": _Sigmoid,
    "torch.sigmoid_ Tensor.sigmoid_": _always_in_place(_Sigmoid),
    "torch.tanh Tensor.tanh F.tanh": _Tanh,
    "torch.tanh_ Tensor.tanh_": _always_in_place(_Tanh),
    "F.hardswish": _Hardswish,
    "F.hardsigmoid": _Hardsigmoid,
    "F.silu": _SiLU,
    "F.mish": _Mish,
    "F.gelu": _GELU,
    "F.leaky_relu": _LeakyReLU,
    "F.leaky_relu_": _always_in_place(_LeakyReLU),
    "F.elu": _ELU,
    "F.elu_": _always_in_place(_ELU),
    "F.softplus": _Softplus,
    "torch.softmax Tensor.softmax F.softmax": _Softmax,
    "torch.log_softmax Tensor.log_softmax F.log_softmax": lambda: _Softmax(log=True),
    "F.scaled_dot_product_attention": _Attention,
}))
