"""One parser for settings given as text: `-o KEY=VALUE`, `serve run ... key=value`, a Serve
config's `args:`, a Tune config read back from JSON. Each value becomes its dataclass field's
declared type, so every settings class (a task's, ServeSettings, Scaling, TrialConfig) converts
the same way and none lists its keys' types twice.

    int, float, str      int("3"), float("1e-3")
    bool                 true/false, 1/0, yes/no (any case)
    tuple[T, ...]        "4,3,2" or a list: each item as T
    T | None             None or "" is None, anything else as T
    anything else        (dicts, nested dataclasses) kept as given
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import fields

__all__ = ["typed_fields", "check_known"]

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def typed_fields(cls, values: Mapping, what: str) -> dict:
    """`values` as the declared field types of `cls`, a dataclass or an instance of one (whose
    values the errors show as examples). ValueError in one line for an unknown key (naming the
    known ones) or a value that is not of its field's type."""
    example = None if isinstance(cls, type) else cls
    cls = type(cls) if example is not None else cls
    check_known(cls, values, what)
    hints = typing.get_type_hints(cls)
    typed = {}
    for key, value in values.items():
        try:
            typed[key] = _as(value, hints[key])
        except (TypeError, ValueError):
            like = f" like {getattr(example, key)!r}" if example is not None else ""
            raise ValueError(f"{what} {key}={value!r}: expected {_name(hints[key])}{like}") from None
    return typed


def check_known(cls, keys, what: str) -> None:
    """ValueError naming the keys that are not fields of the dataclass `cls`, and the known ones."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ValueError(f"unknown {what}(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def _as(value, kind):
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or value == ""):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _as(value, inner)
    if origin is tuple:
        items = [x for x in value.split(",")] if isinstance(value, str) else list(value)
        return tuple(_as(x.strip() if isinstance(x, str) else x, args[0]) for x in items)
    if kind is bool:
        if isinstance(value, str):
            if value.lower() not in TRUE + FALSE:
                raise ValueError(value)
            return value.lower() in TRUE
        return bool(value)
    if kind in (int, float, str):
        return kind(value)
    return value


def _name(kind) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("empty" if a is type(None) else _name(a) for a in args)
    if origin is tuple:
        return f"comma-separated {_name(args[0])}s"
    return getattr(kind, "__name__", str(kind))
