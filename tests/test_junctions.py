"""Every entry of the junction table against autograd, one harness (STYLE T1; docs/maths.md §7.1).

A case is a callable of the table, a seeded factory of its arguments (float64, mixed signs, denominators
away from 0, moderate softmax scales) and, for multi-output ops, the outputs left without an adjoint. The
harness runs the call through the entry (``run`` under no_grad, then ``input_adjoints`` with a random O* of
the output's shape) and compares each adjoint with ``oracles.vjp``, autograd's gradient of Σ out ⊙ O*:
float64 within 1e-10 of the larger of the reference's max-abs and 1e-8; float32 within 1e-5, and bit for bit
(``torch.equal``) for every entry that calls autograd's own kernels (all but matmul, einsum and SDPA:
``NOT_BITWISE``). An input autograd does not reach (``view_as``'s other, integer ids) must get no key.
"""
from __future__ import annotations

import re
import warnings
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

import torch_fadjoint.activations  # noqa: F401  (fills JUNCTIONS)
import torch_fadjoint.arithmetic  # noqa: F401  (fills JUNCTIONS)
from torch_fadjoint.junctions import JUNCTIONS, Junction

from . import oracles

DT = torch.float64


class Draw:
    """Seeded float64 inputs: ``n`` mixed signs, ``away`` |·| in [0.5, 1.5] with mixed signs (denominators),
    ``ids`` integers in [0, high)."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def n(self, *shape, scale=1.5):
        return torch.randn(shape, generator=self.gen, dtype=DT) * scale

    def away(self, *shape):
        sign = torch.randint(0, 2, shape, generator=self.gen).to(DT) * 2 - 1
        return sign * (0.5 + torch.rand(shape, generator=self.gen, dtype=DT))

    def ids(self, high, *shape):
        return torch.randint(0, high, shape, generator=self.gen)


@dataclass
class Case:
    id: str
    op: object
    make: object  # Draw -> (args, kwargs)
    drop: tuple = ()  # outputs that receive no adjoint (None)

    def __str__(self):
        return self.id


CASES: list[Case] = []


def case(id, op, make, drop=()):
    CASES.append(Case(id, op, make, drop))


def aliases(id, ops, make, drop=()):
    """The same call through each of ``ops``; ids ``{id}-{entry name}``."""
    for op in ops:
        case(f"{id}-{JUNCTIONS[op].name}", op, make, drop)


# ---------------------------------------------------------------- + − * /
case("add-same", torch.add, lambda d: ((d.n(3, 4), d.n(3, 4)), {}))
case("add-broadcast-row", torch.add, lambda d: ((d.n(3, 4), d.n(4)), {}))
case("add-broadcast-both", Tensor.add, lambda d: ((d.n(3, 1, 4), d.n(5, 1)), {}))
case("add-alpha", torch.add, lambda d: ((d.n(3, 4), d.n(4)), {"alpha": -0.7}))
case("add-0dim-tensor", torch.add, lambda d: ((d.n(3, 4), d.n()), {}))
case("add-number", Tensor.add, lambda d: ((d.n(3, 4), 2.5), {}))
case("add-int-tensor", torch.add, lambda d: ((d.n(3, 4), torch.arange(4)), {}))
case("add-mixed-dtype", torch.add, lambda d: ((d.n(3, 4), d.n(4).float()), {}))
case("add-keywords", torch.add, lambda d: ((), {"input": d.n(2, 3), "other": d.n(3), "alpha": 2}))
aliases("add", [Tensor.__add__, Tensor.__radd__], lambda d: ((d.n(3, 4), d.n(4)), {}))
case("add_-inplace-broadcast", Tensor.add_, lambda d: ((d.n(3, 4), d.n(4)), {"alpha": 2}))
case("iadd", Tensor.__iadd__, lambda d: ((d.n(3, 4), d.n(3, 4)), {}))
case("sub-broadcast-col", torch.sub, lambda d: ((d.n(3, 4), d.n(3, 1)), {}))
case("sub-alpha", Tensor.sub, lambda d: ((d.n(3, 4), d.n(3, 4)), {"alpha": 1.5}))
case("sub-number", Tensor.__sub__, lambda d: ((d.n(3, 4), 2.0), {}))
aliases("sub", [torch.subtract, Tensor.subtract], lambda d: ((d.n(2, 3), d.n(3)), {}))
aliases("sub_-inplace", [Tensor.sub_, Tensor.subtract_, Tensor.__isub__], lambda d: ((d.n(2, 3), d.n(3)), {}))
case("rsub-alpha", torch.rsub, lambda d: ((d.n(3, 4), d.n(4)), {"alpha": 0.5}))
case("rsub-number", Tensor.__rsub__, lambda d: ((d.n(3, 4), 2), {}))
case("mul-gate-broadcast", torch.mul, lambda d: ((d.n(2, 3, 4), d.n(2, 3, 1)), {}))
case("mul-layer-scale", Tensor.mul, lambda d: ((d.n(4), d.n(2, 3, 4)), {}))
case("mul-number", Tensor.__rmul__, lambda d: ((d.n(3, 4), -1.7), {}))
aliases("mul", [torch.multiply, Tensor.multiply, Tensor.__mul__], lambda d: ((d.n(3, 4), d.n(3, 4)), {}))
case("mul_-inplace-tensor", Tensor.mul_, lambda d: ((d.n(3, 4), d.n(4)), {}))
case("mul_-inplace-number", Tensor.mul_, lambda d: ((d.n(3, 4), 3.0), {}))
aliases("mul_-inplace", [Tensor.multiply_, Tensor.__imul__], lambda d: ((d.n(3, 4), d.n(3, 4)), {}))
case("div-broadcast", torch.div, lambda d: ((d.n(3, 4), d.away(4)), {}))
case("div-0dim-numerator", torch.div, lambda d: ((d.n(), d.away(3, 4)), {}))
case("div-number", Tensor.div, lambda d: ((d.n(3, 4), 4.0), {}))
aliases("div", [torch.divide, torch.true_divide, Tensor.divide, Tensor.true_divide, Tensor.__truediv__],
        lambda d: ((d.n(3, 4), d.away(3, 1)), {}))
case("div_-inplace-tensor", Tensor.div_, lambda d: ((d.n(3, 4), d.away(3, 4)), {}))
case("div_-inplace-number", Tensor.__itruediv__, lambda d: ((d.n(3, 4), 2.0), {}))
aliases("div_-inplace", [Tensor.divide_, Tensor.true_divide_], lambda d: ((d.n(3, 4), d.away(4)), {}))
case("rdiv-number", Tensor.__rtruediv__, lambda d: ((d.away(3, 4), 3.0), {}))
aliases("neg", [torch.neg, torch.negative, Tensor.neg, Tensor.negative], lambda d: ((d.n(3, 4),), {}))

# ---------------------------------------------------------------- joining and taking apart
case("cat-dim1-3inputs", torch.cat, lambda d: (([d.n(2, 3), d.n(2, 1), d.n(2, 4)], 1), {}))
case("cat-keywords-dim-neg", torch.cat, lambda d: ((), {"tensors": [d.n(2, 3, 2), d.n(2, 1, 2)], "dim": -2}))
case("cat-with-integer-tensor", torch.cat, lambda d: (([d.n(2, 3), torch.ones(1, 3, dtype=torch.long)],), {}))
case("cat-legacy-empty", torch.cat, lambda d: (([d.n(2, 3), torch.empty(0, dtype=DT), d.n(1, 3)], 0), {}))
case("concat", torch.concat, lambda d: (([d.n(2, 3), d.n(4, 3)],), {}))
case("concatenate-axis", torch.concatenate, lambda d: (([d.n(2, 3), d.n(2, 2)],), {"axis": 1}))
case("stack-dim0", torch.stack, lambda d: (([d.n(2, 3), d.n(2, 3), d.n(2, 3)],), {}))
case("stack-dim-neg", torch.stack, lambda d: (([d.n(2, 3), d.n(2, 3)], -1), {}))
case("split-sections-dim1", torch.split, lambda d: ((d.n(2, 5), [1, 3, 1]), {"dim": 1}))
case("split-size-missing-adjoint", Tensor.split, lambda d: ((d.n(5, 3), 2), {}), drop=(1,))
case("chunk-3-dim1", torch.chunk, lambda d: ((d.n(2, 7), 3, 1), {}))
case("chunk-method-missing", Tensor.chunk, lambda d: ((d.n(4, 3), 2), {}), drop=(0,))
case("unbind-dim1-missing", torch.unbind, lambda d: ((d.n(2, 3, 2), 1), {}), drop=(2,))
case("unbind-method", Tensor.unbind, lambda d: ((d.n(3, 2),), {}))
case("getitem-int", Tensor.__getitem__, lambda d: ((d.n(3, 4), 1), {}))
case("getitem-slices-step", Tensor.__getitem__, lambda d: ((d.n(5, 6), (slice(1, None, 2), slice(None, -1))), {}))
case("getitem-none-ellipsis", Tensor.__getitem__, lambda d: ((d.n(2, 3, 4), (None, Ellipsis, -1)), {}))
case("getitem-cls-token", Tensor.__getitem__, lambda d: ((d.n(2, 5, 4), (slice(None), 0)), {}))
case("getitem-long-repeats", Tensor.__getitem__, lambda d: ((d.n(4, 3), torch.tensor([2, 0, 2, 3])), {}))
case("getitem-bool-mask", Tensor.__getitem__, lambda d: ((d.n(3, 4), torch.tensor([True, False, True])), {}))
case("getitem-lists", Tensor.__getitem__, lambda d: ((d.n(3, 4), ([0, 2, 0], [1, 1, 3])), {}))
case("getitem-slice-and-tensor", Tensor.__getitem__,
     lambda d: ((d.n(2, 5, 3), (slice(None), torch.tensor([[4, 0], [4, 1]]), 1)), {}))
case("select-dim1", torch.select, lambda d: ((d.n(3, 4, 2), 1, -1), {}))
case("select-method", Tensor.select, lambda d: ((d.n(3, 4), 0, 2), {}))
case("narrow-dim1", torch.narrow, lambda d: ((d.n(3, 6), 1, 2, 3), {}))
case("narrow-negative-start", Tensor.narrow, lambda d: ((d.n(5, 2), 0, -3, 2), {}))

# ---------------------------------------------------------------- rearrangements
case("permute-varargs", Tensor.permute, lambda d: ((d.n(2, 3, 4), 2, 0, 1), {}))
case("permute-tuple-neg", torch.permute, lambda d: ((d.n(2, 3, 4), (1, -1, 0)), {}))
case("transpose-neg", torch.transpose, lambda d: ((d.n(2, 3, 4), -1, 0), {}))
aliases("transpose", [Tensor.transpose, torch.swapaxes, Tensor.swapaxes, torch.swapdims, Tensor.swapdims],
        lambda d: ((d.n(2, 3, 4), 1, 2), {}))
case("t-2d", torch.t, lambda d: ((d.n(3, 4),), {}))
case("t-1d", Tensor.t, lambda d: ((d.n(4),), {}))
case("T-2d", Tensor.T.__get__, lambda d: ((d.n(3, 4),), {}))
case("mT-3d", Tensor.mT.__get__, lambda d: ((d.n(2, 3, 4),), {}))
case("reshape-tuple", torch.reshape, lambda d: ((d.n(2, 3, 4), (4, -1)), {}))
case("reshape-varargs", Tensor.reshape, lambda d: ((d.n(2, 3, 4), 6, 4), {}))
case("view-heads", Tensor.view, lambda d: ((d.n(2, 5, 6), 2, 5, 3, 2), {}))
case("view_as", Tensor.view_as, lambda d: ((d.n(2, 6), d.n(3, 4)), {}))
case("reshape_as", Tensor.reshape_as, lambda d: ((d.n(2, 6).t(), d.n(3, 4)), {}))
case("flatten-start1", torch.flatten, lambda d: ((d.n(2, 3, 4), 1), {}))
case("flatten-method", Tensor.flatten, lambda d: ((d.n(2, 3, 4),), {}))
case("unflatten", torch.unflatten, lambda d: ((d.n(2, 6), 1, (3, 2)), {}))
case("unflatten-method", Tensor.unflatten, lambda d: ((d.n(6, 2), 0, (2, -1)), {}))
case("squeeze-dim", torch.squeeze, lambda d: ((d.n(2, 1, 3), 1), {}))
case("squeeze-all", Tensor.squeeze, lambda d: ((d.n(1, 3, 1),), {}))
case("unsqueeze", torch.unsqueeze, lambda d: ((d.n(2, 3), -1), {}))
case("unsqueeze-method", Tensor.unsqueeze, lambda d: ((d.n(2, 3), 0), {}))
case("contiguous-of-transpose", Tensor.contiguous, lambda d: ((d.n(3, 4).t(),), {}))
case("expand-leading", Tensor.expand, lambda d: ((d.n(3, 1), 2, 3, 4), {}))
case("expand-cls-token", Tensor.expand, lambda d: ((d.n(1, 1, 4), 3, -1, -1), {}))
case("expand_as", Tensor.expand_as, lambda d: ((d.n(1, 4), d.n(3, 4)), {}))
aliases("broadcast_to", [torch.broadcast_to, Tensor.broadcast_to], lambda d: ((d.n(4), (2, 3, 4)), {}))
case("roll-dim", torch.roll, lambda d: ((d.n(3, 5), 2, 1), {}))
case("roll-dims-tuple", Tensor.roll, lambda d: ((d.n(3, 5), (1, -2), (0, 1)), {}))
case("roll-flat", torch.roll, lambda d: ((d.n(3, 5), 4), {}))
case("pad-constant-value", F.pad, lambda d: ((d.n(2, 3, 4), (1, 2, 0, 1)), {"value": 0.5}))
case("pad-negative-crop", F.pad, lambda d: ((d.n(2, 3, 5), (-1, 2)), {"mode": "constant"}))

# ---------------------------------------------------------------- products
case("matmul-2d", torch.matmul, lambda d: ((d.n(3, 4), d.n(4, 5)), {}))
case("matmul-broadcast-batch", torch.matmul, lambda d: ((d.n(2, 1, 3, 4), d.n(5, 4, 2)), {}))
case("matmul-3d-by-weight", Tensor.matmul, lambda d: ((d.n(2, 3, 4), d.n(4, 5)), {}))
case("matmul-vector-left", torch.matmul, lambda d: ((d.n(4), d.n(2, 4, 3)), {}))
case("matmul-vector-right", torch.matmul, lambda d: ((d.n(2, 3, 4), d.n(4)), {}))
case("matmul-dot", torch.matmul, lambda d: ((d.n(4), d.n(4)), {}))
case("matmul-operator", Tensor.__matmul__, lambda d: ((d.n(2, 3, 4), d.n(2, 4, 3)), {}))
case("rmatmul", Tensor.__rmatmul__, lambda d: ((d.n(4, 5), d.n(3, 4)), {}))
aliases("mm", [torch.mm, Tensor.mm], lambda d: ((d.n(3, 4), d.n(4, 2)), {}))
aliases("bmm", [torch.bmm, Tensor.bmm], lambda d: ((d.n(2, 3, 4), d.n(2, 4, 5)), {}))
case("einsum-attention-scores", torch.einsum, lambda d: (("bhqd,bhkd->bhqk", d.n(2, 3, 4, 5), d.n(2, 3, 6, 5)), {}))
case("einsum-ellipsis-broadcast", torch.einsum, lambda d: (("...ij,...jk->...ik", d.n(2, 3, 4), d.n(4, 5)), {}))
case("einsum-implicit-output", torch.einsum, lambda d: (("ij,jk", d.n(3, 4), d.n(4, 2)), {}))
case("einsum-lonely-labels", torch.einsum, lambda d: (("ij,kl->ik", d.n(3, 4), d.n(2, 5)), {}))
case("einsum-list-form", torch.einsum, lambda d: (("bi,bj->bij", [d.n(3, 4), d.n(3, 2)]), {}))
case("einsum-size1-label", torch.einsum, lambda d: (("ij,jk->ik", d.n(3, 1), d.n(4, 2)), {}))
case("einsum-outer-batch-sum", torch.einsum, lambda d: (("b i, b j -> i j", d.n(5, 3), d.n(5, 2)), {}))

# ---------------------------------------------------------------- reductions and lookups
case("sum-all", torch.sum, lambda d: ((d.n(3, 4),), {}))
case("sum-dim-keepdim", Tensor.sum, lambda d: ((d.n(3, 4, 2), 1, True), {}))
case("sum-tuple-neg", torch.sum, lambda d: ((d.n(3, 4, 2),), {"dim": (0, -1)}))
case("sum-0dim-dim0", torch.sum, lambda d: ((d.n(), 0), {}))
case("mean-all", Tensor.mean, lambda d: ((d.n(3, 4),), {}))
case("mean-dim", torch.mean, lambda d: ((d.n(3, 4, 2), -1), {}))
case("mean-tuple-keepdim", torch.mean, lambda d: ((d.n(3, 4, 2), (1, 2)), {"keepdim": True}))
case("amax-dim", torch.amax, lambda d: ((d.n(3, 4), 1), {}))
case("amax-tuple-keepdim", Tensor.amax, lambda d: ((d.n(3, 4, 2), (0, 2), True), {}))
case("amax-0dim", torch.amax, lambda d: ((d.n(),), {}))
case("amax-ties", torch.amax, lambda d: ((d.n(3, 4).round(), 1), {}))
case("max-dim", torch.max, lambda d: ((d.n(3, 4), 1), {}))
case("max-dim-keepdim", Tensor.max, lambda d: ((d.n(3, 4, 2),), {"dim": 0, "keepdim": True}))
case("max-all-ties", torch.max, lambda d: ((torch.tensor([[1.0, 3.0], [3.0, -2.0]], dtype=DT),), {}))
case("embedding", F.embedding, lambda d: ((d.ids(5, 3, 4), d.n(5, 3)), {}))
case("embedding-padding-idx", F.embedding, lambda d: ((torch.tensor([[0, 2, 1], [2, 2, 3]]), d.n(4, 3), 2), {}))
case("embedding-negative-padding", F.embedding,
     lambda d: ((torch.tensor([4, 0, 4, 1]), d.n(5, 2)), {"padding_idx": -1}))
case("embedding-scale-grad-by-freq", F.embedding,
     lambda d: ((torch.tensor([1, 1, 0, 3, 1]), d.n(4, 3)), {"scale_grad_by_freq": True}))

# ---------------------------------------------------------------- activations, softmax, attention
aliases("relu", [F.relu, torch.relu, Tensor.relu], lambda d: ((d.n(3, 4),), {}))
case("relu-inplace", F.relu, lambda d: ((d.n(3, 4),), {"inplace": True}))
aliases("relu_", [F.relu_, torch.relu_, Tensor.relu_], lambda d: ((d.n(3, 4),), {}))
case("relu6", F.relu6, lambda d: ((d.n(3, 5, scale=5),), {}))
case("relu6-inplace", F.relu6, lambda d: ((d.n(3, 5, scale=5), True), {}))
case("hardtanh-bounds", F.hardtanh, lambda d: ((d.n(3, 5, scale=2), -0.5, 1.5), {}))
case("hardtanh_", F.hardtanh_, lambda d: ((d.n(3, 5, scale=2),), {}))
case("hardswish", F.hardswish, lambda d: ((d.n(3, 5, scale=3),), {}))
case("hardswish-inplace", F.hardswish, lambda d: ((d.n(3, 5, scale=3),), {"inplace": True}))
case("hardsigmoid", F.hardsigmoid, lambda d: ((d.n(3, 5, scale=3),), {}))
case("hardsigmoid-inplace", F.hardsigmoid, lambda d: ((d.n(3, 5, scale=3), True), {}))
case("silu", F.silu, lambda d: ((d.n(3, 5, scale=3),), {}))
case("silu-inplace", F.silu, lambda d: ((d.n(3, 5, scale=3),), {"inplace": True}))
case("mish", F.mish, lambda d: ((d.n(3, 5, scale=3),), {}))
case("mish-inplace", F.mish, lambda d: ((d.n(3, 5, scale=3),), {"inplace": True}))
case("gelu", F.gelu, lambda d: ((d.n(3, 5, scale=3),), {}))
case("gelu-tanh", F.gelu, lambda d: ((d.n(3, 5, scale=3),), {"approximate": "tanh"}))
case("leaky_relu", F.leaky_relu, lambda d: ((d.n(3, 5, scale=3), 0.2), {}))
case("leaky_relu-negative-slope", F.leaky_relu, lambda d: ((d.n(3, 5, scale=3), -0.3), {}))
case("leaky_relu-inplace", F.leaky_relu, lambda d: ((d.n(3, 5, scale=3),), {"negative_slope": 0.1, "inplace": True}))
case("leaky_relu_", F.leaky_relu_, lambda d: ((d.n(3, 5, scale=3), 0.1), {}))
case("elu", F.elu, lambda d: ((d.n(3, 5, scale=3), 0.7), {}))
case("elu-inplace", F.elu, lambda d: ((d.n(3, 5, scale=3),), {"inplace": True}))
case("elu_", F.elu_, lambda d: ((d.n(3, 5, scale=3),), {}))
case("softplus", F.softplus, lambda d: ((d.n(3, 5, scale=3),), {"beta": 2.0, "threshold": 1.0}))
aliases("sigmoid", [torch.sigmoid, Tensor.sigmoid, F.sigmoid, torch.sigmoid_, Tensor.sigmoid_],
        lambda d: ((d.n(3, 4),), {}))
aliases("tanh", [torch.tanh, Tensor.tanh, F.tanh, torch.tanh_, Tensor.tanh_], lambda d: ((d.n(3, 4),), {}))
case("softmax-dim1", F.softmax, lambda d: ((d.n(3, 5),), {"dim": 1}))
case("softmax-dim0", torch.softmax, lambda d: ((d.n(3, 5), 0), {}))
case("softmax-method-last", Tensor.softmax, lambda d: ((d.n(2, 3, 5), -1), {}))
case("softmax-implicit-dim", F.softmax, lambda d: ((d.n(3, 2, 4),), {}))
case("softmax-dtype-same", torch.softmax, lambda d: ((d.n(3, 5), 1), {"dtype": None}))
case("log_softmax-dim1", F.log_softmax, lambda d: ((d.n(3, 5), 1), {}))
aliases("log_softmax", [torch.log_softmax, Tensor.log_softmax], lambda d: ((d.n(2, 3, 4), 0), {}))
case("sdpa", F.scaled_dot_product_attention, lambda d: ((d.n(2, 3, 5, 4), d.n(2, 3, 6, 4), d.n(2, 3, 6, 2)), {}))
case("sdpa-causal", F.scaled_dot_product_attention,
     lambda d: ((d.n(2, 2, 5, 4), d.n(2, 2, 5, 4), d.n(2, 2, 5, 3)), {"is_causal": True}))
case("sdpa-causal-rectangular", F.scaled_dot_product_attention,
     lambda d: ((d.n(1, 2, 3, 4), d.n(1, 2, 5, 4), d.n(1, 2, 5, 3)), {"is_causal": True}))
case("sdpa-bool-mask", F.scaled_dot_product_attention,
     lambda d: ((d.n(2, 4, 4), d.n(2, 6, 4), d.n(2, 6, 3), (d.n(4, 6) > -0.5) | torch.eye(4, 6, dtype=torch.bool)), {}))
case("sdpa-float-mask-scale", F.scaled_dot_product_attention,
     lambda d: ((d.n(2, 4, 4), d.n(2, 6, 4), d.n(2, 6, 3)), {"attn_mask": d.n(2, 4, 6), "scale": 0.3}))
case("sdpa-keywords", F.scaled_dot_product_attention,
     lambda d: ((), {"query": d.n(3, 4), "key": d.n(5, 4), "value": d.n(5, 2)}))

# Entries whose float32 adjoints are autograd's to rounding only: they sum in another order than autograd's
# decomposition (matmul of a 1-d by a batched operand: autograd folds it into an mv; SDPA: autograd's fused
# CPU kernel). mm and bmm call the mm/bmm autograd's backward calls: bit for bit.
NOT_BITWISE = {F.scaled_dot_product_attention, torch.einsum, torch.matmul, Tensor.matmul, Tensor.__matmul__,
               Tensor.__rmatmul__}


def _cast(value, dtype):
    """``value`` with its float64 tensors (in lists and dicts too) cast to ``dtype`` and copied."""
    if isinstance(value, Tensor):
        return value.to(dtype).clone() if value.dtype == DT else value.clone()
    if isinstance(value, (list, tuple)) and any(isinstance(v, Tensor) for v in value):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _inputs(args, kwargs):
    """[(key, tensor)] of the call's floating tensors, keyed as the entries key them."""
    found = []
    for key, value in list(enumerate(args)) + list(kwargs.items()):
        if isinstance(value, Tensor) and value.is_floating_point():
            found.append((key, value))
        elif isinstance(value, list):
            found += [((key, i), t) for i, t in enumerate(value) if isinstance(t, Tensor) and t.is_floating_point()]
    return found


