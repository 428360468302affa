"""The table of junction ops: the torch functions that join chains into a graph (docs/maths.md §7.1).

Issue 21's tape records every torch call on a value (a tensor computed from the input) or on a parameter as
an op, and walks the ops in reverse, summing each value's adjoint over its uses (§7.1). This table says, for
each such call, what to keep and how an adjoint goes back through it (step 2 of docs/maths.md §1.2, for any
op): one small class per op kind on the base :class:`Junction` (STYLE P7–P9), looked up by the callable the
user's forward calls in :data:`JUNCTIONS`. The verbs:

    record(args, kwargs, out)        what the backward needs (never more than autograd keeps when every floating
                                     input requires grad), from the call's own arguments and its result (a tensor,
                                     or a tuple: split, chunk, unbind, max)
    input_adjoints(saved, out_adj)   {key: V_i* = J_{V_i}^T O*} for every floating tensor input
    check(args, kwargs)              refuse, in one line naming the op, what the entry cannot honour
    run(func, args, kwargs)          (out, saved): check, the call and its record, in the order the op needs

This module holds the base and the rearrangements (cat, stack, split, chunk, unbind, indexing, select,
narrow, permute, transpose, views, expand, roll, pad: the inverse rearrangement); ``arithmetic.py`` adds
+ − * /, matmul, einsum, sum, mean, amax, max and embedding, ``activations.py`` the activations, softmax and
attention, both into the same :data:`JUNCTIONS` on import (as maps.py and layers.py fill tables.py).

Keys: an input's position in ``args`` (0, 1, …) or its keyword (``"weight"``); the i-th tensor of a list
argument is ``(position, i)``: ``torch.cat([a, b, c], 1)`` gives keys ``(0, 0)``, ``(0, 1)``, ``(0, 2)``.
Each adjoint has its input's shape and dtype (summed over broadcast dims, then cast, as autograd does).
Inputs that only lend a shape (``view_as``/``expand_as``'s other), integer tensors (ids, indices, masks) and
Python numbers get no key: their adjoint is 0, autograd returns none. A parameter is an input like any other
(``self.gamma * x``: both keys; the tape sends the parameter's to ``.grad``). ``out_adj`` is the output's
adjoint: for a multi-output op a tuple aligned with the outputs, ``None`` where an output received none (zeros).

In place: ``x.add_(y)`` (``x += y`` reaches a function mode as ``Tensor.add_``) and ``inplace=True`` have
the out-of-place op's adjoints; the output is a new version of x. Where the backward reads the input that
the call overwrites (``x.mul_(y)``, ``x.div_(y)`` with a tensor y; SiLU, Hardswish, Hardsigmoid, Mish with
``inplace=True``), :meth:`Junction.run` copies it before the call, as autograd keeps ``original_self``;
``record`` called after such a write refuses. ReLU, ReLU6, Hardtanh, Sigmoid and Tanh read their output.

The kernels are autograd's own (``torch.ops.aten.*_backward``, ``sum_to_size``, ``narrow``, the same
formulas in the same order), so in float32 every entry but matmul, einsum and SDPA (which may sum in
another order) is bit-identical to ``torch.autograd`` (tests/test_junctions.py). What an entry cannot
honour is refused by ``check`` (from ``run`` before the call, and from ``record``) in one line naming the op;
a call not in the table stays refused by the tape.

Keys are what a ``TorchFunctionMode`` receives: ``x + y`` arrives as ``Tensor.add`` (``2 + x`` as
``Tensor.add(x, 2)``), ``x += y`` as ``Tensor.add_``, ``-x`` as ``Tensor.neg``, ``x @ y`` as ``Tensor.matmul``,
``2 - x`` as ``Tensor.__rsub__``, ``2 / x`` as ``Tensor.__rtruediv__``, ``x.T`` as the property's getter
``Tensor.T.__get__``, ``F.sigmoid``/``F.tanh`` as ``Tensor.sigmoid``/``Tensor.tanh``. The ``__add__`` forms are
in the table too, for a caller that looks them up directly.

Over 400 lines: the junction base class with its argument binding, and the rearrangement entries (views, cat,
split, indexing) registered with it: a table.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Junction", "JUNCTIONS", "entries"]

_aten = torch.ops.aten
FIRST = ("input", "self", "tensor")  # the keywords of a call's first tensor
_MISSING = object()


def refuse_dtype_change(name: str, args: tuple, kwargs: dict, first: int) -> None:
    """A ``dtype`` (keyword, or positional from ``args[first]`` on) that changes the input's dtype is refused:
    softmax(x, dim, dtype), sum(x, dim, dtype) cast before they compute."""
    dtype = kwargs.get("dtype") or next((a for a in args[first:] if isinstance(a, torch.dtype)), None)
    if dtype is not None and dtype != argument(args, kwargs, 0, FIRST)[1].dtype:
        raise ValueError(f"{name}: dtype={dtype} changes the dtype; expected dtype=None")


def argument(args, kwargs, i, names, default=_MISSING):
    """(key, value) of the call's argument at position ``i`` or under one of ``names``."""
    if len(args) > i:
        return i, args[i]
    for name in (names,) if isinstance(names, str) else names:
        if name in kwargs:
            return name, kwargs[name]
    if default is _MISSING:
        raise TypeError(f"missing argument {names!r}")
    return None, default


