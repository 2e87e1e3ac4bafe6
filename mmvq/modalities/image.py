"""Image encoder and decoder: a slim VQGAN-family conv net (Esser et al. 2021).

Pre-activation ResNet blocks with GroupNorm and SiLU, as in VQGAN, but spent where they are cheap:
a patchify stem and strided convs take the image down to the token grid, and the ResNet blocks
run on that grid. On one CPU thread a single 32-channel block at 64x64 costs more than this whole
codec, and the demo trains two workers on two cores; on a GPU, raise ``num_res_blocks`` and
``base_channels`` instead of changing the layout.

Shapes for the default config (64x64 input, channel_mult (1, 2, 2, 2), base 32)::

    (B, 3, 64, 64) -stem-> (B, 32, 32, 32) -down-> (B, 64, 16, 16) -down-> (B, 64, 8, 8)
    -blocks-> (B, 64, 8, 8) -out-> (B, latent, 8, 8)

and the mirror image in the decoder, with transposed convs for the upsampling.
"""

from __future__ import annotations

import torch
from torch import nn

from mmvq.config import ImageCodecConfig


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups (VQGAN uses 32), fewer when there are fewer channels."""
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0 and g <= channels)
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """Pre-activation ResNet block: (GN, SiLU, conv3x3) x 2 plus a (1x1 if needed) skip."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.act = nn.SiLU()
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, h, w) -> (B, C_out, h, w)
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        return self.skip(x) + h


def _down(in_ch: int, out_ch: int) -> nn.Sequential:
    """GN, SiLU, then a 4x4 stride-2 conv: halves the resolution."""
    return nn.Sequential(group_norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 4, 2, padding=1))


def _up(in_ch: int, out_ch: int) -> nn.Sequential:
    """GN, SiLU, then a 4x4 stride-2 transposed conv: doubles the resolution."""
    return nn.Sequential(
        group_norm(in_ch), nn.SiLU(), nn.ConvTranspose2d(in_ch, out_ch, 4, 2, padding=1)
    )


def _widths(cfg: ImageCodecConfig) -> list[int]:
    return [cfg.base_channels * m for m in cfg.channel_mult]


class ImageEncoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, latent_dim, H/f, W/f) with f = ``cfg.downsample``."""

    def __init__(self, cfg: ImageCodecConfig) -> None:
        super().__init__()
        ch = _widths(cfg)
        n = len(ch)
        # The stem is the first halving (a patchify conv, as in ViT/ConvNeXt stems); with a
        # single level there is nothing to halve and it is a plain 3x3 conv.
        self.stem = nn.Conv2d(3, ch[0], 4, 2, padding=1) if n > 1 else nn.Conv2d(3, ch[0], 3, 1, 1)
        # Halvings 2 .. n-1; level i has width ch[i].
        self.down = nn.Sequential(*[_down(ch[i - 1], ch[i]) for i in range(1, n - 1)])
        in_ch = ch[max(n - 2, 0)]  # width arriving at the token grid
        self.blocks = nn.Sequential(
            *[ResBlock(in_ch if i == 0 else ch[-1], ch[-1]) for i in range(cfg.num_res_blocks)]
        )
        last = ch[-1] if cfg.num_res_blocks > 0 else in_ch
        self.out = nn.Sequential(group_norm(last), nn.SiLU(), nn.Conv2d(last, cfg.latent_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)  # (B, ch0, H/2, W/2)
        h = self.down(h)  # (B, ch[n-2], H/f, W/f)
        h = self.blocks(h)  # (B, ch[n-1], H/f, W/f)
        return self.out(h)  # (B, latent, H/f, W/f)


class ImageDecoder(nn.Module):
    """(B, latent_dim, h, w) -> (B, 3, h*f, w*f), unbounded (the loss pulls it into [-1, 1])."""

    def __init__(self, cfg: ImageCodecConfig) -> None:
        super().__init__()
        ch = _widths(cfg)
        n = len(ch)
        out_ch = ch[max(n - 2, 0)]  # width leaving the token grid, mirrors the encoder
        self.inp = nn.Conv2d(cfg.latent_dim, ch[-1], 1)
        blocks = [ResBlock(ch[-1], ch[-1]) for _ in range(cfg.num_res_blocks - 1)]
        blocks.append(ResBlock(ch[-1], out_ch))
        self.blocks = nn.Sequential(*blocks) if cfg.num_res_blocks > 0 else nn.Identity()
        first = out_ch if cfg.num_res_blocks > 0 else ch[-1]
        ups = [_up(first if i == n - 2 else ch[i], ch[i - 1]) for i in range(n - 2, 0, -1)]
        self.up = nn.Sequential(*ups)
        head_in = ch[0] if n > 2 else first
        if n > 1:  # mirror of the patchify stem: the last doubling goes straight to pixels
            self.head = _up(head_in, 3)
        else:
            self.head = nn.Sequential(
                group_norm(head_in), nn.SiLU(), nn.Conv2d(head_in, 3, 3, padding=1)
            )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.inp(z)  # (B, ch[n-1], h, w)
        h = self.blocks(h)  # (B, ch[n-2], h, w)
        h = self.up(h)  # (B, ch0, H/2, W/2)
        return self.head(h)  # (B, 3, H, W)
