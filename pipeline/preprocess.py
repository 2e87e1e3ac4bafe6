"""Preprocess stage: webdataset shards -> model-ready columns, every sample accounted for.

Pure functions turn one raw sample (member bytes by extension) into the preprocessed columns of
DESIGN.md, or raise :class:`BadSample` with a reason. :class:`Preprocessor` is the thin Ray Data
actor around them: it builds its resamplers once and maps whole batches. The stage reads the
shards with ``ray.data.read_webdataset`` (raw bytes, decoded here so a broken file is quarantined
instead of killing the reader), writes one parquet dataset per split and the quarantine table,
and checks ``in = out + quarantined``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile
import torch
import torchaudio
from PIL import Image, ImageOps

from mmvq.text_vocab import encode_text
from pipeline.stage import StageContext

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTENSIONS = ("flac", "wav", "ogg", "mp3")
TEXT_EXTENSIONS = ("txt",)
MODALITIES = ("image", "audio", "text")

# Refuse images above this many pixels before decoding them (decompression bombs).
MAX_IMAGE_PIXELS = 64_000_000


class BadSample(ValueError):
    """A sample that cannot be preprocessed; the message is the quarantine reason."""


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int = 64  # square side in pixels after resize + center crop
    sample_rate: int = 8000  # the audio model's rate; every clip is resampled to it
    audio_samples: int = 20000  # fixed clip length at sample_rate: crop or zero-pad, keep true len
    text_max_len: int = 64  # byte-level ids per caption; longer text is truncated
    # A sample missing one of these is quarantined; other modalities may be absent.
    required: tuple[str, ...] = ("image", "audio", "text")
    default_split: str = "train"  # for samples whose json names no split
    batch_size: int = 32  # rows per map_batches call
    num_actors: int = 2  # preprocessing actor pool size
    strict: bool = False  # fail on the first bad sample instead of quarantining it


# ----------------------------------------------------------------------------- pure functions

def decode_image(data: bytes, size: int) -> np.ndarray:
    """Image bytes -> uint8 (size, size, 3): EXIF-upright RGB, shorter side resized, center crop."""
    if not data:
        raise BadSample("image: empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise BadSample(f"image: {img.width}x{img.height} exceeds {MAX_IMAGE_PIXELS} px")
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
            img = ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)
            return np.asarray(img, dtype=np.uint8)
    except BadSample:
        raise
    except Exception as err:  # PIL raises many types for broken files
        raise BadSample(f"image: cannot decode ({type(err).__name__}: {err})") from err


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: scale to 8 bits first
        array = np.asarray(img, dtype=np.float32)
        img = Image.fromarray((array / max(array.max(), 1.0) * 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")  # alpha over white, not black: keeps logos readable
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Audio bytes -> (float32 mono waveform, sample rate), channels averaged."""
    if not data:
        raise BadSample("audio: empty file")
    try:
        wave, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as err:
        raise BadSample(f"audio: cannot decode ({type(err).__name__}: {err})") from err
    if wave.shape[0] == 0:
        raise BadSample("audio: zero samples")
    mono = wave.mean(axis=1)  # (frames, channels) -> (frames,)
    if not np.isfinite(mono).all():
        raise BadSample("audio: non-finite samples (NaN or inf)")
    return mono.astype(np.float32), int(rate)


def fit_length(wave: np.ndarray, num_samples: int) -> tuple[np.ndarray, int]:
    """Crop or zero-pad to ``num_samples``; returns the clip and its true (unpadded) length."""
    length = min(len(wave), num_samples)
    out = np.zeros(num_samples, dtype=np.float32)
    out[:length] = wave[:length]
    return out, length


def decode_text(data: bytes) -> str:
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        raise BadSample(f"text: not UTF-8 ({err})") from err
    if not text:
        raise BadSample("text: empty")
    return text


def member(sample: dict[str, Any], extensions: tuple[str, ...]) -> bytes | None:
    """The bytes of the first member with one of ``extensions``, or None if absent.

    Ray Data fills a member that other samples of the block have but this one lacks with None
    or NaN, so anything that is not bytes counts as absent.
    """
    for ext in extensions:
        value = sample.get(ext)
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value)
    return None


class Resamplers:
    """One ``torchaudio.transforms.Resample`` per source rate, built on first use.

    Building the resampling kernel costs more than applying it to a short clip, so an actor
    keeps them for its lifetime.
    """

    def __init__(self, target_rate: int) -> None:
        self.target_rate = target_rate
        self._by_rate: dict[int, torchaudio.transforms.Resample] = {}

    def __call__(self, wave: np.ndarray, rate: int) -> np.ndarray:
        if rate == self.target_rate:
            return wave
        if rate not in self._by_rate:
            self._by_rate[rate] = torchaudio.transforms.Resample(rate, self.target_rate)
        with torch.no_grad():
            return self._by_rate[rate](torch.from_numpy(wave)).numpy()


