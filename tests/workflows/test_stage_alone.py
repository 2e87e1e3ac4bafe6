"""Every stage runs alone (``mmvq stage``) on a Ray with just 2 CPUs, the size of a laptop, and
a stage that can never be placed fails at once naming the numbers instead of hanging.

Before, a train stage's 2 workers held both CPUs and the parquet read tasks (and Ray 2.58's
file-listing task) waited for a CPU for ever; tokenize's actor pool did the same.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from pipeline.train_config import TrainConfig
from workflows.run import ResourceError, check_resources

SCRIPT = r"""
import json, sys, time
from pathlib import Path
from pipeline.synth import SynthConfig, run as synth
from workflows.run import ResourceError, run_single_stage
from workflows.spec import RayConfig

root = Path(sys.argv[1])
synth(SynthConfig(num_samples=24, samples_per_shard=8, val_fraction=0.25), root / "shards",
      progress=False)
two = RayConfig(num_cpus=2)
common = dict(data_root=root / "runs", ray=two, progress=False)
report = {}
pre = run_single_stage("preprocess", {"num_actors": 2}, {"shards": str(root / "shards")},
                       **common)
report["preprocess"] = pre.summary["counts"]
started = time.perf_counter()
try:
    run_single_stage("train", {"num_workers": 3}, {"data": str(pre.output)}, **common)
except ResourceError as err:
    report["unplaceable"] = [str(err), time.perf_counter() - started]
train = run_single_stage("train", {"num_workers": 2, "steps": 2, "batch_size": 2,
                                   "log_every": 1, "val_every": 0, "checkpoint_every": 0,
                                   "max_failures": 0}, {"data": str(pre.output)}, **common)
report["train"] = train.summary["steps"]
tokens = run_single_stage("tokenize", {"num_actors": 2, "batch_size": 8},
                          {"data": str(pre.output), "model": str(train.output)}, **common)
report["tokenize"] = tokens.summary["counts"]
evaluation = run_single_stage("evaluate", {"batch_size": 8, "compare_with": None},
                              {"data": str(pre.output), "model": str(train.output),
                               "tokens": str(tokens.output)}, **common)
report["evaluate"] = evaluation.summary["trained"]["samples"]
print("REPORT " + json.dumps(report))
"""


def test_each_stage_alone_on_two_cpus(tmp_path):
    # A process of its own: this one's Ray (the session fixture) has 4 CPUs.
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], check=False,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("REPORT "))
    report = json.loads(line[len("REPORT "):])
    assert report["preprocess"]["in"] == 24 == report["preprocess"]["out"]
    assert report["train"] == 2
    assert sum(report["tokenize"].values()) == 24
    assert report["evaluate"] == report["tokenize"]["val"]
    message, seconds = report["unplaceable"]
    assert "stage train needs 3 CPU but this Ray cluster has 2" in message
    assert seconds < 30  # refused before any worker is requested
    assert time.perf_counter() - started < 900
    # A normal run is quiet: not the false ERROR line of every restartable actor
    # (ray-project/ray#57733), nor Ray Train's and Ray Data's INFO chatter.
    output = result.stdout + result.stderr
    assert "constructor arguments in the object store" not in output
    # The embedded Ray starts no dashboard, so the train stage runs without Ray Train's
    # placement-group cleaner, which would warn every second that the state API is down.
    assert "Failed to query Ray Train Controller" not in output
    for chatter in ("Started training worker group", "Moving model to device",
                    "Progress bars disabled", "execution finished in"):
        assert chatter not in output, chatter


def test_unplaceable_request_names_the_numbers(ray_local):
    with pytest.raises(ResourceError, match=r"stage train needs 8 CPU but this Ray cluster "
                       r"has 4 in all .*num_workers"):
        check_resources("train", TrainConfig(num_workers=8))
    check_resources("train", TrainConfig(num_workers=2))  # fits: no error
    with pytest.raises(ResourceError, match="needs 1 GPU but this Ray cluster has 0"):
        check_resources("train", TrainConfig(num_workers=1, use_gpu=True))
