"""Reconstruction losses as small pure functions (in the style of taming's ``vqperceptual.py``).

Every loss takes a per-sample ``mask`` (bool, (B,)): a sample without the modality contributes
nothing. Masking multiplies instead of indexing, so every parameter stays in the autograd graph
with a zero gradient, as DistributedDataParallel requires.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchaudio


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (B,) over the samples where ``mask`` (B,) is true; 0 if none is."""
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def l1_per_sample(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per sample: (B, ...) x2 -> (B,)."""
    return (x - y).abs().flatten(1).mean(dim=1)


def masked_l1(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 between ``x`` and ``y`` (B, ...) averaged over the samples in ``mask`` (B,)."""
    return masked_mean(l1_per_sample(x, y), mask)


@functools.lru_cache(maxsize=None)
def mel_transform(
    sample_rate: int, n_fft: int, device: torch.device
) -> torchaudio.transforms.MelSpectrogram:
    """The magnitude mel filterbank for one STFT size, built once per (rate, n_fft, device).

    Built lazily and cached here rather than registered in the model, so checkpoints hold no
    filterbank buffers and every process builds its own on its own device.
    """
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate,
        n_fft=n_fft,
        hop_length=n_fft // 4,
        n_mels=max(n_fft // 8, 8),  # ~constant mel resolution per window, as in DAC's settings
        power=1.0,  # magnitude, not power: log-magnitude differences are better scaled
    ).to(device)


def log_mel_distance(
    ref: torch.Tensor, est: torch.Tensor, sample_rate: int, n_ffts: Sequence[int]
) -> torch.Tensor:
    """Multi-resolution log-mel L1 per sample (Engel et al. 2020; DAC's mel loss).

    Parameters
    ----------
    ref, est : (B, T) waveforms
    sample_rate : int
    n_ffts : STFT sizes; the distance is averaged over them.

    Returns
    -------
    (B,) tensor.
    """
    batch = ref.shape[0]
    # STFTs are not supported in reduced precision; one STFT over [ref; est] halves the calls.
    with torch.autocast(device_type=ref.device.type, enabled=False):
        both = torch.cat([ref, est]).float()  # (2B, T)
        total = torch.zeros(batch, device=ref.device)
        for n_fft in n_ffts:
            mel = mel_transform(sample_rate, int(n_fft), both.device)(both)  # (2B, mels, frames)
            log_mel = mel.clamp_min(1e-5).log()
            total = total + l1_per_sample(log_mel[:batch], log_mel[batch:])
        return total / len(n_ffts)


def masked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Token cross-entropy averaged over real tokens.

    Parameters
    ----------
    logits : (B, L, V)
    targets : (B, L) long
    lengths : (B,) long; positions ``>= lengths[b]`` are padding and are ignored
    mask : (B,) bool; samples without text are ignored
    """
    ce = F.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")  # (B, L)
    positions = torch.arange(targets.shape[1], device=targets.device)  # (L,)
    valid = (positions[None, :] < lengths[:, None]) & mask[:, None]  # (B, L)
    weights = valid.to(ce.dtype)
    return (ce * weights).sum() / weights.sum().clamp_min(1.0)
