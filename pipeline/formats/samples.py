"""One raw sample -> the preprocessed columns of DESIGN.md, or :class:`BadSample` with a reason.

The per-sample contract between the shards and the model: what preprocess writes for training,
and what ``mmvq encode`` and the registered model run on a user's files so that they see exactly
what training saw. :class:`SampleSpec` holds the settings that decide one sample's columns (crop
size, rate, clip and text length, and the caps that bound each decode); the preprocess stage's
config extends it with how the stage runs.
"""

from __future__ import annotations

import io
import json
import math
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile
import soxr
from PIL import Image, ImageOps

from mmvq.config import MODALITIES
from mmvq.config_io import ConfigError
from mmvq.text_vocab import BYTES, TextVocab, encode_text
from pipeline.formats.shards import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, SPLIT_NAME, TEXT_EXTENSIONS

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
class SampleSpec:
    """What one preprocessed sample is: its shapes, and the caps that bound each decode."""

    image_size: int = 64  # square side in pixels after resize + center crop
    sample_rate: int = 8000  # the audio model's rate; every clip is resampled to it
    audio_samples: int = 20000  # fixed clip length at sample_rate: crop or zero-pad, keep true len
    text_max_len: int = 64  # text ids per caption; longer text is truncated
    # A sample missing one of these is quarantined; other modalities may be absent.
    required: tuple[str, ...] = MODALITIES
    default_split: str = "train"  # for samples whose json names no split
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

    @classmethod
    def for_model(cls, model: Any) -> SampleSpec:
        """The spec a trained tokenizer's inputs were made with (its ``TokenizerConfig``), with
        no modality required: what ``mmvq encode`` and the registered model decode by."""
        return cls(image_size=model.image.image_size, sample_rate=model.audio.sample_rate,
                   audio_samples=model.audio.num_samples, text_max_len=model.text.max_len,
                   required=())

    def __post_init__(self) -> None:
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
    return normalize_text(verbatim_text(data, max_bytes))


def verbatim_text(data: bytes, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """UTF-8 bytes -> the caption exactly as written (what text tokens keep: a language model
    trained on them must reproduce its prompt). More than ``max_bytes`` bytes is refused before
    anything is decoded."""
    if len(data) > max_bytes:
        raise BadSample(f"text: {len(data)} bytes, over the {max_bytes}-byte limit "
                        "(preprocess.max_text_bytes)")
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadSample(f"text: not UTF-8 ({err})") from err


def normalize_text(text: str) -> str:
    """The text codec's view of a caption: NFC, whitespace runs as one space.

    Raises
    ------
    BadSample
        If nothing but whitespace is left.
    """
    text = " ".join(unicodedata.normalize("NFC", text).split())
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


def sample_split(sample: dict[str, Any], default: str) -> str:
    """The split a raw sample belongs to: its ``json`` metadata's ``split``, else ``default``.

    Raises
    ------
    BadSample
        If the json does not parse or the split is not a plain name (it becomes a directory).
    """
    metadata = member(sample, ("json",))
    if metadata is None:
        return default
    try:
        split = json.loads(metadata).get("split", default)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise BadSample(f"json: does not parse ({err})") from err
    if not isinstance(split, str) or not SPLIT_NAME.fullmatch(split):
        raise BadSample(f"json: split {split!r} is not a plain name ([A-Za-z0-9_-]+)")
    return split


def preprocess_sample(sample: dict[str, Any], config: SampleSpec,
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
    split = sample_split(sample, config.default_split)

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
    text = ""
    if raw["text"] is not None:
        text = verbatim_text(raw["text"], config.max_text_bytes)
        text_ids, text_len = encode_text(normalize_text(text), config.text_max_len, vocab)
    return {"image": image, "audio": audio, "audio_len": audio_len, "text_ids": text_ids,
            "text_len": text_len, "has_image": raw["image"] is not None,
            "has_audio": raw["audio"] is not None, "has_text": raw["text"] is not None,
            "text": text,
            "split": str(split)}


def stack_rows(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Preprocessed rows -> one array per column. Strings go into object arrays: NumPy's
    fixed-width strings drop trailing NUL characters, and a caption must come out as it went in.
    """
    return {name: (np.array([r[name] for r in rows], dtype=object)
                   if isinstance(rows[0][name], str)
                   else np.stack([np.asarray(r[name]) for r in rows])) for name in rows[0]}
