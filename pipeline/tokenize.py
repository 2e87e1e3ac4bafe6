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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mmvq.vocabulary import interleave
from pipeline.checkpoint import TOKENIZER_DIR
from pipeline.config import at_least
from pipeline.raydata import actor_pool, bounded, io_tasks, read_parquet, write
from pipeline.sinks import SplitParquetSink, rows_in
from pipeline.stage import StageContext

TOKENS_DIR = "tokens"
MANIFEST = "manifest.json"
WEBDATASET_DIR = "tokens-wds"
# Explicit types: Ray would otherwise infer object columns from Python lists.
_CODES = pa.list_(pa.int32())
TOKEN_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("image_tokens", _CODES),
    ("image_grid", _CODES), ("audio_tokens", _CODES), ("audio_frames", pa.int32()),
    ("audio_levels", pa.int32()),
    ("text_tokens", _CODES), ("joint_tokens", _CODES), ("interleaved_tokens", _CODES),
    ("tokenizer", pa.string()),
    ("source_shard", pa.string())])


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

    def min_resources(self) -> dict[str, float]:
        """What Ray must have for the first actor: one GPU or one CPU."""
        return {"GPU" if self.use_gpu else "CPU": 1.0}

    def __post_init__(self) -> None:
        at_least("tokenize", self, 1, "batch_size", "num_actors", "samples_per_shard",
                 "audio_levels")


class TokenizeActor:
    """Ray Data actor: holds one tokenizer, encodes batches of preprocessed rows."""

    def __init__(self, model_dir: str, layout: dict[str, Any], tokenizer_id: str,
                 use_gpu: bool, audio_levels: int | None = None) -> None:
        from mmvq import MultimodalTokenizer

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = MultimodalTokenizer.load(model_dir, map_location=self.device).eval()
        self.layout = layout
        self.tokenizer_id = tokenizer_id
        self.hop = self.model.config.audio.hop  # waveform samples per audio token
        self.audio_levels = audio_levels  # residual audio levels to keep (None: all)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from mmvq import to_model_inputs

        inputs = to_model_inputs(batch, self.device)
        with torch.no_grad():
            codes = {k: v.cpu().numpy() for k, v in
                 self.model.encode(inputs, audio_levels=self.audio_levels).items()}
        # Residual audio codes are (B, frames, levels); one-level codes (B, frames).
        levels = codes["audio"].shape[2] if codes["audio"].ndim == 3 else 1
        n = len(batch["key"])
        audio_frames = [math.ceil(int(a) / self.hop) for a in batch["audio_len"]]
        rows: dict[str, list] = {c: [] for c in (
            "key", "split", "image_tokens", "image_grid", "audio_tokens", "audio_frames",
            "audio_levels",
            "text_tokens", "joint_tokens", "interleaved_tokens", "tokenizer", "source_shard")}
        for i in range(n):
            image = codes["image"][i].reshape(-1) if batch["has_image"][i] else None
            audio = codes["audio"][i] if batch["has_audio"][i] else None
            text = codes["text"][i] if batch["has_text"][i] else None
            joint = codes["joint"][i] if "joint" in codes else None
            stream = interleave({
                "image": image, "audio": None if audio is None else audio[:audio_frames[i]],
                "text": None if text is None else text[:int(batch["text_len"][i])],
                "joint": joint}, self.layout)
            rows["key"].append(str(batch["key"][i]))
            rows["split"].append(str(batch["split"][i]))
            rows["image_tokens"].append(_as_list(image))
            rows["image_grid"].append(list(codes["image"].shape[1:]) if image is not None else [])
            rows["audio_tokens"].append(_as_list(audio))
            rows["audio_frames"].append(audio_frames[i] if audio is not None else 0)
            rows["audio_levels"].append(levels)
            rows["text_tokens"].append(_as_list(text))
            rows["joint_tokens"].append(_as_list(joint))
            rows["interleaved_tokens"].append(stream.tolist())
            rows["tokenizer"].append(self.tokenizer_id)
            rows["source_shard"].append(str(batch["source_shard"][i]))
        return pa.table(rows, schema=TOKEN_SCHEMA)


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
    from pipeline.tokens import mlflow_dataset

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


def _as_list(codes: np.ndarray | None) -> list[int]:
    return [] if codes is None else np.asarray(codes, np.int32).reshape(-1).tolist()


