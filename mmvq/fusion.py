"""Fusion: joint tokens over the modalities, and the alignment that makes them mean something.

Each modality tokenizes on its own; fusion reads the modalities' *quantized* latents (so joint
tokens are a function of the modality tokens and a caller with only an image still gets image
tokens). A small transformer runs over learned query tokens followed by every present
modality's latents (average-pooled to at most ``max_tokens_per_modality`` each, for cost), each
tagged with a modality embedding; the queries come out as the joint
latents and are quantized into ``num_queries`` joint tokens per sample (Q-Former-style learned
queries, Li et al. 2023). A pooled embedding per modality (the mean of a small MLP of every
position that knows where the position is, ``FusionConfig.embedding_pool``, :mod:`mmvq.pooling`) feeds a symmetric InfoNCE loss (van den Oord et al.
2018; CLIP, Radford et al. 2021) that pulls the modalities of one sample together, raising the
mutual information between their tokens; under DDP its negatives are every rank's samples.
Modality dropout hides whole modalities during training so fusion works with whatever a sample
has.

Loss balance: only that alignment loss reaches the modality encoders, and the tokenizer caps
its gradient at the latents relative to the reconstruction gradient there
(``FusionConfig.align_grad_ratio``, :mod:`mmvq.grad_balance`). The joint path reads the latents
detached, so the joint tokens' losses (commitment, ``fusion/recon``, ``fusion/diversity``)
shape fusion alone and cannot pull the modality latents away from what reconstruction needs;
the train step clips fusion's gradient apart from the codecs' for the same reason.

The joint tokens get their own training target, without which nothing depends on their value
and the joint codebook collapses to one code: a small head reads the quantized joint tokens
(all queries, in order) and predicts each present modality's pooled quantized latent
(``fusion/recon``). The targets are detached, so the modality encoders cannot make the task
easy by collapsing their own latents, and standardised per feature over the batch (data2vec,
Baevski et al. 2022, also normalises its regression targets): the part every sample shares is
removed, so only what tells samples apart is worth predicting, and the loss is 1 - R^2, 1 for
the best constant guess whatever the latents' scale. A modality hidden by modality dropout is
still a target, so the joint tokens also learn to predict a missing modality from the others.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from mmvq.config import MODALITIES, FusionConfig
from mmvq.losses import info_nce_loss, masked_mean
from mmvq.pooling import PositionMLP
from mmvq.quantizers import build_quantizer
from mmvq.quantizers.distributed import all_gather_rows_local_grad, world_size


@dataclass
class FusionOutput:
    indices: torch.Tensor  # (B, num_queries) joint token ids
    quantized: torch.Tensor  # (B, num_queries, dim)
    embeddings: dict[str, torch.Tensor]  # modality -> (B, embed_dim), unit norm
    # fusion/commit, fusion/codebook, fusion/recon, fusion/diversity, align/infonce,
    # align/caption
    losses: dict[str, torch.Tensor]


class Fusion(nn.Module):
    """Learned queries attend over the modalities' latents and become quantized joint tokens.

    Parameters
    ----------
    config : FusionConfig
    latent_dims : dimension of each modality's quantized latent vectors
    """

    def __init__(self, config: FusionConfig, latent_dims: Mapping[str, int]) -> None:
        super().__init__()
        self.config = config
        self.modalities = tuple(m for m in MODALITIES if m in latent_dims)
        self.project = nn.ModuleDict({m: nn.Linear(latent_dims[m], config.dim)
                                      for m in self.modalities})
        self.modality_embedding = nn.ParameterDict(
            {m: nn.Parameter(torch.randn(config.dim) * 0.02) for m in self.modalities})
        self.queries = nn.Parameter(torch.randn(config.num_queries, config.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(config.dim, config.num_heads, 2 * config.dim,
                                           dropout=0.0, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, config.num_layers,
                                                 enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)
        self.quantizer = build_quantizer(config.quantizer, config.codebook_size, config.dim)
        if self.pools_per_position:  # per position, then averaged
            positional = config.embedding_pool == "position_mlp"
            self.pool = nn.ModuleDict({m: PositionMLP(latent_dims[m], config.dim, positional)
                                       for m in self.modalities})
        self.embed = nn.ModuleDict({m: nn.Linear(config.dim, config.embed_dim)
                                    for m in self.modalities})
        # align/caption: each modality's pooled vector -> logits of the caption's n-gram bag.
        captioned = [m for m in self.modalities if m in config.caption_modalities]
        self.caption = (nn.ModuleDict({m: nn.Linear(config.dim, config.caption_buckets)
                                       for m in captioned})
                        if config.caption_ngrams > 0 and captioned else None)
        # The joint tokens' target: all quantized queries -> each modality's pooled latent.
        joint_width = config.num_queries * config.dim
        self.predict = nn.ModuleDict({
            m: nn.Sequential(nn.Linear(joint_width, config.dim), nn.GELU(),
                             nn.Linear(config.dim, latent_dims[m]))
            for m in self.modalities})

    def forward(self, latents: Mapping[str, torch.Tensor],
                present: Mapping[str, torch.Tensor],
                caption: torch.Tensor | None = None) -> FusionOutput:
        """Joint tokens and modality embeddings for a batch.

        Parameters
        ----------
        latents : modality -> (B, N_m, D_m) quantized latents (image grids flattened)
        present : modality -> (B,) bool, whether the sample has that modality
        caption : (B, caption_buckets) n-gram bag of each sample's text
            (:func:`mmvq.caption_target.caption_bag`), the target of ``align/caption``; rows
            without text are ignored. None: that loss is 0.
        """
        visible = self._drop_modalities(present) if self.training else dict(present)
        limit = self.config.max_tokens_per_modality
        tokens, masks = [], []
        for m in self.modalities:
            # The joint path reads the latents detached: the joint tokens' losses train fusion
            # only, never the modality encoders, so they cannot trade reconstruction for
            # predictability. Only the alignment below reaches the encoders, through the
            # quantized latents, so the modality tokens themselves carry it.
            x = self.project[m](_pool(latents[m].detach().float(), limit))
            x = x + self.modality_embedding[m]  # (B, min(N_m, limit), dim)
            tokens.append(x)
            masks.append(~visible[m][:, None].expand(-1, x.shape[1]))  # True = hidden
        batch = tokens[0].shape[0]
        queries = self.queries.expand(batch, -1, -1)  # (B, Q, dim)
        sequence = torch.cat([queries, *tokens], dim=1)  # (B, Q + sum N_m, dim)
        query_mask = torch.zeros(batch, self.config.num_queries, dtype=torch.bool,
                                 device=sequence.device)
        mask = torch.cat([query_mask, *masks], dim=1)  # (B, Q + sum N_m)
        joint = self.norm(self.transformer(sequence, src_key_padding_mask=mask))
        joint = joint[:, : self.config.num_queries]  # (B, Q, dim)
        flat = rearrange(joint, "b q d -> (b q) d")
        q = self.quantizer(flat)
        quantized = rearrange(q.quantized, "(b q) d -> b q d", b=batch)
        pooled = {m: self.pool_latents(m, latents[m]) for m in self.modalities}  # (B, dim)
        embeddings = {m: nn.functional.normalize(self.embed[m](pooled[m]), dim=-1)
                      for m in self.modalities}
        losses = {"fusion/commit": q.commit_loss, "fusion/codebook": q.codebook_loss,
                  "fusion/recon": self.prediction_loss(quantized, latents, present),
                  "fusion/diversity": self.diversity_loss(flat),
                  "align/infonce": self.alignment_loss(embeddings, present),
                  "align/caption": self.caption_loss(pooled, present, caption)}
        return FusionOutput(indices=rearrange(q.indices, "(b q) -> b q", b=batch),
                            quantized=quantized, embeddings=embeddings, losses=losses)

    @property
    def pools_per_position(self) -> bool:
        """Whether embeddings pool an MLP of every position (``embedding_pool`` position_mlp or
        mlp), so that ``self.pool`` exists and belongs to the alignment heads."""
        return self.config.embedding_pool in ("position_mlp", "mlp")

    def embed_latents(self, latents: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Modality -> (B, embed_dim) unit embeddings of (B, N_m, D_m) quantized latents, for
        InfoNCE and retrieval (also what :mod:`mmvq.head_replay` trains the heads on)."""
        return {m: nn.functional.normalize(self.embed[m](self.pool_latents(m, latents[m])), dim=-1)
                for m in self.modalities}

    def alignment_heads(self) -> list[nn.Parameter]:
        """The parameters only ``align/infonce`` trains: the pooling and embedding heads (for
        ``embedding_pool: mean`` only the embeddings; ``project`` also feeds the joint path).
        The train step clips their gradient apart from the joint path's, whose losses would
        otherwise shrink the alignment's step (BENCHMARKS.md "Joint codebook usage")."""
        heads = [self.embed, self.pool] if self.pools_per_position else [self.embed]
        if self.caption is not None:
            heads.append(self.caption)
        return [p for head in heads for p in head.parameters()]

    def pool_latents(self, modality: str, latents: torch.Tensor) -> torch.Tensor:
        """(B, N, D_m) quantized latents -> (B, dim), the vector the modality's embedding is a
        linear map of (``FusionConfig.embedding_pool``)."""
        if self.pools_per_position:
            return self.pool[modality](latents.float())
        # project is linear, so projecting the mean equals averaging the projections, without
        # projecting every one of the N positions.
        return self.project[modality](latents.float().mean(dim=1))

    def prediction_loss(self, quantized: torch.Tensor, latents: Mapping[str, torch.Tensor],
                        present: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean over modalities of the MSE predicting its standardised pooled latent (B, D_m)
        from the quantized joint tokens (B, Q, dim), on the samples that have the modality."""
        joint = rearrange(quantized, "b q d -> b (q d)")  # query order is part of the code
        terms = []
        for m in self.modalities:
            pooled = latents[m].detach().float().mean(dim=1)  # (B, D_m)
            target = _standardize(pooled, present[m])
            error = (self.predict[m](joint) - target).pow(2).mean(dim=-1)  # (B,)
            terms.append(masked_mean(error, present[m]))
        return torch.stack(terms).mean()

    def diversity_loss(self, joint: torch.Tensor) -> torch.Tensor:
        """``log K - H(p)`` for the batch's mean soft assignment ``p`` over the K joint codes
        (0 when the batch spreads evenly over them); ``joint`` (N, dim) unquantized latents.

        EMA, k-means and restarts keep codes alive in training, but the joint latents of
        complete samples still crowded onto half of the 64 codes on the val split (usage 0.52,
        BENCHMARKS.md "Fusion benchmark"). This term (the batch-entropy half of LFQ's entropy
        penalty, Yu et al. 2023, applied to soft nearest-code assignments) pushes the queries'
        latents apart over the whole codebook. The assignments are soft only so that the term
        has a gradient; ``FusionConfig.diversity_temperature`` keeps them close to the hard
        lookup, or a batch can look evenly spread while its hard codes are not. Quantizers
        without searchable codes (fsq, lfq) give 0.
        """
        to_code_space = getattr(self.quantizer, "to_code_space", None)
        if to_code_space is None:
            return joint.sum() * 0.0
        with torch.autocast(device_type=joint.device.type, enabled=False):
            x = to_code_space(joint.float())  # (N, d)
            codes = self.quantizer.codes().detach()  # (K, d)
            # Cosine codes: similarity over a temperature; others: negative squared distance.
            logits = (x @ codes.T if self.quantizer.l2_normalize
                      else -torch.cdist(x, codes).pow(2)) / self.config.diversity_temperature
            mean = torch.softmax(logits, dim=-1).mean(dim=0)  # (K,)
            entropy = -(mean * mean.clamp_min(1e-12).log()).sum()
            return math.log(codes.shape[0]) - entropy

    def alignment_loss(self, embeddings: Mapping[str, torch.Tensor],
                       present: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean symmetric InfoNCE over modality pairs, on the samples that have both.

        In DDP training the negatives are every rank's samples, not only this rank's (a
        per-rank batch of 16 gives 15 negatives; CLIP gathers them the same way).
        """
        if self.training and world_size() > 1:
            embeddings = {m: all_gather_rows_local_grad(e) for m, e in embeddings.items()}
            present = {m: all_gather_rows_local_grad(p.to(torch.uint8)).bool()
                       for m, p in present.items()}
        terms = []
        for a, b in itertools.combinations(self.modalities, 2):
            both = present[a] & present[b]
            if int(both.sum()) >= 2:  # a contrastive loss needs at least one negative
                terms.append(info_nce_loss(embeddings[a][both], embeddings[b][both],
                                           self.config.temperature))
        if not terms:
            return self.queries.sum() * 0.0  # keeps the graph connected for DDP
        return torch.stack(terms).mean()

    def caption_loss(self, pooled: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor],
                     caption: torch.Tensor | None) -> torch.Tensor:
        """Mean over the captioned modalities of the binary cross-entropy predicting the caption's
        n-gram bag (B, buckets) from the modality's pooled latents (B, dim), on the samples that
        have both the modality and text.

        Per sample the cross-entropy is summed over the buckets and divided by the caption's
        n-gram count, so a long caption does not outweigh a short one and the ~1000 absent
        buckets do not drown the ~20 present ones.
        """
        if self.caption is None or caption is None or "text" not in present:
            anchor = self.caption if self.caption is not None else self.embed
            return sum(p.sum() for p in anchor.parameters()) * 0.0  # keeps DDP's graph whole
        target = caption.float()
        count = target.sum(dim=-1).clamp_min(1.0)  # (B,)
        terms = []
        for m in self.caption:
            logits = self.caption[m](pooled[m])  # (B, buckets)
            error = nn.functional.binary_cross_entropy_with_logits(
                logits, target, reduction="none").sum(dim=-1) / count  # (B,)
            terms.append(masked_mean(error, present[m] & present["text"]))
        return torch.stack(terms).mean()

    def _drop_modalities(self, present: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hide each present modality with probability ``modality_dropout``, keeping >= 1."""
        visible = {m: present[m] & (torch.rand_like(present[m], dtype=torch.float)
                                    >= self.config.modality_dropout) for m in self.modalities}
        stacked = torch.stack([visible[m] for m in self.modalities], dim=1)  # (B, M)
        empty = ~stacked.any(dim=1)
        if empty.any():  # give each emptied sample back its first present modality
            have = torch.stack([present[m] for m in self.modalities], dim=1)  # (B, M)
            first = have.float().argmax(dim=1)
            for i, m in enumerate(self.modalities):
                visible[m] = visible[m] | (empty & (first == i) & present[m])
        return visible


def _pool(x: torch.Tensor, limit: int | None) -> torch.Tensor:
    """(B, N, D) -> (B, min(N, limit), D), averaging neighbouring positions along N."""
    if limit is None or x.shape[1] <= limit:
        return x
    pooled = nn.functional.adaptive_avg_pool1d(rearrange(x, "b n d -> b d n"), limit)
    return rearrange(pooled, "b d n -> b n d")


def _standardize(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Zero mean, unit variance per feature over the rows of ``x`` (B, D) where ``mask`` (B,)
    is true; a feature with no spread becomes 0 (nothing to predict)."""
    weights = mask.to(x.dtype)[:, None]  # (B, 1)
    count = weights.sum().clamp_min(1.0)
    mean = (x * weights).sum(dim=0) / count  # (D,)
    var = ((x - mean).pow(2) * weights).sum(dim=0) / count  # (D,)
    return (x - mean) * torch.rsqrt(var + eps)
