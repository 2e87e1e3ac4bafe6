"""Text tokens are lossless: 500 random UTF-8 captions (CJK, emoji, RTL, combining marks,
control characters) go through ``mmvq encode`` -> token file -> ``mmvq decode`` unchanged, with
UTF-8 bytes, our BPE and a Hugging Face tokenizer.json as the text vocabulary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from unicode_text import random_strings

from mmvq import MultimodalTokenizer, TokenizerConfig
from mmvq.text_vocab import BYTES, load_text_vocab, train_bpe
from mmvq.vocabulary import split_interleaved
from workflows.cli import main

N = 500


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("text-tokens-model")
    torch.manual_seed(0)
    MultimodalTokenizer(TokenizerConfig()).save(root / "tokenizer")
    return root / "tokenizer"


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    folder = tmp_path_factory.mktemp("captions")
    texts = random_strings(N, seed=7)
    for i, text in enumerate(texts):
        (folder / f"s{i:03d}.txt").write_bytes(text.encode("utf-8"))
    return folder, texts


@pytest.fixture(scope="module")
def vocab_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocabs")
    bpe = train_bpe(random_strings(1500, seed=3), vocab_size=600)
    bpe.save(folder / "text_vocab.json")
    bpe.save_tokenizer_json(folder / "tokenizer.json")
    return {"bpe": folder / "text_vocab.json", "tokenizer.json": folder / "tokenizer.json"}


@pytest.mark.parametrize("vocab", ["bytes", "bpe", "tokenizer.json"])
def test_every_caption_comes_back_exactly(vocab, model_dir, captions, vocab_files, tmp_path):
    folder, texts = captions
    extra = [] if vocab == "bytes" else ["--text-vocab", str(vocab_files[vocab])]
    tokens = tmp_path / "tokens.json"
    assert main(["encode", str(folder), "--model", str(model_dir), "--out", str(tokens),
                 *extra]) == 0
    doc = json.loads(tokens.read_text(encoding="utf-8"))
    layout = doc["vocabulary"]
    expected = BYTES if vocab == "bytes" else load_text_vocab(vocab_files[vocab])
    assert layout["text_tokens"]["kind"] == "ids"
    assert layout["text_tokens"]["sha256"] == expected.sha256
    assert layout["codebook_sizes"]["text"] == expected.vocab_size
    rows = {r["key"]: r for r in doc["samples"]}
    assert len(rows) == N
    for i, text in enumerate(texts):
        row = rows[f"s{i:03d}"]
        assert row["text_tokens"] == expected.encode(text)  # the vocabulary's own ids
        run = split_interleaved(np.asarray(row["interleaved_tokens"]), layout)["text"]
        assert run.tolist() == row["text_tokens"]  # the stream holds the same, whole
    out = tmp_path / "decoded"
    assert main(["decode", str(tokens), "--model", str(model_dir), "--out", str(out),
                 *extra]) == 0
    for i, text in enumerate(texts):
        written = (out / f"s{i:03d}.txt").read_bytes().decode("utf-8")
        assert written == text + "\n", (i, text)  # the file's last newline is not the text's


def test_decode_needs_the_vocabulary_the_tokens_were_made_with(model_dir, captions, vocab_files,
                                                                tmp_path, capsys):
    folder, _ = captions
    tokens = tmp_path / "tokens.parquet"
    assert main(["encode", str(folder / "s000.txt"), "--model", str(model_dir), "--out",
                 str(tokens), "--text-vocab", str(vocab_files["bpe"])]) == 0
    capsys.readouterr()
    assert main(["decode", str(tokens), "--model", str(model_dir),
                 "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "pass the file they were encoded with as --text-vocab" in err
    assert main(["decode", str(tokens), "--model", str(model_dir), "--out", str(tmp_path / "d"),
                 "--text-vocab", str(vocab_files["bpe"])]) == 0


def test_codes_stay_available_and_are_the_codec_codes(model_dir, captions, tmp_path):
    folder, _ = captions
    tokens = tmp_path / "codes.json"
    assert main(["encode", str(folder / "s001.txt"), "--model", str(model_dir), "--out",
                 str(tokens), "--text-tokens", "codes"]) == 0
    doc = json.loads(tokens.read_text(encoding="utf-8"))
    assert doc["vocabulary"]["text_tokens"] == {"kind": "codes"}
    row = doc["samples"][0]
    # One code per text position of the codec, padding included, within its codebook.
    assert len(row["text_tokens"]) == TokenizerConfig().text.max_len
    assert max(row["text_tokens"]) < doc["vocabulary"]["codebook_sizes"]["text"]
    assert main(["decode", str(tokens), "--model", str(model_dir),
                 "--out", str(tmp_path / "d")]) == 0
