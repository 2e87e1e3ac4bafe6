"""Strict conversion between frozen dataclass configs and plain data (parsed YAML or JSON).

One loader serves the model configs here and the stage configs in ``pipeline``: an unknown key
or a value of the wrong type is a :class:`ConfigError` naming the key's dotted path
(``audio.strides[1]``), so a typo never falls back to a default silently.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid config: unknown key, wrong type or bad value; the message names the key path."""


def from_dict(cls: type[T], data: Any, path: str = "", base: T | None = None) -> T:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclasses.

    Missing keys take ``base``'s values, or without it the dataclass defaults; lists become
    tuples where the field is a tuple. A nested mapping changes only the keys it names of that
    field's default: ``fusion.quantizer.decay=0.99`` keeps the joint quantizer's other settings
    instead of building a ``QuantizerConfig()`` with that decay (which silently swapped the
    joint tokens' EMA codebook for the modality default, simvq). A mapping that names another
    ``kind`` than the default's starts from the class defaults: one kind's settings do not apply
    to another.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or '<root>'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {_join(path, unknown[0])} "
                          f"(known: {', '.join(sorted(fields))})")
    values = {name: getattr(base, name) for name in fields} if base is not None else {}
    for k, v in data.items():
        default = None  # only a mapping (a nested config) builds on the field's default
        if isinstance(v, Mapping):
            default = getattr(base, k) if base is not None else _field_default(fields[k])
            if "kind" in v and v["kind"] != getattr(default, "kind", None):
                default = None
        values[k] = _coerce(hints[k], v, _join(path, k), default)
    try:
        return cls(**values)
    except TypeError as err:  # a required field was not given
        raise ConfigError(f"{path or '<root>'}: {err}") from err
    except ConfigError as err:  # a range check of the config's __post_init__
        raise ConfigError(f"{path}: {err}" if path else str(err)) from err
    except ValueError as err:
        raise ConfigError(f"{path or '<root>'}: {err}") from err


def to_dict(config: Any) -> Any:
    """A config as plain JSON/YAML data: dataclasses to dicts, tuples to lists, paths to str."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        return {str(k): to_dict(v) for k, v in config.items()}
    if isinstance(config, tuple | list):
        return [to_dict(v) for v in config]
    if isinstance(config, Path):
        return str(config)
    return config


def _field_default(field: dataclasses.Field) -> Any:
    """The field's default value (None when it has none)."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _coerce(hint: Any, value: Any, path: str, default: Any = None) -> Any:
    """``value`` as type ``hint``; a mapping for a dataclass updates ``default`` if it is one."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        last: ConfigError | None = None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, path, default)
            except ConfigError as err:
                last = err
        raise last or ConfigError(f"{path}: no type matches {value!r}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path, default if isinstance(default, hint) else None)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is not None and issubclass(origin, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        value_hint = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(value_hint, v, f"{path}.{k}") for k, v in value.items()}
    return _scalar(hint, value, path)


def _scalar(hint: Any, value: Any, path: str) -> Any:
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Path and isinstance(value, str):
        return Path(value)
    if hint in (int, float) and isinstance(value, bool) or (
            isinstance(hint, type) and not isinstance(value, hint)):
        raise ConfigError(f"{path} must be {hint.__name__}, got {value!r}")
    return value


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key
