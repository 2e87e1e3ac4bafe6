"""MLflow helpers: where runs go, and logging that never stalls or silently loses the work it records.

One experiment per workflow, one parent run per invocation, one nested run per stage
(DESIGN.md). With no tracking URI given, runs go to a SQLite file under the data root, so the
embedded default needs no server; that file is created under a lock (:func:`tracking_client`),
since two processes migrating a fresh store at once break it.

Training workers and stages log through :class:`RunLogger`, which talks to an existing run by
id. Its calls return at once (or after at most ``wait_s``): a background thread sends what they
queued, with a bounded timeout per request. What the server does not take (it is down, or hangs)
goes to a spool, a JSON-lines file per logger under :func:`spool_root`, and is sent again when
the server answers, when the logger closes, and by :func:`replay_spools` (the runner calls it at
the end of every stage and at the start of every workflow run). A run whose data is still
missing when its logger closes is tagged ``mmvq.tracking=incomplete`` (or, with the server
unreachable, that tag waits in the spool) and the loss is printed with counts; once a later
replay completes it, the tag becomes ``replayed``.

MLflow's own asynchronous logging (``log_batch(..., synchronous=False)``) does not do this: its
queue is unbounded, a batch that fails is logged as an error and dropped, and it has no
artifacts, dataset inputs or status changes.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import queue
import shutil
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

# MLflow rejects param values over this length; long values (lists) are cut, not dropped.
_MAX_PARAM_CHARS = 6000
SPOOL_ENV = "MMVQ_TRACKING_SPOOL"  # where spools live, for every process of a run (see spool_root)
TRACKING_TAG = "mmvq.tracking"  # "incomplete": data is missing; "replayed": it arrived late
_INCOMPLETE = "INCOMPLETE"  # marker in a run's spool folder: the run was tagged incomplete
_QUEUE_SIZE = 1000  # ops waiting for the sender; beyond it a call spools its op itself
_PROBE_MAX_S = 10.0  # longest wait between two attempts to reach a server that failed
_IDLE_EXIT_S = 2.0  # a sender with nothing to do for this long ends (the next op starts one)


def default_tracking_uri(data_root: str | Path) -> str:
    """The embedded default: MLFLOW_TRACKING_URI if set, else a SQLite file under the data root."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(data_root).resolve() / 'mlflow.db')}"


