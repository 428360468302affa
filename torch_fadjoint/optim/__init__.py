"""Autograd-free optimizers: each runs its learning rule on the recorded F-propagation, then updates.

All share :class:`~torch_fadjoint.optim.base.RuleOptimizer` (the ``torch.optim.Optimizer`` contract).
Each ``*_grads`` / ``*_backward`` function computes the same feedback without updating, for any
torch optimizer.
"""
from .base import RuleOptimizer
from .functional import sgd_update
from .consequentialism import Consequentialism, consequentialism_grads
from .equilibrium import EquilibriumFAdjoint, equilibrium_grads
from .fadjoint import FAdjoint, fadjoint_grads
from .inference import InferenceLearning, inference_grads
from .lfp import LFP, lfp_backward, lfp_grads

__all__ = [
    "RuleOptimizer", "sgd_update",
    "FAdjoint", "fadjoint_grads",
    "EquilibriumFAdjoint", "equilibrium_grads",
    "LFP", "lfp_grads", "lfp_backward",
    "Consequentialism", "consequentialism_grads",
    "InferenceLearning", "inference_grads",
]
