"""The multimodal tokenizer: one VQ-VAE per modality behind a single encode/decode/save/load API.

Image, audio and text each have an encoder, a quantizer with its own codebook and a decoder.
``forward`` computes reconstructions, codes and the weighted losses for training; ``encode`` and
``decode`` are the inference API the tokenize and evaluate stages use.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from einops import rearrange
from torch import nn

from mmvq import losses as L
from mmvq.batch import ModelInputs
from mmvq.caption_target import caption_bag
from mmvq.config import (
    MODALITIES,
    TokenizerConfig,
    config_to_dict,
    tokenizer_config_from_dict,
)
from mmvq.fusion import Fusion, FusionOutput
from mmvq.grad_balance import GradientCap
from mmvq.modalities import (
    AudioDecoder,
    AudioEncoder,
    TextDecoder,
    TextEncoder,
    build_image_codec,
)
from mmvq.quantizers import QUANTIZERS, QuantizerOutput, ResidualVQ, build_quantizer
from mmvq.text_vocab import (
    TextVocab,
    read_checkpoint_vocab,
    vocab_for_config,
    write_checkpoint_vocab,
)
from mmvq.vocabulary import vocabulary_layout

# Bumped whenever the meaning of saved weights or config.json changes; load() refuses others.
# 2: weights in safetensors (1 was a torch pickle, model.pt).
# 3: audio_quantizer in the config (residual audio codes); fusion has a latent-prediction head
#    (fusion.predict.*) and a configurable joint quantizer.
# 4: fusion.max_tokens_per_modality (fusion pools each modality's latents). A version-3
#    config has no such key; it loads with None, which is what those models did.
# 6: fusion.caption_ngrams (a caption head per modality, fusion.caption.*). An older config has
#    no such key; it loads with 0 (no head), which is what those models had.
FORMAT_VERSION = 6
READABLE_VERSIONS = (3, 4, 5, 6)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class TokenizerOutput:
    """What ``MultimodalTokenizer.forward`` returns.

    reconstructions : ``image`` (B, 3, H, W), ``audio`` (B, T), ``text_logits`` (B, L, V)
    indices : ``image`` (B, h, w), ``audio`` (B, frames) or, with a residual audio quantizer,
        (B, frames, levels), ``text`` (B, L), long; plus ``joint`` (B, num_queries) when fusion
        is enabled
    losses : scalar tensors keyed ``image/l1``, ``audio/l1``, ``audio/mel``, ``text/ce``,
        ``vq/commit``, ``vq/codebook`` (and ``fusion/commit``, ``fusion/codebook``,
        ``fusion/recon``, ``align/infonce`` with fusion) and
        ``total`` (the weighted sum)
    embeddings : modality -> (B, embed_dim) unit vectors for retrieval (fusion only, else {})
    latents : modality -> (B, N_m, D_m) detached quantized latents (fusion only, else {})
    """

    reconstructions: dict[str, torch.Tensor]
    indices: dict[str, torch.Tensor]
    losses: dict[str, torch.Tensor]
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    # Fusion only: each modality's quantized latents (B, N_m, D_m), detached, as the alignment
    # heads read them; the train step keeps them for the heads' replay (mmvq.head_replay).
    latents: dict[str, torch.Tensor] = field(default_factory=dict)


class MultimodalTokenizer(nn.Module):
    """Image, audio and text VQ tokenizers with separate codebooks.

    Parameters
    ----------
    config : TokenizerConfig
    text_vocab : TextVocab, optional
        The text vocabulary (mmvq.text_vocab); needed when ``config.text.vocab`` is ``bpe``
        and checked against it; bytes otherwise. Kept as ``self.text_vocab`` to turn text ids
        into strings.
    """

    def __init__(self, config: TokenizerConfig, text_vocab: TextVocab | None = None) -> None:
        super().__init__()
        self.text_vocab = vocab_for_config(config.text, text_vocab)
        for key, sub in (("quantizer", config.quantizer),
                         ("audio_quantizer", config.audio_quantizer)):
            if sub is not None and sub.kind not in QUANTIZERS:
                raise ValueError(f"unknown {key}.kind {sub.kind!r}; known: {sorted(QUANTIZERS)}")
        self.config = config
        self.image_encoder, self.image_decoder = build_image_codec(config.image)
        self.audio_encoder = AudioEncoder(config.audio)
        self.audio_decoder = AudioDecoder(config.audio)
        self.text_encoder = TextEncoder(config.text)
        self.text_decoder = TextDecoder(config.text)
        self.quantizers = nn.ModuleDict(
            {
                name: build_quantizer(config.quantizer_for(name), sub.codebook_size,
                                      sub.latent_dim)
                for name, sub in (
                    ("image", config.image),
                    ("audio", config.audio),
                    ("text", config.text),
                )
            }
        )
        # Joint tokens read the quantized latents, so they follow from the modality tokens.
        self.fusion = (Fusion(config.fusion, {"image": config.image.latent_dim,
                                              "audio": config.audio.latent_dim,
                                              "text": config.text.latent_dim})
                       if config.fusion.enabled else None)
        # Holds the alignment's gradient at the latents below the reconstruction's (training).
        ratio = config.fusion.align_grad_ratio
        self.align_cap = (GradientCap(MODALITIES, ratio)
                          if self.fusion is not None and ratio is not None else None)

    # -- shapes --------------------------------------------------------------------------------

    def codebook_sizes(self) -> dict[str, int]:
        """Codes per codebook of each modality (and ``joint`` when fusion is enabled).

        A residual modality has :meth:`codebook_levels` codebooks of this size, one per level.
        """
        sizes = {name: q.codebook_size for name, q in self.quantizers.items()}
        if self.fusion is not None:
            sizes["joint"] = self.config.fusion.codebook_size
        return sizes

    def codebook_levels(self) -> dict[str, int]:
        """Residual levels per modality: ``num_levels`` for a residual (RVQ) audio quantizer, 1
        for every other modality (keys as in :meth:`codebook_sizes`)."""
        levels = dict.fromkeys(self.codebook_sizes(), 1)
        if isinstance(self.quantizers["audio"], ResidualVQ):
            levels["audio"] = self.quantizers["audio"].num_levels
        return levels

    @property
    def audio_levels(self) -> int:
        """Residual levels of the audio codes (1 unless the audio quantizer is RVQ)."""
        return self.codebook_levels()["audio"]

    def vocabulary(self) -> dict[str, Any]:
        """The unified vocabulary layout (offsets, levels, special tokens, size); each level of
        a residual modality gets its own range of ids."""
        return vocabulary_layout(self.codebook_sizes(), self.codebook_levels())

    def token_shapes(self) -> dict[str, tuple[int, ...]]:
        """Token array shape per sample: image (h, w), audio (frames,) or (frames, levels) for
        residual audio codes, text (max_len,) and, with fusion, joint (num_queries,)."""
        levels = self.audio_levels
        shapes = {
            "image": self.config.image.grid,
            "audio": (self.config.audio.num_frames,) + ((levels,) if levels > 1 else ()),
            "text": (self.config.text.max_len,),
        }
        if self.fusion is not None:
            shapes["joint"] = (self.config.fusion.num_queries,)
        return shapes

    def _check_inputs(self, inputs: ModelInputs) -> None:
        cfg = self.config
        size = cfg.image.image_size
        if tuple(inputs.image.shape[1:]) != (3, size, size):
            raise ValueError(
                f"image must be (B, 3, {size}, {size}), got {tuple(inputs.image.shape)}"
            )
        if inputs.audio.shape[-1] != cfg.audio.num_samples:
            raise ValueError(
                f"audio must have {cfg.audio.num_samples} samples, got {tuple(inputs.audio.shape)}"
            )
        if inputs.text_ids.shape[-1] != cfg.text.max_len:
            raise ValueError(
                f"text_ids must have length {cfg.text.max_len}, got {tuple(inputs.text_ids.shape)}"
            )

    # -- encoders ------------------------------------------------------------------------------

    def _quantize_image(self, inputs: ModelInputs) -> QuantizerOutput:
        z = self.image_encoder(inputs.image)  # (B, D, h, w)
        z = rearrange(z, "b d h w -> b h w d")
        mask = inputs.has_image[:, None, None].expand(z.shape[:-1])  # (B, h, w)
        return self.quantizers["image"](z, mask)

    def _quantize_audio(self, inputs: ModelInputs) -> QuantizerOutput:
        z = self.audio_encoder(inputs.audio)  # (B, frames, D), channels last
        mask = inputs.has_audio[:, None].expand(z.shape[:-1])  # (B, frames)
        return self.quantizers["audio"](z, mask)

    def _quantize_text(self, inputs: ModelInputs) -> QuantizerOutput:
        z = self.text_encoder(inputs.text_ids)  # (B, L, D)
        positions = torch.arange(z.shape[1], device=z.device)  # (L,)
        # Padding positions get codes too, but must not drag the codebook towards "PAD".
        mask = (positions[None, :] < inputs.text_len[:, None]) & inputs.has_text[:, None]
        return self.quantizers["text"](z, mask)

    # -- decoders (from code vectors, shared by forward and decode) ----------------------------

    def _decode_image(self, q: torch.Tensor) -> torch.Tensor:
        # contiguous(): a permuted (channels-last) input gives the 1x1 conv's weight gradient
        # odd strides, which DDP's gradient buckets then copy on every step.
        z = rearrange(q, "b h w d -> b d h w").contiguous()  # (B, D, h, w)
        return self.image_decoder(z)  # (B, 3, H, W)

    def _decode_audio(self, q: torch.Tensor) -> torch.Tensor:
        return self.audio_decoder(q)  # (B, frames, D) -> (B, T)

    def _decode_text(self, q: torch.Tensor) -> torch.Tensor:
        return self.text_decoder(q)  # (B, L, V)

    # -- training ------------------------------------------------------------------------------

    def forward(self, inputs: ModelInputs) -> TokenizerOutput:
        """Reconstruct every modality and compute the masked, weighted losses.

        All three branches always run (absent modalities are zeros and masked out of the
        losses), so the autograd graph is the same for every batch, as DDP expects.
        """
        self._check_inputs(inputs)
        cfg = self.config
        vq = {
            "image": self._quantize_image(inputs),
            "audio": self._quantize_audio(inputs),
            "text": self._quantize_text(inputs),
        }
        # The decoders' gradient at the latents is the reference the alignment's is capped to.
        cap = self.align_cap if self.training else None
        seen = {m: cap.reference(m, out.quantized) if cap else out.quantized
                for m, out in vq.items()}
        image = self._decode_image(seen["image"])
        audio = self._decode_audio(seen["audio"])
        text_logits = self._decode_text(seen["text"])
        losses = {
            "image/l1": L.masked_l1(image, inputs.image, inputs.has_image),
            "audio/l1": L.masked_l1(audio, inputs.audio, inputs.has_audio),
            "audio/mel": L.masked_mean(
                L.log_mel_distance(
                    inputs.audio, audio, cfg.audio.sample_rate, cfg.audio.mel_n_ffts
                ),
                inputs.has_audio,
            ),
            "text/ce": L.masked_cross_entropy(
                text_logits, inputs.text_ids, inputs.text_len, inputs.has_text
            ),
            "vq/commit": sum(out.commit_loss for out in vq.values()),
            "vq/codebook": sum(out.codebook_loss for out in vq.values()),
        }
        indices = {name: out.indices for name, out in vq.items()}
        embeddings: dict[str, torch.Tensor] = {}
        latents: dict[str, torch.Tensor] = {}
        if self.fusion is not None:
            latents = {m: x.detach() for m, x in _latent_sequences(vq).items()}
            fused = self._fuse(vq, inputs, cap)
            losses.update(fused.losses)
            indices["joint"] = fused.indices
            embeddings = fused.embeddings
        losses["total"] = sum(cfg.loss_weights[name] * value for name, value in losses.items())
        return TokenizerOutput(
            reconstructions={"image": image, "audio": audio, "text_logits": text_logits},
            indices=indices, losses=losses, embeddings=embeddings, latents=latents,
        )

    def _fuse(self, vq: dict[str, QuantizerOutput], inputs: ModelInputs,
              cap: GradientCap | None = None) -> FusionOutput:
        present = {"image": inputs.has_image, "audio": inputs.has_audio,
                   "text": inputs.has_text}
        latents = _latent_sequences(vq)
        if cap is not None:  # only the alignment's gradient flows back through these
            latents = {m: cap.capped(m, x) for m, x in latents.items()}
        fusion = self.config.fusion
        caption = (caption_bag(inputs.text_ids, inputs.text_len, fusion.caption_ngrams,
                               fusion.caption_buckets) if fusion.caption_ngrams else None)
        return self.fusion(latents, present, caption)

    # -- inference API -------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, inputs: ModelInputs, audio_levels: int | None = None,
               ) -> dict[str, torch.Tensor]:
        """Codes per modality: ``image`` (B, h, w), ``audio`` (B, frames), ``text`` (B, L), long.

        With a residual audio quantizer ``audio`` is (B, frames, n): the first ``n`` levels,
        ``n = audio_levels`` (default: all). Fewer levels is a lower bitrate (n x log2 K bits
        per frame); ``decode`` takes any such prefix. Every sample gets codes for every
        modality; ``has_*`` says which ones are meaningful. Joint tokens (fusion) always read
        the full-rate audio latents, so they do not depend on ``audio_levels``.

        Raises
        ------
        ValueError
            If ``audio_levels`` is not in 1..levels (or not 1 for a single-level quantizer).
        """
        self._check_inputs(inputs)
        levels = self._check_audio_levels(audio_levels)
        vq = {
            "image": self._quantize_image(inputs),
            "audio": self._quantize_audio(inputs),
            "text": self._quantize_text(inputs),
        }
        tokens = {name: out.indices for name, out in vq.items()}
        if self.fusion is not None:
            tokens["joint"] = self._fuse(vq, inputs).indices
        if levels is not None:
            # Level i's code depends only on levels < i, so the prefix of the full-rate codes is
            # exactly what quantising with n levels gives.
            tokens["audio"] = tokens["audio"][..., :levels]  # (B, frames, n)
        return tokens

    def _check_audio_levels(self, audio_levels: int | None) -> int | None:
        """``audio_levels`` validated; None when the audio codes have no level axis."""
        levels = self.audio_levels
        if audio_levels is None:
            return levels if levels > 1 else None
        if levels == 1:
            if audio_levels != 1:
                raise ValueError(f"audio_levels={audio_levels}: the audio quantizer "
                                 f"({self.config.quantizer_for('audio').kind}) has one level; "
                                 "set audio_quantizer.kind: rvq for a selectable bitrate")
            return None
        if not 1 <= audio_levels <= levels:
            raise ValueError(f"audio_levels must be in 1..{levels}, got {audio_levels}")
        return audio_levels

    @torch.no_grad()
    def embed(self, inputs: ModelInputs) -> dict[str, torch.Tensor]:
        """Per-modality unit embeddings (B, embed_dim) for cross-modal retrieval (fusion only)."""
        if self.fusion is None:
            raise ValueError("embed() needs fusion.enabled: true in the tokenizer config")
        self._check_inputs(inputs)
        vq = {"image": self._quantize_image(inputs), "audio": self._quantize_audio(inputs),
              "text": self._quantize_text(inputs)}
        return self._fuse(vq, inputs).embeddings

    @torch.no_grad()
    def latent_sequences(self, inputs: ModelInputs) -> dict[str, torch.Tensor]:
        """Each modality's quantized latents, (B, N_m, D_m) float32, image grids flattened:
        what fusion reads, and what ``mmvq.alignment_probe`` fits on, with or without fusion."""
        self._check_inputs(inputs)
        vq = {"image": self._quantize_image(inputs), "audio": self._quantize_audio(inputs),
              "text": self._quantize_text(inputs)}
        return {m: x.float() for m, x in _latent_sequences(vq).items()}

    @torch.no_grad()
    def decode(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reconstruct from codes; any subset of modalities may be given.

        Returns
        -------
        dict with ``image`` (B, 3, H, W) clamped to [-1, 1], ``audio`` (B, T) and ``text_ids``
        (B, L) argmax text ids (``self.text_vocab.decode`` turns them into strings), for the modalities present in ``tokens``.
        """
        # Joint tokens summarise the modalities; they are not decoded back into any of them.
        unknown = sorted(set(tokens) - set(MODALITIES) - {"joint"})
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; expected a subset of {MODALITIES}")
        out = {}
        if "image" in tokens:
            q = self.quantizers["image"].lookup(tokens["image"].long())  # (B, h, w, D)
            out["image"] = self._decode_image(q).clamp(-1.0, 1.0)
        if "audio" in tokens:
            self._check_audio_tokens(tokens["audio"])
            # Residual codes: the sum of the given levels' codes (fewer levels, coarser audio).
            q = self.quantizers["audio"].lookup(tokens["audio"].long())  # (B, frames, D)
            out["audio"] = self._decode_audio(q)
        if "text" in tokens:
            q = self.quantizers["text"].lookup(tokens["text"].long())  # (B, L, D)
            out["text_ids"] = self._decode_text(q).argmax(dim=-1)
        return out

    def _check_audio_tokens(self, codes: torch.Tensor) -> None:
        levels = self.audio_levels
        expected = "(B, frames)" if levels == 1 else f"(B, frames, n) with 1 <= n <= {levels}"
        ok = codes.ndim == 2 if levels == 1 else codes.ndim == 3 and 1 <= codes.shape[-1] <= levels
        if not ok:
            raise ValueError(f"audio tokens must be {expected}, got shape {tuple(codes.shape)}")

    # -- persistence ---------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write ``config.json`` (with ``format_version``) and ``model.safetensors``, plus
        ``text_vocab.json`` when the text vocabulary is a trained BPE (its sha256 is in the config).

        safetensors holds only tensors, so loading a checkpoint can never run pickled code.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"format_version": FORMAT_VERSION, "config": config_to_dict(self.config)}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        write_checkpoint_vocab(self.text_vocab, directory)  # text_vocab.json, bpe only
        safetensors.torch.save_model(self, str(directory / WEIGHTS_FILE))

    @classmethod
    def load(
        cls, directory: str | Path, map_location: str | torch.device = "cpu"
    ) -> MultimodalTokenizer:
        """Rebuild a tokenizer written by :meth:`save`, on ``map_location``, in eval mode.

        Raises
        ------
        ValueError
            Naming the directory and the problem: a missing or unreadable file, another
            ``format_version``, an invalid config, or weights that do not fit the config.
        """
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise ValueError(f"{directory}: not a tokenizer checkpoint (no {name})")
        try:
            meta = json.loads((directory / CONFIG_FILE).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{directory / CONFIG_FILE}: not valid JSON ({err})") from err
        version = meta.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"{directory}: checkpoint format_version {version!r}, this code reads "
                f"{' and '.join(map(str, READABLE_VERSIONS))}"
            )
        try:
            config = tokenizer_config_from_dict(_upgrade_config(meta["config"], version))
        except (KeyError, ValueError) as err:
            raise ValueError(f"{directory / CONFIG_FILE}: invalid config ({err})") from err
        text_vocab = read_checkpoint_vocab(config.text, directory)  # errors name the file
        try:
            model = cls(config, text_vocab=text_vocab)
        except ValueError as err:
            raise ValueError(f"{directory / CONFIG_FILE}: invalid config ({err})") from err
        try:
            safetensors.torch.load_model(model, str(directory / WEIGHTS_FILE), strict=True,
                                         device=str(map_location))
        except (RuntimeError, OSError, safetensors.SafetensorError) as err:
            raise ValueError(f"{directory / WEIGHTS_FILE}: weights do not load into the "
                             f"configured model ({err})") from err
        return model.to(map_location).eval()

    def weights_hash(self) -> str:
        """sha256 over the state dict (names, dtypes, shapes, bytes) in name order."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            # Raw bytes via a uint8 view: exact, and works for dtypes numpy lacks (bfloat16).
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def _latent_sequences(vq: Mapping[str, QuantizerOutput]) -> dict[str, torch.Tensor]:
    """Modality -> (B, N_m, D_m) quantized latents, image grids flattened row by row."""
    return {"image": rearrange(vq["image"].quantized, "b h w d -> b (h w) d"),
            "audio": vq["audio"].quantized,  # (B, frames, D)
            "text": vq["text"].quantized}  # (B, L, D)


def _upgrade_config(data: Any, version: int) -> Any:
    """A saved config of ``version`` as this FORMAT_VERSION reads it: keys added since then get
    the value that reproduces what the saved model computed, not today's default."""
    if not (isinstance(data, dict) and isinstance(data.get("fusion"), dict)):
        return data
    fusion = dict(data["fusion"])
    if version <= 3:  # fused every latent
        fusion = {"max_tokens_per_modality": None, **fusion}
    if version <= 5:  # no caption head
        fusion = {"caption_ngrams": 0, **fusion}
    if version <= 4:  # embeddings from the plain mean of the latents
        fusion = {"embedding_pool": "mean", **fusion}
    return {**data, "fusion": fusion}
