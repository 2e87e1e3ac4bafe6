"""Reconstruction losses as small pure functions (in the style of taming's ``vqperceptual.py``).

Every loss takes a per-sample ``mask`` (bool, (B,)): a sample without the modality contributes
nothing. Masking multiplies instead of indexing, so every parameter stays in the autograd graph
with a zero gradient, as DistributedDataParallel requires.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchaudio


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (B,) over the samples where ``mask`` (B,) is true; 0 if none is."""
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def l1_per_sample(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per sample: (B, ...) x2 -> (B,)."""
    return (x - y).abs().flatten(1).mean(dim=1)


def masked_l1(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 between ``x`` and ``y`` (B, ...) averaged over the samples in ``mask`` (B,)."""
    return masked_mean(l1_per_sample(x, y), mask)


@functools.cache
def mel_filters(
    sample_rate: int, n_fft: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hann window (n_fft,) and mel filterbank (n_fft // 2 + 1, n_mels) for one STFT size.

    Built once per (rate, n_fft, device) and cached here rather than registered in the model, so
    checkpoints hold no filterbank buffers and each process builds its own on its own device.
    """
    window = torch.hann_window(n_fft, device=device)
    fbank = torchaudio.functional.melscale_fbanks(
        n_freqs=n_fft // 2 + 1,
        f_min=0.0,
        f_max=sample_rate / 2,
        n_mels=max(n_fft // 8, 8),  # ~constant mel resolution per window, as in DAC's settings
        sample_rate=sample_rate,
    ).to(device)
    return window, fbank


# Mel power floor, relative to a full-scale sine (peak ~0.25 after the normalisation in
# log_mel): -30 dB. With a floor of -40 dB or lower the loss chases the noise floor of silent and
# zero-padded stretches, and the audio codes collapsed to a handful within 300 steps (measured on
# the synthetic chirps); at -30 dB they stay in use and SI-SNR climbs.
MEL_FLOOR = 1e-3


def log_mel(
    wav: torch.Tensor, sample_rate: int, n_fft: int, floor: float = MEL_FLOOR
) -> torch.Tensor:
    """Log mel power spectrogram: (B, T) -> (B, frames, n_mels).

    The STFT is divided by the window sum, so a sine of amplitude A peaks at (A/2)^2 whatever
    ``n_fft`` is and one ``floor`` suits every resolution. Power is re^2 + im^2 of the real view,
    not ``abs()`` of the complex STFT, whose backward is several times slower on CPU; hop is
    n_fft / 2 with no centre padding for the same reason (a loss needs no perfect reconstruction).
    """
    window, fbank = mel_filters(sample_rate, n_fft, wav.device)
    spec = torch.stft(
        wav, n_fft, hop_length=n_fft // 2, window=window, center=False, return_complex=True
    )  # (B, n_fft // 2 + 1, frames) complex
    power = torch.view_as_real(spec).pow(2).sum(dim=-1) / window.sum() ** 2  # (B, freqs, frames)
    mel = torch.matmul(power.transpose(1, 2), fbank)  # (B, frames, n_mels)
    return (mel + floor).log()


def log_mel_distance(
    ref: torch.Tensor,
    est: torch.Tensor,
    sample_rate: int,
    n_ffts: Sequence[int],
    floor: float = MEL_FLOOR,
) -> torch.Tensor:
    """Multi-resolution log-mel L1 per sample (Engel et al. 2020; DAC's mel loss).

    Parameters
    ----------
    ref, est : (B, T) waveforms; gradients flow to ``est`` only
    sample_rate : int
    n_ffts : STFT sizes; the distance is averaged over them.
    floor : mel power added before the log; sets the dynamic range the loss cares about.

    Returns
    -------
    (B,) tensor.
    """
    if ref.shape[0] == 0:  # e.g. a batch where no sample has audio; MKL's FFT rejects it
        return torch.zeros(0, device=ref.device)
    # STFTs are not supported in reduced precision: compute in fp32 whatever the autocast.
    with torch.autocast(device_type=ref.device.type, enabled=False):
        ref, est = ref.float(), est.float()
        total = torch.zeros(ref.shape[0], device=ref.device)
        for n_fft in n_ffts:
            with torch.no_grad():  # the target needs no graph: saves half the backward
                target = log_mel(ref, sample_rate, int(n_fft), floor)
            total = total + l1_per_sample(log_mel(est, sample_rate, int(n_fft), floor), target)
        return total / len(n_ffts)


def masked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Token cross-entropy averaged over real tokens.

    Parameters
    ----------
    logits : (B, L, V)
    targets : (B, L) long
    lengths : (B,) long; positions ``>= lengths[b]`` are padding and are ignored
    mask : (B,) bool; samples without text are ignored
    """
    ce = F.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")  # (B, L)
    positions = torch.arange(targets.shape[1], device=targets.device)  # (L,)
    valid = (positions[None, :] < lengths[:, None]) & mask[:, None]  # (B, L)
    weights = valid.to(ce.dtype)
    return (ce * weights).sum() / weights.sum().clamp_min(1.0)


# -- adversarial losses (taming's vqperceptual.py; the discriminator lives outside) ---------------
#
# Logits may have any shape (B, ...), e.g. a PatchGAN's (B, 1, h, w); each loss is averaged over
# everything but the batch axis and returned per sample (B,), so callers can mask absent samples.


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)  # (B, ...) -> (B,)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss per sample (Lim & Ye 2017; taming's default): (B, ...) x2 -> (B,).

    ``0.5 * (relu(1 - D(x)) + relu(1 + D(x_hat)))``: zero once real logits exceed 1 and fake ones
    fall below -1, so a discriminator that already wins stops pushing its logits apart.
    """
    return 0.5 * (_per_sample(F.relu(1.0 - logits_real)) + _per_sample(F.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy discriminator loss per sample (Goodfellow et al. 2014): -> (B,).

    ``0.5 * (softplus(-D(x)) + softplus(D(x_hat)))`` = BCE with targets 1 for real, 0 for fake.
    """
    real = _per_sample(F.softplus(-logits_real))
    fake = _per_sample(F.softplus(logits_fake))
    return 0.5 * (real + fake)


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss paired with the hinge discriminator: ``-D(x_hat)`` per sample -> (B,)."""
    return -_per_sample(logits_fake)


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``softplus(-D(x_hat))`` per sample -> (B,).

    Goodfellow et al. 2014: the gradient stays large while the discriminator rejects the fakes.
    """
    return _per_sample(F.softplus(-logits_fake))


# GanConfig.loss -> (discriminator loss, generator loss)
GAN_LOSSES = {
    "hinge": (hinge_d_loss, hinge_g_loss),
    "vanilla": (vanilla_d_loss, non_saturating_g_loss),
}


def adopt_weight(weight: float, step: int, start: int, value: float = 0.0) -> float:
    """``weight`` from step ``start`` on, ``value`` before (taming's ``disc_start`` gating)."""
    return weight if step >= start else value


def adaptive_gan_weight(
    nll_grad_norm: torch.Tensor, g_grad_norm: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """VQGAN's adaptive weight of the adversarial loss (Esser et al. 2021, eq. 7).

    ``||grad_L nll|| / (||grad_L g|| + 1e-4)``, both gradients taken at the decoder's last layer
    L, clamped to [0, max_weight] and detached: the adversarial gradient is scaled to the size of
    the reconstruction gradient whatever the discriminator's current scale.

    Parameters
    ----------
    nll_grad_norm, g_grad_norm : scalar tensors, e.g. from :func:`last_layer_grad_norms`
    max_weight : upper clamp (taming: 1e4)
    """
    return (nll_grad_norm / (g_grad_norm + 1e-4)).clamp(0.0, max_weight).detach()


def last_layer_grad_norms(
    output: torch.Tensor, last_layer: torch.Tensor, output_grads: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Norm of the gradient at ``last_layer`` for each given gradient at ``output``.

    Taming takes ``autograd.grad(nll, last_layer)`` and ``autograd.grad(g_loss, last_layer)``,
    which runs the backward through the perceptual net and the discriminator a second time
    (BENCHMARKS.md: half the throughput). By the chain rule the same numbers follow from the
    gradients of the two losses at the reconstruction, taken once, carried back through the few
    ops between ``last_layer`` and ``output`` only.

    Parameters
    ----------
    output : the reconstruction, still attached to the graph that contains ``last_layer``
    last_layer : weight of the layer that writes ``output``
    output_grads : gradients of scalar losses with respect to ``output``, each shaped like it

    Returns
    -------
    One scalar tensor per entry of ``output_grads``.
    """
    norms = []
    for grad in output_grads:
        (weight_grad,) = torch.autograd.grad(
            output, last_layer, grad_outputs=grad, retain_graph=True
        )
        norms.append(weight_grad.norm())
    return norms


# -- contrastive loss ---------------------------------------------------------------------------


def info_nce_loss(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Symmetric InfoNCE between paired embeddings (scalar): row i of ``a`` matches row i of ``b``.

    CPC's InfoNCE (van den Oord et al. 2018) in both directions as in CLIP (Radford et al. 2021):
    cross-entropy of each row of the cosine-similarity matrix / ``temperature`` against its
    diagonal, averaged over a->b and b->a. Lower bound: 0; chance level: log B.

    Parameters
    ----------
    a, b : (B, D) embeddings (normalised here)
    temperature : softmax temperature; CLIP starts at 0.07
    """
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    logits = a @ b.T / temperature  # (B, B); [i, j] = sim(a_i, b_j)
    targets = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
