"""The unified vocabulary and the interleaved stream a language model reads."""

import numpy as np
import pytest

from mmvq.vocabulary import interleave, split_interleaved, vocabulary_layout


def test_layout_offsets_and_specials_follow_the_codebooks():
    layout = vocabulary_layout({"image": 256, "audio": 128, "text": 64, "joint": 32})
    assert layout["offsets"] == {"image": 0, "audio": 256, "text": 384, "joint": 448}
    assert layout["special_tokens"]["<boi>"] == 480
    assert layout["vocab_size"] == 480 + 8
    without_joint = vocabulary_layout({"image": 4, "audio": 4, "text": 4})
    assert "joint" not in without_joint["offsets"] and without_joint["vocab_size"] == 12 + 8


def test_interleave_round_trips_and_skips_absent_modalities():
    layout = vocabulary_layout({"image": 16, "audio": 16, "text": 16, "joint": 16})
    codes = {"image": np.array([0, 15, 3]), "audio": None, "text": np.array([7, 7]),
             "joint": np.array([1])}
    stream = interleave(codes, layout)
    s = layout["special_tokens"]
    assert stream.tolist() == [s["<boi>"], 0, 15, 3, s["<eoi>"], s["<bot>"], 39, 39, s["<eot>"],
                               s["<boj>"], 49, s["<eoj>"]]
    back = split_interleaved(stream, layout)
    assert set(back) == {"image", "text", "joint"}
    assert back["image"].tolist() == [0, 15, 3] and back["text"].tolist() == [7, 7]
    with pytest.raises(ValueError, match="<boi> without <eoi>"):
        split_interleaved(stream[:3], layout)


def test_tokenizer_reports_its_layout():
    from mmvq import MultimodalTokenizer, TokenizerConfig

    layout = MultimodalTokenizer(TokenizerConfig()).vocabulary()
    assert layout["offsets"] == {"image": 0, "audio": 256, "text": 512}
    assert layout["vocab_size"] == 768 + 8
