"""Typed, frozen configuration of the multimodal tokenizer.

Plain defaults are the tiny CPU preset the demo trains in a few minutes on two cores. Configs load
strictly from plain dicts (parsed YAML/JSON): an unknown key is an error naming its path, e.g.
``audio.strid``, so a typo can never silently fall back to a default.
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from mmvq.config_io import ConfigError, from_dict, to_dict

# The modalities, each with its own codec and codebook, in the order every per-modality loop
# follows (tokenizer, fusion, the pipeline's stages). Here, not in mmvq.modalities, so that
# torch-free code (config loading, preprocess) can import it without importing torch.
MODALITIES = ("image", "audio", "text")


@dataclass(frozen=True)
class ImageCodecConfig:
    """Conv encoder/decoder for square RGB images (VQGAN family, Esser et al. 2021).

    Named settings come from :func:`image_preset` (``tiny``: these defaults; ``base``: taming's
    ImageNet f16).
    """

    # Side in pixels of the square images the codec reads; the pipeline's train stage sets it from
    # the preprocessed data's contract.
    image_size: int = 64
    base_channels: int = 32  # width after the patchify stem; every other width scales from it
    # Width multiplier per level; each level after the first halves the resolution, so the grid
    # is image_size / 2**(len - 1). (1, 2, 2, 2): 64 px -> 8x8 tokens, as in VQGAN f8.
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 1  # ResNet blocks on the token grid: the main depth/speed knob
    latent_dim: int = 32  # code vector width; low-dim codes use the codebook better (ViT-VQGAN)
    codebook_size: int = 256  # number of image codes K; 256 is plenty for the synthetic demo
    # "tiny": patchify stem, ResNet blocks on the token grid only; the fast CPU demo codec.
    # "vqgan": taming's encoder/decoder, ResNet blocks at every resolution (about 50x the compute
    # of "tiny" at equal widths); for GPU training.
    architecture: Literal["tiny", "vqgan"] = "tiny"
    # vqgan only: resolutions (pixels per side) whose ResNet blocks are followed by
    # self-attention. Taming's f16 attends at 16, its lowest level, where attention is cheap.
    attn_resolutions: tuple[int, ...] = ()
    # vqgan only: width at the encoder output and decoder input (taming's z_channels); 1x1
    # quant convs map it to and from latent_dim, the code width.
    z_channels: int = 256

    def __post_init__(self) -> None:
        if not self.channel_mult:
            raise ConfigError("image.channel_mult must not be empty")
        if self.architecture not in ("tiny", "vqgan"):
            raise ConfigError(
                f"image.architecture must be 'tiny' or 'vqgan', got {self.architecture!r}"
            )
        self._check_attn_resolutions()
        if self.image_size % self.downsample:
            raise ConfigError(
                f"image.image_size={self.image_size} is not divisible by the downsampling "
                f"factor {self.downsample} implied by channel_mult={self.channel_mult}"
            )

    def _check_attn_resolutions(self) -> None:
        if self.attn_resolutions and self.architecture != "vqgan":
            raise ConfigError("image.attn_resolutions applies to architecture 'vqgan' only")
        levels = [self.image_size >> i for i in range(len(self.channel_mult))]
        stray = [r for r in self.attn_resolutions if r not in levels]
        if stray:  # would silently add no attention at all
            raise ConfigError(
                f"image.attn_resolutions {stray} match no level; the levels are {levels}"
            )

    @property
    def downsample(self) -> int:
        """Pixels per token along each side."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid ``(h, w)``."""
        side = self.image_size // self.downsample
        return (side, side)


# Named image codecs, for :func:`image_preset`.
IMAGE_PRESETS: Mapping[str, ImageCodecConfig] = types.MappingProxyType(
    {
        "tiny": ImageCodecConfig(),  # the CPU demo default
        # taming-transformers' ImageNet f16 VQGAN (configs/imagenet_vqgan.yaml, n_embed 1024):
        # 256 px -> 16x16 codes, about 72M encoder + decoder parameters.
        "base": ImageCodecConfig(
            image_size=256,
            architecture="vqgan",
            base_channels=128,
            channel_mult=(1, 1, 2, 2, 4),
            num_res_blocks=2,
            attn_resolutions=(16,),
            z_channels=256,
            latent_dim=256,
            codebook_size=1024,
        ),
    }
)


