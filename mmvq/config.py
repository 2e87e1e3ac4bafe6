"""Typed, frozen configuration of the multimodal tokenizer.

Plain defaults are the tiny CPU preset the demo trains in a few minutes on two cores. Configs load
strictly from plain dicts (parsed YAML/JSON): an unknown key is an error naming its path, e.g.
``audio.strid``, so a typo can never silently fall back to a default.
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mmvq.config_io import ConfigError, from_dict, to_dict


@dataclass(frozen=True)
class ImageCodecConfig:
    """Conv encoder/decoder for square RGB images (VQGAN family, Esser et al. 2021)."""

    image_size: int = 64  # side in pixels; preprocess resizes/crops every image to this square
    base_channels: int = 32  # width after the patchify stem; every other width scales from it
    # Width multiplier per level; each level after the first halves the resolution, so the grid
    # is image_size / 2**(len - 1). (1, 2, 2, 2): 64 px -> 8x8 tokens, as in VQGAN f8.
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 1  # ResNet blocks on the token grid: the main depth/speed knob
    latent_dim: int = 32  # code vector width; low-dim codes use the codebook better (ViT-VQGAN)
    codebook_size: int = 256  # number of image codes K; 256 is plenty for the synthetic demo

    def __post_init__(self) -> None:
        if not self.channel_mult:
            raise ConfigError("image.channel_mult must not be empty")
        if self.image_size % self.downsample:
            raise ConfigError(
                f"image.image_size={self.image_size} is not divisible by the downsampling "
                f"factor {self.downsample} implied by channel_mult={self.channel_mult}"
            )

    @property
    def downsample(self) -> int:
        """Pixels per token along each side."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid ``(h, w)``."""
        side = self.image_size // self.downsample
        return (side, side)


