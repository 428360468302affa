"""F-propagation: record, through forward hooks, what each layer received and produced (ALGORITHMS.md §1.1).

``FPropagation(model)`` wraps the user's model (not a copy) and registers one forward hook per leaf
module, keeping every handle (zennit's ``Hook.register``/``remove`` pattern). While ``net(x)`` runs,
the hooks record, for each layer k (an ``nn.Linear`` and the elementwise modules after it):

    x_prev  X^{k-1}  (B, n_{k-1})   what the Linear received
    y       Y^k      (B, n_k)       its output, kept only when a rule asks (``keep_pre_activations``)
                                     or an activation's derivative needs it (GELU, SiLU, Softplus)
    x       X^k      (B, n_k)       the layer's output: the next layer's x_prev, or the model's output
    activations                     one record per module after the Linear: what σ' needs (§1.1)

Records are detached tensors that share storage with the forward's own tensors; X^k is kept once
even though it is both the ReLU's record and the next Linear's input. They are freed by the sweep.

The executed modules must form a chain: each hooked module receives exactly the tensor the previous
one returned, and the model returns the last one's output. A functional op or a skip connection
between layers, a module that runs twice (a parameter used twice), an unsupported module, a module
holding its own parameters, or a model changed after wrapping is reported at the forward, with
the module's qualified name.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor, nn

from .derivatives import Derivative, derivative_for, supported_modules

__all__ = ["FPropagation", "LayerRecord", "ActivationRecord"]


@dataclass
class ActivationRecord:
    """One module after a Linear: its qualified name, the module, its table entry and what it saved."""

    name: str
    module: nn.Module
    derivative: Derivative
    saved: object


@dataclass
class LayerRecord:
    """Layer k of the chain (ALGORITHMS.md §1.1): an ``nn.Linear`` and the modules after it."""

    k: int
    name: str
    module: nn.Linear
    x_prev: Tensor
    y: Tensor | None = None
    x: Tensor | None = None
    activations: list[ActivationRecord] = field(default_factory=list)

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    @property
    def bias(self) -> Tensor | None:
        return self.module.bias

    @property
    def params(self) -> list[Tensor]:
        return [p for p in (self.module.weight, self.module.bias) if p is not None]

    def release(self) -> None:
        """Drop every recorded tensor of this layer (called as the backward sweep passes it)."""
        self.x_prev = self.y = self.x = None
        self.activations = []

    def release_outputs(self) -> None:
        """Drop Y^k, X^k and the activation records but keep X^{k-1}: the sweep calls this as soon as
        step 1 of layer k is done (∂W^k and step 2 read only X^{k-1}), so X^k is freed before this
        layer's two GEMMs allocate ∂W^k and X*^{k-1}: the point where autograd frees it too."""
        self.y = self.x = None
        self.activations = []


def _detach(tensor: Tensor) -> Tensor:
    """The tensor itself when it carries no graph (the usual no_grad case), else a detached view."""
    return tensor.detach() if tensor.requires_grad else tensor


def _describe(name: str, module: nn.Module) -> str:
    return f"{name or '<model>'} ({type(module).__name__})"