def image_preset(name: str) -> ImageCodecConfig:
    """The image codec config called ``name`` (``tiny`` or ``base``).

    Raises
    ------
    ConfigError
        (a ValueError) for an unknown name; the message lists the known ones.
    """
    if name not in IMAGE_PRESETS:
        raise ConfigError(f"unknown image preset {name!r}; known: {sorted(IMAGE_PRESETS)}")
    return IMAGE_PRESETS[name]


@dataclass(frozen=True)
class AudioCodecConfig:
    """Strided encoder/decoder for mono waveforms (a slim SEANet, as in SoundStream/EnCodec)."""

    # Hz; 8 kHz keeps speech intelligible and the demo cheap. The pipeline's train stage sets
    # sample_rate and num_samples from the preprocessed data's contract.
    sample_rate: int = 8000
    # Fixed clip length the codec reads (2.5 s at 8 kHz); a shorter clip arrives zero-padded to
    # it, with its real length in ``audio_len``.
    num_samples: int = 20000
    # Width of the first strided stage. It holds T/4 steps, so its width sets most of the CPU cost:
    # 16 (4x the 4 samples it reads) trains ~2x faster than 32 for the same frame-rate width.
    base_channels: int = 16
    strides: tuple[int, ...] = (4, 4, 5)  # per-stage downsampling; hop = prod = 80 samples (10 ms)
    # Width multiplier per stage, one per stride (SEANet doubles at every stage): 16, 32, 32.
    channel_mult: tuple[int, ...] = (1, 2, 2)
    latent_dim: int = 32  # code vector width
    codebook_size: int = 256  # number of audio codes K
    # STFT sizes of the multi-resolution mel loss: a short window for transients, a long one for
    # pitch (multi-scale spectral loss, Engel et al. 2020 / DAC).
    mel_n_ffts: tuple[int, ...] = (128, 512)

    def __post_init__(self) -> None:
        if not self.strides or any(s < 1 for s in self.strides):
            raise ConfigError(f"audio.strides must be positive integers, got {self.strides}")
        if len(self.channel_mult) != len(self.strides):
            raise ConfigError(
                f"audio.channel_mult needs one entry per stride: {self.channel_mult} vs "
                f"{self.strides}"
            )
        if not self.mel_n_ffts or any(n < 16 for n in self.mel_n_ffts):
            raise ConfigError(f"audio.mel_n_ffts must be >= 16, got {self.mel_n_ffts}")

    @property
    def hop(self) -> int:
        """Samples per token."""
        return math.prod(self.strides)

    @property
    def num_frames(self) -> int:
        """Tokens per clip (the clip is zero-padded up to a whole number of hops)."""
        return -(-self.num_samples // self.hop)


BYTE_VOCAB_SIZE = 257  # mmvq.text_vocab.VOCAB_SIZE: 256 byte values + PAD


@dataclass(frozen=True)
class TextCodecConfig:
    """Transformer encoder/decoder over text ids (bytes or BPE), one code per id position."""

    # Id positions per caption, PAD-filled after the text (the width of ``text_ids``); the
    # pipeline's train stage sets it from the preprocessed data's contract.
    max_len: int = 64
    dim: int = 128  # transformer width
    num_layers: int = 2  # transformer layers in the encoder and in the decoder
    num_heads: int = 4  # attention heads; dim must be divisible by it
    latent_dim: int = 32  # code vector width
    codebook_size: int = 256  # number of text codes K (one code per id position)
    # Text ids (mmvq.text_vocab): "bytes", UTF-8 bytes, needs no file; "bpe", a byte-level BPE
    # trained on captions (several times fewer ids per caption), saved as text_vocab.json in the
    # checkpoint. The pipeline's preprocess stage chooses it; train copies it from the data.
    vocab: Literal["bytes", "bpe"] = "bytes"
    # Number of text ids, PAD included: the embedding and logit size. 257 for bytes; for bpe the
    # trained vocabulary's size.
    vocab_size: int = BYTE_VOCAB_SIZE
    # bpe only: sha256 of the vocabulary file's content, so weights never meet another
    # vocabulary (MultimodalTokenizer.load checks the file against it).
    vocab_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ConfigError(
                f"text.dim={self.dim} must be divisible by text.num_heads={self.num_heads}"
            )
        if self.max_len < 1:
            raise ConfigError(f"text.max_len must be positive, got {self.max_len}")
        self._check_vocab()

    def _check_vocab(self) -> None:
        if self.vocab not in ("bytes", "bpe"):
            raise ConfigError(f"text.vocab must be 'bytes' or 'bpe', got {self.vocab!r}")
        if self.vocab == "bytes":
            if self.vocab_size != BYTE_VOCAB_SIZE or self.vocab_sha256 is not None:
                raise ConfigError(
                    f"text.vocab 'bytes' has vocab_size {BYTE_VOCAB_SIZE} and no vocab_sha256; "
                    f"got vocab_size={self.vocab_size}, vocab_sha256={self.vocab_sha256!r}"
                )
            return
        if self.vocab_size <= BYTE_VOCAB_SIZE:
            raise ConfigError(
                f"text.vocab_size must exceed {BYTE_VOCAB_SIZE} for 'bpe', got {self.vocab_size}"
            )
        sha = self.vocab_sha256
        if sha is None or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ConfigError(
                f"text.vocab_sha256 must be the 64-hex sha256 of the BPE vocabulary, got {sha!r}"
            )


@dataclass(frozen=True)
class QuantizerConfig:
    """Settings shared by the per-modality quantizers.

    Each kind reads only some fields (``mmvq.quantizers.APPLICABLE_FIELDS``); setting one it does
    not read is an error when the quantizer is built.
    """

    # Key of mmvq.quantizers.QUANTIZERS: "vq", "simvq", "rvq" (residual), "fsq", "lfq". "simvq"
    # (a shared linear map over a frozen random codebook) keeps more codes alive than plain "vq"
    # at the same cost.
    kind: str = "simvq"
    # Look up codes by cosine similarity (l2-normalised latents and codes, ViT-VQGAN, Yu et al.
    # 2022): far fewer dead codes than raw-L2 VQ with a randomly initialised codebook. vq and
    # simvq only; residual levels are not unit vectors, and fsq/lfq have no lookup.
    l2_normalize: bool = True
    # Factorised codes (ViT-VQGAN): search in a learned code_dim-wide projection (e.g. 8) and
    # project back; low-dimensional lookups use the codebook better. None: search in latent_dim.
    code_dim: int | None = None
    # Rotation trick (Fifty et al. 2024): the encoder gradient is rotated and scaled from code to
    # input instead of copied, keeping the input's position inside its Voronoi cell.
    rotation_trick: bool = False
    # EMA codebook (VQ-VAE appendix A.1): codes are running means of their assigned vectors
    # instead of learned by gradient; stabler with large K; vq/codebook is then 0.
    ema: bool = False
    decay: float = 0.99  # EMA decay of codes and usage counts; lower adapts faster, noisier
    eps: float = 1e-5  # Laplace smoothing of EMA counts, so an unused code never divides by 0
    # Codes start as k-means centroids of the first training batch, not random points far from
    # the data where they would never be picked (SoundStream).
    kmeans_init: bool = False
    kmeans_iters: int = 10  # Lloyd iterations of that k-means; a few suffice for a start
    # Codes whose EMA count of assigned vectors per step falls below this jump to random recent
    # encoder outputs (dead-code restart, Jukebox/SoundStream); 0 disables. Counts start at 1,
    # so with decay 0.99 a never-used code is restarted after ~log(t)/log(0.99) steps.
    restart_threshold: float = 0.0
    # rvq: residual levels, i.e. tokens per vector; bitrate = levels x log2(codebook_size).
    num_levels: int = 4
    # rvq: fraction of training samples that use a random number of levels (quantizer dropout,
    # SoundStream), so that one model decodes at every bitrate; DAC uses 0.5.
    quantizer_dropout: float = 0.0
    # fsq: levels per dimension (Mentzer et al. 2023); the modality's codebook_size must equal
    # their product: (8, 5, 5, 5) -> 1000, (8, 6, 5) -> 240, (8, 8, 8, 5, 5, 5) -> 64000.
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)
    # lfq: weight of MAGVIT-v2's entropy loss (per-sample minus codebook entropy), which keeps
    # the 2^b sign codes in use; added to vq/codebook. MAGVIT-v2 uses 0.1.
    entropy_weight: float = 0.1

    def __post_init__(self) -> None:
        checks = {
            "code_dim": self.code_dim is None or self.code_dim >= 1,
            "decay": 0.0 < self.decay < 1.0,
            "eps": self.eps > 0.0,
            "kmeans_iters": self.kmeans_iters >= 0,
            "restart_threshold": self.restart_threshold >= 0.0,
            "num_levels": self.num_levels >= 1,
            "quantizer_dropout": 0.0 <= self.quantizer_dropout <= 1.0,
            "fsq_levels": bool(self.fsq_levels) and all(n >= 2 for n in self.fsq_levels),
            "entropy_weight": self.entropy_weight >= 0.0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"quantizer.{name} is out of range: {getattr(self, name)!r}")


