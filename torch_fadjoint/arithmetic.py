"""Junction entries that compute: + − * /, matmul, einsum, sum, mean, amax, max, embedding (docs/maths.md §7.1).

Added to :data:`torch_fadjoint.junctions.JUNCTIONS` on import; the verbs, keys and in-place rules are
``junctions.py``'s. The adjoints, O* the output's (each summed over broadcast dims, as autograd's ``sum_to``):

    a + α b, a − α b, b − α a    O*, ±α O*               a * b    O* ⊙ b, O* ⊙ a
    a / b                        O* / b, −O* ⊙ (a/b)/b   c / x    −(c O*) ⊙ (1/x)²
    a @ b (matmul, mm, bmm)      O* bᵀ, aᵀ O*            einsum   an einsum of O* and the other operand
    sum / mean                   O* expanded (/ count)   amax, max(x)   O* shared among the tied maxima
    max(x, dim)                  O* at the indices       F.embedding    O* scatter-added into the rows of ids

Each is autograd's formula in autograd's order (``mul_tensor_backward``, ``div_tensor_other_backward``,
``sum_backward``, ``value_selecting_reduction_backward``, ``embedding_dense_backward``, mm's and bmm's
products), so float32 results are bit-identical; matmul mirrors matmul's fold of a batched left operand but
not every case (1-d by batched: autograd's mv), and einsum's products are ours: those equal to rounding.
"""
from __future__ import annotations

import math
import string

import torch
from torch import Tensor

from .junctions import (FIRST, JUNCTIONS, Junction, argument, entries, fit, is_floating, reduced_dims,
                        refuse_dtype_change)

_aten = torch.ops.aten


# ---------------------------------------------------------------- arithmetic (§7.1: + − * /, broadcasting)

class _Add(Junction):
    """``input ± α·other`` (add, sub) and ``other − α·input`` (rsub, ``2 - x``): coefficient × O*, summed over
    broadcast dims. ``coefs``: the factors of (input, other), ``"alpha"`` standing for ±α."""

    lfp = "epsilon"  # LFP's residual-sum rule: a ⊙ S, ±α b ⊙ S (docs/maths.md §7.2)

    def __init__(self, coefs, inplace=False):
        self.coefs, self.inplace = coefs, inplace

    def record(self, args, kwargs, out):
        alpha = kwargs.get("alpha", 1)
        saved = []
        for i, (names, coef) in enumerate(zip((FIRST, "other"), self.coefs)):
            key, value = argument(args, kwargs, i, names)
            if is_floating(value):
                coef = coef if isinstance(coef, int) else (alpha if coef == "alpha" else -alpha)
                saved.append((key, value.shape, value.dtype, coef))
        return saved

    def input_adjoints(self, saved, out_adj):
        return {key: fit(out_adj if c == 1 else (-out_adj if c == -1 else out_adj * c), shape, dtype)
                for key, shape, dtype, c in saved}


class _Mul(Junction):
    """``input * other``: O* ⊙ other and O* ⊙ input (autograd's ``mul_tensor_backward``)."""

    lfp = "product"
    lfp_divisor: tuple = ()  # the keys of a divisor (LFP refuses a value divided into a parameter)

    def __init__(self, inplace=False):
        self.inplace = inplace

    def reads_first(self, args, kwargs):
        return is_floating(argument(args, kwargs, 1, "other")[1])

    def record(self, args, kwargs, out):
        self._check_kept(args, kwargs, out)
        (ka, a), (kb, b) = argument(args, kwargs, 0, FIRST), argument(args, kwargs, 1, "other")
        return [(key, mine.shape, mine.dtype, theirs) for key, mine, theirs in ((ka, a, b), (kb, b, a))
                if is_floating(mine)]

    def input_adjoints(self, saved, out_adj):
        return {key: fit(out_adj * other, shape, dtype) for key, shape, dtype, other in saved}


