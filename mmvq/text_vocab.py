"""Byte-level text vocabulary.

Ids 0..255 are the UTF-8 bytes of the text and id 256 is padding. A byte vocabulary needs no
trained tokenizer file, covers every language and never produces an unknown token, which is what
a tokenizer *of* text for a downstream language model wants (ByT5, Xue et al. 2022).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAD_ID = 256  # one past the last byte value
VOCAB_SIZE = 257  # 256 byte values + PAD


def encode_text(text: str, max_len: int) -> tuple[np.ndarray, int]:
    """Encode ``text`` as UTF-8 byte ids, truncated and padded to ``max_len``.

    Parameters
    ----------
    text : str
        Any Unicode string.
    max_len : int
        Length of the returned id array.

    Returns
    -------
    ids : np.ndarray
        int32 array of shape ``(max_len,)``; positions ``>= length`` hold ``PAD_ID``.
    length : int
        Number of real (non-pad) ids, ``min(len(utf8 bytes), max_len)``.
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    data = text.encode("utf-8")[:max_len]
    ids = np.full((max_len,), PAD_ID, dtype=np.int32)
    ids[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    return ids, len(data)


def decode_ids(ids: Sequence[int] | np.ndarray, length: int) -> str:
    """Decode the first ``length`` ids back to text.

    Ids outside the byte range (``PAD_ID``, or anything a model predicts there) are skipped, and
    invalid UTF-8 (e.g. a multi-byte character cut by truncation) becomes U+FFFD instead of raising.
    """
    head = np.asarray(ids).reshape(-1)[: max(int(length), 0)].astype(np.int64)
    data = bytes(int(i) for i in head if 0 <= i < 256)
    return data.decode("utf-8", errors="replace")
