"""The registry of stages: name -> config type, input slots, run function.

A workflow names stages from here and wires their input slots to upstream stages; the
``mmvq stage`` command runs one of them alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline import evaluate, ingest, preprocess, register, tokenize, train
from pipeline.formats.preprocessed import derive_model_shapes, shapes_of
from pipeline.formats.shards import SHARD_MANIFEST
from pipeline.stage import StageContext, StageSpec
from pipeline.synth import SynthConfig
from pipeline.synth import run as synth_run
from pipeline.train_config import TrainConfig


def _synth(config: SynthConfig, ctx: StageContext) -> dict[str, Any]:
    manifest = synth_run(config, ctx.output_dir, progress=ctx.progress)
    if ctx.logger:
        counts = manifest.get("counts", {})
        ctx.logger.metrics({f"samples/{k}": v for k, v in counts.items()}, step=0)
        ctx.logger.artifact(ctx.output_dir / SHARD_MANIFEST)
    return {"counts": manifest.get("counts", {})}


def _model_from_data(raw: Mapping[str, Any],
                     contracts: Mapping[str, tuple[dict[str, Any], str]]) -> dict[str, Any]:
    """The train config with the model's input shapes taken from the data contract."""
    if "data" not in contracts:
        return dict(raw)
    shapes, where = contracts["data"]
    return derive_model_shapes(raw, shapes, where)


# Distributions whose versions enter each stage's fingerprint (besides mmvq, numpy, pyarrow).
# The stage's code is the import closure of its module (pipeline.stage.code_closure).
_DECODERS = ("pillow", "soundfile", "soxr")  # image/audio decode and resample
_MODEL = ("torch", "torchvision", "torchaudio", "safetensors")  # the network and its weights

STAGES: dict[str, StageSpec] = {
    "synth": StageSpec("synth", SynthConfig, _synth, code=("pipeline.synth",),
                       libraries=("pillow", "soundfile", "espeakng-loader")),
    "ingest": StageSpec("ingest", ingest.IngestConfig, ingest.run),
    "preprocess": StageSpec("preprocess", preprocess.PreprocessConfig, preprocess.run,
                            inputs=("shards",), external_inputs=("shards",),
                            libraries=_DECODERS, contract=shapes_of),
    "train": StageSpec("train", TrainConfig, train.run, inputs=("data",), libraries=_MODEL,
                       derive=_model_from_data),
    "tokenize": StageSpec("tokenize", tokenize.TokenizeConfig, tokenize.run,
                          inputs=("data", "model"), libraries=_MODEL),
    "evaluate": StageSpec("evaluate", evaluate.EvaluateConfig, evaluate.run,
                          inputs=("data", "model", "tokens"), libraries=_MODEL),
    # The registered model runs pipeline.tokenizer_model, a file register logs, not imports.
    "register": StageSpec("register", register.RegisterConfig, register.run,
                          inputs=("model", "evaluation"),
                          code=("pipeline.register", "pipeline.tokenizer_model"),
                          libraries=(*_MODEL, "mlflow")),
}
