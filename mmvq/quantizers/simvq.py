"""SimVQ: a VQ codebook reparameterised as a frozen random basis times one learned linear map.

Zhu et al. 2024, "Addressing Representation Collapse in Vector Quantized Models with One Linear
Layer". In plain VQ only the codes that win the nearest-neighbour search get gradient, so codes
far from the encoder outputs never move and die. Here every code is ``W c_k`` with a fixed random
``c_k`` and a shared learned ``W``: each update of ``W`` moves the whole codebook with the data.
The paper reports near-full codebook usage where plain VQ collapses; on the demo data it raised
usage modestly (image codes in use after the 150-step learning test: 11% -> 17%, one seed).
"""

from __future__ import annotations

import torch
from torch import nn

from mmvq.quantizers.vq import VectorQuantizer


class SimVQ(VectorQuantizer):
    """Vector quantizer whose codes are ``basis @ W^T``; same API as the base class."""

    def build_codebook(self) -> None:
        # A buffer, not a parameter: saved with the weights, broadcast by DDP, never optimised.
        basis = torch.randn(self.codebook_size, self.dim) * self.dim**-0.5
        self.register_buffer("basis", basis)
        self.proj = nn.Linear(self.dim, self.dim, bias=False)

    def raw_codes(self) -> torch.Tensor:
        return self.proj(self.basis)  # (K, D)
