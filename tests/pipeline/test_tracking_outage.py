"""A tracking server that dies or hangs: nothing is lost silently and no training step stalls.

Each test runs its own ``mlflow server`` (function scope) over a SQLite store on a fixed port, so
it can kill it (SIGKILL of its whole process group) and start it again on the same port and
store, or freeze it (SIGSTOP) and thaw it (SIGCONT). The training tests use the tiny model of
``test_train.py`` on the session's in-process Ray; the runner tests use a stage that only logs,
and no Ray at all.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import traindata
from mlflow.tracking import MlflowClient

from pipeline.stage import StageContext, StageSpec
from pipeline.tracking import TRACKING_TAG, RunLogger, replay_spools

pytestmark = pytest.mark.integration

# Steps of the tiny model (about 0.15 s each on 2 cores): enough that training outlasts the
# start of a fault by several seconds, since the server may see the first steps late.
STEPS, VAL_EVERY = 60, 10


class Server:
    """An ``mlflow server`` that a test can kill, restart, freeze and thaw."""

    def __init__(self, root: Path) -> None:
        self.root = root
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180) -> None:
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        with open(self.root / "server.log", "ab") as log_file:
            self.proc = subprocess.Popen(
                [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                 "--default-artifact-root", (self.root / "artifacts").as_uri(),
                 "--workers", "1"],
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "MLFLOW_TRACKING_URI": ""})
        deadline = time.time() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.kill()
                    raise RuntimeError("mlflow server did not start:\n"
                                       + (self.root / "server.log").read_text()[-3000:])
                time.sleep(0.3)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def freeze(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    srv = Server(root)
    srv.start()
    yield srv
    if srv.proc is not None and srv.proc.poll() is None:
        srv.thaw()
        srv.kill()


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local):
    # 30 steps per epoch (2 workers x batch 4): one epoch, one data pipeline start.
    return traindata.write_dataset(tmp_path_factory.mktemp("outage-data"), train_rows=240)


class Chaos(threading.Thread):
    """Once the run has logged ``after`` steps: ``fault()``, wait ``hold_s``, ``repair()``.

    The wait for the fault lasts as long as training does (``training_over`` is set when it
    returns), not a fixed time: on a loaded machine Ray Train's start alone can take minutes.
    """

    def __init__(self, uri: str, run_id: str, after: int, fault, repair, hold_s: float) -> None:
        super().__init__(daemon=True)
        self.uri, self.run_id, self.after = uri, run_id, after
        self.fault, self.repair, self.hold_s = fault, repair, hold_s
        self.faulted_at = self.repaired_at = None
        self.error: BaseException | None = None
        self.training_over = threading.Event()

    def run(self) -> None:
        try:
            client = MlflowClient(self.uri)
            while (logged := len(client.get_metric_history(self.run_id, "loss/total"))) \
                    < self.after:
                assert not self.training_over.is_set(), (
                    f"training ended with {logged} steps logged, before the fault at {self.after}")
                self.training_over.wait(0.1)
            self.faulted_at = time.time()
            self.fault()
            time.sleep(self.hold_s)
            self.repair()
            self.repaired_at = time.time()
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err


def _train_under(chaos_for, data: Path, tmp_path: Path, uri: str) -> tuple[str, Chaos, float]:
    """Train STEPS tiny steps, logging to a fresh run while ``chaos_for(run_id)`` strikes."""
    from pipeline.train import run

    config = traindata.tiny_config(steps=STEPS, decay_steps=STEPS, val_every=VAL_EVERY,
                                 checkpoint_every=0, run_name="outage",
                                 storage_path=str(tmp_path / "ckpt"))
    logger = traindata.start_run(uri, "outage-tests")
    chaos = chaos_for(logger.run_id)
    chaos.start()
    out = tmp_path / "out"
    out.mkdir()
    try:
        run(config, StageContext(output_dir=out, inputs={"data": data}, logger=logger,
                                 tracking_uri=uri, progress=False))
    finally:
        chaos.training_over.set()
    ended = time.time()
    chaos.join(timeout=300)
    assert chaos.error is None, chaos.error
    logger.close()
    return logger.run_id, chaos, ended


def _every_step_of_every_metric(uri: str, run_id: str) -> None:
    client = MlflowClient(uri)
    keys = client.get_run(run_id).data.metrics
    assert "loss/total" in keys and "val/image/psnr" in keys
    for key in keys:
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        expected = (list(range(VAL_EVERY, STEPS + 1, VAL_EVERY)) if key.startswith("val/")
                    else list(range(1, STEPS + 1)))
        assert steps == expected, (key, steps)
    samples = {a.path for a in client.list_artifacts(run_id, "samples")}
    assert samples == {f"samples/step_{s:08d}.png" for s in range(VAL_EVERY, STEPS + 1, VAL_EVERY)}


def test_server_killed_and_restarted_mid_training_loses_no_step(server, data, tmp_path):
    run_id, chaos, ended = _train_under(
        lambda rid: Chaos(server.uri, rid, after=4, fault=server.kill, repair=server.start,
                          hold_s=3),
        data, tmp_path, server.uri)
    assert chaos.faulted_at < ended  # the server died while training ran
    # The server is restarted 3 s after the kill, but on a loaded machine its start can outlast
    # the training (seen: steps 7-60 spooled, the server back only after the stage); then what
    # the stage could not send waits in the spool, and the next workflow run sends it first.
    late = replay_spools(server.uri, {run_id})
    assert not late.left, late.left
    _every_step_of_every_metric(server.uri, run_id)
    history = MlflowClient(server.uri).get_metric_history(run_id, "loss/total")
    during = [m.step for m in history if chaos.faulted_at < m.timestamp / 1000 < chaos.repaired_at]
    assert during, "no step ran while the server was down"
    assert MlflowClient(server.uri).get_run(run_id).data.tags.get(TRACKING_TAG) != "incomplete"


def test_hung_server_does_not_stall_training_steps(server, data, tmp_path):
    run_id, chaos, _ = _train_under(
        lambda rid: Chaos(server.uri, rid, after=1, fault=server.freeze, repair=server.thaw,
                          hold_s=10),
        data, tmp_path, server.uri)
    _every_step_of_every_metric(server.uri, run_id)
    # Each metric's timestamp is taken when rank 0 logs it, once per step (log_every=1).
    stamps = sorted((m.step, m.timestamp / 1000) for m in
                    MlflowClient(server.uri).get_metric_history(run_id, "loss/total"))
    frozen = [s for s, t in stamps if chaos.faulted_at < t < chaos.repaired_at]
    assert len(frozen) >= 3, (frozen, stamps)  # training went on while the server was frozen
    # Every step that began while the server was frozen took a few seconds at most (a step
    # that validates also reads the val split: not counted).
    gaps = {b: t_b - t_a for (a, t_a), (b, t_b) in itertools.pairwise(stamps)
            if chaos.faulted_at < t_a < chaos.repaired_at and b % VAL_EVERY}
    assert gaps and max(gaps.values()) < 3.0, (gaps, stamps)


def test_logger_spools_a_dead_servers_share_and_replays_it(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MMVQ_TRACKING_SPOOL", str(tmp_path / "spool"))
    client = MlflowClient(server.uri)
    run_id = client.create_run(client.create_experiment("spool")).info.run_id
    logger = RunLogger(server.uri, run_id, backoff_s=0.05)
    logger.metrics({"a": 0.0}, step=0)
    server.kill()
    picture = tmp_path / "picture.png"
    picture.write_bytes(b"not really a png")
    started = time.perf_counter()
    for step in range(1, 6):
        logger.metrics({"a": float(step), "b": 1.0}, step=step)
    logger.params({"lr": 0.1})
    logger.tags({"stage": "x"})
    logger.artifact(picture, "samples")
    picture.unlink()  # the logger kept its own copy
    assert time.perf_counter() - started < 8  # one bounded wait, then no more waiting
    pending = logger.close(timeout_s=1)
    assert (pending.metrics, pending.steps, pending.artifacts) == (10, (1, 5), 1)
    assert pending.other == 2 and pending.rejected == 0
    assert "10 metric values (steps 1-5), 1 artifact, 2 other" in pending.describe()
    server.start()
    result = replay_spools(server.uri)
    assert result.left == {} and result.replayed[run_id].metrics == 10
    assert [m.step for m in client.get_metric_history(run_id, "a")] == [0, 1, 2, 3, 4, 5]
    run = client.get_run(run_id)
    assert run.data.params == {"lr": "0.1"} and run.data.tags["stage"] == "x"
    assert run.data.tags[TRACKING_TAG] == "replayed"  # was recorded as incomplete, locally
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/picture.png"]
    assert not any((tmp_path / "spool").rglob("*.jsonl"))


def test_calls_return_within_their_bound_when_the_server_hangs(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MMVQ_TRACKING_SPOOL", str(tmp_path / "spool"))
    client = MlflowClient(server.uri)
    run_id = client.create_run(client.create_experiment("hang")).info.run_id
    logger = RunLogger(server.uri, run_id, wait_s=2.0)
    server.freeze()
    try:
        started = time.perf_counter()
        for step in range(20):
            logger.metrics({"a": float(step)}, step=step)
        logger.tags({"stage": "x"})
        assert time.perf_counter() - started < 4  # the first call waits 2 s, the rest not at all
    finally:
        server.thaw()
    assert not logger.close(timeout_s=60)
    assert [m.step for m in client.get_metric_history(run_id, "a")] == list(range(20))


# --- the runner: tracking state at the end of a stage, and runs of killed invocations ----------

@dataclass(frozen=True)
class LogCfg:
    steps: int = 4
    sleep_s: float = 0.0  # after logging: time for a test to kill the process


def _logging_stage(kill_server_after: int | None = None, server: Server | None = None):
    def run(config: LogCfg, ctx: StageContext) -> dict:
        for step in range(config.steps):
            if step == kill_server_after:
                server.kill()
            ctx.logger.metrics({"x": float(step)}, step=step)
        (ctx.output_dir / "running").touch()
        time.sleep(config.sleep_s)
        return {"steps": config.steps}
    return run


def _workflow(root: Path, uri: str, **config):
    from workflows.spec import StageEntry, Workflow

    return Workflow(name="outage", data_root=str(root), tracking_uri=uri,
                    stages={"logs": StageEntry(stage="logs", config=config)})


def test_stage_ending_with_the_server_down_warns_and_the_next_run_replays(
        server, tmp_path, monkeypatch, capsys):
    from workflows import run as runner

    monkeypatch.setenv("MMVQ_TRACKING_SPOOL", str(tmp_path / "spool"))
    monkeypatch.setattr(runner, "_init_ray", lambda *a, **k: None)  # the stage needs no Ray
    monkeypatch.setattr(runner, "FLUSH_S", 2.0)  # how long a stage's end waits for the server
    monkeypatch.setitem(runner.STAGES, "logs",
                        StageSpec("logs", LogCfg, _logging_stage(2, server)))
    [result] = runner.run_workflow(_workflow(tmp_path / "root", server.uri, steps=6))
    out = capsys.readouterr().out
    # x at steps 2-5 and the stage's own stage/seconds (step 0) never reached the server
    assert f"[logs] WARNING: MLflow run {result.run_id} is missing 5 metric values (steps 0-5)" \
        in out, out
    server.start()
    runner.run_workflow(_workflow(tmp_path / "root", server.uri, steps=6))  # reuses, replays
    client = MlflowClient(server.uri)
    assert [m.step for m in client.get_metric_history(result.run_id, "x")] == list(range(6))
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags[TRACKING_TAG] == "replayed"
    assert "replayed" in capsys.readouterr().out


KILLED_WORKFLOW = textwrap.dedent("""
    import sys, time
    from dataclasses import dataclass
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from test_tracking_outage import LogCfg, _logging_stage, _workflow
    from pipeline.stage import StageSpec
    from workflows import run as runner

    runner._init_ray = lambda *a, **k: None
    runner.STAGES["logs"] = StageSpec("logs", LogCfg, _logging_stage())
    runner.run_workflow(_workflow(Path(sys.argv[1]), sys.argv[2], steps=2, sleep_s=600))
