"""Vector quantization with a straight-through estimator (VQ-VAE, van den Oord et al. 2017).

Each latent vector is replaced by its nearest codebook entry. The decoder sees the code's value;
the encoder gets the decoder's gradient through a straight-through estimator (or the rotation
trick), and is held near its code by ``commit_loss``. The codebook learns either by gradient
(``codebook_loss`` pulls codes to the encoder outputs) or by exponential moving averages.

Options, each from the paper that introduced it:

- ``l2_normalize``: cosine-similarity codes on the unit sphere (ViT-VQGAN, Yu et al. 2022).
- ``code_dim``: factorised codes, the lookup runs in a low-dimensional projection (ViT-VQGAN).
- ``rotation_trick``: gradients through a rotation and rescaling instead of the identity
  (Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation Trick").
- ``ema``: codes are running means of their assigned vectors (VQ-VAE appendix A.1; Razavi et
  al. 2019), with Laplace-smoothed counts.
- ``kmeans_init``: Lloyd's k-means on the first training batch (SoundStream, Zeghidour et al.).
- ``restart_threshold``: codes whose EMA usage falls below it are moved onto random recent
  encoder outputs (Jukebox, Dhariwal et al. 2020; Zeghidour et al. 2021).

In training mode EMA statistics, k-means and restarts are synchronised over
``torch.distributed`` ranks (see ``distributed.py``), so every rank must run the forward pass.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mmvq.quantizers.base import (
    QuantizerOutput,
    straight_through,
    vector_weights,
    weighted_mean,
    zero_loss,
)
from mmvq.quantizers.distance import DEFAULT_BLOCK_ELEMENTS, nearest_code
from mmvq.quantizers.distributed import all_reduce_sum_, broadcast_, is_main_rank
from mmvq.quantizers.kmeans import sample_rows, synced_kmeans

__all__ = ["QuantizerOutput", "VectorQuantizer", "nearest_code", "rotate_to"]


def rotate_to(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Rotation trick (Fifty et al. 2024): value exactly ``q``, gradient via a rotation.

    ``x`` is mapped onto ``q`` by ``s R x`` with ``R`` the rotation taking x's direction to q's
    and ``s = |q| / |x|``, both treated as constants. The gradient reaching ``x`` is the
    decoder's gradient rotated back and scaled, so it carries where in its Voronoi cell ``x``
    sits, which the identity (straight-through) gradient discards. ``q`` gets no gradient.

    Parameters
    ----------
    x, q : (N, d) float tensors; encoder outputs and their codes.
    """
    return _RotationTrick.apply(x, q.detach())


