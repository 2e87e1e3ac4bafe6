"""The alignment heads' replay (mmvq.head_replay): more head steps per batch, on real latents."""

import importlib
from pathlib import Path

import pytest
import torch

from mmvq.config import ConfigError, FusionConfig
from mmvq.fusion import Fusion
from mmvq.head_replay import AlignmentHeadTrainer

DIMS = {"image": 16, "audio": 12, "text": 8}
POSITIONS = 4
CLASSES = 16


def _fusion() -> Fusion:
    torch.manual_seed(0)
    config = FusionConfig(enabled=True, dim=32, num_layers=1, num_heads=4, num_queries=4,
                          codebook_size=32, embed_dim=16)
    return Fusion(config, DIMS).train()


def _scenes(n: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Latents of ``n`` samples whose modalities share one of CLASSES hidden classes: each
    modality's (POSITIONS, D) latent is its class prototype plus noise."""
    prototypes = torch.Generator().manual_seed(1234)  # the same classes in every call
    protos = {m: torch.randn(CLASSES, POSITIONS, d, generator=prototypes) for m, d in DIMS.items()}
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES, (n,), generator=g)
    latents = {m: protos[m][labels] + 0.8 * torch.randn(n, POSITIONS, d, generator=g)
               for m, d in DIMS.items()}
    return latents, labels


def _all_present(n: int) -> dict[str, torch.Tensor]:
    return {m: torch.ones(n, dtype=torch.bool) for m in DIMS}


def _class_match(fusion: Fusion, a: str, b: str) -> float:
    """Fraction of held-out ``a`` samples whose nearest ``b`` embedding has their class."""
    latents, labels = _scenes(256, seed=999)
    with torch.no_grad():
        emb = fusion.embed_latents(latents)
    nearest = (emb[a] @ emb[b].T).argmax(dim=1)
    return float((labels[nearest] == labels).float().mean())


def _train(head_steps: int, batches: int = 30, batch: int = 16) -> Fusion:
    """The train step's one update of the heads per batch, plus ``head_steps`` replay ones."""
    fusion = _fusion()
    heads = fusion.alignment_heads()
    main = torch.optim.AdamW(heads, lr=2e-3, weight_decay=0.0)
    replay = AlignmentHeadTrainer(torch.optim.AdamW(heads, lr=2e-3, weight_decay=0.0),
                                  head_steps, capacity=96, seed=0)
    for i in range(batches):
        latents, _ = _scenes(batch, seed=i)
        main.zero_grad(set_to_none=True)
        fusion.alignment_loss(fusion.embed_latents(latents), _all_present(batch)).backward()
        main.step()
        replay.add(latents, _all_present(batch))
        stats = replay.step(fusion)
        assert ("align/head_infonce" in stats) == (head_steps > 0)
    return fusion


def test_the_replay_lifts_retrieval_on_separable_data_above_what_one_step_per_batch_reaches():
    one_step = _train(head_steps=0)
    replayed = _train(head_steps=8)
    for a, b in (("image", "text"), ("audio", "text")):
        assert _class_match(one_step, a, b) < 0.4  # 0.27 and 0.28 (chance 1/16)
        assert _class_match(replayed, a, b) > 0.6  # 0.86 and 0.72


def test_missing_modalities_are_kept_and_only_pairs_present_together_align():
    fusion = _fusion()
    trainer = AlignmentHeadTrainer(torch.optim.SGD(fusion.alignment_heads(), lr=0.1), steps=3,
                                   capacity=8, seed=0)
    latents, _ = _scenes(5, seed=0)
    present = _all_present(5)
    present["audio"][:] = False  # image and text only
    trainer.add(latents, present)
    before = {m: [p.detach().clone() for p in fusion.embed[m].parameters()] for m in DIMS}
    stats = trainer.step(fusion)
    assert stats["align/head_infonce"] > 0
    changed = {m: any(not torch.equal(b, p) for b, p in zip(
        before[m], fusion.embed[m].parameters(), strict=True)) for m in DIMS}
    assert changed == {"image": True, "audio": False, "text": True}  # no pair has audio


def test_the_ring_keeps_the_newest_samples_and_a_wrong_shape_is_named():
    fusion = _fusion()
    trainer = AlignmentHeadTrainer(torch.optim.SGD(fusion.alignment_heads(), lr=0.1), steps=1,
                                   capacity=6, seed=0)
    for seed in range(3):  # 12 samples into 6 places
        latents, _ = _scenes(4, seed=seed)
        trainer.add(latents, _all_present(4))
    assert len(trainer) == 6
    newest, _ = _scenes(4, seed=2)
    kept = trainer._latents["text"]
    for row in newest["text"]:
        assert any(torch.equal(row, k) for k in kept)
    bad = dict(newest, text=torch.zeros(4, POSITIONS + 1, DIMS["text"]))
    with pytest.raises(ValueError, match=r"text latents of shape \(5, 8\)"):
        trainer.add(bad, _all_present(4))


@pytest.mark.parametrize("key, value", [("align_head_steps", -1), ("align_replay_samples", 1),
                                        ("align_head_lr", 0.0)])
def test_bad_replay_settings_are_config_errors_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"fusion.{key}"):
        FusionConfig(**{key: value})


# -- two ranks: the heads stay identical although each rank replays its own samples ------------

WORLD = 2


def worker(rank: int, out_dir: str) -> None:
    fusion = _fusion()
    trainer = AlignmentHeadTrainer(torch.optim.AdamW(fusion.alignment_heads(), lr=1e-2),
                                   steps=4, capacity=32, seed=rank)  # different draws too
    for i in range(3):
        latents, _ = _scenes(8, seed=100 * rank + i)  # different data per rank
        trainer.add(latents, _all_present(8))
        trainer.step(fusion)
    torch.save([p.detach() for p in fusion.alignment_heads()], Path(out_dir) / f"rank{rank}.pt")


def test_ranks_replaying_different_samples_keep_identical_heads(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    importlib.import_module("gloo_ranks").run_on_ranks(Path(__file__).stem, tmp_path, WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    initial = _fusion().alignment_heads()
    assert any(not torch.equal(p, q) for p, q in zip(ranks[0], initial, strict=True))
    for p, q in zip(ranks[0], ranks[1], strict=True):
        assert torch.equal(p, q)
