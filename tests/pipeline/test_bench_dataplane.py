"""The data-plane benchmark runs end to end at a tiny size: three paths, every sample counted."""

import json

import pytest
import yaml

from pipeline.bench import dataplane as bench


@pytest.mark.benchmark
def test_tiny_benchmark_measures_all_three_paths_on_the_same_samples(tmp_path, capsys):
    out = tmp_path / "results.json"
    bench.main(["--samples", "6", "--image-size", "32", "--cores", "2", "--repeats", "2",
                "--shards-root", str(tmp_path / "shards"), "--out", str(out)])
    result = json.loads(out.read_text())
    assert [(r["repeat"], r["path"]) for r in result["rows"]] == [
        (repeat, path) for repeat in (0, 1) for path in bench.PATHS]
    rows = {r["path"]: r for r in result["rows"] if r["repeat"] == 1}
    for row in rows.values():
        # Every generated sample is read and preprocessed cleanly by each path.
        assert row["samples"] == row["ok"] == 6, row
        assert row["image_size"] == 32
        assert row["seconds"] > 0 and row["samples_per_s"] > 0
        assert row["peak_rss_bytes"] > 0 and row["peak_pss_bytes"] > 0
    assert rows["floor"]["cores"] == 1 and rows["ray-data"]["cores"] == 2
    assert rows["ray-data"]["spilled_bytes"] == 0  # 6 small samples never spill
    ratios = result["ratios"]["32"]
    per_run = [by["ray-data"]["samples_per_s"] / by["webdataset"]["samples_per_s"]
               for by in ({r["path"]: r for r in result["rows"] if r["repeat"] == repeat}
                          for repeat in (0, 1))]
    assert ratios["end_to_end_ray_vs_webdataset"] == pytest.approx(sum(per_run) / 2)  # median
    assert ratios["end_to_end_ray_vs_floor_x_cores"] > 0
    assert ratios["peak_pss_ray_vs_webdataset"] > 0
    printed = capsys.readouterr().out
    assert "| 32 | 2 | ray-data | 6 |" in printed and "| 32 | peak PSS |" in printed


def test_demo_configs_follow_the_workflow_at_the_requested_size():
    synth, pre = bench.demo_configs(256)
    assert (synth.image_size, pre.image_size) == (256, 256)
    # The rest is the demo's stages as configured in workflows/demo.yaml.
    stages = yaml.safe_load(bench.DEMO_WORKFLOW.read_text())["stages"]
    for name, value in stages["preprocess"]["config"].items():
        if name != "image_size":
            assert getattr(pre, name) == value, name
    assert synth.sample_rate == stages["synth"]["config"]["sample_rate"]


def test_tree_memory_counts_this_process():
    rss, pss = bench.tree_memory()
    assert rss >= pss > 0
