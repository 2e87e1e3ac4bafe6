"""Discriminators for adversarial training: a PatchGAN for images, multi-scale STFT for audio.

Both return a *list* of logit maps, one per scale, each (B, ...): the losses in
:mod:`mmvq.losses` reduce each map per sample and the train step averages over the list, so one
code path serves the single-scale image and the multi-scale audio discriminator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from mmvq.config import GanConfig
from mmvq.modalities.image import group_norm


def _init_patchgan(module: nn.Module) -> None:
    """Taming's ``weights_init`` (from DCGAN, Radford et al. 2016): N(0, 0.02) convs, N(1, 0.02)
    norm scales, zero norm shifts."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): one real/fake logit per overlapping image patch.

    Taming's ``NLayerDiscriminator``: a stride-2 4x4 conv, ``num_layers - 1`` more stride-2 convs
    doubling the width (up to 8x), one stride-1 conv, then a 1-channel 4x4 conv. With 3 layers
    each logit sees a 70x70-pixel patch, so the loss judges texture rather than layout, which
    the L1 and perceptual losses already hold.

    Parameters
    ----------
    channels : width of the first conv (taming's ndf, 64)
    num_layers : stride-2 convs (3)
    norm : "batch" (taming) or "group" (per-sample statistics)
    in_channels : 3 for RGB
    """

    def __init__(
        self, channels: int = 64, num_layers: int = 3, norm: str = "batch", in_channels: int = 3
    ) -> None:
        super().__init__()
        widths = [channels * min(2**i, 8) for i in range(num_layers + 1)]
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        for i in range(1, num_layers + 1):
            stride = 2 if i < num_layers else 1
            layers += [
                # No bias: the norm's shift follows at once.
                nn.Conv2d(widths[i - 1], widths[i], 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(widths[i]) if norm == "batch" else group_norm(widths[i]),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_patchgan)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) -> [(B, 1, h, w)], h = H / 2**num_layers - 2 (e.g. 256 -> 30)."""
        return [self.main(image)]


def _same_padding(kernel: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    return ((kernel[0] - 1) * dilation[0] // 2, (kernel[1] - 1) * dilation[1] // 2)


class STFTDiscriminator(nn.Module):
    """2-D conv stack on one complex STFT (EnCodec, Défossez et al. 2022, sec. 3.4).

    Real and imaginary parts are the two input channels, so the discriminator sees phase, which
    a magnitude loss ignores. Convs: (3, 9) kernels, stride 2 along frequency, dilations 1, 2, 4
    along time; weight normalisation throughout, as in EnCodec.

    Parameters
    ----------
    n_fft : window and FFT size; hop n_fft / 4
    channels : conv width (EnCodec: 32)
    """

    def __init__(self, n_fft: int, channels: int = 32, dilations: tuple[int, ...] = (1, 2, 4)):
        super().__init__()
        self.n_fft = n_fft
        # Not persistent: a constant, rebuilt on construction, and it follows .to(device).
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        kernel = (3, 9)
        convs = [nn.Conv2d(2, channels, kernel, padding=_same_padding(kernel))]
        for d in dilations:
            convs.append(
                nn.Conv2d(
                    channels,
                    channels,
                    kernel,
                    stride=(1, 2),
                    dilation=(d, 1),
                    padding=_same_padding(kernel, (d, 1)),
                )
            )
        convs.append(nn.Conv2d(channels, channels, 3, padding=1))
        self.convs = nn.ModuleList(weight_norm(conv) for conv in convs)
        self.conv_post = weight_norm(nn.Conv2d(channels, 1, 3, padding=1))

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, 1, frames, freqs / 8) logits."""
        with torch.autocast(device_type=wav.device.type, enabled=False):  # no half-precision STFT
            spec = torch.stft(
                wav.float(),
                self.n_fft,
                hop_length=self.n_fft // 4,
                window=self.window,
                normalized=True,
                center=False,
                return_complex=True,
            )  # (B, n_fft // 2 + 1, frames) complex
        h = rearrange(torch.view_as_real(spec), "b f t two -> b two t f")  # (B, 2, frames, freqs)
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)
        return self.conv_post(h)


class MultiScaleSTFTDiscriminator(nn.Module):
    """One :class:`STFTDiscriminator` per window size (EnCodec's MS-STFT discriminator).

    Short windows resolve transients, long ones pitch; each scale judges its own view.

    Parameters
    ----------
    n_ffts : window sizes; every clip must be at least ``max(n_ffts)`` samples long
    channels : conv width per scale
    """

    def __init__(self, n_ffts: tuple[int, ...] = (128, 256, 512), channels: int = 32) -> None:
        super().__init__()
        self.scales = nn.ModuleList(STFTDiscriminator(n, channels) for n in n_ffts)

    def forward(self, wav: torch.Tensor) -> list[torch.Tensor]:
        """(B, T) -> one (B, 1, frames_s, freqs_s) logit map per scale."""
        return [scale(wav) for scale in self.scales]


def build_discriminators(gan: GanConfig) -> nn.ModuleDict:
    """One discriminator per modality in ``gan.modalities``, keyed by modality.

    Train them with their own optimizer; taming uses Adam with betas (0.5, 0.9) for both sides.
    Under DDP wrap each one, not the dict: ``DistributedDataParallel(d,
    broadcast_buffers=False)``; the discriminator step calls it twice (real, fake) before one
    backward, and a buffer broadcast in between would overwrite BatchNorm statistics that the
    backward still needs.
    """
    builders = {
        "image": lambda: PatchDiscriminator(
            gan.image_disc_channels, gan.image_disc_layers, gan.image_disc_norm
        ),
        "audio": lambda: MultiScaleSTFTDiscriminator(
            gan.audio_disc_n_ffts, gan.audio_disc_channels
        ),
    }
    return nn.ModuleDict({name: builders[name]() for name in gan.modalities})