def run(config: TokenizeConfig, ctx: StageContext) -> dict[str, Any]:
    """Encode every preprocessed split with the trained tokenizer; write tokens + manifest."""

    from mmvq import MultimodalTokenizer

    model_dir = Path(ctx.inputs["model"]) / TOKENIZER_DIR
    model = MultimodalTokenizer.load(model_dir)
    layout = model.vocabulary()
    audio_levels = model.audio_levels if config.audio_levels is None else config.audio_levels
    if not 1 <= audio_levels <= model.audio_levels:  # fail here, not inside every actor
        raise ValueError(f"tokenize.audio_levels={config.audio_levels}: the tokenizer's audio "
                         f"codes have {model.audio_levels} level(s)")
    weights_hash = model.weights_hash()
    tokenizer_id = f"local:{weights_hash[:16]}"
    data_dir = Path(ctx.inputs["data"])
    splits = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    tokens_dir = ctx.output_dir / TOKENS_DIR
    # One pipeline over all splits: the actors start (and load the model) once, not per split.
    # Rows carry their split, and the sink files them under tokens/SPLIT as they arrive.
    rows = read_parquet([str(data_dir / split) for split in splits],
                        concurrency=io_tasks(config.num_actors))
    tokens = bounded(rows.map_batches(
        TokenizeActor, fn_constructor_args=(str(model_dir), layout, tokenizer_id,
                                            config.use_gpu, config.audio_levels),
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
    source_shards = sorted(shard_counts)
    if config.webdataset:
        for split in splits:
            _write_webdataset(ctx.output_dir / TOKENS_DIR / split,
                              ctx.output_dir / WEBDATASET_DIR / split, config.samples_per_shard)
    manifest = {
        "counts": counts, "total": sum(counts.values()), "splits": splits,
        "vocabulary": layout, "token_shapes": {k: list(v) for k, v in
                                               model.token_shapes().items()},
        "audio_hop_samples": model.config.audio.hop,
        "audio_levels": audio_levels,  # per frame in audio_tokens (<= token_shapes' levels)
        # Tokenize runs before the register stage, so the registered model version is not
        # known here: rows name the weights (local:<sha256 prefix>) and each registered
        # version carries that id as its tokenizer_id tag (pipeline.register).
        "tokenizer": {"id": tokenizer_id, "weights_sha256": weights_hash,
                      "source": str(model_dir), "model_version": None},
        "codebook_hash": weights_hash, "source_shards": source_shards,
        "source_shard_counts": shard_counts, "source_data": str(data_dir),
        "files": {"parquet": f"{TOKENS_DIR}/SPLIT/*.parquet",
                  "webdataset": f"{WEBDATASET_DIR}/SPLIT/shard-*.tar (KEY.json per row)"
                  if config.webdataset else None},
        "columns": {"image_tokens": "row-major image code grid (image_grid = [h, w])",
                    "audio_tokens": "all frames of the fixed window, frame-major "
                                    "(frames x audio_levels); the first audio_frames frames "
                                    "cover the real audio",
                    "audio_levels": "residual levels per audio frame (1 unless the audio "
                                    "quantizer is rvq); vocabulary.level_offsets gives each "
                                    "level's id range",
                    "text_tokens": "one code per text position, padding included",
                    "joint_tokens": "fusion tokens over all modalities (empty without fusion)",
                    "interleaved_tokens": "unified vocabulary: <boi> image <eoi> <boa> audio "
                                          "(real frames) <eoa> <bot> text (real length) <eot> "
                                          "<boj> joint <eoj>; mmvq.vocabulary."
                                          "split_interleaved reads one stream back, "
                                          "pipeline.tokens.split_interleaved_column the "
                                          "column"},
    }
    (ctx.output_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if ctx.logger:
        ctx.logger.metrics({f"tokens/rows/{k}": v for k, v in counts.items()}, step=0)
        ctx.logger.artifact(ctx.output_dir / MANIFEST)
        _log_lineage(ctx, data_dir, splits, tokenizer_id, weights_hash)
    # Paths in a summary are relative to the committed output (the stage runs in a temp dir).
    return {"counts": counts, "vocab_size": layout["vocab_size"], "tokens": TOKENS_DIR}
