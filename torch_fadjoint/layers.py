"""The table of parametric layers: Linear, Conv1d/2d/3d, BatchNorm1d/2d/3d, LayerNorm (docs/maths.md §6.1).

One small class per layer type (BackPACK's ``BaseParameterDerivatives`` pattern, STYLE P9), looked up by
exact type; the N-d convolution is one class configured by its dimension. Every entry speaks the same
verbs, and the sweep and every rule use only these:

    record(module, x_prev, y)      what the entry keeps beyond X^{k-1} (BatchNorm: the mode it ran in)
    input_adjoint(rec, y_adj)      X*^{k-1} = J_X(A_k)^T Y*^k, in X^{k-1}'s shape
    param_feedback(rec, y_adj)     {parameter: J_θ(A_k)^T Y*^k} for every parameter that requires grad
    forward(rec, x_in)             A_k at another input with the current parameters (inference learning)
    patch_energy(rec)              ‖x̃‖² per output position, broadcastable to Y (NLMS, §4, §6.5), or None

=============  =====================================================  ==========================
layer          input adjoint / parameter feedback                     kernel (autograd's own)
=============  =====================================================  ==========================
Linear         Y* W  /  Y*ᵀ X^{k-1},  Σ Y*                             mm, sum
Conv1d/2d/3d   transposed conv of Y* / correlation of X with Y*, Σ Y*  aten.convolution_backward
BatchNorm      train: batch statistics (couples the batch); eval:      aten.native_batch_norm_backward
               γ / √(running_var + ε);  γ: Σ Y* ⊙ x̂,  β: Σ Y*
LayerNorm      per sample over the normalised dims                     aten.native_layer_norm_backward
=============  =====================================================  ==========================

Users add layer types with :func:`register_layer`. A module that holds parameters and has no entry
here is refused by the recorder (its parameters would silently never train).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .maps import MapRecord
from .tables import LAYERS, register

__all__ = ["Layer", "LayerRecord", "LAYERS", "register_layer", "layer_for", "supported_layers"]

_aten = torch.ops.aten


@dataclass
class LayerRecord:
    """Layer k of the chain (docs/maths.md §6.1): a parametric layer A_k and the maps after it.

    x_prev X^{k-1} (what A_k received), y Y^k (its output, when a rule or a map needs it), x X^k (the
    output of the last map: the next layer's input, or the model's output), maps (one MapRecord each),
    saved (the entry's own record), call (1 for the module's first run in this forward, 2 for its second).
    """

    k: int
    name: str
    module: nn.Module
    entry: "Layer"
    x_prev: Tensor
    y: Tensor | None = None
    x: Tensor | None = None
    maps: list[MapRecord] = field(default_factory=list)
    saved: object = None
    call: int = 1

    @property
    def params(self) -> list[Tensor]:
        """The layer's parameters (requires_grad or not)."""
        return self.entry.params(self.module)

    @property
    def describe(self) -> str:
        suffix = f" (call {self.call})" if self.call > 1 else ""
        return f"{self.name or '<model>'} ({type(self.module).__name__}){suffix}"

    def release_outputs(self) -> None:
        """Drop Y^k, X^k and the map records, keeping X^{k-1} (read by the feedback and the input adjoint)."""
        self.y = self.x = None
        self.maps = []

    def release(self) -> None:
        self.x_prev = self.y = self.x = self.saved = None
        self.maps = []