def _substitute(args, kwargs, new: dict):
    """The call with the tensors under ``new``'s keys replaced."""
    def value(key, v):
        if isinstance(v, list):
            return [new.get((key, i), t) for i, t in enumerate(v)]
        return new.get(key, v)
    return tuple(value(i, v) for i, v in enumerate(args)), {k: value(k, v) for k, v in kwargs.items()}


def _check(case: Case, dtype, bitwise: bool):
    args, kwargs = case.make(Draw(zlib.crc32(case.id.encode())))
    args, kwargs = _cast(args, dtype), _cast(kwargs, dtype)
    entry = JUNCTIONS[case.op]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # F.softmax's implicit dim
        mine_args, mine_kwargs = _cast(args, dtype), _cast(kwargs, dtype)
        out, saved = entry.run(case.op, mine_args, mine_kwargs)
    if entry.writes_first(args, kwargs):
        assert out is mine_args[0], "an in-place call returns the tensor it wrote"
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(1)
    adjs = tuple(None if i in case.drop or not o.is_floating_point() else
                 torch.randn(o.shape, generator=gen, dtype=DT).to(o.dtype) for i, o in enumerate(outs))
    out_adj = adjs if isinstance(out, tuple) else adjs[0]
    with torch.no_grad():
        got = entry.input_adjoints(saved, out_adj)
    keys, tensors = zip(*_inputs(args, kwargs))

    def call(*leaves):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a, k = _substitute(args, kwargs, {key: leaf.clone() for key, leaf in zip(keys, leaves)})
            return case.op(*a, **k)

    ref_out, wants = oracles.vjp(call, tensors, out_adj)
    for mine, ref in zip(outs, ref_out if isinstance(out, tuple) else (ref_out,)):
        assert torch.equal(mine, ref), "the entry's run computes what the call computes"
    compare_adjoints(got, keys, wants, dtype, bitwise)


