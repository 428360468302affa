"""The F-adjoint swept back over a recorded tape (docs/maths.md §7.1, §1.2), and the rule interface the other
signals use (LFP's reward §7.2, consequentialism §7.3, the equilibrium §7.4).

The tape (:mod:`torch_fadjoint.tape`) holds the forward's ops in order, each with its junction entry and what
the entry saved; this module walks them backwards::

    adj[output] = X*^L
    for op in reversed(ops):                 an op none of whose outputs received an adjoint is skipped, and so
                                             is one with no trainable parameter upstream
        for each input: J_inputᵀ adj[op's outputs]  →  summed into adj[value] (fan-out) or the parameter's feedback

A value's second signal is added into its first in place when the first is its own (as autograd's input buffer
does), so a residual junction allocates no third tensor; ``release`` drops each op's records once swept (the
peak is then autograd's). Every saved tensor is checked against the version it was saved at first
(:func:`check_versions`): one overwritten in place after the forward is refused, as autograd refuses it.
"""
from __future__ import annotations

import weakref

from torch import Tensor

from .tape import Tape, _Op, _tensors_in

__all__ = ["TapeRule", "FADJOINT", "sweep_tape", "tape_grads", "check_versions"]

def check_versions(tape: Tape) -> None:
    """Every tensor an op saved, and the output, still hold what the forward made (RuntimeError otherwise)."""
    for op in tape.ops:
        for tensor, version in op.versions:
            if tensor._version != version:
                raise RuntimeError(f"FPropagation: a tensor that {op.entry.name} in {op.where} saved for the sweep was "
                                   "modified in place later (as autograd refuses it where it keeps that tensor); "
                                   "nothing was changed")
    for held, version, name, where in tape.watched:
        tensor = held() if isinstance(held, weakref.ref) else held
        if tensor is not None and tensor._version != version:
            raise RuntimeError(f"FPropagation: a tensor that {name} in {where} read was modified in place later "
                               "(autograd, which saves it, refuses this too); nothing was changed")
    for tensor, version in tape.kept.values():
        if tensor._version != version:
            raise RuntimeError("FPropagation: a value kept for the sweep (keep_pre_activations) was modified in place "
                               "behind the tape; nothing was changed")
    for param, pointer in tape.param_memory:
        if param.data_ptr() != pointer:
            raise RuntimeError(f"FPropagation: the parameter {tape.params[id(param)][0]} was given other memory after "
                               "the forward (p.data = …, vector_to_parameters): the sweep would read the old "
                               "one; run the forward again; nothing was changed")
    if tape.output_tensor is not None and tape.output_tensor._version != tape.output_version:
        raise RuntimeError("FPropagation: the model's output was modified in place after the forward (the loss would "
                           "read what the sweep does not start from); nothing was changed")


class TapeRule:
    """The signal a rule sends back over the tape: the F-adjoint (docs/maths.md §7.1), the default of
    :func:`sweep_tape`. A rule for another signal (LFP's reward, §7.2 there) overrides :meth:`through_op`;
    ``keeps_values``: it reads the values themselves (``tape.kept``, kept when the tape was recorded with
    ``tape.keep``), refused by :meth:`check` otherwise."""

    name = "the F-adjoint"
    keeps_values = False

    def check(self, tape: Tape) -> None:
        """Refuse, before anything is computed, a tape this rule cannot sweep."""
        if self.keeps_values and not tape.keep:
            raise RuntimeError(f"{self.name} reads the recorded values: it needs FPropagation(model, graph=True, "
                               "keep_pre_activations=True) (its optimizer sets it); run the forward again")

    def through_op(self, tape: Tape, op: _Op, out_signal) -> dict:
        """{input key: signal} for ``op`` from the signal at its output(s) (a tuple for several, None where one got
        none): a value's signals are summed over its uses, a parameter's over its uses into its feedback."""
        if getattr(op.entry, "takes_needed", False):
            return op.entry.input_adjoints(op.saved, out_signal, needed=op.needed)
        return op.entry.input_adjoints(op.saved, out_signal)


FADJOINT = TapeRule()


