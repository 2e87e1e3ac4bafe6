"""Train stage: Ray Train DDP over the preprocessed train split.

The loop is plain torch around :func:`mmvq.train_step.generator_step`; Ray adds only the
dataset shard, ``prepare_model`` (DDP over gloo on CPU, NCCL on GPU) and ``report``. Rank 0
logs to the stage's MLflow run by id and writes the checkpoint; the stage copies the final
tokenizer to ``{output}/tokenizer``, where tokenize and evaluate load it.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmvq.config import TokenizerConfig
from pipeline.config import flatten, to_dict
from pipeline.stage import StageContext
from pipeline.tracking import RunLogger

TOKENIZER_DIR = "tokenizer"


@dataclass(frozen=True)
class TrainConfig:
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    num_workers: int = 2  # DDP ranks; one CPU each unless use_gpu
    use_gpu: bool = False  # one GPU per worker, NCCL instead of gloo
    threads_per_worker: int = 1  # torch intra-op threads; workers x threads <= cores avoids thrash
    batch_size: int = 16  # per worker; the global batch is num_workers x batch_size
    steps: int = 300  # optimizer steps; the loop runs as many epochs as it takes
    lr: float = 2e-3  # AdamW; high for the tiny preset, lower it for base models
    grad_clip: float = 1.0  # max global grad norm
    seed: int = 0  # model init and data order
    log_every: int = 25  # steps between metric reports (MLflow and the console)
    shuffle_buffer: int = 256  # rows in each worker's local shuffle buffer


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the plain torch loop plus Ray's data shard and report."""
    import ray.train
    import ray.train.torch

    from mmvq import MultimodalTokenizer, to_model_inputs
    from mmvq.train_step import build_optimizer, generator_step

    cfg: TrainConfig = loop_config["config"]
    _quiet_report_log()
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(cfg.threads_per_worker)
    torch.manual_seed(cfg.seed)  # identical init everywhere; DDP also broadcasts rank 0's
    model = ray.train.torch.prepare_model(MultimodalTokenizer(cfg.model))
    device = ray.train.torch.get_device()
    optimizer = build_optimizer(model, lr=cfg.lr)
    logger = (RunLogger(loop_config["tracking_uri"], loop_config["run_id"])
              if rank == 0 and loop_config.get("run_id") else None)

    shard = ray.train.get_dataset_shard("train")
    step, epoch, window = 0, 0, _Window()
    while step < cfg.steps:
        batches = shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy",
                                     drop_last=True, local_shuffle_buffer_size=cfg.shuffle_buffer,
                                     local_shuffle_seed=cfg.seed + epoch)
        window.data_start()
        for batch in batches:
            window.data_end()
            inputs = to_model_inputs(batch, device)
            losses = generator_step(model, inputs, optimizer, grad_clip=cfg.grad_clip)
            step += 1
            window.step_end(losses, cfg.batch_size * ctx.get_world_size())
            if step % cfg.log_every == 0 or step == cfg.steps:
                metrics = {**window.summary(), "epoch": epoch}
                if logger:
                    logger.metrics(metrics, step=step)
                    # The real stdout: Ray Train's print patch would log the line twice.
                    print(_progress_line(step, cfg.steps, metrics), file=sys.__stdout__,
                          flush=True)
                _report(metrics | {"step": step}, model, rank, final=step == cfg.steps)
                window = _Window()
            if step == cfg.steps:
                break
            window.data_start()
        epoch += 1


def _quiet_report_log() -> None:
    """Silence Ray Train's per-report INFO line (the whole metrics dict, every report, every
    rank); rank 0's progress line and MLflow carry the same numbers."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _report(metrics: dict[str, float], model: torch.nn.Module, rank: int, final: bool) -> None:
    """Report to Ray Train; on the final step rank 0 attaches the tokenizer checkpoint."""
    import ray.train

    if not (final and rank == 0):
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        unwrapped = model.module if hasattr(model, "module") else model
        unwrapped.save(Path(tmp) / TOKENIZER_DIR)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


class _Window:
    """Running means of the losses, throughput and data-wait share over a logging window."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.samples = 0
        self.wait_s = 0.0
        self.start = time.perf_counter()
        self._data_t0 = self.start

    def data_start(self) -> None:
        self._data_t0 = time.perf_counter()

    def data_end(self) -> None:
        self.wait_s += time.perf_counter() - self._data_t0

    def step_end(self, losses: dict[str, float], samples: int) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.steps += 1
        self.samples += samples

    def summary(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {f"loss/{k}" if "/" not in k and k != "grad_norm" else k: v / self.steps
               for k, v in self.sums.items()}
        out["perf/samples_per_s"] = self.samples / elapsed
        out["perf/data_wait_fraction"] = self.wait_s / elapsed
        return out


def _progress_line(step: int, total: int, metrics: dict[str, float]) -> str:
    loss = metrics.get("loss/total", metrics.get("total", float("nan")))
    rate = metrics["perf/samples_per_s"]
    return f"[train] step {step}/{total}  loss {loss:.4f}  {rate:.1f} samples/s"


def run(config: TrainConfig, ctx: StageContext) -> dict[str, Any]:
    """Fit the tokenizer with a ``TorchTrainer`` and commit the final checkpoint."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    train_dir = Path(ctx.inputs["data"]) / "train"
    dataset = ray.data.read_parquet(str(train_dir))
    # One data progress bar per epoch per worker buries the training progress line.
    dataset.context.enable_progress_bars = False
    if ctx.logger:
        ctx.logger.params(flatten(to_dict(config)))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config, "tracking_uri": ctx.tracking_uri,
                           "run_id": ctx.logger.run_id if ctx.logger else None},
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu,
            resources_per_worker={"GPU": 1} if config.use_gpu else {"CPU": 1}),
        run_config=ray.train.RunConfig(name="train",
                                       storage_path=str((ctx.output_dir / "ray").resolve())),
        datasets={"train": dataset},
    )
    started = time.perf_counter()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as checkpoint_dir:
        shutil.copytree(Path(checkpoint_dir) / TOKENIZER_DIR, ctx.output_dir / TOKENIZER_DIR)
    shutil.rmtree(ctx.output_dir / "ray", ignore_errors=True)  # the tokenizer is what we keep
    summary = {"steps": config.steps, "seconds": round(time.perf_counter() - started, 1),
               "final": {k: float(v) for k, v in result.metrics.items()
                         if isinstance(v, int | float)}}
    if ctx.logger:
        ctx.logger.artifacts(ctx.output_dir / TOKENIZER_DIR, TOKENIZER_DIR)
    return summary

