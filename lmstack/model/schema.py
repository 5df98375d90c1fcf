"""Typed dataclass <-> plain dict conversion with validation that names the offending field, and the
registries of classes that configs name (token mixers, data sources).

Pure Python on purpose: the model configuration travels with exported models, where only torch and
transformers are installed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from lmstack.errors import ConfigError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, field: str) -> Any:
    """Check `value` against the annotation `tp`, converting where it is lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{field}: expected {_type_name(tp)}, got null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, field)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{field}: expected {_type_name(tp)}, got {value!r}"
        )
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{field}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(v, item_tp, f"{field}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{field}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_convert(k, key_tp, field): _convert(v, val_tp, f"{field}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{field}: expected a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, prefix=f"{field}.")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{field}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{field}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{field}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{field}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if typing.get_origin(tp) is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{field}: expected one of {list(allowed)}, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {field}")


def unknown_key_message(key: str, known: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(sorted(known))}"
    return f"{prefix}{key}: unknown key{hint}"


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types, then run its
    `validate()` if it has one. Errors name the field as `prefix + name`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(unknown_key_message(str(key), list(fields), prefix))
        kwargs[key] = _convert(value, hints[key], prefix + key)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(prefix)
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


class Registry(dict, Generic[T]):
    """Classes by the names configs use for them (stable across releases): `@registry.register("name")`
    adds a class and sets its `name`; `registry.lookup(name)` is the class, or a ConfigError listing
    the registered names. `kind` names what is registered in messages ("mixer", "data source")."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[T], T]:
        def add(cls: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            cls.name = name
            self[name] = cls
            return cls

        return add

    def lookup(self, name: str) -> T:
        if name not in self:
            raise ConfigError(f"unknown {self.kind} '{name}'; registered: {', '.join(sorted(self))}")
        return self[name]
