"""torch_fadjoint: train PyTorch networks without autograd (docs/maths.md §1–§6).

The flow, top to bottom: the recorder (``FPropagation``) → the tables (``layers``: parametric layers,
``maps``: parameter-free maps, both registered in ``tables``) → the one backward sweep (``sweep``: the F-adjoint) → the rules and
their thin optimizers (``optim``) → a whole step captured or compiled (``graph``).

>>> import torch, torch_fadjoint as tfa
>>> from torch import nn
>>> net = tfa.FPropagation(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
>>> out = net(torch.randn(5, 4))
>>> loss, out_adj = tfa.losses.cross_entropy(out, torch.tensor([0, 1, 2, 0, 1]))
>>> net.adjoint(out_adj)  # fills p.grad as loss.backward() would
"""
from . import data, distributed, graph, layers, losses, maps, nn, optim, sweep, tables
from .graph import compiled_step, graphed_step
from .layers import Layer, LayerRecord, register_layer
from .maps import Derivative, Map, MapRecord, register_derivative, register_map
from .recorder import FPropagation

__version__ = "0.2.0"

__all__ = [
    "FPropagation", "LayerRecord", "MapRecord", "Layer", "Map", "Derivative", "register_layer", "register_map",
    "register_derivative", "graphed_step", "compiled_step", "graph", "data", "distributed", "layers", "losses", "maps", "nn", "optim", "sweep", "tables", "__version__",
]