def is_floating(value) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point()


def fit(adj: Tensor, shape, dtype) -> Tensor:
    """The adjoint of an input of ``shape``/``dtype``: summed over broadcast dims, then cast (autograd's order)."""
    adj = adj if adj.shape == shape else adj.sum_to_size(shape)
    return adj if adj.dtype == dtype else adj.to(dtype)


def reduced_dims(dim, ndim: int) -> list[int]:
    """``dim`` (None, int, or sequence; None and () mean every dim) as sorted non-negative dims."""
    if ndim == 0:
        return []
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        return list(range(ndim))
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(d % ndim for d in dims)


class Junction:
    """Base of a junction entry (docs/maths.md §7.1). ``name``: the callable's name, for messages.

    ``inplace``: the call writes its first input — True (``Tensor.mul_``), False, or the position of the
    call's ``inplace`` flag (``F.silu(x, inplace=True)``: 1). :meth:`reads_first` says whether the record keeps
    that input's value; then :meth:`run` records a copy taken before the write.

    >>> import torch, torch_fadjoint.arithmetic
    >>> from torch_fadjoint.junctions import JUNCTIONS
    >>> x, gamma = torch.randn(2, 3), torch.randn(3)
    >>> entry = JUNCTIONS[torch.mul]
    >>> out, saved = entry.run(torch.mul, (x, gamma), {})
    >>> adjs = entry.input_adjoints(saved, torch.ones(2, 3))  # {0: O* ⊙ gamma, 1: Σ_rows O* ⊙ x}
    >>> adjs[1].shape
    torch.Size([3])
    """

    name = "?"
    inplace: bool | int = False
    # how LFP sends a reward back through the op (docs/maths.md §7.2; tfa.rules.lfp's graph rule): "epsilon",
    # "parametric" (the ε-rule, one value input), "identity", "rearrangement" (the ordinary backward), "product",
    # "matmul", "softmax"; None: LFP's rule for the op is not defined, refused by name
    lfp: str | None = None
    # the weight op it is for consequentialism / NLMS (docs/maths.md §7.3; tfa.rules.consequentialism): "linear",
    # "conv", "matmul" (a parameter applied to an input, normalised by that input), "einsum"; None: any other op
    nlms: str | None = None

    def check(self, args: tuple, kwargs: dict) -> None:
        """Refuse, in one line naming the op, a call the entry cannot honour: :meth:`run` asks before the call
        runs (F.embedding's max_norm would write the weight), and ``record`` asks again."""

    def record(self, args: tuple, kwargs: dict, out) -> object:
        """What the backward needs, taken when the op runs (the call's own args/kwargs, and its result)."""
        return None

    def input_adjoints(self, saved, out_adj) -> dict[int | str | tuple, Tensor]:
        """{position or keyword of a floating tensor input: its adjoint J^T O*}."""
        raise NotImplementedError

    def autograd_saves(self, args: tuple, kwargs: dict, out) -> tuple:
        """Tensors autograd saves for this op that the record does not keep (an average pool's input, attention's
        output): the tape watches their versions without keeping them, so that a later in-place write is refused
        where autograd refuses it."""
        return ()

    def reads_first(self, args, kwargs) -> bool:
        return False

    def writes_first(self, args, kwargs) -> bool:
        if isinstance(self.inplace, bool):
            return self.inplace
        return bool(argument(args, kwargs, self.inplace, "inplace", False)[1])

    def run(self, func, args: tuple, kwargs: dict | None = None):
        """``(out, saved)``: the user's call and its record, in the order the op needs (an in-place call whose
        backward reads the input it overwrites: copy, call, record the copy)."""
        kwargs = kwargs or {}
        if "out" in kwargs:
            raise ValueError(f"{self.name}: out= writes into a given tensor; expected no out=")
        self.check(args, kwargs)
        if not (self.writes_first(args, kwargs) and self.reads_first(args, kwargs)):
            out = func(*args, **kwargs)
            return out, self.record(args, kwargs, out)
        first = argument(args, kwargs, 0, FIRST)[1]
        before = first.clone()
        out = func(*args, **kwargs)
        args = tuple(before if a is first else a for a in args)
        kwargs = {k: before if v is first else v for k, v in kwargs.items()}
        return out, self.record(args, kwargs, out)

    def _check_kept(self, args, kwargs, out) -> None:
        """Refuse a record of an input that the call has already overwritten (use :meth:`run`)."""
        if self.writes_first(args, kwargs) and self.reads_first(args, kwargs) and \
                out is argument(args, kwargs, 0, FIRST)[1]:
            raise ValueError(f"{self.name}: the call overwrote the input its adjoint reads; record it through "
                             "Junction.run, which copies the input first")


