"""Text encoder and decoder: small transformers with one latent per text-id position.

The ids are UTF-8 bytes or BPE pieces (mmvq.text_vocab); ``TextCodecConfig.vocab_size`` sizes
the embedding and the logits.

The encoder is bidirectional, so each position's code can carry context; the decoder is a
second bidirectional transformer that reads the codes back to id logits. Positions are learned
(GPT-2 style). Padding positions are encoded like any other token (the PAD id), which keeps the
graph identical for every batch; the loss ignores them.
"""

from __future__ import annotations

import torch
from torch import nn

from mmvq.config import TextCodecConfig


def _transformer(cfg: TextCodecConfig) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        d_model=cfg.dim,
        nhead=cfg.num_heads,
        # 2x rather than GPT's 4x: the sequences are short and the FFN dominates CPU time.
        dim_feedforward=2 * cfg.dim,
        dropout=0.0,  # a tokenizer should reconstruct exactly; no dropout, also no train/eval gap
        activation="gelu",
        batch_first=True,
        norm_first=True,  # pre-LN trains stably without warm-up
    )
    # enable_nested_tensor only applies to post-LN layers; saying False silences the warning.
    return nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)


class TextEncoder(nn.Module):
    """(B, L) text ids -> (B, L, latent_dim)."""

    def __init__(self, cfg: TextCodecConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Embedding(cfg.max_len, cfg.dim)
        self.blocks = _transformer(cfg)
        self.norm = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.latent_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)  # (L,)
        h = self.tok(ids) + self.pos(pos)[None]  # (B, L, dim)
        h = self.blocks(h)  # (B, L, dim)
        return self.out(self.norm(h))  # (B, L, latent)


class TextDecoder(nn.Module):
    """(B, L, latent_dim) -> (B, L, vocab_size) logits."""

    def __init__(self, cfg: TextCodecConfig) -> None:
        super().__init__()
        self.inp = nn.Linear(cfg.latent_dim, cfg.dim)
        self.pos = nn.Embedding(cfg.max_len, cfg.dim)
        self.blocks = _transformer(cfg)
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(z.shape[1], device=z.device)  # (L,)
        h = self.inp(z) + self.pos(pos)[None]  # (B, L, dim)
        h = self.blocks(h)  # (B, L, dim)
        return self.head(self.norm(h))  # (B, L, vocab_size)
