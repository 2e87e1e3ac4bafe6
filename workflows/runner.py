"""Run a workflow: a YAML list of stages and which outputs feed which inputs.

For each stage in order the runner builds its typed config, computes its fingerprint, and
either reuses the committed output of an earlier run with the same fingerprint or runs it into
a fresh committed directory. All of it is tracked in MLflow: one experiment per workflow, one
parent run per invocation, one nested run per stage tagged with ``stage`` and ``fingerprint``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from pipeline.config import ConfigError, apply_overrides, flatten, from_dict, load_yaml, to_dict
from pipeline.stage import (
    committed_dir,
    fingerprint,
    read_record,
    run_committed,
)
from pipeline.stages import STAGES
from pipeline.tracking import RunLogger, default_tracking_uri, ensure_experiment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: start Ray in-process; else a cluster (or RAY_ADDRESS)
    # Logical CPUs for in-process Ray. Train workers, data actors and read tasks each hold
    # one; more logical than physical CPUs lets them share a small machine instead of waiting.
    num_cpus: int | None = None


@dataclass(frozen=True)
class StageEntry:
    stage: str | None = None  # registry name; defaults to the entry's own name
    inputs: dict[str, str] = field(default_factory=dict)  # input slot -> upstream entry name
    config: dict[str, Any] = field(default_factory=dict)  # the stage's typed config, as YAML


@dataclass(frozen=True)
class Workflow:
    name: str
    stages: dict[str, StageEntry]
    description: str = ""
    data_root: str = "runs/default"  # where committed stage outputs and the SQLite store live
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else SQLite under data_root
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class StageResult:
    name: str
    fingerprint: str
    output: Path
    reused: bool
    seconds: float
    run_id: str
    summary: dict[str, Any]
    tracking_uri: str = ""


def load_workflow(path: str | Path, overrides: Sequence[str] = ()) -> Workflow:
    """Read and validate a workflow file; ``overrides`` are ``STAGE.key=value`` or ``key=value``.

    ``train.steps=50`` sets ``stages.train.config.steps``; top-level keys (``data_root=...``)
    are set as they are.
    """
    data = load_yaml(path)
    stage_names = set(data.get("stages", {}) or {})
    rewritten = []
    for item in overrides:
        key = item.split("=", 1)[0]
        head = key.split(".", 1)[0]
        rewritten.append(f"stages.{head}.config.{item.split('.', 1)[1]}"
                         if head in stage_names and "." in key else item)
    data = apply_overrides(data, rewritten)
    workflow = from_dict(Workflow, data, source=str(path))
    for name, entry in workflow.stages.items():
        stage = entry.stage or name
        if stage not in STAGES:
            raise ConfigError(f"{path}: stages.{name}: unknown stage {stage!r} "
                              f"(known: {', '.join(STAGES)})")
        slots = set(STAGES[stage].inputs)
        if set(entry.inputs) != slots:
            raise ConfigError(f"{path}: stages.{name}.inputs must name exactly "
                              f"{sorted(slots)}, got {sorted(entry.inputs)}")
        for slot, upstream in entry.inputs.items():
            if upstream not in workflow.stages or list(workflow.stages).index(upstream) >= \
                    list(workflow.stages).index(name):
                raise ConfigError(f"{path}: stages.{name}.inputs.{slot}: {upstream!r} is not "
                                  "a stage listed before it")
        from_dict(STAGES[stage].config_type, entry.config,
                  source=str(path), path=f"stages.{name}.config")
    return workflow


def run_workflow(workflow: Workflow, *, force: Sequence[str] = (), progress: bool = True,
                 workflow_file: str | Path | None = None) -> list[StageResult]:
    """Run (or reuse) every stage in order under one MLflow parent run."""
    unknown = set(force) - set(workflow.stages)
    if unknown:
        raise ConfigError(f"--force names unknown stages: {sorted(unknown)}")
    data_root = Path(workflow.data_root).resolve()
    data_root.mkdir(parents=True, exist_ok=True)
    tracking_uri = workflow.tracking_uri or default_tracking_uri(data_root)
    _init_ray(workflow.ray, progress)

    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(client, workflow.name, data_root / "mlartifacts")
    parent = client.create_run(experiment_id, run_name=f"{workflow.name}-{time.strftime('%H%M%S')}",
                               tags={"workflow": workflow.name})
    parent_id = parent.info.run_id
    parent_log = RunLogger(tracking_uri, parent_id)
    if workflow_file:
        parent_log.artifact(workflow_file, "workflow")
    results: dict[str, StageResult] = {}
    status = "FAILED"
    try:
        for name, entry in workflow.stages.items():
            results[name] = _run_stage(name, entry, results, data_root, client,
                                       experiment_id, parent_id, tracking_uri,
                                       forced=name in force, progress=progress)
        headline = _headline(results)
        if headline:
            parent_log.metrics(headline, step=0)
        status = "FINISHED"
    finally:
        client.set_terminated(parent_id, status)
    return list(results.values())


def _run_stage(name: str, entry: StageEntry, done: Mapping[str, StageResult], data_root: Path,
               client: MlflowClient, experiment_id: str, parent_id: str,
               tracking_uri: str, forced: bool, progress: bool) -> StageResult:
    spec = STAGES[entry.stage or name]
    config = from_dict(spec.config_type, entry.config, path=f"stages.{name}.config")
    inputs = {slot: done[upstream].output for slot, upstream in entry.inputs.items()}
    code = spec.code_version()
    fp = fingerprint(spec.name, config, {s: done[u].fingerprint for s, u in entry.inputs.items()},
                     code)
    run = client.create_run(experiment_id, run_name=name, tags={
        "mlflow.parentRunId": parent_id, "stage": spec.name, "fingerprint": fp})
    logger = RunLogger(tracking_uri, run.info.run_id)
    logger.params(flatten(to_dict(config)))
    started = time.perf_counter()
    record = read_record(committed_dir(data_root, name, fp))
    status = "FAILED"
    try:
        if record is not None and not forced:
            print(f"[{name}] reuse {fp}: same config, inputs and code as run "
                  f"{record.get('mlflow_run_id', '?')}", flush=True)
            logger.tags({"reused": "true", "reused_from_run": record.get("mlflow_run_id", "")})
            output, summary, reused = committed_dir(data_root, name, fp), record["summary"], True
        else:
            if forced and record is not None:
                _discard(committed_dir(data_root, name, fp))
            print(f"[{name}] run {fp}", flush=True)
            output, summary = run_committed(
                spec, config, data_root, fp, inputs,
                record={"stage": spec.name, "entry": name, "fingerprint": fp, "code": code,
                        "config": to_dict(config), "inputs": {k: str(v) for k, v in
                                                              inputs.items()},
                        "mlflow_run_id": run.info.run_id},
                logger=logger, tracking_uri=tracking_uri, progress=progress)
            reused = False
        seconds = time.perf_counter() - started
        logger.tags({"reused": str(reused).lower(), "output": str(output)})
        logger.metrics({"stage/seconds": seconds}, step=0)
        status = "FINISHED"
        print(f"[{name}] {'reused' if reused else 'done'} in {seconds:.1f}s -> {output}",
              flush=True)
        return StageResult(name, fp, output, reused, seconds, run.info.run_id, summary,
                           tracking_uri)
    finally:
        client.set_terminated(run.info.run_id, status)


def run_single_stage(stage: str, config: Mapping[str, Any], inputs: Mapping[str, Path], *,
                     data_root: Path, source: str = "config", progress: bool = True,
                     tracking_uri: str | None = None) -> StageResult:
    """Run one registered stage on committed input directories (``mmvq stage``).

    The inputs' fingerprints come from their stage records, so the result is cached and
    committed exactly as it would be inside a workflow.
    """
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
    spec = STAGES[stage]
    if set(inputs) != set(spec.inputs):
        raise ConfigError(f"stage {stage} needs --input for {list(spec.inputs)}, "
                          f"got {sorted(inputs)}")
    from_dict(spec.config_type, config, source=source)  # fail early, naming the file
    upstream = {}
    for slot, path in inputs.items():
        record = read_record(path)
        if record is None:
            raise ConfigError(f"input {slot}={path} is not a committed stage output "
                              f"(no {path}/stage.json)")
        upstream[slot] = StageResult(slot, record["fingerprint"], Path(path).resolve(), True,
                                     0.0, record.get("mlflow_run_id", ""), record["summary"])
    data_root = Path(data_root).resolve()
    data_root.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking_uri or default_tracking_uri(data_root)
    _init_ray(RayConfig(), progress)
    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(client, f"stage-{stage}", data_root / "mlartifacts")
    parent = client.create_run(experiment_id, run_name=f"stage-{stage}",
                               tags={"workflow": f"stage-{stage}"})
    status = "FAILED"
    try:
        result = _run_stage(stage, StageEntry(stage=stage, inputs={s: s for s in inputs},
                                              config=dict(config)),
                            upstream, data_root, client, experiment_id,
                            parent.info.run_id, tracking_uri, forced=False, progress=progress)
        status = "FINISHED"
        return result
    finally:
        client.set_terminated(parent.info.run_id, status)


def _discard(path: Path) -> None:
    """Move a committed output aside before a forced rerun (rename first: atomic for readers)."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _init_ray(config: RayConfig, progress: bool) -> None:
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        address = config.address or os.environ.get("RAY_ADDRESS")
        kwargs: dict[str, Any] = {"log_to_driver": True, "logging_level": logging.WARNING}
        if address:
            ray.init(address=address, **kwargs)
        else:
            # The dashboard also serves the state API that Ray Train's controller polls.
            ray.init(num_cpus=config.num_cpus, include_dashboard=True,
                     dashboard_host="127.0.0.1", **kwargs)
    context = DataContext.get_current()
    context.enable_progress_bars = progress
    context.print_on_execution_start = False