class Layer:
    """Base of a parametric-layer entry. Subclasses implement the verbs; ``param_names`` lists the
    module's parameter attributes in the order ``param_feedback`` returns them."""

    param_names = ("weight", "bias")
    normalization = False  # BatchNorm / LayerNorm: no input Gram (§6.5), not an inference-learning layer (§6.6)

    def params(self, module: nn.Module) -> list[Tensor]:
        return [p for p in (getattr(module, n, None) for n in self.param_names) if p is not None]

    def check(self, module: nn.Module) -> str | None:
        """Why this configuration is not supported (checked at attach), or None."""
        return None

    def check_input(self, module: nn.Module, x_prev: Tensor) -> str | None:
        """Why ``x_prev`` does not fit the module (checked before it runs), or None. The weight is read from the
        module's registered parameters (once per layer and forward: ``nn.Module.__getattr__`` costs a microsecond);
        the chain's pre-hook has checked that what its forward reads is a parameter the model was wrapped with."""
        registered, weight = module._parameters, None
        for name in self.param_names:
            weight = registered.get(name)
            if weight is not None:
                break
        if weight is None and not registered:  # an entry whose tensors are not registered parameters
            params = self.params(module)
            weight = params[0] if params else None
        if weight is not None and (x_prev.dtype is not weight.dtype or x_prev.device != weight.device):
            return (f"expected a {weight.dtype} input on {weight.device} (its weight's), "
                    f"got {x_prev.dtype} on {x_prev.device}")
        return None

    def record(self, module: nn.Module, x_prev: Tensor, y: Tensor):
        return None

    def input_adjoint(self, rec: LayerRecord, y_adj: Tensor) -> Tensor:
        raise NotImplementedError

    def param_feedback(self, rec: LayerRecord, y_adj: Tensor) -> dict[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, rec: LayerRecord, x_in: Tensor) -> Tensor:
        return rec.module(x_in)

    def patch_energy(self, rec: LayerRecord) -> Tensor | None:
        return None

    @staticmethod
    def _wanted(*params) -> list[bool]:
        return [p is not None and p.requires_grad for p in params]


class _Linear(Layer):
    def check_input(self, module, x_prev):
        if x_prev.dim() < 2 or x_prev.shape[-1] != module.in_features:
            flatten = "; flatten it first (nn.Flatten or torch.flatten(x, 1))" if x_prev.dim() > 2 else ""
            return f"expected a (batch, {module.in_features}) input, got shape {tuple(x_prev.shape)}{flatten}"
        return super().check_input(module, x_prev)

    def input_adjoint(self, rec, y_adj):
        weight = rec.module.weight
        return y_adj.mm(weight) if y_adj.dim() == 2 else y_adj.matmul(weight)

    def param_feedback(self, rec, y_adj):
        weight, bias = rec.module.weight, rec.module.bias
        x_prev = rec.x_prev
        if y_adj.dim() > 2:
            y_adj, x_prev = y_adj.reshape(-1, y_adj.shape[-1]), x_prev.reshape(-1, x_prev.shape[-1])
        grads = {}
        if weight.requires_grad:
            grads[weight] = y_adj.t().mm(x_prev)
        if bias is not None and bias.requires_grad:
            grads[bias] = y_adj.sum(0)
        return grads

    def forward(self, rec, x_in):
        return F.linear(x_in, rec.module.weight, rec.module.bias)

    def weight_factors(self, rec, y_adj) -> tuple[Tensor, Tensor]:
        """(Y*, X^{k-1}) as matrices, so that ∂J/∂W = Y*ᵀ X^{k-1} (the fused update multiplies them itself)."""
        x_prev = rec.x_prev
        return (y_adj if y_adj.dim() == 2 else y_adj.reshape(-1, y_adj.shape[-1]),
                x_prev if x_prev.dim() == 2 else x_prev.reshape(-1, x_prev.shape[-1]))

    def patch_energy(self, rec):
        energy = rec.x_prev.pow(2).sum(-1, keepdim=True)
        return energy + 1.0 if rec.module.bias is not None else energy

    def gram(self, rec) -> Tensor:
        """K_0 = X̃ X̃ᵀ (B, B) with X̃ = [X^{k-1}, 1] (docs/maths.md §4); 2-d inputs only."""
        gram = rec.x_prev.mm(rec.x_prev.t())
        return gram + 1.0 if rec.module.bias is not None else gram


