"""Pool a modality's sequence of latents into one vector, keeping where each latent was.

Fusion's embedding heads and the alignment probe both map (B, N, D) latents to one vector per
sample. The mean of a per-position MLP (Deep Sets, Zaheer et al. 2017) cannot tell "a red
circle left of a blue square" from the same shapes the other way round, nor which colour goes
with which shape in a caption's bag of tokens: it forgets the positions. A learned bias per
relative position, added inside the MLP before its non-linearity, lets the average keep them
(the same as feeding each latent with a position embedding). Positions are bucketed relative
to the sequence length (``i * buckets // N``), so one table serves an image grid flattened row
by row, audio frames and text alike, at any length.

Measured on the demo's spoken scenes (BENCHMARKS.md "Fusion benchmark"): a probe on the same
frozen tokens reached audio->text R@5 0.31 with positions against 0.06 without.
"""

from __future__ import annotations

import torch
from torch import nn

POSITION_BUCKETS = 32  # relative positions a sequence is bucketed into


class PositionMLP(nn.Sequential):
    """(B, N, in_dim) -> (B, width): the mean over positions of ``Linear -> GELU -> Linear``,
    with a learned per-position bias before the GELU when ``positional``.

    A Sequential, so that the layers keep the names ``0`` and ``2`` of the position-free MLP
    that earlier checkpoints saved (``fusion.pool.<modality>.0.weight``).
    """

    def __init__(self, in_dim: int, width: int, positional: bool) -> None:
        super().__init__(nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, width))
        # Zeros: training starts from the position-free MLP and learns what position adds.
        self.position = (nn.Parameter(torch.zeros(POSITION_BUCKETS, width)) if positional
                         else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, activation, second = self[0], self[1], self[2]
        hidden = first(x)  # (B, N, width)
        if self.position is not None:
            n = x.shape[1]
            buckets = torch.arange(n, device=x.device) * POSITION_BUCKETS // n
            hidden = hidden + self.position[buckets]
        # The second layer is linear, so it commutes with the mean: applied once to the mean
        # instead of at every position it gives the same vector at a fraction of the cost
        # (width x width per sample, not per position; the demo's audio has 250 positions).
        return second(activation(hidden).mean(dim=1))