def compare_adjoints(got: dict, keys, wants, dtype, bitwise: bool) -> None:
    """One key per input autograd reaches; each adjoint of the reference's shape and dtype, within 1e-10 (float64)
    or 1e-5 (float32) of its largest entry, and bit for bit when ``bitwise``."""
    assert set(got) == {key for key, want in zip(keys, wants) if want is not None}, "one key per input autograd reaches"
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for key, want in zip(keys, wants):
        if want is None:
            continue
        have = got[key]
        assert have.shape == want.shape and have.dtype == want.dtype, (key, have.shape, want.shape, have.dtype)
        scale = want.abs().max().item() if want.numel() else 0.0
        assert want.numel() == 0 or scale > 1e-6, f"degenerate reference for input {key}"
        err = (have - want).abs().max().item() if want.numel() else 0.0
        assert err <= tol * max(scale, 1e-8), f"input {key}: max error {err:.3g}, reference max {scale:.3g}"
        if bitwise:
            assert torch.equal(have, want), f"input {key}: not bit-identical to autograd's (max error {err:.3g})"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_adjoints_equal_autograd_float64(case):
    _check(case, torch.float64, bitwise=False)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_adjoints_equal_autograd_float32(case):
    """Within 1e-5, and bit for bit where the entry calls autograd's own kernels."""
    _check(case, torch.float32, bitwise=case.op not in NOT_BITWISE)


