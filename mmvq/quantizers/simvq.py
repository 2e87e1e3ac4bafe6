"""SimVQ: a VQ codebook reparameterised as a frozen random basis times one learned linear map.

Zhu et al. 2024, "Addressing Representation Collapse in Vector Quantized Models with One Linear
Layer". In plain VQ only the codes that win the nearest-neighbour search get gradient, so codes
far from the encoder outputs never move and die. Here every code is ``W c_k`` with a fixed random
``c_k`` and a shared learned ``W``: each update of ``W`` moves the whole codebook with the data.
The paper reports near-full codebook usage where plain VQ collapses; on the demo data it raised
usage modestly (image codes in use after the 150-step learning test: 11% -> 17%, one seed).

EMA updates, k-means init and restarts write individual codes, which this parameterisation has
not got, so SimVQ takes only the lookup options (cosine, factorised, rotation trick).
"""

from __future__ import annotations

import torch
from torch import nn

from mmvq.quantizers.vq import VectorQuantizer


class SimVQ(VectorQuantizer):
    """Vector quantizer whose codes are ``basis @ W^T``; same API as the base class.

    Parameters
    ----------
    codebook_size, dim, l2_normalize, code_dim, rotation_trick, max_block_elements
        As for :class:`VectorQuantizer`; ``ema``, ``kmeans_init`` and ``restart_threshold`` are
        refused (TypeError).
    """

    writable_codes = False  # a code is W c_k: no row of its own to overwrite

    def build_codebook(self) -> None:
        # A buffer, not a parameter: saved with the weights, broadcast by DDP, never optimised.
        basis = torch.randn(self.codebook_size, self.code_dim) * self.code_dim**-0.5
        self.register_buffer("basis", basis)
        self.proj = nn.Linear(self.code_dim, self.code_dim, bias=False)

    def raw_codes(self) -> torch.Tensor:
        return self.proj(self.basis)  # (K, d)
