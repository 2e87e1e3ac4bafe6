"""A small real-world aligned corpus, in the four layouts users bring, with their edge cases.

Photographs are scikit-image's bundled samples (RGB, grayscale, RGBA, large), sounds are
synthesised here and encoded as stereo OGG/FLAC/WAV at 22.05, 44.1 and 48 kHz by libsndfile,
captions are unicode (CJK, emoji, accents). Every builder returns what it wrote as
:class:`Expected` samples: the original file that names the sample, and whether it must come out
as tokens or be quarantined, so a test can account for every one.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage.data
import soundfile
from PIL import Image

CAPTIONS = ["an astronaut in a white suit 👩‍🚀", "一杯咖啡 on a saucer ☕", "chelsea the cat — café",
            "a grayscale cameraman 📷", "a rocket on its launch pad 🚀", "logo with alpha: Ünïcødé",
            "coins on a table, 硬币", "stained tissue 🔬"]
PHOTOS = ["astronaut", "coffee", "chelsea", "camera", "rocket", "logo", "coins",
          "immunohistochemistry"]
SOUNDS = [("ogg", "VORBIS", 22050), ("flac", "PCM_16", 44100), ("wav", "PCM_16", 48000)]


@dataclass(frozen=True)
class Expected:
    origin: str  # the user's file (or manifest row) that names this sample
    key: str | None  # the key it must have in the token dataset (None: must be quarantined)


def photo(name: str, size: int = 160) -> Image.Image:
    """A scikit-image sample photo, downscaled so the corpus stays small (mode kept)."""
    array = getattr(skimage.data, name)()
    image = Image.fromarray(array)
    image.thumbnail((size, size))
    return image


def encoded_photo(name: str, fmt: str) -> bytes:
    image = photo(name)
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def sound(index: int) -> tuple[bytes, str]:
    """A stereo chirp + noise clip (1.2 s) encoded in one of the three formats/rates."""
    ext, subtype, rate = SOUNDS[index % len(SOUNDS)]
    t = np.arange(int(1.2 * rate)) / rate
    left = 0.3 * np.sin(2 * np.pi * (220 + 180 * index) * t * (1 + 0.5 * t))
    right = 0.2 * np.sin(2 * np.pi * (330 + 90 * index) * t)
    rng = np.random.default_rng(index)
    wave = np.stack([left, right], axis=1) + 0.01 * rng.standard_normal((len(t), 2))
    buffer = io.BytesIO()
    soundfile.write(buffer, wave.astype(np.float32), rate, format=ext.upper(), subtype=subtype)
    return buffer.getvalue(), ext


def folder_corpus(root: Path) -> list[Expected]:
    """Loose files sharing a stem, with the folder edge cases users hit."""
    root.mkdir(parents=True)
    expected = []
    for i, name in enumerate(PHOTOS[:6]):
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][i % 3]
        stem = root / ("nested" if i % 2 else ".") / f"{name}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{stem}.{ext}").write_bytes(encoded_photo(name, fmt))
        data, sound_ext = sound(i)
        Path(f"{stem}.{sound_ext}").write_bytes(data)
        Path(f"{stem}.txt").write_text(CAPTIONS[i], encoding="utf-8")
        if i % 3 == 0:
            Path(f"{stem}.json").write_text(json.dumps({"split": "val", "license": "bsd"}))
        key = ("nested/" if i % 2 else "") + name
        expected.append(Expected(f"{stem}.{ext}", key))
    # A dotted stem keeps its whole stem (dots become '_' in the key).
    (root / "IMG_0001.final.jpg").write_bytes(encoded_photo("coins", "JPEG"))
    (root / "IMG_0001.final.txt").write_text("dotted stem, 点", encoding="utf-8")
    expected.append(Expected(str(root / "IMG_0001.final.jpg"), "IMG_0001_final"))
    # Two images for one stem that differ only in case: which is the sample's? Quarantined.
    (root / "twin.jpg").write_bytes(encoded_photo("rocket", "JPEG"))
    (root / "twin.JPG").write_bytes(encoded_photo("coffee", "JPEG"))
    (root / "twin.txt").write_text("which one?", encoding="utf-8")
    expected.append(Expected(str(root / "twin"), None))
    # An image that does not decode: preprocess quarantines it, naming this file.
    (root / "broken.png").write_bytes(encoded_photo("camera", "PNG")[:200])
    (root / "broken.txt").write_text("a truncated png", encoding="utf-8")
    expected.append(Expected(str(root / "broken.png"), None))
    # No caption, and preprocess requires one.
    (root / "silent.jpg").write_bytes(encoded_photo("chelsea", "JPEG"))
    expected.append(Expected(str(root / "silent"), None))
    return expected


def csv_corpus(root: Path) -> list[Expected]:
    """A CSV manifest with relative media paths, inline or file captions, and bad rows."""
    media = root / "media"
    media.mkdir(parents=True)
    rows, expected = [], []
    for i, name in enumerate(PHOTOS):
        (media / f"{name}.png").write_bytes(encoded_photo(name, "PNG"))
        data, ext = sound(i)
        (media / f"{name}.{ext}").write_bytes(data)
        rows.append({"key": f"row-{i}", "image": f"media/{name}.png", "audio": f"media/{name}.{ext}",
                     "text": CAPTIONS[i], "split": "val" if i % 4 == 0 else "train",
                     "license": "bsd"})
        expected.append(Expected(f"row {i + 1}", f"row-{i}"))
    # A row naming a file that is not there: quarantined, naming that file.
    rows.append({"key": "row-missing", "image": "media/nope.png", "text": "no such file"})
    expected.append(Expected(str(media / "nope.png"), None))
    # A key used twice: the later row is quarantined, naming the row.
    rows.append({"key": "row-0", "image": "media/coffee.png", "text": "duplicate key"})
    expected.append(Expected(f"index.csv row {len(rows)}", None))
    with open(root / "index.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["key", "image", "audio", "text", "split",
                                                    "license"])
        writer.writeheader()
        writer.writerows(rows)
    return expected


def shardwriter_corpus(root: Path) -> list[Expected]:
    """Shards written by ``webdataset.ShardWriter`` (no manifest of ours)."""
    import webdataset

    root.mkdir(parents=True)
    expected = []
    with webdataset.ShardWriter(str(root / "part-%04d.tar"), maxcount=3, verbose=0) as sink:
        for i, name in enumerate(PHOTOS):
            data, ext = sound(i)
            sample = {"__key__": f"sw{i:03d}", "jpg": encoded_photo(name, "JPEG"), ext: data,
                      "txt": CAPTIONS[i],
                      "json": {"split": "val" if i % 4 == 1 else "train", "source": name}}
            sink.write(sample)
            expected.append(Expected(f"sw{i:03d}", f"sw{i:03d}"))
        sink.write({"__key__": "sw-bad", "jpg": b"not a jpeg at all", "txt": "garbage image"})
        expected.append(Expected("sw-bad", None))
    return expected


def img2dataset_corpus(root: Path) -> list[Expected]:
    """img2dataset's output: ``00000.tar`` with numeric keys, jpg + txt + json, and the
    parquet/stats files beside it (which readers must ignore)."""
    root.mkdir(parents=True)
    expected = []
    with tarfile.open(root / "00000.tar", "w") as tar:
        for i, name in enumerate(PHOTOS):
            key = f"{i:09d}"
            meta = {"url": f"https://example.org/{name}.jpg", "caption": CAPTIONS[i],
                    "key": key, "status": "success", "width": 160, "height": 120}
            if i % 4 == 2:
                meta["split"] = "val"
            for ext, data in (("jpg", encoded_photo(name, "JPEG")),
                              ("txt", CAPTIONS[i].encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            expected.append(Expected(key, key))
    (root / "00000.parquet").write_bytes(b"PAR1 not read by us")
    (root / "00000_stats.json").write_text(json.dumps({"count": len(PHOTOS)}))
    return expected
