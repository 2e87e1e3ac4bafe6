"""GPU speed: the VQGAN train step, tokenization and the quantizer, fp32 eager vs the fast path.

One run on one device times, for each variant of :class:`mmvq.speed.SpeedConfig`:

- **train**: the full GAN training step of the image branch at the ``base`` preset (taming's
  ImageNet f16 VQGAN, with 16,384 codes as in the reference row of ``../shared/BENCHMARKS.md``):
  :func:`mmvq.train_step.gan_generator_step` (L1 + VQ + LPIPS-structured VGG16 with random
  weights + PatchGAN hinge loss with the adaptive weight) then
  :func:`mmvq.train_step.discriminator_step`, on models and optimizers built (and sped up) by the
  train worker's own :func:`pipeline.train_loop.build_parts`, so a variant's numbers are what
  ``train.speed`` set to that variant runs;
- **encode**: ``MultimodalTokenizer.encode`` (tokenization) at two batch sizes;
- **quantizer**: forward+backward of the EMA vector quantizer alone, K = 16,384, D = 8 and 256,
  with the index agreement of its nearest-code search against the fp32 search;

on random data (never zeros), timed with CUDA events (wall clock on the CPU) after warm-up,
median of repeats. FLOPs per step are counted once with ``torch.utils.flop_counter`` on the
fp32 eager path; MFU is that count per second over a measured matrix-product ceiling (bf16
8192^3 on a GPU, fp32 on the CPU). Prints a table and writes JSON after every row, so a run cut
short keeps what it measured.

    python -m pipeline.bench.gpu --device cuda --out runs/bench/gpu.json
    python -m pipeline.bench.gpu --device cpu --small   # seconds; what the test suite runs

The audio and text branches, which the tokenizer always runs, are shrunk to a few hundred
parameters, so the numbers are the image branch's.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Self

import torch
from torch.utils.flop_counter import FlopCounterMode, _FlopCounterMode

from mmvq.batch import ModelInputs
from mmvq.config import (
    AudioCodecConfig,
    GanConfig,
    ImageCodecConfig,
    QuantizerConfig,
    TextCodecConfig,
    TokenizerConfig,
    image_preset,
)
from mmvq.perceptual import build_perceptual
from mmvq.speed import SpeedConfig, set_backend_flags, tune_quantizers
from mmvq.tokenizer import MultimodalTokenizer
from mmvq.train_step import discriminator_step, gan_generator_step
from pipeline.bench.quantizers import _reset_peak_rss, _status_kib, make_ours
from pipeline.train_config import TrainConfig
from pipeline.train_loop import build_parts

# The variants a run can time. fp32-eager is the in-run baseline; bf16-eager is the reference's
# own setting (eager, bf16 autocast, TF32); fast is the default SpeedConfig.
VARIANTS: dict[str, SpeedConfig] = {
    "fp32-eager": SpeedConfig.eager_fp32(),
    "bf16-eager": SpeedConfig(compile=False, channels_last=False),
    "fast": SpeedConfig(),
    "fast-nchw": SpeedConfig(channels_last=False),  # is channels_last worth it when compiled?
}
SECTIONS = ("ceiling", "quantizer", "train", "encode")

# The tiny VQGAN of --small: the base preset's structure (ResNet blocks at every level,
# attention at the lowest, z/quant convs) at 32 px and 16 channels.
SMALL_IMAGE = ImageCodecConfig(
    image_size=32, architecture="vqgan", base_channels=16, channel_mult=(1, 2, 2),
    num_res_blocks=1, attn_resolutions=(8,), z_channels=32, latent_dim=32, codebook_size=256,
)
# The tokenizer always runs all three branches; these keep audio and text to a few hundred
# parameters and a single token each, so the timings are the image branch's.
MIN_AUDIO = AudioCodecConfig(num_samples=80, base_channels=4, strides=(4, 4, 5),
                             channel_mult=(1, 1, 1), latent_dim=8, codebook_size=16,
                             mel_n_ffts=(64,))
MIN_TEXT = TextCodecConfig(max_len=1, dim=8, num_layers=1, num_heads=1, latent_dim=8,
                           codebook_size=16)
# Taming's quantizer: plain VQ, L2 lookup, learned codebook.
TRAIN_QUANTIZER = QuantizerConfig(kind="vq", l2_normalize=False)
# Taming's ImageNet f16 loss: adaptive-weighted hinge GAN on images, on from the first step.
GAN = GanConfig(disc_start=0, modalities=("image",), loss="hinge", adaptive=True)

# ../shared/BENCHMARKS.md, one NVIDIA H200 (torch 2.11.0+cu130), and the issue's targets.
REFERENCE_H200 = {
    "bf16_matmul_tflops": 789.0,
    "train_bf16_batch32_k16384_img_per_s": 81.0,
    "encode_bf16_img_per_s": "700-750",
    "quantizer_k16384_d256_taming_mtok_per_s": 2.9,
    "quantizer_k16384_d8_cosine_taming_mtok_per_s": 5.7,
    "train_flop_per_img_estimate": 1.3e12,
}
TARGETS = {"train_img_per_s": 200.0, "encode_img_per_s": 2200.0,
           "quantizer_k16384_d256_mtok_per_s": 10.0}


@dataclass(frozen=True)
class BenchSettings:
    """What one run measures."""

    device: str  # "cpu" or "cuda"
    image: ImageCodecConfig  # the image codec under test
    batch: int  # images per train step (reference: 32)
    encode_batches: tuple[int, ...]  # images per encode call (reference: 64 and 128)
    quantizer_tokens: int  # vectors per quantizer step (BENCHMARKS.md: 16,384)
    quantizer_codes: int  # K
    quantizer_dims: tuple[int, ...]  # D
    matmul_size: int  # side of the square matrix product that sets the ceiling
    warmup: int  # untimed calls first (compile, cuDNN autotuning, allocator)
    repeats: int  # timed calls; the median is reported
    variants: tuple[str, ...]
    sections: tuple[str, ...]
    # log2 of extra nearest-code search block sizes timed with the fast variant's quantizer
    search_block_sweep: tuple[int, ...]
    budget_s: float | None  # rows that would start after this many seconds are skipped


@dataclass
class Row:
    """One measurement."""

    section: str  # train, encode or quantizer
    variant: str
    batch: int  # images per call (train, encode) or tokens per call (quantizer)
    codebook_size: int
    dim: int  # code width D
    status: str = "ok"  # or why it has no numbers
    first_s: float | None = None  # the first call, compile included
    median_s: float | None = None
    img_per_s: float | None = None
    mtok_per_s: float | None = None
    peak_bytes: int | None = None  # CUDA: peak allocated; CPU: peak RSS of the process
    flop_per_call: float | None = None  # counted on the fp32 eager path
    mfu: float | None = None  # flop_per_call / median_s / ceiling
    index_agreement: float | None = None  # quantizer: share of tokens with the fp32 code


# -- devices and timing --------------------------------------------------------------------------


def timed(fn: Callable[[], Any], device: str) -> float:
    """Seconds of one call: CUDA events around it on a GPU, the wall clock on the CPU."""
    if device != "cuda":
        began = time.perf_counter()
        fn()
        return time.perf_counter() - began
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / 1000


def measure(fn: Callable[[], Any], settings: BenchSettings) -> dict[str, Any]:
    """First-call time, median of ``repeats`` after ``warmup`` calls, and peak memory."""
    first = timed(fn, settings.device)
    for _ in range(settings.warmup - 1):
        timed(fn, settings.device)
    _reset_peak(settings.device)
    times = [timed(fn, settings.device) for _ in range(settings.repeats)]
    return {"first_s": first, "median_s": statistics.median(times),
            "peak_bytes": _peak(settings.device)}


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()


def _peak(device: str) -> int | None:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, KeyError):
        return None


class _GlobalFlopCounter(FlopCounterMode):
    """``FlopCounterMode`` without its per-module tracking: the tracker's backward hooks fail
    inside ``autograd.grad``, which the adaptive GAN weight calls. Counts the total only."""

    def __enter__(self) -> Self:
        self.flop_counts.clear()
        self.mode = _FlopCounterMode(self)
        self.mode.__enter__()
        return self

    def __exit__(self, *args: object) -> bool:
        done = self.mode.__exit__(*args)
        self.mode = None  # break the reference cycle, as the parent does
        return done

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        if func_packet in self.flop_registry:
            flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            self.flop_counts["Global"][func_packet] += flops
        return out


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call (matrix products, convolutions, attention; forward and backward)."""
    with _GlobalFlopCounter(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def matmul_ceiling(settings: BenchSettings) -> dict[str, Any]:
    """Measured rate of a large square matrix product: bf16 on a GPU, fp32 on the CPU."""
    dtype = torch.bfloat16 if settings.device == "cuda" else torch.float32
    n = settings.matmul_size
    gen = torch.Generator(device=settings.device).manual_seed(0)
    a = torch.randn(n, n, device=settings.device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=settings.device, dtype=dtype, generator=gen)
    timing = measure(lambda: a @ b, dataclasses.replace(settings, warmup=3, repeats=10))
    return {"dtype": str(dtype).removeprefix("torch."), "size": n,
            "median_s": timing["median_s"], "flops": 2 * n**3 / timing["median_s"]}


def _variant(name: str, device: str) -> SpeedConfig:
    """The named SpeedConfig, made to apply on ``device`` (the CPU too, for --small)."""
    return dataclasses.replace(VARIANTS[name], device_types=(device,))


def _release() -> None:
    """Free the last variant's models and compiled graphs before building the next."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the image branch ----------------------------------------------------------------------------


def tokenizer_config(image: ImageCodecConfig) -> TokenizerConfig:
    """The image codec under test, with minimal audio and text branches and taming's VQ."""
    return TokenizerConfig(image=image, audio=MIN_AUDIO, text=MIN_TEXT,
                           quantizer=TRAIN_QUANTIZER)


def random_inputs(config: TokenizerConfig, batch: int, device: str) -> ModelInputs:
    """Random images in [-1, 1] (and random, masked-out audio and text): never zeros."""
    gen = torch.Generator().manual_seed(1)
    size, text_len = config.image.image_size, config.text.max_len
    vocab = getattr(config.text, "vocab_size", 256)
    inputs = ModelInputs(
        image=torch.rand(batch, 3, size, size, generator=gen) * 2 - 1,
        audio=torch.randn(batch, config.audio.num_samples, generator=gen) * 0.1,
        audio_len=torch.full((batch,), config.audio.num_samples),
        text_ids=torch.randint(0, vocab, (batch, text_len), generator=gen),
        text_len=torch.full((batch,), text_len),
        has_image=torch.ones(batch, dtype=torch.bool),
        has_audio=torch.zeros(batch, dtype=torch.bool),
        has_text=torch.zeros(batch, dtype=torch.bool),
    )
    return inputs.to(device)


def train_config(config: TokenizerConfig, speed: SpeedConfig) -> TrainConfig:
    """The train stage's config for the tokenizer under test: taming's GAN and LR, ``speed``.

    Everything else is the train stage's default (AdamW with taming's discriminator betas and no
    weight decay, which is taming's Adam; gradient clipping at norm 1).
    """
    return TrainConfig(model=config, gan=GAN, lr=1e-4, speed=speed)


@dataclass
class TrainSetup:
    """Everything one train step touches, as the train worker builds it."""

    config: TrainConfig
    parts: Any  # pipeline.train_loop's parts: model, discriminators, LPIPS, optimizers

    @property
    def model(self) -> MultimodalTokenizer:
        return self.parts.model

    def step(self, inputs: ModelInputs) -> None:
        """The generator step, then the discriminator step on its reconstructions, as the train
        worker's loop calls them (one micro-batch, DDP left out)."""
        parts, clip = self.parts, self.config.grad_clip
        _, recon = gan_generator_step(parts.model, inputs, parts.optimizers["generator"],
                                      parts.discriminators, GAN, step=0,
                                      perceptual=parts.perceptual, grad_clip=clip,
                                      heads=parts.head_trainer)
        discriminator_step(recon, inputs, parts.discriminators,
                           parts.optimizers["discriminator"], GAN, step=0, grad_clip=clip)

    def encode(self, inputs: ModelInputs) -> None:
        self.parts.model.encode(inputs)


def build_setup(config: TokenizerConfig, speed: SpeedConfig, device: str) -> TrainSetup:
    """Tokenizer, PatchGAN, random-weight LPIPS and both optimizers, sped up as ``speed`` says,
    through the train worker's own :func:`pipeline.train_loop.build_parts`: the benchmark times
    the path training runs."""
    torch.manual_seed(0)  # every variant starts from the same weights
    train = train_config(config, speed)
    perceptual = build_perceptual(None, random_weights=True)  # timing only
    return TrainSetup(train, build_parts(train, torch.device(device), perceptual=perceptual))


def image_rows(settings: BenchSettings, section: str, ceiling: float | None,
               emit: Callable[[Row], None], deadline: float) -> None:
    """Train or encode rows: FLOPs counted once (fp32 eager), then each variant timed."""
    config = tokenizer_config(settings.image)
    batches = (settings.batch,) if section == "train" else settings.encode_batches
    tokens = config.image.grid[0] * config.image.grid[1]  # codes per image
    flops = _count_image_flops(settings, section, config) if time.monotonic() < deadline else None
    for variant in settings.variants:
        setup = None
        for batch in batches:
            row = Row(section, variant, batch, config.image.codebook_size, config.image.latent_dim,
                      flop_per_call=flops * batch if flops else None)
            if time.monotonic() > deadline:
                emit(dataclasses.replace(row, status="skipped: time budget"))
                continue
            try:
                setup = setup or build_setup(config, _variant(variant, settings.device),
                                             settings.device)
                inputs = random_inputs(config, batch, settings.device)
                call = setup.step if section == "train" else setup.encode
                if section == "encode":
                    setup.model.eval()
                timing = measure(functools.partial(call, inputs), settings)
                row = _timed_row(row, timing, tokens, ceiling)
            except Exception as err:  # noqa: BLE001 - one failed row must not lose the others
                row.status = f"error: {type(err).__name__}: {str(err)[:300]}"
            emit(row)
        setup = None
        _release()


def _count_image_flops(settings: BenchSettings, section: str,
                       config: TokenizerConfig) -> float | None:
    """FLOPs per image of one train step or one encode call, on the fp32 eager path."""
    batch = min(2, settings.batch)
    try:
        setup = build_setup(config, _variant("fp32-eager", settings.device), settings.device)
        inputs = random_inputs(config, batch, settings.device)
        if section == "encode":
            setup.model.eval()
            return count_flops(lambda: setup.encode(inputs)) / batch
        setup.step(inputs)  # the first step allocates optimizer state; count the second
        return count_flops(lambda: setup.step(inputs)) / batch
    except Exception as err:  # noqa: BLE001 - the timings are still worth having
        print(f"[gpu-bench] FLOP count of {section} failed: {err}", file=sys.stderr)
        return None
    finally:
        _release()


def _timed_row(row: Row, timing: dict[str, Any], tokens_per_image: int,
               ceiling: float | None) -> Row:
    median = timing["median_s"]
    row = dataclasses.replace(row, **timing)
    row.img_per_s = row.batch / median
    row.mtok_per_s = row.img_per_s * tokens_per_image / 1e6
    if row.flop_per_call and ceiling:
        row.mfu = row.flop_per_call / median / ceiling
    return row


# -- the quantizer alone -------------------------------------------------------------------------


def quantizer_rows(settings: BenchSettings, emit: Callable[[Row], None],
                   deadline: float) -> None:
    """EMA VQ forward+backward (the quantizer benchmark's step) per D and variant."""
    for dim in settings.quantizer_dims:
        gen = torch.Generator().manual_seed(0)
        z = torch.randn(1, settings.quantizer_tokens, dim, generator=gen)
        z = z.to(settings.device).requires_grad_()
        for variant, speed in _quantizer_variants(settings):
            row = Row("quantizer", variant, settings.quantizer_tokens, settings.quantizer_codes,
                      dim)
            if time.monotonic() > deadline:
                emit(dataclasses.replace(row, status="skipped: time budget"))
                continue
            try:
                set_backend_flags(speed)
                step = _quantizer_step(settings, dim, speed)

                row = dataclasses.replace(
                    row, **measure(functools.partial(_quantizer_call, step, z), settings))
                row.mtok_per_s = settings.quantizer_tokens / row.median_s / 1e6
                row.index_agreement = _search_agreement(step.module, z, speed)
            except Exception as err:  # noqa: BLE001 - one failed row must not lose the others
                row.status = f"error: {type(err).__name__}: {str(err)[:300]}"
            emit(row)
            _release()


def _quantizer_variants(settings: BenchSettings) -> list[tuple[str, SpeedConfig]]:
    """The run's variants, plus the fast one at other search block sizes (``fast/block=2^n``):
    small blocks stay in L2 but cost a launch each, one large block streams through memory."""
    variants = [(name, _variant(name, settings.device)) for name in settings.variants]
    if "fast" in settings.variants:
        fast = _variant("fast", settings.device)
        variants += [(f"fast/block=2^{n}", dataclasses.replace(fast, search_block_elements=2**n))
                     for n in settings.search_block_sweep]
    return variants


def _quantizer_call(step: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> None:
    z.grad = None
    step(z).backward()


def _quantizer_step(settings: BenchSettings, dim: int, speed: SpeedConfig) -> Callable:
    torch.manual_seed(0)  # the same codebook for every variant
    step = make_ours(settings.quantizer_codes, dim, cosine=False)
    step.module.to(settings.device)
    tune_quantizers(step.module, speed)
    return step


def _search_agreement(quantizer: torch.nn.Module, z: torch.Tensor, speed: SpeedConfig) -> float:
    """Share of tokens whose code under ``speed`` is the fp32 search's, with the codes the
    timed steps left (EMA has pulled them towards ``z``: closer to trained codes than the init)."""
    quantizer.eval()
    with torch.no_grad():
        codes = quantizer(z.detach()).indices
        set_backend_flags(VARIANTS["fp32-eager"])
        reference = quantizer(z.detach()).indices
    set_backend_flags(speed)
    return float((codes == reference).float().mean())


# -- the run -------------------------------------------------------------------------------------


def run(settings: BenchSettings, out: Path | None, argv: list[str] | None) -> dict[str, Any]:
    """Measure every section, writing the JSON after each row; returns the results."""
    started = time.monotonic()
    deadline = started + settings.budget_s if settings.budget_s is not None else float("inf")
    result: dict[str, Any] = {"meta": _meta(settings, argv), "ceiling": None, "rows": []}
    flags = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark)  # restored at the end: the variants set them

    def emit(row: Row) -> None:
        result["rows"].append(asdict(row))
        print(_progress(row), flush=True)
        _write(out, result)

    ceiling = None
    if "ceiling" in settings.sections:
        result["ceiling"] = matmul_ceiling(settings)
        ceiling = result["ceiling"]["flops"]
        print(f"[gpu-bench] {result['ceiling']['dtype']} matmul {settings.matmul_size}^3: "
              f"{ceiling / 1e12:.3g} TFLOP/s", flush=True)
        _write(out, result)
    if "quantizer" in settings.sections:
        quantizer_rows(settings, emit, deadline)
    for section in ("train", "encode"):
        if section in settings.sections:
            image_rows(settings, section, ceiling, emit, deadline)
    _restore_flags(flags)
    result["meta"]["seconds"] = round(time.monotonic() - started, 1)
    _write(out, result)
    return result


def _restore_flags(flags: tuple[str, bool, bool]) -> None:
    torch.set_float32_matmul_precision(flags[0])
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags[1], flags[2]


def _write(out: Path | None, result: dict[str, Any]) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


def _meta(settings: BenchSettings, argv: list[str] | None) -> dict[str, Any]:
    device_name = (torch.cuda.get_device_name() if settings.device == "cuda"
                   else platform.processor() or platform.machine())
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m pipeline.bench.gpu " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "device": settings.device, "device_name": device_name, "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "image_params": _image_params(settings.image),
        "settings": asdict(settings),
        "variants": {name: asdict(VARIANTS[name]) for name in settings.variants},
        "reference_h200": REFERENCE_H200, "targets": TARGETS,
    }


