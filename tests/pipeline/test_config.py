"""Strict config loading: typos and wrong types fail with the file and key path."""

from dataclasses import dataclass, field

import pytest

from mmvq.config import TokenizerConfig
from pipeline.config import ConfigError, apply_overrides, flatten, from_dict, load_yaml, to_dict
from pipeline.train_config import TrainConfig


@dataclass(frozen=True)
class Inner:
    rate: float = 1.0
    sizes: tuple[int, ...] = (1, 2)


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    maybe: int | None = None


def test_nested_values_and_defaults():
    cfg = from_dict(Outer, {"inner": {"rate": 2, "sizes": [3, 4, 5]}, "maybe": 7})
    assert cfg == Outer(name="x", inner=Inner(rate=2.0, sizes=(3, 4, 5)), maybe=7)
    assert isinstance(cfg.inner.rate, float)


def test_unknown_key_names_path_and_source():
    with pytest.raises(ConfigError, match=r"demo.yaml: unknown config key inner\.rat\b"):
        from_dict(Outer, {"inner": {"rat": 2}}, source="demo.yaml")


def test_wrong_type_names_path():
    with pytest.raises(ConfigError, match=r"inner\.sizes\[1\] must be int"):
        from_dict(Outer, {"inner": {"sizes": [1, "two"]}})
    with pytest.raises(ConfigError, match="name must be str"):
        from_dict(Outer, {"name": 3})


def test_round_trip_through_dict():
    cfg = from_dict(TrainConfig, {"steps": 5, "model": {"image": {"codebook_size": 64}}})
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg
    assert cfg.model.image.codebook_size == 64
    assert isinstance(cfg.model, TokenizerConfig)


def test_overrides_parse_yaml_values():
    data = apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=[1, 2]", "d=true"])
    assert data == {"a": {"b": 2, "c": [1, 2]}, "d": True}
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["novalue"])


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_load_yaml_rejects_non_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: the top level must be a mapping"):
        load_yaml(path)
