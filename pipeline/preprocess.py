"""Preprocess stage: webdataset shards -> model-ready columns, every sample accounted for.

Pure functions turn one raw sample (member bytes by extension) into the preprocessed columns of
DESIGN.md, or raise :class:`BadSample` with a reason. :class:`Preprocessor` is the thin Ray Data
actor around them: it builds its resamplers once and maps whole batches. The stage reads the
shards with :class:`pipeline.shard_source.ShardDatasource` (a Ray Data file datasource over
:func:`pipeline.ingest.read_shard`, in a module of its own so read tasks import no torch), not ``ray.data.read_webdataset``: that reader groups
*consecutive* members only, so out-of-order members silently become two samples with one key, a
truncated tar ends the shard early without a word, and a duplicate member kills the read task.
Ours marks all of those, and a key seen twice anywhere in the input is quarantined in every
occurrence. Shards may sit on local disk or an object store (:mod:`pipeline.storage`). The stage
writes one parquet dataset per split and the quarantine table, and checks
``in = out + quarantined``.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile
import soxr
from PIL import Image, ImageOps

from mmvq.config_io import ConfigError
from mmvq.text_vocab import BYTES, VOCAB_SIZE, TextVocab, encode_text
from pipeline.ingest import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, TEXT_EXTENSIONS
from pipeline.stage import SPLIT_NAME, StageContext
from pipeline.storage import resolve

MODALITIES = ("image", "audio", "text")

# Refuse images above this many pixels before decoding them (decompression bombs).
MAX_IMAGE_PIXELS = 64_000_000
# Audio sample rates outside this range are refused from the header. 1 kHz keeps 500 Hz of
# bandwidth, about the least a clip of sound can carry (the corpus' slowest valid file is an
# hour at 1 kHz); 384 kHz is the highest rate of standard PCM (DXD, 8 x 48 kHz): a header with
# 1 Hz or 10 MHz is broken or hostile, and resampling it would give nothing worth training on.
MIN_AUDIO_RATE, MAX_AUDIO_RATE = 1000, 384_000
# Audio with more channels is refused from the header. 22.2 surround (24) is the widest layout
# in use; more is a microphone array or a stack of stems, whose average is no meaningful mono.
MAX_AUDIO_CHANNELS = 32
# Captions longer than this many bytes are refused before decoding: the longest dense image
# captions run to a few KiB, and decoding text (str, NFC, word split) costs ~14x its size.
MAX_TEXT_BYTES = 64 << 10
# Frames per read while downmixing, so that the multichannel buffer is this many frames x the
# channels (1 MiB at 32 channels), never the whole clip x the channels.
_READ_BLOCK_FRAMES = 8192


class BadSample(ValueError):
    """A sample that cannot be preprocessed; the message is the quarantine reason."""


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int = 64  # square side in pixels after resize + center crop
    sample_rate: int = 8000  # the audio model's rate; every clip is resampled to it
    audio_samples: int = 20000  # fixed clip length at sample_rate: crop or zero-pad, keep true len
    text_max_len: int = 64  # text ids per caption; longer text is truncated
    # Text ids: "bytes" (UTF-8, no file) or "bpe", a byte-level BPE trained on the train split's
    # captions first and written as text_vocab.json in the output (pipeline.text_vocab).
    text_vocab: Literal["bytes", "bpe"] = "bytes"
    bpe_vocab_size: int = 1024  # bpe only: target ids incl. 256 bytes + PAD; may end up fewer
    # A sample missing one of these is quarantined; other modalities may be absent.
    required: tuple[str, ...] = ("image", "audio", "text")
    default_split: str = "train"  # for samples whose json names no split
    batch_size: int = 128  # rows per map_batches call: fewer, larger Ray tasks (bench-data)
    num_actors: int = 2  # preprocessing actors at most (the pool starts with one and grows)
    strict: bool = False  # fail on the first bad sample instead of quarantining it
    # Images with more pixels are refused before decoding (a 100 kB PNG can claim 10 Gpx).
    max_image_pixels: int = MAX_IMAGE_PIXELS
    # Audio whose rate is outside [min_audio_rate, max_audio_rate] Hz is quarantined from its
    # header (see MIN_AUDIO_RATE): any rate inside is resampled at a cost that grows with the
    # clip only (soxr), so the range says what is audio, not what is affordable.
    min_audio_rate: int = MIN_AUDIO_RATE
    max_audio_rate: int = MAX_AUDIO_RATE
    # Audio with more channels is quarantined from its header, not downmixed (see
    # MAX_AUDIO_CHANNELS); up to the cap it is downmixed a block at a time, so a wide file
    # costs one block x its channels on top of the mono clip.
    max_audio_channels: int = MAX_AUDIO_CHANNELS
    # Text members larger than this are quarantined before decoding (a 50 MB member cost
    # ~500 MB to decode). Inclusive; 64 KiB is ten times the longest captions in use.
    max_text_bytes: int = MAX_TEXT_BYTES
    # Shards compressed with gzip, bzip2 or xz are quarantined (one row naming the shard)
    # unless this is set: 300 KiB of gzip can expand to 300 MiB of members, and webdataset
    # shards are plain tars. Set it only for shards from a source you trust.
    allow_compressed_shards: bool = False

    def min_resources(self) -> dict[str, float]:
        """What Ray must have for the first preprocessing actor (read tasks take no CPU)."""
        return {"CPU": 1.0}

    def __post_init__(self) -> None:
        if self.bpe_vocab_size <= VOCAB_SIZE:
            raise ConfigError(f"preprocess.bpe_vocab_size must exceed the {VOCAB_SIZE} byte "
                              f"ids, got {self.bpe_vocab_size}")
        for name in ("min_audio_rate", "max_audio_channels", "max_text_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"preprocess.{name} must be at least 1, got "
                                  f"{getattr(self, name)}")
        if self.max_audio_rate < self.min_audio_rate:
            raise ConfigError(f"preprocess.max_audio_rate ({self.max_audio_rate}) is below "
                              f"preprocess.min_audio_rate ({self.min_audio_rate})")
        if not self.min_audio_rate <= self.sample_rate <= self.max_audio_rate:
            raise ConfigError(f"preprocess.sample_rate {self.sample_rate} is outside the "
                              f"accepted audio rates {self.min_audio_rate}..{self.max_audio_rate}"
                              " (preprocess.min_audio_rate, max_audio_rate)")


# ----------------------------------------------------------------------------- pure functions

def decode_image(data: bytes, size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Image bytes -> uint8 (size, size, 3): EXIF-upright RGB, shorter side resized, center crop.

    The format comes from the content, not the member's extension. Modes L, LA, RGBA, P, CMYK
    and 16-bit become RGB (alpha over white); more than ``max_pixels`` pixels is refused from
    the header, before any pixel is decoded.
    """
    if not data:
        raise BadSample("image: empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise BadSample(f"image: {img.width}x{img.height} exceeds the {max_pixels} "
                                "pixel limit (decompression bomb?)")
            # JPEG can decode at 1/2, 1/4, 1/8 scale for free; draft never goes below the size.
            img.draft("RGB", (size, size))
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
            img = ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)
            return np.asarray(img, dtype=np.uint8)
    except BadSample:
        raise
    except Image.DecompressionBombError as err:  # Pillow's own limit fires in open() already
        raise BadSample(f"image: exceeds the pixel limit, decompression bomb ({err})") from err
    except Exception as err:  # PIL raises many types for broken files
        raise BadSample(f"image: cannot decode ({type(err).__name__}: {err})") from err


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: 0..65535 -> 0..255
        # A fixed scale, not per-image min/max: a dark 16-bit photo must stay dark.
        array = np.asarray(img, dtype=np.float32)
        img = Image.fromarray(np.clip(np.round(array / 257.0), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")  # alpha over white, not black: keeps logos readable
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_audio(data: bytes, keep_seconds: float | None = None, *,
                 rates: tuple[int, int] = (MIN_AUDIO_RATE, MAX_AUDIO_RATE),
                 max_channels: int = MAX_AUDIO_CHANNELS) -> tuple[np.ndarray, int]:
    """Audio bytes -> (float32 mono waveform, sample rate), channels averaged.

    libsndfile (soundfile) decodes WAV, FLAC, OGG/Vorbis/Opus and MP3, detected from the content.
    With ``keep_seconds`` only that much (plus a little for the resampler) is decoded, so an
    hours-long file costs what a clip costs and never fills memory. A rate outside ``rates``
    (inclusive) or more than ``max_channels`` channels is refused from the header; channels are
    averaged a block at a time, so a wide file never holds the clip in all its channels.
    """
    if not data:
        raise BadSample("audio: empty file")
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as sound:
            rate = int(sound.samplerate)
            _check_audio_header(rate, sound.channels, rates, max_channels)
            frames = -1
            if keep_seconds is not None:  # 10 ms extra keeps the resampler's edge off the clip
                frames = math.ceil((keep_seconds + 0.01) * rate)
            mono = _read_mono(sound, frames)
    except BadSample:
        raise
    except Exception as err:
        raise BadSample(f"audio: cannot decode ({type(err).__name__}: {err})") from err
    if mono.size == 0:
        raise BadSample("audio: zero samples")
    if not np.isfinite(mono).all():
        raise BadSample("audio: non-finite samples (NaN or inf)")
    return mono, rate


def _check_audio_header(rate: int, channels: int, rates: tuple[int, int],
                        max_channels: int) -> None:
    low, high = rates
    if not low <= rate <= high:
        raise BadSample(f"audio: sample rate {rate} Hz is outside the {low}..{high} Hz range "
                        "(preprocess.min_audio_rate, max_audio_rate)")
    if channels > max_channels:
        raise BadSample(f"audio: {channels} channels, over the {max_channels}-channel limit "
                        "(preprocess.max_audio_channels)")


def _read_mono(sound: soundfile.SoundFile, frames: int) -> np.ndarray:
    """Up to ``frames`` frames (all for -1) of ``sound``, averaged over channels block by block."""
    left = frames if frames >= 0 else math.inf
    parts = []
    while left > 0:
        block = sound.read(min(_READ_BLOCK_FRAMES, left), dtype="float32", always_2d=True)
        if not len(block):
            break
        parts.append(block.mean(axis=1, dtype=np.float32))  # (n, channels) -> (n,)
        left -= len(block)
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def fit_length(wave: np.ndarray, num_samples: int) -> tuple[np.ndarray, int]:
    """Crop or zero-pad to ``num_samples``; returns the clip and its true (unpadded) length."""
    length = min(len(wave), num_samples)
    out = np.zeros(num_samples, dtype=np.float32)
    out[:length] = wave[:length]
    return out, length


def decode_text(data: bytes, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """UTF-8 bytes -> normalised text: NFC (one code point sequence per character, so equal
    captions give equal ids) and runs of whitespace collapsed to one space. More than
    ``max_bytes`` bytes is refused before anything is decoded."""
    if len(data) > max_bytes:
        raise BadSample(f"text: {len(data)} bytes, over the {max_bytes}-byte limit "
                        "(preprocess.max_text_bytes)")
    try:
        text = unicodedata.normalize("NFC", data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise BadSample(f"text: not UTF-8 ({err})") from err
    text = " ".join(text.split())
    if not text:
        raise BadSample("text: empty")
    return text


def member(sample: dict[str, Any], extensions: tuple[str, ...]) -> bytes | None:
    """The bytes of the first member with one of ``extensions``, or None if absent.

    Ray Data fills a member that other samples of the block have but this one lacks with None
    or NaN, so anything that is not bytes counts as absent.
    """
    found = [(ext, sample.get(ext)) for ext in extensions]
    found = [(ext, v) for ext, v in found if isinstance(v, bytes | bytearray | memoryview)]
    if len(found) > 1:  # which one is the sample's? Guessing could pair the wrong files.
        raise BadSample(f"several members for one modality: {', '.join(e for e, _ in found)}")
    return bytes(found[0][1]) if found else None


class Resamplers:
    """Resamples mono clips from any rate to ``target_rate`` with soxr (libsoxr).

    soxr designs its polyphase filter from the ratio's value, so time and memory grow with the
    clip alone. torchaudio's ``Resample``, used before, builds a kernel of
    ``target / gcd x source / gcd`` taps: 44101 Hz -> 16 kHz asked for 5.6 GB while building
    a 2.8 GB kernel, for a 172-byte WAV. "HQ" is soxr's default (20-bit, flat to ~91 % of the lower Nyquist rate).
    Stateless; the class keeps the interface that callers hold one of.
    """

    def __init__(self, target_rate: int, quality: str = "HQ") -> None:
        self.target_rate = target_rate
        self.quality = quality

    def __call__(self, wave: np.ndarray, rate: int) -> np.ndarray:
        if rate == self.target_rate:
            return wave
        return soxr.resample(wave, rate, self.target_rate, quality=self.quality)


# What a resampler raises on data it cannot take (a buffer too large for memory, a ratio outside
# its range): one sample's problem, quarantined. Anything else is a bug and stops the stage.
_RESAMPLE_FAILURES = (RuntimeError, MemoryError)


def resample_clip(resample: Resamplers, wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``resample(wave, rate)``, with a resampler failure or an empty result a :class:`BadSample`
    that names the rates and the cause."""
    try:
        out = resample(wave, rate)
    except _RESAMPLE_FAILURES as err:
        raise BadSample(f"audio: cannot resample from {rate} Hz to {target} Hz "
                        f"({type(err).__name__}: {err})") from err
    if len(out) == 0:
        raise BadSample(f"audio: {len(wave)} samples at {rate} Hz resample to none at "
                        f"{target} Hz")
    return out


def preprocess_sample(sample: dict[str, Any], config: PreprocessConfig,
                      resample: Resamplers, vocab: TextVocab = BYTES) -> dict[str, Any]:
    """One raw sample (member bytes keyed by extension) -> the preprocessed columns.

    Raises
    ------
    BadSample
        With the reason, for anything that must not reach training: a member that does not
        decode or resample, is over a cap of ``config``, or a reader's error for the sample.
    """
    if error := sample.get("__error__"):
        raise BadSample(str(error))
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
        if not isinstance(split, str) or not SPLIT_NAME.fullmatch(split):
            raise BadSample(f"json: split {split!r} is not a plain name ([A-Za-z0-9_-]+)")

    size, n = config.image_size, config.audio_samples
    image = np.zeros((size, size, 3), np.uint8)
    audio, audio_len = np.zeros(n, np.float32), 0
    text_ids, text_len = np.full(config.text_max_len, 0, np.int32), 0
    if raw["image"] is not None:
        image = decode_image(raw["image"], size, config.max_image_pixels)
    if raw["audio"] is not None:
        wave, rate = decode_audio(raw["audio"], keep_seconds=n / config.sample_rate,
                                  rates=(config.min_audio_rate, config.max_audio_rate),
                                  max_channels=config.max_audio_channels)
        audio, audio_len = fit_length(resample_clip(resample, wave, rate, config.sample_rate), n)
    if raw["text"] is not None:
        text = decode_text(raw["text"], config.max_text_bytes)
        text_ids, text_len = encode_text(text, config.text_max_len, vocab)
    return {"image": image, "audio": audio, "audio_len": audio_len, "text_ids": text_ids,
            "text_len": text_len, "has_image": raw["image"] is not None,
            "has_audio": raw["audio"] is not None, "has_text": raw["text"] is not None,
            "split": str(split)}


# The json field in which `mmvq ingest` records each sample's original files (pipeline.ingest).
ORIGIN_FIELD = "mmvq_origin"
_MODALITY_EXTENSIONS = {"image": IMAGE_EXTENSIONS, "audio": AUDIO_EXTENSIONS,
                        "text": TEXT_EXTENSIONS, "json": ("json",)}


def sample_origin(sample: dict[str, Any], status: str) -> str:
    """The user's original file behind a sample (for quarantine tables), best effort.

    Shards written by ``mmvq ingest`` carry ``mmvq_origin`` in their json: the source (folder
    stem, manifest row, shard) and the original file of each member. A reason that starts with
    a modality ("image: cannot decode") names that member's file; otherwise the source. Shards
    from other tools have no such record: the shard and key are what is known.
    """
    fallback = f"{sample.get('__url__', '')}#{sample.get('__key__', '')}"
    raw = sample.get("json")
    if not isinstance(raw, bytes | bytearray | memoryview):
        return fallback
    try:
        record = json.loads(bytes(raw)).get(ORIGIN_FIELD) or {}
        files = record.get("files") or {}
        modality = status.split(":", 1)[0] if ":" in status else ""
        for ext in _MODALITY_EXTENSIONS.get(modality, ()):
            if files.get(ext):
                return str(files[ext])
        return str(record.get("source") or fallback)
    except (ValueError, AttributeError, TypeError):
        return fallback


def origin_root(shards: str | Path) -> str | None:
    """The folder that ``mmvq ingest``'s relative origins are relative to, for shards it wrote.

    Its manifest names the source: a folder (origins are below it), or a manifest/shard file
    (origins are beside it). None for shards no ingest wrote.
    """
    manifest = resolve(str(shards)).join("manifest.json")
    try:
        record = json.loads(manifest.read_bytes())
        source = str(record.get("source_path") or record.get("source") or "")
    except (OSError, ValueError, AttributeError):
        return None
    if not source:
        return None
    place = resolve(source)
    return (place.parent() if place.is_file() else place).uri


def absolute_origin(origin: str, root: str | None) -> str:
    """``origin`` joined to ``root`` unless it already is absolute (or there is no root)."""
    if root is None or "://" in origin or origin.startswith("/"):
        return origin
    return f"{root.rstrip('/')}/{origin}"


class Preprocessor:
    """Ray Data actor: maps a batch of raw webdataset rows to preprocessed rows.

    Every input row comes out: valid ones with ``status == "ok"``, bad ones with the reason in
    ``status`` and zero-filled tensors (they are split off into the quarantine table). Only
    :class:`BadSample` is the data's fault; any other exception is a bug and stops the stage,
    with the shard and key added to its notes.
    """

    def __init__(self, config: PreprocessConfig, vocab: TextVocab = BYTES) -> None:
        self.config = config
        self.resample = Resamplers(config.sample_rate)
        self.vocab = vocab

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = batch["__key__"]
        rows = []
        for i, key in enumerate(keys):
            sample = {name: column[i] for name, column in batch.items()}
            shard = str(sample.get("__url__", ""))
            try:
                row = preprocess_sample(sample, self.config, self.resample, self.vocab)
                row["status"] = "ok"
            except BadSample as err:
                if self.config.strict:
                    raise BadSample(f"shard {shard}, key {key}: {err}") from err
                row = self._placeholder()
                row["status"] = str(err)
            except Exception as err:
                err.add_note(f"while preprocessing shard {shard}, key {key}")
                raise
            row["key"] = str(key)
            row["source_shard"] = shard
            row["origin"] = sample_origin(sample, row["status"])
            rows.append(row)
        return {name: np.stack([np.asarray(r[name]) for r in rows]) for name in rows[0]}

    def _placeholder(self) -> dict[str, Any]:
        c = self.config
        return {"image": np.zeros((c.image_size, c.image_size, 3), np.uint8),
                "audio": np.zeros(c.audio_samples, np.float32), "audio_len": 0,
                "text_ids": np.zeros(c.text_max_len, np.int32), "text_len": 0,
                "has_image": False, "has_audio": False, "has_text": False,
                "split": c.default_split}


# ----------------------------------------------------------------------------- reading shards

def shard_paths(location: str | Path) -> tuple[list[str], Any]:
    """All ``.tar`` shards under a directory path or URI (or that one ``.tar`` file), sorted:
    (paths, pyarrow filesystem)."""
    source = resolve(str(location))
    if source.is_file() and source.path.endswith(".tar"):
        return [source.path], source.fs
    paths = [info.path for info in source.files((".tar",))] if source.is_dir() else []
    if not paths:
        raise FileNotFoundError(f"no .tar shards under {location}")
    return paths, source.fs


def repeated_keys(keys: Any) -> dict[str, int]:
    """Keys that occur more than once (out-of-order members, or one key in two shards)."""
    counts = keys[keys != ""].value_counts()
    return {str(k): int(n) for k, n in counts[counts > 1].items()}


def repeated_reason(key: str, times: int, status: str) -> str:
    """Quarantine reason of one occurrence of a repeated key (its own problem, if any, kept)."""
    reason = (f"key {key!r} occurs {times} times in the input (out-of-order members or a "
              "duplicate key)")
    return reason if status == "ok" else f"{reason}; this occurrence: {status}"


# ----------------------------------------------------------------------------- the stage


def preprocessed_dataset(paths: list[str], filesystem: Any, config: PreprocessConfig,
                         vocab: TextVocab = BYTES) -> Any:
    """The stage's lazy Ray Data pipeline: shards -> :class:`Preprocessor` actor pool.

    Every input sample comes out as one row with its ``status`` ("ok" or the reason); the stage
    streams it into per-split parquet, ``pipeline.bench.dataplane`` times it as is.
    """
    import ray

    from pipeline.raydata import actor_pool, bounded, io_tasks
    from pipeline.shard_source import ShardDatasource

    # Reading a tar costs little next to decoding it, so the read tasks reserve no CPU: with a
    # pool holding every CPU (num_actors == num_cpus, e.g. 2 actors on a 2-core machine) 1-CPU
    # reads were never scheduled and the stage hung. One read per 8 actors keeps them fed
    # (pipeline.raydata.io_tasks) and the object store from filling with raw shards.
    source = ShardDatasource(paths, filesystem=filesystem,
                             allow_compressed=config.allow_compressed_shards)
    raw = ray.data.read_datasource(source, num_cpus=0, concurrency=io_tasks(config.num_actors))
    return bounded(raw.map_batches(
        Preprocessor, fn_constructor_args=(config, vocab), batch_size=config.batch_size,
        batch_format="numpy", **actor_pool(config.num_actors)), config.num_actors)


def run(config: PreprocessConfig, ctx: StageContext) -> dict[str, Any]:
    """Read the ``synth`` or ``ingest`` shards (or any webdataset shards), preprocess them and
    stream the rows into parquet per split; quarantine what is bad; check the counts.

    Nothing decoded is held: rows go to disk as the actors produce them
    (:class:`pipeline.sinks.SplitParquetSink`), and the accounting afterwards reads only keys
    and reasons. A key read more than once (its members were scattered, or two samples share
    it) is found from those keys and removed from the files it reached: some readers would pair
    the wrong files, so every occurrence is quarantined.
    """
    from pipeline.raydata import io_tasks, write
    from pipeline.sinks import SplitParquetSink, drop_keys, read_status, rows_in
    from pipeline.text_vocab import describe, fit_text_vocab

    paths, filesystem = shard_paths(ctx.inputs["shards"])
    # Text vocabulary first (a BPE trains on the train captions, text_vocab.json in the output).
    vocab = fit_text_vocab(paths, config.text_vocab, config.bpe_vocab_size,
                           config.default_split, ctx.output_dir, filesystem=filesystem,
                           max_text_bytes=config.max_text_bytes,
                           allow_compressed=config.allow_compressed_shards)
    write(preprocessed_dataset(paths, filesystem, config, vocab),
          SplitParquetSink(ctx.output_dir), concurrency=io_tasks(config.num_actors))
    statuses = read_status(ctx.output_dir).to_pandas()
    repeated = repeated_keys(statuses["key"])
    again = statuses["key"].isin(list(repeated))
    statuses.loc[again, "status"] = [
        repeated_reason(k, repeated[k], status)
        for k, status in zip(statuses.loc[again, "key"], statuses.loc[again, "status"],
                             strict=True)]
    ok = statuses["status"] == "ok"
    if config.strict and not ok.all():
        first = statuses.loc[~ok].iloc[0]
        raise BadSample(f"shard {first['source_shard']}, key {first['key']}: {first['status']}")
    splits = sorted(p.name for p in ctx.output_dir.iterdir()
                    if p.is_dir() and not p.name.startswith("."))
    if repeated:
        drop_keys(ctx.output_dir, splits, set(repeated))
        for split in [s for s in splits if not any((ctx.output_dir / s).glob("*.parquet"))]:
            (ctx.output_dir / split).rmdir()  # every row of it was a repeated key
            splits.remove(split)
    quarantine = statuses.loc[~ok, ["key", "source_shard", "status", "origin"]].rename(
        columns={"source_shard": "shard", "status": "reason"}).assign(stage="preprocess")
    root = origin_root(ctx.inputs["shards"])
    quarantine["origin"] = [absolute_origin(o, root) for o in quarantine["origin"]]
    pq.write_table(pa.Table.from_pandas(quarantine, preserve_index=False),
                   ctx.output_dir / "quarantine.parquet")
    shutil.rmtree(ctx.output_dir / ".status")

    counts: dict[str, Any] = {"in": len(statuses), "quarantined": int((~ok).sum())}
    for split in splits:
        counts[f"out/{split}"] = int((ok & (statuses["split"] == split)).sum())
        written = rows_in(ctx.output_dir / split)
        if written != counts[f"out/{split}"]:  # what is on disk is what the counts say
            raise RuntimeError(f"preprocess wrote {written} rows to {split}/ but counted "
                               f"{counts[f'out/{split}']}")
    counts["out"] = int(ok.sum())
    if counts["in"] != counts["out"] + counts["quarantined"]:
        raise RuntimeError(f"preprocess lost samples: {counts}")
    print(f"preprocess: in {counts['in']} = out {counts['out']} + quarantined "
          f"{counts['quarantined']}")
    if ctx.logger:
        ctx.logger.metrics({f"samples/{k}": v for k, v in counts.items()}, step=0)
        if len(quarantine):
            ctx.logger.artifact(ctx.output_dir / "quarantine.parquet")
    return {"counts": counts, "splits": splits,
            "text_vocab": describe(vocab)}