EMBEDDING_POOLS = ("position_mlp", "mlp", "mean")  # FusionConfig.embedding_pool

# The joint tokens' default quantizer (FusionConfig.quantizer says why).
JOINT_QUANTIZER = QuantizerConfig(kind="vq", ema=True, kmeans_init=True, restart_threshold=1.0,
                                  code_dim=16, decay=0.95)


@dataclass(frozen=True)
class FusionConfig:
    """Joint tokens over the modalities (see mmvq.fusion)."""

    enabled: bool = False  # off by default: the demo trains per-modality tokenizers only
    dim: int = 128  # transformer width
    num_layers: int = 2  # transformer depth over queries + all modality latents
    num_heads: int = 4
    num_queries: int = 8  # joint tokens per sample
    # Each modality's latents are average-pooled along their sequence to at most this many
    # before the transformer (None: all). The demo's audio alone has 250 frames; over all 386
    # latents a demo train step took 0.50 s against 0.24 s without fusion (batch 16, one
    # thread); pooled to 32 each, 0.27 s.
    max_tokens_per_modality: int | None = 32
    codebook_size: int = 64  # joint-token vocabulary
    embed_dim: int = 64  # per-modality embedding size for the contrastive loss and retrieval
    # How a modality's quantized latents become the vector its embedding is a linear map of
    # (mmvq.pooling): "position_mlp" averages a small MLP of every position with a learned bias
    # per relative position, "mlp" the same without positions (Deep Sets, Zaheer et al. 2017;
    # checkpoints of format 5 before it), "mean" the latents themselves (before format 5). The
    # demo's codes are 8-wide (code_dim), so a plain mean leaves at most 8 directions per
    # modality to align; without positions a caption is a bag of tokens and an image a bag of
    # patches, so relations ("left of") and which colour goes with which shape are lost: a probe
    # on the same frozen tokens went from audio->text R@5 0.06 to 0.31 with positions
    # (BENCHMARKS.md "Fusion benchmark").
    embedding_pool: str = "position_mlp"
    # The alignment's gradient at each modality's quantized latents is capped at this times the
    # running norm of the reconstruction gradient there (mmvq.grad_balance), so that however
    # large align/infonce's weight, it cannot outweigh reconstruction; None: no cap. Training
    # only: encode and decode do not depend on it.
    align_grad_ratio: float | None = 0.5
    temperature: float = 0.07  # InfoNCE temperature (CLIP's initial value)
    # Training only (mmvq.head_replay): after each train step the alignment heads take this
    # many more steps of their own, on batches drawn from a replay of the last
    # align_replay_samples samples' detached quantized latents, with their own AdamW at
    # align_head_lr (same warmup-cosine schedule). Off by default: on the demo's schedule 8
    # steps raised the heads' own R@5 ~1.5x but not the tokens' probe retrieval, at +35% train
    # time (BENCHMARKS.md "Alignment-head replay"). The replay costs 4 bytes x (latent
    # positions of all modalities) x code width per sample on the model's device (12 KiB per
    # demo sample, 18 MiB at 1536); 0 steps: no replay, no extra optimizer.
    align_head_steps: int = 0
    align_replay_samples: int = 1536
    align_head_lr: float = 2e-3
    # align/caption (mmvq.caption_target): every modality's pooled quantized latents predict the
    # hashed 1..caption_ngrams-grams of the sample's text ids, a target that exists from the
    # first step, unlike InfoNCE's; 0: no caption head. Off by default: on bench_joint (seeds
    # 2 / 0, 512 val) weight 3 raised audio->text R@5 from 0.32 / 0.33 to 0.55 / 0.51 but
    # lowered image->text from 0.14 / 0.15 to 0.12 / 0.14 and image PSNR by 0.6 dB
    # (BENCHMARKS.md "Caption objective"). To use it set caption_ngrams: 3 and
    # loss_weights.align/caption > 0.
    caption_ngrams: int = 0
    caption_buckets: int = 1024
    # Which modalities get a caption head (those of the model among them). Text predicting its
    # own n-grams is nearly free; an image head pulls the image latents towards the words.
    caption_modalities: tuple[str, ...] = MODALITIES
    # Softmax temperature of the soft joint-code assignments of the fusion/diversity loss, over
    # cosine similarities in [-1, 1]. It must be sharp enough that the soft assignments look
    # like the hard lookup: at 0.1 each latent's soft assignment still spread over many nearby
    # codes, so the loss was near 0 while the hard codes crowded onto half the codebook (val
    # usage 0.48 / 0.53 / 0.83 over seeds 2 / 0 / 1 with positional heads); at 0.02 it was
    # 0.95 / 0.88 / 0.92, and the joint tokens predicted the modalities better (BENCHMARKS.md
    # "Joint codebook usage and the diversity temperature").
    diversity_temperature: float = 0.02
    # Probability that a present modality is hidden from fusion for a training sample; at least
    # one modality always stays, so every sample still gets joint tokens.
    modality_dropout: float = 0.2
    # Quantizer of the joint tokens (one code per query, so any kind but "rvq"). The joint
    # latents are few per step (batch x num_queries) and move fast early in training, so a
    # gradient-learned codebook falls behind and collapses (simvq kept 2 of 256 codes in the
    # demo, BENCHMARKS.md "Demo with fusion on"). EMA codes follow their assigned vectors,
    # k-means starts them on the data, restarts revive the codes that still die, and a 16-wide
    # factorised lookup spreads the vectors over the codes. The EMA decay is 0.95, not the
    # modality codebooks' 0.99: the joint latents drift all through the demo's 300 steps (val
    # usage 0.2-0.5 until step 200, then rising as the LR decays), and codes that average over
    # ~100 steps sit where the latents were; at 0.95 val usage was 1.0 / 1.0 against 0.97 / 0.86
    # (seeds 2 / 0), and 0.94 / 0.89 against 0.86 / 0.75 with an audio caption head
    # (BENCHMARKS.md "Joint usage and modality dropout"). A ``fusion.quantizer`` mapping in a
    # workflow changes only the keys it names; one naming another kind starts from
    # QuantizerConfig's defaults (mmvq.config_io.from_dict).
    quantizer: QuantizerConfig = field(default_factory=lambda: JOINT_QUANTIZER)

    def __post_init__(self) -> None:
        if self.max_tokens_per_modality is not None and self.max_tokens_per_modality < 1:
            raise ConfigError("fusion.max_tokens_per_modality must be >= 1 or null, got "
                              f"{self.max_tokens_per_modality!r}")
        if self.quantizer.kind == "rvq":
            raise ConfigError("fusion.quantizer.kind 'rvq' is not supported: joint tokens have "
                              "one code per query")
        if self.align_grad_ratio is not None and self.align_grad_ratio <= 0:
            raise ConfigError("fusion.align_grad_ratio must be positive or null, got "
                              f"{self.align_grad_ratio!r}")
        if self.align_head_steps < 0:
            raise ConfigError(f"fusion.align_head_steps must be >= 0, got {self.align_head_steps!r}")
        if self.align_replay_samples < 2:
            raise ConfigError("fusion.align_replay_samples must be >= 2 (a contrastive batch "
                              f"needs a negative), got {self.align_replay_samples!r}")
        if self.align_head_lr <= 0:
            raise ConfigError(f"fusion.align_head_lr must be positive, got {self.align_head_lr!r}")
        if not 0 <= self.caption_ngrams <= 3:
            raise ConfigError(f"fusion.caption_ngrams must be in 0..3, got {self.caption_ngrams!r}")
        if self.caption_buckets < 1:
            raise ConfigError(f"fusion.caption_buckets must be >= 1, got {self.caption_buckets!r}")
        stray = sorted(set(self.caption_modalities) - set(MODALITIES))
        if stray or not self.caption_modalities:
            raise ConfigError("fusion.caption_modalities must be a non-empty subset of image, "
                              f"audio, text, got {list(self.caption_modalities)!r}")
        if self.embedding_pool not in EMBEDDING_POOLS:
            raise ConfigError(f"fusion.embedding_pool must be one of {', '.join(EMBEDDING_POOLS)}, "
                              f"got {self.embedding_pool!r}")


