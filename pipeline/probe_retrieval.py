"""Cross-modal retrieval of a trained tokenizer's tokens through the same probe for every model.

Both the evaluate stage's fused-vs-separate comparison and ``make bench-fusion`` score models
this way: each modality's quantized latents of a fitting split (train) go through
:func:`mmvq.alignment_probe.fit_probe` with the tokenizer frozen, and the fitted probe ranks the
val split's samples across modalities (image->text, audio->text, image->audio). The same probe
for a model trained with fusion and one trained without, so a difference is a difference in
what the tokens carry; a fused model's own embedding heads (``MultimodalTokenizer.embed``) are
scored beside it.

A hit is the sample itself or any sample with an identical caption (the same text ids): no
embedding could tell those apart. Chance is the recall a random ranking would get with those
duplicates (:func:`mmvq.metrics.chance_recall`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from mmvq.tokenizer import MultimodalTokenizer

PAIRS = (("image", "text"), ("audio", "text"), ("image", "audio"))
KS = (1, 5, 10)


def caption_groups(text_ids: np.ndarray, text_len: np.ndarray) -> np.ndarray:
    """(N,) ints, equal for samples whose captions (text ids up to their length) are equal."""
    import numpy as np

    captions = [row[:n].astype(np.int32).tobytes()
                for row, n in zip(text_ids, text_len, strict=True)]
    _, groups = np.unique(np.array(captions, dtype=object), return_inverse=True)
    return groups


def split_latents(model: MultimodalTokenizer, split_dir: Path, heads: bool = False,
                  batch_size: int = 64) -> dict[str, Any]:
    """One split's quantized latents, and the fused model's head embeddings when ``heads``.

    Returns ``{"latents": {m: (N, N_m, D_m)}, "present": {m: (N,) bool}, "heads": {m: (N, E)}
    or None, "groups": (N,) caption groups}``.
    """
    import torch

    from mmvq.batch import to_model_inputs
    from mmvq.columns import MODEL_COLUMNS
    from pipeline.formats.preprocessed import read_split

    rows = read_split(split_dir, MODEL_COLUMNS)
    n = len(rows["has_image"])
    latents: dict[str, list[torch.Tensor]] = {}
    embedded: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for begin in range(0, n, batch_size):
            inputs = to_model_inputs({k: v[begin:begin + batch_size] for k, v in rows.items()})
            for m, x in model.latent_sequences(inputs).items():
                latents.setdefault(m, []).append(x.cpu())
            if heads and model.fusion is not None:
                for m, x in model.embed(inputs).items():
                    embedded.setdefault(m, []).append(x.cpu())
    return {"latents": {m: torch.cat(chunks) for m, chunks in latents.items()},
            "present": {m: torch.from_numpy(rows[f"has_{m}"]) for m in latents},
            "heads": {m: torch.cat(c) for m, c in embedded.items()} if embedded else None,
            "groups": caption_groups(rows["text_ids"], rows["text_len"])}


def retrieval(embeddings: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
              groups: np.ndarray) -> dict[str, float]:
    """R@k and median rank (1 = first) per pair over the samples that have both modalities."""
    import numpy as np

    from mmvq import metrics as M

    result = {}
    for a, b in PAIRS:
        both = (present[a] & present[b]).numpy()
        ranks = M.retrieval_ranks(embeddings[a][both], embeddings[b][both], groups[both])
        for k in KS:
            result[f"{a}_to_{b}/r{k}"] = float((ranks < k).float().mean())
        result[f"{a}_to_{b}/median_rank"] = float(np.median(ranks.numpy() + 1))
    return result


def score_model(model: MultimodalTokenizer, fit_dir: Path | None,
                val_dir: Path) -> dict[str, Any]:
    """The probe's retrieval on ``val_dir`` after fitting it on ``fit_dir``, the fused heads'
    beside it, and the val gallery's size, duplicates and chance recall.

    ``fit_dir`` None: no probe (its fit is most of the cost: 800 steps over every position of
    the fitting split's latents, ~2 min for the demo's 672 samples on one CPU), only the heads.

    Returns ``{"val_samples", "shared_caption_samples", "chance": {"r{k}"}, "probe": {pair/r{k},
    pair/median_rank} or None, "heads": the same or None}``.
    """
    import numpy as np
    import torch

    from mmvq import metrics as M
    from mmvq.alignment_probe import fit_probe

    model = model.eval()
    val = split_latents(model, val_dir, heads=True)
    probed = None
    if fit_dir is not None:
        fit = split_latents(model, fit_dir)
        probe = fit_probe(fit["latents"], fit["present"])
        with torch.no_grad():
            probed = retrieval(probe(val["latents"]), val["present"], val["groups"])
    groups = val["groups"]
    sizes = np.unique(groups, return_counts=True)[1]
    return {"val_samples": len(groups),
            "shared_caption_samples": int(sizes[sizes > 1].sum()),
            "chance": {f"r{k}": M.chance_recall(groups, k) for k in KS},
            "probe": probed,
            "heads": (retrieval(val["heads"], val["present"], groups)
                      if val["heads"] is not None else None)}
