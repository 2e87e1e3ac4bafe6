"""The scaling benchmark: a tiny run end to end (every sample counted), its samples, and the
arithmetic of its memory peaks, ratios and fit."""

import io
import json
import time

import numpy as np
import pytest
import soundfile
from PIL import Image

from workflows import bench_scale as bench


def test_tiny_run_measures_every_stage_and_accounts_for_every_sample(tmp_path, capfd):
    out = tmp_path / "scale.json"
    returned = bench.main(["--sizes", "24", "--cores", "2", "--root", str(tmp_path / "bench"),
                           "--out", str(out)])
    result = json.loads(out.read_text())
    assert result == json.loads(json.dumps(returned))
    (run,) = result["runs"]
    assert run["samples"] == 24
    stages = {s["stage"]: s for s in run["stages"]}
    assert list(stages) == list(bench.STAGES)
    for stage in stages.values():
        assert stage["in"] == stage["out"] + stage["quarantined"], stage
        assert stage["seconds"] > 0 and stage["call_seconds"] >= stage["seconds"]
        assert stage["start"] < stage["end"]
        assert stage["peak_memory_bytes"] > 0 and stage["output_bytes"] > 0
    # What one stage writes is what the next reads; the generated samples are all good.
    assert stages["ingest"]["in"] == 24
    assert stages["preprocess"]["in"] == stages["ingest"]["out"]
    assert stages["tokenize"]["in"] == stages["preprocess"]["out"] == stages["tokenize"]["out"]
    assert stages["tokenize"]["out"] == 24
    assert run["seconds"] == pytest.approx(sum(s["seconds"] for s in stages.values()))
    assert run["seconds_per_sample"] == pytest.approx(run["seconds"] / 24)
    # The memory of the child's process tree and the object store were both sampled.
    assert run["memory_samples"] > 10 and run["store_samples"] > 0 and run["store_error"] is None
    assert 0 < run["pss_samples"] <= run["memory_samples"]
    assert run["peak_pss_bytes"] > 0 and run["peak_rss_bytes"] >= run["peak_pss_bytes"]
    assert run["peak_rss_bytes"] >= run["peak_memory_bytes"] - run["peak_store_bytes"]
    # The run's peak covers every stage (and the moments between them, Ray start-up included).
    assert run["peak_memory_bytes"] >= max(s["peak_memory_bytes"] for s in stages.values())
    labels = set(run["peak_by_process"])
    assert "python workflows.bench_scale" in labels  # the child itself
    assert any(label.startswith("ray::") for label in labels)  # Ray's workers are in the tree
    assert run["spilled_bytes"] == 0
    # The work in CPU seconds: Ray's actors in the tree used some (ingest may be too short).
    for name in ("preprocess", "tokenize"):
        assert 0 < stages[name]["cpu_seconds"] == pytest.approx(
            24 * stages[name]["cpu_seconds_per_sample"])
    assert len(run["load_average"]["start"]) == len(run["load_average"]["end"]) == 3
    q = result["ratios"]
    assert (q["from"], q["to"], q["seconds_per_sample"], q["peak_memory"]) == (24, 24, 1.0, 1.0)
    assert result["meta"]["settings"]["sizes"] == [24]
    # Samples stay cached for the next run; the stage outputs do not.
    assert (tmp_path / "bench" / "scale-data-24-px64" / "spec.json").is_file()
    assert not (tmp_path / "bench" / "scale-work-24-px64").exists()
    assert "| 24 | preprocess |" in capfd.readouterr().out


def test_samples_are_deterministic_varied_and_about_a_tenth_val():
    first = bench.make_sample(3, seed=0, image_size=32)
    assert first == bench.make_sample(3, seed=0, image_size=32)
    assert first["jpg"] != bench.make_sample(4, seed=0, image_size=32)["jpg"]
    assert first["jpg"] != bench.make_sample(3, seed=1, image_size=32)["jpg"]
    samples = [bench.make_sample(i, seed=0, image_size=32) for i in range(200)]
    splits = [json.loads(s["json"])["split"] for s in samples]
    assert set(splits) == {"train", "val"} and 8 <= splits.count("val") <= 36
    rates, channels = set(), set()
    for s in samples[:40]:
        assert Image.open(io.BytesIO(s["jpg"])).size == (32, 32)
        wave, rate = soundfile.read(io.BytesIO(s["flac"]), always_2d=True)
        assert 1.0 <= len(wave) / rate <= 2.0
        rates.add(rate)
        channels.add(wave.shape[1])
    assert rates == {16000, 22050} and channels == {1, 2}
    captions = [s["txt"].decode("utf-8") for s in samples]
    assert any(not c.isascii() for c in captions) and len(set(captions)) > 190


