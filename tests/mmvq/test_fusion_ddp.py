"""Under DDP the alignment's negatives are every rank's samples, and only local rows get grads."""

import importlib
from pathlib import Path

import torch

WORLD = 2
DIMS = {"image": 16, "audio": 12, "text": 8}


def _fusion():
    from mmvq.config import FusionConfig
    from mmvq.fusion import Fusion

    torch.manual_seed(0)
    config = FusionConfig(enabled=True, dim=32, num_layers=1, num_heads=4, num_queries=4,
                          codebook_size=32, embed_dim=16)
    return Fusion(config, DIMS)


def _embeddings(rank: int, rows: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    return {m: torch.nn.functional.normalize(torch.randn(rows, 16, generator=g), dim=-1)
            for m in DIMS}


def worker(rank: int, out_dir: str) -> None:
    from mmvq.quantizers.distributed import all_gather_rows_local_grad

    rows = 3 + rank  # ranks with different batch sizes
    x = torch.arange(rows * 2, dtype=torch.float).reshape(rows, 2).add(100 * rank)
    x.requires_grad_()
    gathered = all_gather_rows_local_grad(x)
    gathered.sum().backward()
    fusion = _fusion().train()
    embeddings = {m: e.requires_grad_() for m, e in _embeddings(rank, rows).items()}
    present = {m: torch.ones(rows, dtype=torch.bool) for m in DIMS}
    present["audio"][0] = False
    loss = fusion.alignment_loss(embeddings, present)
    torch.save({"gathered": gathered.detach(), "grad": x.grad, "loss": loss.detach()},
               Path(out_dir) / f"rank{rank}.pt")


def test_alignment_uses_every_ranks_samples_as_negatives(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    importlib.import_module("gloo_ranks").run_on_ranks(Path(__file__).stem, tmp_path, WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    expected_rows = torch.cat([torch.arange(6.0).reshape(3, 2),
                               torch.arange(8.0).reshape(4, 2) + 100])
    for r, result in enumerate(ranks):
        assert torch.equal(result["gathered"], expected_rows)
        assert torch.equal(result["grad"], torch.ones(3 + r, 2))  # own rows only, once each
    # The loss every rank computes is the one-process loss over both ranks' samples.
    parts = [_embeddings(r, 3 + r) for r in range(WORLD)]
    everything = {m: torch.cat([p[m] for p in parts]) for m in DIMS}
    present = {m: torch.ones(7, dtype=torch.bool) for m in DIMS}
    present["audio"][[0, 3]] = False
    single = _fusion().train().alignment_loss(everything, present)
    for result in ranks:
        assert torch.allclose(result["loss"], single, atol=1e-6)
