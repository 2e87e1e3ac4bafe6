"""Register stage: the trained tokenizer as an MLflow pyfunc model, tagged with its evaluation.

The model is logged as code (MLflow's models-from-code), so a registry entry holds no pickle:
:mod:`pipeline.tokenizer_model` is the model file (its ``TokenizerModel`` loads
:class:`mmvq.MultimodalTokenizer` and encodes a DataFrame of raw samples into token rows, the
rows ``mmvq encode`` and the tokenize stage give), the tokenizer directory (``config.json`` +
``model.safetensors``) is its ``tokenizer`` artifact, and the ``mmvq`` and ``pipeline``
packages travel as ``code_paths``. ``mlflow.pyfunc.load_model("models:/NAME/VERSION")`` then
works without this repository on ``sys.path`` and with
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``.

Each registered version carries tags: the evaluate stage's trained metrics (``eval/image/psnr``
...), the weights sha256 and the ``local:<hash>`` id that the token dataset's ``tokenizer``
column holds. Tokenize runs before registration, so token rows name the weights hash; the
registry maps a version to that hash (search ``tags.tokenizer_id = 'local:...'``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from pipeline.formats.checkpoint import TOKENIZER_DIR
from pipeline.formats.registry import ARTIFACT, METRICS_FILE, TOKEN_COLUMNS, version_tags
from pipeline.formats.tokens import tokenizer_id
from pipeline.stage import StageContext

# The model file MLflow logs and runs (models-from-code); read as a file, never imported here,
# so that importing this stage (plans do) loads no torch. The stage's code fingerprint names it.
MODEL_FILE = Path(__file__).with_name("tokenizer_model.py")


@dataclass(frozen=True)
class RegisterConfig:
    name: str = "mmvq-tokenizer"  # registered model name; each run adds a version
    model_path: str = "tokenizer"  # name of the logged model inside the register run


def signature() -> Any:
    """Input: optional key/image/audio/text columns; output: the token columns as int lists."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema


    inputs = Schema([ColSpec(DataType.string, "key", required=False),
                     ColSpec(DataType.binary, "image", required=False),
                     ColSpec(DataType.binary, "audio", required=False),
                     ColSpec(DataType.string, "text", required=False)])
    outputs = Schema([ColSpec(DataType.string, "key"),
                      *[ColSpec(Array(DataType.integer), c) for c in TOKEN_COLUMNS],
                      ColSpec(DataType.integer, "audio_frames"),
                      ColSpec(DataType.string, "tokenizer")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example(image_size: int, sample_rate: int) -> pd.DataFrame:
    """One generated sample (a gradient image, a 0.5 s tone, a caption) as encoded bytes."""
    import io

    import soundfile
    from PIL import Image

    ramp = np.linspace(0, 255, image_size, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (image_size, 1))] * 3, axis=-1)  # (H, W, 3)
    image = io.BytesIO()
    Image.fromarray(pixels).save(image, format="PNG")
    t = np.arange(sample_rate // 2) / sample_rate
    audio = io.BytesIO()
    soundfile.write(audio, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
                    sample_rate, format="WAV")
    return pd.DataFrame([{"key": "example", "image": image.getvalue(),
                          "audio": audio.getvalue(), "text": "a small red circle"}])


def run(config: RegisterConfig, ctx: StageContext) -> dict[str, Any]:
    """Log the tokenizer as a pyfunc model, register it, tag the version with eval metrics."""
    from mmvq.tokenizer import MultimodalTokenizer

    if ctx.logger is None or not ctx.tracking_uri:
        raise ValueError("register needs MLflow tracking (run it from a workflow or mmvq stage)")
    model_dir = Path(ctx.inputs["model"]) / TOKENIZER_DIR
    model = MultimodalTokenizer.load(model_dir)
    weights = model.weights_hash()
    metrics_file = Path(ctx.inputs["evaluation"]) / METRICS_FILE
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file}: the evaluation input has no metrics.json")
    trained = json.loads(metrics_file.read_text())["trained"]
    tags = {**version_tags(trained), "tokenizer_id": tokenizer_id(weights),
            "weights_sha256": weights, "source_run": ctx.logger.run_id}
    with (_fluent_uris(ctx.tracking_uri), _sys_path_kept(),
          mlflow.start_run(run_id=ctx.logger.run_id)):
        info = mlflow.pyfunc.log_model(
            name=config.model_path, python_model=str(MODEL_FILE),
            artifacts={ARTIFACT: str(model_dir)}, code_paths=_code_paths(),
            signature=signature(),
            input_example=input_example(model.config.image.image_size,
                                        model.config.audio.sample_rate),
            registered_model_name=config.name, pip_requirements=_requirements())
    version = int(info.registered_model_version)
    client = MlflowClient(ctx.tracking_uri, registry_uri=ctx.tracking_uri)
    for key, value in tags.items():
        client.set_model_version_tag(config.name, str(version), key, value)
    ctx.logger.tags({"registered_model": config.name, "registered_version": str(version)})
    record = {"name": config.name, "version": version, "uri": f"models:/{config.name}/{version}",
              "tokenizer_id": tags["tokenizer_id"], "weights_sha256": weights}
    (ctx.output_dir / "registered.json").write_text(json.dumps(record, indent=2))
    return record


@contextmanager
def _fluent_uris(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (all ``log_model`` speaks) at ``uri`` for one block.

    Its URIs are process globals mirrored into environment variables; restoring them through
    ``get_tracking_uri()`` would pin MLflow's default (``./mlflow.db``) for every later caller,
    so the variables are put back exactly as they were, unset included.
    """
    saved = {name: os.environ.get(name) for name in _URI_VARS}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # None unsets
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextmanager
def _sys_path_kept() -> Iterator[None]:
    """Undo what ``log_model`` does to ``sys.path``: it loads the new model once to check the
    input example, and loading prepends the model's (temporary) code directory for good."""
    saved = list(sys.path)
    try:
        yield
    finally:
        sys.path[:] = saved


def _code_paths() -> list[str]:
    """The packages the model file imports, copied into the model (``code/``), so loading needs
    neither this repository on ``sys.path`` nor an installed mmvq."""
    import mmvq
    import pipeline

    return [str(Path(package.__file__).parent) for package in (mmvq, pipeline)]


def _requirements() -> list[str]:
    """What the model file and the code it carries import, pinned to this environment;
    explicit, so MLflow does not load the model to infer them."""
    from importlib.metadata import version

    names = ("torch", "torchaudio", "torchvision", "numpy", "pandas", "pyarrow", "safetensors",
             "einops", "soundfile", "soxr", "pillow", "pyyaml", "mlflow")
    return [f"{n}=={version(n)}" for n in names]
