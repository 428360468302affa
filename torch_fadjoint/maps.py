"""The table of parameter-free maps: activations, pooling, views, Dropout, LogSoftmax (docs/maths.md §1.1, §6.1).

One small class per map on a shared base (BackPACK's per-module derivatives, STYLE P7), looked up by
the module's exact type (a subclass may change ``forward``, STYLE P8) — or, for a functional forward
between modules (``F.relu(x)``, ``x.view(x.size(0), -1)``, ``F.max_pool2d(x, 2)``), by the function,
which :data:`FUNCTIONALS` turns into the equivalent module (``nn.ReLU()``, a reshape, ``nn.MaxPool2d(2)``):
modules and functionals go through the same entries. Each entry says what the recorder keeps for it
(``record``: the cheapest sufficient quantity of the §1.1 table) and how an adjoint goes through it
(``backward``: step 1 of §1.2, Y* = J^T X*; ``backward_`` may write into X*'s buffer).

The backward kernels are autograd's own (``torch.ops.aten.*_backward``), so the F-adjoint reproduces
``loss.backward()`` bit for bit where autograd uses the same kernel.

=========================  ====================================  ===========================  =========
map                        backward from the record              record                       LFP (§6.4)
=========================  ====================================  ===========================  =========
ReLU                       1[Y > 0]                              X (the next layer's input)   identity
LeakyReLU(a), a > 0        1 if Y > 0 else a                     X                            identity
Sigmoid / Tanh             X (1 − X) / 1 − X²                    X                            identity
ELU(α), α ≥ 0              1 if Y > 0 else X + α                 X                            identity
Hardtanh(lo, hi), ReLU6    1[lo < X < hi] (Y's mask: X = clamp)  X (Y: a half type, see below) identity
Softplus, GELU             σ'(Y)                                 Y                            identity
SiLU, Hardswish,           σ'(Y)                                 Y (inplace=True: run out of  identity
Hardsigmoid, Mish                                                place, Y kept untouched)
Identity, InputNoise       1                                     nothing                      identity
Step (tfa.nn)              0 almost everywhere: not trainable    nothing                      identity
Dropout, Dropout1d/2d      mask / (1 − p) (train mode)           the mask (drawn here)        backward
Flatten, Unflatten, views  reshape                               the input shape              backward
MaxPool1d/2d               to the forward's arg-max              Y and the int64 indices      backward
AvgPool1d/2d               avg_poolNd_backward                   the input shape              ε-rule
AdaptiveAvgPool1d/2d       _adaptive_avg_poolNd_backward         the input shape              ε-rule
LogSoftmax(dim=1 | −1)     Y* = X* − softmax(Y) Σ X*  (row-wise)  X                            refused
=========================  ====================================  ===========================  =========

``inplace=True`` (ReLU, ReLU6, Hardtanh, ELU, LeakyReLU: the record is X, which the write produces) runs in
place. Where the write would overwrite the record (SiLU, Hardswish, Hardsigmoid, Mish need Y: torchvision's
EfficientNet and MobileNetV3 use them in place), the recorder runs the map out of place for that call (the
entry's ``prepare`` for a module, its ``run`` for a functional): the same values in a new tensor, Y kept as the
record, the memory autograd spends (it clones Y for these). A forward that reads Y after the call expecting the
overwrite then receives a tensor the map did not return, and is refused as a non-chain.

Users extend the table with :func:`register_map` (alias ``register_derivative``).

Over 400 lines: a table — one derivative per parameter-free map of the chain (§6.3), a few lines each, with
the lookup and the registration beside them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import nn as tfa_nn
from .tables import MAPS, register

__all__ = ["Map", "Derivative", "MapRecord", "MAPS", "FUNCTIONALS", "VIEWS", "TRANSPARENT", "Reshape", "register_map",
           "register_derivative", "map_for", "supported_maps"]

_aten = torch.ops.aten


class Map:
    """Base of a map entry. ``saves``: ``"input"`` (Y, or a tuple whose first item is Y: MaxPool's
    ``(Y, indices)``), ``"output"`` (X), ``"none"``, or the entry's own.

    ``elementwise``: X = σ(Y) entry by entry (the equilibrium and IL states need it; §2, §5);
    ``differentiable``: False where σ' is 0 almost everywhere (Step); ``lfp``: how LFP passes a reward
    through (``"identity"``, ``"backward"`` = the ordinary backward, ``"epsilon"`` = the ε-rule, §6.4,
    ``None`` = refused); ``stochastic``: not a function of its input (Dropout in train mode).
    """

    saves = "output"
    elementwise = True
    differentiable = True
    lfp: str | None = "identity"
    stochastic = False

    def check(self, module: nn.Module) -> None:
        """Raise ValueError when this configuration of the module is not supported (checked at attach)."""

    def record(self, module: nn.Module, y: Tensor, x: Tensor):
        """What the recorder keeps, given the map's input ``y`` and output ``x``."""
        if self.saves == "input":
            return y
        if self.saves == "output":
            return x
        return None

    def hook_output(self, module: nn.Module, y: Tensor, x: Tensor):
        """``(output, record)`` for a module that has run; an entry may replace the output."""
        return x, self.record(module, y, x)

    def run(self, module: nn.Module, y: Tensor, call):
        """``(output, record)`` for a functional call; ``call()`` runs the user's function."""
        return self.hook_output(module, y, call())

    def prepare(self, module: nn.Module):
        """Called by the recorder just before a module form runs; returns a function undoing it, or None.
        (MaxPool sets ``return_indices`` for that one call, so that its record keeps the forward's indices.)"""
        return None

    def backward(self, module: nn.Module, saved, x_adj: Tensor) -> Tensor:
        """Y* = J^T X*, in Y's shape (step 1 of docs/maths.md §1.2)."""
        raise NotImplementedError

    def backward_(self, module: nn.Module, saved, x_adj: Tensor) -> Tensor:
        """Like :meth:`backward`, but may overwrite and return ``x_adj`` (the caller owns it)."""
        return self.backward(module, saved, x_adj)

    def forward(self, module: nn.Module, y: Tensor) -> Tensor:
        """The map at a new point (inference learning's ρ, §5)."""
        return module(y)

    def vjp_at(self, module: nn.Module, y: Tensor, x_adj: Tensor) -> Tensor:
        """J(y)^T x_adj at a new point y (inference learning through pooling, §6.6)."""
        return self.backward(module, self.record(module, y, self.forward(module, y)), x_adj)

    def df_at(self, module: nn.Module, y: Tensor) -> Tensor:
        """σ'(y) at a new point (elementwise maps: §2.4's σ'(D), §5's ρ')."""
        if not self.elementwise:
            raise TypeError(f"{type(module).__name__} is not elementwise: it has no σ'(y) tensor")
        return self.vjp_at(module, y, torch.ones_like(y))


