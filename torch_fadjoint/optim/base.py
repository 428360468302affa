"""The shared optimizer base and the SGD update every rule applies (ALGORITHMS.md §1.4).

``RuleOptimizer`` is a ``torch.optim.Optimizer`` bound to an :class:`~torch_fadjoint.FPropagation`
recorder: hyper-parameters live in ``param_groups`` (so schedulers, ``state_dict`` and ``zero_grad``
work unchanged), momentum buffers in ``self.state[p]["momentum_buffer"]`` as in ``torch.optim.SGD``.
``step(target)`` computes the loss and X*^L from the recorded output, asks the subclass for the
update, and returns the loss tensor.

The update is torch.optim.SGD's (STYLE P1: a thin class over a functional core)::

    g ← −g if maximize;  g ← g + λ θ
    b ← g (first step) | μ b + (1 − dampening) g;   g ← g + μ b (Nesterov) | b
    θ ← θ − lr g

``sgd_update`` picks ``_single_tensor_sgd`` (a Python loop) or ``_foreach_sgd`` (``torch._foreach_*``
per (device, dtype) group); the two agree, which a test checks.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..losses import LOSSES, get_loss
from ..recorder import FPropagation, LayerRecord
from ..sweep import Rule, backward_sweep

__all__ = ["RuleOptimizer", "DelegatingRuleOptimizer", "sgd_update", "fused_sgd_weight_update", "sweep_grads",
           "accumulate_grads", "check_out_adj", "check_finite", "check_finite_output", "param_names", "BASES"]


# -- the functional SGD core -------------------------------------------------------------------
def sgd_update(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    foreach: bool | None = None,
) -> None:
    """θ ← θ − lr · SGD-direction(g), in place; fills ``momentum_buffers`` on the first step.

    params, grads: matching lists of tensors; momentum_buffers: a list of the same length whose
    ``None`` entries are replaced by new buffers (the caller stores them in the optimizer state).
    Grads are never modified in place.
    """
    if foreach is None:
        foreach = bool(params) and all(p.device.type != "cpu" for p in params)
    impl = _foreach_sgd if foreach else _single_tensor_sgd
    impl(params, grads, momentum_buffers, lr=lr, momentum=momentum, dampening=dampening,
         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)


def _single_tensor_sgd(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay,
                       nesterov, maximize):
    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = momentum_buffers[i] = torch.clone(grad).detach()
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        param.add_(grad, alpha=-lr)


def _group_by_device_dtype(*tensor_lists):
    """Indices grouped by (device, dtype) of the first list: torch's own helper is private."""
    groups = defaultdict(list)
    for i, tensor in enumerate(tensor_lists[0]):
        groups[(tensor.device, tensor.dtype)].append(i)
    return groups.values()


def _foreach_sgd(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay,
                 nesterov, maximize):
    for indices in _group_by_device_dtype(params):
        device_params = [params[i] for i in indices]
        device_grads = [grads[i] for i in indices]
        if maximize:
            device_grads = torch._foreach_neg(device_grads)
        if weight_decay != 0:
            device_grads = torch._foreach_add(device_grads, device_params, alpha=weight_decay)
        if momentum != 0:
            if all(momentum_buffers[i] is not None for i in indices):
                bufs = [momentum_buffers[i] for i in indices]
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, device_grads, alpha=1 - dampening)
            else:
                bufs = []
                for i, grad in zip(indices, device_grads):
                    if momentum_buffers[i] is None:
                        momentum_buffers[i] = torch.clone(grad).detach()
                    else:
                        momentum_buffers[i].mul_(momentum).add_(grad, alpha=1 - dampening)
                    bufs.append(momentum_buffers[i])
            device_grads = torch._foreach_add(device_grads, bufs, alpha=momentum) if nesterov else bufs
        torch._foreach_add_(device_params, device_grads, alpha=-lr)


