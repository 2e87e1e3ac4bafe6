"""A workflow may read shards no stage of ours wrote: `inputs: {shards: /data/shards}`."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError
from workflows.plan import input_locations, load_workflow, plan_workflow


def _shard(path: Path, keys: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key in keys:
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))


def _workflow(tmp_path: Path, shards: str) -> Path:
    spec = {"name": "ext", "data_root": str(tmp_path / "runs"),
            "stages": {"preprocess": {"inputs": {"shards": shards}, "config": {}},
                       "train": {"inputs": {"data": "preprocess"}, "config": {"steps": 1}}}}
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_external_shards_are_planned_by_their_listing(tmp_path):
    _shard(tmp_path / "shards" / "a.tar", ["k1", "k2"])
    workflow = load_workflow(_workflow(tmp_path, str(tmp_path / "shards")))
    first = plan_workflow(workflow)
    assert first[0].external == ("shards",) and first[1].external == ()
    assert input_locations(first[0], tmp_path / "runs") == {"shards": str(tmp_path / "shards")}
    assert plan_workflow(workflow)[0].fingerprint == first[0].fingerprint  # stable
    _shard(tmp_path / "shards" / "b.tar", ["k3"])  # a new shard is new input
    again = plan_workflow(workflow)
    assert again[0].fingerprint != first[0].fingerprint
    assert again[1].fingerprint != first[1].fingerprint  # and everything downstream reruns


def test_missing_external_shards_name_the_key(tmp_path):
    workflow = load_workflow(_workflow(tmp_path, str(tmp_path / "nothing-here")))
    with pytest.raises(ConfigError, match=r"stages\.preprocess\.inputs\.shards: no \.tar files "
                       r"under .*nothing-here"):
        plan_workflow(workflow)


def test_only_external_slots_take_paths(tmp_path):
    path = _workflow(tmp_path, "x")
    spec = yaml.safe_load(path.read_text())
    spec["stages"]["train"]["inputs"]["data"] = str(tmp_path)
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="stages.train.inputs.data"):
        load_workflow(path)
