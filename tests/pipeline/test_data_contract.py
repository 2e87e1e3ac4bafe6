"""The data contract from preprocess to the model: shapes follow the data, conflicts name both keys."""

from __future__ import annotations

import dataclasses

import pytest

from mmvq.config import ConfigError, TokenizerConfig
from mmvq.text_vocab import BYTES
from pipeline.config import from_dict
from pipeline.formats.preprocessed import (
    CONTRACT_FILE,
    derive_model_shapes,
    model_config_for_data,
    read_contract,
    shapes_of,
    write_contract,
)
from pipeline.preprocess import PreprocessConfig
from pipeline.train_config import TrainConfig


def test_unset_model_shapes_take_the_datas():
    shapes = shapes_of(PreprocessConfig(image_size=32, sample_rate=16000, audio_samples=32000,
                                        text_max_len=48))
    raw = derive_model_shapes({"steps": 5}, shapes, "preprocess")
    config = from_dict(TrainConfig, raw)
    assert (config.model.image.image_size, config.model.audio.sample_rate,
            config.model.audio.num_samples, config.model.text.max_len) == (32, 16000, 32000, 48)
    assert config.steps == 5


def test_a_set_shape_that_agrees_is_kept_and_one_that_conflicts_names_both_keys():
    shapes = shapes_of(PreprocessConfig())
    same = derive_model_shapes({"model": {"image": {"image_size": 64}}}, shapes, "preprocess")
    assert same["model"]["image"]["image_size"] == 64
    with pytest.raises(ConfigError, match=r"train\.model\.image\.image_size is 128 but "
                                          r"preprocess\.image_size is 64"):
        derive_model_shapes({"model": {"image": {"image_size": 128}}}, shapes, "preprocess")


def test_preprocess_output_is_checked_again_before_training(tmp_path):
    write_contract(tmp_path, PreprocessConfig(audio_samples=16000), BYTES)
    assert read_contract(tmp_path)["audio_samples"] == 16000
    with pytest.raises(ConfigError, match=r"train\.model\.audio\.num_samples is 20000 but the "
                                          r"data in .* audio_samples 16000"):
        model_config_for_data(TokenizerConfig(), tmp_path)
    model = dataclasses.replace(TokenizerConfig(), audio=dataclasses.replace(
        TokenizerConfig().audio, num_samples=16000))
    assert model_config_for_data(model, tmp_path) == (model, BYTES)


def test_an_output_without_a_contract_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=f"{CONTRACT_FILE}: no readable data contract"):
        read_contract(tmp_path)
