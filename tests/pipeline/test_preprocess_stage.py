"""The preprocess stage on real shards through Ray Data: every sample out or quarantined."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray.data
import soundfile
import webdataset as wds
from PIL import Image

from pipeline.formats.samples import BadSample
from pipeline.preprocess import PreprocessConfig, run
from pipeline.stage import StageContext

CONFIG = PreprocessConfig(image_size=16, sample_rate=8000, audio_samples=4000, text_max_len=16,
                          batch_size=4, num_actors=1)


def _good(key: str, split: str) -> dict:
    png, flac = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(png, format="PNG")
    soundfile.write(flac, np.zeros(1600, np.float32) + 0.1, 16000, format="FLAC")
    return {"__key__": key, "png": png.getvalue(), "flac": flac.getvalue(),
            "txt": f"caption {key}", "json": json.dumps({"split": split})}


def _write_shards(directory):
    directory.mkdir()
    samples = [_good(f"s{i}", "val" if i == 0 else "train") for i in range(5)]
    samples[2]["png"] = b"\x89PNG truncated"  # undecodable image
    del samples[3]["txt"]  # missing required text
    with wds.TarWriter(str(directory / "shard-000000.tar")) as sink:
        for sample in samples:
            sink.write(sample)
    return directory


def test_stage_accounts_for_every_sample(tmp_path, ray_local):
    shards = _write_shards(tmp_path / "shards")
    out = tmp_path / "out"
    out.mkdir()
    summary = run(CONFIG, StageContext(output_dir=out, inputs={"shards": shards}))
    assert summary["counts"] == {"in": 5, "quarantined": 2, "out/train": 2, "out/val": 1,
                                 "out": 3}
    quarantine = pq.read_table(out / "quarantine.parquet").to_pylist()
    reasons = {row["key"]: row["reason"] for row in quarantine}
    assert reasons["s2"].startswith("image: cannot decode")
    assert reasons["s3"].startswith("text: missing")
    assert all(row["shard"].endswith("shard-000000.tar") and row["stage"] == "preprocess"
               for row in quarantine)
    train = ray.data.read_parquet(str(out / "train")).take_all()
    assert sorted(r["key"] for r in train) == ["s1", "s4"]
    assert train[0]["image"].shape == (16, 16, 3) and train[0]["audio"].shape == (4000,)
    assert train[0]["audio_len"] == 800  # 0.1 s at 16 kHz resampled to 8 kHz


def test_strict_mode_stops_naming_shard_key_and_reason(tmp_path, ray_local):
    shards = _write_shards(tmp_path / "shards")
    out = tmp_path / "out"
    out.mkdir()
    strict = PreprocessConfig(**{**CONFIG.__dict__, "strict": True})
    with pytest.raises(Exception, match=r"shard .*shard-000000.tar, key s2: image: cannot") as err:
        run(strict, StageContext(output_dir=out, inputs={"shards": shards}))
    assert isinstance(err.value, BadSample) or "BadSample" in str(err.value)