class _Conv(Layer):
    """ConvNd through ``aten.convolution_backward`` (autograd's kernel), any stride, padding (ints,
    "valid", "same"), dilation, groups, bias on or off; ``padding_mode="zeros"`` only."""

    def __init__(self, n: int):
        self.n = n

    def check(self, module):
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} is not supported; expected 'zeros'"
        return None

    def check_input(self, module, x_prev):
        if x_prev.dim() != self.n + 2 or x_prev.shape[1] != module.in_channels:
            dims = ", ".join(["batch", str(module.in_channels)] + ["L", "H, W", "D, H, W"][self.n - 1].split(", "))
            return f"expected a ({dims}) input, got shape {tuple(x_prev.shape)}"
        return super().check_input(module, x_prev)

    def _geometry(self, rec):
        """(input as the kernel saw it, padding, extra right padding per dim or None)."""
        module, x_prev = rec.module, rec.x_prev
        if not isinstance(module.padding, str):
            return x_prev, list(module.padding), None
        if module.padding == "valid":
            return x_prev, [0] * self.n, None
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        left = [t // 2 for t in totals]
        extra = [t - 2 * lo for t, lo in zip(totals, left)]
        if not any(extra):
            return x_prev, left, None
        pad = []
        for e in reversed(extra):  # torch pads the odd remainder on the right, as F.pad orders dims last first
            pad += [0, e]
        return F.pad(x_prev, pad), left, extra

    def _backward(self, rec, y_adj, mask):
        module = rec.module
        x_in, padding, extra = self._geometry(rec)
        bias_sizes = [module.out_channels] if module.bias is not None else None
        grads = _aten.convolution_backward(y_adj, x_in, module.weight, bias_sizes, list(module.stride), padding,
                                           list(module.dilation), False, [0] * self.n, module.groups, mask)
        return grads, extra

    def input_adjoint(self, rec, y_adj):
        (x_adj, _, _), extra = self._backward(rec, y_adj, [True, False, False])
        if extra is not None:
            x_adj = x_adj[(slice(None), slice(None)) + tuple(slice(0, s - e) for s, e in zip(x_adj.shape[2:], extra))]
        return x_adj

    def param_feedback(self, rec, y_adj):
        weight, bias = rec.module.weight, rec.module.bias
        want_w, want_b = self._wanted(weight, bias)
        if not (want_w or want_b):
            return {}
        (_, grad_w, grad_b), _ = self._backward(rec, y_adj, [False, want_w, want_b])
        grads = {}
        if want_w:
            grads[weight] = grad_w
        if want_b:
            grads[bias] = grad_b
        return grads

    def forward(self, rec, x_in):
        return rec.module._conv_forward(x_in, rec.module.weight, rec.module.bias)

    def patch_energy(self, rec):
        """‖x̃_{b,p}‖² per output position: X² correlated with a ones kernel of the layer's geometry, per
        group, repeated over the group's output channels, + 1 for the bias (§6.5). (B, C_out, *out)."""
        module = rec.module
        per_group = module.in_channels // module.groups
        ones = rec.x_prev.new_ones((module.groups, per_group) + tuple(module.kernel_size))
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.n - 1]
        energy = conv(rec.x_prev.pow(2), ones, None, module.stride, module.padding, module.dilation, module.groups)
        energy = energy.repeat_interleave(module.out_channels // module.groups, dim=1)
        return energy + 1.0 if module.bias is not None else energy


class _Normalization(Layer):
    """BatchNorm and LayerNorm: autograd's one backward kernel gives the input and the affine parameters'
    adjoints (``_backward(rec, y_adj, mask) -> (x_adj, grad_weight, grad_bias)``)."""

    normalization = True

    def _backward(self, rec, y_adj, mask):
        raise NotImplementedError

    def input_adjoint(self, rec, y_adj):
        return self._backward(rec, y_adj, [True, False, False])[0]

    def param_feedback(self, rec, y_adj):
        weight, bias = rec.module.weight, rec.module.bias
        want_w, want_b = self._wanted(weight, bias)
        if not (want_w or want_b):
            return {}
        _, grad_w, grad_b = self._backward(rec, y_adj, [False, want_w, want_b])
        return {p: g for p, g, want in ((weight, grad_w, want_w), (bias, grad_b, want_b)) if want}


class _BatchNorm(_Normalization):
    """BatchNormNd: train mode (batch statistics; the module's own forward updates the running statistics,
    exactly as without the recorder) or eval mode (running statistics, recorded by version)."""

    def __init__(self, dims: tuple[int, ...]):
        self.dims = dims  # accepted input ranks

    def check_input(self, module, x_prev):
        if x_prev.dim() not in self.dims or x_prev.shape[1] != module.num_features:
            return (f"expected a (batch, {module.num_features}, ...) input of rank {' or '.join(map(str, self.dims))}, "
                    f"got shape {tuple(x_prev.shape)}")
        return super().check_input(module, x_prev)

    def record(self, module, x_prev, y):
        batch_stats = module.training or (module.running_mean is None and module.running_var is None)
        return {"train": batch_stats}

    def _stats(self, rec):
        if rec.saved["train"] and "mean" not in rec.saved:  # recomputed with the forward's own kernel
            _, rec.saved["mean"], rec.saved["invstd"] = _aten.native_batch_norm(
                rec.x_prev, None, None, None, None, True, 0.0, rec.module.eps)
        return rec.saved.get("mean"), rec.saved.get("invstd")

    def _backward(self, rec, y_adj, mask):
        module = rec.module
        mean, invstd = self._stats(rec)
        running_mean = None if rec.saved["train"] else module.running_mean
        running_var = None if rec.saved["train"] else module.running_var
        return _aten.native_batch_norm_backward(y_adj, rec.x_prev, module.weight, running_mean, running_var, mean,
                                                invstd, rec.saved["train"], module.eps, mask)



class _LayerNorm(_Normalization):
    def check_input(self, module, x_prev):
        shape = tuple(module.normalized_shape)
        if x_prev.dim() < len(shape) + 1 or tuple(x_prev.shape[-len(shape):]) != shape:
            return f"expected a (batch, ..., {', '.join(map(str, shape))}) input, got shape {tuple(x_prev.shape)}"
        return super().check_input(module, x_prev)

    def _backward(self, rec, y_adj, mask):
        module = rec.module
        if rec.saved is None:  # mean and rstd, recomputed with the forward's own kernel
            _, mean, rstd = _aten.native_layer_norm(rec.x_prev, list(module.normalized_shape), None, None, module.eps)
            rec.saved = (mean, rstd)
        mean, rstd = rec.saved
        return _aten.native_layer_norm_backward(y_adj, rec.x_prev, list(module.normalized_shape), mean, rstd,
                                                module.weight, module.bias, mask)



LAYERS.update({
    nn.Linear: _Linear(),
    nn.Conv1d: _Conv(1),
    nn.Conv2d: _Conv(2),
    nn.Conv3d: _Conv(3),
    nn.BatchNorm1d: _BatchNorm((2, 3)),
    nn.BatchNorm2d: _BatchNorm((4,)),
    nn.BatchNorm3d: _BatchNorm((5,)),
    nn.LayerNorm: _LayerNorm(),
})


def register_layer(module_type: type, entry: Layer, overwrite: bool = False) -> None:
    """Add a parametric layer type (STYLE P9); refuses a silent overwrite.

    >>> class Scale(nn.Module):
    ...     def __init__(self, n):
    ...         super().__init__(); self.weight = nn.Parameter(torch.ones(n))
    ...     def forward(self, x): return x * self.weight
    >>> class ScaleLayer(Layer):
    ...     param_names = ("weight",)
    ...     def input_adjoint(self, rec, y_adj): return y_adj * rec.module.weight
    ...     def param_feedback(self, rec, y_adj): return {rec.module.weight: (y_adj * rec.x_prev).sum(0)}
    >>> register_layer(Scale, ScaleLayer())
    """
    register("layer", module_type, entry, Layer, overwrite)  # refuses a type of tfa.maps.MAPS


def layer_for(module: nn.Module) -> Layer | None:
    return LAYERS.get(type(module))


def supported_layers() -> list[str]:
    return sorted(t.__name__ for t in LAYERS)
