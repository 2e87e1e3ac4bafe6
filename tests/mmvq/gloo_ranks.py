"""Run a test file's ``worker(rank, out_dir)`` on several gloo ranks, one spawned process each.

The ranks meet through a file store in ``out_dir``, not a TCP store: a TCP store runs a server
thread inside rank 0, and when the other rank tore down first under load rank 0 died with
"terminate called without an active exception" (SIGABRT, once in CI). A barrier before
``destroy_process_group`` keeps every rank in the group until all have left their last
collective.

Spawned children import the worker by module name, so a test first puts its own folder on
``sys.path`` (``monkeypatch.syspath_prepend``; the children inherit the parent's path) and then
imports this helper the same way.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_on_ranks(module: str, out_dir: Path, world: int, worker: str = "worker") -> None:
    """``module.worker(rank, out_dir)`` on ranks 0..world-1; raises if any rank fails."""
    mp.spawn(_rank_main, args=(module, worker, str(out_dir), world), nprocs=world, join=True)


def _rank_main(rank: int, module: str, worker: str, out_dir: str, world: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{Path(out_dir) / 'gloo-store'}",
                            rank=rank, world_size=world)
    try:
        getattr(importlib.import_module(module), worker)(rank, out_dir)
        dist.barrier()
    finally:
        dist.destroy_process_group()
