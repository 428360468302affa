"""torch_fadjoint: train feed-forward networks without autograd (see ALGORITHMS.md §1–§5).

>>> import torch, torch_fadjoint as tfa
>>> from torch import nn
>>> net = tfa.FPropagation(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
>>> out = net(torch.randn(5, 4))
>>> loss, out_adj = tfa.losses.cross_entropy(out, torch.tensor([0, 1, 2, 0, 1]))
>>> net.adjoint(out_adj)  # fills p.grad as loss.backward() would
"""
from . import derivatives, distributed, losses, nn, optim
from .derivatives import Derivative, register_derivative
from .recorder import ActivationRecord, FPropagation, LayerRecord

__version__ = "0.1.0"

__all__ = [
    "FPropagation", "LayerRecord", "ActivationRecord", "Derivative", "register_derivative",
    "derivatives", "losses", "nn", "optim", "__version__",
]
