"""k-means initialisation of a codebook from the first batch (Lloyd's algorithm).

A randomly initialised codebook starts far from the encoder outputs, so most codes never win a
lookup and never learn (codebook collapse). Starting from k-means centroids of real encoder
outputs puts every code where data is (used by SoundStream, Zeghidour et al. 2021, and
vector-quantize-pytorch's ``kmeans_init``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmvq.quantizers.distance import nearest_code
from mmvq.quantizers.distributed import all_gather_rows, broadcast_, is_main_rank, world_size

# Samples per k-means run, over all ranks: Lloyd costs iters x samples x K x D.
MAX_KMEANS_SAMPLES = 2**16


def sample_rows(x: torch.Tensor, num: int) -> torch.Tensor:
    """``num`` random rows of ``x`` (n, D), without replacement when n >= num."""
    if x.shape[0] >= num:
        return x[torch.randperm(x.shape[0], device=x.device)[:num]]
    # Fewer rows than wanted: repeats, which later dead-code restarts can spread out.
    return x[torch.randint(x.shape[0], (num,), device=x.device)]


def kmeans(samples: torch.Tensor, num_codes: int, iters: int, cosine: bool) -> torch.Tensor:
    """Lloyd's k-means from random samples; (S, D) -> (num_codes, D) centroids.

    Clusters that lose all their samples keep their previous centroid. With ``cosine`` the
    centroids are renormalised to the unit sphere after every step (spherical k-means).
    """
    centroids = sample_rows(samples, num_codes)  # (K, D)
    for _ in range(iters):
        assign = nearest_code(samples, centroids)  # (S,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, samples)  # (K, D)
        counts = torch.zeros(num_codes, device=samples.device).index_add_(
            0, assign, torch.ones_like(assign, dtype=samples.dtype)
        )  # (K,)
        means = sums / counts.clamp_min(1.0)[:, None]
        if cosine:
            means = F.normalize(means, dim=-1)
        centroids = torch.where(counts[:, None] > 0, means, centroids)
    return centroids


def synced_kmeans(
    samples: torch.Tensor, num_codes: int, iters: int, cosine: bool
) -> torch.Tensor | None:
    """k-means on the samples of all ranks, run on rank 0 and broadcast.

    Every rank gets bit-identical centroids. Returns None, on every rank alike, when no rank has
    a sample (e.g. a batch without this modality): the caller then tries the next batch.
    """
    per_rank = MAX_KMEANS_SAMPLES // world_size()
    if samples.shape[0] > per_rank:
        samples = sample_rows(samples, per_rank)
    everything = all_gather_rows(samples.contiguous())  # (S, D) over all ranks
    if everything.shape[0] == 0:
        return None
    if is_main_rank():
        centroids = kmeans(everything, num_codes, iters, cosine)
    else:
        centroids = samples.new_empty(num_codes, samples.shape[1])
    return broadcast_(centroids.contiguous())
