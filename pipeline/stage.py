"""What a stage is, where its output lives, and how that output becomes visible.

A stage is ``run(config, ctx) -> summary``: a typed config, the committed outputs of the stages
it reads (``ctx.inputs``), a fresh directory to write into (``ctx.output_dir``) and a logger for
its MLflow run. It returns a small summary (counts, metrics) that is stored beside its output.

Outputs live under ``{data_root}/{stage}/{fingerprint}/``. A stage writes into a temporary
sibling directory and the runner renames it into place when the stage returns, so a directory
under its fingerprint name is always complete: a killed stage leaves only a ``.tmp-`` directory
that nothing reads. The fingerprint covers the stage name, its config, its inputs' fingerprints
and the code version, so an unchanged stage is reused and a changed one reruns alone.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import to_dict
from pipeline.tracking import RunLogger

# Written last into every committed output; its presence is what "complete" means to readers.
STAGE_RECORD = "stage.json"


@dataclass(frozen=True)
class StageContext:
    """Everything a stage may touch besides its config."""

    output_dir: Path  # write here; renamed to the committed location when run() returns
    inputs: Mapping[str, Path]  # upstream stage name -> its committed output directory
    logger: RunLogger | None = None  # this stage's MLflow run (None when run without tracking)
    tracking_uri: str | None = None  # for processes (train workers) that log on their own
    progress: bool = True  # show progress bars


@dataclass(frozen=True)
class StageSpec:
    """A registered stage: its name, config type, upstream stages and the function that runs it."""

    name: str
    config_type: type
    run: Callable[[Any, StageContext], dict[str, Any]]
    inputs: tuple[str, ...] = ()
    # Modules whose source decides the output (part of the fingerprint). pipeline.stage is
    # always included: it defines how outputs are written.
    code: tuple[str, ...] = ()

    def code_version(self) -> str:
        return code_version(("pipeline.stage", *self.code))


def code_version(modules: tuple[str, ...]) -> str:
    """Hash of the source of ``modules`` (a package counts with all its files).

    A stage names the code its output depends on, so editing the trainer reruns train and what
    follows, but not synth.
    """
    digest = hashlib.sha256()
    for name in sorted(modules):
        origin = Path(importlib.import_module(name).__file__)
        files = sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]
        for path in files:
            digest.update(f"{name}:{path.name}".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def fingerprint(stage: str, config: Any, input_fingerprints: Mapping[str, str],
                code: str) -> str:
    """Stable 16-hex id of (stage, config, inputs, code)."""
    payload = json.dumps({"stage": stage, "config": to_dict(config),
                          "inputs": dict(sorted(input_fingerprints.items())), "code": code},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def committed_dir(data_root: Path, stage: str, fp: str) -> Path:
    return Path(data_root) / stage / fp


def read_record(output_dir: Path) -> dict[str, Any] | None:
    """The stage record of a committed output, or None if the output is absent or incomplete."""
    path = Path(output_dir) / STAGE_RECORD
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def run_committed(spec: StageSpec, config: Any, data_root: Path, fp: str,
                  inputs: Mapping[str, Path], record: Mapping[str, Any],
                  logger: RunLogger | None = None, tracking_uri: str | None = None,
                  progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Run ``spec`` into a temporary directory, then commit it atomically under ``fp``.

    Returns the committed directory and the stage's summary. If another process committed the
    same fingerprint meanwhile, its output is kept and ours discarded (same inputs, same result).
    """
    final = committed_dir(data_root, spec.name, fp)
    tmp = final.parent / f".tmp-{fp}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        ctx = StageContext(output_dir=tmp, inputs=dict(inputs), logger=logger,
                           tracking_uri=tracking_uri, progress=progress)
        summary = spec.run(config, ctx)
        full_record = {**record, "summary": summary}
        (tmp / STAGE_RECORD).write_text(json.dumps(full_record, indent=2, default=str))
        try:
            os.rename(tmp, final)  # atomic on one filesystem: readers see all or nothing
        except OSError:
            if read_record(final) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return final, summary
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
