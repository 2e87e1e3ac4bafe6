"""A linear contrastive probe: how much cross-modal agreement a tokenizer's frozen tokens carry.

Cross-modal retrieval needs the modalities' embeddings in one space. A fused tokenizer has its
own heads for that (``MultimodalTokenizer.embed``); a tokenizer trained without fusion has none,
so comparing the two on fusion's heads alone would compare a trained head with no head. The
probe gives every model the same one: each modality's quantized latents
(``MultimodalTokenizer.latent_sequences``, what fusion's heads read), standardised, pooled the
way fusion pools them (``FusionConfig.embedding_pool``, :mod:`mmvq.pooling`: by default the
mean of a small MLP of every position that knows where the position is) and mapped linearly into a shared space, fitted with fusion's
symmetric InfoNCE (:func:`mmvq.losses.info_nce_loss`) on training samples while the tokenizer
stays frozen. The same pooling, head and loss for every model, so a difference in probe
retrieval is a difference in what the tokens carry (a probe evaluation, as CLIP's linear probes,
Radford et al. 2021, applied across modalities).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from mmvq.losses import info_nce_loss
from mmvq.pooling import PositionMLP


@dataclass(frozen=True)
class ProbeConfig:
    """The probe's size and optimisation."""

    embed_dim: int = 64  # shared space, fusion's default embed_dim
    pool: str = "position_mlp"  # as FusionConfig.embedding_pool (mmvq.pooling)
    hidden: int = 128  # width of the per-position MLP, fusion's default dim
    temperature: float = 0.07  # fusion's default InfoNCE temperature
    # Adam steps over random minibatches of the fitting samples. At 400 the probe had not
    # converged: on a 300-step demo model's tokens (1536 fitting samples) audio->text R@5 was
    # 0.11 after 400 steps and 0.31 after 800 (BENCHMARKS.md "Fusion benchmark").
    steps: int = 800
    batch_size: int = 256  # InfoNCE negatives per step
    lr: float = 3e-3
    weight_decay: float = 1e-2
    seed: int = 0


class AlignmentProbe(nn.Module):
    """Per modality: standardise the (B, N_m, D_m) latents, pool over positions, map linearly
    to a unit embedding."""

    def __init__(self, dims: Mapping[str, int], config: ProbeConfig) -> None:
        super().__init__()
        self.modalities, self.pool = tuple(dims), config.pool
        width = config.hidden if config.pool in ("position_mlp", "mlp") else None
        if width is not None:
            positional = config.pool == "position_mlp"
            self.position_mlps = nn.ModuleDict({m: PositionMLP(d, width, positional)
                                                for m, d in dims.items()})
        self.maps = nn.ModuleDict({m: nn.Linear(width or d, config.embed_dim)
                                   for m, d in dims.items()})
        for m, d in dims.items():
            self.register_buffer(f"mean_{m}", torch.zeros(d))
            self.register_buffer(f"scale_{m}", torch.ones(d))

    def set_standardization(self, latents: Mapping[str, torch.Tensor],
                            present: Mapping[str, torch.Tensor]) -> None:
        """Feature means and inverse spreads over every position of the rows that have the
        modality."""
        for m in self.modalities:
            rows = latents[m][present[m]].float().flatten(0, 1)  # (n * N_m, D_m)
            getattr(self, f"mean_{m}").copy_(rows.mean(dim=0))
            getattr(self, f"scale_{m}").copy_(rows.std(dim=0).clamp_min(1e-6).reciprocal())

    def forward(self, latents: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Modality -> (B, embed_dim) unit embeddings, from (B, N_m, D_m) latents."""
        out = {}
        for m in self.modalities:
            x = (latents[m].float() - getattr(self, f"mean_{m}")) * getattr(self, f"scale_{m}")
            pooled = x.mean(dim=1) if self.pool == "mean" else self.position_mlps[m](x)
            out[m] = nn.functional.normalize(self.maps[m](pooled), dim=-1)
        return out


def probe_loss(embeddings: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor],
               temperature: float) -> torch.Tensor:
    """Mean symmetric InfoNCE over the modality pairs, on the rows that have both."""
    terms = []
    for a, b in itertools.combinations(embeddings, 2):
        both = present[a] & present[b]
        if int(both.sum()) >= 2:
            terms.append(info_nce_loss(embeddings[a][both], embeddings[b][both], temperature))
    if not terms:
        raise ValueError("no pair of modalities is present together in two or more samples")
    return torch.stack(terms).mean()


def fit_probe(latents: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor],
              config: ProbeConfig = ProbeConfig()) -> AlignmentProbe:
    """Fit an :class:`AlignmentProbe` on frozen latents.

    Parameters
    ----------
    latents : modality -> (N, N_m, D_m) quantized latents of the fitting samples
    present : modality -> (N,) bool, whether each sample has that modality
    config : the probe's size and optimisation
    """
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the maps' init
        probe = AlignmentProbe({m: x.shape[-1] for m, x in latents.items()}, config)
    probe.set_standardization(latents, present)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    n = len(next(iter(latents.values())))
    for _ in range(config.steps):
        index = torch.randperm(n, generator=generator)[: config.batch_size]
        loss = probe_loss(probe({m: x[index] for m, x in latents.items()}),
                          {m: p[index] for m, p in present.items()}, config.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return probe.eval()