Derivative = Map  # the name of the §1.1 table's entries in earlier releases


@dataclass
class MapRecord:
    """One map of layer k's chain: its name (qualified module name, or ``F.relu after conv1``), the module
    (or the functional's stand-in), its entry, what it saved, and (``keep_io``) its input and output."""

    name: str
    module: nn.Module
    entry: Map
    saved: object
    y: Tensor | None = None
    x: Tensor | None = None


class _Identity(Map):
    saves = "none"

    def backward(self, module, saved, x_adj):
        return x_adj

    def backward_(self, module, saved, x_adj):
        return x_adj


class _Noise(_Identity):
    """InputNoise: derivative 1, but not a function of its input in training mode."""

    stochastic = True


class _ReLU(Map):
    def backward(self, module, saved, x_adj):
        return _aten.threshold_backward(x_adj, saved, 0)

    def backward_(self, module, saved, x_adj):
        return _aten.threshold_backward.grad_input(x_adj, saved, 0, grad_input=x_adj)


class _LeakyReLU(Map):
    # The sign of X equals the sign of Y for a positive slope; autograd records Y, we record X.
    def check(self, module):
        if not module.negative_slope > 0:
            raise ValueError(f"LeakyReLU(negative_slope={module.negative_slope}): expected a positive slope "
                             "(the record is X, whose sign must equal Y's)")

    def backward(self, module, saved, x_adj):
        return _aten.leaky_relu_backward(x_adj, saved, module.negative_slope, True)

    def backward_(self, module, saved, x_adj):
        return _aten.leaky_relu_backward.grad_input(x_adj, saved, module.negative_slope, True, grad_input=x_adj)


