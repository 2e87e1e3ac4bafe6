"""A workflow file: its stages, their configs and how outputs feed inputs, loaded strictly.

A workflow is YAML: ``name``, ``data_root``, ``tracking_uri``, ``ray`` and ``stages`` (entry name ->
registry stage, input slots wired to earlier entries or to the user's shards, the stage's typed
config). Overrides on the command line (``train.steps=50``) are applied before validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import (
    ConfigError,
)
from pipeline.tracking import (
    default_tracking_uri,
)


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: start Ray in-process; else a cluster (or RAY_ADDRESS)
    # Logical CPUs for in-process Ray. Train workers, data actors and read tasks each hold
    # one; more logical than physical CPUs lets them share a small machine instead of waiting.
    num_cpus: int | None = None
    # Start the in-process Ray's dashboard (http://127.0.0.1:8265). Off by default: its head and
    # eight module processes took half of a 2-core machine's CPU while training started
    # (BENCHMARKS.md, issue 15). A cluster's dashboard is the cluster's own.
    dashboard: bool = False


@dataclass(frozen=True)
class StageEntry:
    stage: str | None = None  # registry name; defaults to the entry's own name
    # Input slot -> upstream entry name; a slot the stage marks external (preprocess's
    # ``shards``) may instead name a folder, file or s3:// prefix of the user's shards.
    inputs: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the stage's typed config, as YAML


@dataclass(frozen=True)
class Workflow:
    name: str
    stages: dict[str, StageEntry]
    description: str = ""
    data_root: str = "runs/default"  # where committed stage outputs and the SQLite store live
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else SQLite under data_root
    ray: RayConfig = field(default_factory=RayConfig)


def workflow_data_root(workflow: Workflow) -> Path:
    """The workflow's data root as a local (or shared, mounted) directory.

    Object-store URIs are refused: outputs are committed by a directory rename and guarded by
    ``flock``, which S3 does not provide, so a run there could expose half-written outputs.
    """
    if "://" in workflow.data_root:
        raise ConfigError(
            f"data_root {workflow.data_root!r}: stage outputs are committed with an atomic "
            "directory rename and a file lock, which object stores do not provide; use a "
            "filesystem path that every node mounts (NFS, EFS, FSx for Lustre, a PVC)")
    return Path(workflow.data_root).resolve()


def workflow_tracking_uri(workflow: Workflow) -> str:
    """The workflow's tracking_uri, else ``MLFLOW_TRACKING_URI``, else SQLite under data_root."""
    return workflow.tracking_uri or default_tracking_uri(workflow_data_root(workflow))
