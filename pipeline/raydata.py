"""How the stages use Ray Data: parquet reads that reserve no CPU, and actor pools that size
themselves.

Reads: a read task costs little next to the work downstream of it, so it reserves no CPU.
Otherwise a stage whose workers or actors hold every CPU (2 train workers on a 2-CPU machine)
waits for ever for a CPU to read with. Ray 2.58's new parquet path adds a file-listing task that
always asks for one CPU, whatever the read's ``num_cpus``; :func:`read_parquet` takes the
classic path, whose one read task per file group honours ``num_cpus=0``.

Actor pools:
every pool starts with one actor and grows to its configured size as work queues up
(``min_size=1``): a cluster with fewer free CPUs or GPUs than ``num_actors`` still makes
progress, and Ray Data does not warn that the pool's fixed size cannot be met.

Restarts: Ray Data makes its actors restartable, and Ray then logs an ERROR line for every pool
("has constructor arguments in the object store and max_restarts > 0", ray-project/ray#57733)
although Ray Data holds those arguments for the pool's lifetime. On the embedded in-process Ray
an actor dies only with the machine's memory, where a restart on the same machine does not help,
so there restarts are off and the line is never printed; on a cluster a dead node's actors are
restarted elsewhere, which is worth the line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Set by the runner when it starts Ray in this process (workflows.runner._init_ray).
LOCAL_RAY_ENV = "MMVQ_LOCAL_RAY"


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


# Object-store bytes a stage's pipeline may hold in flight, per actor (and at least twice
# that). Ray Data's default budget is a share of the whole store (GBs), which a small input
# never reaches and a large one fills, so memory grew with the input; a budget that follows the
# pool, not the data, keeps it flat. 128 MiB is ~10 preprocessed blocks of 128 rows at 64 px,
# or 3 at the base workflow's 256 px: enough to keep each actor fed.
OBJECT_STORE_BYTES_PER_ACTOR = 128 * 1024 * 1024


def bounded(dataset: Any, num_actors: int) -> Any:
    """``dataset`` with its execution capped at a budget of the object store that follows its
    actor pool's size (:data:`OBJECT_STORE_BYTES_PER_ACTOR`)."""
    object_store_bytes = OBJECT_STORE_BYTES_PER_ACTOR * max(2, num_actors)
    options = dataset.context.execution_options
    options.resource_limits = options.resource_limits.copy(
        object_store_memory=object_store_bytes)
    return dataset


def actor_pool(num_actors: int, use_gpu: bool = False) -> dict[str, Any]:
    """``map_batches`` keyword arguments for a pool of 1..``num_actors`` actors.

    Each actor holds one CPU, or one GPU when ``use_gpu``.
    """
    import ray.data

    options: dict[str, Any] = {
        "compute": ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, num_actors)),
        "num_gpus": 1 if use_gpu else 0,
    }
    if os.environ.get(LOCAL_RAY_ENV) == "1":
        options["max_restarts"] = 0
    return options



def local_ray_environment(verbose: bool) -> dict[str, str]:
    """Environment for an in-process Ray, set before ``ray.init`` so every worker inherits it.

    - ``MMVQ_LOCAL_RAY``: :func:`actor_pool` turns actor restarts off (see above).
    - ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``: the watcher follows node drains (spot
      preemption), which one machine does not have; creating it logs the same false ERROR.
    - ``RAY_DATA_LOGGING_CONFIG`` (not with ``verbose``): Ray Data's own logging config with the
      console at WARNING (``ray_data_logging.yaml``); its log file keeps everything.
    """
    env = {LOCAL_RAY_ENV: "1", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    if not verbose:
        env["RAY_DATA_LOGGING_CONFIG"] = str(Path(__file__).with_name("ray_data_logging.yaml"))
    return env