class _Sigmoid(Map):
    def backward(self, module, saved, x_adj):
        return _aten.sigmoid_backward(x_adj, saved)

    def backward_(self, module, saved, x_adj):
        return _aten.sigmoid_backward.grad_input(x_adj, saved, grad_input=x_adj)


class _Tanh(Map):
    def backward(self, module, saved, x_adj):
        return _aten.tanh_backward(x_adj, saved)

    def backward_(self, module, saved, x_adj):
        return _aten.tanh_backward.grad_input(x_adj, saved, grad_input=x_adj)


class _ELU(Map):
    def check(self, module):
        if not module.alpha >= 0:
            raise ValueError(f"ELU(alpha={module.alpha}): expected alpha >= 0 (the record is X, which must tell "
                             "Y > 0 from Y <= 0)")

    def backward(self, module, saved, x_adj):
        return _aten.elu_backward(x_adj, module.alpha, 1.0, 1.0, True, saved)

    def backward_(self, module, saved, x_adj):
        return _aten.elu_backward.grad_input(x_adj, module.alpha, 1.0, 1.0, True, saved, grad_input=x_adj)


class _Softplus(Map):
    saves = "input"

    def backward(self, module, saved, x_adj):
        return _aten.softplus_backward(x_adj, saved, module.beta, module.threshold)

    def backward_(self, module, saved, x_adj):
        return _aten.softplus_backward.grad_input(x_adj, saved, module.beta, module.threshold, grad_input=x_adj)


class _Activation(Map):
    """A map with torch's ``inplace`` flag: when writing in place would overwrite its record (:meth:`overwrites`),
    the call runs out of place (:meth:`forward`, which never writes in place): a module form through
    :meth:`prepare` (``inplace`` off for that call, as MaxPool's ``return_indices``), a functional form here."""

    def overwrites(self, module) -> bool:
        return self.saves == "input"

    def prepare(self, module):
        if not (module.inplace and self.overwrites(module)):
            return None
        module.inplace = False
        return lambda: setattr(module, "inplace", True)

    def run(self, module, y, call):
        if not (module.inplace and self.overwrites(module)):
            return super().run(module, y, call)
        x = self.forward(module, y)  # in place of the user's in-place call: the same values, Y kept
        return x, self.record(module, y, x)