def preprocess_sample(sample: dict[str, Any], config: PreprocessConfig,
                      resample: Resamplers) -> dict[str, Any]:
    """One raw sample (member bytes keyed by extension) -> the preprocessed columns.

    Raises
    ------
    BadSample
        With the reason, for anything that must not reach training.
    """
    raw = {"image": member(sample, IMAGE_EXTENSIONS), "audio": member(sample, AUDIO_EXTENSIONS),
           "text": member(sample, TEXT_EXTENSIONS)}
    for name in config.required:
        if raw[name] is None:
            raise BadSample(f"{name}: missing (required by preprocess.required)")
    split = config.default_split
    metadata = member(sample, ("json",))
    if metadata is not None:
        try:
            split = json.loads(metadata).get("split", split)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise BadSample(f"json: does not parse ({err})") from err

    size, n = config.image_size, config.audio_samples
    image = np.zeros((size, size, 3), np.uint8)
    audio, audio_len = np.zeros(n, np.float32), 0
    text_ids, text_len = np.full(config.text_max_len, 0, np.int32), 0
    if raw["image"] is not None:
        image = decode_image(raw["image"], size)
    if raw["audio"] is not None:
        wave, rate = decode_audio(raw["audio"])
        audio, audio_len = fit_length(resample(wave, rate), n)
    if raw["text"] is not None:
        text_ids, text_len = encode_text(decode_text(raw["text"]), config.text_max_len)
    return {"image": image, "audio": audio, "audio_len": audio_len, "text_ids": text_ids,
            "text_len": text_len, "has_image": raw["image"] is not None,
            "has_audio": raw["audio"] is not None, "has_text": raw["text"] is not None,
            "split": str(split)}


class Preprocessor:
    """Ray Data actor: maps a batch of raw webdataset rows to preprocessed rows.

    Every input row comes out: valid ones with ``status == "ok"``, bad ones with the reason in
    ``status`` and zero-filled tensors (they are split off into the quarantine table).
    """

    def __init__(self, config: PreprocessConfig) -> None:
        self.config = config
        self.resample = Resamplers(config.sample_rate)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = batch["__key__"]
        rows = []
        for i, key in enumerate(keys):
            sample = {name: column[i] for name, column in batch.items()}
            shard = str(sample.get("__url__", ""))
            try:
                row = preprocess_sample(sample, self.config, self.resample)
                row["status"] = "ok"
            except BadSample as err:
                if self.config.strict:
                    raise BadSample(f"shard {shard}, key {key}: {err}") from err
                row = self._placeholder()
                row["status"] = str(err)
            row["key"] = str(key)
            row["source_shard"] = shard
            rows.append(row)
        return {name: np.stack([np.asarray(r[name]) for r in rows]) for name in rows[0]}

    def _placeholder(self) -> dict[str, Any]:
        c = self.config
        return {"image": np.zeros((c.image_size, c.image_size, 3), np.uint8),
                "audio": np.zeros(c.audio_samples, np.float32), "audio_len": 0,
                "text_ids": np.zeros(c.text_max_len, np.int32), "text_len": 0,
                "has_image": False, "has_audio": False, "has_text": False,
                "split": c.default_split}


# ----------------------------------------------------------------------------- the stage

def shard_paths(directory: Path) -> list[str]:
    """All ``.tar`` shards under ``directory``, sorted, as strings for Ray Data."""
    paths = sorted(str(p) for p in Path(directory).rglob("*.tar"))
    if not paths:
        raise FileNotFoundError(f"no .tar shards under {directory}")
    return paths


def run(config: PreprocessConfig, ctx: StageContext) -> dict[str, Any]:
    """Read the ``synth`` (or ``ingest``) shards, preprocess them, write parquet per split."""
    import ray
    from ray.data.expressions import col

    paths = shard_paths(ctx.inputs["shards"])
    raw = ray.data.read_webdataset(paths, decoder=None)
    processed = raw.map_batches(
        Preprocessor, fn_constructor_args=(config,), batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(size=config.num_actors), batch_format="numpy",
    ).materialize()
    statuses = processed.select_columns(["key", "split", "status", "source_shard"]).to_pandas()
    ok = statuses["status"] == "ok"
    quarantine = statuses.loc[~ok, ["key", "source_shard", "status"]].rename(
        columns={"source_shard": "shard", "status": "reason"}).assign(stage="preprocess")
    pq.write_table(pa.Table.from_pandas(quarantine, preserve_index=False),
                   ctx.output_dir / "quarantine.parquet")

    counts: dict[str, Any] = {"in": len(statuses), "quarantined": int((~ok).sum())}
    for split in sorted(statuses.loc[ok, "split"].unique()):
        part = processed.filter(expr=(col("status") == "ok") & (col("split") == split))
        part.drop_columns(["status"]).write_parquet(str(ctx.output_dir / split))
        counts[f"out/{split}"] = int((ok & (statuses["split"] == split)).sum())
    counts["out"] = int(ok.sum())
    if counts["in"] != counts["out"] + counts["quarantined"]:
        raise RuntimeError(f"preprocess lost samples: {counts}")
    if ctx.logger:
        ctx.logger.metrics({f"samples/{k}": v for k, v in counts.items()}, step=0)
        if len(quarantine):
            ctx.logger.artifact(ctx.output_dir / "quarantine.parquet")
    return {"counts": counts, "splits": sorted(k[4:] for k in counts if k.startswith("out/"))}
