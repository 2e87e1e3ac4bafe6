"""Vector quantization with a straight-through estimator (VQ-VAE, van den Oord et al. 2017).

Each latent vector is replaced by its nearest codebook entry. The decoder sees the code's value;
the encoder gets the decoder's gradient unchanged (straight-through), the codebook is pulled to
the encoder outputs by ``codebook_loss`` and the encoder is held near its code by ``commit_loss``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mmvq.losses import masked_mean


class QuantizerOutput(NamedTuple):
    """What a quantizer returns.

    quantized : (..., D) float32, the code vectors with straight-through gradient to the input
    indices : (...) long, the chosen code per vector
    commit_loss : scalar, ||z - sg(q)||^2 averaged over the unmasked vectors
    codebook_loss : scalar, ||sg(z) - q||^2 averaged over the unmasked vectors
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    commit_loss: torch.Tensor
    codebook_loss: torch.Tensor


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, chunk_size: int = 8192) -> torch.Tensor:
    """Index of the nearest codebook row (squared L2) for every row of ``z``.

    Rows are processed in chunks so that memory is ``chunk_size x K``, never ``N x K``: a
    tokenize job may quantise millions of vectors at once.

    Parameters
    ----------
    z : (N, D) float tensor
    codebook : (K, D) float tensor
    chunk_size : int
        Rows per distance matrix.

    Returns
    -------
    (N,) long tensor of code indices.
    """
    code_sq = codebook.pow(2).sum(dim=1)  # (K,)
    out = []
    for chunk in z.split(chunk_size):  # (n, D) with n <= chunk_size
        # ||z - c||^2 = ||z||^2 - 2 z.c + ||c||^2; ||z||^2 is constant per row, so it is dropped.
        dist = code_sq[None, :] - 2.0 * chunk @ codebook.t()  # (n, K)
        out.append(dist.argmin(dim=1))
    if not out:
        return torch.zeros(0, dtype=torch.long, device=z.device)
    return torch.cat(out)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with a learned codebook.

    Parameters
    ----------
    codebook_size : int
        Number of codes K.
    dim : int
        Code vector width D.
    l2_normalize : bool
        Normalise latents and codes to the unit sphere before the lookup (cosine-similarity
        codes, ViT-VQGAN). The decoder then always sees unit vectors.
    chunk_size : int
        Rows per distance matrix in the nearest-neighbour search.
    """

    def __init__(
        self, codebook_size: int, dim: int, l2_normalize: bool = True, chunk_size: int = 8192
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.dim = dim
        self.l2_normalize = l2_normalize
        self.chunk_size = chunk_size
        self.build_codebook()

    def build_codebook(self) -> None:
        """Create the codebook's parameters (subclasses reparameterise it here)."""
        self.codebook = nn.Embedding(self.codebook_size, self.dim)
        if self.l2_normalize:
            # Random directions with norm ~1, so that an Adam step of ~lr per coordinate turns a
            # code by a small, lr-proportional angle (a tiny norm would make every step huge).
            nn.init.normal_(self.codebook.weight, std=self.dim**-0.5)
        else:
            bound = 1.0 / self.codebook_size  # VQ-VAE's init
            nn.init.uniform_(self.codebook.weight, -bound, bound)

    def raw_codes(self) -> torch.Tensor:
        """The (K, D) code vectors before normalisation."""
        return self.codebook.weight

    def _codes(self) -> torch.Tensor:
        codes = self.raw_codes().float()  # (K, D)
        return F.normalize(codes, dim=-1) if self.l2_normalize else codes

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> QuantizerOutput:
        """Quantise ``z`` of shape (..., D).

        Parameters
        ----------
        z : (..., D) tensor
            Encoder outputs; any leading shape.
        mask : (...) bool tensor, optional
            Which vectors count in the losses (e.g. samples that have this modality).
        """
        # Quantisation is done in fp32 whatever the surrounding autocast: distances between
        # nearby unit vectors lose their order in bf16.
        with torch.autocast(device_type=z.device.type, enabled=False):
            lead = z.shape[:-1]
            flat = rearrange(z.float(), "... d -> (...) d")  # (N, D)
            if self.l2_normalize:
                flat = F.normalize(flat, dim=-1)
            codes = self._codes()  # (K, D)
            indices = nearest_code(flat.detach(), codes.detach(), self.chunk_size)  # (N,)
            q = codes[indices]  # (N, D), differentiable w.r.t. the codebook
            # Per-vector squared errors (N,); the same value, with the gradient to z or to q.
            commit = (flat - q.detach()).pow(2).mean(dim=1)
            codebook = (flat.detach() - q).pow(2).mean(dim=1)
            if mask is None:
                commit, codebook = commit.mean(), codebook.mean()
            else:
                flat_mask = mask.reshape(-1)  # (N,)
                commit, codebook = masked_mean(commit, flat_mask), masked_mean(codebook, flat_mask)
            # Straight-through: the forward value is exactly q (x - x == 0 in IEEE arithmetic,
            # so lookup(indices) == quantized bit for bit), the gradient w.r.t. z is identity.
            quantized = q.detach() + (flat - flat.detach())
            quantized = quantized.reshape(*lead, self.dim)  # (..., D)
            return QuantizerOutput(quantized, indices.reshape(lead), commit, codebook)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for ``indices`` of any shape: (...) long -> (..., D) float32."""
        return F.embedding(indices, self._codes())
