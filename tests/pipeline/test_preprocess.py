"""Preprocessing pure functions on real encoded files, good and bad."""

import io
import json

import numpy as np
import pytest
import soundfile
from PIL import Image

from mmvq.text_vocab import PAD_ID
from pipeline.formats.samples import (
    BadSample,
    Resamplers,
    decode_audio,
    decode_image,
    fit_length,
    preprocess_sample,
)
from pipeline.preprocess import PreprocessConfig, Preprocessor


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _flac(wave: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format="FLAC")
    return buf.getvalue()


def _sample(**members):
    base = {"__key__": "k1", "png": _png(np.full((40, 60, 3), 200, np.uint8)),
            "flac": _flac(np.sin(np.linspace(0, 200, 16000)).astype(np.float32) * 0.5, 16000),
            "txt": b"a red circle", "json": json.dumps({"split": "val"}).encode()}
    base.update(members)
    return {k: v for k, v in base.items() if v is not None}


def test_image_resized_center_cropped_rgb():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 20:60] = 255  # a white centre band exactly the centre crop's width
    out = decode_image(_png(image), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[:, 4:28].mean() > 240  # the crop kept the centre


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_image_modes_become_rgb(mode):
    img = Image.new(mode, (16, 16))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert decode_image(buf.getvalue(), 8).shape == (8, 8, 3)


def test_bad_images_are_reported():
    with pytest.raises(BadSample, match="image: empty file"):
        decode_image(b"", 8)
    with pytest.raises(BadSample, match="image: cannot decode"):
        decode_image(b"not an image at all", 8)


def test_audio_downmix_resample_and_fit():
    stereo = np.stack([np.ones(8000), -np.ones(8000) * 0.5], axis=1).astype(np.float32) * 0.5
    wave, rate = decode_audio(_flac(stereo, 16000))
    assert rate == 16000 and wave.ndim == 1
    assert np.allclose(wave, 0.125, atol=1e-3)  # mean of 0.5 and -0.25
    resampled = Resamplers(8000)(wave, rate)
    assert len(resampled) == 4000
    clip, length = fit_length(resampled, 5000)
    assert clip.shape == (5000,) and length == 4000 and not clip[4000:].any()
    clip, length = fit_length(resampled, 3000)
    assert clip.shape == (3000,) and length == 3000


def test_bad_audio_is_reported():
    empty_wav = io.BytesIO()
    soundfile.write(empty_wav, np.zeros(0, np.float32), 16000, format="WAV")
    with pytest.raises(BadSample, match="audio: zero samples"):
        decode_audio(empty_wav.getvalue())
    with pytest.raises(BadSample, match="audio: cannot decode"):
        decode_audio(b"RIFF....garbage")
    buf = io.BytesIO()
    soundfile.write(buf, np.array([0.1, np.nan, 0.2], np.float32), 16000, format="WAV",
                    subtype="FLOAT")
    with pytest.raises(BadSample, match="non-finite"):
        decode_audio(buf.getvalue())


def test_full_sample_columns():
    cfg = PreprocessConfig(image_size=16, sample_rate=8000, audio_samples=6000, text_max_len=20)
    row = preprocess_sample(_sample(), cfg, Resamplers(8000))
    assert row["image"].shape == (16, 16, 3)
    assert row["audio"].shape == (6000,) and row["audio_len"] == 6000
    assert row["text_len"] == len("a red circle")
    assert row["text_ids"][row["text_len"]] == PAD_ID
    assert row["split"] == "val" and row["has_image"] and row["has_audio"] and row["has_text"]


def test_missing_required_and_optional_modalities():
    cfg = PreprocessConfig(image_size=8, audio_samples=100, required=("image", "text"))
    with pytest.raises(BadSample, match="image: missing"):
        preprocess_sample(_sample(png=None), cfg, Resamplers(cfg.sample_rate))
    row = preprocess_sample(_sample(flac=None), cfg, Resamplers(cfg.sample_rate))
    assert not row["has_audio"] and row["audio_len"] == 0


def test_preprocessor_accounts_for_every_row_and_strict_mode_names_the_sample():
    cfg = PreprocessConfig(image_size=8, audio_samples=100)
    good, bad = _sample(), _sample(__key__="k2", txt=b"\xff\xfe", json=b"{not json")
    batch = {name: np.array([good.get(name), bad.get(name)], dtype=object)
             for name in set(good) | set(bad)}
    batch["__url__"] = np.array(["shard-0.tar", "shard-0.tar"], dtype=object)
    out = Preprocessor(cfg)(batch)
    assert list(out["key"]) == ["k1", "k2"]
    assert out["status"][0] == "ok" and out["status"][1].startswith("json: does not parse")
    with pytest.raises(BadSample, match="shard shard-0.tar, key k2: json"):
        Preprocessor(PreprocessConfig(image_size=8, audio_samples=100, strict=True))(batch)


def _tar(path, samples):
    import tarfile
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext.startswith("__"):
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_shard_actor_reads_whole_shards_a_batch_at_a_time(tmp_path):
    """The stage's actor reads each shard itself and hands out at most batch_size rows at a
    time, in shard order, every sample accounted for; a shard it cannot open is one refused
    row naming it, not a crash."""
    import pyarrow.fs

    from pipeline.preprocess import ShardPreprocessor

    shard = tmp_path / "s-000.tar"
    _tar(shard, [_sample(__key__=f"k{i:02d}", txt=f"caption {i} 色 🎨".encode())
                 for i in range(7)])
    config = PreprocessConfig(image_size=8, audio_samples=400, batch_size=3)
    actor = ShardPreprocessor(config, filesystem=pyarrow.fs.LocalFileSystem())
    missing = str(tmp_path / "gone.tar")
    batches = list(actor({"path": np.array([str(shard), missing], object)}))
    assert [len(b["key"]) for b in batches] == [3, 3, 1, 1]  # per shard: 7 = 3 + 3 + 1
    assert [k for b in batches[:3] for k in b["key"]] == [f"k{i:02d}" for i in range(7)]
    assert all(s == "ok" for b in batches[:3] for s in b["status"])
    assert batches[0]["image"].shape == (3, 8, 8, 3)
    last = batches[3]
    assert last["source_shard"][0] == missing
    assert last["status"][0].startswith("shard is not a readable tar")
