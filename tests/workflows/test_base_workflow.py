"""workflows/base.yaml: the GPU workflow loads strictly, is consistent, and builds its model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmvq import MultimodalTokenizer
from mmvq.config import image_preset
from pipeline.config import ConfigError
from workflows.plan import load_workflow, plan_workflow


@pytest.fixture(scope="module")
def base():
    return load_workflow("workflows/base.yaml")


def _config(workflow, name):
    from pipeline.config import from_dict
    from workflows.stages import STAGES

    entry = workflow.stages[name]
    return from_dict(STAGES[entry.stage or name].config_type, entry.config)


def test_sizes_gpu_and_preset(base):
    train = _config(base, "train")
    assert train.model.image == image_preset("base")
    assert train.use_gpu and _config(base, "tokenize").use_gpu
    assert train.model.audio.sample_rate == 16000 and train.model.audio.hop == 320
    preprocess = _config(base, "preprocess")
    # What preprocess produces is what the model reads.
    assert preprocess.image_size == train.model.image.image_size == 256
    assert preprocess.sample_rate == train.model.audio.sample_rate
    assert preprocess.audio_samples == train.model.audio.num_samples
    assert preprocess.text_max_len == train.model.text.max_len
    assert _config(base, "synth").image_size == 256


def test_model_builds_at_base_size(base):
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = MultimodalTokenizer(_config(base, "train").model)
    params = sum(p.numel() for p in model.parameters())
    assert params > 71_879_555  # the f16 image codec alone has that many


def test_base_plans_like_demo_and_unknown_keys_fail(base, tmp_path):
    assert list(base.stages) == list(load_workflow("workflows/demo.yaml").stages)
    moved = dataclasses.replace(base, data_root=str(tmp_path))
    assert [p.action for p in plan_workflow(moved)] == ["run"] * len(base.stages)
    with pytest.raises(ConfigError, match=r"stages\.train\.config\.model\.image\.codebok_size"):
        load_workflow("workflows/base.yaml", ["train.model.image.codebok_size=8"])


def test_base_trains_taming_f16_vqgan_recipe_and_the_dry_run_says_so(base, tmp_path):
    """L1 + LPIPS + PatchGAN hinge with the adaptive weight and a delayed discriminator for the
    image branch, the STFT discriminator and mel loss for audio: on in the config and in the
    plan a user reads before spending GPU hours."""
    from workflows.plan import format_plan, plan_workflow

    train = _config(base, "train")
    gan = train.gan
    assert gan is not None and gan.loss == "hinge" and gan.adaptive and gan.perceptual
    assert 0 < gan.disc_start < train.steps and set(gan.modalities) == {"image", "audio"}
    weights = train.model.loss_weights
    assert min(weights["image/perceptual"], weights["adv/image"], weights["audio/mel"],
               weights["adv/audio"]) > 0
    lines = format_plan(plan_workflow(base)).splitlines()
    plan = "\n".join(lines[lines.index(next(ln for ln in lines if ln.startswith("train"))):])
    assert (f"adversarial 0.8 (hinge PatchGAN discriminator from step {gan.disc_start}, "
            "adaptive weight)") in plan
    assert "multi-scale STFT discriminator" in plan and "mel 1" in plan
    assert "perceptual 1" in plan and "LPIPS VGG16 from torch's hub cache" in plan
