"""One way to put a domain dataclass in the Launchpad: ``config_class(SomeConfig)`` -> a Dagster ``Config``.

Why: the stages' settings live in plain, typed dataclasses (``FilterConfig``, ``SplitConfig``, ``TrainConfig``…)
that know nothing of Dagster. Hand-mirroring them as ``dg.Config`` classes drifted (missing fields, defaults
copied by hand, no descriptions), so the Config is *generated* from the dataclass:

- every field keeps its type and its default (computed from the dataclass, never copied);
- its description and bounds come from the field's metadata, the one place they are written
  (``pipeline.core.fields``: ``doc_field(default, "...", ge=0, le=1, choices=("a", "b"))``), which the
  dataclass's own ``check_fields`` validates against too. A field without a description is an error at import,
  so the Launchpad never shows an unexplained field;
- bounds become pydantic ``Field(ge=..)`` constraints (checked when the step starts, with pydantic's message) and
  are repeated in the description (the Launchpad shows descriptions, not constraints); ``choices`` become an
  ``Enum`` (checked by Dagster before the run is launched; Dagster's schema accepts no optional ``Literal``);
- nested dataclasses become nested Config classes; tuples become lists, mappings dicts;
- ``to_dataclass(config, SomeConfig)`` converts back, by keyword, recursively (never positional, so adding a
  field cannot shift values silently).

``optional=True`` generates an *override* Config instead: every field ``None`` by default (= keep the base
value), nested ones too, and ``overrides(config)`` returns only what was set, as a nested dict to merge by name
(``TrainConfig``'s presets use it).
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Mapping
from types import NoneType, UnionType
from typing import Any, Optional, Union

import dagster as dg
import pydantic

from pipeline.core.fields import describe, field_bounds

_CACHE: dict[tuple, type[dg.Config]] = {}


def bounded_field(default: Any, doc: str, **bounds: Any) -> Any:
    """A pydantic ``Field`` (a resource's or a Config's own setting) whose description shows its bounds
    (``describe``): the bounds are written once, as for dataclass fields."""
    return pydantic.Field(default=default, description=describe(doc, bounds), **bounds)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"field {f.name!r} has no default; a Launchpad config needs one")


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (Union, UnionType):
        args = [a for a in typing.get_args(tp) if a is not NoneType]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _annotation(tp: Any, optional: bool) -> Any:
    """The Config-side type of a dataclass annotation (nested dataclasses -> nested Config classes)."""
    inner, was_optional = _strip_optional(tp)
    if was_optional:
        return Optional[_annotation(inner, optional)]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return config_class(tp, optional=optional)
    if origin is tuple:
        items = {a for a in args if a is not Ellipsis}
        if len(items) != 1:
            raise TypeError(f"tuple of mixed types {tp} cannot be a Launchpad list")
        return list[_annotation(items.pop(), optional)]  # type: ignore[misc]
    if origin in (list, typing.List):
        return list[_annotation(args[0], optional)]  # type: ignore[misc]
    if origin in (dict, Mapping, typing.Dict):
        return dict[args[0], _annotation(args[1], optional)]  # type: ignore[misc,valid-type]
    return tp


def _plain(value: Any) -> Any:
    """A default as Dagster's config schema accepts it: dataclasses as dicts, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_class(
    dc: type,
    *,
    name: str | None = None,
    doc: str | None = None,
    exclude: tuple[str, ...] = (),
    optional: bool = False,
) -> type[dg.Config]:
    """The Dagster ``Config`` for dataclass ``dc`` (see the module docstring). Cached per arguments, so a nested
    dataclass used in two places is one Config class."""
    key = (dc, name, doc, exclude, optional)
    if key in _CACHE:
        return _CACHE[key]
    hints = typing.get_type_hints(dc)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(dc):
        if f.name in exclude or not f.init:
            continue
        meta = f.metadata
        text = str(meta.get("doc", "")).strip()
        if not text:
            raise TypeError(f"{dc.__name__}.{f.name} has no description (its field metadata's 'doc')")
        tp = _annotation(hints[f.name], optional)
        if meta.get("choices"):
            tp = enum.Enum(f"{dc.__name__}_{f.name}", {str(c): c for c in meta["choices"]})  # type: ignore[misc]
        bounds = field_bounds(meta)
        if optional:
            fields[f.name] = (Optional[tp], pydantic.Field(
                default=None, description=describe(f"{text} Empty: keep the preset's value.", bounds), **bounds))
        else:
            fields[f.name] = (tp, pydantic.Field(
                default=_plain(_default(f)), validate_default=True, description=describe(text, bounds), **bounds))
    cls_name = name or f"{dc.__name__}{'Overrides' if optional else 'Params'}"
    cls_doc = doc or (dc.__doc__ or cls_name).strip().split("\n\n")[0]
    model = pydantic.create_model(  # type: ignore[call-overload]
        cls_name, __base__=dg.Config, __doc__=cls_doc, __module__=dc.__module__, **fields)
    model.__domain_dataclass__ = dc
    _CACHE[key] = model
    return model