@functools.lru_cache(maxsize=64)
def _holds(bounds: tuple, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` represents both bounds exactly (cached: asked at every recorded call)."""
    return all(float(torch.tensor(value, dtype=dtype)) == value for value in bounds)


class _Hardtanh(_Activation):
    """Hardtanh(min_val, max_val) and ReLU6 (0, 6): X = clamp(Y) exactly, so ``hardtanh_backward``'s mask
    min < · < max read on X is Y's and X is the record, also in place (as ReLU's). Not in float16 / bfloat16
    with a bound the dtype cannot hold (Hardtanh(-1.1, 2.3)): the forward clamps to the rounded bound, the kernel
    compares in float32 with the exact one, so X's mask can differ; there the record is Y (autograd's), and
    ``inplace=True`` runs out of place for a bound that float16 or bfloat16 cannot hold."""

    def overwrites(self, module):
        bounds = (module.min_val, module.max_val)
        return not (_holds(bounds, torch.float16) and _holds(bounds, torch.bfloat16))

    def record(self, module, y, x):
        exact = x.dtype in (torch.float32, torch.float64) or _holds((module.min_val, module.max_val), x.dtype)
        return x if x is y or exact else y

    def forward(self, module, y):
        return F.hardtanh(y, module.min_val, module.max_val)

    def backward(self, module, saved, x_adj):
        return _aten.hardtanh_backward(x_adj, saved, module.min_val, module.max_val)

    def backward_(self, module, saved, x_adj):
        return _aten.hardtanh_backward.grad_input(x_adj, saved, module.min_val, module.max_val, grad_input=x_adj)


class _SiLU(_Activation):
    saves = "input"

    def forward(self, module, y):
        return F.silu(y)

    def backward(self, module, saved, x_adj):
        return _aten.silu_backward(x_adj, saved)

    def backward_(self, module, saved, x_adj):
        return _aten.silu_backward.grad_input(x_adj, saved, grad_input=x_adj)


class _Hardswish(_Activation):
    # hardswish_backward's .out is autogen'd (a copy after the functional kernel): backward_ is backward
    saves = "input"

    def forward(self, module, y):
        return F.hardswish(y)

    def backward(self, module, saved, x_adj):
        return _aten.hardswish_backward(x_adj, saved)


class _Hardsigmoid(_Activation):
    # Y, not X: X's 0 < X < 1 is not Y's -3 < Y < 3 after rounding (Y just below 3 can round to X = 1)
    saves = "input"

    def forward(self, module, y):
        return F.hardsigmoid(y)

    def backward(self, module, saved, x_adj):
        return _aten.hardsigmoid_backward(x_adj, saved)

    def backward_(self, module, saved, x_adj):
        return _aten.hardsigmoid_backward.grad_input(x_adj, saved, grad_input=x_adj)


class _Mish(_Activation):
    # autograd's kernel without create_graph (mish_backward has no out= form)
    saves = "input"

    def forward(self, module, y):
        return F.mish(y)

    def backward(self, module, saved, x_adj):
        return _aten.mish_backward(x_adj, saved)


class _GELU(Map):
    saves = "input"

    def backward(self, module, saved, x_adj):
        return _aten.gelu_backward(x_adj, saved, approximate=module.approximate)

    def backward_(self, module, saved, x_adj):
        return _aten.gelu_backward.grad_input(x_adj, saved, approximate=module.approximate, grad_input=x_adj)


class _LogSoftmax(Map):
    elementwise = False
    lfp = None

    def check(self, module):
        if module.dim not in (-1, 1):
            raise ValueError(f"LogSoftmax(dim={module.dim}): expected dim=1 (or -1) over (batch, classes)")

    def record(self, module, y, x):
        if x.dim() != 2:
            raise ValueError(f"LogSoftmax: expected a (batch, classes) input, got shape {tuple(y.shape)}")
        return x

    def backward(self, module, saved, x_adj):
        # autograd's kernel: Y* = X* − exp(X) Σ_j X*_j (docs/maths.md §1.3)
        return _aten._log_softmax_backward_data(x_adj, saved, 1, saved.dtype)


class _Reshape(Map):
    """Flatten, Unflatten and views that keep the batch dimension: the adjoint is reshaped back."""

    saves = "shape"
    elementwise = False
    lfp = "backward"

    def record(self, module, y, x):
        if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(f"expected a view that keeps the batch dimension 0, got {tuple(y.shape)} -> "
                             f"{tuple(x.shape)}")
        return y.shape

    def backward(self, module, saved, x_adj):
        return x_adj.reshape(saved)

    backward_ = backward


class Reshape(nn.Module):
    """The stand-in of a functional view (``x.view(B, -1)``, ``torch.flatten(x, 1)``): keeps the batch size."""

    def __init__(self, shape: tuple):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, y: Tensor) -> Tensor:
        return y.reshape(y.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape=(B, {', '.join(map(str, self.shape))})"


class _Dropout(Map):
    """Dropout in train mode: the recorder draws the mask itself so that it can keep it.

    The output is ``y · mask / (1 − p)`` (written into ``y`` with ``inplace=True``, as the module does);
    the module's own draw never happens (the functional path) or is discarded (a module hook).
    In eval mode (or p = 0) it is the identity and nothing is recorded.
    """

    saves = "mask"
    lfp = "backward"
    stochastic = True

    def run(self, module, y, call):
        if not module.training or module.p == 0:
            return call(), None
        shape = y.shape[:2] + (1,) * (y.dim() - 2) if self.channelwise else y.shape
        if module.p == 1:
            mask = y.new_zeros(shape)
        else:
            mask = y.new_empty(shape).bernoulli_(1 - module.p).div_(1 - module.p)
        return (y.mul_(mask) if module.inplace else y * mask), mask

    channelwise = False

    def backward(self, module, saved, x_adj):
        return x_adj if saved is None else x_adj * saved

    def backward_(self, module, saved, x_adj):
        return x_adj if saved is None else x_adj.mul_(saved)

    def df_at(self, module, y):
        raise TypeError("Dropout's derivative is its recorded mask; there is no σ'(y) at a new point")


class _ChannelDropout(_Dropout):
    channelwise = True

    def check(self, module):
        pass


class _Step(Map):
    saves = "none"
    differentiable = False

    def backward(self, module, saved, x_adj):
        return torch.zeros_like(x_adj)


def _spatial(module, name: str, n: int) -> list[int]:
    value = getattr(module, name)
    return list(value) if isinstance(value, (tuple, list)) else [value] * n


class _Pool(Map):
    """The N-d pooling entries: one class per kind, configured by the dimension (1-d runs torch's 2-d kernel
    on an inserted height of 1, as ``F.max_pool1d`` / ``F.avg_pool1d`` do)."""

    elementwise = False

    def __init__(self, n: int):
        self.n = n

    def _geometry(self, module, *names):
        """The module's kernel_size, stride (its kernel when None or empty, as torch's), padding, dilation."""
        values = [_spatial(module, "kernel_size" if name == "stride" and not module.stride else name, self.n)
                  for name in names]
        if self.n == 1:
            values = [[1 if name != "padding" else 0] + value for name, value in zip(names, values)]
        return values

    def _lift(self, tensor: Tensor) -> Tensor:
        return tensor.unsqueeze(-2) if self.n == 1 else tensor

    def _lifted_shape(self, shape) -> tuple:
        return tuple(shape[:-1]) + (1,) + tuple(shape[-1:]) if self.n == 1 else tuple(shape)

    def _drop(self, tensor: Tensor) -> Tensor:
        return tensor.squeeze(-2) if self.n == 1 else tensor


class _MaxPool(_Pool):
    """MaxPoolNd: the record is ``(Y, indices)``, autograd's own (the pool's input, often the ReLU's record
    already, and the forward's int64 arg-max indices), so the sweep calls only
    ``max_pool2d_with_indices_backward``: the pooling runs once per step, as under autograd.

    The indices come from the forward's own pooling: the functional form runs
    ``F.max_poolNd(..., return_indices=True)`` in place of the user's call (the same kernel and arguments,
    so the same output); the module form runs the module's own forward with ``return_indices`` set for
    that call only (:meth:`prepare`; the recorder's hook hands the user the output alone and restores
    it). :meth:`record` (an entry used outside the recorder) and :meth:`vjp_at` pool once more.
    """

    saves = "input"
    lfp = "backward"

    def check(self, module):
        if module.return_indices:
            raise ValueError("MaxPool with return_indices=True returns two tensors; not a map of the chain")

    def prepare(self, module):
        self.check(module)  # return_indices set after wrapping
        module.return_indices = True
        return lambda: setattr(module, "return_indices", False)

    def _pool(self, module, y):
        pool = F.max_pool1d if self.n == 1 else F.max_pool2d
        return pool(y, module.kernel_size, module.stride, module.padding, module.dilation, ceil_mode=module.ceil_mode,
                    return_indices=True)

    def record(self, module, y, x):
        return y, self._pool(module, y)[1]

    def hook_output(self, module, y, x):
        if isinstance(x, tuple):  # the module ran with return_indices (prepare)
            x, indices = x
            return x, (y, indices)
        return x, self.record(module, y, x)

    def run(self, module, y, call):
        x, indices = self._pool(module, y)  # in place of call(): the user's F.max_poolNd with return_indices
        return x, (y, indices)

    def vjp_at(self, module, y, x_adj):
        return self.backward(module, (y, self._pool(module, y)[1]), x_adj)

    def backward(self, module, saved, x_adj):
        kernel, stride, padding, dilation = self._geometry(module, "kernel_size", "stride", "padding", "dilation")
        if isinstance(saved, Tensor):  # a bare Y (earlier records): the arg-max of the same deterministic kernel
            saved = (saved, self._pool(module, saved)[1])
        y, indices = saved
        return self._drop(_aten.max_pool2d_with_indices_backward(self._lift(x_adj), self._lift(y), kernel, stride,
                                                                 padding, dilation, module.ceil_mode,
                                                                 self._lift(indices)))


class _LinearPool(_Pool):
    """Average poolings: linear in Y, so the backward needs only Y's shape (and LFP's ε-rule applies)."""

    saves = "shape"
    lfp = "epsilon"

    def record(self, module, y, x):
        return y.shape


class _AvgPool(_LinearPool):
    def backward(self, module, saved, x_adj):
        kernel, stride, padding = self._geometry(module, "kernel_size", "stride", "padding")
        x_adj = self._lift(x_adj)
        y_like = x_adj.new_empty(()).expand(self._lifted_shape(saved))  # the kernel reads only the input's sizes
        divisor = None if self.n == 1 else module.divisor_override
        return self._drop(_aten.avg_pool2d_backward(x_adj, y_like, kernel, stride, padding, module.ceil_mode,
                                                    module.count_include_pad, divisor))


class _AdaptiveAvgPool(_LinearPool):
    def backward(self, module, saved, x_adj):
        x_adj = self._lift(x_adj)
        return self._drop(_aten._adaptive_avg_pool2d_backward(x_adj, x_adj.new_empty(()).expand(
            self._lifted_shape(saved))))


MAPS.update({
    nn.Identity: _Identity(),
    nn.ReLU: _ReLU(),
    nn.LeakyReLU: _LeakyReLU(),
    nn.Sigmoid: _Sigmoid(),
    nn.Tanh: _Tanh(),
    nn.ELU: _ELU(),
    nn.Softplus: _Softplus(),
    nn.Hardtanh: _Hardtanh(),
    nn.ReLU6: _Hardtanh(),
    nn.SiLU: _SiLU(),
    nn.Hardswish: _Hardswish(),
    nn.Hardsigmoid: _Hardsigmoid(),
    nn.Mish: _Mish(),
    nn.GELU: _GELU(),
    nn.LogSoftmax: _LogSoftmax(),
    nn.Flatten: _Reshape(),
    nn.Unflatten: _Reshape(),
    Reshape: _Reshape(),
    nn.Dropout: _Dropout(),
    nn.Dropout1d: _ChannelDropout(),
    nn.Dropout2d: _ChannelDropout(),
    nn.MaxPool1d: _MaxPool(1),
    nn.MaxPool2d: _MaxPool(2),
    nn.AvgPool1d: _AvgPool(1),
    nn.AvgPool2d: _AvgPool(2),
    nn.AdaptiveAvgPool1d: _AdaptiveAvgPool(1),
    nn.AdaptiveAvgPool2d: _AdaptiveAvgPool(2),
    tfa_nn.InputNoise: _Noise(),
    tfa_nn.Step: _Step(),
})

# Modules whose own forward the recorder lets run under its function mode, so that the functional inside
# (F.dropout) is the one recorded: Dropout must draw its mask once, also with inplace=True (§6.7).
TRANSPARENT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d)


def _dropout(cls):
    def make(input, p=0.5, training=True, inplace=False):
        module = cls(p, inplace)
        module.train(training)
        return module
    return make


# Functional forwards → the equivalent module (its entry then does the rest). Each builder takes the
# function's own arguments (the chain tensor is ``input``; other tensors are not allowed).
FUNCTIONALS: dict = {
    F.relu: lambda input, inplace=False: nn.ReLU(inplace),
    torch.relu: lambda input: nn.ReLU(),
    Tensor.relu: lambda input: nn.ReLU(),
    F.relu_: lambda input: nn.ReLU(True),
    torch.relu_: lambda input: nn.ReLU(True),
    Tensor.relu_: lambda input: nn.ReLU(True),
    F.leaky_relu: lambda input, negative_slope=0.01, inplace=False: nn.LeakyReLU(negative_slope, inplace),
    F.elu: lambda input, alpha=1.0, inplace=False: nn.ELU(alpha, inplace),
    F.gelu: lambda input, approximate="none": nn.GELU(approximate),
    F.silu: lambda input, inplace=False: nn.SiLU(inplace),
    F.relu6: lambda input, inplace=False: nn.ReLU6(inplace),
    F.hardtanh: lambda input, min_val=-1.0, max_val=1.0, inplace=False: nn.Hardtanh(min_val, max_val, inplace),
    F.hardtanh_: lambda input, min_val=-1.0, max_val=1.0: nn.Hardtanh(min_val, max_val, True),
    F.hardswish: lambda input, inplace=False: nn.Hardswish(inplace),
    F.hardsigmoid: lambda input, inplace=False: nn.Hardsigmoid(inplace),
    F.mish: lambda input, inplace=False: nn.Mish(inplace),
    F.softplus: lambda input, beta=1.0, threshold=20.0: nn.Softplus(beta, threshold),
    torch.sigmoid: lambda input: nn.Sigmoid(),
    Tensor.sigmoid: lambda input: nn.Sigmoid(),
    F.sigmoid: lambda input: nn.Sigmoid(),
    torch.tanh: lambda input: nn.Tanh(),
    Tensor.tanh: lambda input: nn.Tanh(),
    F.tanh: lambda input: nn.Tanh(),
    F.log_softmax: lambda input, dim=None, _stacklevel=3, dtype=None: nn.LogSoftmax(dim),
    Tensor.log_softmax: lambda input, dim, dtype=None: nn.LogSoftmax(dim),
    torch.log_softmax: lambda input, dim, dtype=None: nn.LogSoftmax(dim),
    F.max_pool1d: lambda input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
    return_indices=False: nn.MaxPool1d(kernel_size, stride, padding, dilation, False, ceil_mode),
    F.max_pool2d: lambda input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
    return_indices=False: nn.MaxPool2d(kernel_size, stride, padding, dilation, False, ceil_mode),
    F.avg_pool1d: lambda input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True:
    nn.AvgPool1d(kernel_size, stride, padding, ceil_mode, count_include_pad),
    F.avg_pool2d: lambda input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
    divisor_override=None: nn.AvgPool2d(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override),
    F.adaptive_avg_pool1d: lambda input, output_size: nn.AdaptiveAvgPool1d(output_size),
    F.adaptive_avg_pool2d: lambda input, output_size: nn.AdaptiveAvgPool2d(output_size),
    F.dropout: _dropout(nn.Dropout),
    F.dropout1d: _dropout(nn.Dropout1d),
    F.dropout2d: _dropout(nn.Dropout2d),
}

# Views that keep the batch dimension: recorded as a ``Reshape`` to the output's shape.
VIEWS = frozenset({torch.flatten, Tensor.flatten, Tensor.view, Tensor.reshape, torch.reshape, Tensor.unflatten,
                   torch.unflatten})


def register_map(module_type: type, entry: Map, overwrite: bool = False) -> None:
    """Add a parameter-free module type to the table (docs/maths.md §1.1); refuses a silent overwrite.

    >>> class Square(nn.Module):
    ...     def forward(self, y): return y * y
    >>> class SquareMap(Map):
    ...     saves = "input"
    ...     def backward(self, module, y, x_adj): return 2 * y * x_adj
    >>> register_map(Square, SquareMap())
    """
    register("map", module_type, entry, Map, overwrite)  # refuses a type of tfa.layers.LAYERS


register_derivative = register_map


def map_for(module: nn.Module) -> Map | None:
    """The table entry for ``module``'s exact type, or None."""
    return MAPS.get(type(module))


def supported_maps() -> list[str]:
    return sorted(t.__name__ for t in MAPS if t is not Reshape)
