"""A tokenizer with a BPE text vocabulary: learns captions exactly, and its checkpoint carries the
vocabulary so that a fresh process decodes the same strings."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from mmvq import MultimodalTokenizer, TokenizerConfig, to_model_inputs
from mmvq.config import AudioCodecConfig, ImageCodecConfig, TextCodecConfig
from mmvq.metrics import exact_match, token_accuracy
from mmvq.text_vocab import VOCAB_FILE, decode_ids, encode_text, text_config_for, train_bpe
from mmvq.train_step import build_optimizer, generator_step
from pipeline.synth.scenes import caption, sample_scene

MAX_LEN = 16  # BPE ids per caption; the longest scene caption takes 15 (81 bytes)
MAX_STEPS = 100  # measured: token accuracy 1.0 after 50 steps (about 4 s of CPU)


def captions(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [caption(sample_scene(rng)) for _ in range(n)]


@pytest.fixture(scope="module")
def vocab():
    return train_bpe(captions(500, seed=0), vocab_size=512)


def small_config(vocab) -> TokenizerConfig:
    # Small image and audio codecs: this test is about text, and every branch runs each step.
    return TokenizerConfig(
        image=ImageCodecConfig(image_size=16, base_channels=8, latent_dim=8, codebook_size=16),
        audio=AudioCodecConfig(num_samples=800, base_channels=4, latent_dim=8, codebook_size=16),
        text=text_config_for(TextCodecConfig(max_len=MAX_LEN), vocab),
    )


def text_batch(texts: list[str], vocab, cfg: TokenizerConfig) -> dict[str, np.ndarray]:
    n = len(texts)
    encoded = [encode_text(t, cfg.text.max_len, vocab) for t in texts]
    assert all(length < cfg.text.max_len for _, length in encoded)  # nothing truncated
    return {
        "image": np.zeros((n, cfg.image.image_size, cfg.image.image_size, 3), np.uint8),
        "audio": np.zeros((n, cfg.audio.num_samples), np.float32),
        "audio_len": np.zeros(n, np.int64),
        "text_ids": np.stack([ids for ids, _ in encoded]),
        "text_len": np.array([length for _, length in encoded], np.int64),
        "has_image": np.zeros(n, bool), "has_audio": np.zeros(n, bool), "has_text": np.ones(n, bool),
    }


@pytest.fixture(scope="module")
def trained(vocab):
    """A BPE tokenizer fitted to 8 captions, the batch, and its accuracy every 10 steps."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module scope: conftest's per-test single-thread fixture is not on
    cfg = small_config(vocab)
    texts = captions(8, seed=1)
    inputs = to_model_inputs(text_batch(texts, vocab, cfg))
    model = MultimodalTokenizer(cfg, text_vocab=vocab)
    optimizer = build_optimizer(model, lr=2e-3)
    accuracy = []
    for step in range(MAX_STEPS):
        generator_step(model, inputs, optimizer, grad_clip=1.0)
        if step % 10 == 9:
            model.eval()
            predicted = model.decode(model.encode(inputs))["text_ids"]
            model.train()
            accuracy.append(token_accuracy(inputs.text_ids, predicted, inputs.text_len).mean())
            if accuracy[-1] == 1.0:
                break
    torch.set_num_threads(threads)
    return model.eval(), texts, inputs, accuracy


def test_bpe_text_codec_overfits_a_small_batch(trained):
    model, texts, inputs, accuracy = trained
    # Measured (seed 0): 0.59 after 10 steps, 0.98 after 40, 1.0 after 50.
    assert accuracy[0] < 0.9 and accuracy[-1] == 1.0, accuracy
    predicted = model.decode(model.encode(inputs))["text_ids"]
    assert exact_match(inputs.text_ids, predicted, inputs.text_len).all()
    decoded = [decode_ids(predicted[i].numpy(), int(inputs.text_len[i]), model.text_vocab)
               for i in range(len(texts))]
    assert decoded == texts


def test_checkpoint_carries_the_vocabulary_to_a_fresh_process(trained, tmp_path):
    model, texts, inputs, _ = trained
    model.save(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["config"]["text"]["vocab"] == "bpe"
    assert meta["config"]["text"]["vocab_sha256"] == model.text_vocab.sha256
    assert (tmp_path / VOCAB_FILE).is_file()
    tokens = model.encode(inputs)["text"]
    np.save(tmp_path / "tokens.npy", tokens.numpy())
    np.save(tmp_path / "lengths.npy", inputs.text_len.numpy())
    script = f"""
import json, sys
import numpy as np, torch
from mmvq import MultimodalTokenizer
from mmvq.text_vocab import decode_ids
model = MultimodalTokenizer.load({str(tmp_path)!r})
tokens = torch.from_numpy(np.load({str(tmp_path / "tokens.npy")!r}))
lengths = np.load({str(tmp_path / "lengths.npy")!r})
ids = model.decode({{"text": tokens}})["text_ids"]
json.dump([decode_ids(ids[i].numpy(), int(lengths[i]), model.text_vocab)
           for i in range(len(lengths))], sys.stdout)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout) == texts


def test_save_load_bpe_gives_identical_tokens_and_decodes(trained, tmp_path):
    model, _, inputs, _ = trained
    model.save(tmp_path)
    loaded = MultimodalTokenizer.load(tmp_path)
    assert loaded.text_vocab == model.text_vocab and loaded.config == model.config
    tokens = model.encode(inputs)
    assert torch.equal(loaded.encode(inputs)["text"], tokens["text"])
    assert torch.equal(loaded.decode(tokens)["text_ids"], model.decode(tokens)["text_ids"])


def test_missing_vocab_file_is_a_clear_error(trained, tmp_path):
    model = trained[0]
    model.save(tmp_path)
    (tmp_path / VOCAB_FILE).unlink()
    with pytest.raises(ValueError, match=rf"{VOCAB_FILE}: missing; the checkpoint's text.vocab"):
        MultimodalTokenizer.load(tmp_path)


def test_corrupted_vocab_file_is_a_clear_error(trained, tmp_path):
    model = trained[0]
    model.save(tmp_path)
    path = tmp_path / VOCAB_FILE
    data = json.loads(path.read_text())
    data["merges"][3] = data["merges"][3][::-1]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"{VOCAB_FILE}: text vocabulary sha256 .* does not "
                                         r"match its content"):
        MultimodalTokenizer.load(tmp_path)


def test_another_valid_vocabulary_is_a_clear_error(trained, tmp_path):
    model = trained[0]
    model.save(tmp_path)
    train_bpe(captions(300, seed=5), vocab_size=400).save(tmp_path / VOCAB_FILE)
    with pytest.raises(ValueError, match=rf"{VOCAB_FILE}: vocabulary sha256 .* is not the one "
                                         r"config.json records"):
        MultimodalTokenizer.load(tmp_path)


def test_byte_checkpoint_has_no_vocab_file_and_drops_a_stale_one(tmp_path, vocab, trained):
    trained[0].save(tmp_path)
    cfg = replace(small_config(vocab), text=TextCodecConfig(max_len=MAX_LEN))
    MultimodalTokenizer(cfg).save(tmp_path)  # overwrite with a byte-level checkpoint
    assert not (tmp_path / VOCAB_FILE).exists()
    assert MultimodalTokenizer.load(tmp_path).text_vocab.kind == "bytes"