@dataclass(frozen=True)
class AudioCodecConfig:
    """Strided encoder/decoder for mono waveforms (a slim SEANet, as in SoundStream/EnCodec)."""

    sample_rate: int = 8000  # Hz; 8 kHz keeps speech intelligible and the demo cheap
    num_samples: int = 20000  # fixed clip length (2.5 s at 8 kHz); shorter clips are zero-padded
    # Width of the first strided stage. It holds T/4 steps, so its width sets most of the CPU cost:
    # 16 (4x the 4 samples it reads) trains ~2x faster than 32 for the same frame-rate width.
    base_channels: int = 16
    strides: tuple[int, ...] = (4, 4, 5)  # per-stage downsampling; hop = prod = 80 samples (10 ms)
    # Width multiplier per stage, one per stride (SEANet doubles at every stage): 16, 32, 32.
    channel_mult: tuple[int, ...] = (1, 2, 2)
    latent_dim: int = 32  # code vector width
    codebook_size: int = 256  # number of audio codes K
    # STFT sizes of the multi-resolution mel loss: a short window for transients, a long one for
    # pitch (multi-scale spectral loss, Engel et al. 2020 / DAC).
    mel_n_ffts: tuple[int, ...] = (128, 512)

    def __post_init__(self) -> None:
        if not self.strides or any(s < 1 for s in self.strides):
            raise ConfigError(f"audio.strides must be positive integers, got {self.strides}")
        if len(self.channel_mult) != len(self.strides):
            raise ConfigError(
                f"audio.channel_mult needs one entry per stride: {self.channel_mult} vs "
                f"{self.strides}"
            )
        if not self.mel_n_ffts or any(n < 16 for n in self.mel_n_ffts):
            raise ConfigError(f"audio.mel_n_ffts must be >= 16, got {self.mel_n_ffts}")

    @property
    def hop(self) -> int:
        """Samples per token."""
        return math.prod(self.strides)

    @property
    def num_frames(self) -> int:
        """Tokens per clip (the clip is zero-padded up to a whole number of hops)."""
        return -(-self.num_samples // self.hop)


@dataclass(frozen=True)
class TextCodecConfig:
    """Byte-level transformer encoder/decoder with one code per byte position."""

    max_len: int = 64  # bytes per caption; longer text is truncated by preprocess
    dim: int = 128  # transformer width
    num_layers: int = 2  # transformer layers in the encoder and in the decoder
    num_heads: int = 4  # attention heads; dim must be divisible by it
    latent_dim: int = 32  # code vector width
    codebook_size: int = 256  # number of text codes K (one code per byte position)

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ConfigError(
                f"text.dim={self.dim} must be divisible by text.num_heads={self.num_heads}"
            )
        if self.max_len < 1:
            raise ConfigError(f"text.max_len must be positive, got {self.max_len}")


@dataclass(frozen=True)
class QuantizerConfig:
    """Settings shared by the per-modality quantizers."""

    # Key of mmvq.quantizers.QUANTIZERS. "simvq" (a shared linear map over a frozen random
    # codebook) keeps more codes alive than plain "vq" at the same cost.
    kind: str = "simvq"
    # Look up codes by cosine similarity (l2-normalised latents and codes, ViT-VQGAN, Yu et al.
    # 2022): far fewer dead codes than raw-L2 VQ with a randomly initialised codebook.
    l2_normalize: bool = True


# Loss names the tokenizer computes, with their default weight in ``total``.
DEFAULT_LOSS_WEIGHTS: Mapping[str, float] = types.MappingProxyType(
    {
        "image/l1": 1.0,  # pixel L1 on [-1, 1] images
        "audio/l1": 1.0,  # waveform L1; anchors phase, which the mel loss ignores
        "audio/mel": 1.0,  # multi-resolution log-mel L1 (perceptual proxy)
        "text/ce": 1.0,  # byte cross-entropy over the real (unpadded) positions
        "vq/commit": 0.25,  # beta of VQ-VAE (van den Oord et al. 2017, eq. 3)
        "vq/codebook": 1.0,  # moves codes towards the encoder outputs
    }
)


def _default_loss_weights() -> Mapping[str, float]:
    return types.MappingProxyType(dict(DEFAULT_LOSS_WEIGHTS))


@dataclass(frozen=True)
class TokenizerConfig:
    """The whole tokenizer: one codec per modality, the quantizer and the loss weights."""

    image: ImageCodecConfig = field(default_factory=ImageCodecConfig)
    audio: AudioCodecConfig = field(default_factory=AudioCodecConfig)
    text: TextCodecConfig = field(default_factory=TextCodecConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    # Weight of each loss in ``total``; keys as in DEFAULT_LOSS_WEIGHTS, missing keys keep the
    # default, unknown keys are an error.
    loss_weights: Mapping[str, float] = field(default_factory=_default_loss_weights)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.loss_weights) - set(DEFAULT_LOSS_WEIGHTS))
        if unknown:
            raise ConfigError(
                f"unknown key loss_weights.{unknown[0]}; known: {sorted(DEFAULT_LOSS_WEIGHTS)}"
            )
        merged = {**DEFAULT_LOSS_WEIGHTS, **{k: float(v) for k, v in self.loss_weights.items()}}
        # Frozen dataclass: __post_init__ is the one place allowed to normalise a field.
        object.__setattr__(self, "loss_weights", types.MappingProxyType(merged))

    def __reduce__(self):
        # A mappingproxy cannot be pickled, and Ray pickles configs to ship them to workers.
        fields = (self.image, self.audio, self.text, self.quantizer, dict(self.loss_weights))
        return (type(self), fields)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Convert a config dataclass to plain JSON/YAML types (tuples become lists)."""
    return to_dict(cfg)


def tokenizer_config_from_dict(d: Mapping[str, Any]) -> TokenizerConfig:
    """Build a :class:`TokenizerConfig` from plain types, strictly.

    Raises
    ------
    ConfigError
        (a ValueError) on an unknown key (the message names its dotted path, e.g.
        ``audio.strid``), a value of the wrong type, or an invalid combination of values.
    """
    return from_dict(TokenizerConfig, d)
