"""What a recorded forward may write, and what a refused one puts back (docs/graphs.md, "In-place writes and
views"; docs/maths.md §7.1).

The tape (:mod:`torch_fadjoint.tape`) calls these on every call that may write a tensor:

* :func:`_check_in_place` — an in-place op of the table on a value: refused on a parameter, on a view of a
  parameter that requires grad, and on memory the tape holds as a constant (a foreign value: a view of a
  constant, a buffer, a frozen parameter or a ``detach()`` alias); the other values sharing the memory become
  stale (the tape does not follow views);
* :func:`_constant_write` — a call outside the table writing a tensor (under ``no_grad``, through ``detach()``):
  the values it writes through keep their new versions; a view made under ``no_grad`` written with grad enabled is
  refused, as autograd refuses it (:func:`_note_nograd_views` notes those views when they are made);
* :func:`_keep_state_written` — a parameter or buffer of the model about to be written is copied first, and
  :func:`put_back_state` puts every copy back if the forward is refused.

Each receives the forward's :class:`~torch_fadjoint.tape.Tape` as ``tape``.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_flatten

__all__ = ["state_of", "put_back_state"]

_LEAVING = frozenset(f for f in (Tensor.numpy, Tensor.__array__, getattr(Tensor, "__dlpack__", None),
                                 getattr(torch, "from_dlpack", None)) if f is not None)


def _op_name(func) -> str:
    """The name a user wrote: ``Tensor.sort``, ``torch.conv2d``, ``F.max_pool2d``."""
    if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(func)  # aten::sin, aten.mul.Tensor
    owner = getattr(func, "__self__", None)
    if getattr(func, "__name__", "") == "__get__" and hasattr(owner, "__name__"):
        return f"Tensor.{owner.__name__}"  # a property: x.data, x.T
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    name = name.replace("TensorBase.", "Tensor.").replace("_VariableFunctionsClass.", "torch.")
    module = getattr(func, "__module__", "") or ""
    if module == "torch.nn.functional" or name.startswith("boolean_dispatch"):
        return f"F.{getattr(func, '__name__', name)}"
    return f"torch.{name}" if "." not in name else name


_LEAF_TYPES = frozenset({int, float, bool, str, type(None), torch.Size, torch.dtype, torch.device, slice,
                         type(Ellipsis)})  # what pytree holds no tensor in


def _leaves(items: tuple) -> list:
    """``tree_flatten(items)``'s leaves where a tensor may be (the items themselves when each is a tensor or a plain
    value, as a metadata call's ``x.dim()`` / ``x.shape`` are, without pytree's walk)."""
    if all(isinstance(item, Tensor) or type(item) in _LEAF_TYPES for item in items):
        return list(items)
    return tree_flatten(items)[0]


_IN_PLACE_OPERATORS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                                 "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"})
_STATISTICS = {F.batch_norm: (1, 2, "running_mean", "running_var"), torch.batch_norm: (3, 4, "running_mean", "running_var"),
               F.instance_norm: (1, 2, "running_mean", "running_var"),
               **{f: (3, 4, "running_mean", "running_var") for f in (
                   getattr(torch, name, None) for name in ("native_batch_norm", "_native_batch_norm_legit",
                                                           "_batch_norm_impl_index", "instance_norm"))
                  if f is not None}}
_REPLACING = frozenset({"set_", "__set__"})  # x.set_(…), x.data = …: the tensor gets other memory
# in-place ops whose backward reads the other operand: writing it through the first is refused by autograd
_READS_ITS_OPERANDS = frozenset({"mul_", "__imul__", "div_", "__itruediv__", "pow_", "__ipow__", "addcmul_",
                                 "addcdiv_", "true_divide_", "multiply_", "divide_"})


def state_of(params, buffers) -> dict[int, tuple[Tensor, ...]]:
    """{storage: its tensors} of a model's parameters and buffers (what a forward may write and must put back;
    several may share one storage, e.g. views of one flat buffer)."""
    state: dict[int, tuple[Tensor, ...]] = {}
    for t in (*params, *buffers):
        if t is not None and t.numel():
            storage = t.untyped_storage().data_ptr()
            if not any(t is other for other in state.get(storage, ())):
                state[storage] = state.get(storage, ()) + (t,)
    return state


def _op_base_name(func) -> str:
    """``add_`` for ``Tensor.add_``, ``torch.ops.aten.add_`` and ``torch.ops.aten.add_.Tensor`` alike."""
    name = getattr(func, "__name__", "") or ""
    return name.split(".")[0] if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) else name


def _writes_first_argument(func) -> bool:
    """Whether ``func`` may write into its first argument's memory: an in-place name (``add_``, ``__iadd__``,
    ``_foreach_add_``), a rebinding (``set_``, ``.data = …``), or its memory handed out of torch (``.numpy()``, a
    storage) where a write is not seen."""
    name = _op_base_name(func)
    return ((name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_OPERATORS or name in _REPLACING
            or func in _LEAVING or func is Tensor.untyped_storage)


def written_by(func, args: tuple, kwargs: dict) -> list:
    """What a call may write: its ``out=``, and its first argument (each tensor of a list, ``_foreach_add_``) when
    :func:`_writes_first_argument` says so (entries that are not tensors are left to the callers to skip)."""
    written = [kwargs.get("out")]
    if args and _writes_first_argument(func):
        written += list(args[0]) if isinstance(args[0], (list, tuple)) else [args[0]]
    return written


def _keep_state_written(tape, func, args: tuple, kwargs: dict, written: list) -> None:
    """Copy a parameter or buffer of the model before the forward first writes into it, through any alias
    (``self.count += 1``, ``self.buf[0] += 1``, ``self.buf.data.add_(1)``, ``out=``, ``.data = …``, BatchNorm's running
    statistics, a clamp under ``no_grad``, ``torch._foreach_add_``, ``.numpy()``): a refused forward puts every one
    back (:func:`put_back_state`). ``written``: :func:`written_by`'s list."""
    positions = _STATISTICS.get(func)
    if positions is not None:
        written = written + [args[i] if len(args) > i else kwargs.get(key)
                             for i, key in zip(positions[:2], positions[2:])]
    _keep_state(tape, written, _op_base_name(func) in _REPLACING)


