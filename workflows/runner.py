"""Run a workflow: a YAML list of stages and which outputs feed which inputs.

For each stage in order the runner builds its typed config and computes its fingerprint; a
:func:`plan_workflow` then decides, per stage, to reuse the committed output of an earlier run
with the same fingerprint or to run it into a fresh committed directory, and says why. Flags
narrow or widen the plan: ``only`` (just these stages, on committed upstream outputs), ``from_``
(these and everything downstream), ``force`` (these). All of it is tracked in MLflow: one
experiment per workflow, one parent run per invocation, one nested run per stage tagged with
``stage`` and ``fingerprint``. The committed directory decides reuse; MLflow names the run that
produced it.

Tracking degrades loudly. At the end of each stage the runner closes the stage's logger, sends
what it and the stage's workers could not (:func:`pipeline.tracking.replay_spools`), and for
anything still missing tags the run ``mmvq.tracking=incomplete`` and prints a warning with the
counts; the next invocation sends it. While an invocation runs, ``{data_root}/.mlflow-runs``
lists its runs under a lock that dies with the process, so the next invocation marks the runs
of a killed one KILLED; SIGTERM and SIGHUP end them KILLED at exit already.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mlflow.tracking import MlflowClient

from pipeline.config import (
    ConfigError,
    apply_overrides,
    flatten,
    from_dict,
    load_yaml,
    to_dict,
    writable_dir,
)
from pipeline.raydata import init_single_node
from pipeline.stage import (
    commit_stage,
    committed_dir,
    committed_outputs,
    fingerprint,
    is_locked,
    leftovers,
    read_record,
)
from pipeline.stages import STAGES
from pipeline.tracking import (
    Pending,
    RunLogger,
    default_tracking_uri,
    ensure_experiment,
    mark_incomplete,
    replay_spools,
    spool_root,
    tracking_client,
)
from workflows.accounting import chain_counts, chain_metrics
from workflows.splits import check_splits

log = logging.getLogger(__name__)

FLUSH_S = 15.0  # at a stage's end: how long its logger waits for a tracking server that is down


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: start Ray in-process; else a cluster (or RAY_ADDRESS)
    # Logical CPUs for in-process Ray. Train workers, data actors and read tasks each hold
    # one; more logical than physical CPUs lets them share a small machine instead of waiting.
    num_cpus: int | None = None


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


@dataclass(frozen=True)
class PlannedStage:
    """What the runner will do with one stage, and why."""

    name: str  # the workflow entry (also the directory under data_root)
    stage: str  # the registry name
    config: Any  # the typed stage config
    input_fps: dict[str, str]  # input slot -> upstream fingerprint
    inputs: dict[str, str]  # input slot -> upstream entry name
    fingerprint: str
    code: str  # the stage's code version
    action: Literal["run", "reuse", "skip"]
    reason: str
    output: Path  # the committed directory of this fingerprint (present or not)
    forced: bool = False  # rerun even if the output is committed
    run_id: str = ""  # MLflow run that produced the committed output, if known
    previous: Path | None = None  # newest committed output of this entry for another fingerprint
    external: tuple[str, ...] = ()  # input slots that name the user's data, not an entry

    def input_is_stage(self, slot: str) -> bool:
        return slot not in self.external


class PlanError(ConfigError):
    """The flags ask for a plan that cannot run (an upstream output is missing)."""


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
            if upstream not in workflow.stages and slot in STAGES[stage].external_inputs:
                continue  # the user's shards; checked (listed) when the plan is made
            if upstream not in workflow.stages or list(workflow.stages).index(upstream) >= \
                    list(workflow.stages).index(name):
                raise ConfigError(f"{path}: stages.{name}.inputs.{slot}: {upstream!r} is not "
                                  "a stage listed before it")
        from_dict(STAGES[stage].config_type, entry.config,
                  source=str(path), path=f"stages.{name}.config")
    return workflow


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


def external_fingerprint(location: str, where: str) -> str:
    """Fingerprint of a user's shards named as an input (``where`` names the key in errors)."""
    from pipeline.storage import listing_fingerprint

    try:
        return listing_fingerprint(location, (".tar",))
    except FileNotFoundError as err:
        raise ConfigError(f"{where}: {err} (name a folder, a .tar file or an s3:// prefix of "
                          "webdataset shards, e.g. the output of `mmvq ingest`)") from err