def tracking_client(tracking_uri: str) -> MlflowClient:
    """An ``MlflowClient`` whose requests are bounded in time, the store created safely.

    A SQLite store is created (tables, migrations) by the first client that opens it; two
    processes doing that at once fail (``table experiments already exists``, ``duplicate column
    name``), so clients are made holding an ``flock`` on ``{db}.lock``.
    """
    _bound_http_requests()
    db = _sqlite_path(tracking_uri)
    if db is None:
        return MlflowClient(tracking_uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            return MlflowClient(tracking_uri)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _bound_http_requests() -> None:
    # MLflow's HTTP layer retries 7 times with exponential backoff and waits 120 s for each
    # answer (minutes against a dead or hung server). Logging retries on its own terms, off the
    # caller's thread; keep each request short unless the user set these.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def ensure_experiment(client: MlflowClient, name: str, artifact_root: Path | None) -> str:
    """Experiment id for ``name``, created with artifacts under ``artifact_root`` if new.

    Without an explicit artifact location, a SQLite-backed experiment writes artifacts to
    ``./mlruns`` of whatever directory the process happens to run in.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = artifact_root.resolve().as_uri() if artifact_root else None
    return client.create_experiment(name, artifact_location=location)


def spool_root(tracking_uri: str) -> Path:
    """Where the spools of runs tracked at ``tracking_uri`` live.

    ``$MMVQ_TRACKING_SPOOL`` if set (on a cluster, point it at shared storage so the driver can
    replay what a worker could not send), else beside a SQLite store, else the user's cache.
    Every process of a run computes the same place, so one can replay another's spool.
    """
    env = os.environ.get(SPOOL_ENV)
    db = _sqlite_path(tracking_uri)
    if env:
        base = Path(env)
    elif db is not None:
        base = db.resolve().parent / ".mlflow-spool"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmvq" / "spool"
    return base / hashlib.sha256(tracking_uri.encode()).hexdigest()[:12]


@dataclass
class Pending:
    """What a run's MLflow record lacks: ops still in a spool, and ops the server refused."""

    metrics: int = 0  # metric values
    steps: tuple[int, int] | None = None  # lowest and highest step among those values
    artifacts: int = 0  # artifact files or folders
    other: int = 0  # params, tags, dataset inputs, status changes (one per call)
    rejected: int = 0  # ops refused as invalid (or files gone): not retried, kept aside

    def add(self, op: Mapping[str, Any]) -> None:
        if op["op"] == "metrics":
            self.metrics += len(op["metrics"])
            steps = [m[3] for m in op["metrics"]]
            if steps:
                low, high = self.steps or (min(steps), max(steps))
                self.steps = (min(low, *steps), max(high, *steps))
        elif op["op"] in ("artifact", "artifacts"):
            self.artifacts += 1
        else:
            self.other += 1

    def merge(self, other: Pending) -> None:
        self.metrics += other.metrics
        self.artifacts += other.artifacts
        self.other += other.other
        self.rejected += other.rejected
        if other.steps:
            low, high = self.steps or other.steps
            self.steps = (min(low, other.steps[0]), max(high, other.steps[1]))

    def __bool__(self) -> bool:
        return bool(self.metrics or self.artifacts or self.other or self.rejected)

    def describe(self) -> str:
        """``84 metric values (steps 15-35), 2 artifacts, 1 other``."""
        parts = []
        if self.metrics:
            low, high = self.steps or (None, None)
            steps = ("" if low is None else f" (step {low})" if low == high
                     else f" (steps {low}-{high})")
            parts.append(f"{self.metrics} metric value{_s(self.metrics)}{steps}")
        if self.artifacts:
            parts.append(f"{self.artifacts} artifact{_s(self.artifacts)}")
        if self.other:
            parts.append(f"{self.other} other")
        if self.rejected:
            parts.append(f"{self.rejected} refused as invalid")
        return ", ".join(parts) or "nothing"


def _s(n: int) -> str:
    return "" if n == 1 else "s"


class RunLogger:
    """Log to one MLflow run by id, off the caller's thread; nothing it cannot send is dropped.

    Calls queue an op and return once it is sent or after ``wait_s`` seconds, whichever comes
    first; with the server failing (ops already spooled, or one in flight for over ``wait_s``)
    they return at once. ``wait_s=0`` (the training loop) never waits. A failed op is tried
    ``retries + 1`` times with exponential backoff, then spooled, and every later op is spooled
    behind it until the server answers again. Artifacts are copied (hard-linked where possible)
    when logged, so the caller may delete its file at once. Call :meth:`close` at the end: it
    sends what it can within its timeout and says what is still missing.

    Usable from any process (a Ray Train worker, an actor): it pickles as its URI and run id.
    """

    def __init__(self, tracking_uri: str, run_id: str, retries: int = 3,
                 backoff_s: float = 0.5, wait_s: float = 5.0) -> None:
        _bound_http_requests()
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.retries = retries
        self.backoff_s = backoff_s
        self.wait_s = wait_s
        self._client: MlflowClient | None = None
        self._spool = _Spool(spool_root(tracking_uri) / run_id)
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUE_SIZE)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()  # the current sender's; each sender gets its own
        self._start_lock = threading.Lock()
        self._outstanding = 0  # ops queued and not handled yet
        self._inflight: dict[str, Any] | None = None  # the op being sent
        self._busy_since: float | None = None  # when it was taken up
        self._down = False  # the last attempt failed; ops go to the spool until one succeeds
        self._next_probe = 0.0
        self._probe_s = 1.0
        self._rejected = Pending()  # counts only ``rejected``: what the server refused
        self._replaying = threading.Lock()  # one replay at a time (a stuck sender may linger)
        _LIVE.add(self)

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id,
                "retries": self.retries, "backoff_s": self.backoff_s, "wait_s": self.wait_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = tracking_client(self.tracking_uri)
        return self._client

    @property
    def spool_dir(self) -> Path:
        """This run's spool folder (shared with the run's other loggers)."""
        return self._spool.run_dir

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        """Log a dict of metrics at ``step`` in one request, timestamped now."""
        now = int(time.time() * 1000)
        self._submit({"op": "metrics",
                      "metrics": [[_metric_key(k), float(v), now, step] for k, v in values.items()]})

    def params(self, values: Mapping[str, Any]) -> None:
        """Log flattened params, skipping ones the run already has (safe on resume)."""
        self._submit({"op": "params", "params": {k: _param_value(v) for k, v in values.items()}})

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file (copied now: the caller may delete it once this returns)."""
        self._stage_and_submit("artifact", Path(path), artifact_path)

    def artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        """Log a folder's files (copied now, as :meth:`artifact`)."""
        self._stage_and_submit("artifacts", Path(directory), artifact_path)

    def _stage_and_submit(self, kind: str, source: Path, artifact_path: str | None) -> None:
        op = {"op": kind, "path": str(source), "artifact_path": artifact_path}
        try:
            op["path"] = self._spool.stage(source)
        except OSError as err:  # a missing file: the caller's bug, counted, never raised
            log.warning("MLflow %s of %s impossible: %s", _describe(op), source, err)
            self._rejected.rejected += 1
            return
        self._submit(op)

    def tags(self, values: Mapping[str, Any]) -> None:
        self._submit({"op": "tags", "tags": {k: str(v) for k, v in values.items()}})

    def status(self, value: str) -> None:
        """Set the run's status (``RUNNING``, ``FINISHED``, ...), e.g. when a resumed training
        continues a run an earlier, killed invocation left behind."""
        self._submit({"op": "status", "status": value})

    def terminate(self, status: str) -> None:
        """End the run with ``status`` (``FINISHED``, ``FAILED``, ``KILLED``), timed now."""
        self._submit({"op": "terminate", "status": status, "end_time": int(time.time() * 1000)})

    def dataset_input(self, dataset: Any, context: str,
                      tags: Mapping[str, Any] | None = None) -> None:
        """Record an ``mlflow.data`` dataset as an input of the run (lineage in the UI).

        ``context`` says how the run used it (``source``, ``tokens/val``); ``tags`` are extra
        input tags, e.g. the tokenizer that wrote a token dataset.
        """
        d = dataset.to_dict()
        self._submit({"op": "inputs", "context": context,
                      "dataset": {k: d.get(k) for k in ("name", "digest", "source_type",
                                                        "source", "schema", "profile")},
                      "tags": {k: str(v) for k, v in (tags or {}).items()}})

    def last_step(self, key: str) -> int:
        """Highest step logged for metric ``key``, -1 if none (or the server cannot say).

        A resumed training skips steps up to it, so the history holds each step once. One
        bounded request: the caller is waiting.
        """
        try:
            return max((m.step for m in self.client.get_metric_history(self.run_id, key)),
                       default=-1)
        except Exception as err:  # noqa: BLE001 - tracking must never kill the work
            log.warning("MLflow read metric history failed, continuing: %s", err)
            return -1

    @property
    def reachable(self) -> bool:
        """False while the last attempt to reach the server failed."""
        return not self._down

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait up to ``timeout_s`` until everything queued or spooled is sent; True if it is."""
        deadline = time.monotonic() + timeout_s
        self._probe_s, self._next_probe = 0.5, 0.0  # try the server often while someone waits
        while not (self._outstanding == 0 and not len(self._spool)):
            if time.monotonic() >= deadline:
                return False
            self._ensure_thread()
            time.sleep(0.05)
        return True

    def close(self, timeout_s: float = 15.0, mark: bool = True) -> Pending:
        """Flush (up to ``timeout_s``), stop the sender and say what the run still lacks.

        What is left stays in the spool for :func:`replay_spools`. With ``mark``, a run that
        lacks anything is tagged ``mmvq.tracking=incomplete`` (the tag waits in the spool if the
        server cannot be reached) and a warning with the counts is logged; the runner passes
        False and does both for all the loggers of a stage at once. Logging after ``close``
        starts a new sender.
        """
        self.flush(timeout_s)
        with self._start_lock:
            thread, self._thread = self._thread, None
            self._stop.set()
            self._stop = threading.Event()
        if thread is not None:
            thread.join(timeout=1.0)
            if thread.is_alive():  # stuck in a request: keep a copy of what it holds
                inflight = self._inflight
                self._spool.append(([inflight] if inflight else []) + self._drain_queue())
        pending = self._spool.pending()
        pending.merge(self._rejected)
        if pending and mark:
            mark_incomplete(self.tracking_uri, self.run_id, pending, try_server=not self._down)
            log.warning("MLflow run %s is missing %s; kept in %s and sent when the workflow "
                        "runs next", self.run_id, pending.describe(), self._spool.run_dir)
        self._spool.release()
        self._rejected = Pending()
        return pending

    # -- the sender ---------------------------------------------------------------------------

    def _submit(self, op: dict[str, Any]) -> None:
        done = threading.Event()
        with self._start_lock:
            self._outstanding += 1
        try:
            self._queue.put_nowait((op, done))
        except queue.Full:  # the sender is stuck in a request: never wait for it
            self._spool.append([op])
            self._handled()
            return
        self._ensure_thread()
        if self.wait_s > 0 and not self._failing():
            done.wait(self.wait_s)

    def _failing(self) -> bool:
        busy = self._busy_since
        return self._down or bool(len(self._spool)) or (
            busy is not None and time.monotonic() - busy > self.wait_s)

    def _handled(self) -> None:
        with self._start_lock:
            self._outstanding -= 1

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, args=(self._stop,),
                                                daemon=True,
                                                name=f"mlflow-sender-{self.run_id[:8]}")
                self._thread.start()

    def _run(self, stop: threading.Event) -> None:
        idle_since = time.monotonic()
        while not (stop.is_set() and self._queue.empty()):
            try:
                op, done = self._queue.get(timeout=0.1)
            except queue.Empty:
                op = done = None
            if op is not None:
                idle_since = time.monotonic()
                try:
                    self._handle(op)
                finally:
                    done.set()
                    self._handled()
            if len(self._spool):
                idle_since = time.monotonic()
                if time.monotonic() >= self._next_probe and not stop.is_set():
                    self._replay()
            elif time.monotonic() - idle_since > _IDLE_EXIT_S:
                with self._start_lock:  # _ensure_thread sees either this thread or None
                    if self._queue.empty() and self._thread is threading.current_thread():
                        self._thread = None
                        return

    def _handle(self, op: dict[str, Any]) -> None:
        if self._down or len(self._spool):  # keep the order: behind what waits already
            self._spool.append([op])
            return
        err: Exception | None = None
        for attempt in range(self.retries + 1):
            outcome, err = self._attempt(op)
            if outcome != "transient":
                return
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2 ** attempt)
        log.warning("MLflow %s failed after %d tries, kept in %s for replay: %s",
                    _describe(op), self.retries + 1, self._spool.run_dir, err)
        self._spool.append([op])
        self._went_down()

    def _attempt(self, op: dict[str, Any]) -> tuple[str, Exception | None]:
        """Send one op: ``ok``, ``rejected`` (dropped, counted, kept aside) or ``transient``."""
        self._inflight, self._busy_since = op, time.monotonic()
        try:
            send_op(self.client, self.run_id, op)
        except Exception as err:  # noqa: BLE001 - tracking must never kill the work
            if not is_permanent(err):
                return "transient", err
            log.warning("MLflow refused %s, not retried: %s", _describe(op), err)
            self._rejected.rejected += 1
            self._spool.reject(op, err)
            return "rejected", err
        finally:
            self._inflight = self._busy_since = None
        _discard_staged(op)
        return "ok", None

    def _replay(self) -> None:
        """Send the spool, oldest first, until the server fails again."""
        if not self._replaying.acquire(blocking=False):
            return
        try:
            entries = self._spool.snapshot()
            done = 0
            for op in entries:
                outcome, _ = self._attempt(op)
                if outcome == "transient":
                    self._spool.drop(done)
                    self._went_down()
                    return
                done += 1
            self._spool.drop(done)
            if self._down:
                log.warning("MLflow at %s answers again: sent %d spooled ops of run %s",
                            self.tracking_uri, done, self.run_id)
            self._down, self._probe_s = False, 1.0
        finally:
            self._replaying.release()

    def _went_down(self) -> None:
        self._down = True
        self._next_probe = time.monotonic() + self._probe_s
        self._probe_s = min(self._probe_s * 2, _PROBE_MAX_S)

    def _drain_queue(self) -> list[dict[str, Any]]:
        ops = []
        while True:
            try:
                op, done = self._queue.get_nowait()
            except queue.Empty:
                return ops
            ops.append(op)
            done.set()
            self._handled()


# Loggers alive in this process: at exit, what they hold in memory goes to their spools.
_LIVE: weakref.WeakSet[RunLogger] = weakref.WeakSet()


@atexit.register
def _close_live_loggers() -> None:
    for logger in list(_LIVE):
        if logger._thread is not None or logger._spool.claimed:
            with contextlib.suppress(Exception):
                logger.close(timeout_s=2.0)


# -- sending one op ---------------------------------------------------------------------------

def _send_metrics(client: MlflowClient, run_id: str, op: Mapping[str, Any]) -> None:
    metrics = [Metric(k, v, ts, step) for k, v, ts, step in op["metrics"]]
    for start in range(0, len(metrics), 1000):  # MLflow caps a batch at 1000 metrics
        client.log_batch(run_id, metrics=metrics[start:start + 1000])


def _send_params(client: MlflowClient, run_id: str, op: Mapping[str, Any]) -> None:
    existing = client.get_run(run_id).data.params
    fresh = [Param(k, v) for k, v in op["params"].items() if k not in existing]
    for start in range(0, len(fresh), 100):  # and at 100 params
        client.log_batch(run_id, params=fresh[start:start + 100])


def _send_tags(client: MlflowClient, run_id: str, op: Mapping[str, Any]) -> None:
    tags = [RunTag(k, v) for k, v in op["tags"].items()]
    for start in range(0, len(tags), 100):
        client.log_batch(run_id, tags=tags[start:start + 100])


def _send_artifact(client: MlflowClient, run_id: str, op: Mapping[str, Any]) -> None:
    client.log_artifact(run_id, op["path"], op["artifact_path"])


def _send_artifacts(client: MlflowClient, run_id: str, op: Mapping[str, Any]) -> None:
    client.log_artifacts(run_id, op["path"], op["artifact_path"])


def _send_status(client: MlflowClient, run_id: str, op: Mapping[str, Any]) -> None:
    client.update_run(run_id, status=op["status"])


def _send_terminate(client: MlflowClient, run_id: str, op: Mapping[str, Any]) -> None:
    client.set_terminated(run_id, op["status"], op["end_time"])


def _send_inputs(client: MlflowClient, run_id: str, op: Mapping[str, Any]) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    entity = Dataset(**op["dataset"])
    tags = [InputTag("mlflow.data.context", op["context"]),
            *(InputTag(k, v) for k, v in op["tags"].items())]
    client.log_inputs(run_id, datasets=[DatasetInput(entity, tags)])


SENDERS: dict[str, Callable[[MlflowClient, str, Mapping[str, Any]], None]] = {
    "metrics": _send_metrics, "params": _send_params, "tags": _send_tags,
    "artifact": _send_artifact, "artifacts": _send_artifacts, "status": _send_status,
    "terminate": _send_terminate, "inputs": _send_inputs,
}


def send_op(client: MlflowClient, run_id: str, op: Mapping[str, Any]) -> None:
    """Send one spooled op to the run (raises what MLflow raises)."""
    SENDERS[op["op"]](client, run_id, op)


def is_permanent(err: Exception) -> bool:
    """Whether sending again cannot help: the server refused the request (a 4xx other than
    408/429: an invalid value, a deleted run) or an artifact's copy is gone."""
    if isinstance(err, FileNotFoundError):
        return True
    status = None
    if hasattr(err, "get_http_status_code"):  # MlflowException; connection errors are 500
        status = err.get_http_status_code()
    elif getattr(err, "response", None) is not None:  # requests.HTTPError (artifact uploads)
        status = err.response.status_code
    return status is not None and 400 <= status < 500 and status not in (408, 429)


