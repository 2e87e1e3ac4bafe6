"""Plain-torch training steps; the Ray layer only wraps them (no Ray imports here).

The generator step is separate from any future discriminator step (taming/DAC style), so an
adversarial loss can be added without branching inside one function.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmvq.batch import ModelInputs

# Layers whose ``weight`` gets weight decay; biases, norms, embeddings and codebooks do not
# (decaying a codebook would shrink codes towards the origin, away from the encoder outputs).
_DECAYED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)


def build_optimizer(
    model: nn.Module,
    lr: float = 2e-3,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.99),
) -> torch.optim.AdamW:
    """AdamW with weight decay on conv/linear weights only (nanoGPT's parameter grouping).

    Parameters
    ----------
    model : the tokenizer, or a DDP wrapper of it
    lr : learning rate
    weight_decay : applied to conv/linear weights
    betas : Adam moments
    """
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_decayed = name == "weight" and isinstance(module, _DECAYED)
            (decay if is_decayed else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel is one pass over all parameters (3x faster than the per-tensor loop on
    # CPU); it exists for CPU and CUDA tensors.
    fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay) or None
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def generator_step(
    model: nn.Module,
    inputs: ModelInputs,
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None = None,
) -> dict[str, float]:
    """One optimisation step on the reconstruction + VQ losses.

    Parameters
    ----------
    model : MultimodalTokenizer or a DistributedDataParallel wrapper of one (it is called as
        ``model(inputs)`` so that DDP's gradient hooks run)
    inputs : the batch
    optimizer : e.g. from :func:`build_optimizer`
    grad_clip : max global gradient norm, or None for no clipping

    Returns
    -------
    The losses as floats (keys as in ``TokenizerOutput.losses``) plus ``grad_norm``, the global
    gradient norm before clipping.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    out = model(inputs)
    out.losses["total"].backward()
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = math.inf if grad_clip is None else grad_clip
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    stats = {name: float(value.detach()) for name, value in out.losses.items()}
    stats["grad_norm"] = float(grad_norm)
    return stats
