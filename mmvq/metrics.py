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


def _gaussian_window(size: int, sigma: float, channels: int, device: torch.device) -> torch.Tensor:
    """(C, 1, size, size) normalised Gaussian kernel for a depthwise conv."""
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = torch.outer(g, g)  # (size, size)
    return kernel.expand(channels, 1, size, size).float()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per sample (Wang et al. 2004): (B, C, H, W) x2 -> (B,).

    Gaussian 11x11 window with sigma 1.5, K1 = 0.01, K2 = 0.03, population statistics, mean over
    channels and the valid (unpadded) positions: the settings of the paper and of
    ``skimage.metrics.structural_similarity(gaussian_weights=True, use_sample_covariance=False)``.
    """
    x, y = x.float(), y.float()
    channels = x.shape[1]
    kernel = _gaussian_window(window, sigma, channels, x.device)

    def blur(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H-w+1, W-w+1)
        return torch.nn.functional.conv2d(t, kernel, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(dim=1)


def normalized_mutual_information(labels_a: np.ndarray, labels_b: np.ndarray) -> float:
    """NMI of two labelings of the same items, arithmetic-mean normalised, in [0, 1].

    I(A; B) / ((H(A) + H(B)) / 2) from the joint histogram (Strehl and Ghosh 2002); 1 when one
    labeling determines the other, 0 when they are independent. Two constant labelings give 1.
    """
    a = np.asarray(labels_a).reshape(-1)
    b = np.asarray(labels_b).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"labelings differ in size: {a.shape} vs {b.shape}")
    _, a_ids = np.unique(a, return_inverse=True)
    _, b_ids = np.unique(b, return_inverse=True)
    joint = np.zeros((a_ids.max() + 1, b_ids.max() + 1), np.float64)
    np.add.at(joint, (a_ids, b_ids), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(axis=1), joint.sum(axis=0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    ha, hb = float(-(pa * np.log(pa)).sum()), float(-(pb * np.log(pb)).sum())
    if ha == 0.0 and hb == 0.0:
        return 1.0
    return max(0.0, mi / ((ha + hb) / 2))


def dominant_codes(codes: torch.Tensor | np.ndarray,
                   real: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """Each sample's most frequent code: (B, ...) -> (B,), ties to the smallest code.

    ``real`` (B, ...) bool, the shape of ``codes``, marks the positions that hold the sample
    (a caption's ids before ``text_len``, audio frames before ``audio_len``); the rest is
    padding, whose codes say how long the sample is, not what it is. A row without a real
    position falls back to all of its positions. None: every position counts.
    """
    if len(codes) == 0:  # a batch with no sample to label (reshape cannot infer -1 at 0)
        return np.zeros(0, np.int64)
    flat = np.asarray(torch.as_tensor(codes).detach().cpu()).reshape(len(codes), -1)
    keep = (np.ones(flat.shape, bool) if real is None
            else np.asarray(torch.as_tensor(real).detach().cpu()).reshape(flat.shape))
    labels = []
    for row, mask in zip(flat, keep, strict=True):
        values = row[mask] if mask.any() else row
        labels.append(np.bincount(values - values.min()).argmax() + values.min())
    return np.array(labels)


def cross_modal_nmi(codes_a: torch.Tensor | np.ndarray, codes_b: torch.Tensor | np.ndarray,
                    real_a: torch.Tensor | np.ndarray | None = None,
                    real_b: torch.Tensor | np.ndarray | None = None) -> float:
    """NMI between two modalities' clusterings of the same samples.

    Each sample is labelled by its dominant code over its real positions in each modality
    (``dominant_codes``; ``real_a``/``real_b`` as its ``real``); the NMI of the two labelings
    is high when one modality's tokens predict the other's, as aligned tokens should, and near
    0 for independent codebooks.
    """
    if len(codes_a) != len(codes_b):
        raise ValueError(f"different sample counts: {len(codes_a)} vs {len(codes_b)}")
    return normalized_mutual_information(dominant_codes(codes_a, real_a),
                                         dominant_codes(codes_b, real_b))


def retrieval_ranks(queries: torch.Tensor, targets: torch.Tensor,
                    groups: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
    """0-based rank of each query's best match among the targets, by cosine similarity.

    ``queries`` and ``targets`` are (B, D) embeddings of the same B samples in two modalities.
    Query i's matches are target i and, with ``groups`` (B,) ints, every target j of the same
    group (e.g. samples whose captions are identical, which no embedding could tell apart).
    The rank is how many non-matching targets score strictly higher than the best match.
    """
    q = torch.nn.functional.normalize(queries.float(), dim=1)
    t = torch.nn.functional.normalize(targets.float(), dim=1)
    sim = q @ t.T  # (B, B)
    if groups is None:
        match = torch.eye(len(q), dtype=torch.bool, device=sim.device)
    else:
        g = torch.as_tensor(np.asarray(groups), device=sim.device)
        match = g[:, None] == g[None, :]  # (B, B), the diagonal included
    best = sim.masked_fill(~match, -torch.inf).max(dim=1).values  # (B,)
    return ((sim > best[:, None]) & ~match).sum(dim=1)  # (B,)


def retrieval_recall(queries: torch.Tensor, targets: torch.Tensor,
                     ks: Sequence[int] = (1, 5),
                     groups: torch.Tensor | np.ndarray | None = None) -> dict[int, float]:
    """Cross-modal retrieval recall: ``{k: fraction of queries with a match in the top k}``.

    Matches as in :func:`retrieval_ranks`: target i for query i, and with ``groups`` every
    target of the query's group.
    """
    rank = retrieval_ranks(queries, targets, groups)
    return {k: float((rank < k).float().mean()) for k in ks}


def chance_recall(groups: np.ndarray, k: int) -> float:
    """Expected recall@k of a random ranking when query i's matches are its group's members.

    A query whose group has m of the N targets misses the top k with probability
    C(N - m, k) / C(N, k); the result is the mean hit probability over the queries.
    """
    groups = np.asarray(groups)
    n = len(groups)
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    m = counts[inverse]  # (N,) matches per query
    miss = np.ones(n)
    for i in range(min(k, n)):  # prod_{i<k} (N - m - i) / (N - i), without big binomials
        miss *= np.clip(n - m - i, 0, None) / (n - i)
    return float(np.mean(1.0 - miss))