class _Div(_Mul):
    """``input / other``: O* / other and −O* ⊙ (input / other) / other (autograd's ``div_tensor_*_backward``)."""

    lfp_divisor = (1, "other")

    def check(self, args, kwargs):
        mode = argument(args, kwargs, 2, "rounding_mode", None)[1]
        if mode is not None:
            raise ValueError(f"{self.name}: rounding_mode={mode!r} is piecewise constant; expected rounding_mode=None")

    def record(self, args, kwargs, out):
        self.check(args, kwargs)
        self._check_kept(args, kwargs, out)
        (ka, a), (kb, b) = argument(args, kwargs, 0, FIRST), argument(args, kwargs, 1, "other")
        saved = [(ka, a.shape, a.dtype, None, b)] if is_floating(a) else []  # a* needs b only
        return saved + ([(kb, b.shape, b.dtype, a, b)] if is_floating(b) else [])

    def input_adjoints(self, saved, out_adj):
        return {key: fit(out_adj / b if a is None else -out_adj * ((a / b) / b), shape, dtype)
                for key, shape, dtype, a, b in saved}


class _RDiv(Junction):
    """``c / x`` (``Tensor.__rdiv__`` = ``x.reciprocal() * c``): −(O* c) ⊙ r², r = 1/x, autograd's order."""

    lfp = "product"  # a number over a value: all of the reward to the value
    lfp_divisor = (0,)

    def check(self, args, kwargs):
        if isinstance(args[1], Tensor):
            raise TypeError(f"{self.name}: a tensor numerator; expected a number (t / x calls Tensor.div)")

    def record(self, args, kwargs, out):
        self.check(args, kwargs)
        return args[0], args[1]

    def input_adjoints(self, saved, out_adj):
        x, other = saved
        reciprocal = x.reciprocal()
        return {0: fit(-(out_adj * other) * (reciprocal * reciprocal), x.shape, x.dtype)}


class _Neg(Junction):
    lfp = "epsilon"

    def record(self, args, kwargs, out):
        return argument(args, kwargs, 0, FIRST)[0]

    def input_adjoints(self, saved, out_adj):
        return {saved: -out_adj}


# ---------------------------------------------------------------- reductions and lookups

class _Reduce(Junction):
    """sum / mean over ``dim`` (None, int or tuple; keepdim): O* put back along the reduced dims and expanded,
    divided by the count for mean (autograd's ``sum_backward`` / ``mean_backward``)."""

    lfp = "epsilon"

    def __init__(self, mean=False):
        self.mean = mean

    def check(self, args, kwargs):
        refuse_dtype_change(self.name, args, kwargs, 1)

    def record(self, args, kwargs, out):
        self.check(args, kwargs)
        key, x = argument(args, kwargs, 0, FIRST)
        dim = argument(args, kwargs, 1, ("dim", "axis"), None)[1]
        dims = reduced_dims(None if isinstance(dim, torch.dtype) else dim, x.dim())
        keepdim = argument(args, kwargs, 2, "keepdim", False)[1]
        return key, x.shape, dims, keepdim, math.prod(x.shape[d] for d in dims)

    def input_adjoints(self, saved, out_adj):
        key, shape, dims, keepdim, count = saved
        for d in dims if not keepdim else ():
            out_adj = out_adj.unsqueeze(d)
        adj = out_adj.expand(shape)
        return {key: adj / count if self.mean else adj}


class _Amax(Junction):
    """amax(x, dim, keepdim), and max(x) over every element: O* shared evenly among the tied maxima
    (autograd's ``scale_grad_by_count``; ``evenly_distribute_backward`` gives the same values)."""

    lfp = "rearrangement"  # as max pooling: the reward to the maxima

    def record(self, args, kwargs, out):
        key, x = argument(args, kwargs, 0, FIRST)
        dims = reduced_dims(argument(args, kwargs, 1, "dim", ())[1], x.dim())
        return key, x, out, dims, argument(args, kwargs, 2, "keepdim", False)[1]

    def input_adjoints(self, saved, out_adj):
        key, x, out, dims, keepdim = saved
        for d in dims if not keepdim else ():
            out_adj, out = out_adj.unsqueeze(d), out.unsqueeze(d)
        mask = out == x
        return {key: (out_adj / mask.sum(dims, keepdim=True)) * mask}


