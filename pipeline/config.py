"""Stage configs from YAML: files, ``key.path=value`` overrides, flattening for MLflow.

The strict dataclass conversion itself is :mod:`mmvq.config_io`, shared with the model
configs; here errors also name the file they came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from mmvq.config_io import ConfigError, to_dict
from mmvq.config_io import from_dict as _strict_from_dict

__all__ = ["ConfigError", "apply_overrides", "at_least", "flatten", "from_dict", "in_range",
           "load_yaml", "positive", "to_dict", "writable_dir"]

T = TypeVar("T")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, source: str = "config",
              path: str = "") -> T:
    """Build dataclass ``cls`` from ``data`` strictly; errors name ``source`` and the key path.

    Parameters
    ----------
    cls : dataclass type to build.
    data : the mapping (missing keys take the dataclass defaults).
    source : where the mapping came from (a file name), for error messages.
    path : dotted key path of ``data`` inside the source, for error messages.
    """
    try:
        return _strict_from_dict(cls, data, path)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err


# Range checks for the configs' __post_init__: the message names the key as a user writes it
# (``train.lr``), so a bad value fails when the workflow is planned, before any stage runs.

def at_least(section: str, config: Any, minimum: float, *names: str) -> None:
    """Raise ConfigError unless every field ``names`` of ``config`` (when set) is >= minimum."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise ConfigError(f"{section}.{name} must be >= {minimum:g}, got {value!r}")


def positive(section: str, config: Any, *names: str) -> None:
    """Raise ConfigError unless every field ``names`` of ``config`` (when set) is > 0."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise ConfigError(f"{section}.{name} must be > 0, got {value!r}")


def in_range(section: str, name: str, value: float | None, low: float, high: float, *,
             closed: str = "[]") -> None:
    """Raise ConfigError unless ``value`` (when set) lies in the interval ``closed`` says:
    "[]", "[)", "(]" or "()" around ``low`` and ``high``."""
    if value is None:
        return
    above = value >= low if closed[0] == "[" else value > low
    below = value <= high if closed[1] == "]" else value < high
    if not (above and below):
        raise ConfigError(f"{section}.{name} must be in {closed[0]}{low:g}, {high:g}{closed[1]}, "
                          f"got {value!r}")


def writable_dir(path: Path, what: str) -> Path:
    """Create directory ``path`` if needed and check that files can be written in it; raise
    ConfigError naming ``what`` (e.g. ``data_root``) and the reason otherwise."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".mmvq-write-check-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{what} {path}: cannot write there ({err.strerror or err})") from err
    return path


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
    import yaml  # here: the configs' dataclasses load on machines without PyYAML (bench-gpu)

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
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    except OSError as err:  # missing, a directory, unreadable: one line, not a traceback
        raise ConfigError(f"{path}: cannot read it ({err.strerror or err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}
