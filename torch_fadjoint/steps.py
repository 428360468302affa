"""The junction entry of ``tfa.nn.Step`` as the tape records it: ``torch.heaviside(y, 0)`` (docs/maths.md §3.4, §7.2).

Added to :data:`torch_fadjoint.junctions.JUNCTIONS` on import (the tape imports it). Step's derivative is 0 almost
everywhere: the F-adjoint refuses to sweep through it (one line, at the sweep, as autograd refuses at
``backward()``), and LFP passes its reward unchanged (``lfp = "identity"``, §3.2). Apart from the tape, its only
user is ``tfa.nn.Step``, which calls ``torch.heaviside`` so that the tape sees it (a comparison would be a constant).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .junctions import FIRST, JUNCTIONS, Junction, argument, entries


class _Heaviside(Junction):
    """``torch.heaviside(y, values)``, ``values`` a constant: σ' = 0 almost everywhere."""

    lfp = "identity"

    def check(self, args, kwargs):
        values = argument(args, kwargs, 1, "values", None)[1]
        if isinstance(values, Tensor) and values.requires_grad:
            raise ValueError(f"{self.name}: values that require grad; expected a constant")

    def record(self, args, kwargs, out):
        self.check(args, kwargs)
        return argument(args, kwargs, 0, FIRST)[0]

    def input_adjoints(self, saved, out_adj):
        raise RuntimeError(f"{self.name} (tfa.nn.Step): derivative is 0 almost everywhere, the F-adjoint cannot train "
                           "through it; use tfa.optim.LFP")


JUNCTIONS.update(entries({"torch.heaviside Tensor.heaviside": _Heaviside}))
