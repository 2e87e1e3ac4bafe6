"""A corpus of malformed webdataset shards, written with real codecs and raw tar files.

``write_corpus(directory)`` writes the shards and returns ``EXPECTED``: for every sample key the
reader will produce, ``None`` if it must come out valid, else a regex its quarantine reason must
match. Keys that occur twice (out-of-order members, a duplicate key) produce two rows each.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image

RATE = 16000


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(buf, format="PNG")
    return buf.getvalue()


def png16() -> bytes:
    """A 16-bit greyscale PNG (mode I;16)."""
    buf = io.BytesIO()
    Image.fromarray(np.full((12, 12), 40000, np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(array: np.ndarray, mode: str = "RGB", orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(array).convert(mode)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A PNG header claiming ``width x height`` pixels and almost no data: 2.5 Gpx in 60 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def audio(wave: np.ndarray, fmt: str, rate: int = RATE, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def tone(seconds: float = 0.2, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    wave = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return wave if channels == 1 else np.repeat(wave[:, None], channels, axis=1)


def good(split: str = "train", **members: bytes | None) -> dict[str, bytes]:
    """A valid sample's members; ``members`` replace (or with None remove) some."""
    sample = {"png": png(np.full((24, 32, 3), 120, np.uint8)), "flac": audio(tone(), "FLAC"),
              "txt": b"a grey square", "json": json.dumps({"split": split}).encode()}
    sample.update(members)
    return {ext: data for ext, data in sample.items() if data is not None}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write(path: Path, members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            _add(tar, name, data)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _members(key: str, sample: dict[str, bytes]) -> list[tuple[str, bytes]]:
    return [(f"{key}.{ext}", data) for ext, data in sample.items()]


def valid_samples() -> dict[str, dict[str, bytes]]:
    """Samples that are odd but must come out valid."""
    grey = np.tile(np.arange(32, dtype=np.uint8)[None, :] * 8, (24, 1))
    rgb = np.dstack([grey, grey[::-1], np.full_like(grey, 60)])
    return {
        "ok-plain": good(split="val"),
        "ok-gray": good(png=png(grey)),
        "ok-rgba": good(png=png(np.dstack([rgb, np.full_like(grey, 128)]))),
        "ok-palette": good(png=png(rgb, mode="P")),
        "ok-png16": good(png=png16()),
        "ok-cmyk": good(png=None, jpg=jpeg(rgb, mode="CMYK")),
        "ok-exif": good(png=None, jpg=jpeg(rgb, orientation=6)),
        "ok-png-named-jpg": good(png=None, jpg=png(rgb)),
        "ok-flac-named-wav": good(flac=None, wav=audio(tone(), "FLAC")),
        "ok-ogg": good(flac=None, ogg=audio(tone(), "OGG", subtype="VORBIS")),
        "ok-mp3": good(flac=None, mp3=audio(tone(0.5), "MP3")),
        "ok-8ch": good(flac=audio(tone(channels=8), "WAV", subtype="PCM_16"), wav=None),
        # One hour of silence at 1 kHz: the decoder must read only the clip's prefix.
        "ok-hour-long": good(flac=audio(np.zeros(3600 * 1000, np.int16), "FLAC", rate=1000)),
        "ok-no-json": good(json=None),
    }


BAD = {  # key -> reason pattern
    "bad-undecodable": "image: cannot decode",
    "bad-zero-image": "image: empty file",
    "bad-bomb": "pixel limit",
    "bad-zero-audio": "audio: zero samples",
    "bad-nan-audio": "audio: non-finite",
    "bad-non-utf8": "text: not UTF-8",
    "bad-empty-text": "text: empty",
    "bad-missing-audio": "audio: missing",
    "bad-json": "json: does not parse",
    "bad-split": "json: split .* is not a plain name",
    "bad-two-images": "several members for one modality",
    "bad-dup-member": "duplicate member 'bad-dup-member.txt'",
    "../x": r"unsafe member name '\.\./x\.jpg'",
    "/abs/y": "unsafe member name '/abs/y.png': absolute path",
    "noext": "has no extension",
    "split-key": "occurs 2 times",  # two rows (the later one also says: not contiguous)
    "dup-key": "occurs 2 times",  # two rows, one per shard
    "cut-mid-member": "shard truncated or corrupt",
    "cut-at-boundary": "no end-of-archive marker",
    "": "not a readable tar",  # shard that is not a tar at all
}


def bad_samples() -> dict[str, dict[str, bytes]]:
    nan = np.array([0.1, np.nan, 0.2] * 100, np.float32)
    return {
        "bad-undecodable": good(png=None, jpg=b"\xff\xd8\xff this is not a jpeg"),
        "bad-zero-image": good(png=b""),
        "bad-bomb": good(png=bomb_png()),
        "bad-zero-audio": good(flac=None, wav=audio(np.zeros(0, np.float32), "WAV")),
        "bad-nan-audio": good(flac=None, wav=audio(nan, "WAV", subtype="FLOAT")),
        "bad-non-utf8": good(txt=b"caf\xe9 \xff\xfe"),
        "bad-empty-text": good(txt=b"  \n "),
        "bad-missing-audio": good(flac=None),
        "bad-json": good(json=b"{not json"),
        "bad-split": good(json=json.dumps({"split": "../../etc"}).encode()),
        "bad-two-images": good(jpg=jpeg(np.zeros((8, 8, 3), np.uint8))),
    }


def write_corpus(directory: Path) -> dict[str, list[str | None]]:
    """Write the corpus shards into ``directory``; returns key -> expected outcome per row."""
    directory.mkdir(parents=True, exist_ok=True)
    expected: dict[str, list[str | None]] = {}
    members: list[tuple[str, bytes]] = []
    for key, sample in {**valid_samples(), **bad_samples()}.items():
        members += _members(key, sample)
        expected[key] = [None if key.startswith("ok-") else BAD[key]]
    sample = good()
    members += [("bad-dup-member.png", sample["png"]), ("bad-dup-member.txt", b"one"),
                ("bad-dup-member.txt", b"two"), ("bad-dup-member.flac", sample["flac"])]
    members += [("../x.jpg", jpeg(np.zeros((8, 8, 3), np.uint8))), ("../x.txt", b"escape")]
    members += [("/abs/y.png", sample["png"]), ("noext", b"README")]
    # Out of order: split-key's image and audio, another sample, then its text and json.
    split_key = good()
    members += [("split-key.png", split_key["png"]), ("split-key.flac", split_key["flac"])]
    members += _members("ok-between", good())
    members += [("split-key.txt", split_key["txt"]), ("split-key.json", split_key["json"])]
    members += _members("dup-key", good())
    for key in ("bad-dup-member", "../x", "/abs/y", "noext", "dup-key"):
        expected[key] = [BAD[key]]
    expected["split-key"] = [BAD["split-key"]] * 2
    expected["ok-between"] = [None]
    _write(directory / "corpus-000000.tar", members)

    # Shard 1: the duplicate key again, a good sample, then cut in the middle of a member.
    data = _write(directory / "corpus-000001.tar",
                  _members("dup-key", good()) + _members("ok-shard1", good())
                  + _members("cut-mid-member", good()))
    cut = data.index(b"cut-mid-member.png") + 512 + 100  # inside the png's data
    (directory / "corpus-000001.tar").write_bytes(data[:cut])
    expected["dup-key"].append(BAD["dup-key"])
    expected["ok-shard1"] = [None]
    expected["cut-mid-member"] = [BAD["cut-mid-member"]]

    # Shard 2: ends exactly after a member, without the end-of-archive blocks.
    data = _write(directory / "corpus-000002.tar",
                  _members("ok-shard2", good()) + _members("cut-at-boundary", good()))
    end = len(data.rstrip(b"\x00"))
    (directory / "corpus-000002.tar").write_bytes(data[:-(-end // 512) * 512])
    expected["ok-shard2"] = [None]
    expected["cut-at-boundary"] = [BAD["cut-at-boundary"]]

    # Shard 3: not a tar at all.
    (directory / "corpus-000003.tar").write_bytes(b"this is not a tar file " * 40)
    expected[""] = [BAD[""]]
    return expected
