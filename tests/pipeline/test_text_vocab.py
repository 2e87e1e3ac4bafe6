"""The BPE text vocabulary in the pipeline: preprocess trains it on the train split's captions
and encodes every caption with it; train sizes the text codec from it."""

import io
import json
from dataclasses import replace

import numpy as np
import pytest
import ray.data
import soundfile
import webdataset as wds
from PIL import Image

from mmvq.config import ConfigError, TextCodecConfig, TokenizerConfig
from mmvq.text_vocab import (
    BYTES,
    FIRST_MERGE_ID,
    VOCAB_FILE,
    BpeVocab,
    decode_ids,
    text_config_for,
    train_bpe,
)
from pipeline.formats.preprocessed import model_config_for_data, read_data_vocab, write_contract
from pipeline.preprocess import PreprocessConfig, fit_text_vocab, run, train_split_captions
from pipeline.stage import StageContext

TRAIN = ["a small red circle left of a large blue square", "a large red star",
         "a small blue circle above a small red star", "a large green square",
         "a small red square right of a large green circle", "a large blue circle"]
VAL = ["zebra zebra zebra xylophone xylophone", "zebra xylophone quartz quartz"]


def _sample(key: str, text: str, split: str | None) -> dict:
    png, flac = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(png, format="PNG")
    soundfile.write(flac, np.zeros(800, np.float32) + 0.1, 8000, format="FLAC")
    sample = {"__key__": key, "png": png.getvalue(), "flac": flac.getvalue(), "txt": text}
    if split is not None:
        sample["json"] = json.dumps({"split": split})
    return sample


@pytest.fixture
def shards(tmp_path):
    directory = tmp_path / "shards"
    directory.mkdir()
    # Two shards; train samples with and without metadata (default_split is train).
    samples = [_sample(f"t{i}", t, "train" if i % 2 else None) for i, t in enumerate(TRAIN)]
    samples += [_sample(f"v{i}", t, "val") for i, t in enumerate(VAL)]
    for index, part in enumerate((samples[::2], samples[1::2])):
        with wds.TarWriter(str(directory / f"shard-{index:06d}.tar")) as sink:
            for sample in part:
                sink.write(sample)
    return directory


CONFIG = PreprocessConfig(image_size=16, sample_rate=8000, audio_samples=800, text_max_len=40,
                          batch_size=4, num_actors=1, text_vocab="bpe", bpe_vocab_size=300)


def test_train_split_captions_reads_split_like_preprocess():
    batch = {"__key__": np.array(["a", "b", "c", "d"]),
             "txt": np.array([b"one", b"two", None, b"\xff"], dtype=object),
             "json": np.array([None, b'{"split": "val"}', b'{"split": "train"}', None],
                              dtype=object)}
    # a: default split (train); b: val; c: no text; d: not UTF-8 (preprocess quarantines it).
    assert train_split_captions(batch, default_split="train") == ["one"]
    assert train_split_captions(batch, default_split="val") == []


def test_bytes_vocabulary_writes_nothing(tmp_path, shards):
    assert fit_text_vocab([str(shards)], "bytes", 300, "train", tmp_path) is BYTES
    assert not (tmp_path / VOCAB_FILE).exists()
    assert read_data_vocab(tmp_path) is BYTES


def test_preprocess_trains_bpe_on_train_captions_and_encodes_with_it(tmp_path, shards,
                                                                     ray_local):
    out = tmp_path / "out"
    out.mkdir()
    summary = run(CONFIG, StageContext(output_dir=out, inputs={"shards": shards}))
    vocab = BpeVocab.load(out / VOCAB_FILE)
    # The same vocabulary as training on the train captions alone, in any order: val captions
    # ("zebra", repeated) never reach it.
    assert vocab == train_bpe(TRAIN[::-1], 300)
    assert vocab.training["num_texts"] == len(TRAIN)
    assert summary["text_vocab"] == {"kind": "bpe", "vocab_size": vocab.vocab_size,
                                     "sha256": vocab.sha256}
    assert read_data_vocab(out) == vocab
    # The same vocabulary for a language model's loader: tokenizers gives our ids.
    from tokenizers import Tokenizer
    exported = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in TRAIN + VAL:
        assert exported.encode(text, add_special_tokens=False).ids == vocab.encode(text)
    for split, texts in (("train", TRAIN), ("val", VAL)):
        rows = ray.data.read_parquet(str(out / split)).take_all()
        decoded = {decode_ids(r["text_ids"], r["text_len"], vocab) for r in rows}
        assert decoded == set(texts)  # val too: unseen words fall back to bytes, exactly
        for r in rows:
            assert list(r["text_ids"][: r["text_len"]]) == vocab.encode(
                decode_ids(r["text_ids"], r["text_len"], vocab))[: CONFIG.text_max_len]
    train_rows = ray.data.read_parquet(str(out / "train")).take_all()
    # Fewer ids than bytes for every train caption (16-50 bytes; some exceed text_max_len).
    assert all(r["text_len"] < len(decode_ids(r["text_ids"], r["text_len"], vocab).encode())
               for r in train_rows)


