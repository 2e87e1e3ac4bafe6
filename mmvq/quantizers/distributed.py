"""The few collectives that keep codebook state identical on every DDP rank.

DDP averages gradients, but EMA statistics, k-means initialisation and dead-code restarts change
codebooks outside autograd. Each rank sees different data, so without these collectives the
codebooks drift apart and the same index decodes to different vectors on different ranks. All
functions are no-ops when ``torch.distributed`` is not initialised (or has one rank), and every
rank must call them in the same order, as in any DDP forward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of ranks, 1 when not running distributed."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_rank() -> bool:
    """Rank 0, or the only process."""
    return world_size() == 1 or dist.get_rank() == 0


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place; every rank then holds the same bytes."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s value, in place."""
    if world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (n_r, D) -> (sum of n_r, D), in rank order.

    Ranks may hold different numbers of rows: they are padded to the largest for the gather.
    """
    if world_size() == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    counts = [int(s) for s in sizes]
    padded = x.new_zeros(max(counts), x.shape[1])  # (n_max, D)
    padded[: x.shape[0]] = x
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, counts, strict=True)])


def all_gather_rows_local_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (n_r, ...) concatenated in rank order; this rank's own rows keep their
    autograd graph, the other ranks' are constants here (they get their gradients on their
    own ranks, as in open_clip's default contrastive gather). Ranks may hold different numbers
    of rows."""
    if world_size() == 1:
        return x
    flat = x.reshape(x.shape[0], -1)
    gathered = all_gather_rows(flat.detach().contiguous())  # (sum n_r, prod(...))
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    begin = sum(int(s) for s in sizes[: dist.get_rank()])
    rows = torch.cat([gathered[:begin], flat, gathered[begin + x.shape[0]:]])
    return rows.reshape(-1, *x.shape[1:])