def input_locations(planned: PlannedStage, data_root: Path) -> dict[str, Path | str]:
    """Where each input slot of ``planned`` reads: an upstream entry's committed output for
    its fingerprint (a reused or skipped upstream has no result to ask), or the user's path."""
    return {slot: committed_dir(data_root, upstream, planned.input_fps[slot])
            if planned.input_is_stage(slot) else upstream
            for slot, upstream in planned.inputs.items()}


def plan_workflow(workflow: Workflow, *, only: Sequence[str] = (), from_: Sequence[str] = (),
                  force: Sequence[str] = (), tracking_uri: str | None = None,
                  ) -> list[PlannedStage]:
    """Decide per stage: run, reuse or skip, with the reason. Starts nothing.

    Parameters
    ----------
    only : run just these stages (always, as if forced); every other stage is reused from its
        committed output or skipped. A missing output that an ``only`` stage reads is an error.
    from_ : rerun these stages and everything downstream of them.
    force : rerun these stages even when their output is committed.
    tracking_uri : where to look up the MLflow run that produced each committed output;
        None: the workflow's. Lookup failures only cost the run ids in the reasons.

    Raises
    ------
    ConfigError
        For a flag naming an unknown stage; :class:`PlanError` for a missing upstream output.
    """
    for flag, names in (("--only", only), ("--from", from_), ("--force", force)):
        unknown = [n for n in names if n not in workflow.stages]
        if unknown:
            raise ConfigError(f"{flag} names unknown stage {unknown[0]!r} "
                              f"(stages: {', '.join(workflow.stages)})")
    data_root = workflow_data_root(workflow)
    producers = _ProducerLookup(tracking_uri or workflow_tracking_uri(workflow), workflow.name)
    downstream = _downstream(workflow, from_)
    plan: dict[str, PlannedStage] = {}
    for name, entry in workflow.stages.items():
        spec = STAGES[entry.stage or name]
        config = from_dict(spec.config_type, entry.config, path=f"stages.{name}.config")
        input_fps = {slot: plan[u].fingerprint if u in plan else
                     external_fingerprint(u, f"stages.{name}.inputs.{slot}")
                     for slot, u in entry.inputs.items()}
        code = spec.code_version()
        fp = fingerprint(spec.name, config, input_fps, code)
        output = committed_dir(data_root, name, fp)
        committed = read_record(output)
        history = [p for p in committed_outputs(data_root, name) if p != output]
        base = PlannedStage(name, spec.name, config, input_fps, dict(entry.inputs), fp, code,
                            "run", "", output, previous=history[-1] if history else None,
                            external=tuple(s for s, u in entry.inputs.items() if u not in plan))
        run_id = producers.run_id(spec.name, fp) if committed or not history else ""
        run_id = run_id or (committed or {}).get("mlflow_run_id", "")
        reuse = _replace(base, action="reuse", run_id=run_id,
                         reason=f"committed output {output}"
                         + (f" (MLflow run {run_id})" if run_id else ""))
        step = _decide(workflow, base, reuse, committed is not None, only=only, from_=from_,
                       force=force, downstream=downstream)
        if step is None:
            step = _replace(base, reason=_why_run(base, plan, data_root, producers))
        plan[name] = step
    check_splits(list(plan.values()))  # a split a stage reads exists, before anything runs
    return list(plan.values())


