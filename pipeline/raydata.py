"""How the stages use Ray Data: parquet reads that reserve no CPU, and actor pools that size
themselves.

Reads: a read task costs little next to the work downstream of it, so it reserves no CPU.
Otherwise a stage whose workers or actors hold every CPU (2 train workers on a 2-CPU machine)
waits for ever for a CPU to read with. Ray 2.58's new parquet path adds a file-listing task that
always asks for one CPU, whatever the read's ``num_cpus``; :func:`read_parquet` takes the
classic path, whose one read task per file group honours ``num_cpus=0``.

Writes: the same, for the same reason, and more. A write task that asks for a CPU waits while
the pool holds them all; the pool's actors then stop, backpressured by the unwritten blocks,
until Ray Data's autoscaler retires one as idle (~30 s), which frees a CPU for the writes, and
then starts it again (importing torch). The scale benchmark's 4k-sample preprocess spent most of
its 119 s in that cycle (1k: 15 s); :func:`write` reserves no CPU and caps the writes instead.

Actor pools:
every pool asks for all its actors at once (``initial_size=num_actors``): growing from one
actor as work queued up cost the bench-data run a second of an idle driver per stage, each new
actor importing torch after the previous one. ``min_size=1`` stays, so a cluster with fewer
free CPUs or GPUs than ``num_actors`` still makes progress on the actors it can place, and
Ray Data does not warn that the pool's fixed size cannot be met.

Restarts: Ray Data makes its actors restartable, and Ray then logs an ERROR line for every pool
("has constructor arguments in the object store and max_restarts > 0", ray-project/ray#57733)
although Ray Data holds those arguments for the pool's lifetime. On the embedded in-process Ray
an actor dies only with the machine's memory, where a restart on the same machine does not help,
so there restarts are off and the line is never printed; on a cluster a dead node's actors are
restarted elsewhere, which is worth the line.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

# Whether this process started the Ray it uses (the embedded in-process Ray): set by
# :func:`init_single_node`. A flag of this process, not an environment variable: the
# environment is inherited by every child process, a user's own Ray cluster included.
_in_process_ray = False


# Actors one read or write task keeps busy. Reading a shard costs ~0.5 ms a sample and writing
# parquet less, against ~9 CPU-ms to preprocess and ~3 to tokenize one (make bench-scale), so one
# I/O task keeps well over 8 actors fed; each one more is a worker process of ~250-400 MB. With
# one I/O task per actor, memory grew with the number of shards read at once (1k samples = 1
# shard = 1 reader; 16k = 2 readers) rather than with the work.
ACTORS_PER_IO_TASK = 8


def io_tasks(num_actors: int) -> int:
    """Read (or write) tasks to run at once for a pool of ``num_actors`` actors."""
    return max(1, -(-num_actors // ACTORS_PER_IO_TASK))


def read_parquet(paths: str | list[str], columns: list[str] | None = None,
                 concurrency: int = 2) -> Any:
    """``ray.data.read_parquet`` of ``paths`` whose tasks reserve no CPU (see above).

    A task that reserves no CPU is never held back by the CPU count, so without a cap Ray
    Data starts one read task, each in a worker process of its own (~130 MB), per file group at
    once: the benchmark's 16k-sample tokenize had 36 of them. ``concurrency`` caps them.
    """
    import ray.data
    from ray.data import DataContext

    context = DataContext.get_current()
    previous, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(paths, columns=columns, num_cpus=0,
                                     concurrency=max(1, concurrency))
    finally:
        context.use_datasource_v2 = previous


def parquet_split(path: str | Path, columns: list[str], preload_bytes: int,
                  concurrency: int = 2) -> Any:
    """The parquet files of one split under ``path`` as a Ray Dataset of ``columns``.

    A split whose files hold at most ``preload_bytes`` (uncompressed, all columns, from their
    footers) is read here with pyarrow and handed to Ray Data from the object store. Streaming
    it from its files costs, before its first row, a task that samples the files' encoding ratio
    and a read task per file group, each a worker process to start: ~4 s of the train stage's
    first step on 2 cores, for a split read in 0.3 s. A larger split streams (:func:`read_parquet`).
    The rows come in file-name order either way.
    """
    import pyarrow.parquet as pq
    import ray.data

    files = [str(file) for file in sorted(Path(path).glob("*.parquet"))]
    size = 0
    for file in files:
        metadata = pq.read_metadata(file)
        size += sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
        if size > preload_bytes:
            break
    if not files or size > preload_bytes:
        return read_parquet(files or str(path), columns=columns, concurrency=concurrency)
    return ray.data.from_arrow(pq.read_table(files, columns=columns))


def write(dataset: Any, sink: Any, concurrency: int = 2) -> None:
    """``dataset.write_datasink(sink)`` with write tasks that reserve no CPU, at most
    ``concurrency`` at a time (see above)."""
    dataset.write_datasink(sink, ray_remote_args={"num_cpus": 0},
                           concurrency=max(1, concurrency))


# Object-store bytes a stage's pipeline may hold in flight, per actor (and at least twice
# that). Ray Data's default budget is a share of the whole store (GBs), which a small input
# never reaches and a large one fills, so memory grew with the input; a budget that follows the
# pool, not the data, keeps it flat. 128 MiB is ~10 preprocessed blocks of 128 rows at 64 px,
# or 3 at the base workflow's 256 px: enough to keep each actor fed.
OBJECT_STORE_BYTES_PER_ACTOR = 128 * 1024 * 1024


def bounded(dataset: Any, num_actors: int) -> Any:
    """``dataset`` with its execution capped at a budget of the object store that follows its
    actor pool's size (:data:`OBJECT_STORE_BYTES_PER_ACTOR`), and a pool that does not shrink
    while there is work."""
    object_store_bytes = OBJECT_STORE_BYTES_PER_ACTOR * max(2, num_actors)
    options = dataset.context.execution_options
    options.resource_limits = options.resource_limits.copy(
        object_store_memory=object_store_bytes)
    # A pool that grew stays until its inputs are consumed. Ray Data retires an actor whenever
    # its utilization dips to half, which a pipeline waiting on a write does for a moment, and
    # then starts a new one (torch import, model load) a second later: the scale benchmark's
    # tokenize flapped like this. The pool still shrinks when the inputs run out.
    dataset.context.autoscaling_config = dataclasses.replace(
        dataset.context.autoscaling_config, actor_pool_util_downscaling_threshold=-1.0)  # never
    return dataset


def actor_pool(num_actors: int, use_gpu: bool = False) -> dict[str, Any]:
    """``map_batches`` keyword arguments for a pool of 1..``num_actors`` actors, all of
    them requested when the stage starts.

    Each actor holds one CPU, or one GPU when ``use_gpu``.
    """
    import ray.data

    size = max(1, num_actors)
    options: dict[str, Any] = {
        "compute": ray.data.ActorPoolStrategy(
            min_size=1, max_size=size, initial_size=size),
        "num_gpus": 1 if use_gpu else 0,
    }
    if _in_process_ray:
        options["max_restarts"] = 0
    return options



def in_process_ray() -> bool:
    """Whether this process started the Ray it uses (:func:`init_single_node`)."""
    return _in_process_ray


def init_single_node(verbose: bool = False, **init_kwargs: Any) -> None:
    """``ray.init(**init_kwargs)`` of a Ray on this machine alone, every port on 127.0.0.1,
    whose workers get :func:`_worker_env`.

    The variables are in this process's environment only while ``ray.init`` spawns Ray's
    daemons, which pass them on to every worker they start; then the environment is restored.
    Not the job's ``runtime_env``: a job with one cannot use the workers the raylet starts
    ahead of any job (one per CPU), so each stage started every worker process it used anew
    (preprocess: 7 processes of ~2-4 s each on 2 cores between the stage's start and its first
    rows).

    Ray's servers (GCS, raylet, workers, the dashboard agent whose job API runs shell commands)
    bind the node's address, and every interface unless that address is loopback; ``ray.init``
    turns an explicit ``_node_ip_address="127.0.0.1"`` back into the machine's network address.
    Ray's own switch for a single-machine Ray (the default on macOS and Windows) is
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: the node then takes 127.0.0.1 and everything binds
    loopback. Ray reads it into a constant when imported, so it is set on that constant while
    the node starts, not in the environment, which every child process would inherit (a
    multi-node cluster started from one refuses to start). The constant is private Ray API:
    ``tests/infra/test_loopback.py`` reads the kernel's socket table to catch a Ray that
    changes it.
    """
    import ray
    from ray._private import ray_constants

    global _in_process_ray
    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    env = _worker_env(verbose)
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        ray.init(**init_kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    _in_process_ray = True


def _worker_env(verbose: bool) -> dict[str, str]:
    """The environment variables the embedded Ray's workers need.

    - ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``: the watcher follows node drains (spot
      preemption), which one machine does not have; creating it logs the same false ERROR.
    - ``MALLOC_ARENA_MAX=2``: glibc gives each thread of a process its own malloc arena, and a
      Ray worker's threads (task executor, gRPC, object transfer) each keep what they once held;
      a worker that had read 8 shards of 40 KB members kept ~500 MB. With two arenas, the scale
      benchmark's peak at 16k samples fell from 4.1 to 3.3 GB (1.34x to 1.13x that at 1k).
      The Docker image sets the same for cluster workers.
    - ``RAY_DATA_LOGGING_CONFIG`` (not with ``verbose``): Ray Data's own logging config with the
      console at WARNING (``ray_data_logging.yaml``); its log file keeps everything.
    """
    env = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "MALLOC_ARENA_MAX": "2"}
    if not verbose:
        env["RAY_DATA_LOGGING_CONFIG"] = str(Path(__file__).with_name("ray_data_logging.yaml"))
    return env
