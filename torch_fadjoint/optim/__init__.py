"""Autograd-free optimizers: each runs its learning rule on the recorded F-propagation, then updates.

All share :class:`~torch_fadjoint.optim.base.RuleOptimizer` (the ``torch.optim.Optimizer`` contract).
"""
from .base import RuleOptimizer, sgd_update
from .fadjoint import FAdjoint, fadjoint_grads

__all__ = ["RuleOptimizer", "sgd_update", "FAdjoint", "fadjoint_grads"]
