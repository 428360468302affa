"""Data-parallel training without autograd: per-layer asynchronous gradient averaging (issue 6).

``torch.nn.parallel.DistributedDataParallel`` averages gradients from autograd hooks, so it never sees
the gradients the learning rules write. ``FPropagation(model, process_group=group)`` attaches a
:class:`GradientAverager` instead: the shared backward sweep (``torch_fadjoint.sweep``) hands it each
layer's gradients as soon as they exist (layer L first, as DDP's buckets go), it launches an
asynchronous ``all_reduce`` per layer so communication overlaps the rest of the sweep, and the sweep
waits for all of them before any ``.grad`` is written or any parameter updated (``net.adjoint`` returns
with ``.grad`` already averaged, so any torch optimizer can follow). Parameters and buffers are
broadcast from the group's first rank at wrap time. Communication is ``torch.distributed``'s (gloo on
CPU, NCCL on CUDA); nothing here is a transport.

Every parametric layer's feedback is averaged, convolution and normalisation parameters included (the sweep
hands the reducer whatever ``param_feedback`` returns). BatchNorm in train mode normalises with each rank's
LOCAL batch statistics and updates its running statistics from them, exactly as DDP without
SyncBatchNorm does; the averaged gradient is then the average of the per-rank gradients, which equals one
process with the global batch only when the model has no train-mode BatchNorm.

What "the average over ranks" means per rule (every rule built on the sweep gets it):

* F-adjoint, LFP (clipping applied after the average), equilibrium at the equilibrium: the feedback
  is a batch mean, so R ranks × batch B equal one process with batch R·B (to rounding; a test checks 1e-12).
* ``EquilibriumFAdjoint(sequential=True)`` updates each layer during the sweep, so it waits for that
  layer's all-reduce before its update (``wait_each``): correct, but without overlap. With a finite
  relaxation its start term f·X^k is not divided by the batch size as the drive is, so the rule itself
  depends on how a batch is split (ranks × per-rank batch): exact only at the equilibrium.
* Consequentialism / NLMS: each rank normalises by its own batch (K = X̃X̃ᵀ + δI is per-rank, δ is a
  per-rank statistic, and G is a sum over samples), so the average is the mean of the per-rank
  directions, not the direction of the global batch (a test checks the average itself).
* IL / IL-prox have no backward sweep: their gradients are averaged at once after the inference
  (no overlap); IL-prox's normaliser N is a per-rank batch mean.

Errors: the finite checks made before the sweep (the recorded output, X*^L) are OR-ed over the ranks
(:meth:`GradientAverager.all_ranks`), and the checks after it read averaged values, so a NaN on one
rank makes every rank raise the same error with nothing changed. Argument errors found on one rank
only (a target out of range there) raise on that rank alone; the others then wait in the next
collective until ``torch.distributed``'s timeout, as they would with DDP.

    >>> import torch.distributed as dist                      # doctest: +SKIP
    >>> dist.init_process_group("gloo")                       # doctest: +SKIP
    >>> net = tfa.FPropagation(model, process_group=dist.group.WORLD)   # doctest: +SKIP
    >>> opt = tfa.optim.FAdjoint(net, lr=0.1, momentum=0.9)   # doctest: +SKIP
    >>> net(x_rank); opt.step(t_rank)                         # doctest: +SKIP
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
    """Averages gradient tensors over a process group, one asynchronous all-reduce per tensor.

    ``launch(tensors)`` divides each tensor by the world size in place and starts its SUM all-reduce;
    ``wait()`` blocks until every launched one has finished. The sweep launches layer L's tensors first.
    """

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
        try:
            for work in self._pending:
                work.wait()
        finally:
            self._pending.clear()

    def all_ranks(self, flags: Tensor) -> Tensor:
        """``flags`` (bool) AND-ed over the ranks (one small synchronous all-reduce, MIN of 0/1)."""
        values = flags.to(torch.int32)
        dist.all_reduce(values, op=dist.ReduceOp.MIN, group=self.group)
        return values.bool()