def _describe(op: Mapping[str, Any]) -> str:
    return {"metrics": "log metrics", "params": "log params", "tags": "set tags",
            "artifact": "log artifact", "artifacts": "log artifacts", "status": "set status",
            "terminate": "end run", "inputs": "log input"}[op["op"]]


def _discard_staged(op: Mapping[str, Any]) -> None:
    if op["op"] in ("artifact", "artifacts"):
        shutil.rmtree(Path(op["path"]).parent if op["op"] == "artifact" else op["path"],
                      ignore_errors=True)


# -- the spool --------------------------------------------------------------------------------

class _Spool:
    """One logger's share of a run's spool folder.

    ``{owner}.jsonl`` holds the ops not sent yet, oldest first; ``{owner}.files/`` the copies
    of artifacts; ``{owner}.rejected.jsonl`` the ops the server refused. The logger holds an
    ``flock`` on ``{owner}.lock`` while it uses them, so :func:`replay_spools` in another
    process leaves them alone until it is closed or dead (the kernel drops the lock then).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._mutex = threading.RLock()
        self._entries: list[dict[str, Any]] = []
        self._lock_handle = None
        self._new_owner()

    def _new_owner(self) -> None:
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path = self.run_dir / f"{self.owner}.jsonl"

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def claimed(self) -> bool:
        """Whether this logger holds files in the run's spool folder (to release at the end)."""
        return self._lock_handle is not None

    def _claim(self) -> None:
        if self._lock_handle is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            handle = open(self.run_dir / f"{self.owner}.lock", "a")  # noqa: SIM115 - held
            fcntl.flock(handle, fcntl.LOCK_EX)
            self._lock_handle = handle

    def stage(self, source: Path) -> str:
        """A private copy of the file or folder ``source`` (hard links where possible)."""
        with self._mutex:
            self._claim()
        slot = self.run_dir / f"{self.owner}.files" / uuid.uuid4().hex[:12]
        if source.is_dir():
            shutil.copytree(source, slot, copy_function=_link_or_copy)
            return str(slot)
        slot.mkdir(parents=True)
        _link_or_copy(str(source), str(slot / source.name))
        return str(slot / source.name)

    def append(self, ops: list[dict[str, Any]]) -> None:
        if not ops:
            return
        with self._mutex:
            self._claim()
            with open(self.path, "a") as handle:
                handle.writelines(json.dumps(op) + "\n" for op in ops)
            self._entries.extend(ops)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._mutex:
            return list(self._entries)

    def drop(self, count: int) -> None:
        """Forget the ``count`` oldest ops (sent); ops appended since stay."""
        if count == 0:
            return
        with self._mutex:
            self._entries = self._entries[count:]
            _rewrite(self.path, self._entries)

    def reject(self, op: dict[str, Any], err: Exception) -> None:
        with self._mutex:
            self._claim()
            with open(self.run_dir / f"{self.owner}.rejected.jsonl", "a") as handle:
                handle.write(json.dumps({**op, "error": str(err)[:2000]}) + "\n")

    def pending(self) -> Pending:
        found = Pending()
        for op in self.snapshot():
            found.add(op)
        return found

    def release(self) -> None:
        """Give the files up to :func:`replay_spools` (deleting what is empty); a later op
        starts under a new owner name."""
        with self._mutex:
            if self._lock_handle is None:
                return
            if not self._entries:
                _remove_owner(self.run_dir, self.owner, keep_rejected=True)
            self._lock_handle.close()  # drops the flock
            self._lock_handle = None
            self._entries = []
            self._new_owner()
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # only if nothing else is in it


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _rewrite(path: Path, entries: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(op) + "\n" for op in entries))
    os.replace(tmp, path)


