"""Losses with their closed-form output adjoints X*^L = ∂J/∂X^L (docs/maths.md §1.3).

Each function returns ``(loss, out_adj)``: the loss exactly as ``torch.nn.functional`` computes it
(same ``reduction`` semantics) and its gradient with respect to the model output, without autograd.

    cross-entropy on logits:   X*^L = (softmax(X^L) − q) / B,   q = (1 − ε) onehot(t) + ε / C
    NLL on log-probabilities:  X*^L = −onehot(t) / B
    MSE:                       X*^L = 2 (X^L − T) / (B · n_L)

(``reduction="sum"`` drops the division by B, resp. B · n_L.)

torch's loss modules ``nn.CrossEntropyLoss``, ``nn.NLLLoss`` and ``nn.MSELoss`` map to the same closed forms
with their own settings (:class:`ModuleLoss`, read from the module at each call); what a closed form cannot
honour (class ``weight``, ``ignore_index`` ≠ −100, ``reduction="none"``, a subclass, hooks) is refused.

``validate=True`` checks the target's dtype, shape and class range; the range check reads one value
back from the device (a host sync). ``validate="no_sync"`` checks the same without reading anything back:
the class range by one ``gather`` on CPU (torch's CPU kernels refuse an index outside [0, C)), not at all on
CUDA (the caller clamps and flags it, as the optimizers do). ``validate=False`` checks nothing (inside a
captured CUDA graph).
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["cross_entropy", "nll", "mse", "get_loss", "ModuleLoss", "LOSSES", "TORCH_LOSSES", "MODULE_LOSSES",
           "loss_identity", "called_loss_identity"]

_REDUCTIONS = ("mean", "sum")


def _check_logits(x_out: Tensor, target: Tensor, what: str, validate: bool) -> None:
    if x_out.dim() != 2:
        raise ValueError(f"{what}: expected a (batch, classes) output, got shape {tuple(x_out.shape)}")
    if not validate:
        return
    if target.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16, torch.int8):
        raise ValueError(f"{what}: expected integer class targets, got dtype {target.dtype}")
    if target.shape != x_out.shape[:1]:
        raise ValueError(
            f"{what}: expected targets of shape ({x_out.shape[0]},), got {tuple(target.shape)}"
        )
    if target.device != x_out.device:
        raise ValueError(f"{what}: targets on {target.device}, output on {x_out.device}")
    n_classes = x_out.shape[1]
    if validate == "no_sync":  # torch's CPU kernels refuse an index outside [0, C): one gather, nothing read back
        if not x_out.is_cuda and target.numel():
            try:
                x_out.gather(1, target.long()[:, None])
            except (IndexError, RuntimeError):
                raise ValueError(f"{what}: targets must lie in [0, {n_classes - 1}]") from None
        return
    if target.numel() and bool(((target < 0) | (target >= n_classes)).any()):
        raise ValueError(f"{what}: targets must lie in [0, {n_classes - 1}]")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def onehot(target: Tensor, n_classes: int, dtype: torch.dtype) -> Tensor:
    """(B, C) one-hot rows of ``dtype`` by a scatter: ``F.one_hot`` reads the targets' range back to the host
    (two syncs), which a step with ``validate=False`` must not do."""
    return torch.zeros((target.shape[0], n_classes), dtype=dtype, device=target.device).scatter_(
        1, target.long()[:, None], 1.0)


def cross_entropy(
    x_out: Tensor,
    target: Tensor,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy on logits and X*^L (docs/maths.md §1.3).

    x_out: (B, C) logits X^L; target: (B,) integer classes. Returns (loss: scalar, out_adj: (B, C)).
        X*^L = (softmax(X^L) − q) / B,  q = (1 − ε) onehot(t) + ε / C
    >>> loss, out_adj = cross_entropy(torch.zeros(2, 3), torch.tensor([0, 2]))
    >>> out_adj.shape
    torch.Size([2, 3])
    """
    x_out = x_out.detach()  # read, not changed: no graph, and net(x)'s watched output stays unnoted (tfa.output)
    _check_reduction(reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    _check_logits(x_out, target, "cross_entropy", validate)
    target = target.long()
    batch, n_classes = x_out.shape
    log_probs = torch.log_softmax(x_out, dim=1)
    # ∂J/∂log_probs = −q/B, then through log_softmax: g − softmax · Σ g. These are autograd's own kernels
    # (nll_loss_backward, _log_softmax_backward_data) on the constants it derives from J = (1 − ε) nll + (ε/C) ·
    # mean(−Σ_c log_probs), in its order: loss.backward()'s bits, with or without smoothing.
    log_probs_adj = _nll_adjoint(log_probs, target, reduction, 1.0 - label_smoothing)
    if label_smoothing:
        smooth = log_probs.new_full((), label_smoothing / n_classes)
        if reduction == "mean":  # by a tensor, as autograd does: CUDA divides by a host scalar as x · (1/B)
            smooth = smooth / log_probs.new_full((), float(batch))
        log_probs_adj = log_probs_adj - smooth
    out_adj = torch.ops.aten._log_softmax_backward_data(log_probs_adj, log_probs, 1, log_probs.dtype)
    if label_smoothing:
        loss = F.cross_entropy(x_out, target, label_smoothing=label_smoothing, reduction=reduction)
    else:
        loss = F.nll_loss(log_probs, target, reduction=reduction)
    return loss, out_adj


def nll(x_out: Tensor, target: Tensor, reduction: str = "mean", validate: bool = True) -> tuple[Tensor, Tensor]:
    """Negative log-likelihood on log-probabilities (after ``nn.LogSoftmax``), docs/maths.md §1.3.

    x_out: (B, C) log-probabilities; target: (B,). Returns (loss, out_adj (B, C)).
        X*^L = −onehot(t) / B
    >>> nll(torch.log_softmax(torch.zeros(2, 3), 1), torch.tensor([0, 2]))[1][0]
    tensor([-0.5000,  0.0000,  0.0000])
    """
    x_out = x_out.detach()  # read, not changed: no graph, and net(x)'s watched output stays unnoted (tfa.output)
    _check_reduction(reduction)
    _check_logits(x_out, target, "nll", validate)
    target = target.long()
    loss = F.nll_loss(x_out, target, reduction=reduction)
    return loss, _nll_adjoint(x_out, target, reduction)


def _nll_adjoint(log_probs: Tensor, target: Tensor, reduction: str, grad: float = 1.0) -> Tensor:
    """−grad · onehot(t) / B (or −grad · onehot(t)) with autograd's own kernel, so the bits are loss.backward()'s."""
    return torch.ops.aten.nll_loss_backward(log_probs.new_full((), grad), log_probs, target, None,
                                            1 if reduction == "mean" else 2, -100,
                                            log_probs.new_full((), float(log_probs.shape[0])))  # a fill: no host copy


def needs_gradient(value) -> bool:
    """Whether ``value`` is a tensor computed from a net's returned output that needs a gradient as autograd has it
    (watched by ``tfa.output``: ``_fadjoint_needs``), or a plain view of one (made before it was written)."""
    for tensor in (value, getattr(value, "_base", None)):
        if type(tensor) is not Tensor and isinstance(tensor, Tensor) and getattr(tensor, "_fadjoint_needs", False):
            return True
    return False


def mse(x_out: Tensor, target: Tensor, reduction: str = "mean", validate: bool = True) -> tuple[Tensor, Tensor]:
    """Mean squared error and X*^L (docs/maths.md §1.3).

    x_out: (B, n_L); target: a float tensor of x_out's shape, or (B,) integer classes (T = onehot(t)).
        X*^L = 2 (X^L − T) / (B · n_L)
    >>> mse(torch.ones(2, 2), torch.zeros(2, 2))[1]
    tensor([[0.5000, 0.5000],
            [0.5000, 0.5000]])
    """
    x_out = x_out.detach()  # read, not changed: no graph, and net(x)'s watched output stays unnoted (tfa.output)
    _check_reduction(reduction)
    if needs_gradient(target):  # as tfa.output's refuse_fed_target
        raise ValueError("mse: the target is computed from the output of a recorded forward with trainable parameters "
                         "upstream: autograd would differentiate the loss through it too, the sweep takes it as a "
                         "constant; pass it detached (.detach()) to mean a constant")
    if not target.is_floating_point():
        _check_logits(x_out, target, "mse", validate)
        target = onehot(target, x_out.shape[1], x_out.dtype)
    elif validate and (target.shape != x_out.shape or target.dtype != x_out.dtype or target.device != x_out.device):
        raise ValueError(
            f"mse: expected a target of shape {tuple(x_out.shape)}, dtype {x_out.dtype} on {x_out.device}, "
            f"got {tuple(target.shape)}, {target.dtype} on {target.device}"
        )
    loss = F.mse_loss(x_out, target, reduction=reduction)
    out_adj = torch.ops.aten.mse_loss_backward(x_out.new_ones(()), x_out, target, 1 if reduction == "mean" else 2)
    return loss, out_adj  # autograd's own kernel: loss.backward()'s bits


LOSSES: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "cross_entropy": cross_entropy,
    "nll": nll,
    "mse": mse,
}


