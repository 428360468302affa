"""Junction entries for what nn modules call in their forward: F.linear, F.conv1d/2d/3d, F.batch_norm, F.layer_norm,
F.group_norm, F.dropout/dropout1d/2d/3d (docs/maths.md §7.1; the layers of §6.1 as functions).

Added to :data:`torch_fadjoint.junctions.JUNCTIONS` on import (the poolings are ``poolings.py``'s); the verbs,
keys and in-place rules are ``junctions.py``'s. A parameter is an input like any other: ``F.linear(x, W, b)``
gives keys for x, W and b. Keys are what a ``TorchFunctionMode`` receives from the modules' forwards:
``nn.Linear`` → ``F.linear`` (``torch._C._nn.linear``), ``nn.ConvNd`` → ``F.convNd`` (= ``torch.convNd``; with
``padding_mode`` other than zeros the module calls ``F.pad`` first, in a mode the table refuses), ``nn.BatchNormNd``
→ ``F.batch_norm`` (after ``Tensor.add_`` on ``num_batches_tracked``), ``nn.LayerNorm`` → ``F.layer_norm``,
``nn.GroupNorm`` → ``F.group_norm``, ``nn.Dropout``/``Dropout1d/2d/3d`` → ``F.dropout``/``dropout1d/2d/3d``.

    =============  ==================================================  ===============================
    function       input adjoints                                      kernel (autograd's own)
    =============  ==================================================  ===============================
    F.linear       x: O* W,  W: O*ᵀ x,  b: Σ O*  (any rank ≥ 1)        aten::linear's addmm / mm, with
                                                                       mm_mat1/mat2_backward's layouts
    F.convNd       transposed conv of O* / correlation of x with O*,   aten.convolution_backward (and
                   Σ O*  ('same' with an odd total: the pad cropped)   constant_pad_nd's crop)
    F.batch_norm   train: through the batch statistics; eval: the      aten.native_batch_norm_backward
                   scale γ/√(running_var + ε); γ: Σ O* ⊙ x̂, β: Σ O*
    F.layer_norm   per sample over the normalised dims                 native_layer_norm_backward
    F.group_norm   per sample and group                                native_group_norm_backward
    F.dropout*     O* ⊙ mask / (1 − p), the mask of the call itself    mul's (CUDA: native_dropout's)
    =============  ==================================================  ===============================

What the backward needs is what autograd saves, taken from the user's own call: :meth:`run` calls the function
under a ``TorchDispatchMode`` that keeps the results of the aten kernel inside it (``native_batch_norm``'s
mean and 1/σ, ``native_layer_norm``'s and ``native_group_norm``'s mean and 1/σ, dropout's noise: the second
factor of its final ``mul``, or ``native_dropout``'s mask where torch fuses it) — or, where the function is a
thin composite of one aten op that returns them and nothing else could see the call, calls that op directly
(``F.layer_norm`` → ``native_layer_norm``; train-mode ``F.batch_norm`` on CPU → ``_batch_norm_impl_index``,
after ``F.batch_norm``'s own checks): the same kernel, the same outputs and side effects, no dispatch mode. The output, the random draw
and BatchNorm's in-place update of the running statistics are exactly the plain call's. ``record`` alone
(after a plain call) recomputes the statistics with the forward's kernel (LayerNorm, GroupNorm: the same call
again; BatchNorm: without the running statistics), and refuses dropout, whose mask only the call knew. In eval
mode BatchNorm's running statistics are constants (autograd refuses to differentiate them; they get no key):
copied, since a later call may update them. float32 adjoints are bit for bit autograd's on CPU
(tests/test_functionals.py). One forward differs from autograd's in the last bits, by torch's doing: F.linear
on a non-contiguous input of rank ≥ 3 runs a bmm under no_grad, but folds into an mm when the weight requires
grad; the adjoints follow autograd's fold.

A tensor argument that is not strided (sparse, mkldnn) or is complex, and a 1-d weight in F.linear, are
refused in one line naming the op; torch's own errors (a batch of one value per channel in train mode,
``padding='same'`` with a stride) are torch's.

Over 400 lines: a table — one entry per module functional (linear, conv, three normalisations, dropout), each
with its direct path and its aten backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from .junctions import FIRST, JUNCTIONS, Junction, argument, entries, is_floating

_aten = torch.ops.aten


class _Keep(TorchDispatchMode):
    """Keeps ``(op, args, result)`` of each call to one of ``ops`` while the user's function runs: what autograd
    would save, taken from the very kernel call (no second pass)."""

    def __init__(self, ops):
        super().__init__()
        self.ops, self.kept = ops, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.ops:
            self.kept.append((func, args, out))
        return out


class _Function(Junction):
    """An entry read through the function's own parameters: ``signature`` = ((name, default), …), the first
    being the input (keyword ``input``). :meth:`run` runs the call under :class:`_Keep` for ``kernels``, and
    :meth:`keep` records from what was kept (``kept`` is None when ``record`` is called alone)."""

    signature: tuple = ()
    kernels: tuple = ()
    lfp = "parametric"  # the ε-rule on a layer (docs/maths.md §6.4, §7.2); dropout: its ordinary backward

    def bind(self, args, kwargs) -> dict:
        """{parameter: (key, value)}, defaults filled in (a missing required argument: None; torch raises)."""
        if not kwargs:  # all positional (what the modules call): no keyword to look for
            count = len(args)
            return {name: (i, args[i]) if i < count else (None, default)
                    for i, (name, default) in enumerate(self.signature)}
        return {name: argument(args, kwargs, i, FIRST if i == 0 else name, default)
                for i, (name, default) in enumerate(self.signature)}

    def check(self, args, kwargs):
        for value in (*args, *kwargs.values()):
            if isinstance(value, Tensor):
                if value.layout != torch.strided:
                    raise TypeError(f"{self.name}: a {value.layout} tensor; expected strided (dense) tensors")
                if value.is_complex():
                    raise TypeError(f"{self.name}: a complex tensor ({value.dtype}); expected real floating tensors")

    def run(self, func, args, kwargs=None):
        kwargs = kwargs or {}
        if not self.kernels:
            if self.inplace is not False or "out" in kwargs:  # Junction.run's copy before a write, or its refusal
                return super().run(func, args, kwargs)
            self.check(args, kwargs)  # once: ``record`` would check the same arguments again
            out = func(*args, **kwargs)
            return out, self.keep(args, kwargs, out, None)
        self.check(args, kwargs)
        with _Keep(self.kernels) as keep:
            out = func(*args, **kwargs)
        return out, self.keep(args, kwargs, out, keep.kept)

    def record(self, args, kwargs, out):
        self.check(args, kwargs)
        return self.keep(args, kwargs, out, None)

    def keep(self, args, kwargs, out, kept):
        raise NotImplementedError


def _floating(bound, *names) -> list:
    """[(name, key)] of the named arguments that are floating tensors."""
    return [(name, bound[name][0]) for name in names if is_floating(bound[name][1])]


# ---------------------------------------------------------------- F.linear

def _mm_adjoints(grad: Tensor, mat1: Tensor, mat2: Tensor, first: bool = True,
                 second: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """mm(mat1, mat2)'s adjoints as autograd computes them (``mm_mat1_backward`` / ``mm_mat2_backward``: a
    column-major operand gets its adjoint as a transposed product); ``first`` / ``second``: which are wanted."""
    adj1 = adj2 = None
    if first:
        adj1 = (mat2.mm(grad.t()).t() if mat1.stride(0) == 1 and mat1.stride(1) == mat1.shape[0]
                else grad.mm(mat2.t()))
    if second:
        adj2 = (grad.t().mm(mat1).t() if mat2.stride(0) == 1 and mat2.stride(1) == mat2.shape[0]
                else mat1.t().mm(grad))
    return adj1, adj2


class _Linear(_Function):
    """``F.linear(input, weight, bias)``, input of rank ≥ 1: aten::linear's path (addmm for a 2-d input or a
    contiguous one with a bias, folded into a matrix; else matmul, folded as autograd folds it, + bias) and
    the adjoints of its mm (O* W, O*ᵀ x) and of its bias (O* summed over the batch dims)."""

    signature = (("input", None), ("weight", None), ("bias", None))
    nlms = "linear"  # normalised by its input (docs/maths.md §7.3)

    def check(self, args, kwargs):
        super().check(args, kwargs)
        weight = argument(args, kwargs, 1, "weight", None)[1]
        if isinstance(weight, Tensor) and weight.dim() != 2:
            raise ValueError(f"{self.name}: a {weight.dim()}-d weight; expected an (out_features, in_features) "
                             "weight")

    def keep(self, args, kwargs, out, kept):
        bound = self.bind(args, kwargs)
        x, weight, bias = (bound[n][1] for n in ("input", "weight", "bias"))
        fused = bias is not None and (x.dim() == 2 or x.is_contiguous() and (x.dim() == 3 or bias.dim() == 1))
        return _floating(bound, "input", "weight", "bias"), x, weight, (None if bias is None else bias.shape), fused

    takes_needed = True  # the tape says which inputs' adjoints reach a parameter (not the model's input's)

    def input_adjoints(self, saved, out_adj, needed=None):
        keys, x, weight, bias_shape, fused = saved
        if needed is not None:
            keys = [(name, key) for name, key in keys if key in needed]
        names = {name for name, _ in keys}
        x2 = x.unsqueeze(0) if x.dim() == 1 and not fused else x.reshape(-1, x.shape[-1])
        grad = out_adj.reshape(-1, out_adj.shape[-1])
        x_adj, wt_adj = _mm_adjoints(grad, x2, weight.t(), "input" in names, "weight" in names)
        adjs = {"input": None if x_adj is None else x_adj.reshape(x.shape),
                "weight": None if wt_adj is None else wt_adj.t()}
        if bias_shape is not None and "bias" in names:
            adjs["bias"] = (grad if fused else out_adj).sum_to_size(bias_shape)
        return {key: adjs[name] for name, key in keys}

    def input_energy(self, saved, bias: bool) -> Tensor:
        """‖x̃_r‖² of every row r of the input, x̃ = [x, 1] with ``bias``: (…, 1), broadcastable to the output
        (consequentialism / NLMS, docs/maths.md §7.3)."""
        energy = saved[1].pow(2).sum(-1, keepdim=True)
        return energy + 1.0 if bias else energy

    def input_gram(self, saved, bias: bool) -> Tensor | None:
        """X̃ X̃ᵀ (B, B) of a 2-d input (§4's B × B solve); None for any other rank."""
        x = saved[1]
        if x.dim() != 2:
            return None
        gram = x.mm(x.t())
        return gram + 1.0 if bias else gram


# ---------------------------------------------------------------- F.conv1d / conv2d / conv3d

def _expand(value, n: int) -> list[int]:
    value = list(value) if isinstance(value, (tuple, list)) else [value]
    return value * n if len(value) == 1 else value


class _Conv(_Function):
    """``F.convNd(input, weight, bias, stride, padding, dilation, groups)``: autograd's
    ``convolution_backward`` on the input as the kernel saw it (batched; ``padding='same'`` with an odd total
    pads one more on the right with ``constant_pad_nd``, whose adjoint crops it back)."""

    signature = (("input", None), ("weight", None), ("bias", None), ("stride", 1), ("padding", 0),
                 ("dilation", 1), ("groups", 1))
    nlms = "conv"  # normalised by its patches (docs/maths.md §6.5, §7.3)

    def __init__(self, n: int):
        self.n = n

    def keep(self, args, kwargs, out, kept):
        bound = self.bind(args, kwargs)
        x, weight, bias = (bound[n][1] for n in ("input", "weight", "bias"))
        stride, dilation = _expand(bound["stride"][1], self.n), _expand(bound["dilation"][1], self.n)
        padding, pad = bound["padding"][1], None
        if padding == "valid":
            padding = [0] * self.n
        elif padding == "same":  # torch's convolution_same: total d(k-1), the odd one on the right
            totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
            padding, pad = [t // 2 for t in totals], []
            for t in reversed(totals):  # constant_pad_nd's order: the last dim first
                pad += [0, t % 2]
            pad = pad if any(pad) else None
        else:
            padding = _expand(padding, self.n)
        geometry = (stride, padding, dilation, [0] * self.n, int(bound["groups"][1]))
        return _floating(bound, "input", "weight", "bias"), x, weight, \
            (None if bias is None else list(bias.shape)), geometry, pad

    takes_needed = True  # the tape says which inputs' adjoints reach a parameter: the kernel skips the others

    def input_adjoints(self, saved, out_adj, needed=None):
        keys, x, weight, bias_sizes, (stride, padding, dilation, output_padding, groups), pad = saved
        if needed is not None:
            keys = [(name, key) for name, key in keys if key in needed]
        unbatched = x.dim() == self.n + 1
        x_in = x.unsqueeze(0) if unbatched else x
        x_in = x_in if pad is None else _aten.constant_pad_nd(x_in, pad, 0)
        grad = out_adj.unsqueeze(0) if unbatched else out_adj
        mask = [name in dict(keys) for name in ("input", "weight", "bias")]
        x_adj, w_adj, b_adj = _aten.convolution_backward(grad, x_in, weight, bias_sizes, stride, padding, dilation,
                                                         False, output_padding, groups, mask)
        if x_adj is not None:
            x_adj = x_adj if pad is None else _aten.constant_pad_nd(x_adj, [-p for p in pad], 0)
            x_adj = x_adj.squeeze(0) if unbatched else x_adj
        adjs = {"input": x_adj, "weight": w_adj, "bias": b_adj}
        return {key: adjs[name] for name, key in keys}

    def input_energy(self, saved, bias: bool) -> Tensor:
        """‖x̃_{b,p}‖² of every patch, in the output's shape (docs/maths.md §6.5, §7.3): X² correlated with a ones
        kernel of the call's geometry, per group, repeated over the group's output channels, + 1 with ``bias``."""
        _, x, weight, _, (stride, padding, dilation, _, groups), pad = saved
        unbatched = x.dim() == self.n + 1
        x_in = x.unsqueeze(0) if unbatched else x
        x_in = x_in if pad is None else _aten.constant_pad_nd(x_in, pad, 0)
        ones = x_in.new_ones((groups,) + tuple(weight.shape[1:]))
        correlate = (F.conv1d, F.conv2d, F.conv3d)[self.n - 1]
        energy = correlate(x_in.pow(2), ones, None, stride, padding, dilation, groups)
        energy = energy.repeat_interleave(weight.shape[0] // groups, dim=1)
        energy = energy.squeeze(0) if unbatched else energy
        return energy + 1.0 if bias else energy


# ---------------------------------------------------------------- F.batch_norm / layer_norm / group_norm

class _Normalization(_Function):
    """The three normalisations: one aten backward kernel gives the input's, weight's and bias's adjoints
    (:meth:`backward` with autograd's mask: the input, and the weight and bias where given)."""

    def again(self, args, kwargs) -> list:
        """What the kernel kept, from the same call once more (``record`` alone; LayerNorm and GroupNorm have no
        side effect)."""
        with _Keep(self.kernels) as keep:
            self.function(*args, **kwargs)
        return keep.kept

    def affine(self, bound) -> tuple:
        keys = _floating(bound, "input", "weight", "bias")
        return keys, [name in dict(keys) for name in ("input", "weight", "bias")]

    def input_adjoints(self, saved, out_adj):
        keys = saved[0]
        adjs = dict(zip(("input", "weight", "bias"), self.backward(saved, out_adj)))
        return {key: adjs[name] for name, key in keys}


_BATCH_NORMS = (_aten.native_batch_norm.default, _aten.cudnn_batch_norm.default, _aten.miopen_batch_norm.default,
                _aten._batch_norm_with_update.default)


class _BatchNorm(_Normalization):
    """``F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)``: train mode
    through the batch's mean and 1/σ (the kernel's own; the running statistics are updated by the call, as
    torch does, and get no key); eval mode through the running statistics (copied: a constant here)."""

    signature = (("input", None), ("running_mean", None), ("running_var", None), ("weight", None), ("bias", None),
                 ("training", False), ("momentum", 0.1), ("eps", 1e-5))
    kernels = _BATCH_NORMS

    def run(self, func, args, kwargs=None):
        kwargs = kwargs or {}
        bound = self.bind(args, kwargs)
        if bound["training"][1]:
            if _direct_batch_norm(func, bound):
                return self._run_direct(args, kwargs, bound)
            return super().run(func, args, kwargs)
        self.check(args, kwargs)  # eval mode reads the running statistics: nothing to keep from the kernel
        out = func(*args, **kwargs)
        return out, self.keep(args, kwargs, out, None)

    def _run_direct(self, args, kwargs, bound):
        """Train mode on CPU: ``torch.batch_norm`` is ``_batch_norm_impl_index``'s first output (ATen's
        Normalization.cpp), whose next two are the kernel's own mean and 1/σ: called directly, with
        ``F.batch_norm``'s own checks first, they come without :class:`_Keep`'s dispatch mode."""
        self.check(args, kwargs)
        x, eps = bound["input"][1], bound["eps"][1]
        F._verify_batch_size(x.size())
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
        out, mean, invstd, _, backend = torch._batch_norm_impl_index(
            x, bound["weight"][1], bound["bias"][1], bound["running_mean"][1], bound["running_var"][1], True,
            bound["momentum"][1], eps, torch.backends.cudnn.enabled)
        if backend != 0:  # not the native kernel (it is, on CPU): its saved tensors would mean something else
            raise RuntimeError(f"{self.name}: batch norm ran on backend {backend}, expected the native CPU kernel")
        return out, self.keep(args, kwargs, out, [(None, None, (out, mean, invstd))])

    def keep(self, args, kwargs, out, kept):
        bound = self.bind(args, kwargs)
        x, weight, eps, train = bound["input"][1], bound["weight"][1], bound["eps"][1], bool(bound["training"][1])
        keys, mask = self.affine(bound)
        if not train:
            stats = (None, None, bound["running_mean"][1].clone(), bound["running_var"][1].clone())
        elif kept:
            stats = (kept[-1][2][1], kept[-1][2][2], None, None)
        else:  # recorded after a plain call: the batch's statistics again, with the forward's own kernel
            stats = _aten.native_batch_norm(x, None, None, None, None, True, 0.0, eps)[1:] + (None, None)
        return keys, mask, x, weight, train, eps, stats

    def backward(self, saved, out_adj):
        keys, mask, x, weight, train, eps, (mean, invstd, running_mean, running_var) = saved
        return _aten.native_batch_norm_backward(out_adj, x, weight, running_mean, running_var, mean, invstd, train,
                                                eps, mask)


_PLAIN = (Tensor, nn.Parameter)  # tensor types whose calls no __torch_function__ of their own intercepts
_function_modes = torch._C._len_torch_function_stack  # the function modes active besides the tape's (popped)


def _direct_batch_norm(func, bound) -> bool:
    """Whether a train-mode ``F.batch_norm`` call may run as ``_batch_norm_impl_index`` directly: CPU, plain
    dense tensors, no other function mode, torch's own F.batch_norm (and the private op present)."""
    x = bound["input"][1]
    return (func is F.batch_norm and hasattr(torch, "_batch_norm_impl_index") and hasattr(F, "_verify_batch_size")
            and not _function_modes() and type(x) in _PLAIN and x.device.type == "cpu" and not x.is_nested
            and x.layout == torch.strided
            and all(t is None or (type(t) in _PLAIN and t.device.type == "cpu")
                    for t in (bound[n][1] for n in ("running_mean", "running_var", "weight", "bias"))))


class _LayerNorm(_Normalization):
    """``F.layer_norm(input, normalized_shape, weight, bias, eps)``: native_layer_norm's mean and 1/σ."""

    signature = (("input", None), ("normalized_shape", None), ("weight", None), ("bias", None), ("eps", 1e-5))
    kernels = (_aten.native_layer_norm.default,)
    function = staticmethod(F.layer_norm)

    def run(self, func, args, kwargs=None):
        """F.layer_norm is ``native_layer_norm``'s output (aten::layer_norm is torch's composite of it, on every
        device): called directly, its mean and 1/σ come without :class:`_Keep`'s dispatch mode (≈ 40 µs a call on
        CPU), where nothing else could see the call: plain tensors, no other function mode, not nested."""
        kwargs = kwargs or {}
        bound = self.bind(args, kwargs)
        x, shape, weight, bias = (bound[n][1] for n in ("input", "normalized_shape", "weight", "bias"))
        if (func is not F.layer_norm or _function_modes() or not isinstance(shape, (tuple, list))
                or any(t is not None and type(t) not in _PLAIN for t in (x, weight, bias)) or x.is_nested):
            return super().run(func, args, kwargs)
        self.check(args, kwargs)
        kernel_out = torch.native_layer_norm(x, shape, weight, bias, bound["eps"][1])
        return kernel_out[0], self.keep(args, kwargs, kernel_out[0], [(None, None, kernel_out)])

    def keep(self, args, kwargs, out, kept):
        bound = self.bind(args, kwargs)
        x, shape = bound["input"][1], bound["normalized_shape"][1]
        shape = [shape] if isinstance(shape, int) else list(shape)
        keys, mask = self.affine(bound)
        stats = (kept or self.again(args, kwargs))[-1][2][1:]
        return keys, mask, x, shape, stats, bound["weight"][1], bound["bias"][1]

    def backward(self, saved, out_adj):
        keys, mask, x, shape, (mean, rstd), weight, bias = saved
        return _aten.native_layer_norm_backward(out_adj, x, shape, mean, rstd, weight, bias, mask)


class _GroupNorm(_Normalization):
    """``F.group_norm(input, num_groups, weight, bias, eps)``: native_group_norm on the input as aten::group_norm
    passes it (made contiguous), its mean and 1/σ."""

    signature = (("input", None), ("num_groups", None), ("weight", None), ("bias", None), ("eps", 1e-5))
    kernels = (_aten.native_group_norm.default,)
    function = staticmethod(F.group_norm)

    def keep(self, args, kwargs, out, kept):
        bound = self.bind(args, kwargs)
        x, groups, weight = bound["input"][1], int(bound["num_groups"][1]), bound["weight"][1]
        keys, mask = self.affine(bound)
        _, (x_in, gamma, _, n, c, hxw, groups, _), (_, mean, rstd) = (kept or self.again(args, kwargs))[-1]
        return keys, mask, x_in, gamma, (n, c, hxw, groups), mean, rstd

    def backward(self, saved, out_adj):
        keys, mask, x_in, gamma, (n, c, hxw, groups), mean, rstd = saved
        return _aten.native_group_norm_backward(out_adj, x_in, mean, rstd, gamma, n, c, hxw, groups, mask)


# ---------------------------------------------------------------- F.dropout / dropout1d / dropout2d / dropout3d

class _Dropout(_Function):
    """``F.dropout*(input, p, training, inplace)``: torch's own call, the same random draw; its mask kept from
    the kernels inside (the noise ``bernoulli_(1 − p) / (1 − p)``, the second factor of the final ``mul``/``mul_``:
    0-d zeros for p = 1; or ``native_dropout``'s boolean mask and 1/(1 − p) where torch fuses, on CUDA). The
    input's adjoint is O* ⊙ noise, autograd's ``mul`` backward (``native_dropout_backward`` where fused).
    training=False, p = 0 or an empty input: the identity."""

    signature = (("input", None), ("p", 0.5), ("training", True), ("inplace", False))
    lfp = "rearrangement"
    kernels = (_aten.mul.Tensor, _aten.mul_.Tensor, _aten.native_dropout.default)
    inplace = 3

    def keep(self, args, kwargs, out, kept):
        bound = self.bind(args, kwargs)
        key, x = bound["input"]
        p, training = bound["p"][1], bool(bound["training"][1])
        drops = training and p > 0 and out.numel() > 0
        if not is_floating(x) or not drops:
            return (key if is_floating(x) else None), None
        if kept is None:
            raise ValueError(f"{self.name}: the mask is drawn by the call; record it through Junction.run")
        if not kept:
            raise RuntimeError(f"{self.name}: no mask seen inside torch's dropout (p={p}); not in the table")
        op, op_args, op_out = kept[-1]
        if op is _aten.native_dropout.default:
            return key, (op_out[1], 1.0 / (1.0 - op_args[1]))
        noise = op_args[1]
        return key, (noise.squeeze(0) if noise.dim() > out.dim() else noise)  # an unbatched input's unsqueeze

    def input_adjoints(self, saved, out_adj):
        key, mask = saved
        if key is None:
            return {}
        if mask is None:
            return {key: out_adj}
        if isinstance(mask, tuple):
            return {key: _aten.native_dropout_backward(out_adj, *mask)}
        return {key: out_adj * mask}


JUNCTIONS.update(entries({
    "F.linear": _Linear,
    "F.conv1d": lambda: _Conv(1),
    "F.conv2d": lambda: _Conv(2),
    "F.conv3d": lambda: _Conv(3),
    "F.batch_norm": _BatchNorm,
    "F.layer_norm": _LayerNorm,
    "F.group_norm": _GroupNorm,
    "F.dropout F.dropout1d F.dropout2d F.dropout3d": _Dropout,
}))