def _keep_state(tape, tensors, replacing: bool = False) -> None:
    """Copy every parameter or buffer at the memory of ``tensors`` not copied yet (all of those sharing it)."""
    for tensor in tensors:
        if isinstance(tensor, Tensor) and tensor.numel():
            for owner in tape.state.pop(tensor.untyped_storage().data_ptr(), ()):
                tape.state_copies.append((owner, owner.detach().clone(), replacing))


def put_back_state(tape) -> None:
    """Every parameter and buffer the refused forward wrote into holds its value from before the forward again."""
    with torch.no_grad():
        for tensor, before, replaced in reversed(tape.state_copies):
            if replaced:
                tensor.set_(before)
            else:
                tensor.copy_(before)
    tape.state_copies = []


def _check_in_place(tape, func, args: tuple, inputs: dict) -> None:
    """An in-place op of the table writes its first argument: refused on a parameter (autograd refuses a leaf
    that requires grad), and on memory no value owns (a view of a constant, a buffer or a frozen parameter: the
    tape would go on reading that tensor as a constant). A value sharing its memory with another live value (a
    view or its base) may be written: the aliases become stale (autograd tracks views, the tape does not) and an
    op reading one later is refused (:func:`_inputs`), as is a stale output; ops that saved one are refused at the
    sweep by its version."""
    source = inputs.get(0)
    if source is None:  # a constant written with a value: it would become one, and its aliases would not
        raise ValueError(f"{_op_name(func)} in {tape.where()}: writes a value in place into a tensor the tape holds "
                         "as a constant (torch.zeros(…), a buffer, a view of one): write out of place (z = z + h)")
    kind, target = source
    if kind == "param":
        raise ValueError(f"{_op_name(func)} in {tape.where()}: writes in place into the parameter "
                         f"{tape.params[id(target)][0]} (autograd refuses it too)")
    written = args[0]
    if not written.numel():
        return
    storage = written.untyped_storage().data_ptr()
    if storage in tape.trained:
        raise ValueError(f"{_op_name(func)} in {tape.where()}: writes in place into a view of a parameter that "
                         "requires grad (autograd refuses it too)")
    if _op_base_name(func) in _READS_ITS_OPERANDS and any(
            isinstance(other, Tensor) and other.numel() and other.untyped_storage().data_ptr() == storage
            for other in _leaves(args[1:])):
        raise ValueError(f"{_op_name(func)} in {tape.where()}: writes a value in place with an operand sharing its "
                         "memory (h.mul_(h); autograd saves that operand and refuses it too): write out of place")
    if target in tape.multi_views:
        raise ValueError(f"{_op_name(func)} in {tape.where()}: writes in place into one of several views an op returned "
                         "(chunk, split, unbind; autograd refuses it too): clone it first, or write out of place")
    if target in tape.foreign or storage in tape.model_memory:
        raise ValueError(f"{_op_name(func)} in {tape.where()}: writes a value in place into the memory of a tensor "
                         "the tape holds as a constant (a view of torch.zeros(…), of a buffer, of a frozen "
                         "parameter or of a detach() alias, made with a value's shape): write out of place (z = z + h)")
    for other in tape.aliases(storage):  # its aliases change too, unseen: stale from now on
        if other is not written:
            index = tape.value_of(other)
            tape.stale.setdefault(index, f"{_op_name(func)} in {tape.where()}")
            tape.keep_before_write(("value", index))  # a rule reading the values keeps what the forward made


