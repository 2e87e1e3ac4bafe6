"""Byte-level BPE text vocabulary: training, exact round trips, compression, files and config."""

import json
import random

import numpy as np
import pytest

from mmvq.config import ConfigError, TextCodecConfig, TokenizerConfig, tokenizer_config_from_dict
from mmvq.text_vocab import (
    BYTES,
    FIRST_MERGE_ID,
    PAD_ID,
    PRETOKENIZE_PATTERN,
    VOCAB_SIZE,
    BpeVocab,
    TextVocab,
    decode_ids,
    encode_text,
    pretoken_counts,
    text_config_for,
    train_bpe,
    train_bpe_from_counts,
    vocab_for_config,
)
from pipeline.synth.scenes import caption, sample_scene


def scene_captions(n: int, seed: int) -> list[str]:
    """Captions like the demo's: 'a small white circle left of a large yellow square ...'."""
    rng = np.random.default_rng(seed)
    return [caption(sample_scene(rng)) for _ in range(n)]


@pytest.fixture(scope="module")
def scene_vocab() -> BpeVocab:
    return train_bpe(scene_captions(1000, seed=0), vocab_size=512)


TRICKY = [
    "",
    " ",
    "  two  spaces  ",
    "\n\t\r\x0b\x0c\u2028\u2029\u00a0\u3000",  # every kind of whitespace
    "\x00nul\x7fdel\x01",
    "naïve café – 東京 🎈",
    "👩‍👩‍👧‍👦 family (ZWJ) and 🇫🇷 flag and 👍🏽",  # multi-codepoint emoji
    "e\u0301 combining acute, lone \u0301 mark",
    "\ufeffBOM \ufffd replacement \ufffe noncharacter \U0010ffff last",
    "日本語のキャプション、句読点。",
    "snake_case__dunder__ 123_456 ２３ ²³ Ⅻ",
    "\U000e0001 tag \ue000 private use \U0001f600\U0001f600\U0001f600",
    "a" * 300,
]


def random_unicode(rng: random.Random, length: int) -> str:
    """Code points from every UTF-8 length class (1-4 bytes), surrogates excluded."""
    ranges = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(length))


@pytest.mark.parametrize("vocab_name", ["bytes", "bpe"])
def test_every_string_round_trips_exactly(vocab_name, scene_vocab):
    vocab: TextVocab = BYTES if vocab_name == "bytes" else scene_vocab
    rng = random.Random(0)
    texts = TRICKY + [random_unicode(rng, rng.randint(0, 40)) for _ in range(500)]
    for text in texts:
        ids = vocab.encode(text)
        assert all(0 <= i < vocab.vocab_size and i != PAD_ID for i in ids)
        assert vocab.decode(ids) == text, repr(text)


def test_bpe_falls_back_to_bytes_for_unseen_text(scene_vocab):
    text = "東京 🎈"  # nothing like it in the scene captions
    assert scene_vocab.encode(text) == list(text.encode("utf-8"))


def test_pretokenizer_covers_every_character():
    rng = random.Random(1)
    import re

    pattern = re.compile(PRETOKENIZE_PATTERN)
    for text in TRICKY + [random_unicode(rng, 30) for _ in range(300)]:
        assert "".join(pattern.findall(text)) == text, repr(text)


def test_bpe_compresses_scene_captions_at_least_4x(scene_vocab):
    # Held-out captions (another seed). Measured: 47.0 bytes vs 9.1 BPE ids per caption (5.2x)
    # with 351 ids.
    held_out = scene_captions(500, seed=1)
    bytes_per_caption = np.mean([len(BYTES.encode(c)) for c in held_out])
    ids_per_caption = np.mean([len(scene_vocab.encode(c)) for c in held_out])
    assert bytes_per_caption / ids_per_caption >= 4.0, (bytes_per_caption, ids_per_caption)
    # The scene captions have few distinct words: training stops once no pair repeats.
    assert VOCAB_SIZE < scene_vocab.vocab_size <= 512