def _evaluation(results: Sequence[StageResult]) -> dict[str, Any] | None:
    """The evaluate stage's summary (trained and untrained metrics), if the workflow has one."""
    return next((r.summary for r in results
                 if isinstance(r.summary, dict) and "trained" in r.summary), None)


def _headline(results: Mapping[str, StageResult]) -> dict[str, float]:
    """Evaluate's trained and untrained metrics, logged on the parent run."""
    evaluation = _evaluation(list(results.values()))
    if not evaluation:
        return {}
    return {f"{model}/{k}": float(v) for model in ("trained", "untrained")
            for k, v in evaluation.get(model, {}).items()}


def format_report(results: Sequence[StageResult], tracking_uri: str) -> str:
    """The closing text: stage timings, trained vs untrained metrics, where things are."""
    lines = ["", "stage        time     state    output"]
    for r in results:
        lines.append(f"{r.name:<12} {r.seconds:>6.1f}s  {'reused' if r.reused else 'ran':<8} "
                     f"{r.output}")
    evaluation = _evaluation(results)
    if evaluation:
        lines += ["", f"{'metric (val)':<28} {'trained':>10} {'untrained':>10}"]
        for key in sorted(evaluation["trained"]):
            if key == "samples":
                continue
            lines.append(f"{key:<28} {evaluation['trained'][key]:>10.4f} "
                         f"{evaluation['untrained'].get(key, float('nan')):>10.4f}")
    tokens = next((r.output / r.summary["tokens"] for r in results if "tokens" in r.summary),
                  None)
    if tokens:
        lines += ["", f"token dataset: {tokens}  (parquet, one directory per split)"]
    lines += [f"MLflow tracking: {tracking_uri}",
              ("open the UI:     make ui   (or: mlflow ui --backend-store-uri "
              f"{tracking_uri} --host 127.0.0.1)")]
    return "\n".join(lines)
