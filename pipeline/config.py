"""Strict typed configs: YAML (or dicts) into frozen dataclasses.

Every stage has a frozen dataclass config. This module turns a mapping into one and refuses
anything it does not understand: an unknown key, or a value of the wrong type, is an error whose
message names the file and the key's dotted path (``train.optimizer.lr``), so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that does not match its dataclass; the message names the source and key path."""


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, source: str = "config",
              path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursing into nested dataclasses.

    Parameters
    ----------
    cls : dataclass type to build.
    data : the mapping (missing keys take the dataclass defaults).
    source : where the mapping came from (a file name), for error messages.
    path : dotted key path of ``data`` inside the source, for error messages.
    """
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {path or '<root>'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = ", ".join(_join(path, k) for k in unknown)
        raise ConfigError(f"{source}: unknown key {where} (known: {', '.join(sorted(fields))})")
    values = {name: _coerce(hints[name], data[name], source, _join(path, name))
              for name in fields if name in data}
    try:
        return cls(**values)
    except TypeError as err:  # a required field without a default was not given
        raise ConfigError(f"{source}: {path or '<root>'}: {err}") from err


def to_dict(config: Any) -> Any:
    """A dataclass config as plain YAML/JSON-able data (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, tuple | list):
        return [to_dict(v) for v in config]
    if isinstance(config, Mapping):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, Path):
        return str(config)
    return config


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping → ``{"a.b.c": value}``, the form MLflow params and fingerprints use."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = _join(prefix, str(key))
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def apply_overrides(data: Mapping[str, Any], overrides: list[str] | tuple[str, ...],
                    ) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested mapping copy."""
    result = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is a value, not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw)
    return result


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; an empty file is an empty mapping."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def _coerce(hint: Any, value: Any, source: str, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, source, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[-1])
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, source=source, path=path)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{source}: {path} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: {path} must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(item, v, source, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {path} must be a mapping, got {value!r}")
        value_hint = args[1] if len(args) == 2 else Any
        return {k: _coerce(value_hint, v, source, f"{path}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Path and isinstance(value, str):
        return Path(value)
    if isinstance(hint, type) and not isinstance(value, hint) or (
            hint in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"{source}: {path} must be {hint.__name__}, got {value!r}")
    return value


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}
