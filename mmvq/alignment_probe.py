"""A linear contrastive probe: how much cross-modal agreement a tokenizer's frozen tokens carry.

Cross-modal retrieval needs the modalities' embeddings in one space. A fused tokenizer has its
own heads for that (``MultimodalTokenizer.embed``); a tokenizer trained without fusion has none,
so comparing the two on fusion's heads alone would compare a trained head with no head. The
probe gives every model the same one: each modality's pooled quantized latents
(``MultimodalTokenizer.pooled_latents``, the very vectors fusion's heads read), standardised,
through a linear map of its own into a shared space, fitted with fusion's symmetric InfoNCE
(:func:`mmvq.losses.info_nce_loss`) on training samples while the tokenizer stays frozen. Same
pooling, same head shape and the same loss for every model, so a difference in probe retrieval
is a difference in what the tokens carry (a linear-probe evaluation, as in CLIP's, Radford et
al. 2021, applied across modalities).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from mmvq.losses import info_nce_loss


@dataclass(frozen=True)
class ProbeConfig:
    embed_dim: int = 64  # shared space, fusion's default embed_dim
    temperature: float = 0.07  # fusion's default InfoNCE temperature
    steps: int = 400  # Adam steps over random minibatches of the fitting samples
    batch_size: int = 256  # InfoNCE negatives per step
    lr: float = 3e-3
    weight_decay: float = 1e-2
    seed: int = 0


class AlignmentProbe(nn.Module):
    """Per modality: standardise the (B, D_m) pooled latents, map linearly, normalise."""

    def __init__(self, dims: Mapping[str, int], embed_dim: int) -> None:
        super().__init__()
        self.modalities = tuple(dims)
        self.maps = nn.ModuleDict({m: nn.Linear(d, embed_dim) for m, d in dims.items()})
        for m, d in dims.items():
            self.register_buffer(f"mean_{m}", torch.zeros(d))
            self.register_buffer(f"scale_{m}", torch.ones(d))

    def set_standardization(self, pooled: Mapping[str, torch.Tensor],
                            present: Mapping[str, torch.Tensor]) -> None:
        """Feature means and inverse spreads from the rows where the modality is present."""
        for m in self.modalities:
            rows = pooled[m][present[m]].float()  # (n, D_m)
            getattr(self, f"mean_{m}").copy_(rows.mean(dim=0))
            getattr(self, f"scale_{m}").copy_(rows.std(dim=0).clamp_min(1e-6).reciprocal())

    def forward(self, pooled: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Modality -> (B, embed_dim) unit embeddings."""
        out = {}
        for m in self.modalities:
            x = (pooled[m].float() - getattr(self, f"mean_{m}")) * getattr(self, f"scale_{m}")
            out[m] = nn.functional.normalize(self.maps[m](x), dim=-1)
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


def fit_probe(pooled: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor],
              config: ProbeConfig = ProbeConfig()) -> AlignmentProbe:
    """Fit an :class:`AlignmentProbe` on frozen pooled latents.

    Parameters
    ----------
    pooled : modality -> (N, D_m) pooled quantized latents of the fitting samples
    present : modality -> (N,) bool, whether each sample has that modality
    config : the probe's size and optimisation
    """
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the maps' init
        probe = AlignmentProbe({m: x.shape[1] for m, x in pooled.items()}, config.embed_dim)
    probe.set_standardization(pooled, present)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    n = len(next(iter(pooled.values())))
    for _ in range(config.steps):
        index = torch.randperm(n, generator=generator)[: config.batch_size]
        loss = probe_loss(probe({m: x[index] for m, x in pooled.items()}),
                          {m: p[index] for m, p in present.items()}, config.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return probe.eval()
