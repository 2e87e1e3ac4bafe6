"""Two gloo ranks with different data keep bit-identical codebooks (EMA, k-means, restarts)."""

import importlib
from pathlib import Path

import torch

WORLD = 2
STEPS = 6


def make_quantizers() -> dict[str, torch.nn.Module]:
    from mmvq.quantizers import ResidualVQ, VectorQuantizer

    return {
        # k-means on the first batch, EMA codes, restarts of the codes k-means left unused.
        "ema-kmeans-restart": VectorQuantizer(
            64,
            8,
            l2_normalize=False,
            ema=True,
            decay=0.5,
            kmeans_init=True,
            restart_threshold=0.4,
        ),
        # Learned codes (no optimiser step here): only k-means and restarts may change them.
        "learned-cosine-kmeans-restart": VectorQuantizer(
            64, 8, l2_normalize=True, kmeans_init=True, restart_threshold=0.4, decay=0.5
        ),
        "rvq-ema-dropout": ResidualVQ(
            32,
            8,
            num_levels=3,
            quantizer_dropout=1.0,
            ema=True,
            decay=0.5,
            restart_threshold=0.4,
        ),
    }


def run_steps(quantizers: dict[str, torch.nn.Module], rank: int) -> dict[str, int]:
    """Train-mode steps on this rank's own data; returns how many codes each restarted."""
    gen = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    restarts = dict.fromkeys(quantizers, 0)
    for step in range(STEPS):
        z = (torch.randn(4, 16, 8, generator=gen) * (1 + rank)).requires_grad_()
        mask = torch.rand(4, 16, generator=gen) > 0.2
        if step == 2 and rank == 1:
            mask[:] = False  # a rank without this modality must still take part
        for name, q in quantizers.items():
            first = q.levels[0] if hasattr(q, "levels") else q
            restarts[name] += int((first.cluster_size < first.restart_threshold).sum())
            out = q(z, mask)
            (out.quantized.sum() + out.commit_loss + out.codebook_loss).backward()
    return restarts


def worker(rank: int, out_dir: str) -> None:
    torch.manual_seed(0)  # identical initial codebooks, as DDP's initial broadcast gives
    synced = make_quantizers()
    restarts = run_steps(synced, rank)
    # Control: the same run with the collectives switched off must diverge, or the comparison
    # below could not fail.
    distributed = importlib.import_module("mmvq.quantizers.distributed")
    distributed.world_size = lambda: 1
    torch.manual_seed(0)
    unsynced = make_quantizers()
    run_steps(unsynced, rank)
    states = {name: q.state_dict() for name, q in synced.items()}
    control = {name: q.state_dict() for name, q in unsynced.items()}
    torch.save(
        {"synced": states, "unsynced": control, "restarts": restarts},
        Path(out_dir) / f"rank{rank}.pt",
    )


def test_codebooks_stay_bit_identical_across_ranks(tmp_path, monkeypatch):
    # Spawned children import the worker by module name, so make this file importable as a
    # top-level module (children inherit the parent's sys.path).
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    importlib.import_module("gloo_ranks").run_on_ranks(Path(__file__).stem, tmp_path, WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert all(n > 0 for n in ranks[0]["restarts"].values()), ranks[0]["restarts"]
    for name, state in ranks[0]["synced"].items():
        for key, value in state.items():
            assert torch.equal(value, ranks[1]["synced"][name][key]), f"{name}.{key}"
        assert bool(state.get("initted", True)) or name.startswith("rvq")
        initial = make_quantizers_on_seed0()[name].state_dict()
        changed = [k for k in state if not torch.equal(state[k], initial[k])]
        assert changed, f"{name}: nothing was updated"
        diverged = [
            k
            for k in state
            if not torch.equal(ranks[0]["unsynced"][name][k], ranks[1]["unsynced"][name][k])
        ]
        assert diverged, f"{name}: ranks agree even without the collectives"


def make_quantizers_on_seed0() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return make_quantizers()