def run_workflow(workflow: Workflow, *, force: Sequence[str] = (), only: Sequence[str] = (),
                 from_: Sequence[str] = (), progress: bool = True, verbose: bool = False,
                 workflow_file: str | Path | None = None) -> list[StageResult]:
    """Plan, then run or reuse every planned stage in order under one MLflow parent run.

    Returns the results of the stages that ran or were reused (skipped ones have none).
    """
    data_root = workflow_data_root(workflow)
    tracking_uri = workflow_tracking_uri(workflow)
    plan = plan_workflow(workflow, only=only, from_=from_, force=force,
                         tracking_uri=tracking_uri)
    writable_dir(data_root, "data_root")
    _init_ray(workflow.ray, progress, verbose)
    for planned in plan:  # before anything runs: a stage that cannot be placed fails now
        if planned.action == "run":
            check_resources(planned.name, planned.config)

    client = tracking_client(tracking_uri)
    experiment_id = ensure_experiment(client, workflow.name,
                                      _artifact_root(tracking_uri, data_root))
    results: dict[str, StageResult] = {}
    with _invocation(client, tracking_uri, data_root, experiment_id,
                     run_name=f"{workflow.name}-{time.strftime('%H%M%S')}",
                     tags={"workflow": workflow.name,
                           "plan": " ".join(f"{p.name}={p.action}" for p in plan)}) as invocation:
        if workflow_file:
            invocation.log.artifact(workflow_file, "workflow")
        for planned in plan:
            if planned.action == "skip":
                print(f"[{planned.name}] skip: {planned.reason}", flush=True)
                continue
            inputs = input_locations(planned, data_root)
            results[planned.name] = _run_stage(planned, inputs, data_root, client,
                                               experiment_id, invocation, tracking_uri,
                                               progress=progress, verbose=verbose)
        headline = _headline(results)
        chain = chain_counts(plan)  # every sample accounted along the chain (accounting.py)
        for line in chain:
            print(f"[samples] {line.text()}", flush=True)
        if headline or chain:
            invocation.log.metrics({**headline, **chain_metrics(chain)}, step=0)
    return list(results.values())


def _run_stage(planned: PlannedStage, inputs: Mapping[str, Path], data_root: Path,
               client: MlflowClient, experiment_id: str, invocation: _Invocation,
               tracking_uri: str, progress: bool, verbose: bool = False) -> StageResult:
    name, fp = planned.name, planned.fingerprint
    spec = STAGES[planned.stage]
    run = client.create_run(experiment_id, run_name=name, tags={
        "mlflow.parentRunId": invocation.parent_id, "stage": spec.name, "fingerprint": fp})
    invocation.add(run.info.run_id)
    logger = RunLogger(tracking_uri, run.info.run_id)
    logger.params(flatten(to_dict(planned.config)))
    started = time.perf_counter()
    status = "FAILED"
    others: list[str] = []  # the training run the stage's workers logged to, if another one
    try:
        output, record, reused = commit_stage(
            spec, planned.config, data_root, fp, inputs,
            record={"stage": spec.name, "entry": name, "fingerprint": fp, "code": planned.code,
                    "libraries": spec.library_versions(),
                    "config": to_dict(planned.config), "input_fingerprints": planned.input_fps,
                    "inputs": {k: str(v) for k, v in inputs.items()},
                    "mlflow_run_id": run.info.run_id},
            name=name, force=planned.forced, logger=logger, tracking_uri=tracking_uri,
            progress=progress, verbose=verbose,
            on_wait=lambda: print(f"[{name}] waiting: another run is writing {planned.output}",
                                  flush=True),
            on_run=lambda: print(f"[{name}] run {fp}: {planned.reason}", flush=True))
        summary = record.get("summary")
        if isinstance(summary, dict) and summary.get("mlflow_run_id"):
            others.append(str(summary["mlflow_run_id"]))
        if reused:
            source = record.get("mlflow_run_id", "")
            print(f"[{name}] reuse {fp}: same config, inputs and code as run {source or '?'}",
                  flush=True)
            logger.tags({"reused_from_run": source})
        seconds = time.perf_counter() - started
        logger.tags({"reused": str(reused).lower(), "output": str(output)})
        logger.metrics({"stage/seconds": seconds}, step=0)
        status = "FINISHED"
        print(f"[{name}] {'reused' if reused else 'done'} in {seconds:.1f}s -> {output}",
              flush=True)
        return StageResult(name, fp, output, reused, seconds, run.info.run_id,
                           record["summary"], tracking_uri)
    except BaseException as err:
        status = _end_status(err)
        raise
    finally:
        logger.terminate(status)
        _finish_tracking(name, logger, others)


RUNS_DIR = ".mlflow-runs"  # under data_root: the runs of invocations in progress (_Invocation)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP reached the runner: like Ctrl-C, its runs end as KILLED."""


def _end_status(err: BaseException) -> str:
    """MLflow's status for a run that ``err`` ended: KILLED for Ctrl-C, SIGTERM, SIGHUP (Ray's
    own SIGTERM handler exits with SystemExit), else FAILED."""
    return "KILLED" if isinstance(err, KeyboardInterrupt | SystemExit) else "FAILED"


