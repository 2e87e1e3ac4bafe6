"""Waveform encoder and decoder: a slim SEANet (SoundStream, Zeghidour et al. 2021; EnCodec).

Strided stages that widen the channels as they shorten the sequence, residual units at the
frame rate, and a mirrored decoder. Three changes make it cheap enough to train on one CPU
thread, where the activations of the first stage (T/4 steps) dominate the cost:

* every strided conv has kernel = stride, i.e. it is a Linear over non-overlapping frames of
  ``s`` steps. Tensors stay channels-last (B, L, C), so each stage is one reshape (a view) and one
  GEMM, about 3x faster than ``Conv1d`` at these sizes; the decoder's transposed convs are the
  same trick backwards (Linear to ``s * C`` features, then a reshape to ``s`` steps).
* SEANet's residual units run only at the frame rate instead of before every stage.
* SiLU instead of SEANet's ELU: as smooth, and half the cost of ELU in torch's CPU kernels.

Shapes for the default config (20000 samples, strides (4, 4, 5), base 16, channel_mult
(1, 2, 2))::

    (B, 20000) -> (B, 5000, 16) -> (B, 1250, 32) -> (B, 250, 32) -res-> (B, 250, 32)
    -out-> (B, 250, latent)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mmvq.config import AudioCodecConfig


class ResidualUnit(nn.Module):
    """SiLU, dilated conv k3, SiLU, conv k1, plus identity (SEANet residual unit); (B, C, L)."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 3, dilation=dilation, padding=dilation)
        self.conv2 = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, L) -> (B, C, L)
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class FrameRateBlock(nn.Module):
    """Residual units with dilations 1 and 3 on channels-last input: (B, L, C) -> (B, L, C)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # Dilations 1, 3 widen the receptive field across frames (SEANet uses 1, 3, 9 per stage).
        self.units = nn.Sequential(ResidualUnit(channels, 1), ResidualUnit(channels, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = rearrange(x, "b l c -> b c l")  # Conv1d wants channels first
        return rearrange(self.units(h), "b c l -> b l c")


def _widths(cfg: AudioCodecConfig) -> list[int]:
    return [cfg.base_channels * m for m in cfg.channel_mult]


def init_weights(module: nn.Module) -> None:
    """He-normal weights and zero biases for every Linear/Conv1d under ``module``.

    torch's default init shrinks the signal ~3x per layer while its random biases do not
    shrink, so after a few layers every frame's latent is the same bias vector and every frame
    picks the same code. Variance-preserving weights with zero biases keep frames distinct.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class AudioEncoder(nn.Module):
    """(B, T) waveform -> (B, ceil(T / hop), latent_dim), channels last."""

    def __init__(self, cfg: AudioCodecConfig) -> None:
        super().__init__()
        self.strides = cfg.strides
        self.hop = cfg.hop
        ch = _widths(cfg)
        in_ch = [1, *ch[:-1]]
        # Stage i: a stride-s_i conv with kernel s_i, as a Linear over frames of s_i steps.
        self.stages = nn.ModuleList(
            nn.Linear(s * c_in, c_out) for s, c_in, c_out in zip(cfg.strides, in_ch, ch)
        )
        self.res = FrameRateBlock(ch[-1])
        self.out = nn.Linear(ch[-1], cfg.latent_dim)
        init_weights(self.stages)
        init_weights(self.res)
        # self.out keeps torch's random bias: with all-zero biases a silent frame would encode
        # to exactly 0, whose direction (and l2-normalisation gradient) is undefined.

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        frames = -(-wav.shape[-1] // self.hop)
        h = F.pad(wav, (0, frames * self.hop - wav.shape[-1]))  # (B, frames * hop)
        h = h.unsqueeze(-1)  # (B, T', 1)
        for i, (s, stage) in enumerate(zip(self.strides, self.stages)):
            h = h if i == 0 else F.silu(h)
            h = stage(rearrange(h, "b (l s) c -> b l (s c)", s=s))  # (B, L / s, ch[i])
        h = self.res(h)  # (B, frames, ch[-1])
        return self.out(F.silu(h))  # (B, frames, latent)


class AudioDecoder(nn.Module):
    """(B, frames, latent_dim) channels-last -> (B, num_samples) waveform."""

    def __init__(self, cfg: AudioCodecConfig) -> None:
        super().__init__()
        self.strides = cfg.strides
        self.num_samples = cfg.num_samples
        ch = _widths(cfg)
        out_ch = [1, *ch[:-1]]
        self.inp = nn.Linear(cfg.latent_dim, ch[-1])
        self.res = FrameRateBlock(ch[-1])
        # Mirror of the encoder: stage i maps each step to s_i steps of out_ch[i] channels.
        self.stages = nn.ModuleList(
            nn.Linear(c_in, s * c_out) for s, c_in, c_out in zip(cfg.strides, ch, out_ch)
        )
        init_weights(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.res(self.inp(z))  # (B, frames, ch[-1])
        for i in reversed(range(len(self.strides))):
            h = self.stages[i](F.silu(h))  # (B, L, s_i * out_ch[i])
            h = rearrange(h, "b l (s c) -> b (l s) c", s=self.strides[i])  # (B, L * s_i, out_ch)
        return h[:, : self.num_samples, 0]  # (B, frames * hop, 1) -> (B, num_samples)