""")


def _start_and_kill(root: Path, uri: str, sig: int) -> list[str]:
    """Run the logging workflow in a subprocess, send ``sig`` mid-stage: its runs' statuses."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WORKFLOW, str(root), uri,
                             str(Path(__file__).parent)], cwd=Path(__file__).parents[2])
    deadline = time.time() + 120
    while not list((root / "logs").glob(".tmp-*/running")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    os.kill(proc.pid, sig)
    proc.wait(timeout=60)
    return _statuses(uri)


def _statuses(uri: str) -> list[str]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("outage")
    return [r.info.status for r in client.search_runs(
        [experiment.experiment_id], order_by=["attributes.start_time ASC"])]


def test_sigkilled_workflows_runs_are_marked_killed_by_the_next_run(tmp_path, monkeypatch):
    from workflows import run as runner

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    statuses = _start_and_kill(tmp_path / "root", uri, signal.SIGKILL)
    assert statuses == ["RUNNING", "RUNNING"]  # the parent and the stage: nothing could say else
    monkeypatch.setattr(runner, "_init_ray", lambda *a, **k: None)
    monkeypatch.setitem(runner.STAGES, "logs", StageSpec("logs", LogCfg, _logging_stage()))
    runner.run_workflow(_workflow(tmp_path / "root", uri, steps=1))
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("outage").experiment_id],
                              order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["KILLED", "KILLED", "FINISHED", "FINISHED"]
    assert runs[0].data.tags["mmvq.killed_detected_by"] == runs[2].info.run_id


def test_sigterm_marks_the_workflows_runs_killed_at_exit(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    statuses = _start_and_kill(tmp_path / "root", uri, signal.SIGTERM)
    assert statuses == ["KILLED", "KILLED"]
    assert not list((tmp_path / "root" / ".mlflow-runs").iterdir())  # nothing left to mark
