"""Junction entries for the poolings, called as functions: max, average, adaptive average and adaptive max, in
1, 2 and 3 dims (docs/maths.md §7.1; the pooling maps of §6.1 as functions).

Added to :data:`torch_fadjoint.junctions.JUNCTIONS` on import, with ``functionals.py``'s pattern. Keys are what
a ``TorchFunctionMode`` receives: ``nn.MaxPoolNd`` and ``F.max_poolNd(x, …)`` arrive as ``F.max_poolNd`` (a
``boolean_dispatch`` wrapper), with ``return_indices=True`` as ``F.max_poolNd_with_indices``; likewise
``F.adaptive_max_poolNd``; ``F.avg_pool1d`` is ``torch.avg_pool1d``, ``F.avg_pool2d/3d`` are
``torch._C._nn.avg_pool2d/3d``, ``F.adaptive_avg_pool1d`` is ``torch.adaptive_avg_pool1d``.

    ====================  ==========================================  ==========================================
    function              record                                      input adjoint (autograd's kernel)
    ====================  ==========================================  ==========================================
    F.max_poolNd          the input and the forward's arg-max indices  max_pool2d/3d_with_indices_backward
    F.avg_poolNd          the input's shape                            avg_pool2d/3d_backward
    F.adaptive_avg_poolNd the input's shape                            _adaptive_avg_pool2d/3d_backward; an
                                                                       output of size 1: mean's (O* / count)
    F.adaptive_max_poolNd the input and the indices                    adaptive_max_pool2d/3d_backward
    ====================  ==========================================  ==========================================

The max poolings run as ``F.*_with_indices`` with the user's arguments in place of the user's call (the same
kernel, so the same output), and return what the user asked for. 1-d poolings are torch's 2-d kernels on an
inserted height of 1 (``unsqueeze(-2)``), as aten's 1-d functions are; an adaptive average to size 1 is a
mean in aten (``adaptive_avg_pool2d`` calls ``mean``), so its adjoint is mean's. float32 adjoints are bit for
bit autograd's (tests/test_functionals.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .junctions import FIRST, JUNCTIONS, Junction, argument, entries, is_floating

_aten = torch.ops.aten

_POOL = ("input", "kernel_size", "stride", "padding")


def _sizes(value, n: int) -> list[int]:
    value = list(value) if isinstance(value, (tuple, list)) else [value]
    return value * n if len(value) == 1 else value


class _Pool(Junction):
    """A pooling in ``n`` dims. :meth:`lift` puts a 1-d pooling's tensors and sizes into the 2-d kernel's form."""

    names: tuple = _POOL

    def __init__(self, n: int):
        self.n = n

    def check(self, args, kwargs):
        x = argument(args, kwargs, 0, FIRST, None)[1]
        if isinstance(x, Tensor) and x.layout != torch.strided:
            raise TypeError(f"{self.name}: a {x.layout} tensor; expected strided (dense) tensors")
        if isinstance(x, Tensor) and x.is_complex():
            raise TypeError(f"{self.name}: a complex tensor ({x.dtype}); expected real floating tensors")

    def bind(self, args, kwargs, defaults) -> dict:
        return {name: argument(args, kwargs, i, FIRST if i == 0 else name, defaults.get(name))[1]
                for i, name in enumerate(self.names)}

    def geometry(self, bound, *names) -> list[list[int]]:
        """kernel_size, stride (the kernel when None or empty, as torch's), padding, dilation: n sizes each (a
        1-d pooling's with the inserted height's 1, 1, 0, 1 in front)."""
        fill = {"kernel_size": 1, "stride": 1, "padding": 0, "dilation": 1}
        values = []
        for name in names:
            value = bound[name]
            empty = value is None or isinstance(value, (tuple, list)) and len(value) == 0
            value = bound["kernel_size"] if name == "stride" and empty else value
            value = _sizes(value, self.n)
            values.append([fill[name]] + value if self.n == 1 else value)
        return values

    def lift(self, tensor):
        return tensor.unsqueeze(-2) if self.n == 1 and tensor is not None else tensor

    def drop(self, tensor):
        return tensor.squeeze(-2) if self.n == 1 else tensor


class _MaxPool(_Pool):
    """``F.max_poolNd(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)`` and
    ``F.max_poolNd_with_indices``: O* sent to the forward's arg-max (``max_pool2d/3d_with_indices_backward``).
    ``adaptive``: ``F.adaptive_max_poolNd(input, output_size, return_indices)`` (``adaptive_max_pool2d/3d_backward``).
    ``pair``: the key always returns ``(output, indices)``."""

    lfp = "rearrangement"  # winner takes all (docs/maths.md §6.4)

    def __init__(self, n: int, adaptive=False, pair=False):
        super().__init__(n)
        self.adaptive, self.pair = adaptive, pair
        self.names = ("input", "output_size", "return_indices") if adaptive else \
            _POOL + ("dilation", "ceil_mode", "return_indices")
        kind = "adaptive_max_pool" if adaptive else "max_pool"
        self.with_indices = getattr(F, f"{kind}{n}d_with_indices")

    def pairs(self, args, kwargs) -> bool:
        return self.pair or bool(self.bind(args, kwargs, {})["return_indices"])

    def run(self, func, args, kwargs=None):
        kwargs = kwargs or {}
        self.check(args, kwargs)
        out = self.with_indices(*args, **kwargs)  # the user's call with its indices: the same kernel
        return (out if self.pairs(args, kwargs) else out[0]), self.record(args, kwargs, out)

    def record(self, args, kwargs, out):
        self.check(args, kwargs)
        key, x = argument(args, kwargs, 0, FIRST)
        if isinstance(out, tuple):
            indices = out[1]
        else:  # recorded after a plain call: the same kernel again, for its indices
            indices = self.with_indices(*args, **kwargs)[1]
        bound = self.bind(args, kwargs, {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False})
        return (key if is_floating(x) else None), x, indices, bound

    def input_adjoints(self, saved, out_adj):
        key, x, indices, bound = saved
        if key is None:
            return {}
        if isinstance(out_adj, (tuple, list)):
            out_adj = out_adj[0]
        grad, x, indices = self.lift(out_adj), self.lift(x), self.lift(indices)
        if self.adaptive:
            kernel = _aten.adaptive_max_pool3d_backward if self.n == 3 else _aten.adaptive_max_pool2d_backward
            return {key: self.drop(kernel(grad, x, indices))}
        sizes = self.geometry(bound, "kernel_size", "stride", "padding", "dilation")
        kernel = _aten.max_pool3d_with_indices_backward if self.n == 3 else _aten.max_pool2d_with_indices_backward
        return {key: self.drop(kernel(grad, x, *sizes, bool(bound["ceil_mode"]), indices))}


def _shape_of(x):
    """A stand-in of ``x`` for a kernel that reads only its sizes: no memory."""
    return x.new_empty(()).expand(x.shape)


class _AvgPool(_Pool):
    """``F.avg_poolNd(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)``
    (1-d: no divisor_override): ``avg_pool2d/3d_backward`` on the input's shape."""

    lfp = "epsilon"

    def __init__(self, n: int):
        super().__init__(n)
        self.names = _POOL + ("ceil_mode", "count_include_pad") + (("divisor_override",) if n > 1 else ())

    def autograd_saves(self, args, kwargs, out):
        return (argument(args, kwargs, 0, FIRST)[1],)  # the record keeps its shape only

    def record(self, args, kwargs, out):
        self.check(args, kwargs)
        key, x = argument(args, kwargs, 0, FIRST)
        bound = self.bind(args, kwargs, {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True})
        bound["input"] = _shape_of(x)
        return (key if is_floating(x) else None), bound

    def input_adjoints(self, saved, out_adj):
        key, bound = saved
        if key is None:
            return {}
        sizes = self.geometry(bound, "kernel_size", "stride", "padding")
        kernel = _aten.avg_pool3d_backward if self.n == 3 else _aten.avg_pool2d_backward
        return {key: self.drop(kernel(self.lift(out_adj), self.lift(bound["input"]), *sizes, bool(bound["ceil_mode"]),
                                      bool(bound["count_include_pad"]), bound.get("divisor_override")))}


