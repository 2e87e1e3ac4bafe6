"""Residual vector quantization (SoundStream, Zeghidour et al. 2021; EnCodec; DAC).

Level 1 quantises the input, each further level quantises what the previous levels left over,
and the output is the sum of the levels' codes. With quantizer dropout the model is trained at
every depth, so one model serves many bitrates: at inference ``num_levels`` picks how many
levels (tokens per vector) to use.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmvq.quantizers.base import QuantizerOutput
from mmvq.quantizers.vq import VectorQuantizer


class ResidualVQ(nn.Module):
    """A stack of :class:`VectorQuantizer` levels, each quantising the previous residual.

    Parameters
    ----------
    codebook_size : int
        Codes per level K.
    dim : int
        Vector width D.
    l2_normalize : bool
        Cosine lookup in every level; rarely useful, since residuals are not unit vectors.
    num_levels : int
        Number of levels; indices have this many entries per vector.
    quantizer_dropout : float
        Fraction of training samples that use a random number of levels in 1..num_levels
        (the rest use all): 1.0 is SoundStream's quantizer dropout, DAC uses 0.5.
    **level_options
        Passed to every level (``ema``, ``kmeans_init``, ``code_dim``, ...).
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        l2_normalize: bool = False,
        *,
        num_levels: int = 4,
        quantizer_dropout: float = 0.0,
        **level_options: Any,
    ) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        self.codebook_size, self.dim, self.num_levels = codebook_size, dim, num_levels
        self.quantizer_dropout = quantizer_dropout
        self.levels = nn.ModuleList(
            VectorQuantizer(codebook_size, dim, l2_normalize, **level_options)
            for _ in range(num_levels)
        )

    def forward(
        self, z: torch.Tensor, mask: torch.Tensor | None = None, num_levels: int | None = None
    ) -> QuantizerOutput:
        """Quantise ``z`` (B, ..., D) with the first ``num_levels`` levels (default: all).

        Returns indices (B, ..., levels); the losses are summed over the levels.
        """
        n = self._check_levels(num_levels)
        with torch.autocast(device_type=z.device.type, enabled=False):
            residual = z.float()
            total = torch.zeros_like(residual)  # (B, ..., D)
            keep = self._dropout_keep(residual, n)  # (n, B, ...) bool, or None: all levels on
            indices, commit, codebook = [], 0.0, 0.0
            for i, level in enumerate(self.levels[:n]):
                level_mask = mask if keep is None else keep[i] if mask is None else keep[i] & mask
                out = level(residual, level_mask)
                step = out.quantized if keep is None else out.quantized * keep[i, ..., None]
                total = total + step
                # Not detached (as in DAC): level i's straight-through gradient cancels in the
                # next residual, so the encoder's gradient is that of the sum, the identity.
                residual = residual - out.quantized
                indices.append(out.indices)
                commit, codebook = commit + out.commit_loss, codebook + out.codebook_loss
            return QuantizerOutput(total, torch.stack(indices, dim=-1), commit, codebook)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Sum of the levels' codes: (..., levels) long -> (..., D); fewer levels = lower rate."""
        self._check_levels(indices.shape[-1])
        total = torch.zeros(*indices.shape[:-1], self.dim, device=indices.device)  # (..., D)
        for i, level in enumerate(self.levels[: indices.shape[-1]]):
            total = total + level.lookup(indices[..., i])  # same order as forward: same bits
        return total

    def _check_levels(self, num_levels: int | None) -> int:
        n = self.num_levels if num_levels is None else num_levels
        if not 1 <= n <= self.num_levels:
            raise ValueError(f"num_levels must be in 1..{self.num_levels}, got {n}")
        return n

    def _dropout_keep(self, z: torch.Tensor, n: int) -> torch.Tensor | None:
        """Which levels each sample uses in this training step: (n, B, ...) bool, or None."""
        if not (self.training and self.quantizer_dropout > 0):
            return None
        batch = z.shape[0]
        # Per sample (SoundStream): every rank runs all levels, so DDP's graph and the levels'
        # collectives stay the same on every rank whatever each one drew.
        used = torch.randint(1, n + 1, (batch,), device=z.device)  # (B,)
        dropped = torch.rand(batch, device=z.device) < self.quantizer_dropout
        used = torch.where(dropped, used, n)
        keep = torch.arange(n, device=z.device)[:, None] < used[None, :]  # (n, B)
        keep = keep.reshape(n, batch, *([1] * (z.ndim - 2)))  # (n, B, 1, ...)
        return keep.expand(n, *z.shape[:-1])  # (n, B, ...)