class _Max(Junction):
    """max(x) (as amax over every element) and max(x, dim, keepdim) → (values, indices): the values' O* put at
    the indices (autograd's ``value_selecting_reduction_backward``)."""

    lfp = "rearrangement"

    everything = _Amax()

    def check(self, args, kwargs):
        if isinstance(argument(args, kwargs, 1, ("dim", "other"), None)[1], Tensor):
            raise TypeError(f"{self.name}(input, other) is the elementwise maximum, not in the table; expected "
                            "max(input) or max(input, dim)")

    def record(self, args, kwargs, out):
        self.check(args, kwargs)
        key, x = argument(args, kwargs, 0, FIRST)
        dim = argument(args, kwargs, 1, "dim", None)[1]
        if dim is None:
            return None, self.everything.record(args, kwargs, out)
        keepdim = argument(args, kwargs, 2, "keepdim", False)[1]
        return (key, out[1], list(x.shape), dim % max(x.dim(), 1), keepdim), None

    def input_adjoints(self, saved, out_adj):
        by_dim, everything = saved
        if everything is not None:
            return self.everything.input_adjoints(everything, out_adj)
        key, indices, shape, dim, keepdim = by_dim
        values_adj = out_adj[0] if isinstance(out_adj, (tuple, list)) else out_adj
        return {key: _aten.value_selecting_reduction_backward(values_adj, dim, indices, shape, keepdim)}


class _Embedding(Junction):
    """``F.embedding(ids, weight, padding_idx, …)``: the weight's adjoint is O* scatter-added into the rows of
    ids, padding_idx's row left 0 (autograd's ``embedding_dense_backward``); integer ids get none."""

    lfp = "rearrangement"  # a parameter's rows picked: |E| ⊙ (S scatter-added), S = R / stab(O)

    def check(self, args, kwargs):
        max_norm = argument(args, kwargs, 3, "max_norm", None)[1]
        if max_norm is not None:
            raise ValueError(f"{self.name}: max_norm={max_norm} renormalises the weight in place; expected "
                             "max_norm=None")
        if argument(args, kwargs, 6, "sparse", False)[1]:
            raise ValueError(f"{self.name}: sparse=True gives a sparse gradient; expected sparse=False")

    def record(self, args, kwargs, out):
        self.check(args, kwargs)
        ids = argument(args, kwargs, 0, "input")[1]
        key, weight = argument(args, kwargs, 1, "weight")
        padding_idx = argument(args, kwargs, 2, "padding_idx", None)[1]
        rows = weight.shape[0]
        padding_idx = -1 if padding_idx is None else padding_idx % rows
        return key, ids, rows, padding_idx, bool(argument(args, kwargs, 5, "scale_grad_by_freq", False)[1])

    def input_adjoints(self, saved, out_adj):
        key, ids, rows, padding_idx, by_freq = saved
        return {key: _aten.embedding_dense_backward(out_adj, ids, rows, padding_idx, by_freq)}



# ---------------------------------------------------------------- products (§7.1: a @ b, einsum)

