"""MLflow helpers: where runs go, and logging that never kills the work it records.

One experiment per workflow, one parent run per invocation, one nested run per stage
(DESIGN.md). With no tracking URI given, runs go to a SQLite file under the data root, so the
embedded default needs no server. Training workers log through :class:`RunLogger`, which talks
to an existing run by id: only rank 0 creates one, and a tracking server that is slow or briefly
down costs a retry and a warning, never the training run.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

# MLflow rejects param values over this length; long values (lists) are cut, not dropped.
_MAX_PARAM_CHARS = 6000


def default_tracking_uri(data_root: str | Path) -> str:
    """The embedded default: MLFLOW_TRACKING_URI if set, else a SQLite file under the data root."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(data_root).resolve() / 'mlflow.db')}"


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


class RunLogger:
    """Log to one MLflow run by id, with retries; failures warn instead of raising.

    Usable from any process (a Ray Train worker, an actor): it carries only the URI and run id.
    """

    def __init__(self, tracking_uri: str, run_id: str, retries: int = 3,
                 backoff_s: float = 0.5) -> None:
        # MLflow's own HTTP layer retries 7 times with exponential backoff (minutes against a
        # dead server); this class retries itself, so cap the inner ones unless the user set them.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.retries = retries
        self.backoff_s = backoff_s
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        """Log a dict of metrics at ``step`` in one request."""
        now = int(time.time() * 1000)
        batch = [Metric(_metric_key(k), float(v), now, step) for k, v in values.items()]
        self._retry("log metrics", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def params(self, values: Mapping[str, Any]) -> None:
        """Log flattened params, skipping ones the run already has (safe on resume)."""
        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, _param_value(v)) for k, v in values.items() if k not in existing]
        for start in range(0, len(fresh), 100):  # MLflow caps params per request at 100
            chunk = fresh[start:start + 100]
            self._retry("log params", lambda c=chunk: self.client.log_batch(self.run_id, params=c))

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._retry("log artifact",
                    lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self._retry("log artifacts",
                    lambda: self.client.log_artifacts(self.run_id, str(directory), artifact_path))

    def tags(self, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            self._retry("set tag", lambda k=key, v=value: self.client.set_tag(self.run_id, k, v))

    def status(self, value: str) -> None:
        """Set the run's status (``RUNNING``, ``FINISHED``, ...), e.g. when a resumed training
        continues a run an earlier, killed invocation left behind."""
        self._retry("set status", lambda: self.client.update_run(self.run_id, status=value))

    def last_step(self, key: str) -> int:
        """Highest step logged for metric ``key``, -1 if none (or the server cannot say).

        A resumed training skips steps up to it, so the history holds each step once.
        """
        found: list[int] = []
        self._retry("read metric history", lambda: found.extend(
            m.step for m in self.client.get_metric_history(self.run_id, key)))
        return max(found, default=-1)

    def dataset_input(self, dataset: Any, context: str,
                      tags: Mapping[str, Any] | None = None) -> None:
        """Record an ``mlflow.data`` dataset as an input of the run (lineage in the UI).

        ``context`` says how the run used it (``source``, ``tokens/val``); ``tags`` are extra
        input tags, e.g. the tokenizer that wrote a token dataset.
        """
        from mlflow.entities import Dataset, DatasetInput, InputTag

        d = dataset.to_dict()
        entity = Dataset(name=d["name"], digest=d["digest"], source_type=d["source_type"],
                         source=d["source"], schema=d.get("schema"), profile=d.get("profile"))
        input_tags = [InputTag("mlflow.data.context", context),
                      *(InputTag(k, str(v)) for k, v in (tags or {}).items())]
        self._retry("log input", lambda: self.client.log_inputs(
            self.run_id, datasets=[DatasetInput(entity, input_tags)]))

    def _retry(self, what: str, call) -> None:
        for attempt in range(self.retries + 1):
            try:
                call()
                return
            except Exception as err:  # noqa: BLE001 - tracking must never kill the work
                if attempt == self.retries:
                    log.warning("MLflow %s failed after %d tries, continuing: %s",
                                what, attempt + 1, err)
                    return
                time.sleep(self.backoff_s * 2 ** attempt)


def _metric_key(key: str) -> str:
    # MLflow keys allow '/', which groups charts in the UI (``image/psnr``); keep them as they are.
    return key


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _MAX_PARAM_CHARS else text[:_MAX_PARAM_CHARS - 3] + "..."

