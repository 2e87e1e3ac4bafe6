"""A registered tokenizer holds no pickle, runs no code from its data, and loads anywhere.

The version is registered by the register stage into a SQLite store; every load happens in a
fresh process (``mlflow.pyfunc.load_model("models:/NAME/1")``), as a user of the registry
would load it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from rawsamples import raw_samples

import pipeline
from mmvq import MultimodalTokenizer, TokenizerConfig
from pipeline.file_tokens import FileTokenizer
from pipeline.register import RegisterConfig, run
from pipeline.stage import StageContext
from pipeline.tracking import RunLogger, ensure_experiment

NAME = "trust-tokenizer"
REPO = Path(pipeline.__file__).resolve().parent.parent
PICKLE_SUFFIXES = {".pkl", ".pickle", ".pt", ".pth", ".joblib"}

# For each stored file that is data to a loader (all but MLmodel and Python code), replace it
# with a pickle whose loading writes a marker, load the version, put the file back.
TAMPER_AND_LOAD = """
import json, pickle, sys
from pathlib import Path
import mlflow.pyfunc

class Payload:
    def __init__(self, marker):
        self.marker = marker
    def __reduce__(self):  # unpickling this calls exec: the attacker's code
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))

stored, uri, markers = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
targets = [p for p in sorted(stored.rglob("*")) if p.is_file() and p.name != "MLmodel"
           and p.suffix not in (".py", ".pyc")]
results = {}
for i, target in enumerate(targets):
    marker = markers / f"marker-{i}"
    original = target.read_bytes()
    target.write_bytes(pickle.dumps(Payload(str(marker))))
    try:
        mlflow.pyfunc.load_model(uri)
        outcome = "loaded"
    except Exception as err:  # a refusal is fine; running the payload is not
        outcome = type(err).__name__
    finally:
        target.write_bytes(original)
    results[target.relative_to(stored).as_posix()] = [outcome, marker.exists()]
mlflow.pyfunc.load_model(uri)  # everything put back: loads again
print(json.dumps(results))
"""

# The repository made invisible: the editable install's finder is dropped (asserted below),
# python -I ignores PYTHONPATH and puts no working directory on sys.path.
LOAD_WITHOUT_REPO = """
import importlib.util, json, sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, "__module__", "").startswith("__editable__")]
for name in ("pipeline", "mmvq"):
    assert importlib.util.find_spec(name) is None, f"{name} importable before loading"
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.read_parquet(sys.argv[2]))
import mmvq, pipeline
print(json.dumps({"rows": out.to_dict("records"), "mmvq": mmvq.__file__,
                  "pipeline": pipeline.__file__}))
"""


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> dict:
    """The register stage's version 1 of NAME in a SQLite store: uri, tokenizer, stored dir."""
    root = tmp_path_factory.mktemp("trust")
    torch.manual_seed(0)
    MultimodalTokenizer(TokenizerConfig()).save(root / "train" / "tokenizer")
    (root / "evaluate").mkdir()
    (root / "evaluate" / "metrics.json").write_text(json.dumps({"trained": {"image/psnr": 20.0}}))
    uri = f"sqlite:///{root / 'registry.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(ensure_experiment(client, "trust", root / "artifacts")).info.run_id
    ctx = StageContext(output_dir=root / "out", inputs={"model": root / "train",
                                                        "evaluation": root / "evaluate"},
                       logger=RunLogger(uri, run_id), tracking_uri=uri)
    ctx.output_dir.mkdir()
    path_before = list(sys.path)
    record = run(RegisterConfig(name=NAME), ctx)
    source = MlflowClient(uri, registry_uri=uri).get_model_version(NAME, "1").source
    location = client.get_logged_model(source.removeprefix("models:/")).artifact_location
    return {"uri": uri, "model_uri": record["uri"], "tokenizer": root / "train" / "tokenizer",
            "stored": Path(unquote(urlparse(location).path)),
            "sys_path_changed": sys.path != path_before}


def _is_pickle(path: Path) -> bool:
    """A pickle (protocol 2+ header), a torch.save zip (holds data.pkl) or a pickle suffix."""
    head = path.read_bytes()[:2]
    if path.suffix in PICKLE_SUFFIXES or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return True
    if zipfile.is_zipfile(path):
        return any(n.endswith(".pkl") for n in zipfile.ZipFile(path).namelist())
    return False


def test_registered_version_holds_no_pickle(registered):
    stored = registered["stored"]
    files = [p for p in stored.rglob("*") if p.is_file()]
    assert [p.relative_to(stored).as_posix() for p in files if _is_pickle(p)] == []
    flavor = yaml.safe_load((stored / "MLmodel").read_text())["flavors"]["python_function"]
    assert "python_model" not in flavor  # no cloudpickled PythonModel
    assert (stored / flavor["model_code_path"].split("/")[-1]).is_file()  # the model, as code
    assert {p.name for p in (stored / "artifacts" / "tokenizer").iterdir()} == {
        "config.json", "model.safetensors"}
    # The code that loading needs travels with the model.
    assert (stored / "code" / "mmvq" / "tokenizer.py").is_file()
    assert (stored / "code" / "pipeline" / "preprocess.py").is_file()
    assert not registered["sys_path_changed"]  # log_model's validation load left no trace


def test_tampered_artifacts_run_no_code_on_load(registered, tmp_path):
    """The attack: a version whose stored files were replaced by a pickle payload. Pickles
    are allowed here (MLflow's default), the attacker's best case."""
    markers = tmp_path / "markers"
    markers.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", TAMPER_AND_LOAD, str(registered["stored"]),
         registered["model_uri"], str(markers)],
        check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": registered["uri"],
             "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"artifacts/tokenizer/model.safetensors", "artifacts/tokenizer/config.json"} <= \
        set(results)
    ran = {name: outcome for name, (outcome, marker) in results.items() if marker}
    assert ran == {}, f"the payload ran when loading with these files replaced: {ran}"
    assert list(markers.iterdir()) == []


@pytest.mark.parametrize("allow_pickle", ["false", "true"])
def test_fresh_process_without_the_repository_loads_and_predicts(registered, tmp_path,
                                                                 allow_pickle):
    samples = raw_samples(3)
    samples.to_parquet(tmp_path / "samples.parquet")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-I", "-c", LOAD_WITHOUT_REPO, registered["model_uri"],
         str(tmp_path / "samples.parquet")],
        check=False, capture_output=True, text=True, timeout=300, cwd=elsewhere,
        env={**env, "MLFLOW_TRACKING_URI": registered["uri"],
             "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": allow_pickle})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for package in ("mmvq", "pipeline"):  # imported from the model's code/, not the checkout
        origin = Path(result[package]).resolve()
        assert not origin.is_relative_to(REPO) and "code" in origin.parts, origin
    local = FileTokenizer(registered["tokenizer"]).encode(samples.to_dict("records")).to_pylist()
    remote = result["rows"]
    assert [r["key"] for r in remote] == ["s0", "s1", "s2"]
    for mine, theirs in zip(local, remote, strict=True):
        for column in ("image_tokens", "image_grid", "audio_tokens", "text_tokens",
                       "joint_tokens", "interleaved_tokens", "audio_frames", "tokenizer"):
            assert theirs[column] == mine[column], column
    assert remote[1]["image_tokens"] == [] and len(remote[0]["image_tokens"]) == 64
    assert list(elsewhere.iterdir()) == []  # nothing written where it ran (no ./mlflow.db)