def test_training_is_deterministic_and_order_free():
    corpus = scene_captions(300, seed=2)
    shuffled = corpus[:]
    random.Random(3).shuffle(shuffled)
    a, b = train_bpe(corpus, 400), train_bpe(shuffled, 400)
    assert a.to_json() == b.to_json() and a.sha256 == b.sha256
    assert train_bpe(corpus[:150], 400).sha256 != a.sha256  # another corpus, another vocabulary


def test_counts_from_parts_train_the_same_vocabulary():
    corpus = scene_captions(200, seed=4)
    counts = pretoken_counts(corpus[:77])
    counts.update(pretoken_counts(corpus[77:]))
    assert train_bpe_from_counts(counts, 400, num_texts=200).to_json() == \
        train_bpe(corpus, 400).to_json()


def test_most_frequent_pair_first_and_ties_to_the_smallest_pair():
    # ("a","b") and ("c","d") both occur twice: the numerically smaller pair (97, 98) wins.
    vocab = train_bpe(["ab", "cd", "ab", "cd"], vocab_size=VOCAB_SIZE + 2)
    assert vocab.merges == ((97, 98), (99, 100))
    # "xy" three times beats both; a pair seen once is never merged (min_pair_count 2).
    vocab = train_bpe(["xy xy xy", "ab ab", "cd"], vocab_size=VOCAB_SIZE + 10)
    assert vocab.merges[0] == (120, 121)
    assert (99, 100) not in vocab.merges
    assert vocab.vocab_size == FIRST_MERGE_ID + len(vocab.merges) < VOCAB_SIZE + 10


def test_merges_apply_in_training_order_and_never_cross_words():
    # "aaaa" -> (aa)(aa) -> (aaaa); then no pair is left to merge.
    vocab = train_bpe(["aaaa"] * 2, vocab_size=VOCAB_SIZE + 5)
    aa, aaaa = FIRST_MERGE_ID, FIRST_MERGE_ID + 1
    assert vocab.merges == ((97, 97), (aa, aa))
    assert vocab.token_bytes(aaaa) == b"aaaa"
    # Non-overlapping, left to right, earliest merge first: a|a|a|a|a -> aa|aa|a -> aaaa|a.
    assert vocab.encode("aaaaa") == [aaaa, 97]
    assert vocab.encode("aaa") == [aa, 97]
    # A frequent pair across a space ("a b") is no merge: "a" and " b" are separate pre-tokens.
    vocab = train_bpe(["a b"] * 10, vocab_size=VOCAB_SIZE + 5)
    assert vocab.merges == ((32, 98),)


def test_encode_text_truncates_and_pads_with_pad_id(scene_vocab):
    text = "a small white circle left of a large yellow square"
    ids, length = encode_text(text, 64, scene_vocab)
    assert ids.dtype == np.int32 and ids.shape == (64,)
    assert length == len(scene_vocab.encode(text)) < len(text.encode())
    assert (ids[length:] == PAD_ID).all()
    assert decode_ids(ids, length, scene_vocab) == text
    short, n = encode_text(text, 3, scene_vocab)
    assert n == 3 and decode_ids(short, n, scene_vocab) == "a small white"


def test_decode_skips_pad_and_unknown_ids(scene_vocab):
    hello = scene_vocab.encode("a red")
    noisy = hello[:1] + [PAD_ID, scene_vocab.vocab_size + 5, -1] + hello[1:]
    assert scene_vocab.decode(noisy) == "a red"
    # Ids that spell invalid UTF-8 (a model's guess, a cut character) decode to U+FFFD.
    assert scene_vocab.decode([0xFF, 0xE6, 0x9D, 97]) == "\ufffd\ufffda"


