import numpy as np
import pytest

from mmvq.text_vocab import PAD_ID, VOCAB_SIZE, decode_ids, encode_text


def test_vocabulary_layout():
    assert PAD_ID == 256 and VOCAB_SIZE == 257


@pytest.mark.parametrize("text", ["a small red circle", "", "naïve café – 東京 🎈"])
def test_round_trip(text):
    ids, length = encode_text(text, 64)
    assert ids.dtype == np.int32 and ids.shape == (64,)
    assert length == len(text.encode("utf-8"))
    assert (ids[length:] == PAD_ID).all()
    assert decode_ids(ids, length) == text


def test_truncates_at_max_len_and_replaces_a_cut_character():
    ids, length = encode_text("abcé", 4)  # é is two bytes; only the first fits
    assert length == 4 and list(ids[:3]) == [97, 98, 99]
    assert decode_ids(ids, length) == "abc\ufffd"


def test_decode_skips_non_byte_ids():
    assert decode_ids([104, PAD_ID, 105], 3) == "hi"


def test_max_len_must_be_positive():
    with pytest.raises(ValueError):
        encode_text("x", 0)
