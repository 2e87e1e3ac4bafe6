"""The train stage's typed config: what Ray Train runs, how long, and how it is checkpointed.

A module of its own so that the driver (:mod:`pipeline.train`) and the workers
(:mod:`pipeline.train_loop`) share one definition without importing each other: the driver
builds what the workers get (:class:`WorkerArgs`) without importing torch or the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mmvq.config import GanConfig, SpeedConfig, TokenizerConfig
from mmvq.text_vocab import TextVocab
from pipeline.config import at_least, in_range, positive


@dataclass(frozen=True)
class TrainConfig:
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    num_workers: int = 2  # DDP ranks; one CPU each unless use_gpu
    use_gpu: bool = False  # one GPU per worker, NCCL instead of gloo
    # How Ray places the workers: "PACK" fills a node first (fast gloo/NCCL on one host),
    # "SPREAD" puts them on different nodes (a dead node costs fewer ranks).
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    threads_per_worker: int = 1  # torch intra-op threads; workers x threads <= cores avoids thrash
    batch_size: int = 16  # per worker and micro-batch
    # Micro-batches per optimizer step; the global batch is num_workers x batch_size x grad_accum.
    grad_accum: int = 1
    steps: int = 300  # optimizer steps to stop at; the loop runs as many epochs as it takes
    lr: float = 2e-3  # AdamW peak; high for the tiny preset, lower it (1e-4) for base models
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW moments of the generator
    weight_decay: float = 0.0  # on conv/linear weights only (mmvq.train_step.build_optimizer)
    warmup_steps: int = 0  # linear LR warmup
    # Where the cosine decay reaches min_lr_ratio; None: at ``steps``. Set it when a run is
    # meant to be stopped and continued with more steps, so the schedule does not change.
    decay_steps: int | None = None
    min_lr_ratio: float = 0.1  # final LR as a fraction of the peak
    grad_clip: float | None = 1.0  # max global grad norm (generator and discriminators)
    ema_decay: float | None = None  # EMA of the generator (e.g. 0.999), shipped instead; None: off
    # The fast path (mmvq.speed): bf16 autocast around the encoder/decoder nets (quantizers and
    # losses stay fp32), TF32, channels_last, torch.compile, fused AdamW, on the device types it
    # names (CUDA by default; the CPU trains plain fp32 eager). Compiling makes the first step
    # slow (minutes at the base preset): ``speed.compile: false`` for short GPU runs.
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    # Adversarial + perceptual training (mmvq.config.GanConfig); None: off (the fast demo).
    gan: GanConfig | None = None
    disc_lr: float | None = None  # discriminator AdamW LR; None: lr
    disc_betas: tuple[float, float] = (0.5, 0.9)  # taming's discriminator betas
    seed: int = 0  # model init and data order
    log_every: int = 25  # steps between metric reports (MLflow and the console)
    val_every: int = 100  # steps between validations on the val split (and at each checkpoint)
    val_batches: int = 2  # val batches per validation; 0: no validation
    sample_images: int = 8  # image reconstructions per validation logged as a PNG; 0: none
    checkpoint_every: int = 100  # steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2  # kept by checkpoint_metric (the latest is always kept too)
    checkpoint_metric: str | None = "val/loss/total"  # None or no val split: keep the latest k
    checkpoint_mode: Literal["min", "max"] = "min"
    max_failures: int = 2  # worker-group restarts from the latest checkpoint before giving up
    # Checkpoint storage: a local directory or a URI (s3://bucket/prefix). None:
    # {data_root}/train/checkpoints.
    storage_path: str | None = None
    # Checkpoints of one run live under this name; rerunning with the same name continues from
    # its latest checkpoint. None: derived from the config, inputs and code (a rerun of the same
    # stage resumes; any change starts afresh). Name it to continue with changed settings.
    run_name: str | None = None
    shuffle_buffer: int = 256  # rows in each worker's local shuffle buffer; 0: no shuffle
    prefetch_batches: int = 2  # batches each worker's iterator prepares ahead
    # A worker whose train shard takes at most this many bytes streams it once and replays it
    # from memory in later epochs (a fresh permutation each), instead of restarting Ray Data's
    # streaming executor every epoch (pipeline.train_data). 0: stream every epoch.
    epoch_cache_bytes: int = 1 << 30
    # Cap on the object-store bytes Ray Data may hold for training ingest; None: Ray's default.
    data_memory_bytes: int | None = 512 * 1024 * 1024
    # A split whose parquet holds at most this many bytes (uncompressed, from the files'
    # metadata) is read once by the driver into the object store, so that Ray Data starts no
    # read task and samples no file before the first step (pipeline.raydata.parquet_split,
    # ~4 s of the demo's step 0); a larger one streams from its files. 0: always stream, the
    # default until a seed sweep settles what it does to quality: the demo's image PSNR was
    # 20.32 / 20.44 dB preloaded against 20.80 / 21.36 streamed (seeds 0 / 1; BENCHMARKS.md).
    preload_bytes: int = 0

    def min_resources(self) -> dict[str, float]:
        """What Ray must have before training can start: one CPU or GPU per worker."""
        return {"GPU" if self.use_gpu else "CPU": float(self.num_workers)}

    def describe(self) -> list[str]:
        """What the run trains with, for ``mmvq run --dry-run``: the loss terms per modality
        (weight > 0) and when the discriminators start."""
        weights, gan = self.model.loss_weights, self.gan

        def terms(modality: str, names: tuple[str, ...]) -> str:
            on = [f"{name.split('/')[1]} {weights[name]:g}" for name in names
                  if weights.get(name, 0) > 0]
            if gan is not None and modality in gan.modalities and weights.get(f"adv/{modality}"):
                kind = "PatchGAN" if modality == "image" else "multi-scale STFT"
                adaptive = ", adaptive weight" if gan.adaptive else ""
                on.append(f"adversarial {weights[f'adv/{modality}']:g} ({gan.loss} {kind} "
                          f"discriminator from step {gan.disc_start}{adaptive})")
            return f"{modality}: " + ", ".join(on)

        image = ("image/l1", "image/perceptual") if gan is not None and gan.perceptual \
            else ("image/l1",)
        lines = [terms("image", image), terms("audio", ("audio/l1", "audio/mel")),
                 terms("text", ("text/ce",))]
        if gan is not None and gan.perceptual and weights.get("image/perceptual", 0) > 0:
            source = (str(gan.perceptual_weights_path) if gan.perceptual_weights_path
                      else "torch's hub cache; off with a line if it holds none")
            lines.append(f"perceptual: LPIPS VGG16 from {source}")
        elif gan is None:
            lines.append("adversarial and perceptual terms off (train.gan unset)")
        return lines

    def __post_init__(self) -> None:
        at_least("train", self, 1, "num_workers", "threads_per_worker", "batch_size",
                 "grad_accum", "steps", "log_every", "keep_checkpoints", "decay_steps",
                 "data_memory_bytes")
        at_least("train", self, 0, "warmup_steps", "val_every", "val_batches",
                 "checkpoint_every", "max_failures", "shuffle_buffer", "sample_images",
                 "weight_decay", "prefetch_batches", "epoch_cache_bytes", "preload_bytes")
        in_range("train", "ema_decay", self.ema_decay, 0.0, 1.0, closed="()")
        positive("train", self, "lr", "disc_lr", "grad_clip")
        in_range("train", "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        for name in ("betas", "disc_betas"):
            for i, beta in enumerate(getattr(self, name)):
                in_range("train", f"{name}[{i}]", beta, 0.0, 1.0, closed="[)")


@dataclass(frozen=True)
class WorkerArgs:
    """What the driver (:mod:`pipeline.train`) hands every worker, in Ray Train's loop config."""

    config: TrainConfig
    text_vocab: TextVocab  # the data's vocabulary (the contract): sizes and ships the text codec
    tracking_uri: str | None  # rank 0 logs here
    has_val: bool  # a val split exists (and val_batches > 0)
    run_id: str | None  # the stage's MLflow run; a resumed run keeps its own