def test_sample_folder_is_generated_once_per_spec(tmp_path):
    folder = bench.ensure_samples(3, 16, 0, tmp_path)
    assert sorted(p.name for p in folder.iterdir())[:4] == [
        "0000000.flac", "0000000.jpg", "0000000.json", "0000000.txt"]
    assert len(list(folder.iterdir())) == 12
    stamp = (folder / "0000000.jpg").stat().st_mtime_ns
    assert bench.ensure_samples(3, 16, 0, tmp_path) == folder
    assert (folder / "0000000.jpg").stat().st_mtime_ns == stamp  # reused, not rewritten
    again = bench.ensure_samples(3, 16, 1, tmp_path)  # another seed: regenerated
    assert again == folder and (folder / "0000000.jpg").read_bytes() != b""
    assert json.loads((folder.parent / "spec.json").read_text())["seed"] == 1


def _reading(t, anon, pss=None, cpu=0.0):
    return {"t": t, "cpu": cpu, "rss": anon, "anon": anon, "file": 0, "shmem": 0, "pss": pss,
            "by_process": {}}


def test_peak_memory_adds_the_store_at_the_same_moment_not_the_separate_peaks():
    tree = [_reading(1.0, 100), _reading(2.0, 250, pss=400), _reading(3.0, 200)]
    store = [[0.5, 10, 0], [1.9, 20, 0], [2.5, 150, 0]]
    readings = bench.combine(tree, store)
    assert [r["memory"] for r in readings] == [110, 270, 350]  # at 2.0: the store's 1.9 value
    assert bench.peak(readings)["t"] == 3.0  # 200 + 150, below 250 + 150 of separate peaks
    assert bench.peak(readings, 1.5, 2.5)["memory"] == 270
    assert bench.peak(readings, 5.0, 6.0) is None
    assert bench.combine([_reading(0.1, 100)], store)[0]["memory"] == 100  # before the store


def test_cpu_seconds_of_a_window_are_the_difference_of_its_first_and_last_readings():
    readings = [_reading(t, 1, cpu=c) for t, c in ((1.0, 5.0), (2.0, 6.5), (3.0, 9.0))]
    assert bench.cpu_seconds(readings, 1.5, 3.0) == pytest.approx(2.5)
    assert bench.cpu_seconds(readings, 0.0, 9.0) == pytest.approx(4.0)
    assert bench.cpu_seconds(readings, 1.5, 2.5) is None  # one reading: no interval


def test_tree_sample_reads_this_process_and_pss_only_when_asked():
    import os

    cheap = bench.tree_sample(os.getpid())
    assert cheap["pss"] is None and cheap["rss"] >= cheap["anon"] > 0
    assert cheap["cpu"] >= time.process_time() - 0.5  # this process's user + system time
    full = bench.tree_sample(os.getpid(), with_pss=True)
    assert full["rss"] >= full["pss"] > 0
    # In a full test run this process has children (an mlflow server, Ray): count them all.
    entries = list(full["by_process"].values())
    assert sum(e["processes"] for e in entries) >= 1 and all(e["bytes"] >= 0 for e in entries)
    assert sum(e["bytes"] for e in entries) > 0


def _run(n, seconds_by_stage, memory):
    stages = [{"stage": s, "seconds": t} for s, t in zip(bench.STAGES, seconds_by_stage,
                                                         strict=True)]
    total = sum(seconds_by_stage)
    return {"samples": n, "stages": stages, "seconds": total, "seconds_per_sample": total / n,
            "peak_memory_bytes": memory}


def test_ratios_compare_largest_with_smallest_and_fit_splits_start_up_from_per_sample():
    # ingest 1 s + 1 ms/sample, preprocess 10 s + 4 ms, tokenize 8 s + 2 ms
    runs = [_run(n, [1 + 1e-3 * n, 10 + 4e-3 * n, 8 + 2e-3 * n], m)
            for n, m in ((1000, 1000), (4000, 1200), (16000, 1400))]
    fitted = bench.fit(runs)
    assert fitted["preprocess"]["fixed_s"] == pytest.approx(10)
    assert fitted["preprocess"]["per_sample_s"] == pytest.approx(4e-3)
    assert fitted["tokenize"]["per_sample_s"] == pytest.approx(2e-3)
    q = bench.ratios(runs)
    assert q["seconds_per_sample"] == pytest.approx((19 + 7e-3 * 16000) / 16000 / (26e-3))
    assert q["seconds_met"] and q["peak_memory"] == pytest.approx(1.4) and not q["memory_met"]
    assert bench.fit(runs[:1]) == {}
    text = bench.table({"runs": [], "ratios": q})
    assert "| peak memory | 1.40 | <= 1.3 | missed |" in text


def test_sizes_must_be_positive():
    with pytest.raises(SystemExit):
        bench.parse_args(["--sizes", "0"])
    assert np.array_equal(bench.parse_args([]).sizes, [1000, 4000, 16000])
