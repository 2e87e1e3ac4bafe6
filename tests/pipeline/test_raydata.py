"""pipeline.raydata on a real in-process Ray: writes that never wait for a CPU, pools that do
not flap, I/O tasks that follow the pool."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from pipeline.raydata import ACTORS_PER_IO_TASK, actor_pool, bounded, io_tasks, write
from pipeline.sinks import SplitParquetSink, read_status, rows_in


def test_writes_run_while_the_pool_holds_every_cpu(ray_local, tmp_path):
    """The actor holds every free CPU of the session's Ray and, from its second batch on, waits
    for the first batch's rows to be on disk. A write task that asked for a CPU could only run
    once the actor was gone, so this timed out; the scale benchmark's stages lost most of their
    time to the same wait (the pool shrank, the write ran, the pool grew again).

    Every *free* CPU, not all 4: an earlier test whose stage failed on purpose can leave an
    actor behind that holds one (Ray 2.58 loses the kill of an actor still being created when
    the pool shuts down: "Failed to kill actor ... Socket closed"), and an actor asking for 4
    would then never start."""
    import ray
    import ray.data

    free = int(ray.available_resources().get("CPU", 0))
    assert free >= 1

    root = tmp_path / "out"

    class WaitForFirstWrite:
        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            self.calls += 1
            deadline = time.monotonic() + 60
            while self.calls > 1 and not list((root / "train").glob("*.parquet")):
                if time.monotonic() > deadline:
                    raise TimeoutError("no write ran while the actor held every CPU")
                time.sleep(0.1)
            n = len(batch["data"])
            return {"key": batch["data"].astype(str), "split": np.full(n, "train"),
                    "status": np.full(n, "ok"), "value": batch["data"] * 2}

    blocks = [np.arange(i * 8, (i + 1) * 8) for i in range(4)]  # made here: no read tasks
    dataset = ray.data.from_numpy(blocks).map_batches(
        WaitForFirstWrite, batch_size=8, num_cpus=free, **actor_pool(1))
    write(bounded(dataset, 1), SplitParquetSink(root), concurrency=1)
    assert rows_in(root / "train") == 32
    assert sorted(read_status(root)["key"].to_pylist(), key=int) == [str(i) for i in range(32)]


def test_a_pool_starts_all_its_actors_before_work_queues_up(ray_local, tmp_path):
    """One batch of work: a pool grown on demand would never start its second actor."""
    import ray.data

    class WaitForSecondActor:
        def __init__(self):
            (tmp_path / f"actor-{os.getpid()}").touch()

        def __call__(self, batch):
            deadline = time.monotonic() + 60
            while len(list(tmp_path.glob("actor-*"))) < 2:
                if time.monotonic() > deadline:
                    raise TimeoutError("the pool's second actor never started")
                time.sleep(0.1)
            return batch

    dataset = ray.data.from_numpy([np.arange(8)]).map_batches(
        WaitForSecondActor, batch_size=8, num_cpus=1, **actor_pool(2))
    assert dataset.count() == 8
    assert len(list(tmp_path.glob("actor-*"))) == 2


def test_bounded_pipelines_keep_their_pool_and_a_store_budget(ray_local):
    import ray.data

    dataset = bounded(ray.data.from_numpy([np.arange(4)]), num_actors=3)
    context = dataset.context
    assert context.execution_options.resource_limits.object_store_memory == 3 * 128 * 1024**2
    # Ray Data retires actors at utilization <= threshold; below 0 never happens.
    assert context.autoscaling_config.actor_pool_util_downscaling_threshold < 0
    other = ray.data.from_numpy([np.arange(4)]).context  # the process-wide default is untouched
    assert other.autoscaling_config.actor_pool_util_downscaling_threshold >= 0


@pytest.mark.parametrize(("actors", "tasks"), [(1, 1), (2, 1), (ACTORS_PER_IO_TASK, 1),
                                               (ACTORS_PER_IO_TASK + 1, 2), (64, 8)])
def test_io_tasks_follow_the_pool(actors, tasks):
    assert io_tasks(actors) == tasks


def test_a_small_split_is_preloaded_and_a_large_one_streams_the_same_rows(ray_local, tmp_path):
    """Issue 15: a split under ``preload_bytes`` reaches Ray Data from the object store (no read
    task, no file sampling before the first row); above it, from its files. Both give the model's
    columns, tensors included, in the same order."""
    from ray.data.dataset import MaterializedDataset
    from traindata import write_dataset

    from mmvq.columns import MODEL_COLUMNS
    from pipeline.raydata import parquet_split

    train = write_dataset(tmp_path) / "train"
    columns = list(MODEL_COLUMNS)
    preloaded = parquet_split(train, columns, preload_bytes=1 << 30)
    streamed = parquet_split(train, columns, preload_bytes=1)
    # Already in the object store, so nothing is left to read; the other reads as it streams.
    assert isinstance(preloaded, MaterializedDataset)
    assert not isinstance(streamed, MaterializedDataset)

    def rows(dataset):
        # In order, as the train stage reads (its ingest sets preserve_order).
        dataset.context.execution_options.preserve_order = True
        batches = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
        return {name: np.concatenate([b[name] for b in batches]) for name in columns}

    a, b = rows(preloaded), rows(streamed)
    assert set(a) == set(columns)
    assert a["image"].dtype == np.uint8 and a["image"].ndim == 4  # a tensor column, not lists
    for name in columns:
        np.testing.assert_array_equal(a[name], b[name])
