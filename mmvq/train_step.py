"""Plain-torch training steps; the Ray layer only wraps them (no Ray imports here).

Generator and discriminator steps are separate functions (taming/DAC style):

- :func:`generator_step`: reconstruction + VQ losses only (the demo and the pipeline).
- :func:`gan_generator_step`: the same plus LPIPS and adaptive-weighted adversarial losses.
- :func:`discriminator_step`: hinge or vanilla discriminator loss on real vs reconstructed.

A GAN loop per batch::

    stats, recon = gan_generator_step(model, inputs, opt, discs, gan, step, perceptual)
    stats |= discriminator_step(recon, inputs, discs, d_opt, gan, step)

Every step takes one batch or a list of micro-batches (gradient accumulation: one optimizer
step over their mean loss, DDP's all-reduce only after the last one) and an optional autocast
dtype (bf16 on GPU; the quantizers compute in fp32 inside it). The rest of a training run lives
here too, as plain torch: the learning-rate schedule (:func:`warmup_cosine`) and the EMA of the
generator (:func:`update_ema`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from mmvq import losses as L
from mmvq.batch import ModelInputs
from mmvq.config import GanConfig
from mmvq.head_replay import AlignmentHeadTrainer
from mmvq.scoring import codebook_stats
from mmvq.tokenizer import TokenizerOutput

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


Batches = ModelInputs | Sequence[ModelInputs]  # one batch, or micro-batches of one step


def generator_step(
    model: nn.Module,
    inputs: Batches,
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None = None,
    amp_dtype: torch.dtype | None = None,
    heads: AlignmentHeadTrainer | None = None,
) -> dict[str, float]:
    """One optimisation step on the reconstruction + VQ losses.

    Parameters
    ----------
    model : MultimodalTokenizer or a DistributedDataParallel wrapper of one (it is called as
        ``model(inputs)`` so that DDP's gradient hooks run)
    inputs : the batch, or a list of micro-batches whose mean loss makes one step
    optimizer : e.g. from :func:`build_optimizer`
    grad_clip : max global gradient norm, or None for no clipping
    amp_dtype : autocast dtype for the forward pass (``torch.bfloat16`` on GPU), None for fp32
    heads : with fusion, the alignment heads' replay trainer: it keeps each micro-batch's
        latents and updates the heads after the step (``align/head_infonce``); None: no replay

    Returns
    -------
    The losses as floats (keys as in ``TokenizerOutput.losses``), the batch's codebook
    statistics (:func:`code_stats`), all averaged over micro-batches, plus
    ``grad_norm``, the gradient norm before clipping (of everything but fusion, whose joint
    path and alignment heads are clipped on their own and reported as ``fusion/grad_norm`` and
    ``align/grad_norm``).
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    micro = _as_list(inputs)
    stats: dict[str, float] = {}
    for mb, last in _with_last(micro):
        with _no_sync(model, last):
            with _autocast(mb, amp_dtype):
                out = model(mb)
            (out.losses["total"] / len(micro)).backward()
        _accumulate(stats, _loss_stats(out) | code_stats(model, out, mb), len(micro))
        _keep_latents(heads, out, mb)
    stats |= _clip_and_step(model, optimizer, grad_clip)
    return stats | _train_heads(heads, model)


def _keep_latents(heads: AlignmentHeadTrainer | None, out: TokenizerOutput,
                  inputs: ModelInputs) -> None:
    if heads is not None and out.latents:
        heads.add(out.latents, {"image": inputs.has_image, "audio": inputs.has_audio,
                                "text": inputs.has_text})


def _train_heads(heads: AlignmentHeadTrainer | None, model: nn.Module) -> dict[str, float]:
    """The replay's head updates, after the model's own step (outside DDP's forward, so on
    the unwrapped fusion module)."""
    fusion = getattr(_unwrap(model), "fusion", None)
    return heads.step(fusion) if heads is not None and fusion is not None else {}


def code_stats(model: nn.Module, out: TokenizerOutput, inputs: ModelInputs) -> dict[str, float]:
    """Codebook usage (fraction of codes used) and perplexity per codebook over one batch.

    Keys as evaluate's (:func:`mmvq.scoring.codebook_stats`): ``image/codebook_usage``,
    ``image/codebook_perplexity``, the same for ``audio``, ``text`` and (fusion) ``joint``, and
    ``audio/codebook_usage_level{k}`` per level of residual audio. Only samples that carry the
    modality count; a collapsing codebook shows here long before it shows in the losses.
    """
    sizes = _unwrap(model).codebook_sizes()
    present = {"image": inputs.has_image, "audio": inputs.has_audio, "text": inputs.has_text}
    codes = {m: out.indices[m][mask] for m, mask in present.items()}
    if "joint" in out.indices:  # fusion: every sample has joint tokens
        codes["joint"] = out.indices["joint"]
    return codebook_stats(codes, sizes)


def _as_list(inputs: Batches) -> list[ModelInputs]:
    micro = [inputs] if isinstance(inputs, ModelInputs) else list(inputs)
    if not micro:
        raise ValueError("a train step needs at least one batch")
    return micro


def _with_last(items: Sequence) -> Iterator[tuple]:
    """(item, is_last) pairs."""
    return ((item, i == len(items) - 1) for i, item in enumerate(items))


def _no_sync(module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` on every wrapped module under ``module`` unless ``last``.

    Gradient accumulation: the micro-batches before the last only add up local gradients, and
    the last backward all-reduces the sum once (a DDP all-reduce per micro-batch would cost
    ``n`` times the communication for the same result).
    """
    stack = contextlib.ExitStack()
    if not last:
        wrapped = [module] if hasattr(module, "no_sync") else [
            m for m in module.children() if hasattr(m, "no_sync")]
        for m in wrapped:
            stack.enter_context(m.no_sync())
    return stack


def _autocast(inputs: ModelInputs, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(inputs.image.device.type, dtype=dtype)


def _loss_stats(out: TokenizerOutput) -> dict[str, float]:
    return {name: float(value.detach()) for name, value in out.losses.items()}


def _accumulate(stats: dict[str, float], new: Mapping[str, float], n: int) -> None:
    """Add ``new / n`` into ``stats``: the mean over ``n`` micro-batches, built in place."""
    for key, value in new.items():
        stats[key] = stats.get(key, 0.0) + float(value) / n


# -- adversarial training (VQGAN, Esser et al. 2021; EnCodec, Défossez et al. 2022) --------------

# Losses inside the tokenizer's ``total`` that reconstruct each modality: the "nll" whose
# gradient the adaptive weight matches the adversarial gradient to.
RECONSTRUCTION_TERMS = {"image": ("image/l1",), "audio": ("audio/l1", "audio/mel")}


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper, or ``module`` itself."""
    return getattr(module, "module", module)


def _real_and_mask(inputs: ModelInputs, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The modality's target from the batch and its (B,) presence mask."""
    if modality == "image":
        return inputs.image, inputs.has_image
    return inputs.audio, inputs.has_audio


def _last_layer(model: nn.Module, modality: str) -> torch.Tensor:
    """Weight of the decoder layer that writes the modality's output."""
    core = _unwrap(model)
    if modality == "image":
        return core.image_decoder.last_layer
    return core.audio_decoder.stages[0].weight  # the Linear that writes the samples


def _grad_at(loss: torch.Tensor, x: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
    (grad,) = torch.autograd.grad(loss, x, retain_graph=retain_graph)
    return grad


def _mean_over_scales(
    loss_fn: Callable[..., torch.Tensor], *logit_lists: list[torch.Tensor]
) -> torch.Tensor:
    """A per-sample GAN loss averaged over the discriminator's scales: -> (B,)."""
    per_scale = [loss_fn(*logits) for logits in zip(*logit_lists)]  # S x (B,)
    return torch.stack(per_scale).mean(dim=0)


def _mean_logit(logits: list[torch.Tensor]) -> float:
    """Mean logit over every scale and position, for logging."""
    return float(sum(x.detach().mean() for x in logits) / len(logits))


Reconstructions = dict[str, torch.Tensor]


def gan_generator_step(
    model: nn.Module,
    inputs: Batches,
    optimizer: torch.optim.Optimizer,
    discriminators: nn.ModuleDict,
    gan: GanConfig,
    step: int,
    perceptual: nn.Module | None = None,
    grad_clip: float | None = None,
    amp_dtype: torch.dtype | None = None,
    heads: AlignmentHeadTrainer | None = None,
) -> tuple[dict[str, float], Reconstructions | list[Reconstructions]]:
    """One generator step: the tokenizer's losses plus perceptual and adversarial terms.

    The perceptual net and the discriminators see a detached copy of each reconstruction; the
    gradient of their losses at that copy is taken once and pushed into the real reconstruction
    together with the tokenizer's own losses, in one backward. The adaptive weight (VQGAN eq. 7)
    reuses those gradients (:func:`mmvq.losses.last_layer_grad_norms`), so neither network is
    backpropagated twice. Before ``gan.disc_start`` the discriminators are not run at all.

    Parameters
    ----------
    model : MultimodalTokenizer or a DDP wrapper of one; loss weights (``adv/image``,
        ``adv/audio``, ``image/perceptual``) come from its config
    inputs : the batch, or a list of micro-batches (one step over their mean loss; the
        adaptive weight is computed per micro-batch)
    optimizer : the tokenizer's optimizer
    discriminators : from :func:`mmvq.discriminators.build_discriminators`, keyed by modality;
        not updated here
    gan : when and how the adversarial terms count
    step : global training step (for ``disc_start``)
    perceptual : e.g. from :func:`mmvq.perceptual.build_perceptual`; None: no perceptual loss
    grad_clip : max global gradient norm of the tokenizer, or None
    amp_dtype : autocast dtype of the forward passes, None for fp32
    heads : the alignment heads' replay trainer, as in :func:`generator_step`

    Returns
    -------
    stats : the tokenizer's losses, ``image/perceptual``, ``adv/<modality>`` (generator loss) and
        ``adv/<modality>_weight`` (its effective weight) where computed, ``total``, the
        codebook statistics (:func:`code_stats`) and ``grad_norm``, as floats (means over
        micro-batches)
    reconstructions : detached ``image`` and ``audio`` for :func:`discriminator_step`; a list
        of them, one per micro-batch, when ``inputs`` was a list
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    micro = _as_list(inputs)
    stats: dict[str, float] = {}
    recons = []
    for mb, last in _with_last(micro):
        with _no_sync(model, last):
            mb_stats, recon, out = _gan_generator_backward(model, mb, discriminators, gan, step,
                                                           perceptual, len(micro), amp_dtype)
        _accumulate(stats, mb_stats, len(micro))
        _keep_latents(heads, out, mb)
        recons.append(recon)
    stats |= _clip_and_step(model, optimizer, grad_clip)
    stats |= _train_heads(heads, model)
    return stats, recons[0] if isinstance(inputs, ModelInputs) else recons


def _gan_generator_backward(
    model: nn.Module,
    inputs: ModelInputs,
    discriminators: nn.ModuleDict,
    gan: GanConfig,
    step: int,
    perceptual: nn.Module | None,
    num_micro: int,
    amp_dtype: torch.dtype | None,
) -> tuple[dict[str, float], Reconstructions, TokenizerOutput]:
    """Forward and backward of one (micro-)batch; gradients scaled by ``1 / num_micro``.
    Returns the stats, the detached reconstructions and the tokenizer's output."""
    with _autocast(inputs, amp_dtype):
        out = model(inputs)
    weights = _unwrap(model).config.loss_weights
    extra: dict[str, torch.Tensor] = {}  # new loss terms, weighted, for the reported total
    stats: dict[str, float] = {}
    seeds: dict[str, torch.Tensor] = {}  # modality -> gradient pushed into its reconstruction
    if perceptual is not None:
        leaf = out.reconstructions["image"].detach().float().requires_grad_()
        with _autocast(inputs, amp_dtype):
            loss = L.masked_mean(perceptual(leaf, inputs.image), inputs.has_image)
        extra["image/perceptual"] = weights["image/perceptual"] * loss
        stats["image/perceptual"] = float(loss.detach())
        seeds["image"] = _grad_at(extra["image/perceptual"], leaf)
    if L.adopt_weight(1.0, step, gan.disc_start) > 0:
        for modality, disc in discriminators.items():
            with _autocast(inputs, amp_dtype):
                loss, weight, grad = _adversarial_term(model, out, inputs, modality, disc, gan,
                                                       seeds)
            extra[f"adv/{modality}"] = weight * loss
            stats[f"adv/{modality}"] = float(loss.detach())
            stats[f"adv/{modality}_weight"] = float(weight)
            seeds[modality] = seeds.get(modality, 0) + weight * grad
    roots = [out.losses["total"], *(out.reconstructions[m] for m in seeds)]
    scale = 1.0 / num_micro
    root_grads = [torch.full_like(out.losses["total"], scale),
                  *((g * scale).to(out.reconstructions[m].dtype) for m, g in seeds.items())]
    torch.autograd.backward(roots, root_grads)
    stats.update(_loss_stats(out))
    stats["total"] += sum(float(v.detach()) for v in extra.values())
    stats.update(code_stats(model, out, inputs))
    reconstructions = {m: out.reconstructions[m].detach().float() for m in RECONSTRUCTION_TERMS}
    return stats, reconstructions, out


def _adversarial_term(
    model: nn.Module,
    out: TokenizerOutput,
    inputs: ModelInputs,
    modality: str,
    disc: nn.Module,
    gan: GanConfig,
    seeds: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, float | torch.Tensor, torch.Tensor]:
    """Generator loss, its effective weight, and its gradient at the reconstruction.

    ``seeds`` holds the gradients already pushed into each reconstruction (the perceptual one):
    part of the "nll" of the adaptive weight, as in taming.
    """
    recon = out.reconstructions[modality]
    leaf = recon.detach().requires_grad_()
    g_loss_fn = L.GAN_LOSSES[gan.loss][1]
    # Unwrapped: the discriminator gets no gradient here, so DDP must not wait for one.
    logits = _unwrap(disc)(leaf)
    loss = L.masked_mean(_mean_over_scales(g_loss_fn, logits), _real_and_mask(inputs, modality)[1])
    grad = _grad_at(loss, leaf)
    weights = _unwrap(model).config.loss_weights
    weight = weights[f"adv/{modality}"]
    if gan.adaptive:
        nll = sum(weights[name] * out.losses[name] for name in RECONSTRUCTION_TERMS[modality])
        nll_grad = _grad_at(nll, recon, retain_graph=True) + seeds.get(modality, 0.0)
        norms = L.last_layer_grad_norms(recon, _last_layer(model, modality), [nll_grad, grad])
        weight = weight * L.adaptive_gan_weight(*norms, max_weight=gan.max_adaptive_weight)
    return loss, weight, grad


def _clip_and_step(
    module: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None
) -> dict[str, float]:
    """Clip the gradient norm of each part on its own (if asked), step, and return the norms
    before clipping: ``grad_norm`` of the whole module, or of everything but fusion, and for a
    tokenizer with fusion ``fusion/grad_norm`` of its joint path and ``align/grad_norm`` of its
    alignment heads (:meth:`mmvq.fusion.Fusion.alignment_heads`).

    One global norm over all would let one part's gradients shrink the others' steps: in the
    fused demo fusion's gradients made the mean norm 2.9 against 0.39 without fusion, so a
    clip at 1.0 divided the codecs' updates by about 3 although no fusion loss but the
    alignment reaches them (BENCHMARKS.md "Fusion benchmark"); and once the diversity term
    was sharpened, the joint path's norm (1-2) shrank the alignment heads' step so that
    align/infonce hardly fell (BENCHMARKS.md "Joint codebook usage").
    """
    max_norm = math.inf if grad_clip is None else grad_clip
    norms = {}
    for key, params in _clip_parts(_unwrap(module)).items():
        with_grad = [p for p in params if p.grad is not None]
        norms[key] = float(torch.nn.utils.clip_grad_norm_(with_grad, max_norm)) if with_grad else 0.0
    optimizer.step()
    return norms


def _clip_parts(module: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Stat key -> the parameters clipped together: the codecs, fusion's joint path, and
    fusion's alignment heads."""
    fusion = getattr(module, "fusion", None)
    if not isinstance(fusion, nn.Module):
        return {"grad_norm": list(module.parameters())}
    own = {id(p) for p in fusion.parameters()}
    heads = fusion.alignment_heads()
    in_heads = {id(p) for p in heads}
    return {"grad_norm": [p for p in module.parameters() if id(p) not in own],
            "fusion/grad_norm": [p for p in fusion.parameters() if id(p) not in in_heads],
            "align/grad_norm": heads}


def discriminator_step(
    reconstructions: Reconstructions | Sequence[Reconstructions],
    inputs: Batches,
    discriminators: nn.ModuleDict,
    optimizer: torch.optim.Optimizer,
    gan: GanConfig,
    step: int,
    grad_clip: float | None = None,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """One discriminator step on real inputs vs (detached) reconstructions.

    Parameters
    ----------
    reconstructions : ``image`` (B, 3, H, W) and/or ``audio`` (B, T), e.g. as returned by
        :func:`gan_generator_step`; detached here in any case. A list (one per micro-batch)
        when ``inputs`` is a list.
    inputs : the batch (or micro-batches) the reconstructions came from (real samples and
        presence masks)
    discriminators : keyed by modality; each returns a list of logit maps
    optimizer : over the discriminators' parameters (taming: Adam, betas (0.5, 0.9))
    gan : ``loss`` picks hinge or vanilla; ``disc_start`` gates the step
    step : global training step
    grad_clip : max global gradient norm of the discriminators, or None
    amp_dtype : autocast dtype of the forward passes, None for fp32

    Returns
    -------
    ``disc/<modality>`` (loss), ``disc/<modality>_real`` and ``_fake`` (mean logits),
    ``disc/grad_norm``, as floats; empty before ``gan.disc_start`` (nothing is run or updated).
    """
    if L.adopt_weight(1.0, step, gan.disc_start) == 0:
        return {}
    discriminators.train()
    optimizer.zero_grad(set_to_none=True)
    micro = _as_list(inputs)
    recons = [reconstructions] if isinstance(inputs, ModelInputs) else list(reconstructions)
    stats: dict[str, float] = {}
    for (mb, last), recon in zip(_with_last(micro), recons, strict=True):
        with _no_sync(discriminators, last):
            with _autocast(mb, amp_dtype):
                mb_stats, total = _discriminator_losses(recon, mb, discriminators, gan)
            (total / len(micro)).backward()
        _accumulate(stats, mb_stats, len(micro))
    stats["disc/grad_norm"] = _clip_and_step(discriminators, optimizer, grad_clip)["grad_norm"]
    return stats


def _discriminator_losses(
    reconstructions: Reconstructions, inputs: ModelInputs, discriminators: nn.ModuleDict,
    gan: GanConfig,
) -> tuple[dict[str, float], torch.Tensor]:
    d_loss_fn = L.GAN_LOSSES[gan.loss][0]
    stats, total = {}, 0.0
    for modality, disc in discriminators.items():
        real, mask = _real_and_mask(inputs, modality)
        # Real and fake in separate calls, as taming: with BatchNorm each gets its own statistics.
        logits_real, logits_fake = disc(real), disc(reconstructions[modality].detach())
        loss = L.masked_mean(_mean_over_scales(d_loss_fn, logits_real, logits_fake), mask)
        total = total + loss
        stats[f"disc/{modality}"] = float(loss.detach())
        stats[f"disc/{modality}_real"] = _mean_logit(logits_real)
        stats[f"disc/{modality}_fake"] = _mean_logit(logits_fake)
    return stats, total


# -- schedule and weight averaging ---------------------------------------------------------------


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier: linear warmup, then cosine decay to ``min_ratio`` at
    ``total_steps`` (SGDR, Loshchilov & Hutter 2017, without restarts); flat after it.

    Parameters
    ----------
    step : optimizer steps taken so far (0 for the first step)
    warmup_steps : steps of linear warmup from ``1 / warmup_steps`` to 1; 0: none
    total_steps : where the cosine reaches ``min_ratio``
    min_ratio : final multiplier
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for parameters; buffers are copied.

    The averaged generator reconstructs better than the last iterate (Polyak averaging; used
    for VQGAN/GAN generators since Karras et al. 2018). Buffers (codebook usage counts, k-means
    flags) are state, not weights: averaging them would mean nothing.

    Parameters
    ----------
    ema : a copy of the unwrapped model, never trained directly
    model : the trained model or its DDP wrapper
    decay : per-step decay, e.g. 0.999
    """
    source = _unwrap(model)
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in source.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), source.buffers(), strict=True):
        ema_buffer.copy_(buffer)