# ---------------------------------------------------------------- joining and taking apart

class _Cat(Junction):
    """``torch.cat(tensors, dim)``: each input's slice of O* (keys ``(0, i)``)."""

    lfp = "rearrangement"

    def record(self, args, kwargs, out):
        key, tensors = argument(args, kwargs, 0, "tensors")
        dim = argument(args, kwargs, 1, ("dim", "axis"), 0)[1] % out.dim()
        saved, start = [], 0
        for i, t in enumerate(tensors):
            skipped = t.dim() == 1 and t.shape[0] == 0 and out.dim() != 1  # torch.cat's legacy empty input
            size = 0 if skipped else t.shape[dim]
            if is_floating(t):
                saved.append(((key, i), t.shape, t.dtype, start, size, skipped))
            start += size
        return dim, saved

    def input_adjoints(self, saved, out_adj):
        dim, parts = saved
        return {key: out_adj.new_zeros(shape, dtype=dtype) if skipped else
                fit(out_adj.narrow(dim, start, size), shape, dtype)
                for key, shape, dtype, start, size, skipped in parts}


class _Stack(Junction):
    """``torch.stack(tensors, dim)``: O* selected at each input's index (keys ``(0, i)``)."""

    lfp = "rearrangement"

    def record(self, args, kwargs, out):
        key, tensors = argument(args, kwargs, 0, "tensors")
        dim = argument(args, kwargs, 1, "dim", 0)[1] % out.dim()
        return dim, [((key, i), t.dtype) for i, t in enumerate(tensors) if is_floating(t)]

    def input_adjoints(self, saved, out_adj):
        dim, parts = saved
        return {key: out_adj.select(dim, key[1]).to(dtype) for key, dtype in parts}


class _Split(Junction):
    """split / chunk (``restack=False``) and unbind (True): several outputs; their adjoints concatenated (or
    stacked) back, a missing one as zeros (autograd's ``split_backward`` / ``unbind_backward``)."""

    lfp = "rearrangement"

    def __init__(self, dim_position, restack=False):
        self.dim_position, self.restack = dim_position, restack

    def record(self, args, kwargs, out):
        key, x = argument(args, kwargs, 0, FIRST)
        dim = argument(args, kwargs, self.dim_position, "dim", 0)[1] % x.dim()
        return key, dim, [o.shape for o in out], x.new_zeros(())

    def input_adjoints(self, saved, out_adj):
        key, dim, shapes, zero = saved  # zero: a scalar of the input's dtype and device, for missing adjoints
        parts = [a if a is not None else zero.expand(s) for a, s in zip(out_adj, shapes)]
        return {key: torch.stack(parts, dim) if self.restack else torch.cat(parts, dim)}


def _basic(index) -> bool:
    """Only ints, slices, None and Ellipsis: a view, with no repeated element."""
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, slice) or (isinstance(i, int) and not isinstance(i, bool))
               for i in items)


