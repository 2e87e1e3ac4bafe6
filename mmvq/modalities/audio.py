"""Waveform encoder and decoder: a slim SEANet (SoundStream, Zeghidour et al. 2021; EnCodec).

Strided Conv1d stages with ELU, kernel = 2 x stride, doubling the width at each stage, and a
mirrored ConvTranspose1d decoder. SEANet puts residual units before every downsampling; here they
run only at the frame rate, the one place they are cheap (the first stage holds T/4 x 32 values
per clip, and an elementwise op over that costs as much as the whole frame-rate stack on CPU).

Shapes for the default config (20000 samples, strides (4, 4, 5), base 32)::

    (B, 20000) -> (B, 1, 20000) -conv s4-> (B, 32, 5000) -s4-> (B, 64, 1250) -s5-> (B, 128, 250)
    -residual units-> (B, 128, 250) -out-> (B, latent, 250)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmvq.config import AudioCodecConfig


def stride_geometry(stride: int) -> tuple[int, int, int]:
    """(kernel, padding, output_padding) so that a conv maps length L*s to exactly L and the
    matching transposed conv maps L back to exactly L*s."""
    if stride == 1:
        return 3, 1, 0
    return 2 * stride, (stride + 1) // 2, stride % 2


class ResidualUnit(nn.Module):
    """ELU, dilated conv k3, ELU, conv k1, plus identity (SEANet residual unit)."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 3, dilation=dilation, padding=dilation)
        self.conv2 = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, L) -> (B, C, L)
        return x + self.conv2(F.elu(self.conv1(F.elu(x))))


def _widths(cfg: AudioCodecConfig) -> list[int]:
    return [cfg.base_channels * 2**i for i in range(len(cfg.strides))]


class AudioEncoder(nn.Module):
    """(B, T) waveform -> (B, latent_dim, ceil(T / hop))."""

    def __init__(self, cfg: AudioCodecConfig) -> None:
        super().__init__()
        self.hop = cfg.hop
        ch = _widths(cfg)
        convs = []
        for i, s in enumerate(cfg.strides):
            k, p, _ = stride_geometry(s)
            # The first conv is already strided: no full-rate feature map is ever built.
            convs.append(nn.Conv1d(1 if i == 0 else ch[i - 1], ch[i], k, stride=s, padding=p))
        self.convs = nn.ModuleList(convs)
        # Dilations 1 and 3 widen the receptive field at the frame rate (SEANet uses 1, 3, 9).
        self.res = nn.Sequential(ResidualUnit(ch[-1], 1), ResidualUnit(ch[-1], 3))
        self.out = nn.Conv1d(ch[-1], cfg.latent_dim, 3, padding=1)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        frames = -(-wav.shape[-1] // self.hop)
        x = F.pad(wav, (0, frames * self.hop - wav.shape[-1]))  # (B, frames * hop)
        h = x.unsqueeze(1)  # (B, 1, frames * hop)
        for i, conv in enumerate(self.convs):
            h = conv(h if i == 0 else F.elu(h))  # (B, ch[i], frames * hop / prod(strides[:i+1]))
        h = self.res(h)  # (B, ch[-1], frames)
        return self.out(F.elu(h))  # (B, latent, frames)


class AudioDecoder(nn.Module):
    """(B, latent_dim, frames) -> (B, num_samples) waveform."""

    def __init__(self, cfg: AudioCodecConfig) -> None:
        super().__init__()
        self.num_samples = cfg.num_samples
        ch = _widths(cfg)
        self.inp = nn.Conv1d(cfg.latent_dim, ch[-1], 3, padding=1)
        self.res = nn.Sequential(ResidualUnit(ch[-1], 1), ResidualUnit(ch[-1], 3))
        convs = []
        for i in reversed(range(len(cfg.strides))):
            k, p, op = stride_geometry(cfg.strides[i])
            out_ch = 1 if i == 0 else ch[i - 1]
            convs.append(
                nn.ConvTranspose1d(ch[i], out_ch, k, stride=cfg.strides[i], padding=p,
                                   output_padding=op)
            )
        self.convs = nn.ModuleList(convs)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.res(self.inp(z))  # (B, ch[-1], frames)
        for conv in self.convs:
            h = conv(F.elu(h))  # (B, ch[i-1], frames * prod(strides[i:]))
        return h[:, 0, : self.num_samples]  # (B, 1, frames * hop) -> (B, num_samples)
