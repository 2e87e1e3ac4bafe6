"""Write the spoken-scenes demo dataset as webdataset shards plus a manifest.

Sample ``index`` is a pure function of ``(config.seed, index)`` and the image size and sample rate:
its generator is ``np.random.default_rng([seed, index])``, so shard size and split never change its
content. Shards are byte-identical for the same config (fixed tar headers, deterministic PNG and
FLAC encoders, eSpeak run from a pristine state per utterance).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from PIL import Image

from pipeline.formats.shards import SHARD_MANIFEST
from pipeline.synth.scenes import Scene, caption, draw_scene, layout_scene, sample_scene, shape_mask
from pipeline.synth.speech import Speaker, SpeechRequest, sample_voice

SPLITS: tuple[str, ...] = ("train", "val")
SOURCE = "mmvq-synth"
LICENSE = "CC0-1.0"  # everything is generated here, so it can be given away without conditions
MANIFEST_VERSION = 1

# Tar headers carry no time, owner or host information, so equal content gives equal bytes.
_TAR_MTIME = 0
_TAR_OWNER = "mmvq"
# Entropy for the split permutation. Three words: numpy's SeedSequence ignores trailing zeros, so
# a one- or two-word key could coincide with a sample's [seed, index].
_SPLIT_KEY = (0x5B117, 1)


@dataclass(frozen=True)
class SynthConfig:
    """What `run` generates; the same config always gives byte-identical shards."""

    # Enough scenes for the demo tokenizer to learn colours, shapes and words in minutes on a CPU,
    # and few enough to generate in well under a minute.
    num_samples: int = 768
    # The whole dataset is a function of this seed and the fields below.
    seed: int = 0
    # Side of the square images; 64 keeps the demo VQGAN fast while shapes stay recognisable.
    image_size: int = 64
    # Audio rate in Hz; 16 kHz is what speech front ends (mel, codecs) are usually built for.
    sample_rate: int = 16000
    # Held-out share for evaluation; exactly round(num_samples * val_fraction) samples.
    val_fraction: float = 0.125
    # Several shards per split let readers parallelise and shuffle at shard level; 128 demo
    # samples make ~9 MB shards.
    samples_per_shard: int = 128

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {self.num_samples}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be at least 1, got {self.samples_per_shard}")
        if self.sample_rate < 8000:
            raise ValueError(f"sample_rate must be at least 8000 Hz, got {self.sample_rate}")

    def output_splits(self) -> set[str]:
        """The splits the shards will have (checked against what later stages read)."""
        return {"train", "val"} if round(self.num_samples * self.val_fraction) else {"train"}


@dataclass(frozen=True)
class SamplePlan:
    """Everything about one sample except its audio, which the eSpeak helper renders."""

    index: int
    scene: Scene
    boxes: tuple[tuple[int, int, int, int], ...]  # per shape: x_min, y_min, x_max, y_max, inclusive
    image: np.ndarray  # uint8 (H, W, 3)
    caption: str
    speech: SpeechRequest


def sample_key(index: int) -> str:
    """Return the ``__key__`` of sample ``index``, e.g. ``scene-000042``."""
    return f"scene-{index:06d}"


def plan_sample(config: SynthConfig, index: int) -> SamplePlan:
    """Draw scene, image, caption and voice of sample ``index`` from ``rng([seed, index])``.

    Parameters
    ----------
    config : SynthConfig
        Supplies the seed and image size.
    index : int
        Position of the sample in the dataset, 0-based.

    Returns
    -------
    SamplePlan
        The sample, ready to be spoken and encoded.
    """
    rng = np.random.default_rng([config.seed, index])
    scene = sample_scene(rng)
    placements = layout_scene(scene, config.image_size, rng)
    image = draw_scene(scene, placements, config.image_size, rng)
    boxes = tuple(
        _pixel_box(shape_mask(shape.kind, placement, config.image_size))
        for shape, placement in zip(scene.shapes, placements)
    )
    text = caption(scene)
    voice, rate, pitch = sample_voice(rng)
    speech = SpeechRequest(text, voice, rate, pitch, seed=int(rng.integers(2**31)))
    return SamplePlan(index, scene, boxes, image, text, speech)


def split_assignment(config: SynthConfig) -> np.ndarray:
    """Return a bool array over sample indices, True where the sample belongs to "val".

    Exactly ``round(num_samples * val_fraction)`` samples are chosen by a permutation seeded from
    ``config.seed``, so the split is deterministic and its size exact.
    """
    num_val = round(config.num_samples * config.val_fraction)
    order = np.random.default_rng([config.seed, *_SPLIT_KEY]).permutation(config.num_samples)
    is_val = np.zeros(config.num_samples, dtype=bool)
    is_val[order[:num_val]] = True
    return is_val


def run(config: SynthConfig, output_dir: Path, progress: bool = True) -> dict:
    """Generate the dataset into ``output_dir/{train,val}/shard-NNNNNN.tar`` and a manifest.

    Parameters
    ----------
    config : SynthConfig
        What to generate.
    output_dir : Path
        Destination; must not already hold a synth output. Created if missing.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    dict
        The manifest also written to ``output_dir/manifest.json``: config, per-split counts, and
        per-split shard lists with sample counts and sha256.

    Raises
    ------
    FileExistsError
        If ``output_dir`` already holds a manifest or shards.
    """
    output_dir = Path(output_dir)
    _prepare_output(output_dir)
    is_val = split_assignment(config)
    sinks = {split: ShardSink(output_dir, split, config.samples_per_shard) for split in SPLITS}
    plans, for_speech = itertools.tee(plan_sample(config, i) for i in range(config.num_samples))
    with Speaker(config.sample_rate) as speaker, _progress_bar(config.num_samples, progress) as bar:
        audios = speaker.speak_all(plan.speech for plan in for_speech)
        for plan, audio in zip(plans, audios, strict=True):
            split = SPLITS[int(is_val[plan.index])]
            sinks[split].write(encode_sample(plan, audio, split, config))
            bar.update(1)
    shards = {split: sink.close() for split, sink in sinks.items()}
    manifest = _manifest(config, shards)
    _write_atomically(output_dir / SHARD_MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def encode_sample(plan: SamplePlan, audio: np.ndarray, split: str, config: SynthConfig) -> dict:
    """Encode one sample as the webdataset members ``png``, ``flac``, ``txt`` and ``json``.

    Parameters
    ----------
    plan : SamplePlan
        Image, caption and speech settings of the sample.
    audio : numpy.ndarray
        float32 mono speech at ``config.sample_rate``, shape (T,).
    split : str
        "train" or "val", recorded in the metadata.
    config : SynthConfig
        Supplies the seed and sample rate.

    Returns
    -------
    dict
        ``{"__key__": str, "png": bytes, "flac": bytes, "txt": bytes, "json": bytes}``.
    """
    scene = {
        "shapes": [
            {"kind": s.kind, "colour": s.colour, "size": s.size, "box": list(box)}
            for s, box in zip(plan.scene.shapes, plan.boxes)
        ],
        "relation": plan.scene.relation,
    }
    metadata = {
        "scene": scene,
        "caption": plan.caption,
        "split": split,
        "source": SOURCE,
        "license": LICENSE,
        "voice": plan.speech.voice,
        "rate": plan.speech.rate,
        "pitch": plan.speech.pitch,
        "seed": config.seed,
        "index": plan.index,  # with seed: np.random.default_rng([seed, index]) regenerates it
    }
    return {
        "__key__": sample_key(plan.index),
        "png": encode_png(plan.image),
        "flac": encode_flac(audio, config.sample_rate),
        "txt": plan.caption.encode("utf-8"),
        "json": json.dumps(metadata, sort_keys=True, ensure_ascii=False).encode("utf-8"),
    }


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W, 3) image; Pillow writes no timestamp, so bytes are stable."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def encode_flac(audio: np.ndarray, sample_rate: int) -> bytes:
    """16-bit mono FLAC bytes of float audio in [-1, 1]."""
    # Quantise here rather than in libsndfile, so clipping and rounding are explicit.
    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)  # (T,)
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


class ShardSink:
    """Writes one split's samples, in order, into shards of at most ``samples_per_shard``.

    A shard is written as ``*.tar.partial`` and renamed when complete, so a crashed run never
    leaves a truncated file that looks like a shard.
    """

    def __init__(self, output_dir: Path, split: str, samples_per_shard: int) -> None:
        self.output_dir = output_dir
        self.split = split
        self.samples_per_shard = samples_per_shard
        self.records: list[dict] = []
        self._writer: Any = None  # a webdataset.TarWriter while a shard is open
        self._count = 0

    def write(self, sample: dict) -> None:
        """Append one encoded sample, starting a new shard when the current one is full."""
        if self._writer is None:
            self._open()
        self._writer.write(sample)
        self._count += 1
        if self._count == self.samples_per_shard:
            self._finish()

    def close(self) -> list[dict]:
        """Finish the last shard and return ``[{"path", "samples", "sha256"}, ...]``."""
        if self._writer is not None:
            self._finish()
        return self.records

    def _shard_path(self) -> Path:
        return self.output_dir / self.split / f"shard-{len(self.records):06d}.tar"

    def _open(self) -> None:
        import webdataset  # here: webdataset imports torch, which a plan must not load

        self._writer = webdataset.TarWriter(
            str(self._shard_path().with_suffix(".tar.partial")),  # the writer owns the file
            user=_TAR_OWNER,
            group=_TAR_OWNER,
            mode=0o444,
            encoder=False,  # members arrive encoded (encode_sample)
            mtime=_TAR_MTIME,
        )

    def _finish(self) -> None:
        self._writer.close()
        path = self._shard_path()
        path.with_suffix(".tar.partial").replace(path)
        self.records.append(
            {
                "path": path.relative_to(self.output_dir).as_posix(),
                "samples": self._count,
                "sha256": file_sha256(path),
            }
        )
        self._writer, self._count = None, 0


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pixel_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _prepare_output(output_dir: Path) -> None:
    existing = [output_dir / SHARD_MANIFEST] + [
        path for split in SPLITS for path in (output_dir / split).glob("shard-*.tar*")
    ]
    found = [str(path) for path in existing if path.exists()]
    if found:
        raise FileExistsError(f"{output_dir} already holds synth output ({found[0]}, ...)")
    for split in SPLITS:
        (output_dir / split).mkdir(parents=True, exist_ok=True)


def _manifest(config: SynthConfig, shards: dict[str, list[dict]]) -> dict:
    return {
        "version": MANIFEST_VERSION,
        "source": SOURCE,
        "license": LICENSE,
        "config": asdict(config),
        "counts": {split: sum(r["samples"] for r in records) for split, records in shards.items()},
        "shards": shards,
        "members": ["flac", "json", "png", "txt"],
    }


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(text + "\n", encoding="utf-8")
    os.replace(temporary, path)


class _NoProgress:
    def update(self, count: int) -> None:
        pass


@contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator:
    if not enabled:
        yield _NoProgress()
        return
    try:
        from tqdm import tqdm  # a declared dependency, but only the interactive bar needs it
    except ImportError:
        warnings.warn("tqdm is not installed: generating without a progress bar", stacklevel=3)
        yield _NoProgress()
        return
    with tqdm(total=total, unit="sample", desc="synth") as bar:
        yield bar