class _MatMul(Junction):
    """``a @ b`` (matmul, mm, bmm; 1-d operands, broadcast batch dims): O* bᵀ and aᵀ O*, summed over the batch
    dims an operand was broadcast along; b's in one folded mm where b is 1-d or 2-d, as matmul folds.
    ``swap``: ``Tensor.__rmatmul__(b, a)`` computes ``a @ b``."""

    lfp = "matmul"
    nlms = "matmul"  # with a parameter: normalised by the other operand's tokens (docs/maths.md §7.3)

    def __init__(self, swap=False):
        self.swap = swap

    def record(self, args, kwargs, out):
        pair = [argument(args, kwargs, 0, FIRST), argument(args, kwargs, 1, ("other", "mat2"))]
        (ka, a), (kb, b) = pair[::-1] if self.swap else pair
        return (ka if is_floating(a) else None), a, (kb if is_floating(b) else None), b

    def input_adjoints(self, saved, out_adj):
        ka, a, kb, b = saved
        a2 = a.unsqueeze(0) if a.dim() == 1 else a
        b2 = b.unsqueeze(-1) if b.dim() == 1 else b
        adj = out_adj.reshape(torch.broadcast_shapes(a2.shape[:-2], b2.shape[:-2]) + (a2.shape[-2], b2.shape[-1]))
        adjs = {}
        if ka is not None:
            adjs[ka] = (adj @ b2.mT).sum_to_size(a2.shape).reshape(a.shape)
        if kb is not None:
            if b2.dim() == 2 and adj.dim() > 2:
                b_adj = a2.reshape(-1, a2.shape[-1]).mT @ adj.reshape(-1, adj.shape[-1])
            else:
                b_adj = (a2.mT @ adj).sum_to_size(b2.shape)
            adjs[kb] = b_adj.reshape(b.shape)
        return adjs

    def input_energy(self, saved, weight_key) -> Tensor:
        """The squared norms of the other operand's tokens, broadcastable to the output (docs/maths.md §7.3): the
        rows of a for a @ W (``weight_key`` is b's), the columns of b for W @ b."""
        ka, a, kb, b = saved
        if weight_key == kb:
            energy = a.pow(2).sum(-1)
            return energy.unsqueeze(-1) if b.dim() > 1 and a.dim() > 1 else energy
        energy = b.pow(2).sum(-2) if b.dim() > 1 else b.pow(2).sum()
        return energy.unsqueeze(-2) if b.dim() > 1 and a.dim() > 1 else energy

    def input_gram(self, saved, weight_key) -> Tensor | None:
        """a aᵀ for a 2-d a @ W with a 2-d W (§4's B × B solve); None otherwise."""
        ka, a, kb, b = saved
        return a.mm(a.t()) if weight_key == kb and a.dim() == 2 and b.dim() == 2 else None


def _subscripts(equation: str, ndims: list[int]) -> tuple[list[str], str]:
    """The operands' and the output's subscripts with ``...`` spelled out in unused letters (right-aligned, as
    broadcasting aligns them) and the implicit output (the ellipsis, then the labels used once, sorted)."""
    equation = equation.replace(" ", "")
    left, arrow, right = equation.partition("->")
    inputs = left.split(",")
    free = [c for c in string.ascii_letters if c not in equation]
    spans = [n - (len(s) - 3) if "..." in s else 0 for s, n in zip(inputs, ndims)]
    ellipsis = "".join(free[:max(spans, default=0)])
    subs = [s.replace("...", ellipsis[len(ellipsis) - span:]) for s, span in zip(inputs, spans)]
    if arrow:
        return subs, right.replace("...", ellipsis)
    labels = "".join(s.replace("...", "") for s in inputs)
    return subs, ellipsis + "".join(sorted(c for c in set(labels) if labels.count(c) == 1))