class _GetItem(Junction):
    """``x[index]``, the index a constant (ints, slices, None, Ellipsis, integer or bool tensors, lists): O*
    written back into zeros (a view: copied; advanced indexing: scatter-added, repeated elements summing)."""

    lfp = "rearrangement"

    def check(self, args, kwargs):
        if any(is_floating(i) for i in (args[1] if isinstance(args[1], tuple) else (args[1],))):
            raise TypeError(f"{self.name}: a floating index; expected ints, slices, None, Ellipsis or an integer/"
                            "bool tensor")

    def record(self, args, kwargs, out):
        self.check(args, kwargs)
        return args[0].shape, args[1], _basic(args[1])

    def input_adjoints(self, saved, out_adj):
        shape, index, basic = saved
        adj = out_adj.new_zeros(shape)
        if basic:
            adj[index] = out_adj
            return {0: adj}
        where = torch.arange(adj.numel(), device=adj.device).view(shape)[index]  # each output's source element
        return {0: adj.view(-1).index_add_(0, where.reshape(-1), out_adj.reshape(-1)).view(shape)}


class _Select(Junction):
    """``select(x, dim, index)`` and ``narrow(x, dim, start, length)``: autograd's ``select_backward`` /
    ``slice_backward`` (zeros with O* copied in)."""

    lfp = "rearrangement"

    def __init__(self, narrow=False):
        self.narrow = narrow

    def record(self, args, kwargs, out):
        key, x = argument(args, kwargs, 0, FIRST)
        dim = argument(args, kwargs, 1, "dim")[1] % x.dim()
        start = int(argument(args, kwargs, 2, ("start", "index"))[1])
        start = start + x.shape[dim] if start < 0 else start
        length = int(argument(args, kwargs, 3, "length")[1]) if self.narrow else None
        return key, list(x.shape), dim, start, length

    def input_adjoints(self, saved, out_adj):
        key, shape, dim, start, length = saved
        if length is None:
            return {key: _aten.select_backward(out_adj, shape, dim, start)}
        return {key: _aten.slice_backward(out_adj, shape, dim, start, start + length, 1)}


# ---------------------------------------------------------------- rearrangements (the inverse rearrangement)

def _permute_order(ndim, args, kwargs):
    dims = args[1:] if len(args) > 1 else (kwargs["dims"],)
    dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list, torch.Size)) else dims
    return [d % ndim for d in dims]


def _transpose_order(ndim, args, kwargs):
    order = list(range(ndim))
    d0 = argument(args, kwargs, 1, ("dim0", "axis0"))[1] % ndim
    d1 = argument(args, kwargs, 2, ("dim1", "axis1"))[1] % ndim
    order[d0], order[d1] = d1, d0
    return order


_ORDERS = {
    "permute": _permute_order,
    "transpose": _transpose_order,
    "t": lambda ndim, args, kwargs: [1, 0] if ndim == 2 else list(range(ndim)),
    "T": lambda ndim, args, kwargs: list(range(ndim))[::-1],
    "mT": lambda ndim, args, kwargs: list(range(ndim - 2)) + [ndim - 1, ndim - 2],
}


class _Permute(Junction):
    """permute, transpose/swapaxes/swapdims, t, ``.T``, ``.mT``: O* permuted back (the inverse order)."""

    lfp = "rearrangement"

    def __init__(self, kind):
        self.order = _ORDERS[kind]

    def record(self, args, kwargs, out):
        key, x = argument(args, kwargs, 0, FIRST)
        order = self.order(x.dim(), args, kwargs)
        return key, sorted(range(len(order)), key=order.__getitem__)

    def input_adjoints(self, saved, out_adj):
        key, inverse = saved
        return {key: out_adj.permute(inverse)}


class _Reshape(Junction):
    """reshape, view, view_as, flatten, unflatten, squeeze, unsqueeze, contiguous: O* in the input's shape."""

    lfp = "rearrangement"

    def check(self, args, kwargs):
        if any(isinstance(a, torch.dtype) for a in args[1:]) or "dtype" in kwargs:
            raise ValueError(f"{self.name}: view(dtype) reinterprets the bits; expected a shape")

    def record(self, args, kwargs, out):
        self.check(args, kwargs)
        key, x = argument(args, kwargs, 0, FIRST)
        return key, x.shape

    def input_adjoints(self, saved, out_adj):
        key, shape = saved
        return {key: out_adj.reshape(shape)}