def _image_params(image: ImageCodecConfig) -> int:
    from mmvq.modalities import build_image_codec

    with torch.device("meta"):
        encoder, decoder = build_image_codec(image)
    return sum(p.numel() for m in (encoder, decoder) for p in m.parameters())


# -- reporting -----------------------------------------------------------------------------------


def _progress(row: Row) -> str:
    if row.status != "ok":
        return f"[gpu-bench] {row.section} {row.variant} batch {row.batch}: {row.status}"
    rate = (f"{row.img_per_s:.1f} img/s" if row.img_per_s is not None
            else f"{row.mtok_per_s:.3f} Mtok/s")
    return (f"[gpu-bench] {row.section} {row.variant} batch {row.batch} D {row.dim}: {rate} "
            f"(median {row.median_s * 1e3:.1f} ms, first call {row.first_s:.1f} s)")


def table(result: dict[str, Any]) -> str:
    """The rows as a Markdown table, each with its speed-up over fp32-eager in the same run."""
    base = {(r["section"], r["batch"], r["dim"]): r for r in result["rows"]
            if r["variant"] == "fp32-eager" and r["status"] == "ok"}
    header = ("| what | variant | batch | D | img/s | Mtok/s | vs fp32-eager | peak GiB | MFU | "
              "first call s | note |")
    lines = [header, "|" + " --- |" * 11]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['section']} | {r['variant']} | {r['batch']} | {r['dim']} | "
                         f"| | | | | | {r['status']} |")
            continue
        ref = base.get((r["section"], r["batch"], r["dim"]))
        speedup = f"{ref['median_s'] / r['median_s']:.2f}x" if ref else ""
        note = ("" if r["index_agreement"] is None
                else f"codes = fp32 search: {r['index_agreement']:.4f}")
        lines.append(
            f"| {r['section']} | {r['variant']} | {r['batch']} | {r['dim']} | "
            f"{_fmt(r['img_per_s'], '.1f')} | {_fmt(r['mtok_per_s'], '.3f')} | {speedup} | "
            f"{_fmt(r['peak_bytes'] and r['peak_bytes'] / 2**30, '.2f')} | "
            f"{_fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} | "
            f"{r['first_s']:.1f} | {note} |")
    ceiling = result["ceiling"]
    if ceiling:
        lines.append(f"\nMFU against the measured {ceiling['dtype']} {ceiling['size']}^3 matrix "
                     f"product: {ceiling['flops'] / 1e12:.3g} TFLOP/s.")
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


