"""Image encoders and decoders of the VQGAN family (Esser et al. 2021), two architectures.

``ImageCodecConfig.architecture`` picks one (registry :data:`IMAGE_CODECS`):

- ``"tiny"`` (:class:`ImageEncoder`, :class:`ImageDecoder`): the CPU demo codec below.
- ``"vqgan"`` (:class:`VQGANEncoder`, :class:`VQGANDecoder`): taming-transformers' encoder and
  decoder; the ``base`` preset is its ImageNet f16 model.

Tiny codec. Pre-activation ResNet blocks with GroupNorm and SiLU, as in VQGAN, but spent where
they are cheap: a patchify stem and strided convs take the image down to the token grid, and the
ResNet blocks run on that grid. On one CPU thread a single 32-channel block at 64x64 costs more
than this whole codec, and the demo trains two workers on two cores; on a GPU, use the ``vqgan``
architecture, or raise ``num_res_blocks`` and ``base_channels``.

Shapes for the default config (64x64 input, channel_mult (1, 2, 2, 2), base 32)::

    (B, 3, 64, 64) -stem-> (B, 32, 32, 32) -down-> (B, 64, 16, 16) -down-> (B, 64, 8, 8)
    -blocks-> (B, 64, 8, 8) -out-> (B, latent, 8, 8)

and the mirror image in the decoder, with transposed convs for the upsampling.

VQGAN codec (taming's ``diffusionmodules/model.py``): ResNet blocks at every resolution,
self-attention after the blocks of the levels in ``attn_resolutions``, a middle block (ResNet,
attention, ResNet) at the lowest resolution, and 1x1 "quant convs" to and from the code width.
For the ``base`` preset (256 px, ch 128, ch_mult (1, 1, 2, 2, 4), 2 blocks, attention at 16)::

    (B, 3, 256, 256) -conv_in-> (B, 128, 256, 256) -level 0..4, 4 halvings->
    (B, 512, 16, 16) -mid-> -norm, SiLU, conv_out-> (B, 256, 16, 16) -quant_conv-> (B, D, 16, 16)

and the decoder mirrors it with 3 ResNet blocks per level and nearest-neighbour upsampling.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
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

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the layer that writes the pixels (for VQGAN's adaptive GAN weight)."""
        return self.head[-1].weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.inp(z)  # (B, ch[n-1], h, w)
        h = self.blocks(h)  # (B, ch[n-2], h, w)
        h = self.up(h)  # (B, ch0, H/2, W/2)
        return self.head(h)  # (B, 3, H, W)


# -- VQGAN (taming-transformers) -----------------------------------------------------------------


class AttnBlock(nn.Module):
    """Single-head self-attention over the positions of a feature map, plus a residual.

    As taming's ``AttnBlock`` (scale C^-1/2), with q, k, v in one 1x1 conv and the attention
    through ``scaled_dot_product_attention``, which never builds the (h w) x (h w) matrix when a
    fused kernel exists.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (B, C, h, w)
        qkv = self.qkv(self.norm(x))  # (B, 3C, h, w)
        q, k, v = rearrange(qkv, "b (three c) h w -> three b (h w) c", three=3)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h*w, C)
        out = rearrange(out, "b (h w) c -> b c h w", h=x.shape[2])
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve the resolution: pad right and bottom by one, then a 3x3 stride-2 conv (taming)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour, then a 3x3 conv (no checkerboard artefacts)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(in_ch: int, out_ch: int, num_blocks: int, attention: bool) -> list[nn.Module]:
    """``num_blocks`` ResNet blocks at one resolution, each followed by attention if asked."""
    layers: list[nn.Module] = []
    for i in range(num_blocks):
        layers.append(ResBlock(in_ch if i == 0 else out_ch, out_ch))
        if attention:
            layers.append(AttnBlock(out_ch))
    return layers


def _mid_block(channels: int) -> nn.Sequential:
    """ResNet, attention, ResNet at the lowest resolution (global mixing in every config)."""
    return nn.Sequential(
        ResBlock(channels, channels), AttnBlock(channels), ResBlock(channels, channels)
    )


class VQGANEncoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, latent_dim, H/f, W/f); taming's ``Encoder`` + quant_conv."""

    def __init__(self, cfg: ImageCodecConfig) -> None:
        super().__init__()
        ch = _widths(cfg)
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        levels, in_ch, res = [], ch[0], cfg.image_size
        for i, out_ch in enumerate(ch):
            layers = _level(in_ch, out_ch, cfg.num_res_blocks, res in cfg.attn_resolutions)
            in_ch = out_ch if cfg.num_res_blocks else in_ch  # no blocks: the width stays
            if i < len(ch) - 1:
                layers.append(Downsample(in_ch))
                res //= 2
            levels.append(nn.Sequential(*layers))
        self.down = nn.Sequential(*levels)
        self.mid = _mid_block(in_ch)
        self.norm_out = group_norm(in_ch)
        self.conv_out = nn.Conv2d(in_ch, cfg.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.latent_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch0, H, W)
        h = self.mid(self.down(h))  # (B, ch[-1], H/f, W/f)
        h = self.conv_out(F.silu(self.norm_out(h)))  # (B, z_channels, H/f, W/f)
        return self.quant_conv(h)  # (B, latent, H/f, W/f)


