"""Lookup-free quantization (Yu et al. 2023, MAGVIT-v2, "Language Model Beats Diffusion").

Project to ``b = log2(K)`` dimensions and keep only each one's sign: the code is a point of
{-1, 1}^b and its index the bits read as a binary number. There is no codebook to search, so K
can be huge (MAGVIT-v2: 2^18). An entropy loss keeps the codes in use: each vector should be
confidently assigned (low per-sample entropy) while the batch as a whole uses many codes (high
codebook entropy).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mmvq.quantizers.base import (
    QuantizerOutput,
    straight_through,
    vector_weights,
    weighted_mean,
    zero_loss,
)
from mmvq.quantizers.distance import DEFAULT_BLOCK_ELEMENTS


class LFQ(nn.Module):
    """Lookup-free quantizer with MAGVIT-v2's entropy loss.

    Parameters
    ----------
    codebook_size : int
        A power of two, K = 2^b.
    dim : int
        Width D of the input and output vectors; projected to b if different.
    entropy_weight : float
        Weight of the entropy loss, returned as ``codebook_loss`` (MAGVIT-v2: 0.1).
    temperature : float
        Of the soft assignment softmax(-||x - c||^2 / temperature) the entropies are taken of.
    max_block_elements : int
        Largest (vectors x codes) block of the codebook-entropy computation (memory bound).
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        entropy_weight: float = 0.1,
        temperature: float = 0.01,
        max_block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    ) -> None:
        super().__init__()
        bits = round(math.log2(codebook_size))
        if codebook_size < 2 or 2**bits != codebook_size:
            raise ValueError(f"LFQ needs a power-of-two codebook_size, got {codebook_size}")
        self.codebook_size, self.dim, self.bits = codebook_size, dim, bits
        self.entropy_weight, self.temperature = entropy_weight, temperature
        self.max_block_elements = max_block_elements
        self.project_in = nn.Linear(dim, bits) if bits != dim else nn.Identity()
        self.project_out = nn.Linear(bits, dim) if bits != dim else nn.Identity()
        self.register_buffer("_powers", 2 ** torch.arange(bits), persistent=False)  # (b,)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> QuantizerOutput:
        """Quantise ``z`` (..., D); ``mask`` (...) selects the vectors the losses count."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            lead = z.shape[:-1]
            flat = rearrange(z.float(), "... d -> (...) d")  # (N, D)
            weights = vector_weights(mask, flat.shape[0])  # (N,) or None
            x = self.project_in(flat)  # (N, b)
            q = torch.where(x.detach() > 0, 1.0, -1.0)  # (N, b) the sign code
            indices = self.indices_from_codes(q)  # (N,)
            commit = weighted_mean((x - q).pow(2).mean(dim=1), weights)
            entropy = self.entropy_loss(x, weights) if self.entropy_weight else zero_loss(x)
            quantized = self.project_out(straight_through(x, q)).reshape(*lead, self.dim)
            return QuantizerOutput(
                quantized, indices.reshape(lead), commit, self.entropy_weight * entropy
            )

    def entropy_loss(self, x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Mean per-sample entropy minus codebook entropy (MAGVIT-v2 eq. 5), in nats.

        The soft assignment softmax_c(-||x - c||^2 / t) over c in {-1, 1}^b factorises over
        bits, p(bit_i = 1) = sigmoid(4 x_i / t): the per-sample entropy is a sum of b binary
        entropies. The batch-averaged distribution does not factorise; it is accumulated over
        blocks of vectors, each recomputed in the backward pass, so memory stays bounded.
        """
        logits = 4.0 * x / self.temperature  # (N, b) log-odds of each bit being 1
        p = torch.sigmoid(logits)
        bit_entropy = p * F.softplus(-logits) + (1 - p) * F.softplus(logits)  # (N, b)
        per_sample = weighted_mean(bit_entropy.sum(dim=-1), weights)
        w = x.new_ones(x.shape[0]) if weights is None else weights  # (N,)
        avg = self._average_code_distribution(logits, w) / w.sum().clamp_min(1.0)  # (K,)
        codebook = -(avg * avg.clamp_min(1e-10).log()).sum()
        return per_sample - codebook

    def _average_code_distribution(self, logits: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Weighted sum over vectors of their (K,) code distributions."""
        code_bits = self.codes_from_indices(
            torch.arange(self.codebook_size, device=logits.device)
        ).gt(0).float()  # (K, b) in {0, 1}
        rows = max(1, self.max_block_elements // self.codebook_size)
        return BlockedCodeDistribution.apply(logits, w, code_bits, rows)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for ``indices``: (...) long -> (..., D) float32."""
        with torch.autocast(device_type=indices.device.type, enabled=False):
            flat = rearrange(indices, "... -> (...)")  # (N,)
            q = self.project_out(self.codes_from_indices(flat))  # (N, D)
            return q.reshape(*indices.shape, self.dim)  # (..., D)

    def indices_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Sign codes (..., b) in {-1, 1} -> (...) long; bit i is dimension i."""
        return ((codes > 0).long() * self._powers).sum(dim=-1)

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(...) long -> sign codes (..., b) float32 in {-1, 1}."""
        return ((indices[..., None] // self._powers) % 2).float() * 2 - 1


def _block_probs(logits: torch.Tensor, code_bits: torch.Tensor) -> torch.Tensor:
    # log p(c | x) = sum_i [c_i = 1] l_i - softplus(l_i), for every code c: (n, K).
    return (logits @ code_bits.t() - F.softplus(logits).sum(dim=-1, keepdim=True)).exp()


class BlockedCodeDistribution(torch.autograd.Function):
    """``w @ p(c | x)``, (N, b) logits -> (K,), over blocks of ``rows`` vectors.

    The backward pass recomputes each block's (rows, K) probabilities instead of keeping all N x K
    of them from the forward pass, so memory stays O(rows x K) at any N.
    """

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, w: torch.Tensor, code_bits: torch.Tensor, rows: int
    ) -> torch.Tensor:
        ctx.save_for_backward(logits, w, code_bits)
        ctx.rows = rows
        total = logits.new_zeros(code_bits.shape[0])  # (K,)
        for block, wb in zip(logits.split(rows), w.split(rows), strict=True):
            total += wb @ _block_probs(block, code_bits)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        logits, w, code_bits = ctx.saved_tensors
        grads = []
        for block, wb in zip(logits.split(ctx.rows), w.split(ctx.rows), strict=True):
            p = _block_probs(block, code_bits) * grad  # (n, K): p_jk g_k
            # d log p_jk / d l_ji = c_ki - sigmoid(l_ji)
            g = p @ code_bits - p.sum(dim=1, keepdim=True) * torch.sigmoid(block)  # (n, b)
            grads.append(wb[:, None] * g)
        return torch.cat(grads), None, None, None