# -- command line --------------------------------------------------------------------------------


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """Full size (the base preset, reference batch sizes) or ``--small`` (seconds on a CPU)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    variants = tuple(args.variants.split(",")) if args.variants else None
    unknown = sorted(set(variants or ()) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {sorted(VARIANTS)}")
    sections = tuple(args.sections.split(",")) if args.sections else SECTIONS
    if set(sections) - set(SECTIONS):
        raise SystemExit(f"--sections: unknown {sorted(set(sections) - set(SECTIONS))}; "
                         f"known: {list(SECTIONS)}")
    common = {"device": args.device, "variants": variants, "sections": sections,
              "budget_s": args.budget_s}
    if args.small:
        # Compiling takes minutes on a CPU: the small run leaves the compiled variant out unless
        # asked for by name.
        return BenchSettings(
            image=SMALL_IMAGE, batch=args.batch or 4, encode_batches=(8, 16),
            quantizer_tokens=1024, quantizer_codes=1024, quantizer_dims=(8, 256),
            matmul_size=512, warmup=args.warmup or 1, repeats=args.repeats or 3,
            search_block_sweep=(8,),
            **common | {"variants": variants or ("fp32-eager", "bf16-eager")})
    # Reference row: batch 32 with 16,384 codes (81 img/s); the preset itself has 1,024.
    return BenchSettings(
        image=dataclasses.replace(image_preset("base"), codebook_size=16384),
        batch=args.batch or 32, encode_batches=(64, 128), quantizer_tokens=16384,
        quantizer_codes=16384, quantizer_dims=(8, 256), matmul_size=8192,
        warmup=args.warmup or 3, repeats=args.repeats or 10, search_block_sweep=(22, 24),
        **common | {"variants": variants or ("fp32-eager", "fast", "bf16-eager")})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny VQGAN and sizes (CPU test)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--sections", default=None, help=f"comma-separated, from {SECTIONS}")
    parser.add_argument("--batch", type=int, default=None, help="images per train step")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per row")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip rows that would start after this many seconds")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (CPU); default: torch's")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write JSON if asked; returns the results."""
    args = parse_args(argv)
    settings = settings_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(settings, args.out, argv)
    print(table(result))
    return result


if __name__ == "__main__":
    main()