_OURS = ("torch_fadjoint.junctions", "torch_fadjoint.arithmetic", "torch_fadjoint.activations")


def test_every_entry_has_a_case():
    """Every entry of this file's three modules (functionals and poolings have theirs in test_functionals)."""
    assert len(CASES) >= 60
    mine = {op: entry for op, entry in JUNCTIONS.items() if type(entry).__module__ in _OURS}
    missing = {entry.name for op, entry in mine.items() if op not in {c.op for c in CASES}}
    assert not missing, f"entries without a case: {sorted(missing)}"
    assert all(isinstance(entry, Junction) and entry.name != "?" for entry in JUNCTIONS.values())


class _Seen(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.funcs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.funcs.append(func)
        return func(*args, **(kwargs or {}))


OPERATORS = {  # Python's syntax → the callable a function mode (the tape) receives
    "x + y": (lambda x, y: x + y, Tensor.add), "2 + x": (lambda x, y: 2 + x, Tensor.add),
    "x - y": (lambda x, y: x - y, Tensor.sub), "2 - x": (lambda x, y: 2 - x, Tensor.__rsub__),
    "x * y": (lambda x, y: x * y, Tensor.mul), "x / y": (lambda x, y: x / y, Tensor.div),
    "2 / x": (lambda x, y: 2 / x, Tensor.__rtruediv__), "-x": (lambda x, y: -x, Tensor.neg),
    "x @ y": (lambda x, y: x @ y, Tensor.matmul), "x[0]": (lambda x, y: x[0], Tensor.__getitem__),
    "x += y": (lambda x, y: x.__iadd__(y), Tensor.add_), "x *= y": (lambda x, y: x.__imul__(y), Tensor.mul_),
    "x /= y": (lambda x, y: x.__itruediv__(y), Tensor.div_), "x -= y": (lambda x, y: x.__isub__(y), Tensor.sub_),
    "x.T": (lambda x, y: x.T, Tensor.T.__get__), "x.mT": (lambda x, y: x.mT, Tensor.mT.__get__),
    "F.sigmoid(x)": (lambda x, y: F.sigmoid(x), Tensor.sigmoid), "F.tanh(x)": (lambda x, y: F.tanh(x), Tensor.tanh),
    "F.relu_(x)": (lambda x, y: F.relu_(x), torch.relu_),
}


@pytest.mark.parametrize("syntax", sorted(OPERATORS))
def test_operators_reach_a_function_mode_as_a_table_key(syntax):
    """The tape sees ``x + y`` as ``Tensor.add``, ``x += y`` as ``Tensor.add_``, ``x.T`` as the property's getter,
    ``F.sigmoid`` as ``Tensor.sigmoid``: each is a key of the table (the ``__add__`` forms never reach it)."""
    fn, expected = OPERATORS[syntax]
    seen, x, y = _Seen(), torch.randn(4, 4), torch.randn(4, 4)
    with seen:
        fn(x, y)
    assert seen.funcs == [expected] and expected in JUNCTIONS


def _x(*shape):
    return torch.randn(shape, dtype=DT)


REFUSALS = {  # id: (callable, args, kwargs, exception, message) — each refused by record (or run) in one line
    "softmax-dtype": (torch.softmax, (_x(2, 3), 1), {"dtype": torch.float32}, ValueError,
                      "torch.softmax: dtype=torch.float32 changes the dtype; expected dtype=None"),
    "log_softmax-dtype": (F.log_softmax, (_x(2, 3), 1), {"dtype": torch.float32}, ValueError,
                          "F.log_softmax: dtype=torch.float32 changes the dtype; expected dtype=None"),
    "sum-dtype": (torch.sum, (_x(2, 3),), {"dtype": torch.float32}, ValueError,
                  "torch.sum: dtype=torch.float32 changes the dtype; expected dtype=None"),
    "div_-rounding-mode": (Tensor.div_, (_x(2, 3), _x(3)), {"rounding_mode": "trunc"}, ValueError,
                           "Tensor.div_: rounding_mode='trunc' is piecewise constant; expected rounding_mode=None"),
    "div-rounding-mode": (torch.div, (_x(2, 3), _x(3)), {"rounding_mode": "floor"}, ValueError,
                          "torch.div: rounding_mode='floor' is piecewise constant; expected rounding_mode=None"),
    "view-dtype": (Tensor.view, (_x(2, 3), torch.int64), {}, ValueError,
                   "Tensor.view: view(dtype) reinterprets the bits; expected a shape"),
    "pad-reflect": (F.pad, (_x(1, 2, 3), (1, 1)), {"mode": "reflect"}, ValueError,
                    "F.pad: mode='reflect' is not in the table; expected mode='constant'"),
    "einsum-one-operand": (torch.einsum, ("ij->ji", _x(2, 3)), {}, ValueError,
                           "torch.einsum: 1 operands; expected two"),
    "einsum-three-operands": (torch.einsum, ("ij,jk,kl->il", _x(2, 3), _x(3, 4), _x(4, 2)), {}, ValueError,
                              "torch.einsum: 3 operands; expected two"),
    "einsum-diagonal": (torch.einsum, ("ii,ij->j", _x(3, 3), _x(3, 2)), {}, ValueError,
                        "torch.einsum: 'ii,ij->j' repeats a label in one operand (a diagonal); expected each label "
                        "once per operand"),
    "einsum-sublist": (torch.einsum, (_x(2, 3), [0, 1], _x(3, 4), [1, 2]), {}, TypeError,
                       "torch.einsum: the sublist form is not in the table; expected an equation string"),
    "sdpa-dropout": (F.scaled_dot_product_attention, (_x(2, 3, 4), _x(2, 3, 4), _x(2, 3, 4)), {"dropout_p": 0.1},
                     ValueError, "F.scaled_dot_product_attention: dropout_p=0.1 drops at random and keeps no mask; "
                                 "expected dropout_p=0.0"),
    "sdpa-gqa": (F.scaled_dot_product_attention, (_x(1, 4, 3, 2), _x(1, 2, 3, 2), _x(1, 2, 3, 2)),
                 {"enable_gqa": True}, ValueError,
                 "F.scaled_dot_product_attention: enable_gqa=True is not in the table; expected enable_gqa=False"),
    "embedding-max-norm": (F.embedding, (torch.tensor([0, 1]), _x(3, 2)), {"max_norm": 1.0}, ValueError,
                           "F.embedding: max_norm=1.0 renormalises the weight in place; expected max_norm=None"),
    "embedding-sparse": (F.embedding, (torch.tensor([0, 1]), _x(3, 2)), {"sparse": True}, ValueError,
                         "F.embedding: sparse=True gives a sparse gradient; expected sparse=False"),
    "max-elementwise": (torch.max, (_x(2, 3), _x(2, 3)), {}, TypeError,
                        "torch.max(input, other) is the elementwise maximum, not in the table; expected max(input) "
                        "or max(input, dim)"),
    "rdiv-tensor-numerator": (Tensor.__rtruediv__, (_x(2, 3), _x(2, 3)), {}, TypeError,
                              "Tensor.__rtruediv__: a tensor numerator; expected a number (t / x calls Tensor.div)"),
    "out-keyword": (torch.add, (_x(2, 3), _x(2, 3)), {"out": _x(2, 3)}, ValueError,
                    "torch.add: out= writes into a given tensor; expected no out="),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refusals_are_one_line(name):
    """Each refusal, through ``run`` and through ``record``; ``run`` refuses before the call (embedding's max_norm
    would renormalise the weight in place), so every argument is left as it was (STYLE §5)."""
    op, args, kwargs, error, message = REFUSALS[name]
    before = [a.clone() for a in args if isinstance(a, Tensor)]
    with torch.no_grad(), pytest.raises(error) as caught:
        JUNCTIONS[op].run(op, args, kwargs)
    assert str(caught.value) == message and "\n" not in message
    assert all(torch.equal(a, b) for a, b in zip([a for a in args if isinstance(a, Tensor)], before))
    if name != "out-keyword":
        with pytest.raises(error, match=re.escape(message)):
            JUNCTIONS[op].record(args, kwargs, args[0])


def test_getitem_refuses_a_floating_index():
    x = _x(3, 4)
    with pytest.raises(TypeError, match=r"^Tensor.__getitem__: a floating index; expected ints, slices"):
        JUNCTIONS[Tensor.__getitem__].record((x, torch.tensor([0.5])), {}, x)


@pytest.mark.parametrize("op, args, kwargs", [
    (F.silu, (_x(3, 4),), {"inplace": True}), (F.hardswish, (_x(3, 4), True), {}),
    (F.mish, (_x(3, 4),), {"inplace": True}), (F.hardsigmoid, (_x(3, 4),), {"inplace": True}),
    (Tensor.mul_, (_x(3, 4), _x(4)), {}), (Tensor.div_, (_x(3, 4), _x(4).abs() + 1), {}),
], ids=lambda v: getattr(v, "__name__", None) if callable(v) else "")
def test_record_after_an_overwrite_refuses(op, args, kwargs):
    """``record`` alone after an in-place call that overwrote the input its adjoint reads would be wrong by
    the overwrite: it refuses, naming ``run`` (which copies first)."""
    entry = JUNCTIONS[op]
    with torch.no_grad():
        out = op(*args, **kwargs)
    with pytest.raises(ValueError, match=re.escape(f"{entry.name}: the call overwrote the input its adjoint reads")):
        entry.record(args, kwargs, out)
