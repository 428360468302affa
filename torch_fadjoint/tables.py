"""The two lookup tables, module type → entry, and the one way into them (docs/maths.md §1.1, §6.1).

``LAYERS`` holds the parametric layers A_k (``tfa.layers.Layer`` entries, §6.1), ``MAPS`` the
parameter-free maps σ of the §1.1 table (``tfa.maps.Map`` entries). ``layers.py`` and ``maps.py`` fill
them with the built-in entries and add user types through :func:`register`, which keeps the tables
disjoint: a type is a layer or a map, never both. Both modules import the tables from here, not from
each other, so the package's imports have no cycle (tables → maps → layers → sweep → rules → optim).
"""
from __future__ import annotations

__all__ = ["LAYERS", "MAPS", "register"]

LAYERS: dict[type, object] = {}  # type → its tfa.layers.Layer entry (filled by layers.py)
MAPS: dict[type, object] = {}  # type → its tfa.maps.Map entry (filled by maps.py)

# kind → (its table, the other table, what a type of the other table is)
_TABLES = {"layer": (LAYERS, MAPS, "parameter-free map (tfa.maps.MAPS)"),
           "map": (MAPS, LAYERS, "parametric layer (tfa.layers.LAYERS)")}


def register(kind: str, module_type: type, entry, base: type, overwrite: bool = False) -> None:
    """Add ``module_type → entry`` to the ``kind`` ("layer" or "map") table; refuses an entry that is not a
    ``base`` instance, a type of the other table and a silent overwrite."""
    table, other, other_kind = _TABLES[kind]
    if not isinstance(entry, base):
        raise TypeError(f"expected a {base.__name__} instance, got {type(entry).__name__}")
    if module_type in other:
        raise ValueError(f"{module_type.__name__} is a {other_kind}, not a {kind}")
    if module_type in table and not overwrite:
        raise ValueError(f"{module_type.__name__} already has a {kind} entry; pass overwrite=True to replace it")
    table[module_type] = entry
