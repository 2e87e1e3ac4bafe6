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