def _read_entries(path: Path) -> list[dict[str, Any]]:
    entries = []
    if not path.is_file():
        return entries
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line cut short by a crash
            entries.append(json.loads(line))
    return entries


def _remove_owner(run_dir: Path, owner: str, keep_rejected: bool) -> None:
    (run_dir / f"{owner}.jsonl").unlink(missing_ok=True)
    shutil.rmtree(run_dir / f"{owner}.files", ignore_errors=True)
    if not (keep_rejected and (run_dir / f"{owner}.rejected.jsonl").exists()):
        (run_dir / f"{owner}.lock").unlink(missing_ok=True)


def _remove_abandoned(run_dir: Path) -> None:
    """Artifact copies of loggers that died with nothing spooled (their ops were sent)."""
    for lock in run_dir.glob("*.lock"):
        owner = lock.name[:-len(".lock")]
        if (run_dir / f"{owner}.jsonl").exists():
            continue
        with _owned(lock) as mine:
            if mine:
                _remove_owner(run_dir, owner, keep_rejected=True)


@contextlib.contextmanager
def _owned(lock: Path) -> Iterator[bool]:
    """Hold ``lock`` if its owner is gone (True), else do nothing (False)."""
    try:
        handle = open(lock, "a")  # noqa: SIM115 - closed below
    except OSError:
        yield False
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        yield False
        return
    try:
        yield True
    finally:
        handle.close()


