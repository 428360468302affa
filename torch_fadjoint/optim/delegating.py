"""Rules whose update is any ``torch.optim`` optimizer's: the rule's feedback goes into ``.grad`` and the
base optimizer steps (docs/maths.md §4, §5: consequentialism / NLMS and inference learning use it).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..recorder import FPropagation
from ..sweep import param_names
from .base import _SHAPED_STATE, RuleOptimizer, check_hyper

__all__ = ["DelegatingRuleOptimizer", "BASES"]


BASES: dict[str, type[Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
}
_BASE_STATE_KEYS = {
    torch.optim.SGD: {"momentum_buffer"},
    torch.optim.Adam: {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
    torch.optim.AdamW: {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
    torch.optim.RMSprop: {"step", "square_avg", "momentum_buffer", "grad_avg"},
}


class DelegatingRuleOptimizer(RuleOptimizer):
    """A rule whose update is any ``torch.optim`` optimizer's (``base``), fed the rule's ``.grad``.

    The base optimizer (``self.inner``) shares this optimizer's ``param_groups`` and ``state``, so
    schedulers and ``add_param_group`` change the lr it uses and ``state_dict()`` carries its buffers.
    Only the parameters this forward used are stepped: the others' ``.grad`` is hidden during the step
    (a stale ``.grad`` from an earlier step never moves a parameter). With ``validate`` the new values
    and state are checked after the base step and the old ones restored if any is not finite.

    base: "sgd" | "adam" | "adamw" | "rmsprop" | an ``Optimizer`` class; ``base_kwargs`` go to it.
    """

    capture_refusal = ("its update is the base torch optimizer's own step, which reads its learning rate as a "
                       "host number (a graph would freeze it) and keeps Python-side state; graphed_step captures "
                       "FAdjoint, EquilibriumFAdjoint and LFP")

    def __init__(self, net: FPropagation, params, lr: float, base, base_kwargs: dict, loss="cross_entropy",
                 loss_kwargs: dict | None = None, validate=None, rule_defaults: dict | None = None):
        if isinstance(base, str) and base.lower() in BASES:
            base_cls = BASES[base.lower()]
        elif isinstance(base, type) and issubclass(base, Optimizer):
            base_cls = base
        else:
            raise ValueError(f"base must be one of {sorted(BASES)} or an Optimizer class, got {base!r}")
        if not isinstance(net, FPropagation):
            raise TypeError(f"expected an FPropagation (tfa.FPropagation(model)), got {type(net).__name__}")
        lr = check_hyper("lr", lr)
        params = list(net.parameters() if params is None else params)
        self.inner = base_cls(params, lr=lr, **base_kwargs)  # validates its own hyper-parameters
        for group in self.inner.param_groups:
            for key, value in (rule_defaults or {}).items():
                group.setdefault(key, value)
        self.state_keys = frozenset(_BASE_STATE_KEYS.get(base_cls, set()) or {"*"})
        super().__init__(net, self.inner.param_groups, {**self.inner.defaults, **(rule_defaults or {})}, loss=loss,
                         loss_kwargs=loss_kwargs, validate=validate)
        self._link_inner()

    def _ranges(self) -> dict:
        return {"lr": (0.0, math.inf)}

    def _link_inner(self) -> None:
        self.inner.param_groups = self.param_groups
        self.inner.state = self.state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "inner" in self.__dict__:
            self._link_inner()

    def load_state_dict(self, state_dict: dict) -> None:
        if "*" in self.state_keys:  # an Optimizer class we know nothing about: torch's own checks only
            Optimizer.load_state_dict(self, state_dict)
        else:
            super().load_state_dict(state_dict)

    def _apply_base(self, grads: dict[Tensor, Tensor]) -> None:
        """Step the base optimizer on exactly the parameters in ``grads``, all or nothing: validate=True checks
        the signal first (one sync), then the new values and state after the base step (a second sync) and
        restores the old ones if any is not finite; async masks nothing (the base step is torch's) but keeps
        the old values and restores them on the device where a flag failed."""
        guard = self.guard
        guard.commit()
        mine = [p for group in self.param_groups for p in group["params"]]
        used = [p for p in mine if p in grads]
        hidden = {p: p.grad for p in mine if p not in grads and p.grad is not None}
        fresh = [p for p in used if not self.state.get(p)]
        self._check_state(used)
        old_grads = [p.grad for p in used]
        guard.protect(used + [v for p in used for v in self.state.get(p, {}).values() if isinstance(v, Tensor)])
        if guard.mode == "async":
            guard.undo.append(self._undo_of_base(used, fresh))
        saved = None
        if guard.checks_on_host:
            saved = [(p, p.clone(), p.grad, {k: v.clone() if isinstance(v, Tensor) else v
                                             for k, v in self.state.get(p, {}).items()}, p in self.state)
                     for p in used]
        try:
            for p in hidden:
                p.grad = None
            for p in used:
                p.grad = grads[p]
            self.inner.step()
            guard.protect_new([v for p in fresh for v in self.state.get(p, {}).values() if isinstance(v, Tensor)])
            new = used + [v for p in used for v in self.state.get(p, {}).values()
                          if isinstance(v, Tensor) and v.is_floating_point()]
            guard.require_finite(new, f"{type(self).__name__} step", names=lambda: [
                f"the new value of {n}" for n in param_names(self.net, used)] + ["the optimizer state"] * len(new))
            guard.commit()
        except BaseException:
            if guard.mode == "async":  # the values kept for the device-side restore go back now
                guard.restore_protected()
                for p, grad in zip(used, old_grads):
                    p.grad = grad
                for p in fresh:
                    self.state.pop(p, None)
            for p, value, grad, state, had in saved or []:
                p.copy_(value)
                p.grad = grad
                if had:
                    self.state[p] = state
                else:
                    self.state.pop(p, None)
            raise
        finally:
            for p, grad in hidden.items():
                p.grad = grad

    def _check_state(self, params: list[Tensor]) -> None:
        """Every per-entry state tensor has its parameter's shape, dtype and device (checked before the base step,
        which would otherwise fail half-way, after stepping the groups before)."""
        names = None
        for i, param in enumerate(params):
            for key, value in self.state.get(param, {}).items():
                if key in _SHAPED_STATE and not (isinstance(value, Tensor) and value.shape == param.shape
                                                 and value.dtype == param.dtype and value.device == param.device):
                    names = names or param_names(self.net, params)
                    found = (f"a tensor of shape {tuple(value.shape)}, {value.dtype} on {value.device}"
                             if isinstance(value, Tensor) else f"a {type(value).__name__}")
                    raise ValueError(f"{type(self).__name__}.step: the {key} of {names[i]} is {found}, expected a "
                                     f"tensor of shape {tuple(param.shape)}, {param.dtype} on {param.device} (a loaded "
                                     "or edited optimizer state?); nothing was changed")

    def _undo_of_base(self, used: list[Tensor], fresh: list[Tensor]):
        """A refused async step: put back the ``.grad`` it set and remove the state its base step created."""
        grads = [(p, p.grad) for p in used]
        written: dict = {}  # what the step left (see RuleOptimizer._undo_of)

        def undo() -> None:
            for param, grad in grads:
                if param.grad is written.get(("grad", param)):
                    param.grad = grad
            for param in fresh:
                if param in self.state and self.state[param] is written.get(("state", param)):
                    del self.state[param]

        def note() -> None:
            for param, _ in grads:
                written[("grad", param)] = param.grad
            for param in fresh:
                written[("state", param)] = self.state.get(param)
        undo.note = note
        return undo
