"""The unified vocabulary: every codebook and a few markers in one id space.

A downstream language model reads one token stream per sample. Each codebook gets an offset
(image first, then audio, text and, with fusion, joint), and begin/end markers delimit each
modality's run, so streams can be interleaved with other data and split back exactly.

A residual (RVQ) modality has one codebook per level, and each level gets its own id range:
level ``l`` of a modality with offset ``o`` and ``K`` codes per level uses ``[o + l K,
o + (l + 1) K)``. Its run is frame-major (all levels of frame 0, then of frame 1, ...), as
EnCodec/AudioLM-style codec tokens are flattened for a language model, and may hold any leading
number of levels (a lower bitrate); the ids themselves say which level each code belongs to.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Markers around each modality's run in interleaved_tokens, placed after all codebooks.
SPECIAL_TOKENS = ("<boi>", "<eoi>", "<boa>", "<eoa>", "<bot>", "<eot>", "<boj>", "<eoj>")
# Order of the codebooks in the unified vocabulary and of the runs in interleaved_tokens.
STREAM = (("image", "<boi>", "<eoi>"), ("audio", "<boa>", "<eoa>"), ("text", "<bot>", "<eot>"),
          ("joint", "<boj>", "<eoj>"))

def vocabulary_layout(codebook_sizes: dict[str, int],
                      levels: dict[str, int] | None = None) -> dict[str, Any]:
    """Offsets of each codebook in the unified vocabulary, then the special tokens.

    ``image`` codes occupy ``[0, K_image)``, ``audio`` the next ``levels_audio x K_audio`` ids
    (``level_offsets["audio"][l]`` starts level ``l``), ``text`` the next ``K_text``, ``joint``
    (with fusion) the next ``K_joint``; the special tokens follow. Fixed order, so two runs with
    the same codebook sizes and levels share a layout.

    Parameters
    ----------
    codebook_sizes : modality -> codes per codebook (per level)
    levels : modality -> residual levels; missing modalities have 1
    """
    levels = {name: 1 for name in codebook_sizes} | dict(levels or {})
    stray = sorted(set(levels) - set(codebook_sizes))
    if stray or any(n < 1 for n in levels.values()):
        raise ValueError(f"levels {levels} must be >= 1 and name modalities of "
                         f"{sorted(codebook_sizes)}")
    offsets, level_offsets, total = {}, {}, 0
    for name, _, _ in STREAM:
        if name in codebook_sizes:
            offsets[name] = total
            level_offsets[name] = [total + i * codebook_sizes[name] for i in range(levels[name])]
            total += levels[name] * codebook_sizes[name]
    specials = {token: total + i for i, token in enumerate(SPECIAL_TOKENS)}
    return {"offsets": offsets, "codebook_sizes": dict(codebook_sizes), "levels": levels,
            "level_offsets": level_offsets, "special_tokens": specials,
            "vocab_size": total + len(SPECIAL_TOKENS)}


def _levels(layout: dict[str, Any], name: str) -> int:
    # Layouts written before residual levels existed have no "levels": one level each.
    return layout.get("levels", {}).get(name, 1)


def interleave(codes: dict[str, np.ndarray | None], layout: dict[str, Any]) -> np.ndarray:
    """One sample's codes as a single unified-vocabulary stream for a language model.

    ``<boi> image <eoi> <boa> audio <eoa> <bot> text <eot> <boj> joint <eoj>``; absent
    modalities (None or missing) are left out. Codes of a single-level modality are flattened
    row-major; a residual modality's codes are (frames, n) with ``n`` <= its levels, and come
    out frame-major, level ``l`` shifted into its own range.

    Raises
    ------
    ValueError
        If a residual modality's codes are not (frames, n) with 1 <= n <= its levels.
    """
    special, offsets = layout["special_tokens"], layout["offsets"]
    parts = []
    for name, begin, end in STREAM:
        if codes.get(name) is None:
            continue
        array = np.asarray(codes[name], np.int64)
        shift: int | np.ndarray = offsets[name]
        levels = _levels(layout, name)
        if levels > 1:
            if array.ndim != 2 or not 1 <= array.shape[1] <= levels:
                raise ValueError(f"{name} codes must be (frames, n) with 1 <= n <= {levels}, "
                                 f"got shape {array.shape}")
            shift = offsets[name] + layout["codebook_sizes"][name] * np.arange(array.shape[1])
        # (frames, n) + (n,) -> (frames, n), flattened frame-major
        parts += [[special[begin]], (array + shift).reshape(-1), [special[end]]]
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


def split_interleaved(stream: np.ndarray, layout: dict[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of :func:`interleave`: the per-modality codes (offsets removed) of one stream.

    A single-level modality comes back flat; a residual one as (frames, n), ``n`` being the
    number of levels the run holds (read from the ids' ranges).

    Raises
    ------
    ValueError
        If a begin marker has no end marker, or a residual run does not cycle through levels
        0..n-1 frame by frame.
    """
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
        run = stream[starts[0] + 1: stop[0]] - offsets[name]
        if _levels(layout, name) > 1:
            run = _unflatten_levels(run, layout["codebook_sizes"][name], begin)
        out[name] = run.astype(np.int32)
    return out


def _unflatten_levels(run: np.ndarray, size: int, marker: str) -> np.ndarray:
    """A frame-major residual run (level-shifted ids) -> (frames, n) codes."""
    level = run // size  # (frames * n,)
    n = int(level.max()) + 1 if run.size else 1
    if run.size % n or not np.array_equal(level, np.tile(np.arange(n), run.size // n)):
        raise ValueError(f"the {marker} run is not frame-major over levels 0..{n - 1}")
    return (run - level * size).reshape(-1, n)  # (frames, n)
