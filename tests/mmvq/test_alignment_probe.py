"""The linear probe finds cross-modal agreement where the latents have it, and none where not."""

import numpy as np
import pytest
import torch

from mmvq import metrics as M
from mmvq.alignment_probe import ProbeConfig, fit_probe


def _latents(classes: np.ndarray, rng: np.random.Generator, dims: dict[str, int],
             related: bool) -> dict[str, torch.Tensor]:
    """(N, 3, D_m) latents whose every position and modality is a different linear image of the
    class (plus noise); with ``related`` False, text is a function of a class the others do
    not see."""
    out = {}
    for m, d in dims.items():
        basis = rng.normal(size=(8, 3, d))
        labels = classes if related or m != "text" else rng.permutation(classes)
        noise = rng.normal(0, 0.5, (len(classes), 3, d))
        out[m] = torch.from_numpy(basis[labels] + noise).float()
    return out


@pytest.mark.parametrize("pool", ["mlp", "mean"])
@pytest.mark.parametrize("related", [True, False])
def test_probe_retrieves_held_out_pairs_only_when_the_latents_agree(related, pool):
    rng = np.random.default_rng(0)
    dims = {"image": 12, "audio": 6, "text": 9}
    train_classes, val_classes = rng.integers(0, 8, 800), rng.integers(0, 8, 200)
    both = np.concatenate([train_classes, val_classes])
    data = _latents(both, np.random.default_rng(0), dims, related)  # same bases, val rows
    train = {m: x[:800] for m, x in data.items()}
    val = {m: x[800:] for m, x in data.items()}
    present = {m: torch.ones(800, dtype=torch.bool) for m in dims}
    # Audio missing from half the fitting samples: the probe fits it from the other half.
    present["audio"][::2] = False
    probe = fit_probe(train, present, ProbeConfig(steps=200, pool=pool))
    with torch.no_grad():
        emb = probe(val)
    groups = val_classes  # same class = same caption: any of them is a hit
    recall = M.retrieval_recall(emb["image"], emb["text"], (1,), groups)[1]
    audio_recall = M.retrieval_recall(emb["image"], emb["audio"], (1,), groups)[1]
    chance = M.chance_recall(groups, 1)
    if related:
        assert recall > 0.9 and audio_recall > 0.7, (recall, audio_recall)
    else:
        assert recall < chance + 0.1, (recall, chance)  # held out: nothing to find
        assert audio_recall > 0.7  # image and audio still agree (chance 0.13)