def fused_sgd_weight_update(
    weights: list[Tensor],
    factors: list[tuple[Tensor, Tensor]],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    maximize: bool = False,
    foreach: bool | None = None,
) -> None:
    """SGD on each W from the factors (Y*, X) of its gradient G = Y*ᵀ X, with G never materialised.

    The GEMM that makes G writes straight into the tensor the update reads (s = −1 if maximize else 1)::

        μ = 0:  W ← (1 − lr λ) W − lr s Y*ᵀX                   one addmm_ into W
        μ > 0:  b ← s Y*ᵀX + λ W  (first step)  |  μ b + (1 − dampening)(s Y*ᵀX + λ W)   addmm_ into b
                W ← W − lr b

    The same update as ``sgd_update`` (no Nesterov) to rounding, not bit for bit: the GEMM rounds
    ``α Y*ᵀX + β C`` once where SGD rounds G, then the update. It saves writing G and reading it back
    (on CPU, 784-1024-1024-10 at batch 128: 0.93× autograd's step, benchmarks/results/speed_target).
    """
    sign = -1.0 if maximize else 1.0
    for i, (weight, (y_adj, x_prev)) in enumerate(zip(weights, factors)):
        if momentum == 0:
            weight.addmm_(y_adj.t(), x_prev, beta=1.0 - lr * weight_decay, alpha=-lr * sign)
        elif momentum_buffers[i] is None:
            momentum_buffers[i] = torch.addmm(weight, y_adj.t(), x_prev, beta=weight_decay, alpha=sign)
        else:
            momentum_buffers[i].addmm_(y_adj.t(), x_prev, beta=momentum, alpha=(1 - dampening) * sign)
            if weight_decay != 0:
                momentum_buffers[i].add_(weight, alpha=(1 - dampening) * weight_decay)
    if momentum != 0:
        sgd_update(weights, momentum_buffers, [None] * len(weights), lr=lr, foreach=foreach)


# -- checks shared by every rule ---------------------------------------------------------------
def check_out_adj(net: FPropagation, out_adj: Tensor) -> None:
    """X*^L must have the recorded output's shape, dtype and device."""
    output = net.output
    if not isinstance(out_adj, Tensor):
        raise ValueError(f"out_adj: expected a tensor, got {type(out_adj).__name__}")
    if out_adj.shape != output.shape or out_adj.dtype != output.dtype or out_adj.device != output.device:
        last = net.layers[-1].name
        raise ValueError(
            f"out_adj: expected shape {tuple(output.shape)}, {output.dtype} on {output.device} "
            f"(the output of {last}), got {tuple(out_adj.shape)}, {out_adj.dtype} on {out_adj.device}"
        )


def check_finite(tensors: list[Tensor], what: str, names=None, reducer=None) -> None:
    """Raise RuntimeError if any tensor holds NaN/Inf (one host sync for the whole list).

    names: where each tensor comes from (a list, or a callable building it, called only on failure),
    e.g. the parameter's qualified name ``"2.weight"``; the error names the first non-finite one.
    reducer: a ``tfa.distributed.GradientAverager``; the flags are then OR-ed over the ranks (one small
    all-reduce) so that every rank raises the same error (a check failing on one rank alone would leave
    the others waiting in the next collective). Gradients already averaged over the ranks need no reducer.

    Fast path: one ``sum`` per tensor (a single read, no temporary; on CPU ~50x cheaper than
    ``isfinite().all()``, which builds two full-size bool tensors). A NaN or ±Inf entry always makes
    the sum non-finite (NaN propagates, Inf + finite = Inf, Inf − Inf = NaN). The converse fails only
    when finite entries overflow the sum, so a non-finite sum triggers the exact elementwise check,
    which decides: no false alarm, and the slow pass runs only on the way to an error (or an overflow).
    With a reducer both passes are agreed over the ranks, so every rank takes the same path.
    """
    if not tensors:
        return
    fast = torch.stack([t.sum().float() for t in tensors]).isfinite()  # mixed dtypes: as float32
    if reducer is not None:
        fast = reducer.all_ranks(fast)
    if bool(fast.all()):
        return
    flags = torch.stack([t.isfinite().all() for t in tensors])
    if reducer is not None:
        flags = reducer.all_ranks(flags)
    if not bool(flags.all()):
        first = int((~flags).nonzero()[0, 0])
        if callable(names):
            names = names()
        where = names[first] if names is not None else f"entry {first}"
        raise RuntimeError(f"{what}: non-finite values in {where}; nothing was changed")


def param_names(net: FPropagation, params) -> list[str]:
    """The qualified names (``"2.weight"``) of ``params`` in the wrapped model, for error messages."""
    names = {id(p): n for n, p in net.model.named_parameters()}
    return [names.get(id(p), "an unnamed parameter") for p in params]


