"""Run a planned workflow (or one stage): every stage tracked in MLflow, outputs committed.

:func:`run_workflow` takes the plan (:mod:`workflows.plan`: per stage run, reuse or skip, and
why), starts Ray, and runs or reuses each stage into its committed directory
(:func:`pipeline.stage.commit_stage`). All of it is tracked in MLflow: one experiment per
workflow, one parent run per invocation, one nested run per stage tagged with ``stage`` and
``fingerprint``. The committed directory decides reuse; MLflow names the run that produced it.
:func:`run_single_stage` is ``mmvq stage``: one stage on committed inputs or the user's shards.

Tracking degrades loudly. At the end of each stage the runner closes the stage's logger, sends
what it and the stage's workers could not (:func:`pipeline.tracking.replay_spools`), and for
anything still missing tags the run ``mmvq.tracking=incomplete`` and prints a warning with the
counts; the next invocation sends it. While an invocation runs, ``{data_root}/.mlflow-runs``
lists its runs under a lock that dies with the process, so the next invocation marks the runs
of a killed one KILLED; SIGTERM and SIGHUP end them KILLED at exit already.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from pipeline.config import (
    ConfigError,
    flatten,
    from_dict,
    to_dict,
    writable_dir,
)
from pipeline.formats.preprocessed import CONTRACT_FILE, read_contract
from pipeline.raydata import init_single_node
from pipeline.stage import (
    StageContext,
    StageOutput,
    StageSpec,
    commit_stage,
    committed_dir,
    fingerprint,
    read_record,
)
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
from workflows.plan import PlannedStage, external_fingerprint, input_locations, plan_workflow
from workflows.report import StageResult, headline_metrics
from workflows.spec import RayConfig, Workflow, workflow_data_root, workflow_tracking_uri
from workflows.stages import STAGES

log = logging.getLogger(__name__)


FLUSH_S = 15.0  # at a stage's end: how long its logger waits for a tracking server that is down


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
    client = _start_tracking_and_ray(tracking_uri, workflow.ray, progress, verbose)
    for planned in plan:  # before anything runs: a stage that cannot be placed fails now
        if planned.action == "run":
            check_resources(planned.name, planned.config)

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
        headline = headline_metrics(results)
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
            spec, planned.config, StageOutput(data_root, name, fp),
            record={"stage": spec.name, "entry": name, "fingerprint": fp, "code": planned.code,
                    "libraries": spec.library_versions(),
                    "config": to_dict(planned.config), "input_fingerprints": planned.input_fps,
                    "inputs": {k: str(v) for k, v in inputs.items()},
                    "mlflow_run_id": run.info.run_id},
            ctx=StageContext(output_dir=planned.output, inputs=dict(inputs), logger=logger,
                             tracking_uri=tracking_uri, progress=progress, verbose=verbose),
            force=planned.forced,
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
    cfg = from_dict(spec.config_type, _derived_single(spec, config, inputs), source=source)
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
    client = _start_tracking_and_ray(tracking_uri, ray or RayConfig(), progress, verbose)
    check_resources(spec.name, cfg)
    experiment_id = ensure_experiment(client, f"stage-{stage}",
                                      _artifact_root(tracking_uri, data_root))
    with _invocation(client, tracking_uri, data_root, experiment_id, run_name=f"stage-{stage}",
                     tags={"workflow": f"stage-{stage}"}) as invocation:
        return _run_stage(planned, {slot: path for slot, (path, _) in upstream.items()},
                          data_root, client, experiment_id, invocation, tracking_uri,
                          progress=progress, verbose=verbose)


def _derived_single(spec: StageSpec, config: Mapping[str, Any],
                    inputs: Mapping[str, str | Path]) -> dict[str, Any]:
    """``config`` with what the inputs' data contracts decide filled in (``mmvq stage``: the
    contract is the file beside a committed input, e.g. preprocess's data.json)."""
    if spec.derive is None:
        return dict(config)
    contracts = {slot: (read_contract(where), str(where)) for slot, where in inputs.items()
                 if "://" not in str(where) and (Path(where) / CONTRACT_FILE).is_file()}
    return spec.derive(config, contracts)


def _artifact_root(tracking_uri: str, data_root: Path) -> Path | None:
    """Artifacts of new experiments: beside the outputs for a local store; the server's own
    (proxied) store for a tracking server, so clients need no access to where it keeps them."""
    return None if tracking_uri.startswith(("http://", "https://")) else data_root / "mlartifacts"


def _start_tracking_and_ray(tracking_uri: str, config: RayConfig, progress: bool,
                            verbose: bool) -> MlflowClient:
    """The tracking client, opened on a thread while Ray starts (:func:`_init_ray`).

    Both mostly wait: ``ray.init`` on the daemons it spawns, the client, for a new SQLite store,
    on creating its tables (~2 s; MLflow itself is imported with this module, before either).
    One after the other they were the first ~8 s of ``mmvq stage preprocess``.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmvq-tracking") as pool:
        client = pool.submit(tracking_client, tracking_uri)
        _init_ray(config, progress, verbose)
        return client.result()


def _init_ray(config: RayConfig, progress: bool, verbose: bool = False) -> None:
    """Connect to ``config.address`` (or ``RAY_ADDRESS``), else start Ray in this process on
    loopback, with its dashboard only when ``config.dashboard``."""
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
            # Every port on loopback (init_single_node). No dashboard unless asked for: nothing
            # here needs its state API (pipeline.train drops the one Ray Train callback that
            # polls it), and its nine processes are ~2.5 s of a start on 2 cores.
            init_single_node(verbose, num_cpus=config.num_cpus,
                             include_dashboard=config.dashboard,
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
