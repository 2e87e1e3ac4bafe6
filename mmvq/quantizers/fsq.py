"""Finite scalar quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made
Simple").

Project to a few dimensions, bound each to (-1, 1) and round it to one of ``L_i`` levels: the
implicit codebook is the grid of prod(L_i) points. Nothing to learn in the quantizer, no
auxiliary losses and no codebook collapse; the paper recommends (8, 5, 5, 5) for ~2^10 codes.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from mmvq.quantizers.base import QuantizerOutput, straight_through, zero_loss

BOUND_EPS = 1e-3  # keeps tanh's range strictly inside the outermost levels (paper's code)


class FSQ(nn.Module):
    """Finite scalar quantizer.

    Parameters
    ----------
    dim : int
        Width D of the input and output vectors; projected to ``len(levels)`` if different.
    levels : tuple of int
        Levels per dimension (each >= 2); the codebook size is their product.
    """

    def __init__(self, dim: int, levels: tuple[int, ...] = (8, 5, 5, 5)) -> None:
        super().__init__()
        if not levels or any(n < 2 for n in levels):
            raise ValueError(f"every FSQ level must be >= 2, got {levels}")
        self.dim, self.levels = dim, tuple(levels)
        self.codebook_size = math.prod(levels)
        width = len(levels)
        self.project_in = nn.Linear(dim, width) if width != dim else nn.Identity()
        self.project_out = nn.Linear(width, dim) if width != dim else nn.Identity()
        basis = [math.prod(levels[:i]) for i in range(width)]  # mixed radix, first dim fastest
        self.register_buffer("_levels", torch.tensor(levels), persistent=False)
        self.register_buffer("_basis", torch.tensor(basis), persistent=False)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> QuantizerOutput:
        """Quantise ``z`` (..., D); ``mask`` is accepted for API symmetry (FSQ has no losses)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            lead = z.shape[:-1]
            flat = rearrange(z.float(), "... d -> (...) d")  # (N, D)
            bounded = self._bound(self.project_in(flat))  # (N, w)
            rounded = straight_through(bounded, torch.round(bounded))  # (N, w), integer values
            codes = rounded / (self._levels // 2).float()  # (N, w) grid points in [-1, 1]
            indices = self.indices_from_codes(codes.detach())  # (N,)
            quantized = self.project_out(codes).reshape(*lead, self.dim)  # (..., D)
            zero = zero_loss(quantized)
            return QuantizerOutput(quantized, indices.reshape(lead), zero, zero)

    def _bound(self, x: torch.Tensor) -> torch.Tensor:
        """Squash each dim to (-L/2, L/2) so rounding gives exactly L values (paper, App. A.1)."""
        levels = self._levels.float()
        half_l = (levels - 1) * (1 - BOUND_EPS) / 2
        offset = torch.where(self._levels % 2 == 1, 0.0, 0.5)  # even L: levels at half-integers
        shift = torch.atanh(offset / half_l)  # so that x = 0 maps to 0
        return torch.tanh(x + shift) * half_l - offset

    def indices_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Grid points (..., len(levels)) -> (...) long indices, mixed radix."""
        half = self._levels // 2
        digits = torch.round(codes * half).long() + half  # (..., w) in 0..L-1
        return (digits * self._basis).sum(dim=-1)

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Grid points in [-1, 1]: (...) long -> (..., len(levels)) float32."""
        digits = (indices[..., None] // self._basis) % self._levels  # (..., w)
        half = (self._levels // 2).float()
        return (digits - self._levels // 2).float() / half

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for ``indices``: (...) long -> (..., D) float32."""
        with torch.autocast(device_type=indices.device.type, enabled=False):
            flat = rearrange(indices, "... -> (...)")  # (N,)
            q = self.project_out(self.codes_from_indices(flat))  # (N, D)
            return q.reshape(*indices.shape, self.dim)  # (..., D)
