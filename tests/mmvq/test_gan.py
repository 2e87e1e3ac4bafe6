import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mmvq import MultimodalTokenizer, TokenizerConfig, to_model_inputs
from mmvq import losses as L
from mmvq.config import AudioCodecConfig, GanConfig
from mmvq.discriminators import (
    MultiScaleSTFTDiscriminator,
    PatchDiscriminator,
    build_discriminators,
)
from mmvq.perceptual import LPIPS
from mmvq.train_step import (
    build_optimizer,
    discriminator_step,
    gan_generator_step,
    generator_step,
)

# Small discriminators and half-second clips so that each step takes well under a second on one
# CPU thread.
GAN = GanConfig(disc_start=10, image_disc_channels=16, audio_disc_channels=8)
CONFIG = TokenizerConfig(audio=AudioCodecConfig(num_samples=4000))


@pytest.fixture
def inputs(make_batch):
    return to_model_inputs(make_batch(2, seed=7, cfg=CONFIG))


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = MultimodalTokenizer(CONFIG)
    return model, build_discriminators(GAN)


def d_optimizer(discriminators):
    return torch.optim.Adam(discriminators.parameters(), lr=2e-3, betas=(0.5, 0.9))


# -- discriminators ----------------------------------------------------------------------------


def test_patchgan_has_taming_parameter_count_and_patch_logits():
    with torch.device("meta"):
        taming_default = PatchDiscriminator(channels=64, num_layers=3, norm="batch")
    # NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3), BatchNorm, counted by hand from
    # taming's discriminator/model.py: 3136 + 131328 + 524800 + 2098176 + 8193.
    assert sum(p.numel() for p in taming_default.parameters()) == 2_765_633
    disc = PatchDiscriminator(channels=8, num_layers=3)
    (logits,) = disc(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1, 6, 6)  # 64 / 2**3 - 2


def test_group_norm_patchgan_judges_each_sample_alone():
    x = torch.randn(2, 3, 32, 32)
    y = x.clone()
    y[1] = torch.randn(3, 32, 32)  # change sample 1 only
    for norm, independent in (("group", True), ("batch", False)):
        disc = PatchDiscriminator(channels=8, num_layers=2, norm=norm).train()
        same = torch.allclose(disc(x)[0][0], disc(y)[0][0])
        assert same == independent, norm


def test_multiscale_stft_discriminator_gives_one_logit_map_per_window():
    disc = MultiScaleSTFTDiscriminator(n_ffts=(64, 128), channels=4)
    wav = torch.randn(2, 1000, requires_grad=True)
    logits = disc(wav)
    # frames = (T - n_fft) // hop + 1; frequency bins halved by each of the 3 strided convs
    assert [tuple(x.shape) for x in logits] == [(2, 1, 59, 5), (2, 1, 28, 9)]
    sum(x.mean() for x in logits).backward()
    assert wav.grad.abs().sum() > 0


def test_build_discriminators_follows_the_config():
    assert set(build_discriminators(GAN)) == {"image", "audio"}
    image_only = build_discriminators(dataclasses.replace(GAN, modalities=("image",)))
    assert list(image_only) == ["image"] and isinstance(image_only["image"], PatchDiscriminator)
    with pytest.raises(ValueError, match=r"gan.modalities.*\['text'\]"):
        GanConfig(modalities=("text",))
    with pytest.raises(ValueError, match="gan.loss"):
        GanConfig(loss="wasserstein")


# -- steps -------------------------------------------------------------------------------------


