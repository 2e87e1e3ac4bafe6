"""infra/local scripts for real: a Ray head that `mmvq submit` sends a workflow to, and an
MLflow server behind basic auth. Each service gets its own ports, temp dir and state dir."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.stage import committed_outputs, read_record

sys.path.insert(0, str(Path(__file__).parent))
from services import LOCAL, REPO, free_port

pytestmark = pytest.mark.integration


def test_submit_tiny_workflow_to_the_head(ray_head, mlflow_server, tmp_path, capsys):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from workflows.cli import main

    root = tmp_path / "data"
    code = main(["submit", "workflows/demo.yaml", "--address", ray_head.address,
                 "--data-root", str(root), "--only", "synth", "synth.num_samples=6",
                 "synth.samples_per_shard=3", f"tracking_uri={mlflow_server}"])
    out = capsys.readouterr().out
    assert code == 0, out
    job_id = re.search(r"mmvq submit: job (\S+) on ", out).group(1)
    assert f"mmvq submit: job {job_id} SUCCEEDED" in out
    assert "[synth] run " in out and "[preprocess] skip" in out  # the job's own log, streamed
    assert JobSubmissionClient(ray_head.address).get_job_status(job_id) == JobStatus.SUCCEEDED

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
    from workflows.submit import job_spec

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    spec = job_spec(REPO / "workflows/demo.yaml", ["train.steps=5"], data_root="/mnt/data/x",
                    from_=["train"], python="/opt/venv/bin/python")
    assert spec["entrypoint"] == ("/opt/venv/bin/python -m workflows.cli run workflows/demo.yaml "
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
    store, port = tmp_path / "store", free_port()
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
