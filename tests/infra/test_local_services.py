"""infra/local scripts for real: a Ray head that `mmvq submit` sends a workflow to, and an
MLflow server behind basic auth. Each service gets its own ports, temp dir and state dir."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.stage import committed_outputs, read_record

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "infra" / "local"

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ours(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (our private temp dir): ours alone."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`infra/local/ray-head.sh start` on free ports with a private temp dir; stopped after."""
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths are limited
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    dashboard = _free_port()
    env.update(RAY_HEAD_DIR=str(tmp_path_factory.mktemp("ray-head")), RAY_TEMP_DIR=temp,
               RAY_PORT=str(_free_port()), RAY_DASHBOARD_PORT=str(dashboard),
               RAY_CLIENT_PORT=str(_free_port()), RAY_AGENT_PORT=str(_free_port()),
               RAY_NUM_CPUS="2")
    script = str(LOCAL / "ray-head.sh")
    started = subprocess.run([script, "start"], env=env, capture_output=True, text=True,
                             timeout=300, check=False)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert subprocess.run([script, "status"], env=env, check=False).returncode == 0
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        stopped = subprocess.run([script, "stop"], env=env, capture_output=True, text=True,
                                 timeout=120, check=False)
        left = _ours(temp)
        shutil.rmtree(temp, ignore_errors=True)
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stdout
        assert left == [], f"Ray processes outlived ray-head.sh stop: {left}"


def test_submit_tiny_workflow_to_the_head(ray_head, mlflow_server, tmp_path, capsys):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from pipeline.cli import main

    root = tmp_path / "data"
    code = main(["submit", "workflows/demo.yaml", "--address", ray_head,
                 "--data-root", str(root), "--only", "synth", "synth.num_samples=6",
                 "synth.samples_per_shard=3", f"tracking_uri={mlflow_server}"])
    out = capsys.readouterr().out
    assert code == 0, out
    job_id = re.search(r"mmvq submit: job (\S+) on ", out).group(1)
    assert f"mmvq submit: job {job_id} SUCCEEDED" in out
    assert "[synth] run " in out and "[preprocess] skip" in out  # the job's own log, streamed
    assert JobSubmissionClient(ray_head).get_job_status(job_id) == JobStatus.SUCCEEDED

    [output] = committed_outputs(root, "synth")
    record = read_record(output)
    assert sum(record["summary"]["counts"][s] for s in ("train", "val")) == 6
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("mmvq-demo")
    [run] = client.search_runs([experiment.experiment_id],
                               f"tags.fingerprint = '{output.name}' AND tags.stage = 'synth'")
    assert run.info.run_id == record["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["output"] == str(output) and run.data.tags["reused"] == "false"
    assert run.data.params["num_samples"] == "6"


def test_job_spec_ships_the_repo_and_passes_flags(monkeypatch):
    from pipeline.config import ConfigError
    from pipeline.submit import job_spec

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    spec = job_spec(REPO / "workflows/demo.yaml", ["train.steps=5"], data_root="/mnt/data/x",
                    from_=["train"], python="/opt/venv/bin/python")
    assert spec["entrypoint"] == ("/opt/venv/bin/python -m pipeline.cli run workflows/demo.yaml "
                                  "--no-progress train.steps=5 data_root=/mnt/data/x "
                                  "--from train")
    env = spec["runtime_env"]
    assert env["working_dir"] == str(REPO)
    assert {"/.venv/", "/runs/", "/.git/"} <= set(env["excludes"])
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
    with pytest.raises(ConfigError, match="must be inside the repository"):
        job_spec(Path("/tmp/elsewhere.yaml"))
    with pytest.raises(ConfigError, match=r"stages\.train\.config\.stepz"):
        job_spec(REPO / "workflows/demo.yaml", ["train.stepz=5"])


def test_mlflow_script_with_basic_auth_and_served_artifacts(tmp_path, monkeypatch):
    store, port = tmp_path / "store", _free_port()
    env = {**os.environ, "MLFLOW_AUTH": "1", "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
           "MLFLOW_AUTH_ADMIN_PASSWORD": "s3cret-pass-123", "MLFLOW_TRACKING_URI": ""}
    script = str(LOCAL / "mlflow-server.sh")
    started = subprocess.run([script, "start", str(store), str(port)], env=env,
                             capture_output=True, text=True, timeout=300, check=False)
    uri = f"http://127.0.0.1:{port}"
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1")
        assert denied.value.code == 401
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-pass-123")
        client = MlflowClient(uri)
        run = client.create_run(client.create_experiment("auth-check"))
        (tmp_path / "note.txt").write_text("hello")
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]
        # Proxied: the file landed in the server's artifact root, not where the client is.
        assert [p.name for p in (store / "mlartifacts").rglob("note.txt")] == ["note.txt"]
    finally:
        stopped = subprocess.run([script, "stop", str(store)], env=env, capture_output=True,
                                 text=True, timeout=60, check=False)
    assert "stopped" in stopped.stdout and not (store / "mlflow-server.pid").exists()
    refused = subprocess.run([script, "start", str(store), str(port)],
                             env={**env, "MLFLOW_AUTH": "0", "MLFLOW_HOST": "0.0.0.0"},
                             capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 2 and "without authentication" in refused.stdout
