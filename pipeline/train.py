"""Train stage: Ray Train DDP over the preprocessed train split, checkpointed and resumable.

The driver side lives here: the typed config, the ``TorchTrainer`` (scaling, checkpoint
retention, failure handling, data ingest options) and the commit of the final tokenizer to
``{output}/tokenizer``, where tokenize and evaluate load it. What every worker runs is in
:mod:`pipeline.train_loop`, the checkpoint layout in :mod:`pipeline.checkpoint`.

Checkpoints go to ``{storage_path}/{run_name}`` (default ``{data_root}/train/checkpoints/`` and a
name derived from config, inputs and code), outside the stage's temporary output directory: a
rerun of a killed or stopped run finds them and continues from the latest one, in the same
MLflow run. ``FailureConfig(max_failures)`` restarts a crashed worker group from the latest
checkpoint within one run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from mmvq.batch import MODEL_COLUMNS
from mmvq.config import GanConfig, TokenizerConfig
from pipeline.checkpoint import TOKENIZER_DIR, read_state
from pipeline.config import at_least, flatten, in_range, positive, to_dict
from pipeline.stage import StageContext, code_version
from pipeline.text_vocab import with_data_vocab
from pipeline.tracking import RunLogger
from pipeline.train_loop import train_loop_per_worker

__all__ = ["TOKENIZER_DIR", "TrainConfig", "run", "train_loop_per_worker"]

CHECKPOINTS_DIR = "checkpoints"  # default storage, beside the stage's committed outputs
# Modules whose code decides what a checkpoint means; part of the default run name.
TRAIN_CODE = ("pipeline.train", "pipeline.train_loop", "pipeline.checkpoint", "mmvq")


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
    # "auto": bf16 autocast on GPU (quantizers stay fp32), fp32 on CPU; or "fp32", "bf16".
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    ema_decay: float | None = None  # EMA of the generator (e.g. 0.999), shipped instead; None: off
    compile: bool = False  # torch.compile the encoders and decoders (GPU runs; slow to start)
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
    # Cap on the object-store bytes Ray Data may hold for training ingest; None: Ray's default.
    data_memory_bytes: int | None = 512 * 1024 * 1024

    def min_resources(self) -> dict[str, float]:
        """What Ray must have before training can start: one CPU or GPU per worker."""
        return {"GPU" if self.use_gpu else "CPU": float(self.num_workers)}

    def __post_init__(self) -> None:
        at_least("train", self, 1, "num_workers", "threads_per_worker", "batch_size",
                 "grad_accum", "steps", "log_every", "keep_checkpoints", "decay_steps",
                 "data_memory_bytes")
        at_least("train", self, 0, "warmup_steps", "val_every", "val_batches",
                 "checkpoint_every", "max_failures", "shuffle_buffer", "sample_images",
                 "weight_decay", "prefetch_batches")
        in_range("train", "ema_decay", self.ema_decay, 0.0, 1.0, closed="()")
        positive("train", self, "lr", "disc_lr", "grad_clip")
        in_range("train", "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        for name in ("betas", "disc_betas"):
            for i, beta in enumerate(getattr(self, name)):
                in_range("train", f"{name}[{i}]", beta, 0.0, 1.0, closed="[)")


def run(config: TrainConfig, ctx: StageContext) -> dict[str, Any]:
    """Fit the tokenizer with a ``TorchTrainer`` and commit the final checkpoint's tokenizer."""
    # The data's text vocabulary (preprocess's text_vocab.json, else bytes) sizes the text codec.
    model_config, text_vocab = with_data_vocab(config.model, ctx.inputs["data"])
    config = replace(config, model=model_config)
    storage = config.storage_path or str((ctx.output_dir.parent / CHECKPOINTS_DIR).resolve())
    name = config.run_name or default_run_name(config, ctx)
    datasets = _datasets(Path(ctx.inputs["data"]), config)
    if ctx.logger:
        ctx.logger.params(flatten(to_dict(config)))
        ctx.logger.tags({"mmvq.checkpoints": f"{storage}/{name}"})
    trainer = _trainer(config, ctx, datasets, storage, name, text_vocab)
    started = time.perf_counter()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint ({storage}/{name})")
    with result.checkpoint.as_directory() as checkpoint_dir:
        state = read_state(Path(checkpoint_dir))
        shutil.copytree(Path(checkpoint_dir) / TOKENIZER_DIR, ctx.output_dir / TOKENIZER_DIR)
    summary = {"steps": state.step, "seconds": round(time.perf_counter() - started, 1),
               "checkpoints": f"{storage}/{name}", "mlflow_run_id": state.mlflow_run_id,
               "final": {k: float(v) for k, v in result.metrics.items()
                         if isinstance(v, int | float)}}
    (ctx.output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if ctx.logger:
        ctx.logger.artifacts(ctx.output_dir / TOKENIZER_DIR, TOKENIZER_DIR)
        _close_resumed_run(ctx, state.mlflow_run_id)
    return summary


def default_run_name(config: TrainConfig, ctx: StageContext) -> str:
    """``train-<hash>`` of the config, the input directories and the training code.

    The same stage rerun after a crash gets the same name, so it resumes; anything that changes
    what the checkpoints mean (config, data, code) gets a fresh run.
    """
    payload = json.dumps({"config": to_dict(config),
                          "inputs": {k: str(Path(v).resolve()) for k, v in ctx.inputs.items()},
                          "code": code_version(TRAIN_CODE)}, sort_keys=True, default=str)
    return "train-" + hashlib.sha256(payload.encode()).hexdigest()[:16]


def _datasets(data_dir: Path, config: TrainConfig) -> dict[str, Any]:
    """The train split (and the val split when there is one), only the model's columns."""
    from pipeline.raydata import read_parquet

    datasets = {}
    for split in ("train", "val"):
        if split == "val" and (config.val_batches == 0 or not (data_dir / split).is_dir()):
            continue
        # Read tasks reserve no CPU: the workers hold theirs for the whole run, and on a
        # machine with exactly num_workers CPUs a 1-CPU read would never be scheduled.
        dataset = read_parquet(str(data_dir / split), columns=list(MODEL_COLUMNS))
        # One data progress bar per epoch per worker buries the training progress line.
        dataset.context.enable_progress_bars = False
        datasets[split] = dataset
    return datasets


def _trainer(config: TrainConfig, ctx: StageContext, datasets: dict[str, Any], storage: str,
             name: str, text_vocab: Any) -> Any:
    import ray
    import ray.train
    from ray.data import ExecutionOptions, ExecutionResources
    from ray.train.torch import TorchConfig, TorchTrainer

    has_val = "val" in datasets
    metric = config.checkpoint_metric if has_val else None
    # Ray Train reserves the workers' CPUs/GPUs before Ray Data plans its operators, so the
    # read tasks run on what is left and never starve the workers (or the other way round).
    # preserve_order: the same rows reach the same worker in the same order on every run,
    # which is what makes a resumed run replay exactly what an uninterrupted one would see.
    ingest = ExecutionOptions(
        preserve_order=True,
        resource_limits=ExecutionResources(object_store_memory=config.data_memory_bytes))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config, "text_vocab": text_vocab,
                           "tracking_uri": ctx.tracking_uri, "has_val": has_val,
                           "run_id": ctx.logger.run_id if ctx.logger else None},
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu,
            resources_per_worker={"GPU": 1} if config.use_gpu else {"CPU": 1},
            placement_strategy=config.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            # Worker-group start-up, device moves and checkpoint paths are Ray Train's INFO
            # lines; the console keeps the trainer's own progress lines unless --verbose.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if ctx.verbose else "WARNING"),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.keep_checkpoints, checkpoint_score_attribute=metric,
                checkpoint_score_order=config.checkpoint_mode)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"],
                                            execution_options=ingest),
    )


def _close_resumed_run(ctx: StageContext, training_run_id: str | None) -> None:
    """When this invocation continued a run an earlier one started, link the two and mark the
    training run finished (the earlier invocation died with it running)."""
    if not training_run_id or ctx.logger is None or training_run_id == ctx.logger.run_id:
        return
    ctx.logger.tags({"mmvq.training_run": training_run_id})
    RunLogger(ctx.logger.tracking_uri, training_run_id).status("FINISHED")
