import dataclasses

import pytest
import torch

from mmvq import MultimodalTokenizer, TokenizerConfig, to_model_inputs
from mmvq.config import ImageCodecConfig, image_preset
from mmvq.modalities.image import AttnBlock, VQGANDecoder, VQGANEncoder, build_image_codec

# taming-transformers' ImageNet f16 VQGAN (ch 128, ch_mult (1,1,2,2,4), 2 res blocks, attention
# at 16, z 256, embed_dim 256), counted layer by layer following taming's
# diffusionmodules/model.py: Encoder 29,298,176 + Decoder 42,449,795 + quant_conv 65,792 +
# post_quant_conv 65,792. The architecture is the same, so the count must match exactly.
TAMING_F16_ENCODER = 29_298_176 + 65_792  # + quant_conv
TAMING_F16_DECODER = 42_449_795 + 65_792  # + post_quant_conv

SMALL = ImageCodecConfig(  # the overfit instance: 32 px, f2, ch 16, attention at 16x16
    image_size=32,
    architecture="vqgan",
    base_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(16,),
    z_channels=32,
    latent_dim=8,
)


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_presets_are_named_and_tiny_is_the_default():
    assert image_preset("tiny") == ImageCodecConfig() == TokenizerConfig().image
    base = image_preset("base")
    assert base.architecture == "vqgan" and base.downsample == 16 and base.grid == (16, 16)
    with pytest.raises(ValueError, match=r"unknown image preset 'huge'.*\['base', 'tiny'\]"):
        image_preset("huge")


def test_base_preset_has_exactly_taming_f16_parameter_count():
    with torch.device("meta"):  # shapes only: no 72M-parameter init
        encoder, decoder = build_image_codec(image_preset("base"))
    assert num_params(encoder) == TAMING_F16_ENCODER
    assert num_params(decoder) == TAMING_F16_DECODER
    assert num_params(encoder) + num_params(decoder) == 71_879_555  # "72M", tolerance 0


def test_base_preset_widths_run_and_keep_shapes_at_64_px():
    # Same widths and depth as the preset; attention moves to 4x4, the lowest level at 64 px, so
    # even the parameter count is the preset's. (The 256 px forward is a benchmark-marked test.)
    cfg = dataclasses.replace(image_preset("base"), image_size=64, attn_resolutions=(4,))
    encoder, decoder = build_image_codec(cfg)
    assert num_params(encoder) + num_params(decoder) == TAMING_F16_ENCODER + TAMING_F16_DECODER
    with torch.no_grad():
        z = encoder(torch.rand(1, 3, 64, 64) * 2 - 1)
        assert z.shape == (1, 256, 4, 4)
        assert decoder(z).shape == (1, 3, 64, 64)


@pytest.mark.benchmark
def test_base_preset_forward_at_256_px():  # about 5 s on one CPU thread
    encoder, decoder = build_image_codec(image_preset("base"))
    with torch.no_grad():
        z = encoder(torch.rand(1, 3, 256, 256) * 2 - 1)
        assert z.shape == (1, 256, 16, 16)
        assert decoder(z).shape == (1, 3, 256, 256)


@pytest.mark.parametrize(
    "channel_mult, attn, grid, attn_blocks",
    [
        # f8, attention at the lowest level (4): after its 2 encoder / 3 decoder ResNet blocks
        ((1, 2, 2, 2), (4,), (4, 4), (2, 3)),
        # f16, attention at two upper levels: twice as many; the mid block's comes on top
        ((1, 1, 2, 2, 2), (8, 16), (2, 2), (4, 6)),
    ],
)
def test_vqgan_downsampling_from_config_shapes_and_gradients(channel_mult, attn, grid, attn_blocks):
    cfg = ImageCodecConfig(
        image_size=32,
        architecture="vqgan",
        base_channels=8,
        channel_mult=channel_mult,
        num_res_blocks=2,
        attn_resolutions=attn,
        z_channels=16,
        latent_dim=4,
    )
    encoder, decoder = build_image_codec(cfg)
    assert isinstance(encoder, VQGANEncoder) and isinstance(decoder, VQGANDecoder)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = encoder(x)
    assert z.shape == (2, 4, *grid) and cfg.grid == grid
    y = decoder(z)
    assert y.shape == x.shape
    (y - x).abs().mean().backward()
    for name, p in [*encoder.named_parameters(), *decoder.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    count = [sum(isinstance(m, AttnBlock) for m in net.modules()) - 1 for net in (encoder, decoder)]
    assert tuple(count) == attn_blocks  # - 1: the mid block's


def test_attention_block_computes_taming_attention():
    # taming's AttnBlock.forward with bmm, on our weights: softmax(q k^T / sqrt(C)) v, proj, + x.
    block = AttnBlock(8)
    x = torch.randn(2, 8, 5, 6)
    h = block.norm(x)
    q, k, v = block.qkv(h).chunk(3, dim=1)  # each (B, C, h, w)
    q = q.reshape(2, 8, 30).permute(0, 2, 1)  # (B, hw, C)
    k = k.reshape(2, 8, 30)  # (B, C, hw)
    attn = torch.softmax(torch.bmm(q, k) * 8**-0.5, dim=2)  # (B, hw_q, hw_k)
    out = torch.bmm(v.reshape(2, 8, 30), attn.permute(0, 2, 1)).reshape(2, 8, 5, 6)
    torch.testing.assert_close(block(x), x + block.proj_out(out))


def test_attn_resolutions_are_checked():
    with pytest.raises(ValueError, match=r"attn_resolutions \[5\] match no level"):
        dataclasses.replace(SMALL, attn_resolutions=(5,))
    with pytest.raises(ValueError, match="'vqgan' only"):
        ImageCodecConfig(attn_resolutions=(8,))
    with pytest.raises(ValueError, match="architecture"):
        ImageCodecConfig(architecture="vit")


def test_tokenizer_with_vqgan_images_round_trips_through_save_load(make_batch, tmp_path):
    cfg = TokenizerConfig(image=SMALL)
    model = MultimodalTokenizer(cfg).eval()
    assert isinstance(model.image_encoder, VQGANEncoder)
    inputs = to_model_inputs(make_batch(2, seed=4, cfg=cfg))
    codes = model.encode(inputs)
    assert codes["image"].shape == (2, 16, 16)
    model.save(tmp_path)
    loaded = MultimodalTokenizer.load(tmp_path)
    assert loaded.config.image == SMALL and loaded.weights_hash() == model.weights_hash()
    torch.testing.assert_close(loaded.decode(codes)["image"], model.decode(codes)["image"])


def test_small_vqgan_autoencoder_overfits_a_fixed_batch(make_batch):
    encoder, decoder = build_image_codec(SMALL)
    x = to_model_inputs(make_batch(4, seed=1, cfg=TokenizerConfig(image=SMALL))).image
    # An autoencoder that ignored its input could at best output the batch's mean image.
    mean_image_l1 = (x - x.mean(dim=0, keepdim=True)).abs().mean().item()
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=2e-3)
    losses = []
    for _ in range(30):
        loss = (decoder(encoder(x)) - x).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 3
    assert losses[-1] < 0.8 * mean_image_l1
