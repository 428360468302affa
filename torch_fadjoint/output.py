"""The output ``net(x)`` returns: a tensor that notices being changed before the loss (docs/maths.md §7.1, "the
loss and the recorded output").

``net.backward(criterion, target)`` and every optimizer's step start the sweep from the **recorded** output X^L:
the loss is theirs to compute. A user who changes the output after ``net(x)`` returned and expects the loss to
see the change (``out = net(x) / T``, ``F.log_softmax(net(x), 1)``, ``net(x).float()``, ``net(x)[:, :10]``) would
train on a loss they did not write, without a word. So ``net(x)`` returns a :class:`RecordedOutput`: the same
values (an alias of the recorded tensor, sharing its storage and version counter), a ``torch.Tensor`` everywhere,
which notes the first torch call on it that autograd would differentiate — grad enabled, a floating result of at
least one dimension — and the recorder refuses the loss after it, in one line naming that call, before anything
is written. What cannot be mistaken for the loss's input passes: reading it under ``torch.no_grad()`` or
through ``out.detach()`` / ``out.data``, comparisons, ``argmax``, ``max(dim)`` / ``topk`` (values with their
indices), reductions to a scalar (a logged mean), ``x.new_zeros`` / ``zeros_like``-style constants, and a loss
function of ``torch.nn.functional`` applied to it (the user logging the loss ``net.backward`` computes too).

Every result of a call on it is a plain ``torch.Tensor``: only the object ``net(x)`` returned is watched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .tape import _op_name

__all__ = ["RecordedOutput", "watch_output"]

# calls on the output whose result carries no gradient in autograd, or is no stand-in for the output
_READS = frozenset({
    Tensor.detach, torch.detach, Tensor.data.__get__, Tensor.requires_grad_, Tensor.new_zeros, Tensor.new_ones,
    Tensor.new_full, Tensor.new_empty, Tensor.new_tensor, torch.zeros_like, torch.ones_like, torch.empty_like,
    torch.full_like, torch.rand_like, torch.randn_like, torch.randint_like,
})
# torch.nn.functional's losses (the loss modules call them): a loss logged beside net.backward is not a change
_LOSSES = frozenset(getattr(F, name) for name in dir(F) if name.endswith("_loss") or name in (
    "cross_entropy", "binary_cross_entropy", "binary_cross_entropy_with_logits", "kl_div"))


class RecordedOutput(Tensor):
    """The output of a recorded forward: a ``torch.Tensor`` that notes the first change made to it (see the
    module docstring). ``changed_by`` (on the record it shares with the recorder) names that call."""

    _fadjoint_note: list  # the recorder's note: [] until the first change, then [its name]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **(kwargs or {}))
        if (torch.is_grad_enabled() and func not in _READS and func not in _LOSSES
                and isinstance(result, Tensor) and result.dim() >= 1
                and (result.is_floating_point() or result.is_complex())):
            for value in _outputs_in(args, kwargs):
                if not value._fadjoint_note and result is not value:  # in place: the version counter's to refuse
                    value._fadjoint_note.append(_op_name(func))
        return result


def _outputs_in(args: tuple, kwargs) -> list[RecordedOutput]:
    """The watched outputs among a call's arguments (top level and inside lists or tuples)."""
    found = []
    for arg in (*args, *(kwargs or {}).values()):
        if isinstance(arg, RecordedOutput):
            found.append(arg)
        elif isinstance(arg, (list, tuple)):
            found.extend(item for item in arg if isinstance(item, RecordedOutput))
    return found


def watch_output(output: Tensor, note: list) -> RecordedOutput:
    """``output`` as a :class:`RecordedOutput` writing into ``note`` (an alias: same storage, same version)."""
    watched = output.as_subclass(RecordedOutput)
    watched._fadjoint_note = note
    return watched


def unwatched(value):
    """``value`` as a plain tensor when it is a watched output (fed back into a forward), else itself."""
    return value.as_subclass(Tensor) if isinstance(value, RecordedOutput) else value