def sweep_tape(tape: Tape, top: Tensor, rule: TapeRule = FADJOINT, *, release: bool = False) -> dict[Tensor, Tensor]:
    """{parameter: feedback} from the signal ``top`` at the output, sent back over the ops by ``rule`` (§7.1): each
    value's signal is the sum over its uses; a parameter that requires grad sums its uses' feedback. Nothing is
    written. Refuses (RuntimeError) a saved or kept tensor overwritten in place after the forward recorded it.
    ``release``: drop each op's records once its signals are made (autograd frees alike: the peak is then its
    peak), and each kept value once the op that made it is swept (nothing earlier reads it)."""
    check_versions(tape)
    rule.check(tape)
    # ``top`` may come in a one-element list, emptied here (as ``sweep.take``): the sweep holds the only reference
    adjoints: dict[int, Tensor] = {tape.output: top.pop() if isinstance(top, list) else top}
    owned: set[int] = set()  # values whose stored signal no other tensor shares: a later use adds into it in place
    grads: dict[Tensor, Tensor] = {}
    for op in reversed(tape.ops):
        outs = [adjoints.pop(i, None) if i >= 0 else None for i in op.outputs]
        if not op.needed or all(o is None for o in outs):  # no trainable parameter upstream: nothing to send
            if release:
                op.saved, op.versions = None, []
                _release_kept(tape, op)
            continue
        found = rule.through_op(tape, op, outs[0] if op.single else tuple(outs))
        alone = _unshared(found, outs, op.saved)
        if release:
            op.saved, op.versions = None, []
            _release_kept(tape, op)
        for key, adjoint in found.items():
            source = op.inputs.get(key)
            if source is None or adjoint is None or key not in op.needed:
                continue  # a constant input, or one whose adjoint reaches no trainable parameter
            kind, target = source
            if kind == "value":
                _accumulate(adjoints, owned, target, adjoint, key in alone)
            elif target.requires_grad:
                grads[target] = adjoint if target not in grads else grads[target] + adjoint
    return grads


def _unshared(found: dict, outs: list, saved) -> set:
    """The keys of ``found`` whose tensor shares its memory with nothing else the sweep holds (not the op's output
    signals, another key's tensor, or a saved tensor) and has no overlapping entries: a fresh kernel result, which
    the sum at a fan-out may add into in place."""
    storages = [t.untyped_storage().data_ptr() for t in found.values() if isinstance(t, Tensor)]
    taken = {t.untyped_storage().data_ptr() for t in (*outs, *_tensors_in(saved)) if isinstance(t, Tensor)}
    return {key for key, t in found.items()
            if isinstance(t, Tensor) and t.numel() and t.is_contiguous() and not t.requires_grad
            and storages.count(ptr := t.untyped_storage().data_ptr()) == 1 and ptr not in taken}


def _accumulate(adjoints: dict, owned: set, target: int, signal: Tensor, alone: bool) -> None:
    """adjoints[target] += signal (the sum over a value's uses, §7.1), in place where one side is the sweep's alone
    (autograd's input buffer does the same): the same additions, no extra tensor at the junction."""
    held = adjoints.get(target)
    if held is None:
        adjoints[target] = signal
        (owned.add if alone else owned.discard)(target)
    elif target in owned:
        held.add_(signal)
    elif alone:
        adjoints[target] = signal.add_(held)
        owned.add(target)
    else:
        adjoints[target] = held + signal
        owned.add(target)


def _release_kept(tape: Tape, op: _Op) -> None:
    for index in op.outputs:
        tape.kept.pop(index, None)


def tape_grads(tape: Tape, out_adj: Tensor, *, release: bool = False) -> dict[Tensor, Tensor]:
    """{parameter: ∂J/∂θ} from X*^L, for every parameter the forward read that requires grad (§7.1): the F-adjoint
    rule of :func:`sweep_tape`. Nothing is written. Refuses (RuntimeError) a saved tensor overwritten in place
    after its op recorded it. ``release``: drop each op's records once its adjoints are made (autograd frees alike:
    the peak is then its peak)."""
    return sweep_tape(tape, out_adj, FADJOINT, release=release)
