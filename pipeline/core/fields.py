"""A setting's description and bounds, written once in its dataclass field's metadata.

Why: the stages' settings are plain dataclasses that know nothing of Dagster, yet the Launchpad must explain and
bound every one. Writing the doc and bounds in one place, ``metadata={"doc": ..., "ge": ..., "choices": ...}``
(``doc_field`` is the shorthand), lets both readers derive from it: ``check_fields`` validates an instance (a
dataclass's ``__post_init__`` calls it, so a bad value fails with the bound it broke) and ``pipeline.defs.config``
builds the Launchpad field, its constraint and its description (``describe``). No Dagster here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

BOUND_KEYS = ("ge", "gt", "le", "lt")
_SYMBOLS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
_HOLDS = {
    "ge": lambda v, b: v >= b,
    "gt": lambda v, b: v > b,
    "le": lambda v, b: v <= b,
    "lt": lambda v, b: v < b,
}


def doc_field(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = dataclasses.MISSING,
              **bounds: Any) -> Any:
    """A dataclass field with its description and bounds (``ge``/``gt``/``le``/``lt``, ``choices``) as metadata."""
    unknown = set(bounds) - {*BOUND_KEYS, "choices"}
    if unknown:
        raise TypeError(f"unknown field metadata {sorted(unknown)}; allowed: {[*BOUND_KEYS, 'choices']}")
    meta = {"doc": doc, **bounds}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def describe(doc: str, bounds: Mapping[str, Any]) -> str:
    """The description as the Launchpad shows it: the doc plus its bounds, e.g. ``"… (≥ 0, ≤ 1)"``."""
    shown = [f"{_SYMBOLS[k]} {bounds[k]}" for k in BOUND_KEYS if bounds.get(k) is not None]
    return f"{doc} ({', '.join(shown)})" if shown else doc


def field_bounds(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The bounds among a field's metadata."""
    return {k: meta[k] for k in BOUND_KEYS if meta.get(k) is not None}


def check_fields(obj: Any) -> None:
    """Raise ``ValueError`` naming the first field of dataclass ``obj`` outside its metadata's bounds or choices
    (``None`` values are not checked: an optional setting left unset)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ValueError(f"{type(obj).__name__}.{f.name} must be one of {list(choices)}, got {value!r}")
        for key, bound in field_bounds(f.metadata).items():
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            if math.isnan(value) or not _HOLDS[key](value, bound):
                raise ValueError(f"{type(obj).__name__}.{f.name} must be {_SYMBOLS[key]} {bound}, got {value!r}")
