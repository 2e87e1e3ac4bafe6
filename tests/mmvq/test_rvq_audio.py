"""Residual VQ audio tokens in the tokenizer: config, shapes, vocabulary, bitrate, save/load."""

import dataclasses
import itertools
import json
import pickle

import numpy as np
import pytest
import torch

from mmvq import MultimodalTokenizer, TokenizerConfig, to_model_inputs
from mmvq import losses as L
from mmvq.config import (
    AudioCodecConfig,
    FusionConfig,
    ImageCodecConfig,
    QuantizerConfig,
    TextCodecConfig,
    config_to_dict,
    tokenizer_config_from_dict,
)
from mmvq.config_io import ConfigError
from mmvq.tokenizer import FORMAT_VERSION
from mmvq.train_step import build_optimizer, generator_step
from mmvq.vocabulary import interleave, split_interleaved

LEVELS = 4
RVQ = QuantizerConfig(kind="rvq", num_levels=LEVELS, quantizer_dropout=0.5)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = TokenizerConfig(audio_quantizer=RVQ, fusion=FusionConfig(
        enabled=True, dim=32, num_layers=1, num_heads=4, num_queries=4, codebook_size=32))
    return MultimodalTokenizer(config).eval()


@pytest.fixture
def inputs(make_batch):
    return to_model_inputs(make_batch(3, seed=5))


def test_audio_quantizer_overrides_only_audio_and_loads_strictly():
    config = tokenizer_config_from_dict({"audio_quantizer": {"kind": "rvq", "num_levels": 3}})
    assert config.quantizer_for("audio").num_levels == 3
    assert config.quantizer_for("image") == config.quantizer == QuantizerConfig()
    assert pickle.loads(pickle.dumps(config)) == config  # Ray ships configs pickled
    default = TokenizerConfig()
    assert default.quantizer_for("audio") is default.quantizer
    with pytest.raises(ConfigError, match="audio_quantizer.num_levls"):
        tokenizer_config_from_dict({"audio_quantizer": {"kind": "rvq", "num_levls": 3}})
    with pytest.raises(ConfigError, match="applies to audio only"):
        TokenizerConfig(quantizer=QuantizerConfig(kind="rvq"))
    with pytest.raises(ConfigError, match="fusion.quantizer.kind 'rvq'"):
        FusionConfig(quantizer=QuantizerConfig(kind="rvq"))
    with pytest.raises(ValueError, match="unknown audio_quantizer.kind 'pq'"):
        MultimodalTokenizer(TokenizerConfig(audio_quantizer=QuantizerConfig(kind="pq")))


def test_shapes_levels_and_vocabulary_ranges(model):
    assert model.token_shapes()["audio"] == (250, LEVELS)
    assert model.token_shapes()["image"] == (8, 8)  # image and text keep one code per position
    assert model.codebook_levels() == {"image": 1, "audio": LEVELS, "text": 1, "joint": 1}
    layout = model.vocabulary()
    # image [0, 256), audio 4 levels x 256 = [256, 1280), text [1280, 1536), joint [1536, 1568)
    assert layout["offsets"] == {"image": 0, "audio": 256, "text": 1280, "joint": 1536}
    assert layout["level_offsets"]["audio"] == [256, 512, 768, 1024]
    assert layout["levels"]["audio"] == LEVELS
    assert layout["special_tokens"]["<boi>"] == 1568 and layout["vocab_size"] == 1568 + 8
    plain = MultimodalTokenizer(TokenizerConfig())
    assert plain.token_shapes()["audio"] == (250,) and plain.audio_levels == 1
    assert plain.vocabulary()["level_offsets"]["audio"] == [256]


def test_encode_audio_levels_is_a_prefix_and_decode_takes_any_prefix(model, inputs):
    full = model.encode(inputs)
    assert full["audio"].shape == (3, 250, LEVELS)
    assert 0 <= full["audio"].min() and full["audio"].max() < 256
    decoded = {}
    for n in range(1, LEVELS + 1):
        codes = model.encode(inputs, audio_levels=n)
        assert torch.equal(codes["audio"], full["audio"][..., :n])
        assert torch.equal(codes["joint"], full["joint"])  # joint tokens read full-rate audio
        decoded[n] = model.decode({"audio": codes["audio"]})["audio"]
        assert decoded[n].shape == (3, 20000)
    with torch.no_grad():
        forward = model(inputs).reconstructions["audio"]
    torch.testing.assert_close(decoded[LEVELS], forward)  # all levels = the training path
    assert not torch.allclose(decoded[1], decoded[LEVELS])  # the levels do add detail
    for bad in (0, LEVELS + 1):
        with pytest.raises(ValueError, match=f"audio_levels must be in 1..{LEVELS}"):
            model.encode(inputs, audio_levels=bad)
    with pytest.raises(ValueError, match=r"audio tokens must be \(B, frames, n\)"):
        model.decode({"audio": full["audio"][..., 0]})
    plain = MultimodalTokenizer(TokenizerConfig()).eval()
    assert plain.encode(inputs, audio_levels=1)["audio"].shape == (3, 250)
    with pytest.raises(ValueError, match="has one level"):
        plain.encode(inputs, audio_levels=2)