class VQGANDecoder(nn.Module):
    """(B, latent_dim, h, w) -> (B, 3, h*f, w*f); post_quant_conv + taming's ``Decoder``."""

    def __init__(self, cfg: ImageCodecConfig) -> None:
        super().__init__()
        ch = _widths(cfg)
        in_ch, res = ch[-1], cfg.grid[0]
        self.post_quant_conv = nn.Conv2d(cfg.latent_dim, cfg.z_channels, 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, in_ch, 3, padding=1)
        self.mid = _mid_block(in_ch)
        levels = []
        for i in reversed(range(len(ch))):  # lowest resolution first, in execution order
            layers = _level(in_ch, ch[i], cfg.num_res_blocks + 1, res in cfg.attn_resolutions)
            in_ch = ch[i]
            if i > 0:
                layers.append(Upsample(in_ch))
                res *= 2
            levels.append(nn.Sequential(*layers))
        self.up = nn.Sequential(*levels)
        self.norm_out = group_norm(in_ch)
        self.conv_out = nn.Conv2d(in_ch, 3, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the layer that writes the pixels (for VQGAN's adaptive GAN weight)."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(self.post_quant_conv(z))  # (B, ch[-1], h, w)
        h = self.up(self.mid(h))  # (B, ch0, H, W)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)


# architecture name -> (encoder class, decoder class)
IMAGE_CODECS: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "tiny": (ImageEncoder, ImageDecoder),
    "vqgan": (VQGANEncoder, VQGANDecoder),
}


def build_image_codec(cfg: ImageCodecConfig) -> tuple[nn.Module, nn.Module]:
    """The encoder and decoder of ``cfg.architecture``.

    Returns
    -------
    (encoder, decoder): encoder maps (B, 3, H, W) to (B, latent_dim, *cfg.grid); decoder maps
    back. Both decoders expose ``last_layer``, the weight that writes the pixels.
    """
    encoder_cls, decoder_cls = IMAGE_CODECS[cfg.architecture]
    return encoder_cls(cfg), decoder_cls(cfg)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Model-space images back to pixels: (..., 3, H, W) in [-1, 1] -> (..., H, W, 3) uint8.

    The inverse of the ``/ 127.5 - 1`` of :func:`mmvq.batch.to_model_inputs`; values outside
    [-1, 1] are clamped. For sample grids, the decode CLI and evaluation outputs.
    """
    return to_pixels(images).cpu().movedim(-3, -1).numpy()  # (..., 3, H, W) -> (..., H, W, 3)


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Model-space images in [-1, 1] -> uint8 pixels of the same (..., 3, H, W) layout and
    device: the quantisation of :func:`to_uint8`, for networks that read uint8 (rFID)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