@dataclass
class ReplayResult:
    """What :func:`replay_spools` sent (per run) and what is still missing (per run)."""

    replayed: dict[str, Pending] = field(default_factory=dict)
    left: dict[str, Pending] = field(default_factory=dict)
    reachable: bool = True


def replay_spools(tracking_uri: str, run_ids: set[str] | None = None,
                  send: bool = True) -> ReplayResult:
    """Send what closed or dead loggers left in the spools of ``tracking_uri``'s runs.

    Spools of loggers still alive (in this process or another) are counted, not touched: their
    own sender replays them. The first failure to reach the server ends the sending (the rest
    is counted), so a dead server costs one bounded request. A run whose spool becomes empty
    and that was tagged incomplete is tagged ``mmvq.tracking=replayed``. ``send=False`` only
    counts.
    """
    base = spool_root(tracking_uri)
    result = ReplayResult(reachable=send)
    if not base.is_dir():
        return result
    client = None
    for run_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        run_id = run_dir.name
        if run_ids is not None and run_id not in run_ids:
            continue
        sent, left = Pending(), Pending()
        for data in sorted(run_dir.glob("*.jsonl")):
            if data.name.endswith(".rejected.jsonl"):
                continue
            owner = data.name[:-len(".jsonl")]
            with _owned(run_dir / f"{owner}.lock") as mine:
                entries = _read_entries(data)
                done = 0
                if mine and result.reachable:
                    if client is None:
                        client = tracking_client(tracking_uri)
                    done = _send_entries(client, run_id, entries, run_dir, owner, result)
                for op in entries[:done]:
                    sent.add(op)
                for op in entries[done:]:
                    left.add(op)
                if mine and done:
                    if done == len(entries):
                        _remove_owner(run_dir, owner, keep_rejected=True)
                    else:
                        _rewrite(data, entries[done:])
        _remove_abandoned(run_dir)
        if sent:
            result.replayed[run_id] = sent
        if left:
            result.left[run_id] = left
        elif (run_dir / _INCOMPLETE).exists() and result.reachable:
            if client is None:
                client = tracking_client(tracking_uri)
            _mark_replayed(client, run_id, run_dir)
        with contextlib.suppress(OSError):
            run_dir.rmdir()
    return result