# Loss names with their default weight in ``total``. MultimodalTokenizer.forward computes the
# reconstruction and vq/ terms, and with FusionConfig.enabled the fusion/ and align/ terms
# (mmvq.fusion); the GAN generator step (mmvq.train_step.gan_generator_step) adds
# image/perceptual and adv/*.
DEFAULT_LOSS_WEIGHTS: Mapping[str, float] = types.MappingProxyType(
    {
        "image/l1": 1.0,  # pixel L1 on [-1, 1] images
        "audio/l1": 1.0,  # waveform L1; anchors phase, which the mel loss ignores
        "audio/mel": 1.0,  # multi-resolution log-mel L1 (perceptual proxy)
        "text/ce": 1.0,  # text-id cross-entropy over the real (unpadded) positions
        "vq/commit": 0.25,  # beta of VQ-VAE (van den Oord et al. 2017, eq. 3)
        "vq/codebook": 1.0,  # moves codes towards the encoder outputs
        "image/perceptual": 1.0,  # LPIPS (Zhang et al. 2018); taming's perceptual_weight
        # Adversarial terms, times the adaptive weight when GanConfig.adaptive (taming's
        # disc_weight; 0.8 in its ImageNet f16 config).
        "adv/image": 0.8,
        "adv/audio": 1.0,
        # Fusion (only when FusionConfig.enabled): its own joint-token quantizer, and the
        # symmetric InfoNCE that aligns the modalities' pooled embeddings.
        "fusion/commit": 0.25,
        "fusion/codebook": 1.0,
        # Predict each modality's pooled latent from the joint tokens (mmvq.fusion): the target
        # that makes the joint tokens carry information; at 0 their codebook collapses.
        "fusion/recon": 1.0,
        # Spread the joint latents over the whole joint codebook (Fusion.diversity_loss).
        "fusion/diversity": 0.1,
        "align/infonce": 0.1,
        # Predict the caption's hashed n-grams from each modality's pooled tokens (mmvq.fusion).
        "align/caption": 0.0,
    }
)