def check_finite_output(net: FPropagation, signal: Tensor, what: str = "out_adj", reducer=None) -> None:
    """The recorded X^L and the top signal (X*^L, or LFP's reward R^L) must be finite (one host sync)."""
    last = f"{net.layers[-1].name} (Linear)"
    check_finite([net.output, signal], "step", reducer=reducer, names=lambda: [
        f"X^L, the recorded output of {last} (NaN/Inf in the input or the weights?)",
        f"{what} (the signal at the output of {last})"])


def check_trainable(layers: list[LayerRecord], rule_name: str) -> None:
    """Refuse modules whose derivative is 0 almost everywhere (tfa.nn.Step) before any sweep."""
    for layer in layers:
        for act in layer.activations:
            if not act.derivative.differentiable:
                raise TypeError(
                    f"{act.name} ({type(act.module).__name__}): derivative is 0 almost everywhere, "
                    f"{rule_name} cannot train through it; use tfa.optim.LFP"
                )


def sweep_grads(net: FPropagation, layers: list[LayerRecord], signal: Tensor, rule: Rule, *, what: str,
                validate: bool = True, retain_records: bool = False) -> dict[Tensor, Tensor]:
    """Run ``rule`` down the shared sweep and collect {parameter: feedback} (averaged over ranks when the
    recorder has a process group); frees the records unless ``retain_records``; with ``validate`` a
    non-finite result raises RuntimeError naming ``what``. Nothing is written."""
    grads: dict[Tensor, Tensor] = {}

    def collect(layer, grad_w, grad_b):
        grads[layer.module.weight] = grad_w
        if grad_b is not None:
            grads[layer.module.bias] = grad_b

    backward_sweep(layers, signal, rule, collect, release=not retain_records, reducer=net.reducer)
    if not retain_records:
        net.clear()
    if validate:  # after the average: every rank sees the same values and raises alike
        check_finite(list(grads.values()), what, names=lambda: param_names(net, grads))
    return grads


def accumulate_grads(grads: dict[Tensor, Tensor]) -> None:
    """p.grad += g (or p.grad = g when None), as ``loss.backward()`` accumulates."""
    for param, grad in grads.items():
        if param.grad is None:
            param.grad = grad
        else:
            param.grad.add_(grad)


# -- the optimizer base ------------------------------------------------------------------------
class RuleOptimizer(Optimizer):
    """Base of every ``tfa.optim`` optimizer: an Optimizer bound to an ``FPropagation`` recorder.

    Subclasses implement ``_rule_step(out_adj)``; ``step`` does the rest (loss, checks, grad mode).

    Args:
        net: the ``FPropagation`` wrapping the model.
        params: parameters or parameter groups (default: ``net.parameters()``).
        defaults: the hyper-parameters of every group.
        loss: ``"cross_entropy"``, ``"nll"``, ``"mse"`` or a callable ``(output, target) -> (loss, out_adj)``.
        loss_kwargs: extra arguments for the loss (e.g. ``{"label_smoothing": 0.1}``).
        validate: check targets and refuse a non-finite update before any parameter is written
            (one host sync per step); pass False to capture the step in a CUDA graph.
    """

    def __init__(self, net: FPropagation, params, defaults: dict, loss="cross_entropy",
                 loss_kwargs: dict | None = None, validate: bool = True):
        if not isinstance(net, FPropagation):
            raise TypeError(f"expected an FPropagation (tfa.FPropagation(model)), got {type(net).__name__}")
        if not 0.0 <= defaults.get("lr", 0.0):
            raise ValueError(f"Invalid learning rate: {defaults['lr']}")
        self.net = net
        self.loss = loss
        self._loss_fn = get_loss(loss)
        self.loss_kwargs = dict(loss_kwargs or {})
        self.validate = validate
        super().__init__(net.parameters() if params is None else params, defaults)

    def _loss_and_adjoint(self, target, out_adj) -> tuple[Tensor | None, Tensor]:
        output = self.net.output
        if out_adj is None:
            if target is None:
                raise ValueError("step() needs a target (or a precomputed out_adj=)")
            kwargs = dict(self.loss_kwargs)
            if self._loss_fn in LOSSES.values():
                kwargs["validate"] = self.validate
            loss, out_adj = self._loss_fn(output, target, **kwargs)
        else:
            loss = None
        check_out_adj(self.net, out_adj)
        if self.validate:
            check_finite_output(self.net, out_adj, reducer=self.net.reducer)
        return loss, out_adj

    @torch.no_grad()
    def step(self, target: Tensor | None = None, closure=None, *, out_adj: Tensor | None = None):
        """One training step from the last recorded forward; returns the loss tensor (None with ``out_adj``).

        target: the loss's target (e.g. (B,) class indices); or pass ``out_adj`` = X*^L directly.
        closure: optional callable that runs the forward (``lambda: net(x)``) before the step.
        """
        if closure is not None:
            closure()
        loss, out_adj = self._loss_and_adjoint(target, out_adj)
        self._rule_step(out_adj)
        return loss

    def _rule_step(self, out_adj: Tensor) -> None:
        raise NotImplementedError

    # -- helpers for subclasses ------------------------------------------------------------------
    def _apply_sgd(self, grads: dict[Tensor, Tensor], params_subset=None) -> None:
        """Write ``grads`` to ``.grad`` and apply each group's SGD update to the params that have one."""
        for group in self.param_groups:
            params, group_grads, bufs = [], [], []
            for param in group["params"]:
                if param not in grads or (params_subset is not None and param not in params_subset):
                    continue
                param.grad = grads[param]
                params.append(param)
                group_grads.append(grads[param])
                bufs.append(self.state.get(param, {}).get("momentum_buffer"))
            if not params:
                continue
            sgd_update(params, group_grads, bufs, lr=group["lr"], momentum=group["momentum"],
                       dampening=group["dampening"], weight_decay=group["weight_decay"],
                       nesterov=group["nesterov"], maximize=group["maximize"], foreach=group["foreach"])
            if group["momentum"] != 0:
                for param, buf in zip(params, bufs):
                    self.state[param]["momentum_buffer"] = buf

    @staticmethod
    def _sgd_defaults(lr, momentum, dampening, weight_decay, nesterov, maximize, foreach) -> dict:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        return dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                    nesterov=nesterov, maximize=maximize, foreach=foreach)


