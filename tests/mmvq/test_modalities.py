import pytest
import torch

from mmvq.config import AudioCodecConfig, ImageCodecConfig, TextCodecConfig
from mmvq.modalities import (
    AudioDecoder,
    AudioEncoder,
    ImageDecoder,
    ImageEncoder,
    TextDecoder,
    TextEncoder,
)
from mmvq.text_vocab import VOCAB_SIZE


def assert_all_params_get_grad(*modules):
    for module in modules:
        for name, p in module.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


@pytest.mark.parametrize(
    "cfg, grid",
    [
        (ImageCodecConfig(), (8, 8)),  # the demo preset: 64 px, f8
        (ImageCodecConfig(image_size=32, channel_mult=(1, 2), num_res_blocks=2), (16, 16)),
        (ImageCodecConfig(image_size=16, channel_mult=(1,), num_res_blocks=1), (16, 16)),
        (ImageCodecConfig(image_size=32, channel_mult=(1, 1, 2, 2), num_res_blocks=0), (4, 4)),
    ],
)
def test_image_codec_shapes_and_gradients(cfg, grid):
    enc, dec = ImageEncoder(cfg), ImageDecoder(cfg)
    x = torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1
    z = enc(x)
    assert z.shape == (2, cfg.latent_dim, *grid) and cfg.grid == grid
    y = dec(z)
    assert y.shape == x.shape
    (y - x).abs().mean().backward()
    assert_all_params_get_grad(enc, dec)


def test_image_config_rejects_size_not_divisible_by_downsampling():
    with pytest.raises(ValueError, match="not divisible"):
        ImageCodecConfig(image_size=60)


@pytest.mark.parametrize(
    "cfg, frames",
    [
        (AudioCodecConfig(), 250),  # the demo preset: 20000 samples, hop 80
        (AudioCodecConfig(num_samples=1005, strides=(2, 5), channel_mult=(1, 2)), 101),
        (AudioCodecConfig(num_samples=300, strides=(3, 1, 2), channel_mult=(1, 1, 2)), 50),
    ],
)
def test_audio_codec_shapes_and_gradients(cfg, frames):
    enc, dec = AudioEncoder(cfg), AudioDecoder(cfg)
    wav = torch.randn(2, cfg.num_samples) * 0.3
    z = enc(wav)
    assert z.shape == (2, frames, cfg.latent_dim) and cfg.num_frames == frames
    y = dec(z)
    assert y.shape == (2, cfg.num_samples)  # exactly num_samples, even when hop does not divide
    (y - wav).abs().mean().backward()
    assert_all_params_get_grad(enc, dec)


def test_audio_encoder_gives_silence_a_well_defined_latent():
    # Regression: with all-zero biases a silent frame encoded to exactly 0, and the quantizer's
    # l2-normalisation turned that into gradients of 1e12.
    enc = AudioEncoder(AudioCodecConfig())
    z = enc(torch.zeros(1, 20000))
    assert z.norm(dim=-1).min() > 1e-3


def test_audio_frames_are_distinct_at_init():
    # Regression: torch's default init made every frame's latent the same bias vector.
    enc = AudioEncoder(AudioCodecConfig())
    t = torch.arange(20000) / 8000
    z = enc(0.5 * torch.sin(2 * torch.pi * 440 * t * (1 + t))[None])[0]  # (frames, D), a chirp
    z = torch.nn.functional.normalize(z, dim=-1)
    assert (z @ z.mean(0)).mean() < 0.9


def test_text_codec_shapes_and_gradients():
    cfg = TextCodecConfig()
    enc, dec = TextEncoder(cfg), TextDecoder(cfg)
    ids = torch.randint(0, VOCAB_SIZE, (3, cfg.max_len))
    z = enc(ids)
    assert z.shape == (3, cfg.max_len, cfg.latent_dim)
    logits = dec(z)
    assert logits.shape == (3, cfg.max_len, VOCAB_SIZE)
    torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids).backward()
    assert_all_params_get_grad(enc, dec)


def test_text_config_rejects_heads_not_dividing_dim():
    with pytest.raises(ValueError, match="divisible"):
        TextCodecConfig(dim=130, num_heads=4)