@contextlib.contextmanager
def _signals_end_runs() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Terminated`, so the runs are ended before exit.

    A handler that was there (in-process Ray stops its processes on SIGTERM, then exits) runs
    first. SIGKILL cannot be caught: :func:`close_killed_runs` covers it on the next run.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        old = previous.get(signum)
        if callable(old):
            old(signum, frame)
        raise Terminated(f"{signal.Signals(signum).name} received")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _Invocation:
    """The MLflow runs of one workflow invocation, listed under ``{data_root}/.mlflow-runs``.

    ``{parent}.json`` names the runs (the parent, then each stage's), and the invocation holds
    an ``flock`` on ``{parent}.lock`` until it ends: the kernel drops it however the process
    dies, SIGKILL included. :func:`close_killed_runs` in a later invocation finds the lists whose
    lock is free and marks their runs that MLflow still shows RUNNING as KILLED.
    """

    def __init__(self, data_root: Path, tracking_uri: str, experiment_id: str,
                 parent_id: str) -> None:
        self.folder = data_root / RUNS_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tracking_uri, self.experiment_id, self.parent_id = tracking_uri, experiment_id, \
            parent_id
        self.runs = [parent_id]
        self._lock = open(self.folder / f"{parent_id}.lock", "a")  # noqa: SIM115 - held
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self._write()
        self.log = RunLogger(tracking_uri, parent_id)

    def add(self, run_id: str) -> None:
        self.runs.append(run_id)
        self._write()

    def _write(self) -> None:
        record = {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id,
                  "runs": self.runs}
        tmp = self.folder / f".{self.parent_id}.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.folder / f"{self.parent_id}.json")

    def end(self) -> None:
        (self.folder / f"{self.parent_id}.json").unlink(missing_ok=True)
        (self.folder / f"{self.parent_id}.lock").unlink(missing_ok=True)
        self._lock.close()


def close_killed_runs(data_root: Path, by_run_id: str) -> list[str]:
    """Mark KILLED the runs that killed invocations under ``data_root`` left RUNNING.

    An invocation's list whose lock nobody holds belongs to a process that died. Its runs, their
    children and the training runs they resumed (tag ``mmvq.resumed_by_run``) that are still
    RUNNING are ended as KILLED and tagged ``mmvq.killed_detected_by=<by_run_id>``. With the
    server unreachable the list stays for the next invocation. Returns the runs marked.
    """
    folder = data_root / RUNS_DIR
    marked: list[str] = []
    for lock in sorted(folder.glob("*.lock")) if folder.is_dir() else []:
        with _free_lock(lock) as free:
            if not free:
                continue  # a live invocation (this one, or a concurrent run)
            record_path = lock.with_suffix(".json")
            try:
                record = json.loads(record_path.read_text())
                marked += _mark_killed(record, by_run_id)
            except FileNotFoundError:
                pass  # it ended normally between our listing and our lock
            except Exception as err:  # noqa: BLE001 - a courtesy to earlier runs
                log.warning("could not mark the runs of killed invocation %s: %s",
                            lock.stem, err)
                continue
            record_path.unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
    return marked


def _mark_killed(record: Mapping[str, Any], by_run_id: str) -> list[str]:
    client = tracking_client(record["tracking_uri"])
    ids = set(record["runs"])
    running = client.search_runs([record["experiment_id"]], max_results=5000,
                                 filter_string="attributes.status = 'RUNNING'")
    marked = []
    for run in running:
        tags = run.data.tags
        if ids & {run.info.run_id, tags.get("mlflow.parentRunId"),
                  tags.get("mmvq.resumed_by_run")}:
            client.set_tag(run.info.run_id, "mmvq.killed_detected_by", by_run_id)
            client.set_terminated(run.info.run_id, "KILLED")
            marked.append(run.info.run_id)
    return marked


@contextlib.contextmanager
def _free_lock(path: Path) -> Iterator[bool]:
    """Hold the ``flock`` of ``path`` if nobody does (True), else nothing (False)."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


@contextlib.contextmanager
def _invocation(client: MlflowClient, tracking_uri: str, data_root: Path, experiment_id: str,
                run_name: str, tags: Mapping[str, str]) -> Iterator[_Invocation]:
    """The parent run of one invocation, from creation to its end status.

    First what earlier invocations left: spooled tracking data is sent (:func:`replay_spools`)
    and the runs of killed ones are marked KILLED. The parent ends FINISHED, FAILED or (Ctrl-C,
    SIGTERM, SIGHUP) KILLED.
    """
    _replay_earlier(tracking_uri)
    parent = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    invocation = _Invocation(data_root, tracking_uri, experiment_id, parent.info.run_id)
    status = "FAILED"
    try:
        with _signals_end_runs():
            killed = close_killed_runs(data_root, parent.info.run_id)
            if killed:
                print(f"[mlflow] marked {len(killed)} run{'s' if len(killed) > 1 else ''} of "
                      f"killed invocations KILLED: {', '.join(killed)}", flush=True)
            yield invocation
        status = "FINISHED"
    except BaseException as err:
        status = _end_status(err)
        raise
    finally:
        invocation.log.terminate(status)
        _finish_tracking("workflow", invocation.log)
        invocation.end()


def _replay_earlier(tracking_uri: str) -> None:
    """Send what earlier invocations could not (their loggers closed with the server down)."""
    result = replay_spools(tracking_uri)
    if result.replayed:
        total = Pending()
        for pending in result.replayed.values():
            total.merge(pending)
        print(f"[mlflow] replayed {total.describe()} that earlier runs could not send, into "
              f"{len(result.replayed)} run{'s' if len(result.replayed) > 1 else ''}", flush=True)
    for run_id, left in result.left.items():
        print(f"[mlflow] WARNING: run {run_id} still misses {left.describe()} (server "
              f"unreachable; kept in {spool_root(tracking_uri) / run_id})", flush=True)


def _finish_tracking(name: str, logger: RunLogger, others: Sequence[str] = ()) -> None:
    """Close a stage's (or the workflow's) logger, send what its run and ``others`` (a training
    run the stage's workers logged to) still lack, and say loudly what could not be sent."""
    closed = logger.close(timeout_s=FLUSH_S, mark=False)
    result = replay_spools(logger.tracking_uri, run_ids={logger.run_id, *others},
                           send=logger.reachable)
    missing = dict(result.left)
    if closed.rejected:
        missing.setdefault(logger.run_id, Pending()).rejected += closed.rejected
    for run_id, pending in missing.items():
        mark_incomplete(logger.tracking_uri, run_id, pending, try_server=result.reachable)
        print(f"[{name}] WARNING: MLflow run {run_id} is missing {pending.describe()}; kept in "
              f"{spool_root(logger.tracking_uri) / run_id} and sent when the workflow runs "
              "next", flush=True)


def run_single_stage(stage: str, config: Mapping[str, Any], inputs: Mapping[str, str | Path], *,
                     data_root: Path, source: str = "config", progress: bool = True,
                     tracking_uri: str | None = None, ray: RayConfig | None = None,
                     verbose: bool = False) -> StageResult:
    """Run one registered stage on committed input directories (``mmvq stage``).

    The inputs' fingerprints come from their stage records, so the result is cached and
    committed exactly as it would be inside a workflow. A slot the stage marks external
    (preprocess's ``shards``) also takes the user's shards: a folder, a .tar file, or an
    ``s3://`` prefix. ``ray`` is the workflow's Ray settings (``mmvq stage --workflow``).
    """
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
    spec = STAGES[stage]
    if set(inputs) != set(spec.inputs):
        raise ConfigError(f"stage {stage} needs --input for {list(spec.inputs)}, "
                          f"got {sorted(inputs)}")
    cfg = from_dict(spec.config_type, config, source=source)  # fail early, naming the file
    upstream: dict[str, tuple[Path | str, str]] = {}
    external = []
    for slot, where in inputs.items():
        record = None if "://" in str(where) else read_record(Path(where))
        if record is not None:
            upstream[slot] = (Path(where).resolve(), record["fingerprint"])
        elif slot in spec.external_inputs:
            local = "://" not in str(where)
            upstream[slot] = (str(Path(where).resolve()) if local else str(where),
                              external_fingerprint(str(where), f"--input {slot}={where}"))
            external.append(slot)
        else:
            raise ConfigError(f"input {slot}={where} is not a committed stage output "
                              f"(no {where}/stage.json)")
    data_root = Path(data_root).resolve()
    writable_dir(data_root, "data_root")
    tracking_uri = tracking_uri or default_tracking_uri(data_root)
    input_fps = {slot: fp for slot, (_, fp) in upstream.items()}
    code = spec.code_version()
    fp = fingerprint(spec.name, cfg, input_fps, code)
    planned = PlannedStage(stage, stage, cfg, input_fps, {}, fp, code, "run", "stage command",
                           committed_dir(data_root, stage, fp), external=tuple(external))
    _init_ray(ray or RayConfig(), progress, verbose)
    check_resources(spec.name, cfg)
    client = tracking_client(tracking_uri)
    experiment_id = ensure_experiment(client, f"stage-{stage}",
                                      _artifact_root(tracking_uri, data_root))
    with _invocation(client, tracking_uri, data_root, experiment_id, run_name=f"stage-{stage}",
                     tags={"workflow": f"stage-{stage}"}) as invocation:
        return _run_stage(planned, {slot: path for slot, (path, _) in upstream.items()},
                          data_root, client, experiment_id, invocation, tracking_uri,
                          progress=progress, verbose=verbose)


def _decide(workflow: Workflow, base: PlannedStage, reuse: PlannedStage, committed: bool, *,
            only: Sequence[str], from_: Sequence[str], force: Sequence[str],
            downstream: set[str]) -> PlannedStage | None:
    """The flags' verdict on one stage; None: run for lack of a committed output."""
    name = base.name
    if only:
        if name in only:
            return _replace(base, forced=True, reason="--only " + name)
        if committed:
            return reuse
        readers = [n for n in only if name in workflow.stages[n].inputs.values()]
        if readers:
            raise PlanError(
                f"--only {' '.join(only)}: {readers[0]} reads the output of {name}, which has "
                f"no committed output for fingerprint {base.fingerprint} ({base.output} is "
                f"missing); run the workflow without --only, or add --only {name}")
        return _replace(base, action="skip", reason="not read by the --only stages")
    if name in force or name in downstream:
        why = (f"--force {name}" if name in force else
               f"--from {name}" if name in from_ else
               f"downstream of --from {' '.join(from_)}")
        return _replace(base, forced=True, reason=why)
    return reuse if committed else None


def _replace(planned: PlannedStage, **changes: Any) -> PlannedStage:
    return dataclasses.replace(planned, **changes)


def _downstream(workflow: Workflow, roots: Sequence[str]) -> set[str]:
    """``roots`` and every stage that reads, directly or not, from one of them."""
    found = set(roots)
    for name, entry in workflow.stages.items():  # listed in order: upstream before downstream
        if found & set(entry.inputs.values()):
            found.add(name)
    return found


def _why_run(step: PlannedStage, plan: Mapping[str, PlannedStage], data_root: Path,
             producers: _ProducerLookup) -> str:
    """Why a stage without a committed output for its fingerprint runs: what changed since the
    newest committed output of the same entry (its stage record holds config, code, inputs)."""
    rerun = [u for u in dict.fromkeys(step.inputs.values())
             if u in plan and plan[u].action == "run"]
    reasons = [f"upstream {', '.join(rerun)} rerun{'s' if len(rerun) == 1 else ''}"] \
        if rerun else []
    previous = read_record(step.previous) if step.previous else None
    if previous is None:
        run_id = producers.run_id(step.stage, step.fingerprint)
        if run_id:  # MLflow remembers an output that is no longer on disk
            return (f"no committed output: MLflow run {run_id} finished this fingerprint but "
                    f"{step.output} is gone")
        return "; ".join(reasons) or "no committed output yet"
    changes, added = _config_changes(previous.get("config", {}), to_dict(step.config))
    if changes:
        shown = ", ".join(f"{step.name}.{k} {old}\u2192{new}" for k, old, new in changes[:3])
        more = f", +{len(changes) - 3} more" if len(changes) > 3 else ""
        reasons.append(f"config changed ({shown}{more})")
    if added:  # fields the config class gained since: a code change, not a user edit
        names = ", ".join(added[:2]) + (", ..." if len(added) > 2 else "")
        reasons.append(f"{len(added)} config field{'s' if len(added) > 1 else ''} new since "
                       f"{step.previous.name} ({names})")
    if previous.get("code") != step.code:
        old_libs = previous.get("libraries", {})
        new_libs = STAGES[step.stage].library_versions()
        bumped = [f"{n} {old_libs[n]}\u2192{v}" for n, v in new_libs.items()
                  if n in old_libs and old_libs[n] != v]
        reasons.append(f"library changed ({', '.join(bumped)})" if bumped else
                       f"code changed ({previous.get('code')}\u2192{step.code})")
    if not any(r.startswith("upstream") for r in reasons):
        old_inputs = previous.get("input_fingerprints", {})
        changed = [f"{slot} {old_inputs.get(slot, '?')}\u2192{fp}"
                   for slot, fp in step.input_fps.items() if old_inputs.get(slot) != fp]
        if changed:
            reasons.append(f"inputs changed ({', '.join(changed)})")
    return "; ".join(reasons) or f"fingerprint differs from {step.previous.name}"


def _config_changes(old: Mapping[str, Any], new: Mapping[str, Any],
                    ) -> tuple[list[tuple[str, Any, Any]], list[str]]:
    """``(key, old, new)`` per flattened key whose value differs, and the keys ``old`` lacks.

    Both go through a JSON round trip, so a tuple in the config equals the list in the record.
    """
    old_flat = flatten(json.loads(json.dumps(old, default=str)))
    new_flat = flatten(json.loads(json.dumps(new, default=str)))
    changed = [(k, old_flat[k], new_flat[k]) for k in sorted(set(old_flat) & set(new_flat))
               if old_flat[k] != new_flat[k]]
    return changed, sorted(set(new_flat) - set(old_flat))


class _ProducerLookup:
    """The MLflow run that produced a fingerprint (tags ``stage``, ``fingerprint``,
    ``reused=false``), looked up once per fingerprint; None of it may fail the plan."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self._experiment_id: str | None = None
        self._cache: dict[tuple[str, str], str] = {}
        self._disabled = self._missing_sqlite(tracking_uri)

    @staticmethod
    def _missing_sqlite(uri: str) -> bool:
        # Opening a SQLite URI creates the database; a plan must not write anything.
        return uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file()

    def run_id(self, stage: str, fp: str) -> str:
        if self._disabled:
            return ""
        if (stage, fp) not in self._cache:
            self._cache[(stage, fp)] = self._search(stage, fp)
        return self._cache[(stage, fp)]

    def _search(self, stage: str, fp: str) -> str:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        try:
            client = MlflowClient(self.tracking_uri)
            if self._experiment_id is None:
                experiment = client.get_experiment_by_name(self.experiment)
                if experiment is None:
                    self._disabled = True
                    return ""
                self._experiment_id = experiment.experiment_id
            runs = client.search_runs(
                [self._experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                filter_string=(f"tags.stage = '{stage}' AND tags.fingerprint = '{fp}' AND "
                               "tags.reused = 'false' AND attributes.status = 'FINISHED'"))
        except Exception as err:  # noqa: BLE001 - run ids are a courtesy of the plan
            log.warning("MLflow lookup at %s failed, plan without run ids: %s",
                        self.tracking_uri, err)
            self._disabled = True
            return ""
        return runs[0].info.run_id if runs else ""


def format_plan(plan: Sequence[PlannedStage]) -> str:
    """The ``--dry-run`` text: one line per stage, ``run``/``reuse``/``skip`` and why."""
    lines = []
    for step in plan:
        lines.append(f"{step.name:<12} {step.fingerprint}  {step.action}: {step.reason}")
    return "\n".join(lines)


StageState = Literal["done", "missing", "stale", "running"]


def stage_state(step: PlannedStage, data_root: Path) -> StageState:
    """``done``: committed for the current fingerprint; ``running``: a run holds its lock;
    ``stale``: committed only for older fingerprints; ``missing``: never committed."""
    if read_record(step.output) is not None:
        return "done"
    if is_locked(data_root, step.name, step.fingerprint):
        return "running"
    return "stale" if step.previous is not None else "missing"


def format_status(workflow: Workflow, plan: Sequence[PlannedStage]) -> str:
    """The ``mmvq status`` table: state, fingerprint, MLflow run and output per stage."""
    data_root = workflow_data_root(workflow)
    rows = [("STAGE", "STATE", "FINGERPRINT", "MLFLOW RUN", "OUTPUT")]
    notes = []
    for step in plan:
        state = stage_state(step, data_root)
        output = step.output if state in ("done", "running") else step.previous or "-"
        rows.append((step.name, state, step.fingerprint, step.run_id or "-", str(output)))
        if state == "stale":
            notes.append(f"{step.name}: stale, reruns because {step.reason}")
        left = leftovers(data_root, step.name)
        if left and state != "running":
            notes.append(f"{step.name}: {len(left)} unfinished director"
                         f"{'y' if len(left) == 1 else 'ies'} of killed runs (removed when "
                         f"that fingerprint runs next): {', '.join(p.name for p in left)}")
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"workflow {workflow.name}  data root {data_root}"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4]
              for row in rows]
    return "\n".join(lines + notes)


def _artifact_root(tracking_uri: str, data_root: Path) -> Path | None:
    """Artifacts of new experiments: beside the outputs for a local store; the server's own
    (proxied) store for a tracking server, so clients need no access to where it keeps them."""
    return None if tracking_uri.startswith(("http://", "https://")) else data_root / "mlartifacts"


def _init_ray(config: RayConfig, progress: bool, verbose: bool = False) -> None:
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        address = config.address or os.environ.get("RAY_ADDRESS")
        # Workers' stdout (train progress lines, stage messages) reaches the console; Ray's own
        # INFO chatter only with --verbose.
        kwargs: dict[str, Any] = {"log_to_driver": True,
                                  "logging_level": logging.INFO if verbose else logging.WARNING}
        if address:
            ray.init(address=address, **kwargs)
        else:
            # Every port on loopback (init_single_node). The dashboard also serves the state API
            # that Ray Train's controller polls.
            init_single_node(verbose, num_cpus=config.num_cpus, include_dashboard=True,
                             dashboard_host="127.0.0.1", **kwargs)
    context = DataContext.get_current()
    context.enable_progress_bars = progress
    # One bar per operator (read, map, write) is Ray Data's debugging view, not the user's.
    context.enable_operator_progress_bars = verbose
    context.print_on_execution_start = verbose
    if not verbose:
        # This process configured Ray Data's logging when it imported ray.data, before the
        # environment above: its console handler goes to WARNING here (the file keeps all),
        # and "Progress bars disabled" is not worth a line.
        for handler in logging.getLogger("ray.data").handlers:
            if type(handler).__name__ != "SessionFileHandler":
                handler.setLevel(logging.WARNING)
                handler.addFilter(_no_false_cpu_warning)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


def _no_false_cpu_warning(record: logging.LogRecord) -> bool:
    """Drop Ray Data's "does not have any available CPUs ... will hang" warning.

    It fires whenever actors hold every CPU, as an actor pool or train workers sized to the
    machine do; our read tasks reserve no CPU (pipeline.raydata), so nothing waits on one, and
    :func:`check_resources` already refuses what could really never be placed.
    """
    return "does not have any available CPUs" not in record.getMessage()


class ResourceError(ConfigError):
    """A stage asks for more CPUs/GPUs than the Ray cluster has; it would wait for ever."""


def check_resources(name: str, config: Any) -> None:
    """Fail at once, naming the numbers, when ``config`` needs more than Ray has in total.

    A stage config says what it cannot start without (``min_resources()``: train's workers,
    an actor pool's first actor). Without this check Ray queues the request and prints
    "The job may hang forever" while nothing moves.
    """
    import ray

    needs = getattr(config, "min_resources", None)
    if needs is None:
        return
    total = ray.cluster_resources()
    for resource, amount in needs().items():
        have = total.get(resource, 0.0)
        if amount > have:
            cluster = ", ".join(f"{k} {total.get(k, 0.0):g}" for k in ("CPU", "GPU"))
            raise ResourceError(
                f"stage {name} needs {amount:g} {resource} but this Ray cluster has {have:g} "
                f"in all ({cluster}); lower its num_workers/num_actors or give Ray more "
                "(ray.num_cpus in the workflow, --num-cpus for mmvq stage)")


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
