"""The malformed corpus through the reader, the pure functions and the preprocess stage:
every sample comes out valid or is quarantined with shard, key, stage and reason."""

import re
import time
from collections import defaultdict
from pathlib import Path

import badcorpus
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray.data
from mlflow import MlflowClient

from pipeline.formats.samples import BadSample, Resamplers, preprocess_sample
from pipeline.formats.shards import read_shard
from pipeline.preprocess import PreprocessConfig, repeated_keys, repeated_reason, run
from pipeline.stage import StageContext
from pipeline.tracking import RunLogger

CONFIG = PreprocessConfig(image_size=16, sample_rate=8000, audio_samples=1600, text_max_len=16,
                          batch_size=8, num_actors=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus") / "shards"
    return directory, badcorpus.write_corpus(directory)


def _outcomes(directory: Path, config: PreprocessConfig) -> dict[str, list[tuple[str, str]]]:
    """key -> [(shard, "ok" or reason)] by the pure path: reader, then preprocess_sample."""
    resample = Resamplers(config.sample_rate)
    outcomes = defaultdict(list)
    for shard in sorted(directory.glob("*.tar")):
        with open(shard, "rb") as stream:
            for raw in read_shard(stream, shard.name):
                sample = {**raw.members, "__key__": raw.key, "__error__": raw.error}
                try:
                    preprocess_sample(sample, config, resample)
                    outcomes[raw.key].append((shard.name, "ok"))
                except BadSample as err:
                    outcomes[raw.key].append((shard.name, str(err)))
    return outcomes


def _check(outcomes: dict[str, list[str]], expected: dict[str, list[str | None]]) -> None:
    assert sorted(outcomes) == sorted(expected)
    for key, wanted in expected.items():
        got = outcomes[key]
        assert len(got) == len(wanted), (key, got)
        for reason, pattern in zip(got, wanted, strict=True):
            if pattern is None:
                assert reason == "ok", (key, reason)
            else:
                assert re.search(pattern, reason), (key, reason, pattern)


def test_pure_path_accounts_for_every_corpus_sample(corpus):
    directory, expected = corpus
    outcomes = _outcomes(directory, CONFIG)
    repeated = repeated_keys(__import__("pandas").Series(
        [k for k, rows in outcomes.items() for _ in rows]))
    assert repeated == {"split-key": 2, "dup-key": 2}
    flat = {k: [repeated_reason(k, repeated[k], r) if k in repeated else r for _, r in rows]
            for k, rows in outcomes.items()}
    _check(flat, expected)


def test_hour_long_audio_decodes_only_the_clip(corpus):
    sample = badcorpus.valid_samples()["ok-hour-long"]
    start = time.perf_counter()
    row = preprocess_sample(sample, CONFIG, Resamplers(CONFIG.sample_rate))
    assert time.perf_counter() - start < 2.0  # decoding the hour would take far longer
    assert row["audio_len"] == CONFIG.audio_samples


def test_odd_but_valid_inputs_become_rgb_and_mono():
    config = PreprocessConfig(image_size=8, audio_samples=800, sample_rate=8000)
    samples = badcorpus.valid_samples()
    resample = Resamplers(config.sample_rate)
    png16 = preprocess_sample(samples["ok-png16"], config, resample)["image"]
    assert png16.shape == (8, 8, 3) and abs(int(png16.mean()) - 156) <= 1  # 40000 / 257
    rgba = preprocess_sample(samples["ok-rgba"], config, resample)["image"]
    assert rgba.min() > 60  # alpha 128 over white lifts the dark pixels
    ch8 = preprocess_sample(samples["ok-8ch"], config, resample)
    assert ch8["audio"].ndim == 1 and np.abs(ch8["audio"]).max() > 0.2  # downmixed, not lost


def test_required_modalities_are_configuration(corpus):
    directory, _ = corpus
    lenient = PreprocessConfig(**{**CONFIG.__dict__, "required": ("image",)})
    assert _outcomes(directory, CONFIG)["bad-missing-audio"][0][1].startswith("audio: missing")
    assert _outcomes(directory, lenient)["bad-missing-audio"] == [("corpus-000000.tar", "ok")]


def test_stage_quarantines_with_shard_key_stage_reason_and_logs_counts(
        corpus, tmp_path, ray_local, mlflow_server, capsys):
    directory, expected = corpus
    client = MlflowClient(mlflow_server)
    run_id = client.create_run(client.create_experiment(f"badcorpus-{time.time()}")).info.run_id
    out = tmp_path / "out"
    out.mkdir()
    summary = run(CONFIG, StageContext(output_dir=out, inputs={"shards": directory},
                                       logger=RunLogger(mlflow_server, run_id)))
    quarantine = pq.read_table(out / "quarantine.parquet").to_pylist()
    kept = [r["key"] for split in summary["splits"]
            for r in ray.data.read_parquet(str(out / split)).select_columns(["key"]).take_all()]
    outcomes = defaultdict(list)
    for key in kept:
        outcomes[key].append("ok")
    for row in quarantine:
        assert row["stage"] == "preprocess" and re.search(r"corpus-00000\d\.tar$", row["shard"])
        outcomes[row["key"]].append(row["reason"])
    _check(outcomes, expected)
    counts = summary["counts"]
    rows = sum(len(v) for v in expected.values())
    assert counts["in"] == rows == counts["out"] + counts["quarantined"]
    assert counts["out"] == sum(v == [None] for v in expected.values())
    assert (f"preprocess: in {rows} = out {counts['out']} + quarantined "
            f"{counts['quarantined']}") in capsys.readouterr().out
    metrics = client.get_run(run_id).data.metrics
    assert metrics["samples/in"] == rows and metrics["samples/quarantined"] == len(quarantine)


def test_strict_stops_at_the_first_bad_sample_naming_shard_key_reason(corpus, tmp_path,
                                                                     ray_local):
    directory, _ = corpus
    out = tmp_path / "strict"
    out.mkdir()
    strict = PreprocessConfig(**{**CONFIG.__dict__, "strict": True})
    with pytest.raises(Exception, match=r"shard \S*corpus-00000\d\.tar, key \S*: \w+"):
        run(strict, StageContext(output_dir=out, inputs={"shards": directory}))
