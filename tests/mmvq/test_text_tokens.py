"""Text vocabularies as the ids of text tokens: our BPE exported as a Hugging Face
tokenizer.json gives the same ids as ours on text of every script, and a lossy tokenizer is
refused."""

import json
import sys
from pathlib import Path

import pytest

from mmvq.text_vocab import (
    BYTES,
    PAD_ID,
    BpeVocab,
    TokenizerJsonVocab,
    check_lossless,
    load_text_vocab,
    train_bpe,
)

# The random captions are shared with tests/pipeline/test_text_tokens_cli.py.
sys.path.insert(0, str(Path(__file__).parents[1] / "pipeline"))
from unicode_text import random_strings


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(random_strings(2000, seed=0), vocab_size=700)


def test_exported_tokenizer_json_encodes_like_ours(bpe, tmp_path):
    pytest.importorskip("tokenizers")
    path = tmp_path / "tokenizer.json"
    bpe.save_tokenizer_json(path)
    theirs = load_text_vocab(path)
    assert isinstance(theirs, TokenizerJsonVocab)
    assert theirs.vocab_size == bpe.vocab_size  # bytes, <pad> at PAD_ID, one id per merge
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(path))  # what a user's data loader does
    assert tokenizer.token_to_id("<pad>") == PAD_ID
    strings = random_strings(500, seed=1)
    assert len(bpe.merges) > 200  # merges are used, not just bytes
    for text in strings:
        ours = bpe.encode(text)
        assert tokenizer.encode(text, add_special_tokens=False).ids == ours, repr(text)
        assert tokenizer.decode(ours, skip_special_tokens=False) == text
        assert bpe.decode(ours) == text
    # Merges really fire on these strings (the comparison is not only over single bytes).
    assert sum(max(bpe.encode(t), default=0) >= 257 for t in strings) > 250


def test_load_text_vocab_tells_the_two_formats_apart(bpe, tmp_path):
    ours = tmp_path / "text_vocab.json"
    bpe.save(ours)
    assert isinstance(load_text_vocab(ours), BpeVocab)
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="other.json: neither an mmvq BPE"):
        load_text_vocab(tmp_path / "other.json")
    with pytest.raises(ValueError, match="missing.json: no text vocabulary file"):
        load_text_vocab(tmp_path / "missing.json")


def test_a_lossy_tokenizer_is_refused(tmp_path):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    # A BERT-like word-level tokenizer: lower-cases and maps unknown words to [UNK].
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "red": 2}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    vocab = load_text_vocab(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="tokenizer.json: the text vocabulary is lossy"):
        check_lossless(vocab, str(tmp_path / "tokenizer.json"))
    check_lossless(BYTES, "bytes")  # bytes keep everything