class _RotationTrick(torch.autograd.Function):
    """Forward: ``q``. Backward: ``s R^T g``, computed only then (one pass over N x d each)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, q)
        return q.clone()  # exact value q, so lookup(indices) == quantized

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, q = ctx.saved_tensors
        x_norm = x.norm(dim=-1, keepdim=True)  # (N, 1)
        q_norm = q.norm(dim=-1, keepdim=True)  # (N, 1)
        u = x / x_norm.clamp_min(1e-12)  # (N, d) unit x
        v = q / q_norm.clamp_min(1e-12)  # (N, d) unit q
        w = F.normalize(u + v, dim=-1)  # (N, d) the bisector
        # R = I - 2 w w^T + 2 v u^T (paper eq. 4), so R^T g = g - 2 (g.w) w + 2 (g.v) u.
        rotated = (grad - 2.0 * (grad * w).sum(-1, keepdim=True) * w
                   + 2.0 * (grad * v).sum(-1, keepdim=True) * u)
        scaled = rotated * (q_norm / x_norm.clamp_min(1e-12))
        # A zero vector has no direction to rotate: the straight-through gradient instead.
        defined = (x_norm > 1e-6) & (q_norm > 1e-6)  # (N, 1)
        return torch.where(defined, scaled, grad), None


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with a learned or EMA codebook.

    Parameters
    ----------
    codebook_size : int
        Number of codes K.
    dim : int
        Width D of the input and output vectors.
    l2_normalize : bool
        Look up codes by cosine similarity (unit latents and codes); the decoder sees unit codes.
    code_dim : int, optional
        Factorised lookup: project D -> code_dim, search there, project back. None: no
        projection.
    rotation_trick : bool
        Backpropagate through the rotation trick instead of the straight-through identity.
    ema : bool
        Update codes as EMA means of their vectors; then ``codebook_loss`` is 0.
    decay : float
        EMA decay of codes and usage counts.
    eps : float
        Laplace smoothing of the EMA counts.
    kmeans_init : bool
        Initialise codes by k-means on the first training batch.
    kmeans_iters : int
        Lloyd iterations of that k-means.
    restart_threshold : float
        Restart codes whose EMA count of assigned vectors per step is below this; 0: never.
        Counts start at 1, so a never-used code is restarted after about
        ``log(threshold) / log(decay)`` steps.
    max_block_elements : int
        Largest distance block of the nearest-code search (memory bound).

    Raises
    ------
    TypeError
        For ``ema``, ``kmeans_init`` or ``restart_threshold`` in a subclass whose codes are not
        rows it can overwrite (``writable_codes`` False, as in SimVQ).
    """

    # Whether every code is a row of its own that EMA updates, k-means init and restarts can
    # overwrite; a subclass that reparameterises the codebook sets False.
    writable_codes: ClassVar[bool] = True

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        l2_normalize: bool = True,
        *,
        code_dim: int | None = None,
        rotation_trick: bool = False,
        ema: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        restart_threshold: float = 0.0,
        max_block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    ) -> None:
        super().__init__()
        if not self.writable_codes and (ema or kmeans_init or restart_threshold > 0):
            raise TypeError(f"{type(self).__name__} has no code rows to write: ema, kmeans_init "
                            "and restart_threshold do not apply")
        self.codebook_size, self.dim, self.code_dim = codebook_size, dim, code_dim or dim
        self.l2_normalize, self.rotation_trick = l2_normalize, rotation_trick
        self.ema, self.decay, self.eps = ema, decay, eps
        self.kmeans_iters, self.restart_threshold = kmeans_iters, restart_threshold
        self.max_block_elements = max_block_elements
        factorised = self.code_dim != dim
        self.project_in = nn.Linear(dim, self.code_dim) if factorised else nn.Identity()
        self.project_out = nn.Linear(self.code_dim, dim) if factorised else nn.Identity()
        self.build_codebook()
        if ema or restart_threshold > 0:
            # EMA of the vectors assigned to each code per step. It starts at 1, so that with EMA
            # on, embed_sum / cluster_size starts at the initial codes.
            self.register_buffer("cluster_size", torch.ones(codebook_size))
        self._initted = not kmeans_init  # Python mirror of the buffer, to skip a device sync
        if kmeans_init:
            self.register_buffer("initted", torch.tensor(False))

    # -- codebook ------------------------------------------------------------------------------

    def build_codebook(self) -> None:
        """Create the codebook (subclasses reparameterise it here)."""
        codes = torch.empty(self.codebook_size, self.code_dim)
        if self.l2_normalize:
            # Random directions with norm ~1, so that an Adam step of ~lr per coordinate turns a
            # code by a small, lr-proportional angle (a tiny norm would make every step huge).
            nn.init.normal_(codes, std=self.code_dim**-0.5)
        else:
            bound = 1.0 / self.codebook_size  # VQ-VAE's init
            nn.init.uniform_(codes, -bound, bound)
        if self.ema:  # buffers: saved and moved with the model, never touched by the optimiser
            self.register_buffer("embed", codes)
            self.register_buffer("embed_sum", codes.clone())
        else:
            self.codebook = nn.Embedding.from_pretrained(codes, freeze=False)

    def raw_codes(self) -> torch.Tensor:
        """The (K, d) code vectors before normalisation."""
        return self.embed if self.ema else self.codebook.weight

    def codes(self) -> torch.Tensor:
        """The (K, d) fp32 code vectors the lookup compares against."""
        codes = self.raw_codes().float()
        return F.normalize(codes, dim=-1) if self.l2_normalize else codes

    def to_code_space(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, D) encoder outputs -> (N, d) vectors in the space of the codes."""
        x = self.project_in(flat)
        return F.normalize(x, dim=-1) if self.l2_normalize else x

    # -- forward -------------------------------------------------------------------------------

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> QuantizerOutput:
        """Quantise ``z`` of shape (..., D).

        Parameters
        ----------
        z : (..., D) tensor
            Encoder outputs; any leading shape.
        mask : (...) bool tensor, optional
            Which vectors count in the losses and codebook updates (e.g. samples that have this
            modality).
        """
        # Quantisation is done in fp32 whatever the surrounding autocast: distances between
        # nearby unit vectors lose their order in bf16.
        with torch.autocast(device_type=z.device.type, enabled=False):
            lead = z.shape[:-1]
            flat = rearrange(z.float(), "... d -> (...) d")  # (N, D)
            weights = vector_weights(mask, flat.shape[0])  # (N,) or None
            x = self.to_code_space(flat)  # (N, d)
            if self.training:
                self.prepare_codebook(x.detach(), weights)
            codes = self.codes()  # (K, d)
            indices = nearest_code(x.detach(), codes.detach(), self.max_block_elements)  # (N,)
            q = F.embedding(indices, codes)  # (N, d), differentiable w.r.t. a learned codebook
            commit, codebook = self.losses(x, q, weights)
            if self.training:
                self.update_statistics(x.detach(), indices, weights)
            q = rotate_to(x, q) if self.rotation_trick else straight_through(x, q)
            quantized = self.project_out(q).reshape(*lead, self.dim)  # (..., D)
            return QuantizerOutput(quantized, indices.reshape(lead), commit, codebook)

    def losses(
        self, x: torch.Tensor, q: torch.Tensor, weights: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Commitment and codebook losses (VQ-VAE eq. 3) from (N, d) vectors and codes."""
        # Per-vector squared errors (N,); the same value, with the gradient to x or to q.
        commit = weighted_mean((x - q.detach()).pow(2).mean(dim=1), weights)
        if self.ema:  # the EMA update moves the codes; a gradient loss would fight it
            return commit, zero_loss(x)
        return commit, weighted_mean((x.detach() - q).pow(2).mean(dim=1), weights)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for ``indices`` of any shape: (...) long -> (..., D) float32."""
        with torch.autocast(device_type=indices.device.type, enabled=False):
            flat = rearrange(indices, "... -> (...)")  # (N,)
            q = self.project_out(F.embedding(flat, self.codes()))  # (N, D)
            return q.reshape(*indices.shape, self.dim)  # (..., D)

    # -- codebook maintenance (training mode only) ---------------------------------------------

    @torch.no_grad()
    def prepare_codebook(self, x: torch.Tensor, weights: torch.Tensor | None) -> None:
        """Before the lookup: k-means init on the first batch, then dead-code restarts.

        Both happen before the codes enter this step's autograd graph: changing a learned
        codebook in place after it was used would invalidate the saved tensors of the backward.
        """
        if self._initted and self.restart_threshold <= 0:
            return
        samples = x if weights is None else x[weights > 0]  # (n, d) vectors that count
        if not self._initted:
            self._kmeans_init(samples)
        if self.restart_threshold > 0:
            self._restart_dead_codes(samples)

    def _kmeans_init(self, samples: torch.Tensor) -> None:
        if not bool(self.initted):  # a loaded checkpoint is initialised already
            centroids = synced_kmeans(samples, self.codebook_size, self.kmeans_iters,
                                      self.l2_normalize)
            if centroids is None:  # no rank had a vector of this modality: next batch
                return
            self._write_codes(slice(None), centroids, count=1.0)
            self.initted.fill_(True)
        self._initted = True

    def _restart_dead_codes(self, samples: torch.Tensor) -> None:
        # cluster_size is an EMA of all-reduced counts, so every rank finds the same dead codes.
        dead = self.cluster_size < self.restart_threshold  # (K,)
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        if not is_main_rank():  # filled by rank 0's broadcast below
            new = samples.new_empty(num_dead, self.code_dim)
        elif samples.shape[0] > 0:
            new = sample_rows(samples, num_dead)  # (num_dead, d) random recent encoder outputs
        else:  # rank 0 saw no vector this step: keep the codes, only reset their counts
            new = self.raw_codes()[dead].float()
        self._write_codes(dead, broadcast_(new.contiguous()), count=self.restart_threshold)

    def _write_codes(self, rows: torch.Tensor | slice, values: torch.Tensor, count: float) -> None:
        """Set codes ``rows`` ((K,) bool or a slice) to ``values`` (n, d), counted ``count``."""
        if self.ema:
            self.embed[rows] = values
            self.embed_sum[rows] = values * count
        else:
            self.codebook.weight[rows] = values
        if hasattr(self, "cluster_size"):
            self.cluster_size[rows] = count

    @torch.no_grad()
    def update_statistics(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor | None
    ) -> None:
        """After the lookup: EMA of usage counts, and of the codes themselves when ``ema``."""
        if not hasattr(self, "cluster_size"):
            return
        w = x.new_ones(x.shape[0]) if weights is None else weights  # (N,)
        if self.ema:  # (N, 1 + d): the count and the vector, masked vectors zeroed
            rows = torch.cat([w[:, None], x if weights is None else x * w[:, None]], dim=1)
        else:
            rows = w[:, None]  # (N, 1)
        # One collective for counts and sums: (K, 1 + d), or (K, 1) without EMA codes.
        stats = x.new_zeros(self.codebook_size, rows.shape[1]).index_add_(0, indices, rows)
        stats = all_reduce_sum_(stats)
        # A step in which no rank had a vector (no sample with this modality) changes nothing.
        rate = (1.0 - self.decay) * (stats[:, 0].sum() > 0).float()
        self.cluster_size.lerp_(stats[:, 0], rate)
        if self.ema:
            self.embed_sum.lerp_(stats[:, 1:], rate)
            self.embed.copy_(self._ema_codes())

    def _ema_codes(self) -> torch.Tensor:
        total = self.cluster_size.sum().clamp_min(self.eps)
        # Laplace smoothing (as in Sonnet's VectorQuantizerEMA): a code whose count decays to 0
        # keeps a finite value instead of dividing by zero.
        smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        codes = self.embed_sum / smoothed[:, None]  # (K, d)
        return F.normalize(codes, dim=-1) if self.l2_normalize else codes
