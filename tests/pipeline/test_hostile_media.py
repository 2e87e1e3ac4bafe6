"""Hostile media through preprocess: bounded memory for any sample rate, channel count, caption
size or shard compression, and every refusal a quarantine entry rather than a stage failure.

The rate attacks run in a child process under an address-space limit (``RLIMIT_AS``): a
resampler whose kernel grows with the rates' least common multiple (44101 Hz -> 16 kHz wants
2.8 GB) fails fast there instead of eating the test machine.
"""

import bz2
import gzip
import io
import json
import lzma
import os
import re
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
import torch
import torchaudio
import webdataset as wds
from PIL import Image

from pipeline.formats.samples import BadSample, preprocess_sample
from pipeline.preprocess import PreprocessConfig, Preprocessor, run
from pipeline.stage import StageContext

TARGET = 16000  # the model rate of these tests: 22.05/44.1/48 kHz sources resample to it
TONE = 440.0  # Hz


def _wav(wave: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _tone(rate: int, frames: int, channels: int = 1) -> np.ndarray:
    """A 440 Hz sine at amplitude 0.5 (or a quarter of the rate, for rates too low for 440)."""
    wave = 0.5 * np.sin(2 * np.pi * min(TONE, rate / 4) * np.arange(frames) / rate)
    return wave.astype(np.float32) if channels == 1 else np.repeat(
        wave[:, None], channels, axis=1).astype(np.float32)  # (frames, channels)


def _batch(key: str, **members: bytes) -> dict[str, np.ndarray]:
    """One raw row as Ray Data hands it to the Preprocessor actor."""
    row = {"__key__": key, "__url__": "hostile-000000.tar", **members}
    return {name: np.array([value], dtype=object) for name, value in row.items()}


def _peak_frequency(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


# ----------------------------------------------------------------------------- sample rates

# Runs in a child: warm the actor up on an ordinary clip (imports, threads and first-use costs
# happen there), then cap the address space at what it holds plus HEADROOM and preprocess one
# hostile WAV. Prints the row's status and length and how much the peak RSS grew.
_CHILD = r"""
import json, os, resource, sys
import numpy as np
sys.path.insert(0, sys.argv[4])
from test_hostile_media import TARGET, _batch, _tone, _wav
from pipeline.preprocess import PreprocessConfig, Preprocessor

rate, channels, frames, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[5]
HEADROOM = 256 << 20
config = PreprocessConfig(sample_rate=TARGET, audio_samples=TARGET, required=("audio",))
actor = Preprocessor(config)
actor(_batch("warm-up", wav=_wav(_tone(22050, 22050), 22050)))
with open("/proc/self/status") as status:
    vm = next(int(line.split()[1]) << 10 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + HEADROOM, vm + HEADROOM))
data = _wav(_tone(rate, frames, channels), rate)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
row = actor(_batch("hostile", wav=data))
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
np.save(out, row["audio"][0][: int(row["audio_len"][0])])
print(json.dumps({"status": str(row["status"][0]), "audio_len": int(row["audio_len"][0]),
                  "rss_growth_kib": grown, "wav_bytes": len(data)}))
"""


def _preprocess_in_child(rate: int, channels: int, frames: int, tmp_path: Path) -> dict:
    out = tmp_path / "audio.npy"
    # One thread and two malloc arenas: idle per-thread reservations would count against the
    # address-space limit and make the measure depend on the machine's core count.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(rate), str(channels), str(frames),
         str(Path(__file__).parent), str(out)],
        check=False, capture_output=True, text=True, timeout=300, env=env,
        cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, f"the stage would have died:\n{proc.stderr[-3000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["audio"] = np.load(out)
    return result


@pytest.mark.parametrize("rate", [11027, 44101])
def test_unusual_rates_resample_in_bounded_memory(rate, tmp_path):
    result = _preprocess_in_child(rate, 1, rate // 2, tmp_path)  # half a second
    assert result["status"] == "ok"
    assert abs(result["audio_len"] - TARGET // 2) <= 1
    assert result["rss_growth_kib"] < 64 << 10  # not the rates' common multiple
    assert abs(_peak_frequency(result["audio"], TARGET) - TONE) <= 2.0
    assert np.sqrt(np.mean(result["audio"][200:-200] ** 2)) == pytest.approx(0.5 / np.sqrt(2),
                                                                             rel=0.02)


def test_the_172_byte_wav_of_the_issue_costs_nothing(tmp_path):
    result = _preprocess_in_child(44101, 1, 64, tmp_path)
    assert result["wav_bytes"] == 172
    assert result["status"] == "ok" and result["audio_len"] == round(64 * TARGET / 44101)
    assert result["rss_growth_kib"] < 64 << 10


@pytest.mark.parametrize(("rate", "channels", "frames", "reason"), [
    (1, 1, 4, r"^audio: sample rate 1 Hz is outside the 1000\.\.384000 Hz range"),
    (400_000, 1, 4000, r"^audio: sample rate 400000 Hz is outside the 1000\.\.384000 Hz range"),
    (48000, 96, 24000, r"^audio: 96 channels, over the 32-channel limit"),
])
def test_rates_and_channel_counts_outside_the_range_are_quarantined(rate, channels, frames,
                                                                   reason, tmp_path):
    result = _preprocess_in_child(rate, channels, frames, tmp_path)
    assert re.search(reason, result["status"]), result
    assert result["audio_len"] == 0 and result["rss_growth_kib"] < 64 << 10


def test_channels_up_to_the_cap_are_downmixed_block_by_block():
    config = PreprocessConfig(sample_rate=TARGET, audio_samples=TARGET, required=("audio",),
                              max_audio_channels=4)
    levels = np.array([0.4, 0.2, -0.2, 0.0], np.float32)
    wave = np.tile(levels, (TARGET + 17, 1))  # (frames, 4): more than one read block
    row = preprocess_sample({"wav": _wav(wave, TARGET)}, config, Preprocessor(config).resample)
    assert row["audio_len"] == TARGET and np.allclose(row["audio"], levels.mean(), atol=1e-4)
    with pytest.raises(BadSample, match="audio: 5 channels, over the 4-channel limit"):
        preprocess_sample({"wav": _wav(np.zeros((10, 5), np.float32), TARGET)}, config,
                          Preprocessor(config).resample)


def _stereo(rate: int, fmt: str, subtype: str) -> tuple[bytes, np.ndarray]:
    """A 0.75 s stereo 440 Hz tone (left 0.5, right 0.3): the file and its decoded mono mix."""
    left = _tone(rate, int(0.75 * rate))
    buf = io.BytesIO()
    soundfile.write(buf, np.stack([left, left * 0.6], axis=1), rate, format=fmt, subtype=subtype)
    decoded, _ = soundfile.read(io.BytesIO(buf.getvalue()), dtype="float32", always_2d=True)
    return buf.getvalue(), decoded.mean(axis=1)


@pytest.mark.parametrize("rate", [22050, 44100, 48000])
@pytest.mark.parametrize(("ext", "fmt", "subtype", "rms_tol"),
                         [("flac", "FLAC", "PCM_16", 0.01), ("ogg", "OGG", "VORBIS", 0.05)])
def test_ordinary_rates_resample_as_the_old_path_did(rate, ext, fmt, subtype, rms_tol):
    data, mono = _stereo(rate, fmt, subtype)
    config = PreprocessConfig(sample_rate=TARGET, audio_samples=TARGET, required=("audio",))
    row = preprocess_sample({ext: data}, config, Preprocessor(config).resample)
    clip = row["audio"][: row["audio_len"]]
    assert abs(row["audio_len"] - 0.75 * TARGET) <= 1
    assert abs(_peak_frequency(clip, TARGET) - TONE) <= 2.0
    assert np.sqrt(np.mean(clip[200:-200] ** 2)) == pytest.approx(0.4 / np.sqrt(2), rel=rms_tol)
    # The old path (torchaudio's sinc resampler, cheap at these rates) on the same decoded mix.
    old = torchaudio.functional.resample(torch.from_numpy(mono), rate, TARGET).numpy()
    n = min(len(old), len(clip))
    assert np.abs(clip[200:n - 200] - old[200:n - 200]).max() < 2e-3  # measured: ~1e-4


# ----------------------------------------------------------------------------- quarantine

def _origin_json(**files: str) -> bytes:
    return json.dumps({"mmvq_origin": {"source": "src", "files": files}}).encode()


def test_a_resampling_failure_is_a_quarantine_entry_naming_member_and_cause():
    config = PreprocessConfig(sample_rate=TARGET, audio_samples=TARGET, required=("audio",))
    actor = Preprocessor(config)

    def failing(wave: np.ndarray, rate: int) -> np.ndarray:
        raise RuntimeError("cannot allocate 2882650112 bytes")

    actor.resample = failing
    out = actor(_batch("k", wav=_wav(_tone(22050, 2205), 22050), json=_origin_json(wav="a.wav")))
    assert out["status"][0] == ("audio: cannot resample from 22050 Hz to 16000 Hz "
                                "(RuntimeError: cannot allocate 2882650112 bytes)")
    assert out["origin"][0] == "a.wav" and not out["has_audio"][0]


def test_a_programming_error_is_not_quarantined_and_names_shard_and_key():
    actor = Preprocessor(PreprocessConfig(required=("audio",)))

    def broken(wave: np.ndarray, rate: int) -> np.ndarray:
        raise TypeError("resample() got an unexpected keyword argument")

    actor.resample = broken
    with pytest.raises(TypeError) as err:
        actor(_batch("k7", wav=_wav(_tone(22050, 2205), 22050)))
    assert "shard hostile-000000.tar, key k7" in " ".join(getattr(err.value, "__notes__", []))


def test_a_caption_over_the_cap_is_quarantined_without_being_decoded():
    caption = b"word " * ((4 << 20) // 5)  # 4 MiB of words; decoding them cost ~12x that
    actor = Preprocessor(PreprocessConfig(image_size=8, audio_samples=100, required=("text",)))
    batch = _batch("long", txt=caption, json=_origin_json(txt="long.txt"))
    tracemalloc.start()
    try:
        out = actor(batch)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out["status"][0] == (f"text: {len(caption)} bytes, over the 65536-byte limit "
                                "(preprocess.max_text_bytes)")
    assert out["origin"][0] == "long.txt"
    assert peak < 1 << 20, peak  # nothing the size of the caption was made


def test_the_text_cap_is_configuration_and_inclusive():
    config = PreprocessConfig(image_size=8, audio_samples=100, required=("text",),
                              max_text_bytes=1024)
    row = preprocess_sample({"txt": b"a" * 1024}, config, Preprocessor(config).resample)
    assert row["has_text"] and row["text_len"] == config.text_max_len
    with pytest.raises(BadSample, match="text: 1025 bytes, over the 1024-byte limit"):
        preprocess_sample({"txt": b"a" * 1025}, config, Preprocessor(config).resample)


@pytest.mark.parametrize(("field", "value"), [
    ("max_text_bytes", 0), ("max_audio_channels", 0), ("min_audio_rate", 0),
    ("max_audio_rate", 999), ("sample_rate", 500)])
def test_caps_are_validated(field, value):
    from mmvq.config_io import ConfigError

    with pytest.raises(ConfigError, match=f"preprocess.{field}"):
        PreprocessConfig(**{field: value})


# ----------------------------------------------------------------------------- compressed shards

def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _Counting(io.RawIOBase):
    """A read-once stream that counts the bytes taken from it."""

    def __init__(self, data: bytes) -> None:
        self.inner, self.taken = io.BytesIO(data), 0

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.taken += len(data)
        return data


_COMPRESSORS = {"gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}


@pytest.mark.parametrize("kind", sorted(_COMPRESSORS))
def test_the_reader_refuses_compressed_tars_unless_configured(kind):
    from pipeline.shard_source import read_samples

    # 8 MiB of members from a shard of a few KiB: what a compressed tar can do to a reader.
    plain = _tar([(f"k{i}.txt", b"\x00" * (1 << 20)) for i in range(8)])
    shard = _COMPRESSORS[kind](plain)
    assert len(shard) < 64 << 10
    stream = _Counting(shard)
    refused = list(read_samples(stream, "s3://bucket/shard-000003.tar"))
    assert len(refused) == 1 and refused[0].key == "" and not refused[0].members
    assert refused[0].shard == "s3://bucket/shard-000003.tar"
    assert refused[0].error.startswith(f"shard is {kind}-compressed, refused")
    assert "preprocess.allow_compressed_shards" in refused[0].error
    assert stream.taken <= 512  # sniffed, never decompressed
    allowed = list(read_samples(_Counting(shard), "shard", allow_compressed=True))
    assert [s.key for s in allowed] == [f"k{i}" for i in range(8)]
    assert all(s.error is None and len(s.members["txt"]) == 1 << 20 for s in allowed)


def test_plain_tars_read_as_before():
    from pipeline.shard_source import read_samples

    shard = _tar([("a.txt", b"one"), ("a.json", b"{}"), ("b.txt", b"two")])
    samples = list(read_samples(_Counting(shard), "shard"))
    assert [(s.key, s.members, s.error) for s in samples] == [
        ("a", {"txt": b"one", "json": b"{}"}, None), ("b", {"txt": b"two"}, None)]


def _write_shard(path: Path, keys: list[str]) -> None:
    png, flac = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(png, format="PNG")
    soundfile.write(flac, np.zeros(1600, np.float32) + 0.1, 16000, format="FLAC")
    with wds.TarWriter(str(path)) as sink:
        for key in keys:
            sink.write({"__key__": key, "png": png.getvalue(), "flac": flac.getvalue(),
                        "txt": f"caption {key}"})


def test_the_stage_accounts_a_refused_compressed_shard(tmp_path, ray_local):
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "shard-000000.tar", ["a", "b"])
    _write_shard(shards / "shard-000001.tar", ["c", "d", "e"])
    gz = shards / "shard-000001.tar"
    gz.write_bytes(gzip.compress(gz.read_bytes()))  # a gzip tar under a plain .tar name
    out = tmp_path / "out"
    out.mkdir()
    config = PreprocessConfig(image_size=16, sample_rate=8000, audio_samples=800,
                              text_max_len=16, batch_size=4, num_actors=1)
    summary = run(config, StageContext(output_dir=out, inputs={"shards": shards}))
    assert summary["counts"] == {"in": 3, "quarantined": 1, "out/train": 2, "out": 2}
    [row] = pq.read_table(out / "quarantine.parquet").to_pylist()
    assert row["key"] == "" and row["shard"].endswith("shard-000001.tar")
    assert row["stage"] == "preprocess" and row["reason"].startswith("shard is gzip-compressed")