def test_bpe_with_no_train_captions_is_a_clear_error(tmp_path, ray_local):
    shard = tmp_path / "val-only.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i, text in enumerate(VAL):
            sink.write(_sample(f"v{i}", text, "val"))
    with pytest.raises(ValueError, match="'train' split of 1 shards has no captions"):
        fit_text_vocab([str(shard)], "bpe", 300, "train", tmp_path)
    assert not (tmp_path / VOCAB_FILE).exists()


def test_bpe_vocab_size_is_validated():
    with pytest.raises(ConfigError, match="preprocess.bpe_vocab_size must exceed the 257"):
        PreprocessConfig(bpe_vocab_size=200)


def test_train_sizes_the_text_codec_from_the_data(tmp_path):
    vocab = train_bpe(TRAIN, 300)
    vocab.save(tmp_path / VOCAB_FILE)
    write_contract(tmp_path, PreprocessConfig(), vocab)
    model, found = model_config_for_data(TokenizerConfig(), tmp_path)
    assert found == vocab
    assert (model.text.vocab, model.text.vocab_size, model.text.vocab_sha256) == (
        "bpe", vocab.vocab_size, vocab.sha256)
    # Byte data keeps a byte model; a model config that pins another BPE is refused.
    byte_data = tmp_path / "bytes"
    byte_data.mkdir()
    write_contract(byte_data, PreprocessConfig(), BYTES)
    assert model_config_for_data(TokenizerConfig(), byte_data)[0] == TokenizerConfig()
    other = train_bpe(VAL * 3, 280)
    pinned = replace(TokenizerConfig(), text=text_config_for(TextCodecConfig(), other))
    with pytest.raises(ConfigError, match="pins a BPE vocabulary .* but the data in"):
        model_config_for_data(pinned, tmp_path)
    with pytest.raises(ConfigError, match="was encoded with bytes"):
        model_config_for_data(pinned, byte_data)


def test_bpe_reads_shards_as_preprocess_does(tmp_path, ray_local):
    """The vocabulary trains on what preprocess accepts: a gzip-compressed shard (refused by
    preprocess) and a caption over max_text_bytes (quarantined) teach it nothing. It read them
    with Ray's webdataset reader before, which decompresses and has no cap."""
    import gzip

    plain = tmp_path / "plain.tar"
    with wds.TarWriter(str(plain)) as sink:
        for i, text in enumerate(TRAIN):
            sink.write(_sample(f"t{i}", text, "train"))
        sink.write(_sample("long", "quartz " * 40, "train"))  # 280 bytes
    packed = tmp_path / "packed.tar.gz"
    with wds.TarWriter(str(tmp_path / "inner.tar")) as sink:
        for i, text in enumerate(VAL):
            sink.write(_sample(f"g{i}", text, "train"))
    packed.write_bytes(gzip.compress((tmp_path / "inner.tar").read_bytes()))
    renamed = packed.rename(tmp_path / "packed.tar")  # what a shard list would name
    with pytest.raises(ValueError, match="has no captions"):
        fit_text_vocab([str(renamed)], "bpe", 300, "train", tmp_path)
    (tmp_path / "v").mkdir()
    vocab = fit_text_vocab([str(plain), str(renamed)], "bpe", 300, "train", tmp_path / "v",
                           max_text_bytes=100)
    merged = [vocab.token_bytes(i) for i in range(FIRST_MERGE_ID, vocab.vocab_size)]
    assert merged, "the train captions taught nothing"
    # Pairs only the refused captions have ("zebra", "xylophone", "quartz"), each many times.
    assert not [m for m in merged if any(p in m for p in (b"ze", b"xy", b"ph", b"tz"))], merged
