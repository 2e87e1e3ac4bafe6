"""The unified vocabulary: every codebook and a few markers in one id space.

A downstream language model reads one token stream per sample. Each codebook gets an offset
(image first, then audio, text and, with fusion, joint), and begin/end markers delimit each
modality's run, so streams can be interleaved with other data and split back exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Markers around each modality's run in interleaved_tokens, placed after all codebooks.
SPECIAL_TOKENS = ("<boi>", "<eoi>", "<boa>", "<eoa>", "<bot>", "<eot>", "<boj>", "<eoj>")
# Order of the codebooks in the unified vocabulary and of the runs in interleaved_tokens.
STREAM = (("image", "<boi>", "<eoi>"), ("audio", "<boa>", "<eoa>"), ("text", "<bot>", "<eot>"),
          ("joint", "<boj>", "<eoj>"))

def vocabulary_layout(codebook_sizes: dict[str, int]) -> dict[str, Any]:
    """Offsets of each codebook in the unified vocabulary, then the special tokens.

    ``image`` codes occupy ``[0, K_image)``, ``audio`` the next ``K_audio`` ids, ``text`` the
    next ``K_text``, ``joint`` (with fusion) the next ``K_joint``; the special tokens follow.
    Fixed order, so two runs with the same codebook sizes share a layout.
    """
    offsets, total = {}, 0
    for name, _, _ in STREAM:
        if name in codebook_sizes:
            offsets[name] = total
            total += codebook_sizes[name]
    specials = {token: total + i for i, token in enumerate(SPECIAL_TOKENS)}
    return {"offsets": offsets, "codebook_sizes": dict(codebook_sizes),
            "special_tokens": specials, "vocab_size": total + len(SPECIAL_TOKENS)}


def interleave(codes: dict[str, np.ndarray | None], layout: dict[str, Any]) -> np.ndarray:
    """One sample's codes as a single unified-vocabulary stream for a language model.

    ``<boi> image <eoi> <boa> audio <eoa> <bot> text <eot> <boj> joint <eoj>``; absent
    modalities (None or missing) are left out.
    """
    special, offsets = layout["special_tokens"], layout["offsets"]
    parts = []
    for name, begin, end in STREAM:
        if codes.get(name) is None:
            continue
        parts += [[special[begin]], np.asarray(codes[name], np.int64) + offsets[name],
                  [special[end]]]
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


def split_interleaved(stream: np.ndarray, layout: dict[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of :func:`interleave`: the per-modality codes (offsets removed) of one stream."""
    special, offsets = layout["special_tokens"], layout["offsets"]
    stream = np.asarray(stream, np.int64)
    out = {}
    for name, begin, end in STREAM:
        starts = np.flatnonzero(stream == special[begin])
        if len(starts) == 0:
            continue
        stop = np.flatnonzero(stream == special[end])
        stop = stop[stop > starts[0]]
        if len(stop) == 0:
            raise ValueError(f"interleaved stream has {begin} without {end}")
        out[name] = (stream[starts[0] + 1: stop[0]] - offsets[name]).astype(np.int32)
    return out