def _send_entries(client: MlflowClient, run_id: str, entries: list[dict[str, Any]],
                  run_dir: Path, owner: str, result: ReplayResult) -> int:
    """Send ``entries`` in order until one fails to reach the server; how many went."""
    for done, op in enumerate(entries):
        try:
            send_op(client, run_id, op)
        except Exception as err:  # noqa: BLE001 - a replay must never kill the work
            if not is_permanent(err):
                log.warning("MLflow at %s still unreachable, %d spooled ops of run %s wait: "
                            "%s", client.tracking_uri, len(entries) - done, run_id, err)
                result.reachable = False
                return done
            log.warning("MLflow refused spooled %s of run %s: %s", _describe(op), run_id, err)
            with open(run_dir / f"{owner}.rejected.jsonl", "a") as handle:
                handle.write(json.dumps({**op, "error": str(err)[:2000]}) + "\n")
        _discard_staged(op)
    return len(entries)


def _mark_replayed(client: MlflowClient, run_id: str, run_dir: Path) -> None:
    try:
        client.set_tag(run_id, TRACKING_TAG, "replayed")
    except Exception as err:  # noqa: BLE001
        log.warning("MLflow could not tag run %s replayed: %s", run_id, err)
        return
    (run_dir / _INCOMPLETE).unlink(missing_ok=True)


