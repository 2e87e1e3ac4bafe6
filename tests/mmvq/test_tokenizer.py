import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch

from mmvq import ModelInputs, MultimodalTokenizer, TokenizerConfig, to_model_inputs
from mmvq.config import QuantizerConfig
from mmvq.losses import masked_cross_entropy
from mmvq.text_vocab import VOCAB_SIZE
from mmvq.tokenizer import FORMAT_VERSION

LOSS_KEYS = {"image/l1", "audio/l1", "audio/mel", "text/ce", "vq/commit", "vq/codebook", "total"}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MultimodalTokenizer(TokenizerConfig()).eval()


@pytest.fixture
def inputs(make_batch):
    return to_model_inputs(make_batch(4, seed=3))


def replace(inputs: ModelInputs, **changes) -> ModelInputs:
    return dataclasses.replace(inputs, **changes)


def test_forward_shapes_and_losses(model, inputs):
    out = model(inputs)
    rec, idx = out.reconstructions, out.indices
    assert rec["image"].shape == (4, 3, 64, 64)
    assert rec["audio"].shape == (4, 20000)
    assert rec["text_logits"].shape == (4, 64, VOCAB_SIZE)
    assert idx["image"].shape == (4, 8, 8)
    assert idx["audio"].shape == (4, 250)
    assert idx["text"].shape == (4, 64)
    assert set(out.losses) == LOSS_KEYS
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.losses.values())
    weights = model.config.loss_weights
    expected = sum(weights[k] * v for k, v in out.losses.items() if k != "total")
    torch.testing.assert_close(out.losses["total"], expected)


def test_shapes_and_codebook_sizes_describe_the_codes(model, inputs):
    assert model.token_shapes() == {"image": (8, 8), "audio": (250,), "text": (64,)}
    assert model.codebook_sizes() == {"image": 256, "audio": 256, "text": 256}
    codes = model.encode(inputs)
    for name, shape in model.token_shapes().items():
        assert codes[name].shape == (4, *shape)
        assert codes[name].dtype == torch.long
        assert 0 <= codes[name].min() and codes[name].max() < model.codebook_sizes()[name]


def test_decode_of_encode_equals_forward_in_eval_mode(model, inputs):
    with torch.no_grad():
        out = model(inputs)
    codes = model.encode(inputs)
    for name in ("image", "audio", "text"):
        assert torch.equal(codes[name], out.indices[name]), name
    rec = model.decode(codes)
    torch.testing.assert_close(rec["image"], out.reconstructions["image"].clamp(-1, 1))
    torch.testing.assert_close(rec["audio"], out.reconstructions["audio"])
    assert torch.equal(rec["text_ids"], out.reconstructions["text_logits"].argmax(-1))
    assert rec["image"].min() >= -1 and rec["image"].max() <= 1


def test_decode_accepts_any_subset_and_rejects_unknown_names(model, inputs):
    codes = model.encode(inputs)
    assert set(model.decode({"audio": codes["audio"]})) == {"audio"}
    assert set(model.decode({"text": codes["text"], "image": codes["image"]})) == {
        "text_ids",
        "image",
    }
    with pytest.raises(ValueError, match="video"):
        model.decode({"video": codes["audio"]})


def test_absent_modality_contributes_nothing_to_losses(model, inputs):
    # Sample 0 has no image, no audio and no text: whatever its arrays hold, losses are equal.
    masked = replace(
        inputs,
        has_image=torch.tensor([False, True, True, True]),
        has_audio=torch.tensor([False, True, True, True]),
        has_text=torch.tensor([False, True, True, True]),
    )
    image, audio, text = inputs.image.clone(), inputs.audio.clone(), inputs.text_ids.clone()
    image[0] = torch.rand_like(image[0]) * 2 - 1
    audio[0] = torch.randn_like(audio[0])
    text[0] = torch.randint(0, 256, text[0].shape)
    scrambled = replace(masked, image=image, audio=audio, text_ids=text)
    with torch.no_grad():
        a, b = model(masked).losses, model(scrambled).losses
        unmasked = model(replace(scrambled, has_image=inputs.has_image)).losses
    for key in LOSS_KEYS:
        torch.testing.assert_close(a[key], b[key], msg=key)
    assert unmasked["image/l1"] != a["image/l1"]  # the check can fail: the image does count


def test_batch_without_a_modality_still_gives_every_parameter_a_gradient(inputs):
    # DDP requires every parameter to take part in every backward pass.
    model = MultimodalTokenizer(TokenizerConfig())
    none = torch.zeros(4, dtype=torch.bool)
    out = model(replace(inputs, has_image=none, has_text=none))
    assert out.losses["image/l1"].item() == 0.0 and out.losses["text/ce"].item() == 0.0
    out.losses["total"].backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad.abs().sum() == 0 for p in model.image_encoder.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.audio_encoder.parameters())


