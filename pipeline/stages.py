"""The registry of stages: name -> config type, input slots, run function.

A workflow names stages from here and wires their input slots to upstream stages; the
``mmvq stage`` command runs one of them alone.
"""

from __future__ import annotations

from typing import Any

from pipeline import evaluate, ingest, preprocess, register, tokenize, train
from pipeline.stage import StageContext, StageSpec
from pipeline.synth import SynthConfig
from pipeline.synth import run as synth_run


def _synth(config: SynthConfig, ctx: StageContext) -> dict[str, Any]:
    manifest = synth_run(config, ctx.output_dir, progress=ctx.progress)
    if ctx.logger:
        counts = manifest.get("counts", {})
        ctx.logger.metrics({f"samples/{k}": v for k, v in counts.items()}, step=0)
        ctx.logger.artifact(ctx.output_dir / "manifest.json")
    return {"counts": manifest.get("counts", {})}


# Distributions whose versions enter each stage's fingerprint (besides mmvq, numpy, pyarrow).
_DECODERS = ("pillow", "soundfile", "soxr")  # image/audio decode and resample
_MODEL = ("torch", "torchvision", "torchaudio", "safetensors")  # the network and its weights

STAGES: dict[str, StageSpec] = {
    "synth": StageSpec("synth", SynthConfig, _synth, code=("pipeline.synth",),
                       libraries=("pillow", "soundfile", "espeakng-loader")),
    "ingest": StageSpec("ingest", ingest.IngestConfig, ingest.run,
                        code=("pipeline.ingest", "pipeline.storage")),
    "preprocess": StageSpec("preprocess", preprocess.PreprocessConfig, preprocess.run,
                            inputs=("shards",), external_inputs=("shards",),
                            code=("pipeline.preprocess", "pipeline.shard_source",
                                  "pipeline.ingest", "pipeline.storage", "pipeline.sinks",
                                  "pipeline.text_vocab", "mmvq.text_vocab"),
                            libraries=_DECODERS),
    "train": StageSpec("train", train.TrainConfig, train.run, inputs=("data",),
                       code=(*train.TRAIN_CODE, "pipeline.text_vocab"), libraries=_MODEL),
    "tokenize": StageSpec("tokenize", tokenize.TokenizeConfig, tokenize.run,
                          inputs=("data", "model"),
                          code=("pipeline.tokenize", "pipeline.sinks", "pipeline.raydata", "mmvq"),
                          libraries=_MODEL),
    "evaluate": StageSpec("evaluate", evaluate.EvaluateConfig, evaluate.run,
                          inputs=("data", "model", "tokens"),
                          code=("pipeline.evaluate", "pipeline.report", "mmvq"),
                          libraries=_MODEL),
    "register": StageSpec("register", register.RegisterConfig, register.run,
                          inputs=("model", "evaluation"),
                          code=("pipeline.register", "pipeline.tokenizer_model", "pipeline.preprocess",
                                "mmvq"),
                          libraries=(*_MODEL, "mlflow")),
}