def test_interleave_round_trips_frame_major_levels(model, inputs):
    layout = model.vocabulary()
    codes = model.encode(inputs, audio_levels=3)
    audio = codes["audio"][0, :5].numpy()  # (5 frames, 3 levels)
    stream = interleave({"image": codes["image"][0].numpy(), "audio": audio,
                         "joint": codes["joint"][0].numpy()}, layout)
    s = layout["special_tokens"]
    start = stream.tolist().index(s["<boa>"]) + 1
    run = stream[start: start + 15]
    # Frame-major: frame 0's levels 0, 1, 2, then frame 1's; level l shifted by 256 + 256 l.
    expected = (audio + np.array([256, 512, 768])).reshape(-1)
    assert run.tolist() == expected.tolist() and stream[start + 15] == s["<eoa>"]
    back = split_interleaved(stream, layout)
    assert back["audio"].shape == (5, 3) and np.array_equal(back["audio"], audio)
    assert np.array_equal(back["image"], codes["image"][0].numpy().reshape(-1))
    shuffled = stream.copy()
    shuffled[start], shuffled[start + 1] = shuffled[start + 1], shuffled[start]
    with pytest.raises(ValueError, match="not frame-major"):
        split_interleaved(shuffled, layout)
    with pytest.raises(ValueError, match=r"audio codes must be \(frames, n\)"):
        interleave({"audio": audio.reshape(-1)}, layout)


def test_save_load_keeps_rvq_tokens_identical(model, inputs, tmp_path):
    model.save(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION == 6
    assert meta["config"]["audio_quantizer"]["num_levels"] == LEVELS
    loaded = MultimodalTokenizer.load(tmp_path / "tok")
    assert loaded.config == model.config and loaded.audio_levels == LEVELS
    for n in (1, LEVELS):
        a, b = model.encode(inputs, audio_levels=n), loaded.encode(inputs, audio_levels=n)
        assert all(torch.equal(a[k], b[k]) for k in a), n
    assert loaded.vocabulary() == model.vocabulary()
    # A config that is not the checkpoint's (plain VQ audio) is refused with the file named.
    meta["config"] = config_to_dict(dataclasses.replace(model.config, audio_quantizer=None))
    (tmp_path / "tok" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="model.safetensors: weights do not load"):
        MultimodalTokenizer.load(tmp_path / "tok")


def test_fewer_levels_decode_worse_but_sane_after_a_short_overfit(make_batch):
    """Bitrate/quality trade-off: reconstruction error falls as levels are added.

    A small codec trained 120 steps on one fixed batch with quantizer dropout (DAC's 0.5), EMA
    codebooks with k-means init (EnCodec). The waveform L1 must be non-increasing in the number
    of levels and every level must beat the untrained model; the log-mel distance must be lower
    with all levels than with one (it is flat between the top levels this early in training).
    """
    torch.manual_seed(0)
    config = TokenizerConfig(
        image=ImageCodecConfig(image_size=16), text=TextCodecConfig(max_len=16, dim=32,
                                                                    num_layers=1),
        audio=AudioCodecConfig(num_samples=4000, latent_dim=16, codebook_size=16),
        audio_quantizer=QuantizerConfig(kind="rvq", num_levels=LEVELS, quantizer_dropout=0.5,
                                        ema=True, decay=0.9, kmeans_init=True,
                                        l2_normalize=False))
    model = MultimodalTokenizer(config)
    assert model.quantizers["audio"].quantizer_dropout == 0.5  # the config reaches the RVQ
    inputs = to_model_inputs(make_batch(8, seed=1, cfg=config))

    def errors() -> tuple[list[float], list[float]]:
        model.eval()
        codes = model.encode(inputs)["audio"]  # (B, frames, levels)
        l1, mel = [], []
        for n in range(1, LEVELS + 1):
            audio = model.decode({"audio": codes[..., :n]})["audio"]
            l1.append(float(L.l1_per_sample(audio, inputs.audio).mean()))
            mel.append(float(L.log_mel_distance(inputs.audio, audio, 8000, (128, 512)).mean()))
        return l1, mel

    untrained_l1, _ = errors()
    optimizer = build_optimizer(model, lr=3e-3)
    for _ in range(120):
        generator_step(model, inputs, optimizer)
    l1, mel = errors()
    print("L1 per levels", [round(v, 4) for v in l1], "mel", [round(v, 4) for v in mel])
    assert all(a >= b for a, b in itertools.pairwise(l1)), l1
    assert l1[-1] < 0.9 * l1[0]  # the top levels add real detail
    assert max(l1) < 0.8 * min(untrained_l1)  # one level is coarse, but trained: sane
    assert mel[-1] < mel[0]
