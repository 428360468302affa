"""What a sweep reads through a module besides its records, and how two readings compare (docs/maths.md §6.7).

The chain recorder (:mod:`torch_fadjoint.chain`) reads each recorded module at the forward and again at the sweep:
its plain settings and which tensors its parameters and buffers are (:func:`settings_of`), what ``module.<name>``
gives for each tensor the sweep reads and whether it requires grad (:func:`read_through`); a difference between the
two is a change between the forward and the sweep, refused in words (:func:`setting_change`, :func:`read_change`).
:func:`gradient_hook` says whether autograd would call a hook of a tensor it reads.
"""
from __future__ import annotations

import operator

from torch import Tensor, nn

__all__ = ["settings_of", "setting_change", "read_through", "read_change", "gradient_hook"]

_SETTING_TYPES = (bool, int, float, str, tuple, type(None))
_SETTING_KEYS: dict[type, tuple] = {}  # type -> (the setting names, their getter)
_MODULE_GETATTR, _MODULE_GETATTRIBUTE = nn.Module.__getattr__, nn.Module.__getattribute__
_MISSING = object()


def settings_of(module: nn.Module) -> tuple:
    """What a backward reads from a module besides its records: its plain settings (``eps``, ``negative_slope``,
    ``stride``, ``count_include_pad``, ``training``, …) and which tensors its parameters and buffers are, in one flat
    tuple: the settings (a fixed number per type), how many parameters, then the ids of the parameters and buffers."""
    state = module.__dict__
    read = _SETTING_KEYS.get(type(module))
    if read is None:  # the names a freshly made module of this type holds (torch's own table modules)
        keys = tuple(k for k, v in state.items() if not k.startswith("_") and isinstance(v, _SETTING_TYPES))
        read = _SETTING_KEYS[type(module)] = (keys, _getter(keys))
    params = state["_parameters"]
    return (*read[1](state), len(params), *map(id, params.values()), *map(id, state["_buffers"].values()))


def _getter(keys: tuple):
    """``state -> tuple of state.get(key)`` for ``keys``, in C where every key is there (the usual case)."""
    if not keys:
        return lambda state: ()
    at_once = operator.itemgetter(*keys)
    if len(keys) == 1:
        return lambda state: (state.get(keys[0]),)

    def get(state: dict) -> tuple:
        try:
            return at_once(state)
        except KeyError:  # a setting deleted from the instance
            return tuple(map(state.get, keys))
    return get


def setting_change(module: nn.Module, then: tuple, now: tuple) -> str:
    """The first difference between two ``settings_of`` of ``module``, in words."""
    keys = _SETTING_KEYS[type(module)][0]
    for key, a, b in zip(keys, then, now):
        if a != b:
            return f"{key}: {a!r} → {b!r}"
    return "a parameter or buffer was replaced"


def read_through(module: nn.Module, names: tuple) -> tuple:
    """What a sweep reads through ``module`` besides its settings: its class, and for each of ``names`` (a layer's
    parameters, the module's buffers) the tensor ``module.<name>`` gives (an attribute set on the instance, or a
    property of a class swapped in, shadows the registered one) and whether it requires grad. Read from the
    registries where nothing can shadow them (no instance attribute, no class attribute of that name, ``nn.Module``'s
    ``__getattr__`` and ``__getattribute__``): what ``getattr`` gives then, at a third of its cost (``nn.Module.__getattr__`` runs after a
    failed lookup)."""
    cls, state = type(module), module.__dict__
    plain = cls.__getattr__ is _MODULE_GETATTR and cls.__getattribute__ is _MODULE_GETATTRIBUTE
    found = [cls]
    for name in names:
        if plain and name not in state and getattr(cls, name, _MISSING) is _MISSING:
            tensor = state["_parameters"].get(name, _MISSING)
            if tensor is _MISSING:
                tensor = state["_buffers"].get(name, _MISSING)
                if tensor is _MISSING:
                    tensor = state["_modules"].get(name)
        else:
            tensor = getattr(module, name, None)
        found += (tensor, isinstance(tensor, Tensor) and tensor.requires_grad)
    return tuple(found)


def read_change(module: nn.Module, names: tuple, then: tuple, now: tuple) -> str | None:
    """The first difference between two ``read_through`` of ``module``, in words (None if none)."""
    if now[0] is not then[0]:
        return f"its class is {now[0].__name__}, was {then[0].__name__}"
    for name, tensor, wanted, found, wants in zip(names, then[1::2], then[2::2], now[1::2], now[2::2]):
        if found is not tensor:
            return f"its {name} is another tensor (an attribute set on the module?)"
        if wants and not wanted:  # frozen at the forward: autograd gives it no gradient (one frozen since: none)
            return f"{name}.requires_grad is True, was False"
    return None


def gradient_hook(tensor) -> bool:
    """Whether autograd would call a hook of ``tensor`` when it accumulates its gradient (register_hook /
    register_post_accumulate_grad_hook)."""
    return isinstance(tensor, Tensor) and bool(tensor._backward_hooks or getattr(tensor, "_post_accumulate_grad_hooks",
                                                                                  None))
