"""One training step, shared by the stage's workers and the benchmarks' plain loop: the
discriminators and their schedule start at ``gan.disc_start``, the generator's from step 0."""

from __future__ import annotations

import torch
from traindata import preprocessed_batch

from mmvq import to_model_inputs
from mmvq.config import AudioCodecConfig, GanConfig, ImageCodecConfig, TokenizerConfig
from pipeline.train_config import TrainConfig
from pipeline.train_loop import build_parts, train_step

MODEL = TokenizerConfig(image=ImageCodecConfig(image_size=32),
                        audio=AudioCodecConfig(num_samples=2000))
GAN = GanConfig(disc_start=2, image_disc_channels=8, audio_disc_channels=4,
                audio_disc_n_ffts=(64, 128), image_disc_norm="group")


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def test_the_discriminators_train_from_disc_start_and_each_schedule_follows_its_optimizer():
    config = TrainConfig(model=MODEL, gan=GAN, steps=4)
    torch.manual_seed(0)
    parts = build_parts(config, torch.device("cpu"), announce=False)
    micro = [to_model_inputs(preprocessed_batch(2, seed=3, cfg=MODEL))]
    generator, discriminators = _flat(parts.model), _flat(parts.discriminators)
    for step in range(GAN.disc_start):
        train_step(config, parts, parts.model, parts.discriminators, micro, step)
    assert not torch.equal(_flat(parts.model), generator)
    assert torch.equal(_flat(parts.discriminators), discriminators)  # held back
    assert parts.schedulers["discriminator"].last_epoch == 0
    stats = train_step(config, parts, parts.model, parts.discriminators, micro, GAN.disc_start)
    assert not torch.equal(_flat(parts.discriminators), discriminators)
    assert parts.schedulers["generator"].last_epoch == GAN.disc_start + 1
    assert parts.schedulers["discriminator"].last_epoch == 1
    assert stats["lr"] > 0
