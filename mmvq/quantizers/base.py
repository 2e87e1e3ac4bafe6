"""What every quantizer returns, and the few small pieces all families share."""

from __future__ import annotations

from typing import NamedTuple

import torch
from einops import rearrange


class QuantizerOutput(NamedTuple):
    """What a quantizer returns.

    quantized : (..., D) float32, the code vectors with a straight-through gradient to the input;
        its value is exactly ``lookup(indices)`` (taken before this step's codebook update)
    indices : (...) long, the chosen code per vector; (..., levels) for residual VQ
    commit_loss : scalar, ||z - sg(q)||^2 averaged over the unmasked vectors (0 for FSQ)
    codebook_loss : scalar, the loss that shapes the codebook: ||sg(z) - q||^2 for a learned
        codebook, 0 for EMA codebooks and FSQ, the weighted entropy loss for LFQ
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    commit_loss: torch.Tensor
    codebook_loss: torch.Tensor


def vector_weights(mask: torch.Tensor | None, num_vectors: int) -> torch.Tensor | None:
    """A (...) bool/float mask as (N,) float weights, or None when every vector counts."""
    if mask is None:
        return None
    weights = rearrange(mask, "... -> (...)").float()  # (N,)
    if weights.shape[0] != num_vectors:
        raise ValueError(f"mask has {weights.shape[0]} entries for {num_vectors} vectors")
    return weights


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-vector ``values`` (N,) weighted by ``weights`` (all 1 if None); 0 if none count."""
    if weights is None:
        return values.mean()
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Value exactly ``q``, gradient identity to ``x`` (VQ-VAE, van den Oord et al. 2017).

    ``x - x.detach()`` is exactly 0 in IEEE arithmetic, so the result equals ``q`` bit for bit,
    which keeps ``lookup(indices) == quantized``; ``x + (q - x).detach()`` would not.
    """
    return q.detach() + (x - x.detach())


def zero_loss(like: torch.Tensor) -> torch.Tensor:
    """A scalar 0 on ``like``'s device, for quantizers without that loss."""
    return like.new_zeros(())
