"""Snapshot a model (and its optimizer) and later assert that nothing changed, bit for bit.

The "refused before anything is written" contract (docs/maths.md §6.7) is checked with one pair::

    before = snapshot(model, opt)
    ...  # a step that must be refused
    assert_untouched(before, model, opt)

What is compared: every parameter's value, every ``.grad`` (``None`` stays ``None``), every buffer
(BatchNorm's running statistics and ``num_batches_tracked``), and the optimizer's whole ``state_dict()``
(its ``param_groups`` and every ``state`` entry: the same keys, tensors bit-identical, other values
equal and of the same type). Tensors are equal when ``torch.equal`` says so, NaN at the same places
counting as equal (a NaN that was there stays). The failure message names every difference: which
parameter, ``.grad``, buffer or optimizer state key changed, and how.

Flags of :func:`snapshot` compare more or less:

``grads=False``          values only (a test about a stale ``.grad`` that the step may legitimately clear);
``buffers=False``        not the buffers (a forward in train mode between the two updates them);
``grad_identity=True``   also the ``.grad`` objects themselves (``p.grad is`` the tensor it was);
``versions=True``        also every parameter's and buffer's in-place version counter (``_version``): not
                         even written with the same values.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Snapshot:
    """What :func:`snapshot` recorded: clones keyed by qualified name, and the optimizer's state_dict."""

    params: dict[str, Tensor]
    grads: dict[str, Tensor | None] | None
    buffers: dict[str, Tensor] | None
    optimizer: dict | None
    grad_objects: dict[str, Tensor | None] | None = None
    versions: dict[str, int] | None = None


def snapshot(model: nn.Module, opt: torch.optim.Optimizer | None = None, *, grads: bool = True,
             buffers: bool = True, grad_identity: bool = False, versions: bool = False) -> Snapshot:
    """Copies of ``model``'s parameters, ``.grad`` and buffers and of ``opt.state_dict()`` (see the module doc)."""
    named = dict(model.named_parameters())
    named_buffers = dict(model.named_buffers())
    return Snapshot(
        params={name: p.detach().clone() for name, p in named.items()},
        grads={name: None if p.grad is None else p.grad.detach().clone() for name, p in named.items()} if grads else None,
        buffers={name: b.detach().clone() for name, b in named_buffers.items()} if buffers else None,
        optimizer=None if opt is None else copy.deepcopy(opt.state_dict()),
        grad_objects={name: p.grad for name, p in named.items()} if grad_identity else None,
        versions={**{f"parameter {n}": p._version for n, p in named.items()},
                  **{f"buffer {n}": b._version for n, b in named_buffers.items()}} if versions else None,
    )