class _Einsum(Junction):
    """``torch.einsum(equation, a, b)`` (or ``[a, b]``): each operand's adjoint is the einsum of O* with the other
    operand onto its subscripts; a label only it carries is expanded back, one it broadcast is summed."""

    lfp = "matmul"
    nlms = "einsum"

    @staticmethod
    def _operands(args):
        list_form = len(args) == 2 and isinstance(args[1], (list, tuple))
        return (list(args[1]) if list_form else list(args[1:])), list_form

    def check(self, args, kwargs):
        equation, (operands, _) = args[0], self._operands(args)
        if not isinstance(equation, str):
            raise TypeError(f"{self.name}: the sublist form is not in the table; expected an equation string")
        if len(operands) != 2:
            raise ValueError(f"{self.name}: {len(operands)} operands; expected two")
        if any(len(set(s)) != len(s) for s in _subscripts(equation, [t.dim() for t in operands])[0]):
            raise ValueError(f"{self.name}: {equation!r} repeats a label in one operand (a diagonal); expected "
                             "each label once per operand")

    def record(self, args, kwargs, out):
        self.check(args, kwargs)
        operands, list_form = self._operands(args)
        subs, out_sub = _subscripts(args[0], [t.dim() for t in operands])
        keys = [(1, i) for i in range(2)] if list_form else [1, 2]
        return [(key, sub, t) for key, sub, t in zip(keys, subs, operands)], out_sub

    def input_adjoints(self, saved, out_adj):
        operands, out_sub = saved
        adjs = {}
        for (key, sub, mine), (_, other_sub, other) in zip(operands, operands[::-1]):
            if not is_floating(mine):
                continue
            kept = "".join(c for c in sub if c in other_sub or c in out_sub)
            adj = torch.einsum(f"{out_sub},{other_sub}->{kept}", out_adj, other)
            for i, c in enumerate(sub):
                adj = adj if c in kept else adj.unsqueeze(i)
            adj = adj.expand([n if m == 1 else m for m, n in zip(adj.shape, mine.shape)])
            adjs[key] = fit(adj, mine.shape, mine.dtype)
        return adjs

    def input_energy(self, saved, weight_key) -> Tensor:
        """The squared norms of the other operand over the labels it contracts with the weight, broadcastable to the
        output (docs/maths.md §7.3; every other label of it must be in the output)."""
        operands, out_sub = saved
        (_, wsub, _), (_, xsub, x) = operands if operands[0][0] == weight_key else operands[::-1]
        kept = "".join(c for c in out_sub if c in xsub)
        energy = torch.einsum(f"{xsub}->{kept}", x * x)
        return energy.reshape([x.shape[xsub.index(c)] if c in kept else 1 for c in out_sub])


JUNCTIONS.update(entries({
    "torch.add Tensor.add Tensor.__add__ Tensor.__radd__": lambda: _Add((1, "alpha")),
    "Tensor.add_ Tensor.__iadd__": lambda: _Add((1, "alpha"), inplace=True),
    "torch.sub torch.subtract Tensor.sub Tensor.subtract Tensor.__sub__": lambda: _Add((1, "-alpha")),
    "Tensor.sub_ Tensor.subtract_ Tensor.__isub__": lambda: _Add((1, "-alpha"), inplace=True),
    "torch.rsub Tensor.__rsub__": lambda: _Add(("-alpha", 1)),
    "torch.mul torch.multiply Tensor.mul Tensor.multiply Tensor.__mul__ Tensor.__rmul__": _Mul,
    "Tensor.mul_ Tensor.multiply_ Tensor.__imul__": lambda: _Mul(inplace=True),
    "torch.div torch.divide torch.true_divide Tensor.div Tensor.divide Tensor.true_divide Tensor.__truediv__":
        _Div,
    "Tensor.div_ Tensor.divide_ Tensor.true_divide_ Tensor.__itruediv__": lambda: _Div(inplace=True),
    "Tensor.__rtruediv__": _RDiv,
    "torch.neg torch.negative Tensor.negative Tensor.neg": _Neg,
    "torch.matmul Tensor.matmul Tensor.__matmul__ torch.mm Tensor.mm torch.bmm Tensor.bmm": _MatMul,
    "Tensor.__rmatmul__": lambda: _MatMul(swap=True),
    "torch.einsum": _Einsum,
    "torch.sum Tensor.sum": _Reduce,
    "torch.mean Tensor.mean": lambda: _Reduce(mean=True),
    "torch.amax Tensor.amax": _Amax,
    "torch.max Tensor.max": _Max,
    "F.embedding": _Embedding,
}))