class _AdaptiveAvgPool(_Pool):
    """``F.adaptive_avg_poolNd(input, output_size)``: ``_adaptive_avg_pool2d/3d_backward``, or mean's adjoint
    (O* expanded, divided by the count) where aten pools to size 1 by a mean."""

    lfp = "epsilon"

    names = ("input", "output_size")

    def autograd_saves(self, args, kwargs, out):
        return (argument(args, kwargs, 0, FIRST)[1],)  # the record keeps its shape only

    def record(self, args, kwargs, out):
        self.check(args, kwargs)
        key, x = argument(args, kwargs, 0, FIRST)
        return (key if is_floating(x) else None), _shape_of(x), all(s == 1 for s in out.shape[-self.n:])

    def input_adjoints(self, saved, out_adj):
        key, x, mean = saved
        if key is None:
            return {}
        grad, x = self.lift(out_adj), self.lift(x)
        dims = max(self.n, 2)
        if mean:
            return {key: self.drop(grad.expand(x.shape) / math.prod(x.shape[-dims:]))}
        kernel = _aten._adaptive_avg_pool3d_backward if self.n == 3 else _aten._adaptive_avg_pool2d_backward
        return {key: self.drop(kernel(grad, x))}


JUNCTIONS.update(entries({
    **{f"F.max_pool{n}d": (lambda n=n: _MaxPool(n)) for n in (1, 2, 3)},
    **{f"F.max_pool{n}d_with_indices": (lambda n=n: _MaxPool(n, pair=True)) for n in (1, 2, 3)},
    **{f"F.adaptive_max_pool{n}d": (lambda n=n: _MaxPool(n, adaptive=True)) for n in (1, 2, 3)},
    **{f"F.adaptive_max_pool{n}d_with_indices": (lambda n=n: _MaxPool(n, adaptive=True, pair=True))
       for n in (1, 2, 3)},
    **{f"F.avg_pool{n}d": (lambda n=n: _AvgPool(n)) for n in (1, 2, 3)},
    **{f"F.adaptive_avg_pool{n}d": (lambda n=n: _AdaptiveAvgPool(n)) for n in (1, 2, 3)},
}))