def same(a: Tensor, b: Tensor) -> bool:
    """Bit-identical for ``torch.equal`` (same dtype, shape and device), NaN at the same places equal."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if torch.equal(a, b):
        return True
    if not (a.is_floating_point() or a.is_complex()):
        return False
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


def _tensor_change(before: Tensor, now: Tensor) -> str:
    if before.dtype != now.dtype or before.shape != now.shape or before.device != now.device:
        return (f"{before.dtype} {tuple(before.shape)} on {before.device} → "
                f"{now.dtype} {tuple(now.shape)} on {now.device}")
    differs = ~((before == now) | (before.isnan() & now.isnan()) if before.is_floating_point() else before == now)
    where = differs.nonzero()[0].tolist()
    return f"{int(differs.sum())} of {before.numel()} entries differ (first at {where}: {before[tuple(where)].item()!r} → " \
           f"{now[tuple(where)].item()!r})"


def _listed(keys) -> str:
    return ", ".join(sorted(map(repr, keys))) or "none"


def _differences(where: str, before, now) -> list[str]:
    """Every difference between two state_dict-like structures, each named by its path."""
    if isinstance(before, Tensor) or isinstance(now, Tensor):
        if not (isinstance(before, Tensor) and isinstance(now, Tensor)):
            return [f"{where}: {type(before).__name__} → {type(now).__name__}"]
        return [] if same(before, now) else [f"{where} changed: {_tensor_change(before, now)}"]
    if isinstance(before, dict) and isinstance(now, dict):
        found = []
        if before.keys() != now.keys():
            found.append(f"{where}: keys added {_listed(now.keys() - before.keys())}, "
                         f"lost {_listed(before.keys() - now.keys())}")
        for key in [k for k in before if k in now]:
            found += _differences(f"{where}[{key!r}]", before[key], now[key])
        return found
    if isinstance(before, (list, tuple)) and isinstance(now, (list, tuple)) and type(before) is type(now):
        if len(before) != len(now):
            return [f"{where}: length {len(before)} → {len(now)}"]
        return [d for i, (a, b) in enumerate(zip(before, now)) for d in _differences(f"{where}[{i}]", a, b)]
    if type(before) is not type(now) or before != now:
        return [f"{where}: {before!r} → {now!r}"]
    return []


def changes(before: Snapshot, model: nn.Module, opt: torch.optim.Optimizer | None = None) -> list[str]:
    """What differs from ``before`` (empty: untouched), one line per parameter, .grad, buffer or state entry."""
    named = dict(model.named_parameters())
    found = []
    if named.keys() != before.params.keys():
        found.append(f"parameters: {sorted(before.params)} → {sorted(named)}")
    for name in [n for n in before.params if n in named]:
        p = named[name]
        found += _differences(f"parameter {name}", before.params[name], p.detach())
        if before.grads is not None:
            grad = before.grads[name]
            if (grad is None) != (p.grad is None):
                found.append(f"{name}.grad: {'None' if grad is None else 'a tensor'} → "
                             f"{'None' if p.grad is None else 'a tensor'}")
            elif grad is not None:
                found += _differences(f"{name}.grad", grad, p.grad.detach())
        if before.grad_objects is not None and p.grad is not before.grad_objects[name]:
            found.append(f"{name}.grad is another object than the one it was")
    if before.buffers is not None:
        buffers = {n: b.detach() for n, b in model.named_buffers()}
        if buffers.keys() != before.buffers.keys():
            found.append(f"buffers: {sorted(before.buffers)} → {sorted(buffers)}")
        for name in [n for n in before.buffers if n in buffers]:
            found += _differences(f"buffer {name}", before.buffers[name], buffers[name])
    if before.versions is not None:
        now = {**{f"parameter {n}": p._version for n, p in named.items()},
               **{f"buffer {n}": b._version for n, b in model.named_buffers()}}
        found += [f"{name} was written in place (version {v} → {now.get(name)})"
                  for name, v in before.versions.items() if now.get(name) != v]
    if (before.optimizer is None) != (opt is None):
        raise TypeError("snapshot and assert_untouched must both be given the optimizer, or neither")
    if opt is not None:
        found += _optimizer_differences(before.optimizer, opt.state_dict(), _state_labels(opt, named))
    return found


def _state_labels(opt: torch.optim.Optimizer, named: dict[str, Tensor]) -> dict[int, str]:
    """state_dict()'s state index → the parameter's name (the index counts the groups' parameters in order)."""
    names = {id(p): name for name, p in named.items()}
    flat = [p for group in opt.param_groups for p in group["params"]]
    return {i: names.get(id(p), f"parameter #{i}") for i, p in enumerate(flat)}


def _optimizer_differences(before: dict, now: dict, labels: dict[int, str]) -> list[str]:
    if not (isinstance(before.get("state"), dict) and isinstance(now.get("state"), dict)):
        return _differences("optimizer state_dict", before, now)
    found = _differences("optimizer state_dict", {k: v for k, v in before.items() if k != "state"},
                         {k: v for k, v in now.items() if k != "state"})
    state, state_now = before["state"], now["state"]
    if state.keys() != state_now.keys():
        found.append(f"optimizer state: entries added for {_listed(labels.get(k, k) for k in state_now.keys() - state.keys())}"
                     f", lost for {_listed(labels.get(k, k) for k in state.keys() - state_now.keys())}")
    for key in [k for k in state if k in state_now]:
        found += _differences(f"optimizer state of {labels.get(key, key)}", state[key], state_now[key])
    return found


def assert_untouched(before: Snapshot, model: nn.Module, opt: torch.optim.Optimizer | None = None) -> None:
    """Parameters, .grad, buffers and the optimizer's state_dict are as :func:`snapshot` recorded them."""
    found = changes(before, model, opt)
    assert not found, "changed:\n  " + "\n  ".join(found)
