"""Evaluation metrics as pure functions.

Per-sample metrics return a (B,) tensor so that callers can mask by ``has_*`` and average over
a whole dataset; codebook statistics return plain floats / arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mmvq.losses import log_mel_distance


def _length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """(B,) lengths -> (B, size) bool, true before each length."""
    positions = torch.arange(size, device=lengths.device)
    return positions[None, :] < lengths[:, None]


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per sample: (B, ...) x2 -> (B,).

    ``data_range`` is max - min of the signal: 2 for images in [-1, 1]. Identical inputs give inf.
    """
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    return 10.0 * torch.log10(data_range**2 / mse)


def si_snr(
    ref: torch.Tensor, est: torch.Tensor, lengths: torch.Tensor | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """Scale-invariant signal-to-noise ratio in dB per sample (Le Roux et al. 2019).

    Parameters
    ----------
    ref, est : (B, T) waveforms
    lengths : (B,) real samples per clip; the padding after them is ignored. None = all of T.

    Returns
    -------
    (B,) tensor: high (tens of dB) for a scaled copy, around or below 0 for unrelated noise.
    """
    ref, est = ref.float(), est.float()
    if lengths is None:
        lengths = torch.full((ref.shape[0],), ref.shape[1], device=ref.device)
    mask = _length_mask(lengths.to(ref.device), ref.shape[1]).float()  # (B, T)
    count = mask.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, 1)
    # Zero-mean over the real samples only, then zero the padding again.
    ref = (ref - (ref * mask).sum(dim=1, keepdim=True) / count) * mask
    est = (est - (est * mask).sum(dim=1, keepdim=True) / count) * mask
    # Project est onto ref: the part of est explained by a scaled ref is the target.
    scale = (est * ref).sum(dim=1, keepdim=True) / (ref.pow(2).sum(dim=1, keepdim=True) + eps)
    target = scale * ref  # (B, T)
    noise = est - target
    ratio = (target.pow(2).sum(dim=1) + eps) / (noise.pow(2).sum(dim=1) + eps)
    return 10.0 * torch.log10(ratio)


def mel_distance(
    ref: torch.Tensor, est: torch.Tensor, sample_rate: int, n_ffts: Sequence[int] = (128, 512)
) -> torch.Tensor:
    """Multi-resolution log-mel L1 distance per sample, (B, T) x2 -> (B,); lower is better."""
    with torch.no_grad():
        return log_mel_distance(ref, est, sample_rate, n_ffts)


def token_accuracy(ids: torch.Tensor, pred: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Fraction of the first ``lengths[b]`` tokens predicted right, per sample: (B,).

    An empty text (length 0) counts as 1.0: there is nothing to get wrong.
    """
    valid = _length_mask(lengths.to(ids.device), ids.shape[1])  # (B, L)
    correct = ((ids == pred.to(ids.device)) & valid).sum(dim=1).float()
    total = valid.sum(dim=1).float()
    return torch.where(total > 0, correct / total.clamp_min(1.0), torch.ones_like(total))


def exact_match(ids: torch.Tensor, pred: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Whether all of the first ``lengths[b]`` tokens are right, per sample: (B,) bool."""
    valid = _length_mask(lengths.to(ids.device), ids.shape[1])  # (B, L)
    wrong = (ids != pred.to(ids.device)) & valid
    return ~wrong.any(dim=1)


def code_histogram(indices: torch.Tensor | np.ndarray, codebook_size: int) -> np.ndarray:
    """Count of each code 0..K-1 over all of ``indices`` (any shape): int64 array (K,)."""
    flat = np.asarray(torch.as_tensor(indices).detach().cpu()).reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= codebook_size):
        raise ValueError(f"code indices outside [0, {codebook_size})")
    return np.bincount(flat, minlength=codebook_size)


def codebook_usage(indices: torch.Tensor | np.ndarray, codebook_size: int) -> float:
    """Fraction of the K codes that occur at least once in ``indices``."""
    return float((code_histogram(indices, codebook_size) > 0).mean())


def codebook_perplexity(indices: torch.Tensor | np.ndarray, codebook_size: int) -> float:
    """exp(entropy) of the code distribution: K when all codes are equally used, 1 for one code."""
    counts = code_histogram(indices, codebook_size).astype(np.float64)
    if counts.sum() == 0:
        return 0.0
    p = counts[counts > 0] / counts.sum()
    return float(np.exp(-(p * np.log(p)).sum()))