def test_before_disc_start_gan_step_is_the_plain_step_and_discriminators_idle(setup, inputs):
    model, discs = setup
    twin = copy.deepcopy(model)
    plain = generator_step(twin, inputs, torch.optim.SGD(twin.parameters(), lr=0.1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats, recon = gan_generator_step(model, inputs, opt, discs, GAN, step=GAN.disc_start - 1)
    assert stats == pytest.approx(plain, rel=1e-6)  # no adv/* keys, same losses, same grad norm
    assert model.weights_hash() == twin.weights_hash()
    before = copy.deepcopy(discs.state_dict())
    d_stats = discriminator_step(recon, inputs, discs, d_optimizer(discs), GAN, GAN.disc_start - 1)
    assert d_stats == {}
    for name, value in discs.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_adaptive_weight_of_the_step_equals_taming_two_grad_reference(setup, inputs):
    model, discs = setup
    lpips = LPIPS()
    ref_model, ref_discs = copy.deepcopy(model), copy.deepcopy(discs)
    weights = model.config.loss_weights
    # Reference, taming style: both losses on the reconstruction, autograd.grad to the last layer.
    torch.manual_seed(1)
    out = ref_model(inputs)
    expected = {}
    for modality, nll_terms, last in (
        ("image", ("image/l1",), ref_model.image_decoder.last_layer),
        ("audio", ("audio/l1", "audio/mel"), ref_model.audio_decoder.stages[0].weight),
    ):
        recon = out.reconstructions[modality]
        nll = sum(weights[k] * out.losses[k] for k in nll_terms)
        if modality == "image":
            nll = nll + weights["image/perceptual"] * lpips(recon, inputs.image).mean()
        g_loss = torch.stack([L.hinge_g_loss(x) for x in ref_discs[modality](recon)]).mean()
        nll_norm = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
        g_norm = torch.autograd.grad(g_loss, last, retain_graph=True)[0].norm()
        expected[modality] = weights[f"adv/{modality}"] * L.adaptive_gan_weight(nll_norm, g_norm)

    torch.manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    stats, _ = gan_generator_step(model, inputs, opt, discs, GAN, GAN.disc_start, lpips)
    for modality, value in expected.items():
        assert stats[f"adv/{modality}_weight"] == pytest.approx(value.item(), rel=1e-5)
        assert 0 < stats[f"adv/{modality}_weight"] < 1e4 * weights[f"adv/{modality}"]
    assert stats["image/perceptual"] > 0


def test_after_disc_start_the_generator_gets_adversarial_gradients(setup, inputs):
    model, discs = setup
    grads = {}
    for step in (GAN.disc_start - 1, GAN.disc_start):
        twin = copy.deepcopy(model)
        opt = torch.optim.SGD(twin.parameters(), lr=0.0)  # keep the weights; read the grads
        stats, _ = gan_generator_step(twin, inputs, opt, discs, GAN, step)
        grads[step] = {
            "image": twin.image_decoder.last_layer.grad.clone(),
            "audio": twin.audio_decoder.stages[0].weight.grad.clone(),
        }
    assert {"adv/image", "adv/audio", "adv/image_weight", "adv/audio_weight"} <= set(stats)
    for modality in ("image", "audio"):
        adversarial = grads[GAN.disc_start][modality] - grads[GAN.disc_start - 1][modality]
        assert adversarial.norm() > 1e-3 * grads[GAN.disc_start - 1][modality].norm(), modality
    assert all(p.grad is None for p in discs.parameters())  # the generator step leaves D alone


def test_fixed_weight_when_adaptive_is_off(setup, inputs):
    model, discs = setup
    gan = dataclasses.replace(GAN, adaptive=False, loss="vanilla")
    stats, _ = gan_generator_step(
        model, inputs, build_optimizer(model), discs, gan, step=gan.disc_start
    )
    assert stats["adv/image_weight"] == model.config.loss_weights["adv/image"]
    assert stats["adv/audio_weight"] == model.config.loss_weights["adv/audio"]
    expected_total = sum(
        stats[k] * model.config.loss_weights[k]
        for k in ("image/l1", "audio/l1", "audio/mel", "text/ce", "vq/commit", "vq/codebook")
    )
    expected_total += sum(stats[f"adv/{m}"] * stats[f"adv/{m}_weight"] for m in ("image", "audio"))
    assert stats["total"] == pytest.approx(expected_total, rel=1e-5)


def test_discriminator_step_lowers_its_loss_on_a_fixed_batch(setup, inputs):
    model, discs = setup
    _, recon = gan_generator_step(model, inputs, build_optimizer(model), discs, GAN, GAN.disc_start)
    opt = d_optimizer(discs)
    # The STFT discriminator starts slowly (near-constant logits for ~6 steps at this lr), so 24.
    history = [
        discriminator_step(recon, inputs, discs, opt, GAN, GAN.disc_start + i) for i in range(24)
    ]
    for modality in ("image", "audio"):
        first, last = history[0][f"disc/{modality}"], history[-1][f"disc/{modality}"]
        assert last < 0.8 * first, (modality, first, last)
        assert history[-1][f"disc/{modality}_real"] > history[-1][f"disc/{modality}_fake"]
    assert history[-1]["disc/grad_norm"] > 0


def test_absent_samples_do_not_train_the_discriminator(setup, inputs):
    model, discs = setup
    _, recon = gan_generator_step(model, inputs, build_optimizer(model), discs, GAN, GAN.disc_start)
    no_audio = dataclasses.replace(inputs, has_audio=torch.zeros(2, dtype=torch.bool))
    opt = torch.optim.SGD(discs.parameters(), lr=0.0)
    stats = discriminator_step(recon, no_audio, discs, opt, GAN, GAN.disc_start)
    assert stats["disc/audio"] == 0.0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in discs["audio"].parameters())
    assert any(p.grad.abs().sum() > 0 for p in discs["image"].parameters())


def test_gan_steps_under_ddp_match_plain_steps(setup, inputs, tmp_path):
    # The adaptive weight's autograd.grad calls must not upset DDP's gradient hooks, and a
    # discriminator called twice (real, fake) before one backward must work wrapped too.
    model, discs = setup
    gan = dataclasses.replace(GAN, disc_start=0)
    plain, plain_discs = copy.deepcopy(model), copy.deepcopy(discs)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        # broadcast_buffers=False: BatchNorm buffers must not be overwritten between the calls.
        ddp_discs = torch.nn.ModuleDict(
            {k: DistributedDataParallel(d, broadcast_buffers=False) for k, d in discs.items()}
        )
        runs = []
        for m, d in ((ddp, ddp_discs), (plain, plain_discs)):
            opt, d_opt = build_optimizer(m, lr=1e-3), d_optimizer(d)
            for step in range(2):
                stats, recon = gan_generator_step(m, inputs, opt, d, gan, step)
                stats |= discriminator_step(recon, inputs, d, d_opt, gan, step)
            runs.append(stats)
    finally:
        dist.destroy_process_group()
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)
