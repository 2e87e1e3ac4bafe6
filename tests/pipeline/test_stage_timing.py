"""When a stage's first rows came out, counted from the command's start, and the embedded Ray's
worker environment, which must not need a job runtime_env (that would bar the raylet's
prestarted workers)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.preprocess import first_rows_timing
from pipeline.sinks import STATUS_DIR, first_written
from pipeline.stage import process_started


def test_process_started_is_this_process_start() -> None:
    # A child that sleeps 1.5 s before asking: its age is at least that, and not much more.
    code = ("import time; time.sleep(1.5); from pipeline.stage import process_started; "
            "print(time.time() - process_started())")
    age = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                               text=True).stdout)
    assert 1.4 <= age <= 15.0
    assert process_started() <= time.time()


def test_first_written_is_the_oldest_status_file(tmp_path) -> None:
    assert first_written(tmp_path) is None
    (tmp_path / STATUS_DIR).mkdir()
    for name, mtime in (("b.parquet", 2_000_000_000), ("a.parquet", 1_900_000_000)):
        path = tmp_path / STATUS_DIR / name
        pq.write_table(pa.table({"key": ["k"]}), path)
        os.utime(path, (mtime, mtime))
    assert first_written(tmp_path) == 1_900_000_000


def test_first_rows_timing() -> None:
    assert first_rows_timing(None, 10.0, 5.0) == {}
    assert first_rows_timing(17.5, 10.0, 5.0) == {"time/first_rows_after_stage_s": 7.5,
                                                  "time/first_rows_after_command_s": 12.5}
    assert first_rows_timing(17.5, 10.0, None) == {"time/first_rows_after_stage_s": 7.5}


_WORKER_ENV_CHECK = """
import os, ray
from pipeline import raydata
raydata.init_single_node(num_cpus=1, include_dashboard=False)
@ray.remote(num_cpus=0)
def worker_env():
    return os.environ.get("MALLOC_ARENA_MAX"), os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
print(ray.get(worker_env.remote()), ray.get_runtime_context().runtime_env.get("env_vars"),
      "MALLOC_ARENA_MAX" in os.environ)
ray.shutdown()
"""


def test_embedded_ray_workers_get_the_env_without_a_runtime_env() -> None:
    # A fresh process: the suite's other tests share one Ray, and this one starts its own.
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run([sys.executable, "-c", _WORKER_ENV_CHECK], check=True, env=env,
                         capture_output=True, text=True, timeout=120).stdout.strip()
    # The workers see the variables; the job has no runtime_env env_vars (which would bar the
    # prestarted workers); this process's environment is restored after ray.init.
    assert out.splitlines()[-1] == "('2', '0') None False"
