"""Tokenize stage: the trained tokenizer over every split, written as a parquet token dataset.

One Ray Data pipeline reads every split, a pool of actors (growing from one to ``num_actors``)
each loads the tokenizer once and encodes batches of preprocessed rows, and the rows stream into
one parquet directory per split (:class:`pipeline.sinks.SplitParquetSink`). The output has one
directory per split (``tokens/train``, ``tokens/val``) with the
DESIGN.md token schema, and ``manifest.json`` describing the unified vocabulary that
``interleaved_tokens`` uses, so a downstream language model can read the dataset without mmvq.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from mmvq.config import SpeedConfig
from pipeline.config import ConfigError, at_least
from pipeline.formats.checkpoint import TOKENIZER_DIR
from pipeline.formats.tokens import (
    MANIFEST,
    TEXT_TOKENS,
    TOKENS_DIR,
    WEBDATASET_DIR,
    TokenEncoder,
    build_manifest,
    text_token_vocab,
    token_layout,
    tokenizer_id,
)
from pipeline.raydata import actor_pool, bounded, io_tasks, read_parquet, write
from pipeline.sinks import SplitParquetSink, rows_in
from pipeline.stage import StageContext


@dataclass(frozen=True)
class TokenizeConfig:
    batch_size: int = 64  # rows per encode call
    num_actors: int = 2  # actors holding a model copy each, at most (the pool starts with one)
    use_gpu: bool = False  # one GPU per actor when true
    # Residual (rvq) audio only: levels kept per frame, i.e. the audio bitrate
    # (levels x log2 K bits per frame); None keeps all. Must be 1 or None for one-level audio.
    audio_levels: int | None = None
    # Also write webdataset shards (tokens-wds/SPLIT/shard-NNNNNN.tar, one KEY.json per row) for
    # loaders that stream tar files; parquet is always written.
    webdataset: bool = False
    samples_per_shard: int = 1000  # rows per webdataset shard
    # The fast encode path (mmvq.speed, as train.speed): bf16 autocast around the encoder nets,
    # TF32 (a near tie between two codes may then resolve to the other one), compile, on the
    # device types it names (CUDA by default: CPU tokens are those of the plain fp32 model).
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    # What text_tokens (and the text run of interleaved_tokens) hold: "ids", the whole caption
    # as written, in a text vocabulary, so that it decodes back exactly; or "codes", the text
    # codec's VQ codes (lossy, one per text position; for experiments).
    text_tokens: str = "ids"
    # With "ids": a vocabulary file for them, a Hugging Face tokenizer.json (the tokens then
    # match the language model that will read them) or an mmvq BPE text_vocab.json; None: the
    # tokenizer's own text vocabulary (UTF-8 bytes in the demo).
    text_vocab: str | None = None

    def min_resources(self) -> dict[str, float]:
        """What Ray must have for the first actor: one GPU or one CPU."""
        return {"GPU" if self.use_gpu else "CPU": 1.0}

    def __post_init__(self) -> None:
        at_least("tokenize", self, 1, "batch_size", "num_actors", "samples_per_shard",
                 "audio_levels")
        if self.text_tokens not in TEXT_TOKENS:
            raise ConfigError(f"tokenize.text_tokens must be one of {list(TEXT_TOKENS)}, got "
                              f"{self.text_tokens!r}")
        if self.text_vocab and self.text_tokens != "ids":
            raise ConfigError("tokenize.text_vocab is the vocabulary of text ids; it needs "
                              "tokenize.text_tokens: ids")


def _write_webdataset(parquet_dir: Path, out_dir: Path, samples_per_shard: int) -> None:
    """The rows of one split as webdataset shards: ``KEY.json`` holds the whole row."""
    import webdataset

    out_dir.mkdir(parents=True, exist_ok=True)
    with webdataset.ShardWriter(str(out_dir / "shard-%06d.tar"), maxcount=samples_per_shard,
                                verbose=0) as sink:
        for batch in pq.ParquetDataset(str(parquet_dir)).read().to_batches():
            for row in batch.to_pylist():
                sink.write({"__key__": row["key"], "json": row})


def _log_lineage(ctx: StageContext, data_dir: Path, splits: list[str], tokenizer_id: str,
                 weights_hash: str) -> None:
    """The preprocessed data read and the token dataset written, as MLflow dataset inputs."""
    from pipeline.tracking import mlflow_dataset

    tags = {"tokenizer": tokenizer_id, "weights_sha256": weights_hash}
    committed = ctx.committed_dir or ctx.output_dir
    for split in splits:
        ctx.logger.dataset_input(mlflow_dataset(data_dir / split, f"preprocessed-{split}"),
                                 context=f"source/{split}")
        # The token dataset is this run's output; MLflow records datasets as run inputs, so
        # the context names it (tokens/SPLIT) and the tags name the weights that wrote it.
        ctx.logger.dataset_input(mlflow_dataset(ctx.output_dir / TOKENS_DIR / split,
                                                f"tokens-{split}",
                                                committed / TOKENS_DIR / split),
                                 context=f"tokens/{split}", tags=tags)
    ctx.logger.tags({"tokenizer": tokenizer_id, "weights_sha256": weights_hash})


def run(config: TokenizeConfig, ctx: StageContext) -> dict[str, Any]:
    """Encode every preprocessed split with the trained tokenizer; write tokens + manifest."""

    from mmvq.tokenizer import MultimodalTokenizer

    model_dir = Path(ctx.inputs["model"]) / TOKENIZER_DIR
    model = MultimodalTokenizer.load(model_dir)
    # The text vocabulary is loaded and checked here first (each actor loads it again), so a
    # bad or lossy file fails before any actor starts.
    layout = token_layout(model, text_token_vocab(model, config.text_tokens, config.text_vocab))
    audio_levels = model.audio_levels if config.audio_levels is None else config.audio_levels
    if not 1 <= audio_levels <= model.audio_levels:  # fail here, not inside every actor
        raise ValueError(f"tokenize.audio_levels={config.audio_levels}: the tokenizer's audio "
                         f"codes have {model.audio_levels} level(s)")
    weights_hash = model.weights_hash()
    tokenizer = tokenizer_id(weights_hash)
    data_dir = Path(ctx.inputs["data"])
    splits = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    tokens_dir = ctx.output_dir / TOKENS_DIR
    # One pipeline over all splits: the actors start (and load the model) once, not per split.
    # Rows carry their split, and the sink files them under tokens/SPLIT as they arrive.
    rows = read_parquet([str(data_dir / split) for split in splits],
                        concurrency=io_tasks(config.num_actors))
    tokens = bounded(rows.map_batches(
        TokenEncoder,
        fn_constructor_args=(str(model_dir), config.use_gpu, config.audio_levels, config.speed,
                             config.text_tokens, config.text_vocab),
        batch_size=config.batch_size, batch_format="numpy",
        **actor_pool(config.num_actors, use_gpu=config.use_gpu),
    ), config.num_actors)
    write(tokens, SplitParquetSink(tokens_dir), concurrency=io_tasks(config.num_actors))
    counts = {split: rows_in(tokens_dir / split) for split in splits}
    expected = {split: rows_in(data_dir / split) for split in splits}
    if counts != expected:  # every preprocessed row becomes exactly one token row
        raise RuntimeError(f"tokenize wrote {counts} rows per split, the data has {expected}")
    shard_counts: dict[str, int] = {}  # source shard -> rows it contributed
    for split in splits:
        for shard in pq.ParquetDataset(str(ctx.output_dir / TOKENS_DIR / split)).read(
                columns=["source_shard"]).column("source_shard").to_pylist():
            shard_counts[shard] = shard_counts.get(shard, 0) + 1
    if config.webdataset:
        for split in splits:
            _write_webdataset(ctx.output_dir / TOKENS_DIR / split,
                              ctx.output_dir / WEBDATASET_DIR / split, config.samples_per_shard)
    manifest = build_manifest(model, counts, audio_levels,
                              {"id": tokenizer, "weights_sha256": weights_hash,
                               "source": str(model_dir), "model_version": None},
                              shard_counts, data_dir, webdataset=config.webdataset,
                              layout=layout)
    (ctx.output_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if ctx.logger:
        ctx.logger.metrics({f"tokens/rows/{k}": v for k, v in counts.items()}, step=0)
        ctx.logger.artifact(ctx.output_dir / MANIFEST)
        _log_lineage(ctx, data_dir, splits, tokenizer, weights_hash)
    # Paths in a summary are relative to the committed output (the stage runs in a temp dir).
    return {"counts": counts, "vocab_size": layout["vocab_size"], "tokens": TOKENS_DIR}