# torch's functionals → the closed forms of the same losses (same reduction semantics)
TORCH_LOSSES: dict = {F.cross_entropy: cross_entropy, F.nll_loss: nll, F.mse_loss: mse}


# torch's loss modules (this exact type) → the closed form of the same loss (ModuleLoss passes it their settings)
MODULE_LOSSES: dict = {nn.CrossEntropyLoss: cross_entropy, nn.NLLLoss: nll, nn.MSELoss: mse}
_SUPPORTED_MODULES = ("nn.CrossEntropyLoss, nn.NLLLoss, nn.MSELoss (reduction 'mean' or 'sum', label_smoothing; "
                      "weight=None, ignore_index=-100)")


class ModuleLoss:
    """One of torch's loss modules (``nn.CrossEntropyLoss``, ``nn.NLLLoss``, ``nn.MSELoss``) as its closed form.
    Any other loss module, a subclass of these included, is refused (TypeError naming it).

    ``ModuleLoss(criterion)(output, target, validate=True) -> (loss, out_adj)``: the closed form of
    ``criterion``'s loss called with ``criterion``'s settings (``reduction``; ``label_smoothing`` for
    cross-entropy), read from the module at each call, as ``criterion(output, target)`` reads them: a setting
    changed between steps applies, one that became unsupported is refused (ValueError, nothing computed). The
    module is the only source of its settings: no keyword other than ``validate`` is taken.
    >>> loss, out_adj = ModuleLoss(nn.CrossEntropyLoss(label_smoothing=0.1))(torch.zeros(2, 3), torch.tensor([0, 2]))
    """

    def __init__(self, module: nn.Module):
        kind = type(module)
        if kind not in MODULE_LOSSES:
            name = f"nn.{kind.__name__}" if kind.__module__.startswith("torch.nn") else kind.__name__
            parent = next((base for base in MODULE_LOSSES if isinstance(module, base)), None)
            if parent is not None:  # exact types only: a subclass's forward may compute another loss
                raise TypeError(f"loss: {name}, a subclass of nn.{parent.__name__}, is not supported (its forward "
                                f"may differ); pass nn.{parent.__name__} itself or a callable returning (loss, out_adj)")
            raise TypeError(f"loss: {name} has no closed-form output adjoint here; supported modules: "
                            f"{_SUPPORTED_MODULES}")
        self.module, self.kind = module, kind
        self.closed_form = MODULE_LOSSES[kind]
        self.__name__ = f"nn.{kind.__name__}"
        self.settings()  # refuses now (get_loss, an optimizer's construction) what the closed form cannot honour

    # what inspect.signature reports (an optimizer's loss_kwargs are checked against it): no settings
    __signature__ = inspect.Signature([
        inspect.Parameter("output", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("target", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("validate", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=True)])

    def settings(self) -> dict:
        """The closed form's keyword arguments from the module's settings now; ValueError for one it cannot honour."""
        module, name = self.module, self.__name__
        if type(module) is not self.kind or "forward" in module.__dict__:  # what it computes is not the closed form's
            change = (f"its class was swapped for {type(module).__name__}" if type(module) is not self.kind
                      else "its forward is replaced on the instance")
            raise ValueError(f"loss: {name}, {change}, is not supported (the closed form would train another loss); "
                             "pass a callable returning (loss, out_adj)")
        if module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks or module._backward_hooks:
            raise ValueError(f"loss: {name} with hooks is not supported (they would not run); remove them or pass a "
                             "callable returning (loss, out_adj)")
        reduction = module.reduction
        if reduction not in _REDUCTIONS:
            why = " (no scalar loss)" if reduction == "none" else ""
            raise ValueError(f"loss: {name} with reduction={reduction!r} is not supported{why}; use 'mean' or 'sum'")
        kwargs = {"reduction": reduction}
        if isinstance(module, nn.modules.loss._WeightedLoss) and module.weight is not None:
            raise ValueError(f"loss: {name} with a class weight is not supported (no closed form here); use weight=None")
        if hasattr(module, "ignore_index") and module.ignore_index != -100:
            raise ValueError(f"loss: {name} with ignore_index={module.ignore_index!r} is not supported; use torch's "
                             "default -100 (a target equal to it is refused, not ignored)")
        if hasattr(module, "label_smoothing"):
            smoothing = module.label_smoothing
            if not (isinstance(smoothing, (int, float)) and 0.0 <= smoothing <= 1.0):
                raise ValueError(f"loss: {name} with label_smoothing={smoothing!r} is not supported; it must lie in "
                                 "[0, 1]")
            kwargs["label_smoothing"] = float(smoothing)
        return kwargs

    def __call__(self, output: Tensor, target: Tensor, validate=True, **settings) -> tuple[Tensor, Tensor]:
        if settings:
            raise TypeError(f"loss: {self.__name__} takes its settings from the module, not as arguments "
                            f"{sorted(settings)}; set them on the module (criterion.reduction = 'sum')")
        return self.closed_form(output, target, validate=validate, **self.settings())

    def __repr__(self) -> str:
        return f"ModuleLoss({self.module!r})"


def get_loss(loss) -> Callable[..., tuple[Tensor, Tensor]]:
    """A loss by name (``"cross_entropy"``, ``"nll"``, ``"mse"``), torch's functional of one of them
    (``F.nll_loss`` → :func:`nll`), an instance of ``nn.CrossEntropyLoss``, ``nn.NLLLoss`` or ``nn.MSELoss``
    (→ a :class:`ModuleLoss` with its settings), or a callable returning ``(loss, out_adj)``."""
    if isinstance(loss, nn.modules.loss._Loss):  # any loss module: ours by exact type, the others refused
        return ModuleLoss(loss)
    if loss in TORCH_LOSSES:
        return TORCH_LOSSES[loss]
    if callable(loss) and getattr(loss, "__module__", None) == F.__name__:
        raise TypeError(f"loss: torch's {loss.__name__} has no closed-form output adjoint here; expected one of "
                        f"{sorted(f.__name__ for f in TORCH_LOSSES)}, {sorted(LOSSES)} or a callable returning "
                        "(loss, out_adj)")
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)} or a callable, got {loss!r}")
    return LOSSES[loss]