BASES: dict[str, type[Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
}


class DelegatingRuleOptimizer(RuleOptimizer):
    """A rule whose update is any ``torch.optim`` optimizer's (``base``), fed the rule's ``.grad``.

    The base optimizer (``self.inner``) shares this optimizer's ``param_groups`` list and ``state``
    dict, so schedulers and ``add_param_group`` change the lr it uses, and ``state_dict()`` /
    ``load_state_dict()`` carry its buffers (momentum, Adam moments). Subclasses compute
    ``{param: grad}`` and call ``_apply_base(grads)``.

    base: "sgd" | "adam" | "adamw" | "rmsprop" | an ``Optimizer`` class; ``base_kwargs`` go to it.
    """

    def __init__(self, net: FPropagation, params, lr: float, base, base_kwargs: dict, loss="cross_entropy",
                 loss_kwargs: dict | None = None, validate: bool = True):
        if isinstance(base, str) and base.lower() in BASES:
            base_cls = BASES[base.lower()]
        elif isinstance(base, type) and issubclass(base, Optimizer):
            base_cls = base
        else:
            raise ValueError(f"base must be one of {sorted(BASES)} or an Optimizer class, got {base!r}")
        if not isinstance(net, FPropagation):
            raise TypeError(f"expected an FPropagation (tfa.FPropagation(model)), got {type(net).__name__}")
        params = list(net.parameters() if params is None else params)
        self.inner = base_cls(params, lr=lr, **base_kwargs)  # validates its own hyper-parameters
        # the inner optimizer's groups (dicts with all of its keys) become ours, then both share them
        super().__init__(net, self.inner.param_groups, dict(self.inner.defaults), loss=loss,
                         loss_kwargs=loss_kwargs, validate=validate)
        self._link_inner()

    def _link_inner(self) -> None:
        self.inner.param_groups = self.param_groups
        self.inner.state = self.state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # load_state_dict replaces param_groups and state: re-share them
        if "inner" in self.__dict__:
            self._link_inner()

    def _apply_base(self, grads: dict[Tensor, Tensor]) -> None:
        """Write ``grads`` into ``.grad`` of this optimizer's parameters, then step the base optimizer."""
        for group in self.param_groups:
            for param in group["params"]:
                if param in grads:
                    param.grad = grads[param]
        self.inner.step()