def test_save_load_round_trip(tmp_path, scene_vocab):
    path = tmp_path / "text_vocab.json"
    scene_vocab.save(path)
    loaded = BpeVocab.load(path)
    assert loaded == scene_vocab and loaded.sha256 == scene_vocab.sha256
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["vocab_size"] == scene_vocab.vocab_size
    assert data["training"] == {"requested_vocab_size": 512, "min_pair_count": 2,
                                "num_texts": 1000}


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["merges"].__setitem__(0, [98, 97]), "sha256 .* does not match its content"),
    (lambda d: d.__setitem__("version", 99), "version 99"),
    (lambda d: d.__setitem__("pretokenizer", r"\S+"), "another pre-tokenizer"),
    (lambda d: d.__setitem__("vocab_size", 300), "does not match its"),
    (lambda d: d["merges"].append([9999, 1]), "refers to an id"),
    (lambda d: d.__setitem__("merges", [["a", "b"]]), r"list of \[int, int\] pairs"),
])
def test_a_corrupted_vocabulary_file_is_refused_naming_it(tmp_path, scene_vocab, edit, message):
    path = tmp_path / "text_vocab.json"
    data = json.loads(scene_vocab.to_json())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as err:
        BpeVocab.load(path)
    assert str(path) in str(err.value)


def test_unparsable_or_missing_file_is_refused(tmp_path):
    path = tmp_path / "text_vocab.json"
    with pytest.raises(ValueError, match="no text vocabulary file"):
        BpeVocab.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        BpeVocab.load(path)


def test_training_arguments_are_checked():
    with pytest.raises(ValueError, match="must exceed the 257"):
        train_bpe(["abc"], vocab_size=257)
    with pytest.raises(ValueError, match="min_pair_count"):
        train_bpe(["abc"], vocab_size=300, min_pair_count=0)


# ----------------------------------------------------------------------------- config


def test_text_config_defaults_to_bytes_and_takes_a_bpe(scene_vocab):
    cfg = TextCodecConfig()
    assert (cfg.vocab, cfg.vocab_size, cfg.vocab_sha256) == ("bytes", VOCAB_SIZE, None)
    bpe = text_config_for(cfg, scene_vocab)
    assert (bpe.vocab, bpe.vocab_size, bpe.vocab_sha256) == (
        "bpe", scene_vocab.vocab_size, scene_vocab.sha256)
    assert vocab_for_config(bpe, scene_vocab) is scene_vocab
    assert vocab_for_config(cfg, None) is BYTES


@pytest.mark.parametrize(("text", "message"), [
    ({"vocab": "sentencepiece"}, r"text.vocab must be one of \['bytes', 'bpe'\]"),
    ({"vocab_size": 1000}, "text.vocab 'bytes' has vocab_size 257"),
    ({"vocab_sha256": "0" * 64}, "text.vocab 'bytes' has vocab_size 257 and no vocab_sha256"),
    ({"vocab": "bpe", "vocab_size": 257, "vocab_sha256": "0" * 64}, "must exceed 257"),
    ({"vocab": "bpe", "vocab_size": 1000}, "vocab_sha256 must be the 64-hex sha256"),
    ({"vocab": "bpe", "vocab_size": 1000, "vocab_sha256": "XYZ"}, "64-hex"),
    ({"vocab_szie": 1000}, "unknown config key text.vocab_szie"),
])
def test_text_vocab_config_is_strict(text, message):
    with pytest.raises(ConfigError, match=message):
        tokenizer_config_from_dict({"text": text})


def test_config_and_vocabulary_must_agree(scene_vocab):
    from mmvq import MultimodalTokenizer

    bpe = text_config_for(TextCodecConfig(), scene_vocab)
    with pytest.raises(ValueError, match="pass the trained vocabulary"):
        vocab_for_config(bpe, None)
    other = train_bpe(scene_captions(100, seed=9), 300)
    with pytest.raises(ConfigError, match="does not match the text config"):
        MultimodalTokenizer(TokenizerConfig(text=bpe), text_vocab=other)
    with pytest.raises(ConfigError, match="does not match the text config"):
        MultimodalTokenizer(TokenizerConfig(), text_vocab=scene_vocab)


def test_both_vocabularies_share_the_protocol_and_pickle(scene_vocab):
    import pickle

    assert isinstance(BYTES, TextVocab) and isinstance(scene_vocab, TextVocab)
    assert BYTES.pad_id == scene_vocab.pad_id == PAD_ID
    # Ray ships the vocabulary to preprocess actors and train workers by pickling it.
    copy = pickle.loads(pickle.dumps(scene_vocab))
    assert copy == scene_vocab and copy.sha256 == scene_vocab.sha256
    assert copy.encode("a large purple hexagon") == scene_vocab.encode("a large purple hexagon")
