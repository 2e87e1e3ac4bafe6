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


@pytest.mark.parametrize("pool", ["position_mlp", "mlp", "mean"])
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


def _ordered_pairs(rng: np.random.Generator, n: int, dims: dict[str, int], items: int = 6):
    """Samples that are ordered pairs (a, b) of ``items`` things, a != b: each modality's
    2-position latents hold a's vector then b's (its own basis, plus noise). (a, b) and (b, a)
    have the same latents in another order, as "a circle left of a square" and "a square left
    of a circle" have the same words."""
    pairs = np.array([(a, b) for a in range(items) for b in range(items) if a != b])
    chosen = pairs[rng.integers(0, len(pairs), n)]  # (n, 2)
    classes = chosen[:, 0] * items + chosen[:, 1]
    out = {}
    for m, d in dims.items():
        basis = rng.normal(size=(items, d))
        out[m] = torch.from_numpy(basis[chosen] + rng.normal(0, 0.2, (n, 2, d))).float()
    return out, classes


def test_only_a_probe_that_knows_positions_tells_a_pair_from_its_reverse():
    """The mean of a per-position MLP is the same for a sequence and its reverse; a learned
    bias per position (mmvq.pooling) is what lets retrieval separate (a, b) from (b, a)."""
    rng = np.random.default_rng(0)
    dims = {"image": 10, "text": 7}
    data, classes = _ordered_pairs(rng, 1000, dims)
    train = {m: x[:800] for m, x in data.items()}
    val = {m: x[800:] for m, x in data.items()}
    present = {m: torch.ones(800, dtype=torch.bool) for m in dims}
    recall = {}
    for pool in ("position_mlp", "mlp"):
        probe = fit_probe(train, present, ProbeConfig(steps=300, pool=pool))
        with torch.no_grad():
            emb = probe(val)
        recall[pool] = M.retrieval_recall(emb["image"], emb["text"], (1,), classes[800:])[1]
    # A pair and its reverse look alike to the position-free probe: at best one in two.
    assert recall["mlp"] < 0.6 and recall["position_mlp"] > 0.9, recall