class FPropagation(nn.Module):
    """Wrap ``model`` and record its F-propagation (ALGORITHMS.md §1.1); ``net(x) == model(x)``.

    Args:
        model: the user's module (not copied). Its executed order must be a chain of ``nn.Linear``
            layers and supported elementwise modules (see ``tfa.derivatives.DERIVATIVES``).
        keep_pre_activations: also keep Y^k for every layer (rules that need Y: LFP, equilibrium quirk).
        process_group: a ``torch.distributed`` group (e.g. ``dist.group.WORLD``) for data-parallel
            training: parameters are broadcast from its first rank now, and every sweep averages each
            layer's gradients over its ranks with one asynchronous all-reduce per tensor, layer L first
            (``tfa.distributed``); ``.grad`` is averaged when ``adjoint`` or a ``tfa.optim`` step reads it.

    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> with FPropagation(model) as net:
    ...     out = net(torch.randn(5, 4))
    ...     [layer.name for layer in net.layers]
    ['0', '2']

    ``net.adjoint(out_adj)`` runs the F-adjoint sweep (ALGORITHMS.md §1.2) and accumulates into
    ``.grad``; see :mod:`torch_fadjoint.optim.fadjoint`.
    """

    # Per-forward state is written several times per step: plain attributes, not nn.Module.__setattr__
    # (which checks parameters / buffers / submodules on every write; ~17 writes per step).
    _PLAIN_STATE = frozenset({"_layers", "_output", "_last", "_seen", "_recording", "_paused", "_attached"})

    def __setattr__(self, name, value):
        if name in FPropagation._PLAIN_STATE:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __init__(self, model: nn.Module, keep_pre_activations: bool = False, process_group=None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
        self.model = model
        self.reducer = None  # set for data-parallel training: grads averaged over process_group
        if process_group is not None:
            from .distributed import GradientAverager, broadcast_parameters

            self.reducer = GradientAverager(process_group)
            broadcast_parameters(model, process_group)
        self.keep_pre_activations = keep_pre_activations
        self._handles: list = []
        self._layers: list[LayerRecord] = []
        self._recording = False
        self._last: Tensor | None = None
        self._seen: set[str] = set()
        self._output: Tensor | None = None
        self._fingerprint: tuple = ()
        self._paused = False
        self._attached = False  # a bool, not ``bool(self._handles)``: torch.compile cannot trace hook handles
        self.attach(model)

    # -- hooks ---------------------------------------------------------------------------------
    def attach(self, model: nn.Module | None = None) -> "FPropagation":
        """(Re)register the hooks on ``model`` (default: the wrapped one); removes old ones first."""
        self.remove()
        if model is not None:
            self.model = model
        for name, module in self.model.named_modules():
            own_params = [n for n, p in module._parameters.items() if p is not None]
            if type(module) is nn.Linear:
                hook = self._make_linear_hook(name)
                self._handles.append(module.register_forward_pre_hook(self._make_linear_check(name)))
            elif next(module.children(), None) is not None:
                if not own_params:
                    continue  # a container: its leaves are hooked
                hook = self._make_refusal(
                    name, module, f"holds parameters {own_params} directly; only nn.Linear may hold parameters"
                )
            elif derivative_for(module) is not None:
                hook = self._make_activation_hook(name, derivative_for(module))
            else:
                hook = self._make_refusal(
                    name, module, f"is not supported; register_derivative() it or use one of: {supported_modules()}"
                )
            self._handles.append(module.register_forward_hook(hook))
        self._fingerprint = self._make_fingerprint()
        self._attached = True
        return self

    def remove(self) -> None:
        """Remove every hook and drop every record."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._attached = False
        self.clear()

    def clear(self) -> None:
        """Drop the records of the last forward."""
        self._layers = []
        self._output = None
        self._last = None
        self._seen = set()

    def __enter__(self) -> "FPropagation":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @contextlib.contextmanager
    def paused(self) -> Iterator["FPropagation"]:
        """Run the model without recording (evaluation): ``with net.paused(): model(x)``."""
        previous, self._paused = self._paused, True
        try:
            yield self
        finally:
            self._paused = previous

    def _make_fingerprint(self) -> tuple:
        """What ``attach`` saw: every module with its children and parameters, and each parameter's
        shape, dtype and device (``model.to(...)`` changes those in place)."""
        modules = tuple((m, tuple(m._modules.items()), tuple(m._parameters.items()))
                        for _, m in self.model.named_modules())
        params = tuple((p, p.shape, p.dtype, p.device) for _, _, ps in modules for _, p in ps if p is not None)
        return modules, params

    def _changed(self) -> bool:
        """True if the model is not what ``attach`` saw; checked at every forward without walking the
        tree (``named_modules`` recursion + tuples were a third of the recorder's Python time): for each
        module seen at attach, its children and parameters must be the same objects under the same
        names, and each parameter keeps its shape, dtype and device. A module added anywhere changes
        its parent's ``_modules``, so this sees what a full walk sees."""
        modules, params = self._fingerprint
        for module, children, own in modules:
            if len(module._modules) != len(children) or len(module._parameters) != len(own):
                return True
            for (name, child), (name2, child2) in zip(children, module._modules.items()):
                if name != name2 or child is not child2:
                    return True
            for (name, p), (name2, p2) in zip(own, module._parameters.items()):
                if name != name2 or p is not p2:
                    return True
        return any(p.shape != shape or p.dtype != dtype or p.device != device for p, shape, dtype, device in params)

    def _make_refusal(self, name: str, module: nn.Module, why: str):
        def refuse(mod, inputs, output):
            if self._recording:
                raise TypeError(f"{_describe(name, mod)} {why}")

        return refuse

    def _check_chain(self, name: str, module: nn.Module, inputs: tuple) -> Tensor:
        if len(inputs) != 1 or not isinstance(inputs[0], Tensor):
            raise ValueError(f"{_describe(name, module)}: expected one tensor input, got {len(inputs)} inputs")
        if name in self._seen:
            raise ValueError(
                f"{_describe(name, module)} ran twice in one forward; a module (and its parameters) "
                "may appear only once in the chain"
            )
        self._seen.add(name)
        x_in = inputs[0]
        if self._layers and x_in is not self._last:
            raise ValueError(
                f"{_describe(name, module)} received a tensor that the previous module did not return: "
                "a functional op or a skip connection between layers is not a chain"
            )
        return x_in

    def _make_linear_check(self, name: str):
        """A pre-hook: the input's shape, dtype and device must fit the Linear (before torch's matmul
        fails with a message that names no layer)."""
        def check_input(module, inputs):
            if not self._recording or len(inputs) != 1 or not isinstance(inputs[0], Tensor):
                return None  # the forward hook reports these (not a chain)
            x_prev, weight = inputs[0], module.weight
            if x_prev.dim() != 2 or x_prev.shape[1] != module.in_features:
                flatten = "; put an nn.Flatten before it" if x_prev.dim() > 2 else ""
                raise ValueError(
                    f"{_describe(name, module)}: expected a (batch, {module.in_features}) input, "
                    f"got shape {tuple(x_prev.shape)}{flatten}"
                )
            if x_prev.dtype != weight.dtype or x_prev.device != weight.device:
                raise ValueError(
                    f"{_describe(name, module)}: expected a {weight.dtype} input on {weight.device} (its "
                    f"weight's), got {x_prev.dtype} on {x_prev.device}"
                )
            return None

        return check_input

    def _make_linear_hook(self, name: str):
        def on_linear(module, inputs, output):
            if not self._recording:
                return None
            x_prev = self._check_chain(name, module, inputs)
            if self._layers:
                self._layers[-1].x = _detach(x_prev)
            layer = LayerRecord(k=len(self._layers) + 1, name=name, module=module, x_prev=_detach(x_prev))
            if self.keep_pre_activations:
                layer.y = _detach(output)
            self._layers.append(layer)
            self._last = output
            return None

        return on_linear

    def _make_activation_hook(self, name: str, derivative: Derivative):
        def on_activation(module, inputs, output):
            if not self._recording:
                return None
            y = self._check_chain(name, module, inputs)
            try:
                new_output, saved = derivative.hook_output(module, y, output)
            except (TypeError, ValueError) as exc:  # a table entry refusing this use: name the module
                raise type(exc)(f"{_describe(name, module)}: {exc}") from None
            if self._layers:
                layer = self._layers[-1]
                if new_output is y and derivative.saves != "none":
                    if layer.y is not None or derivative.saves == "input":
                        raise ValueError(
                            f"{_describe(name, module)}: an in-place activation overwrites Y^k, "
                            "which this rule or derivative needs; use inplace=False"
                        )
                if isinstance(saved, Tensor):
                    saved = _detach(saved)
                if derivative.saves == "input" and layer.y is None and not layer.activations:
                    layer.y = saved  # the same tensor: Y^k is kept once
                layer.activations.append(ActivationRecord(name, module, derivative, saved))
            self._last = new_output
            return None if new_output is output else new_output

        return on_activation

    # -- forward -------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if self._paused:
            return self.model(*args, **kwargs)
        if not self._attached:
            raise RuntimeError("FPropagation: no hooks are attached (remove() was called); call attach()")
        if self._changed():
            raise RuntimeError(
                "FPropagation: the model's modules or parameters changed after wrapping; call net.attach()"
            )
        self.clear()
        self._recording = True
        try:
            output = self.model(*args, **kwargs)
        except BaseException:
            self.clear()
            raise
        finally:
            self._recording = False
        if not self._layers:
            self.clear()
            raise ValueError("FPropagation: no nn.Linear ran in the forward; nothing to record")
        if output is not self._last:
            last = self._layers[-1]
            self.clear()
            raise ValueError(
                f"FPropagation: the model's output is not what its last module returned (a functional op "
                f"after {last.name}?); end the model with a module"
            )
        self._output = self._layers[-1].x = _detach(output)
        return output

    # -- records -------------------------------------------------------------------------------
    @property
    def layers(self) -> list[LayerRecord]:
        """The records of the last forward, layer 1 first."""
        return self._layers

    @property
    def records(self) -> dict[str, LayerRecord]:
        """The records of the last forward keyed by the Linear's qualified name."""
        return {layer.name: layer for layer in self._layers}

    @property
    def output(self) -> Tensor:
        """X^L of the last recorded forward."""
        if self._output is None:
            raise RuntimeError(
                "FPropagation: no recorded forward; call net(x) first (records are freed by each sweep)"
            )
        return self._output

    def recorded_layers(self) -> list[LayerRecord]:
        """The layers of the last forward; a RuntimeError if there is none."""
        self.output  # noqa: B018 - raises when nothing is recorded
        return self._layers

    def adjoint(self, out_adj: Tensor, *, validate: bool = True, retain_records: bool = False) -> None:
        """Run the F-adjoint sweep from X*^L = ``out_adj`` and accumulate ∂J/∂θ into ``.grad``.

        out_adj: (B, n_L), the output's shape, dtype and device (ALGORITHMS.md §1.2–1.3).
        Equal to ``loss.backward()`` (to rounding), without autograd; see ``optim.fadjoint``.
        """
        from .optim.fadjoint import fadjoint_grads
        from .optim.base import accumulate_grads

        grads = fadjoint_grads(self, out_adj, validate=validate, retain_records=retain_records)
        accumulate_grads(grads)

    def extra_repr(self) -> str:
        return f"hooks={len(self._handles)}, keep_pre_activations={self.keep_pre_activations}"