def _default_loss_weights() -> Mapping[str, float]:
    return types.MappingProxyType(dict(DEFAULT_LOSS_WEIGHTS))


@dataclass(frozen=True)
class TokenizerConfig:
    """The whole tokenizer: one codec per modality, the quantizer and the loss weights."""

    image: ImageCodecConfig = field(default_factory=ImageCodecConfig)
    audio: AudioCodecConfig = field(default_factory=AudioCodecConfig)
    text: TextCodecConfig = field(default_factory=TextCodecConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    # Weight of each loss in ``total``; keys as in DEFAULT_LOSS_WEIGHTS, missing keys keep the
    # default, unknown keys are an error.
    loss_weights: Mapping[str, float] = field(default_factory=_default_loss_weights)
    fusion: FusionConfig = field(default_factory=FusionConfig)  # joint tokens; off by default
    # The audio quantizer, when it differs from ``quantizer`` (None: the same). Residual VQ here
    # ({kind: rvq, num_levels: 8, quantizer_dropout: 0.5}) gives EnCodec/DAC-style audio tokens,
    # ``num_levels`` codes per frame, decodable from any leading number of levels (the bitrate).
    audio_quantizer: QuantizerConfig | None = None

    def __post_init__(self) -> None:
        if self.quantizer.kind == "rvq":
            # Image and text tokens are one code per position; only audio has levels wired
            # through token shapes, the vocabulary and the token dataset.
            raise ConfigError("quantizer.kind 'rvq' applies to audio only: set "
                              "audio_quantizer.kind: rvq and keep quantizer for image and text")
        unknown = sorted(set(self.loss_weights) - set(DEFAULT_LOSS_WEIGHTS))
        if unknown:
            raise ConfigError(
                f"unknown key loss_weights.{unknown[0]}; known: {sorted(DEFAULT_LOSS_WEIGHTS)}"
            )
        merged = {**DEFAULT_LOSS_WEIGHTS, **{k: float(v) for k, v in self.loss_weights.items()}}
        if self.fusion.enabled and merged["align/caption"] > 0 and self.fusion.caption_ngrams == 0:
            # A weight on a loss without its head would train nothing and say nothing.
            raise ConfigError(f"loss_weights.align/caption is {merged['align/caption']:g} but "
                              "fusion.caption_ngrams is 0 (no caption head): set "
                              "fusion.caption_ngrams to 1..3, or the weight to 0")
        # Frozen dataclass: __post_init__ is the one place allowed to normalise a field.
        object.__setattr__(self, "loss_weights", types.MappingProxyType(merged))

    def __reduce__(self):
        # A mappingproxy cannot be pickled, and Ray pickles configs to ship them to workers.
        fields = (self.image, self.audio, self.text, self.quantizer, dict(self.loss_weights),
                  self.fusion, self.audio_quantizer)
        return (type(self), fields)

    def quantizer_for(self, modality: str) -> QuantizerConfig:
        """The quantizer config of ``modality`` (``image``, ``audio`` or ``text``)."""
        if modality == "audio" and self.audio_quantizer is not None:
            return self.audio_quantizer
        return self.quantizer


GAN_MODALITIES = ("image", "audio")  # modalities a discriminator exists for


@dataclass(frozen=True)
class GanConfig:
    """Adversarial and perceptual training: when and how, and the discriminators' shapes.

    VQGAN (Esser et al. 2021) for images, EnCodec (Défossez et al. 2022) for audio. The weights of
    the terms live with every other loss weight in ``TokenizerConfig.loss_weights``
    (``adv/image``, ``adv/audio``, ``image/perceptual``). Not part of the tokenizer checkpoint:
    discriminators and the perceptual net are training-only.
    """

    # Step from which the discriminators train and the adversarial loss counts (adopt_weight).
    # Before it the autoencoder learns to reconstruct; a discriminator switched on at step 0
    # wins at once and its gradients are noise. Taming's ImageNet f16 run started at 250k.
    disc_start: int = 10_000
    # "hinge" (taming's default) or "vanilla" (non-saturating; Goodfellow et al. 2014).
    loss: Literal["hinge", "vanilla"] = "hinge"
    # Scale the adversarial gradient to the reconstruction gradient at the decoder's last layer
    # (VQGAN eq. 7); off: the adversarial term gets its loss weight only.
    adaptive: bool = True
    # Clamp of the adaptive weight (taming: 1e4), for when the adversarial gradient vanishes.
    max_adaptive_weight: float = 1e4
    # The LPIPS perceptual loss (weight image/perceptual), from this file of weights
    # (mmvq.perceptual), or when it is None from torch's hub cache (lpips_vgg.pt, or
    # torchvision's vgg16-397923af.pth with LPIPS's vgg.pth); none there: off, said in one line.
    # Never downloaded: training nodes may have no network, and a silent download is an
    # unpinned dependency.
    perceptual: bool = True
    perceptual_weights_path: Path | None = None
    # Modalities that get a discriminator and an adversarial loss.
    modalities: tuple[str, ...] = GAN_MODALITIES
    image_disc_channels: int = 64  # PatchGAN width after the first conv (taming's ndf)
    image_disc_layers: int = 3  # PatchGAN stride-2 convs; 3 -> 70x70-pixel patches (Isola 2017)
    # "batch" as taming; "group" makes each sample's logits independent of the rest of the batch
    # (absent, zero images in it; DDP without SyncBatchNorm).
    image_disc_norm: Literal["batch", "group"] = "batch"
    # STFT windows of the multi-scale audio discriminator; EnCodec's 128..2048 at 24 kHz scaled
    # to the 8 kHz demo rate.
    audio_disc_n_ffts: tuple[int, ...] = (128, 256, 512)
    audio_disc_channels: int = 32  # conv width per STFT scale (EnCodec: 32)

    def __post_init__(self) -> None:
        stray = sorted(set(self.modalities) - set(GAN_MODALITIES))
        if stray:
            raise ConfigError(
                f"gan.modalities: no discriminator for {stray}; known: {list(GAN_MODALITIES)}"
            )
        if self.loss not in ("hinge", "vanilla"):
            raise ConfigError(f"gan.loss must be 'hinge' or 'vanilla', got {self.loss!r}")
        if self.image_disc_norm not in ("batch", "group"):
            raise ConfigError(
                f"gan.image_disc_norm must be 'batch' or 'group', got {self.image_disc_norm!r}"
            )
        if self.disc_start < 0:
            raise ConfigError(f"gan.disc_start must be >= 0, got {self.disc_start}")
        if not self.audio_disc_n_ffts or any(n < 16 for n in self.audio_disc_n_ffts):
            raise ConfigError(f"gan.audio_disc_n_ffts must be >= 16, got {self.audio_disc_n_ffts}")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Convert a config dataclass to plain JSON/YAML types (tuples become lists)."""
    return to_dict(cfg)


def tokenizer_config_from_dict(d: Mapping[str, Any]) -> TokenizerConfig:
    """Build a :class:`TokenizerConfig` from plain types, strictly.

    Raises
    ------
    ConfigError
        (a ValueError) on an unknown key (the message names its dotted path, e.g.
        ``audio.strid``), a value of the wrong type, or an invalid combination of values.
    """
    return from_dict(TokenizerConfig, d)


# ----------------------------------------------------------------------------- speed

# The switches of mmvq.speed.apply_speed, here (no torch import) so that a stage config holding
# them loads without torch.
DEVICE_TYPES = ("cpu", "cuda")


@dataclass(frozen=True)
class SpeedConfig:
    """Which optimisations :func:`mmvq.speed.apply_speed` turns on; each one is a switch.

    The ``speed`` section of the train and tokenize stage configs. The defaults are the fastest
    path on a GPU; :meth:`eager_fp32` is the plain path (the benchmark's in-run baseline).
    """

    # Device types the switches apply on; on any other device apply_speed changes nothing. The
    # CPU is left out by default: CPUs without bf16 matrix units run bf16 slower than fp32, and
    # compiling takes minutes there (5 min for a 0.3M-parameter VQGAN on the 2-core dev machine).
    device_types: tuple[str, ...] = ("cuda",)
    # bf16 autocast around the conv nets; the quantizer and the losses stay fp32.
    bf16: bool = True
    # TF32 (10-bit mantissa) for the fp32 matmuls and convs left outside autocast, including the
    # quantizer's distance search: ~8x the fp32 rate there; a near tie between two codes may then
    # resolve to the other one (the benchmark reports how often). False: IEEE fp32 everywhere.
    tf32: bool = True
    # cuDNN tries the conv algorithms once per shape and keeps the fastest; pays with fixed shapes.
    cudnn_benchmark: bool = True
    # NHWC memory format for the conv nets. None: on exactly when compiled (eager GroupNorm is
    # slower in NHWC, BENCHMARKS.md).
    channels_last: bool | None = None
    # torch.compile of the conv nets (first step compiles: minutes for the base preset).
    compile: bool = True
    # torch.compile mode; "max-autotune-no-cudagraphs" tunes the conv/matmul kernels further at a
    # longer compile. CUDA-graph modes are not offered: the train step reads losses on the host.
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    # Replace unfused Adam/AdamW optimizers by fused ones (build_optimizer's already are).
    fused_optimizer: bool = True
    # Distance entries per block of the quantizers' nearest-code search (None: keep theirs, 4M).
    # 2**27 (512 MiB in fp32) covers 8,192 tokens x 16,384 codes in one matrix product.
    search_block_elements: int | None = 2**27

    def __post_init__(self) -> None:
        stray = sorted(set(self.device_types) - set(DEVICE_TYPES))
        if stray:
            raise ConfigError(f"speed.device_types: unknown {stray}; known: {list(DEVICE_TYPES)}")
        if self.compile_mode not in ("default", "max-autotune-no-cudagraphs"):
            raise ConfigError(f"speed.compile_mode: unknown {self.compile_mode!r}")
        if self.search_block_elements is not None and self.search_block_elements < 1:
            raise ConfigError(
                f"speed.search_block_elements must be >= 1 or null, got {self.search_block_elements}"
            )

    @classmethod
    def eager_fp32(cls) -> SpeedConfig:
        """Every switch off: fp32 (no TF32), eager, NCHW, optimizers and search as built."""
        return cls(bf16=False, tf32=False, cudnn_benchmark=False, channels_last=False,
                   compile=False, fused_optimizer=False, search_block_elements=None)

    @property
    def use_channels_last(self) -> bool:
        """channels_last with its default resolved (on iff compiled)."""
        return self.compile if self.channels_last is None else self.channels_last

    def for_device(self, device: Any) -> SpeedConfig:
        """This config on ``device`` (a ``torch.device`` or its name, ``cuda:1``): itself where
        it applies, :meth:`eager_fp32` elsewhere."""
        kind = device.type if hasattr(device, "type") else str(device).split(":")[0]
        applies = kind in self.device_types
        return self if applies else replace(
            self.eager_fp32(), device_types=self.device_types)
