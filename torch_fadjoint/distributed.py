"""Data-parallel training without autograd: per-layer asynchronous gradient averaging (issue 6).

``torch.nn.parallel.DistributedDataParallel`` averages gradients from autograd hooks, so it never sees
the gradients the learning rules write. ``FPropagation(model, process_group=group)`` attaches a
:class:`GradientAverager` instead: the shared backward sweep (``torch_fadjoint.sweep``) hands it each
layer's gradients as soon as they exist (layer L first, as DDP's buckets go), it launches an
asynchronous ``all_reduce`` per layer so communication overlaps the rest of the sweep, and the sweep
waits for all of them before any ``.grad`` is written or any parameter updated. Parameters are broadcast
from the group's first rank at wrap time. Every rule built on the sweep gets this; the sequential
equilibrium rule, which updates each layer during the sweep, waits per layer (no overlap there); with
a finite relaxation its start term f·X^k is not divided by the batch size as the drive is, so that rule
itself depends on how a batch is split (ranks × per-rank batch) — exact only at the equilibrium.
Communication is ``torch.distributed``'s (gloo on CPU, NCCL on CUDA); nothing here is a transport.

    >>> import torch.distributed as dist                      # doctest: +SKIP
    >>> dist.init_process_group("gloo")                       # doctest: +SKIP
    >>> net = tfa.FPropagation(model, process_group=dist.group.WORLD)   # doctest: +SKIP
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["GradientAverager", "broadcast_parameters"]


def broadcast_parameters(module: nn.Module, group=None) -> None:
    """Copy every parameter and buffer of ``module`` from the group's first rank to all ranks."""
    src = dist.get_global_rank(group, 0) if group is not None and group is not dist.group.WORLD else 0
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src, group=group)


class GradientAverager:
    """Averages gradient tensors over a process group, one asynchronous all-reduce per layer."""

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("process_group: torch.distributed is not initialised "
                               "(call torch.distributed.init_process_group first)")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self._pending: list = []

    def launch(self, tensors: list[Tensor]) -> None:
        """Start averaging ``tensors`` in place (they must not be read until :meth:`wait`)."""
        for tensor in tensors:
            tensor.div_(self.world_size)
            self._pending.append(dist.all_reduce(tensor, group=self.group, async_op=True))

    def wait(self) -> None:
        """Block until every launched all-reduce has finished."""
        for work in self._pending:
            work.wait()
        self._pending.clear()