def _constant_write(tape, func, written: list) -> list[Tensor]:
    """The values sharing memory with what a call outside the table writes (``written``: :func:`written_by`'s
    list), found before it runs (``set_`` moves them). With grad enabled, a write through a view of a value that
    needs grad made under ``no_grad`` is refused, as autograd refuses it; one through ``detach()`` or ``.data`` (and
    their views) is autograd's constant write."""
    found = []
    for tensor in written:
        if not isinstance(tensor, Tensor) or not tensor.numel():
            continue
        aliases = tape.aliases(tensor.untyped_storage().data_ptr())
        if _op_base_name(func) in ("resize_", "resize_as_") and any(tape.needs[tape.value_of(v)] for v in aliases):
            raise ValueError(f"{_op_name(func)} in {tape.where()}: resizes a value that needs grad (autograd refuses "
                             "it too): make a new tensor instead")
        if (aliases and torch.is_grad_enabled() and _is_nograd_view(tape, tensor)
                and any(tape.needs[tape.value_of(value)] for value in aliases)):
            raise ValueError(f"{_op_name(func)} in {tape.where()}: writes in place, with grad enabled, through a view "
                             "of a value made under no_grad (autograd refuses it too): write out of place")
        found += aliases
    return found


def _is_nograd_view(tape, tensor: Tensor) -> bool:
    ref = tape.nograd_views.get(id(tensor))
    return ref is not None and ref() is tensor


def _note_nograd_views(tape, result, args: tuple, kwargs: dict, inputs: dict) -> None:
    """Views of values made under ``no_grad``, and views of those, are noted (autograd's creation meta)."""
    if torch.is_grad_enabled() and not any(_is_nograd_view(tape, leaf) for leaf in _leaves((*args, *kwargs.values()))
                                           if isinstance(leaf, Tensor)):
        return
    if not torch.is_grad_enabled() and not any(kind == "value" for kind, _ in inputs.values()):
        return
    for leaf in (result,) if isinstance(result, Tensor) else _leaves((result,)):
        if isinstance(leaf, Tensor) and leaf._is_view() and leaf.numel() and tape.aliases(
                leaf.untyped_storage().data_ptr()):
            tape.nograd_views[id(leaf)] = weakref.ref(leaf)
