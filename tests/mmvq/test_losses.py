import math

import pytest
import torch

from mmvq import losses as L


def test_masked_mean_and_l1_skip_masked_samples():
    values = torch.tensor([1.0, 100.0, 3.0])
    mask = torch.tensor([True, False, True])
    assert L.masked_mean(values, mask).item() == 2.0
    assert L.masked_mean(values, torch.zeros(3, dtype=torch.bool)).item() == 0.0
    x = torch.zeros(3, 2, 2)
    y = torch.stack([torch.full((2, 2), 1.0), torch.full((2, 2), 50.0), torch.full((2, 2), 3.0)])
    assert L.masked_l1(x, y, mask).item() == 2.0


def test_masked_cross_entropy_by_hand():
    # Two classes, uniform logits: CE = log 2 on every counted position.
    logits = torch.zeros(2, 3, 2)
    logits[1, 2] = torch.tensor([100.0, -100.0])  # padding of sample 1: would add ~200 if counted
    targets = torch.tensor([[0, 1, 0], [0, 0, 1]])
    ce = L.masked_cross_entropy(logits, targets, torch.tensor([3, 2]), torch.tensor([True, True]))
    assert ce.item() == torch.tensor(math.log(2)).item()
    ce0 = L.masked_cross_entropy(logits, targets, torch.tensor([3, 2]), torch.tensor([False] * 2))
    assert ce0.item() == 0.0


def test_mel_filters_are_built_once_per_rate_and_size():
    dev = torch.device("cpu")
    a = L.mel_filters(8000, 128, dev)
    assert L.mel_filters(8000, 128, dev) is a
    assert L.mel_filters(8000, 512, dev) is not a
    window, fbank = a
    assert window.shape == (128,) and fbank.shape == (65, 16)
    assert (fbank.sum(dim=0) > 0).all()  # no empty mel band at this resolution


def test_log_mel_distance_is_zero_on_identical_input_and_differentiable_in_est():
    t = torch.arange(4000) / 8000
    ref = torch.sin(2 * math.pi * 440 * t)[None].repeat(2, 1)
    est = (ref + 0.1 * torch.randn_like(ref)).requires_grad_(True)
    assert (L.log_mel_distance(ref, ref, 8000, (128, 512)) == 0).all()
    d = L.log_mel_distance(ref, est, 8000, (128, 512))
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert est.grad is not None and torch.isfinite(est.grad).all() and est.grad.abs().sum() > 0


# -- adversarial -------------------------------------------------------------------------------


def test_gan_losses_by_hand_per_sample():
    real = torch.tensor([[2.0, 0.0], [0.5, 0.5]])  # (B=2, 2 patches)
    fake = torch.tensor([[-2.0, 0.0], [1.0, 1.0]])
    # hinge: 0.5 * (mean relu(1 - real) + mean relu(1 + fake))
    torch.testing.assert_close(L.hinge_d_loss(real, fake), torch.tensor([0.5, 1.25]))
    sp = torch.nn.functional.softplus
    vanilla = 0.5 * (sp(-real).mean(dim=1) + sp(fake).mean(dim=1))
    torch.testing.assert_close(L.vanilla_d_loss(real, fake), vanilla)
    torch.testing.assert_close(L.hinge_g_loss(fake), torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(L.non_saturating_g_loss(fake), sp(-fake).mean(dim=1))
    assert set(L.GAN_LOSSES) == {"hinge", "vanilla"}


def test_adopt_weight_gates_on_disc_start():
    assert L.adopt_weight(0.8, step=99, start=100) == 0.0
    assert L.adopt_weight(0.8, step=100, start=100) == 0.8
    assert L.adopt_weight(0.8, step=5, start=100, value=0.1) == 0.1
    assert L.adopt_weight(0.8, step=0, start=0) == 0.8


def test_adaptive_gan_weight_is_a_detached_clamped_ratio():
    nll = torch.tensor(3.0, requires_grad=True)
    w = L.adaptive_gan_weight(nll * 1.0, torch.tensor(2.0))
    assert w.item() == pytest.approx(3.0 / (2.0 + 1e-4)) and not w.requires_grad
    assert L.adaptive_gan_weight(torch.tensor(1.0), torch.tensor(0.0)).item() == 1e4
    assert L.adaptive_gan_weight(torch.tensor(1.0), torch.tensor(0.0), max_weight=5.0) == 5.0


def test_adaptive_weight_from_output_gradients_equals_taming_two_grad_reference():
    # A small real stack: VQGAN decoder -> (L1 + LPIPS) and PatchGAN. Reference: taming's two
    # autograd.grad calls to the last layer, through LPIPS and the discriminator. Ours: the
    # gradients at the reconstruction once, carried through the last layer only.
    from mmvq.config import ImageCodecConfig
    from mmvq.discriminators import PatchDiscriminator
    from mmvq.modalities.image import VQGANDecoder
    from mmvq.perceptual import LPIPS

    cfg = ImageCodecConfig(
        image_size=32, architecture="vqgan", base_channels=8, channel_mult=(1, 2),
        num_res_blocks=1, attn_resolutions=(16,), z_channels=8, latent_dim=4,
    )  # fmt: skip
    decoder, lpips, disc = VQGANDecoder(cfg), LPIPS(), PatchDiscriminator(8, 2)
    target = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = decoder(torch.randn(2, 4, 16, 16))
    nll = (recon - target).abs().mean() + lpips(recon, target).mean()
    g_loss = L.hinge_g_loss(disc(recon)[0]).mean()
    last = decoder.last_layer
    ref_nll = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
    ref_g = torch.autograd.grad(g_loss, last, retain_graph=True)[0].norm()
    reference = L.adaptive_gan_weight(ref_nll, ref_g)

    nll_grad = torch.autograd.grad(nll, recon, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, recon, retain_graph=True)[0]
    norms = L.last_layer_grad_norms(recon, last, [nll_grad, g_grad])
    torch.testing.assert_close(norms, [ref_nll, ref_g], rtol=1e-5, atol=0)
    torch.testing.assert_close(L.adaptive_gan_weight(*norms), reference, rtol=1e-5, atol=0)
    assert 0 < reference < 1e4  # a real ratio, not the clamp


# -- InfoNCE ---------------------------------------------------------------------------------


def test_info_nce_by_hand_and_symmetric():
    a = torch.eye(2)
    # cosine logits [[1, 0], [0, 1]] / T=1: each row's CE is log(1 + e^-1)
    assert L.info_nce_loss(a, a, temperature=1.0).item() == pytest.approx(math.log(1 + math.e**-1))
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    torch.testing.assert_close(L.info_nce_loss(x, y), L.info_nce_loss(y, x))
    aligned = L.info_nce_loss(x, x + 0.1 * torch.randn_like(x))
    shuffled = L.info_nce_loss(x, x[torch.roll(torch.arange(8), 1)])
    assert aligned < 0.1 < shuffled
