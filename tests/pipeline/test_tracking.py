"""MLflow logging by run id: real server round trip, idempotent params, a dead server tolerated."""

import logging
import socket

from mlflow.tracking import MlflowClient

from pipeline.tracking import RunLogger, ensure_experiment


def test_round_trip_and_params_logged_once(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server)
    experiment = ensure_experiment(client, "tracking-test", tmp_path / "artifacts")
    assert ensure_experiment(client, "tracking-test", None) == experiment
    run_id = client.create_run(experiment).info.run_id
    logger = RunLogger(mlflow_server, run_id)
    logger.metrics({"loss/total": 2.0, "image/psnr": 12.5}, step=3)
    logger.params({"train.lr": 0.1, "train.steps": 10})
    logger.params({"train.lr": 0.1, "train.steps": 10, "train.seed": 0})  # a resume: no conflict
    data = client.get_run(run_id).data
    assert data.metrics == {"loss/total": 2.0, "image/psnr": 12.5}
    assert data.params == {"train.lr": "0.1", "train.steps": "10", "train.seed": "0"}
    assert [m.step for m in client.get_metric_history(run_id, "loss/total")] == [3]


def test_unreachable_server_warns_instead_of_raising(caplog):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logger = RunLogger(f"http://127.0.0.1:{port}", "no-such-run", retries=1, backoff_s=0.01)
    with caplog.at_level(logging.WARNING):
        logger.metrics({"x": 1.0}, step=0)
    assert "MLflow log metrics failed after 2 tries" in caplog.text