class _Expand(Junction):
    """expand, expand_as, broadcast_to: O* summed over the expanded dims (autograd's ``sum_to``)."""

    lfp = "rearrangement"

    def record(self, args, kwargs, out):
        key, x = argument(args, kwargs, 0, FIRST)
        return key, x.shape

    def input_adjoints(self, saved, out_adj):
        key, shape = saved
        return {key: out_adj.sum_to_size(shape)}


class _Roll(Junction):
    """roll(x, shifts, dims): O* rolled back by −shifts."""

    lfp = "rearrangement"

    def record(self, args, kwargs, out):
        key = argument(args, kwargs, 0, FIRST)[0]
        shifts = argument(args, kwargs, 1, "shifts")[1]
        dims = argument(args, kwargs, 2, "dims", ())[1]
        back = -shifts if isinstance(shifts, int) else [-s for s in shifts]
        return key, back, () if dims is None else dims

    def input_adjoints(self, saved, out_adj):
        key, back, dims = saved
        return {key: out_adj.roll(back, dims)}


class _Pad(Junction):
    """``F.pad(x, pad, mode="constant", value)``: O* cropped by the pads (autograd's ``constant_pad_nd`` with the
    pads negated)."""

    lfp = "rearrangement"

    def check(self, args, kwargs):
        mode = argument(args, kwargs, 2, "mode", "constant")[1]
        if mode != "constant":
            raise ValueError(f"{self.name}: mode={mode!r} is not in the table; expected mode='constant'")

    def record(self, args, kwargs, out):
        self.check(args, kwargs)
        return argument(args, kwargs, 0, "input")[0], [-p for p in argument(args, kwargs, 1, "pad")[1]]

    def input_adjoints(self, saved, out_adj):
        key, crop = saved
        return {key: _aten.constant_pad_nd(out_adj, crop, 0)}


# ---------------------------------------------------------------- the table

_ROOTS = {"torch": torch, "Tensor": Tensor, "F": F}


def _resolve(text: str):
    root, attr = text.split(".", 1)
    found = getattr(_ROOTS[root], attr)
    return found.__get__ if attr in ("T", "mT") else found  # a property reaches a function mode as its getter


def entries(groups: dict) -> dict:
    """``{callable: entry}`` from ``{"torch.add Tensor.add …": entry factory}``: each callable its own entry,
    named after it (a callable with two names, ``Tensor.neg`` is ``Tensor.__neg__``, keeps the last)."""
    table = {}
    for names, make in groups.items():
        for text in names.split():
            entry = make()
            entry.name = text
            table[_resolve(text)] = entry
    return table


JUNCTIONS: dict = entries({
    "torch.cat torch.concat torch.concatenate": _Cat,
    "torch.stack": _Stack,
    "torch.split Tensor.split torch.chunk Tensor.chunk": lambda: _Split(2),
    "torch.unbind Tensor.unbind": lambda: _Split(1, restack=True),
    "Tensor.__getitem__": _GetItem,
    "torch.select Tensor.select": _Select,
    "torch.narrow Tensor.narrow": lambda: _Select(narrow=True),
    "torch.permute Tensor.permute": lambda: _Permute("permute"),
    "torch.transpose Tensor.transpose torch.swapaxes Tensor.swapaxes torch.swapdims Tensor.swapdims":
        lambda: _Permute("transpose"),
    "torch.t Tensor.t": lambda: _Permute("t"),
    "Tensor.T": lambda: _Permute("T"),
    "Tensor.mT": lambda: _Permute("mT"),
    "torch.reshape Tensor.reshape Tensor.view Tensor.view_as Tensor.reshape_as torch.flatten Tensor.flatten "
    "torch.unflatten Tensor.unflatten torch.squeeze Tensor.squeeze torch.unsqueeze Tensor.unsqueeze "
    "Tensor.contiguous": _Reshape,
    "Tensor.expand Tensor.expand_as torch.broadcast_to Tensor.broadcast_to": _Expand,
    "torch.roll Tensor.roll": _Roll,
    "F.pad": _Pad,
})
