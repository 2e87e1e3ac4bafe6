"""Register stage against a real MLflow server: pyfunc model, version tags, fresh-process load."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient
from rawsamples import raw_samples

from mmvq import MultimodalTokenizer, TokenizerConfig
from pipeline.file_tokens import FileTokenizer
from pipeline.formats.registry import previous_version
from pipeline.register import RegisterConfig, run
from pipeline.stage import StageContext
from pipeline.tracking import RunLogger, ensure_experiment

LOAD_AND_PREDICT = """
import sys, json, pandas as pd, mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.read_pickle(sys.argv[2]))
print(json.dumps(out.to_dict("records")))
"""


@pytest.fixture(scope="module")
def registered(tmp_path_factory, mlflow_server):
    root = tmp_path_factory.mktemp("register")
    torch.manual_seed(0)
    MultimodalTokenizer(TokenizerConfig()).save(root / "train" / "tokenizer")
    (root / "evaluate").mkdir()
    metrics = {"trained": {"image/psnr": 21.5, "text/exact_match": 1.0}, "untrained": {}}
    (root / "evaluate" / "metrics.json").write_text(json.dumps(metrics))
    client = MlflowClient(mlflow_server)
    experiment = ensure_experiment(client, "register-test", root / "artifacts")
    run_id = client.create_run(experiment).info.run_id
    ctx = StageContext(output_dir=root / "out", inputs={"model": root / "train",
                                                        "evaluation": root / "evaluate"},
                       logger=RunLogger(mlflow_server, run_id), tracking_uri=mlflow_server)
    ctx.output_dir.mkdir()
    record = run(RegisterConfig(name="test-tokenizer"), ctx)
    return root, record, mlflow_server


def test_version_tags_map_version_to_weights_and_metrics(registered):
    root, record, uri = registered
    model = MultimodalTokenizer.load(root / "train" / "tokenizer")
    previous = previous_version(uri, "test-tokenizer")
    assert previous["version"] == record["version"] == 1
    assert previous["metrics"] == {"image/psnr": 21.5, "text/exact_match": 1.0}
    assert previous["tokenizer_id"] == f"local:{model.weights_hash()[:16]}"
    assert json.loads((root / "out" / "registered.json").read_text())["uri"] == \
        "models:/test-tokenizer/1"
    assert previous_version(uri, "no-such-model") is None


def test_fresh_process_loads_registered_model_and_gives_same_tokens(registered, tmp_path):
    root, record, uri = registered
    samples = raw_samples(3)
    samples.to_pickle(tmp_path / "samples.pkl")
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, record["uri"], str(tmp_path / "samples.pkl")],
        check=False, capture_output=True, text=True, timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert done.returncode == 0, done.stderr[-3000:]
    remote = json.loads(done.stdout.strip().splitlines()[-1])
    local = FileTokenizer(root / "train" / "tokenizer").encode(samples.to_dict("records")).to_pylist()
    assert [r["key"] for r in remote] == ["s0", "s1", "s2"]
    for mine, theirs in zip(local, remote, strict=True):
        for column in ("image_tokens", "audio_tokens", "text_tokens", "interleaved_tokens"):
            assert list(theirs[column]) == mine[column], column
    assert remote[1]["image_tokens"] == [] and len(remote[0]["image_tokens"]) == 64
    assert remote[0]["audio_frames"] == 100  # 1 s, resampled to 8 kHz, 80 samples per frame


def test_fluent_uris_put_the_environment_back_exactly(monkeypatch, tmp_path):
    """log_model needs MLflow's process-global URIs; afterwards nothing may point at them (a
    leaked default once made later runs write ./mlflow.db in the working directory)."""
    import mlflow

    from pipeline.register import _fluent_uris

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'x.db'}"
    with _fluent_uris(uri):
        assert mlflow.get_tracking_uri() == uri == os.environ["MLFLOW_TRACKING_URI"]
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert mlflow.get_tracking_uri() != uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    with _fluent_uris(uri):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:1"
    mlflow.set_tracking_uri(None)  # the process global too, for the tests after this one
