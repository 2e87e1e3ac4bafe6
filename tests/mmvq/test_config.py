import copy
import dataclasses
import json
import pickle

import pytest

from mmvq.config import (
    DEFAULT_LOSS_WEIGHTS,
    JOINT_QUANTIZER,
    AudioCodecConfig,
    ImageCodecConfig,
    QuantizerConfig,
    TextCodecConfig,
    TokenizerConfig,
    config_to_dict,
    tokenizer_config_from_dict,
)


def test_defaults_are_the_tiny_demo_preset():
    cfg = TokenizerConfig()
    assert cfg.image.grid == (8, 8) and cfg.image.downsample == 8
    assert cfg.audio.hop == 80 and cfg.audio.num_frames == 250
    assert cfg.text.max_len == 64
    assert dict(cfg.loss_weights) == dict(DEFAULT_LOSS_WEIGHTS)


def test_round_trip_through_json_keeps_tuples():
    cfg = TokenizerConfig(
        image=ImageCodecConfig(channel_mult=(1, 2, 4, 4)),
        audio=AudioCodecConfig(strides=(2, 4, 10), channel_mult=(1, 2, 4)),
        text=TextCodecConfig(dim=64, num_heads=2),
        quantizer=QuantizerConfig(kind="vq", l2_normalize=False),
        loss_weights={"audio/mel": 2.0},
    )
    plain = json.loads(json.dumps(config_to_dict(cfg)))
    assert plain["audio"]["strides"] == [2, 4, 10]
    back = tokenizer_config_from_dict(plain)
    assert back == cfg
    assert back.audio.strides == (2, 4, 10) and isinstance(back.image.channel_mult, tuple)


def test_partial_dict_keeps_defaults_and_merges_loss_weights():
    cfg = tokenizer_config_from_dict(
        {"audio": {"sample_rate": 16000}, "loss_weights": {"text/ce": 3}}
    )
    assert cfg.audio.sample_rate == 16000 and cfg.audio.strides == (4, 4, 5)
    assert cfg.loss_weights["text/ce"] == 3.0 and cfg.loss_weights["image/l1"] == 1.0


def test_a_partial_nested_mapping_changes_only_its_keys_of_the_fields_default():
    """The joint quantizer's default is not QuantizerConfig(): setting its decay alone used to
    build QuantizerConfig(decay=...), a simvq codebook without EMA, k-means or restarts."""
    cfg = tokenizer_config_from_dict({"fusion": {"enabled": True, "quantizer": {"decay": 0.99}}})
    assert cfg.fusion.quantizer == dataclasses.replace(JOINT_QUANTIZER, decay=0.99)
    assert cfg.fusion.quantizer.kind == "vq" and cfg.fusion.quantizer.ema
    assert tokenizer_config_from_dict({"fusion": {}}).fusion.quantizer == JOINT_QUANTIZER
    # Another kind starts from QuantizerConfig's defaults: vq's EMA settings do not apply to fsq.
    other = tokenizer_config_from_dict({"fusion": {"quantizer": {"kind": "fsq"}}})
    assert other.fusion.quantizer == QuantizerConfig(kind="fsq")
    # A mapping that names every key is what it says, as a saved config is.
    saved = config_to_dict(QuantizerConfig(kind="fsq"))
    assert tokenizer_config_from_dict({"fusion": {"quantizer": saved}}).fusion.quantizer \
        == QuantizerConfig(kind="fsq")


@pytest.mark.parametrize(
    "d, path",
    [
        ({"audio": {"strid": [4]}}, "audio.strid"),
        ({"imgae": {}}, "imgae"),
        ({"quantizer": {"commitment_weight": 0.25}}, "quantizer.commitment_weight"),
        ({"loss_weights": {"image/l2": 1.0}}, "loss_weights.image/l2"),
    ],
)
def test_unknown_keys_are_errors_naming_their_path(d, path):
    with pytest.raises(ValueError, match=f"unknown .*{path}"):
        tokenizer_config_from_dict(d)


@pytest.mark.parametrize(
    "d, path",
    [
        ({"image": {"image_size": "64"}}, "image.image_size"),
        ({"image": {"image_size": 64.0}}, "image.image_size"),
        ({"audio": {"strides": 4}}, "audio.strides"),
        ({"audio": {"strides": [4, "x"]}}, r"audio.strides\[1\]"),
        ({"quantizer": {"l2_normalize": 1}}, "quantizer.l2_normalize"),
        ({"text": 3}, "text"),
    ],
)
def test_wrong_types_are_errors_naming_their_path(d, path):
    with pytest.raises(ValueError, match=path):
        tokenizer_config_from_dict(d)


def test_config_pickles_and_deep_copies():
    # Ray pickles configs to ship them to workers.
    cfg = TokenizerConfig(loss_weights={"audio/mel": 2.0})
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert copy.deepcopy(cfg) == cfg


def test_configs_are_frozen():
    cfg = TokenizerConfig()
    with pytest.raises(AttributeError):
        cfg.image.image_size = 128
    with pytest.raises(TypeError):
        cfg.loss_weights["total"] = 1.0


def test_audio_channel_mult_needs_one_entry_per_stride():
    with pytest.raises(ValueError, match="one entry per stride"):
        AudioCodecConfig(strides=(4, 4, 5), channel_mult=(1, 2))
