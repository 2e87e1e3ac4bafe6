"""Reconstruction scores of a tokenizer over many batches: one scorer, one key scheme.

The evaluate stage (trained vs untrained, over the val split) and training's validation (the
weights it would ship, over a few val batches) both score with :class:`ReconstructionScores`,
so a key means the same number in both. Keys are ``{modality}/{metric}``:

- ``image/psnr``, ``image/ssim``, and ``image/lpips`` with an LPIPS network (local weights):
  per-sample means over the samples with an image; ``image/psnr_flat``, the PSNR of a flat
  image of each sample's mean colour: the baseline a tokenizer must beat (out of domain, the
  demo's does not)
- ``audio/si_snr``, ``audio/mel_distance``: per-sample means over the samples with audio;
  with ``speech``, ``audio/stoi`` and ``audio/pesq`` (:mod:`mmvq.speech_scores`);
  residual audio adds ``audio/si_snr_levels{n}``, decoded from levels 1..n
  (:meth:`ReconstructionScores.add_bitrates`)
- ``text/token_accuracy``, ``text/exact_match``: per-sample means over the samples with text
- ``{m}/codebook_usage``, ``{m}/codebook_perplexity`` per codebook ``m`` (``image``,
  ``audio``, ``text``, and ``joint`` with fusion; level 0 of residual audio), and
  ``audio/codebook_usage_level{k}``, ``audio/codebook_perplexity_level{k}`` for each level
  ``k`` (from 0) of residual audio: :func:`codebook_stats`
- ``cross/nmi_{a}_{b}``: NMI of the dominant codes (over real positions, not padding:
  :func:`real_positions`) of the samples that carry every modality;
  ``cross/retrieval_{a}_to_{b}_r{k}`` (k = 1, 5, 10): recall@k of fusion's modality
  embeddings over those samples, a sample with the same caption counting as a hit
- ``loss/{name}``: the model's losses, when given (:meth:`ReconstructionScores.add_losses`)
- ``samples``: how many samples had an image

Evaluate writes these keys as they are; training logs them under ``val/`` (``val/image/psnr``,
``val/loss/total``), and the train step's batch statistics use the same codebook names
(``image/codebook_usage``, :func:`mmvq.train_step.code_stats`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from mmvq import metrics as M
from mmvq.batch import ModelInputs
from mmvq.config import MODALITIES

CROSS_PAIRS = (("image", "audio"), ("image", "text"), ("audio", "text"))


def first_level(codes: torch.Tensor, modality: str) -> torch.Tensor:
    """Residual audio codes (..., frames, levels) -> level 0 (..., frames): the codebook every
    bitrate shares, so audio usage and cross-modal NMI mean the same as for one-level codes."""
    return codes[..., 0] if modality == "audio" and codes.ndim == 3 else codes


def real_positions(inputs: ModelInputs, codes: Mapping[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """Per modality, (B, N) bool over its first-level code positions: True where the sample is,
    False on padding. Text: ids before ``text_len``. Audio: frames that start before
    ``audio_len`` (frame i covers samples i*T/N onwards of the T-sample window). Image: all.
    """
    real = {}
    for m, c in codes.items():
        positions = first_level(c, m).flatten(1).shape[1]
        index = torch.arange(positions, device=c.device)[None]  # (1, N)
        if m == "text":
            real[m] = index < inputs.text_len[:, None].to(c.device)
        elif m == "audio":
            window = inputs.audio.shape[-1]
            frames = (inputs.audio_len.to(c.device) * positions + window - 1) // window  # ceil
            real[m] = index < frames[:, None]
        else:
            real[m] = torch.ones(c.shape[0], positions, dtype=torch.bool, device=c.device)
    return real


def codebook_stats(codes: Mapping[str, torch.Tensor | np.ndarray],
                   sizes: Mapping[str, int]) -> dict[str, float]:
    """Usage (fraction of the K codes used) and perplexity of each codebook.

    Parameters
    ----------
    codes : codebook name -> the codes of the samples that carry it, (N, ...); residual audio
        is (N, frames, levels)
    sizes : codebook name -> K (``MultimodalTokenizer.codebook_sizes()``)

    Returns
    -------
    ``{m}/codebook_usage`` and ``{m}/codebook_perplexity`` per codebook in ``codes`` (level 0
    for residual audio), plus ``audio/codebook_usage_level{k}`` and
    ``audio/codebook_perplexity_level{k}`` for each level of residual audio.
    """
    stats = {}
    for modality, chosen in codes.items():
        chosen = torch.as_tensor(chosen)
        size = sizes[modality]
        level0 = first_level(chosen, modality)
        stats[f"{modality}/codebook_usage"] = M.codebook_usage(level0, size)
        stats[f"{modality}/codebook_perplexity"] = M.codebook_perplexity(level0, size)
        if modality == "audio" and chosen.ndim == 3:  # residual: a codebook per level
            for level in range(chosen.shape[2]):
                stats[f"audio/codebook_usage_level{level}"] = M.codebook_usage(
                    chosen[..., level], size)
                stats[f"audio/codebook_perplexity_level{level}"] = M.codebook_perplexity(
                    chosen[..., level], size)
    return stats


class ReconstructionScores:
    """Accumulates per-sample scores, the codes seen and, for the cross-modal NMI, each complete
    sample's dominant code per modality, for one model.

    Parameters
    ----------
    codebook_sizes : ``model.codebook_sizes()``; its keys are the codebooks scored
    sample_rate : of the audio, for the mel distance
    lpips : an LPIPS network ((B, 3, H, W) x2 -> (B,)); None: ``image/lpips`` is left out
    speech : also score ``audio/stoi`` and ``audio/pesq`` (~50 ms a clip on a CPU: evaluate
        does, training's few validation batches do not)
    """

    def __init__(self, codebook_sizes: Mapping[str, int], sample_rate: int,
                 lpips: torch.nn.Module | None = None, speech: bool = False) -> None:
        self.sizes = dict(codebook_sizes)
        self.sample_rate = sample_rate
        self.lpips = lpips
        self.speech = speech
        self.values: dict[str, list[float]] = {}
        self.codes: dict[str, list[torch.Tensor]] = {m: [] for m in self.sizes}  # on the CPU
        self.paired: dict[str, list[np.ndarray]] = {m: [] for m in MODALITIES}  # (B,) labels
        self.embeddings: dict[str, list[torch.Tensor]] = {}  # fusion models only
        self.captions: list[bytes] = []  # text ids of the complete samples, for retrieval hits

    @torch.no_grad()
    def add(self, inputs: ModelInputs, reconstructions: Mapping[str, torch.Tensor],
            codes: Mapping[str, torch.Tensor],
            embeddings: Mapping[str, torch.Tensor] | None = None) -> None:
        """Score one batch.

        Parameters
        ----------
        inputs : the batch
        reconstructions : as ``MultimodalTokenizer.decode`` returns them: ``image``
            (B, 3, H, W), clamped to [-1, 1] here as decode does, ``audio`` (B, T) and
            ``text_ids`` (B, L)
        codes : the batch's codes per codebook (``image``, ``audio``, ``text``, and ``joint``
            with fusion); residual audio (B, frames, levels)
        embeddings : fusion's modality -> (B, D) unit embeddings, for retrieval; None or {}
        """
        img, aud, txt = inputs.has_image, inputs.has_audio, inputs.has_text
        image = reconstructions["image"].float().clamp(-1, 1)
        self._extend("image/psnr", M.psnr(inputs.image[img], image[img]))
        self._extend("image/ssim", M.ssim(inputs.image[img], image[img]))
        flat = inputs.image[img].mean(dim=(2, 3), keepdim=True).expand_as(inputs.image[img])
        self._extend("image/psnr_flat", M.psnr(inputs.image[img], flat))
        if self.lpips is not None:
            self._extend("image/lpips", self.lpips(image[img], inputs.image[img]))
        audio = reconstructions["audio"].float()
        self._extend("audio/si_snr", M.si_snr(inputs.audio[aud], audio[aud],
                                              inputs.audio_len[aud]))
        self._extend("audio/mel_distance", M.mel_distance(inputs.audio[aud], audio[aud],
                                                          self.sample_rate))
        if self.speech:
            from mmvq.speech_scores import speech_scores

            for name, values in speech_scores(
                    inputs.audio[aud].cpu().numpy(), audio[aud].cpu().numpy(),
                    inputs.audio_len[aud].cpu().numpy(), self.sample_rate).items():
                self._extend(f"audio/{name}", torch.tensor(values))
        ids = reconstructions["text_ids"]
        self._extend("text/token_accuracy", M.token_accuracy(
            inputs.text_ids[txt], ids[txt], inputs.text_len[txt]))
        self._extend("text/exact_match", M.exact_match(
            inputs.text_ids[txt], ids[txt], inputs.text_len[txt]))
        present = {"image": img, "audio": aud, "text": txt, "joint": torch.ones_like(img)}
        for modality in self.codes:
            if modality in codes:
                self.codes[modality].append(codes[modality][present[modality]].cpu())
        complete = img & aud & txt  # cross-modal scores need every modality of a sample
        real = real_positions(inputs, {m: codes[m] for m in self.paired})
        for modality in self.paired:
            # Each sample's label for the NMI: its dominant code over its real positions only.
            # Counting padding labelled a third of the demo's captions by the code of their
            # padding (BENCHMARKS.md "Cross-modal NMI without padding").
            chosen = first_level(codes[modality][complete], modality)
            self.paired[modality].append(
                M.dominant_codes(chosen, real[modality][complete]))
        for modality, emb in (embeddings or {}).items():
            self.embeddings.setdefault(modality, []).append(emb[complete])
        if embeddings:
            ids, lengths = inputs.text_ids[complete].cpu(), inputs.text_len[complete].cpu()
            self.captions += [row[:n].numpy().tobytes()
                              for row, n in zip(ids, lengths.tolist(), strict=True)]

    def add_losses(self, losses: Mapping[str, torch.Tensor]) -> None:
        """The model's scalar losses of one batch, as ``loss/{name}`` (means over batches)."""
        for name, value in losses.items():
            self._extend(f"loss/{name}", value)

    @torch.no_grad()
    def add_bitrates(self, inputs: ModelInputs, model: Any, audio_codes: torch.Tensor) -> None:
        """Residual audio (B, frames, n): SI-SNR decoded from the first 1..n levels, i.e. the
        quality at each bitrate (``audio/si_snr_levels{k}``); ``model`` decodes them."""
        aud = inputs.has_audio
        for n in range(1, audio_codes.shape[2] + 1):
            audio = model.decode({"audio": audio_codes[..., :n]})["audio"]
            self._extend(f"audio/si_snr_levels{n}", M.si_snr(
                inputs.audio[aud], audio[aud], inputs.audio_len[aud]))

    def _extend(self, key: str, values: torch.Tensor | float) -> None:
        array = torch.as_tensor(values).detach().cpu().double().reshape(-1).numpy()
        self.values.setdefault(key, []).extend(array.tolist())

    def code_counts(self) -> dict[str, np.ndarray]:
        """Codebook -> how often each code occurred (level 0 of residual audio): (K,) int64."""
        return {m: M.code_histogram(self._seen(m), size) for m, size in self.sizes.items()}

    def _seen(self, modality: str) -> torch.Tensor:
        chunks = self.codes[modality]
        return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)

    def summary(self) -> dict[str, float]:
        """Every key of the module docstring that the added batches allow, as floats."""
        result = {k: float(np.mean(v)) for k, v in self.values.items() if v}
        result |= codebook_stats({m: self._seen(m) for m in self.sizes}, self.sizes)
        paired = {m: np.concatenate(chunks) for m, chunks in self.paired.items() if chunks}
        for a, b in CROSS_PAIRS:
            if a in paired and b in paired and len(paired[a]) > 1:
                result[f"cross/nmi_{a}_{b}"] = M.normalized_mutual_information(paired[a],
                                                                              paired[b])
            if a in self.embeddings and b in self.embeddings:
                # Samples with the same caption are hits for each other: nothing could rank
                # one above the other.
                groups = np.unique(np.array(self.captions, dtype=object), return_inverse=True)[1]
                recall = M.retrieval_recall(torch.cat(self.embeddings[a]),
                                            torch.cat(self.embeddings[b]), ks=(1, 5, 10),
                                            groups=groups)
                for k, value in recall.items():
                    result[f"cross/retrieval_{a}_to_{b}_r{k}"] = value
        result["samples"] = float(len(self.values.get("image/psnr", [])))
        return result