# -- which loss is which (torch_fadjoint.output: a loss the user logs must be the one trained) ----------------
_SETTINGS = {cross_entropy: {"reduction": "mean", "label_smoothing": 0.0}, nll: {"reduction": "mean"},
             mse: {"reduction": "mean"}}


def _identity(form, settings: dict) -> tuple:
    merged = {**_SETTINGS[form], **{key: value for key, value in settings.items() if key in _SETTINGS[form]}}
    return form, tuple(sorted((key, float(value) if key == "label_smoothing" else value)
                              for key, value in merged.items()))


def loss_identity(loss_fn, loss_kwargs: dict | None = None) -> tuple | None:
    """(closed form, its settings) of a loss as :func:`get_loss` returned it, with ``loss_kwargs``; None for a
    callable of the user's (no closed form of ours to compare with)."""
    if isinstance(loss_fn, ModuleLoss):
        return _identity(loss_fn.closed_form, loss_fn.settings())
    if loss_fn in _SETTINGS:
        return _identity(loss_fn, dict(loss_kwargs or {}))
    return None


_SIGNATURES: dict = {}  # torch's functional losses (the keys of TORCH_LOSSES) → their inspect.Signature


def called_loss_identity(func, args: tuple, kwargs: dict) -> tuple | None:
    """(closed form, settings) of torch's functional loss called as ``func(*args, **kwargs)`` (a loss module
    calls it with its own settings); None for a loss with no closed form here (another loss, a class weight,
    ``ignore_index``, the deprecated ``size_average`` / ``reduce``)."""
    form = TORCH_LOSSES.get(func)
    if form is None:
        return None
    signature = _SIGNATURES.get(func)
    if signature is None:  # once per function: a loss logged at every step would build it every time
        signature = _SIGNATURES[func] = inspect.signature(func)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    given = bound.arguments
    if (given.get("weight") is not None or given.get("ignore_index", -100) != -100
            or given.get("size_average") is not None or given.get("reduce") is not None):
        return None
    return _identity(form, given)


def describe_identity(identity: tuple | None) -> str:
    """``cross_entropy(label_smoothing=0.0, reduction='mean')``, or what a loss without one is."""
    if identity is None:
        return "a loss with no closed form here"
    form, settings = identity
    return f"{form.__name__}({', '.join(f'{key}={value!r}' for key, value in settings)})"
