"""The train benchmark's measurements: what it reads from a child's output, and the baseline's
data as the stage's workers see it."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray.data

from pipeline.formats.preprocessed import read_columns
from workflows.bench_train import summarize, timed


def test_step_lines_are_stamped_and_summarized():
    script = ("import time\n"
              "for s in (1, 5, 10, 15, 20):\n"
              "    print(f'(RayTrainWorker pid=1) [train] step {s}/20  data-wait {s}%', flush=True)\n"
              "    time.sleep(0.05)\n")
    run = timed([sys.executable, "-c", script])
    assert sorted(run["steps"]) == [1, 5, 10, 15, 20] and run["total"] == 20
    assert run["steps"][1] < run["steps"][10] < run["steps"][20] <= run["wall_s"]
    result = summarize(run, global_batch=32, warmup=5)
    # From step 5 to step 15 (the last line before the final step): 10 steps of 32 samples.
    elapsed = run["steps"][15] - run["steps"][5]
    assert result["steady_samples_per_s"] == pytest.approx(320 / elapsed)
    assert result["step0_s"] == run["steps"][1]
    assert result["data_wait"] == pytest.approx(0.125)  # mean of 10% and 15%


def test_a_failing_child_is_an_error_with_its_output():
    with pytest.raises(RuntimeError, match="exited 3:\nboom"):
        timed([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])


def test_the_baseline_reads_the_stage_parquet_as_ray_does(tmp_path, ray_local):
    rows = [{"image": np.full((4, 4, 3), i, np.uint8), "audio_len": i,
             "text_ids": np.arange(6, dtype=np.int32) + i} for i in range(5)]
    ray.data.from_items(rows).write_parquet(str(tmp_path))
    columns = read_columns(pq.read_table(str(tmp_path)))
    order = np.argsort(columns["audio_len"])
    assert columns["image"].shape == (5, 4, 4, 3) and columns["image"].dtype == np.uint8
    assert (columns["image"][order][:, 0, 0, 0] == np.arange(5)).all()
    assert (columns["text_ids"][order][2] == np.arange(6) + 2).all()
