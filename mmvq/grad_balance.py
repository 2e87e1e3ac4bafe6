"""Cap one loss's gradient at a shared tensor relative to the gradient the other losses send it.

Fusion's alignment loss reaches the modality codecs through their quantized latents, the same
tensors the decoders read. Its gradient there was about three times the reconstruction
gradient in the fused demo (codec gradient norm 1.13 against 0.39 without fusion), so it set
the codecs' Adam statistics and the global clip, and cost image PSNR (BENCHMARKS.md "Fusion
benchmark"). A fixed loss weight cannot hold a ratio of gradient norms that changes over
training; this does, in the spirit of EnCodec's loss balancer (Défossez et al. 2022, which
normalises each loss's gradient at the decoder output) and the VQGAN adaptive weight (Esser et
al. 2021), one-sided: the capped branch's gradient is scaled down to at most ``ratio`` times
the running norm of the reference branch's gradient, never up.

Use: route the reference consumers (the decoders) through :meth:`GradientCap.reference` and
the capped consumer (the alignment) through :meth:`GradientCap.capped`, both on the same
tensor. Both are the identity in the forward pass. The running norms are per key (modality),
updated in the backward pass; the first steps, before a reference norm exists, are not capped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class GradientCap(nn.Module):
    """Per key: running norm of the reference gradient, and the cap it puts on the other one.

    Parameters
    ----------
    keys : the shared tensors' names (e.g. the modalities)
    ratio : the capped gradient's norm is at most ``ratio`` times the reference's running norm
    decay : of that running norm
    """

    def __init__(self, keys: tuple[str, ...], ratio: float, decay: float = 0.9) -> None:
        super().__init__()
        if ratio <= 0:
            raise ValueError(f"ratio must be positive, got {ratio}")
        self.keys, self.ratio, self.decay = keys, ratio, decay
        # Training-time state only: not saved, so checkpoints do not depend on it.
        self.register_buffer("reference_norm", torch.zeros(len(keys)), persistent=False)
        self.register_buffer("scale", torch.ones(len(keys)), persistent=False)  # last applied

    def reference(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """``x``, recording the norm of the gradient that reaches it through this branch."""
        return _Observe.apply(x, self, self.keys.index(key)) if x.requires_grad else x

    def capped(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """``x``, with the gradient through this branch capped (see the module docstring)."""
        return _Cap.apply(x, self, self.keys.index(key)) if x.requires_grad else x


class _Observe(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cap: GradientCap, index: int) -> torch.Tensor:
        ctx.cap, ctx.index = cap, index
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cap, i = ctx.cap, ctx.index
        norm = grad.detach().float().norm()
        seen = cap.reference_norm[i] > 0
        cap.reference_norm[i] = torch.where(
            seen, cap.decay * cap.reference_norm[i] + (1 - cap.decay) * norm, norm)
        return grad, None, None


class _Cap(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cap: GradientCap, index: int) -> torch.Tensor:
        ctx.cap, ctx.index = cap, index
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cap, i = ctx.cap, ctx.index
        reference = cap.reference_norm[i]
        if float(reference) <= 0:  # no reference yet: nothing to hold the gradient to
            return grad, None, None
        norm = grad.detach().float().norm().clamp_min(1e-12)
        scale = (cap.ratio * reference / norm).clamp(max=1.0)
        cap.scale[i] = scale
        return grad * scale.to(grad.dtype), None, None