def mark_incomplete(tracking_uri: str, run_id: str, pending: Pending,
                    try_server: bool = True) -> bool:
    """Tag the run ``mmvq.tracking=incomplete`` with the counts; True if the server took it.

    With the server unreachable (or ``try_server`` False) the tags wait in the run's spool, and
    a marker there says so; the replay that completes the run then tags it ``replayed``.
    """
    run_dir = spool_root(tracking_uri) / run_id
    tags = {TRACKING_TAG: "incomplete", f"{TRACKING_TAG}.missing": pending.describe(),
            f"{TRACKING_TAG}.spool": str(run_dir)}
    run_dir.mkdir(parents=True, exist_ok=True)
    if pending.metrics or pending.artifacts or pending.other:  # spooled: may arrive later
        (run_dir / _INCOMPLETE).touch()
    if try_server:
        try:
            _send_tags(tracking_client(tracking_uri), run_id, {"tags": tags})
            return True
        except Exception as err:  # noqa: BLE001
            log.warning("MLflow could not tag run %s incomplete: %s", run_id, err)
    # An owner of its own that nobody holds: the next replay_spools sends it.
    owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    (run_dir / f"{owner}.jsonl").write_text(json.dumps({"op": "tags", "tags": tags}) + "\n")
    return False


def _metric_key(key: str) -> str:
    # MLflow keys allow '/', which groups charts in the UI (``image/psnr``); keep them as they are.
    return key


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _MAX_PARAM_CHARS else text[:_MAX_PARAM_CHARS - 3] + "..."


def mlflow_dataset(directory: str | Path, name: str, location: str | Path | None = None) -> Any:
    """An ``mlflow.data`` dataset describing the parquet files in ``directory`` (for lineage).

    Its source is ``location`` (default: the directory; a stage passes where its output will be
    committed), its schema the parquet schema, and its digest a hash over file names and bytes,
    so a changed dataset gets a new digest. Files are read in 1 MiB blocks, never whole.
    """
    import warnings

    import pyarrow as pa
    import pyarrow.parquet as pq
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    files = sorted(Path(directory).rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{directory}: no parquet files")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
    def column_type(t: pa.DataType) -> Any:
        if pa.types.is_list(t):
            return Array(DataType.integer)  # every list column holds int32 codes
        return DataType.integer if pa.types.is_integer(t) else DataType.string

    schema = Schema([ColSpec(column_type(f.type), f.name) for f in pq.read_schema(files[0])])
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": local path, fine
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(location or directory))
    return MetaDataset(source, name=name, digest=digest.hexdigest()[:16], schema=schema)