def test_text_loss_ignores_positions_after_text_len(model, inputs):
    logits = model(inputs).reconstructions["text_logits"].detach()
    keep = inputs.text_len
    base = masked_cross_entropy(logits, inputs.text_ids, keep, inputs.has_text)
    garbage = logits.clone()
    for b, n in enumerate(keep.tolist()):
        garbage[b, n:] = torch.randn_like(garbage[b, n:]) * 100
    assert masked_cross_entropy(garbage, inputs.text_ids, keep, inputs.has_text) == base


def test_inputs_of_the_wrong_shape_are_rejected_with_the_shape(model, inputs):
    with pytest.raises(ValueError, match=r"image must be \(B, 3, 64, 64\)"):
        model.encode(replace(inputs, image=inputs.image[:, :, :32, :32]))
    with pytest.raises(ValueError, match="20000 samples"):
        model.encode(replace(inputs, audio=inputs.audio[:, :1000]))
    with pytest.raises(ValueError, match="length 64"):
        model.encode(replace(inputs, text_ids=inputs.text_ids[:, :10]))


def test_save_load_round_trip_keeps_weights_hash_and_outputs(model, inputs, tmp_path):
    model.save(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["config"]["audio"]["strides"] == [4, 4, 5]
    loaded = MultimodalTokenizer.load(tmp_path / "tok")
    assert not loaded.training  # ready for inference
    assert loaded.config == model.config
    assert loaded.weights_hash() == model.weights_hash()
    codes = model.encode(inputs)
    for name, value in loaded.encode(inputs).items():
        assert torch.equal(value, codes[name])
    assert torch.equal(loaded.decode(codes)["audio"], model.decode(codes)["audio"])


def test_weights_hash_is_deterministic_and_sensitive(model):
    other = MultimodalTokenizer(TokenizerConfig())
    other.load_state_dict(model.state_dict())
    assert other.weights_hash() == model.weights_hash()
    assert len(model.weights_hash()) == 64
    with torch.no_grad():
        next(other.text_decoder.parameters()).view(-1)[0] += 1e-3
    assert other.weights_hash() != model.weights_hash()


def test_load_refuses_another_format_version(model, tmp_path):
    model.save(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version"):
        MultimodalTokenizer.load(tmp_path)


def test_unknown_quantizer_kind_is_rejected():
    with pytest.raises(ValueError, match="'pq'"):
        MultimodalTokenizer(TokenizerConfig(quantizer=QuantizerConfig(kind="pq")))


def test_to_model_inputs_normalises_on_the_device(make_batch):
    batch = make_batch(2, seed=1)
    batch["image"][0, 5, 7] = (0, 255, 51)  # one known pixel, H=5, W=7
    x = to_model_inputs(batch, "cpu")
    assert x.image.shape == (2, 3, 64, 64) and x.image.dtype == torch.float32
    torch.testing.assert_close(x.image[0, :, 5, 7], torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))
    assert x.text_ids.dtype == torch.long and x.audio_len.dtype == torch.long
    assert x.has_audio.dtype == torch.bool and x.batch_size == 2
    np.testing.assert_array_equal(x.text_ids.numpy(), batch["text_ids"])
    tensors = {k: torch.as_tensor(v) for k, v in batch.items() if k not in ("key", "text")}
    assert torch.equal(to_model_inputs(tensors).image, x.image)  # torch input works too


def test_to_model_inputs_takes_read_only_arrays_without_warning(make_batch):
    # Ray Data batches are read-only views of Arrow buffers.
    batch = make_batch(2)
    for value in batch.values():
        value.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = to_model_inputs(batch)
    assert x.image.shape == (2, 3, 64, 64)


def test_to_model_inputs_names_missing_columns(make_batch):
    batch = make_batch(1)
    del batch["audio_len"]
    with pytest.raises(KeyError, match="audio_len"):
        to_model_inputs(batch)


def test_load_names_the_problem_for_broken_checkpoints(model, tmp_path):
    from mmvq.config import TokenizerConfig, config_to_dict
    from mmvq.tokenizer import MultimodalTokenizer

    with pytest.raises(ValueError, match="not a tokenizer checkpoint"):
        MultimodalTokenizer.load(tmp_path / "missing")
    model.save(tmp_path / "ok")
    corrupt = tmp_path / "corrupt"
    model.save(corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="model.safetensors: weights do not load"):
        MultimodalTokenizer.load(corrupt)
    mismatched = tmp_path / "mismatched"
    model.save(mismatched)
    meta = json.loads((mismatched / "config.json").read_text())
    other = config_to_dict(TokenizerConfig())
    other["image"]["codebook_size"] = 64
    meta["config"] = other
    (mismatched / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="weights do not load into the configured model"):
        MultimodalTokenizer.load(mismatched)