def _value(tp: Any, value: Any) -> Any:
    """A Config-side value converted back to the dataclass annotation ``tp``."""
    if value is None:
        return None
    if isinstance(value, enum.Enum):
        return value.value
    inner, _ = _strip_optional(tp)
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if dataclasses.is_dataclass(inner):
        return to_dataclass(value, inner)
    if origin is tuple:
        item = next(a for a in args if a is not Ellipsis)
        return tuple(_value(item, v) for v in value)
    if origin in (list, typing.List):
        return [_value(args[0], v) for v in value]
    if isinstance(value, Mapping) and args:
        return {k: _value(args[1], v) for k, v in value.items()}
    return value


def to_dataclass(config: Any, dc: type, **replace: Any) -> Any:
    """``dc`` built by keyword from a Config (or its dict): every field the Config has, converted back (nested
    Configs, lists -> tuples); fields the Config excludes keep the dataclass default; ``replace`` wins."""
    data = config.model_dump() if isinstance(config, pydantic.BaseModel) else dict(config)
    hints = typing.get_type_hints(dc)
    kwargs = {f.name: _value(hints[f.name], data[f.name]) for f in dataclasses.fields(dc)
              if f.init and f.name in data}
    return dc(**{**kwargs, **replace})


def from_dataclass(value: Any, config_cls: type[dg.Config]) -> dg.Config:
    """The Config holding a dataclass instance's values (the inverse of ``to_dataclass``)."""
    names = config_cls.model_fields.keys()
    return config_cls(**{k: v for k, v in _plain(value).items() if k in names})


def overrides(config: Any) -> dict[str, Any]:
    """What an ``optional=True`` Config sets, as a nested dict (``None`` = not set, dropped; list items keep
    their position so per-phase overrides line up)."""
    data = config.model_dump() if isinstance(config, pydantic.BaseModel) else dict(config)
    return {k: _set_only(v) for k, v in data.items() if v is not None}


def _set_only(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping) and not isinstance(value, dict | pydantic.BaseModel):
        value = dict(value)
    if isinstance(value, pydantic.BaseModel):
        value = value.model_dump()
    if isinstance(value, list):
        return [_set_only(v) for v in value]
    if isinstance(value, dict):
        return {k: _set_only(v) for k, v in value.items() if v is not None}
    return value


def dataclass_kwargs(dc: type, source: Any, **explicit: Any) -> dict[str, Any]:
    """Keyword arguments for ``dc`` taken by name from ``source``'s attributes (e.g. a resource), plus
    ``explicit`` ones; tuples are rebuilt from lists. For resources that resolve some values at run start."""
    hints = typing.get_type_hints(dc)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(dc):
        if f.name in explicit:
            out[f.name] = explicit[f.name]
        elif f.init and hasattr(source, f.name):
            out[f.name] = _value(hints[f.name], getattr(source, f.name))
    return out
