"""What every Ray Train worker runs: mmvq's plain-torch steps plus Ray's data shard and report.

Per step: ``grad_accum`` micro-batches from this worker's shard of the train split (streamed by
``iter_torch_batches``, a fresh iterator per epoch), the generator step (and, with the GAN on,
the discriminator step), both LR schedulers, the EMA. Every ``log_every`` steps rank 0 logs to
MLflow and prints a progress line; every ``val_every`` steps (and at every checkpoint) rank 0
scores the weights it would ship on a few val batches; every ``checkpoint_every`` steps and at
the end every rank reports its part of a checkpoint (:mod:`pipeline.formats.checkpoint`). Rank 0's
logging never waits for the tracking server (:class:`pipeline.tracking.RunLogger` with
``wait_s=0``): a dead or hung server costs no step time, what it misses is spooled and sent when
it answers, and at the end rank 0 waits a bounded time for the rest, then says what is missing.

A restarted worker group (``FailureConfig``) or a rerun with the same run name finds the latest
checkpoint through ``ray.train.get_checkpoint()``, restores weights, optimizers, schedulers, RNG
states and the data position (epoch, micro-batches consumed in it, skipped on the same shuffle
seed), and logs to the same MLflow run, skipping steps that run already holds.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmvq.batch import to_model_inputs
from mmvq.discriminators import build_discriminators
from mmvq.head_replay import AlignmentHeadTrainer
from mmvq.modalities.image import to_uint8
from mmvq.perceptual import build_perceptual
from mmvq.scoring import ReconstructionScores
from mmvq.speed import apply_speed
from mmvq.text_vocab import TextVocab
from mmvq.tokenizer import MultimodalTokenizer
from mmvq.train_step import (
    build_optimizer,
    discriminator_step,
    gan_generator_step,
    generator_step,
    update_ema,
    warmup_cosine,
)
from pipeline.formats.checkpoint import TrainState, load_checkpoint, save_checkpoint
from pipeline.train_config import TrainConfig, WorkerArgs
from pipeline.train_data import EpochBatches

# The metric whose MLflow history tells a resumed run which steps are logged already.
HISTORY_KEY = "loss/total"


@dataclass
class _Parts:
    """The trainable pieces of one worker, sped up (mmvq.speed) but unwrapped (before DDP)."""

    model: MultimodalTokenizer
    ema: MultimodalTokenizer | None
    discriminators: nn.ModuleDict | None
    perceptual: nn.Module | None
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler]
    # Fusion's alignment heads' replay (mmvq.head_replay), over optimizers["align_heads"].
    head_trainer: AlignmentHeadTrainer | None = None

    def modules(self) -> dict[str, nn.Module | None]:
        return {"generator": self.model, "ema": self.ema, "discriminators": self.discriminators}

    def optim(self) -> dict[str, Any]:
        return {**{f"optimizer/{k}": v for k, v in self.optimizers.items()},
                **{f"scheduler/{k}": v for k, v in self.schedulers.items()}}

    def export(self) -> MultimodalTokenizer:
        """The weights to ship and validate: the EMA when on."""
        return self.ema if self.ema is not None else self.model


def train_loop_per_worker(loop_config: dict[str, WorkerArgs]) -> None:
    """Ray Train's entry point on every worker (see the module docstring)."""
    import ray.train
    import ray.train.torch

    args = loop_config["args"]
    cfg = args.config
    _quiet_report_log()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads_per_worker)
    torch.manual_seed(cfg.seed)  # identical init everywhere; DDP also broadcasts rank 0's
    np.random.seed(cfg.seed)
    device = ray.train.torch.get_device()
    parts = build_parts(cfg, device, args.text_vocab, announce=rank == 0)
    state = TrainState(0, 0, 0, args.run_id)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(Path(directory), parts.modules(), parts.optim(), rank)
        if rank == 0:
            _print(f"[train] resumed from step {state.step} (epoch {state.epoch}, "
                   f"{state.batches_in_epoch} batches in)")
    run_id = state.mlflow_run_id or args.run_id
    state = dataclasses.replace(state, mlflow_run_id=run_id)
    model, discriminators = _wrap(parts)
    logger = (_TrainLogger(args.tracking_uri, run_id, args.run_id)
              if rank == 0 and run_id else None)
    loop = _Loop(cfg, parts, model, discriminators, device, rank, world, logger,
                 ray.train.get_dataset_shard("val") if args.has_val else None)
    try:
        loop.run(ray.train.get_dataset_shard("train"), state)
    finally:
        if logger is not None:
            logger.close()


def build_parts(cfg: TrainConfig, device: torch.device, text_vocab: TextVocab | None = None,
                perceptual: nn.Module | None = None, announce: bool = True) -> _Parts:
    """One worker's model, EMA, discriminators, LPIPS, optimizers and LR schedulers on
    ``device``, sped up as ``cfg.speed`` says (:func:`mmvq.speed.apply_speed`; on a device type
    it leaves out, the CPU by default, nothing changes).

    The GPU benchmark (:mod:`pipeline.bench.gpu`) builds its variants here, so it times what
    training runs. The speed-up comes before the schedulers (they hold the optimizers it may
    replace by fused ones), before a checkpoint is loaded (a fused optimizer must start without
    state) and before DDP (its gradient buckets keep the layout they are built with); the EMA is
    copied before it and stays a plain fp32 eager model.

    Parameters
    ----------
    perceptual : the LPIPS net to train with instead of the one ``cfg.gan`` asks for (the
        benchmark's random-weight VGG16); None: that one, if any
    announce : print whether the perceptual loss is on (rank 0 does, once)
    """
    model = MultimodalTokenizer(cfg.model, text_vocab=text_vocab).to(device)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay is not None else None
    gan = cfg.gan
    discriminators = build_discriminators(gan).to(device) if gan is not None else None
    if perceptual is None and gan is not None and gan.perceptual:
        perceptual = build_perceptual(gan.perceptual_weights_path, announce=announce)
    if perceptual is not None:
        perceptual = perceptual.to(device).eval().requires_grad_(False)
    optimizers = _optimizers(cfg, model, discriminators)
    optimizers = dict(zip(optimizers, apply_speed(
        cfg.speed, device, model, discriminators=discriminators, perceptual=perceptual,
        optimizers=list(optimizers.values()))))
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, name))
                  for name, opt in optimizers.items()}
    head_trainer = None
    if "align_heads" in optimizers:
        fusion = cfg.model.fusion
        head_trainer = AlignmentHeadTrainer(optimizers["align_heads"], fusion.align_head_steps,
                                            fusion.align_replay_samples, cfg.grad_clip, cfg.seed)
    return _Parts(model, ema, discriminators, perceptual, optimizers, schedulers, head_trainer)


def _schedule_start(cfg: TrainConfig, name: str) -> int:
    """The step at which optimizer ``name`` first updates: the discriminator's at disc_start."""
    return cfg.gan.disc_start if name == "discriminator" and cfg.gan is not None else 0


def advance_schedules(schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler],
                      cfg: TrainConfig, step: int) -> None:
    """After training step ``step``: advance the schedule of each optimizer that updated."""
    for name, scheduler in schedulers.items():
        if step >= _schedule_start(cfg, name):
            scheduler.step()


def _schedule(cfg: TrainConfig, name: str) -> Callable[[int], float]:
    """LR multiplier by the number of updates optimizer ``name`` has made. The discriminator's
    warmup and cosine run over its own steps from disc_start: counted from step 0 instead, a
    late disc_start would begin it near the end of the decay, at a fraction of its rate."""
    total = (cfg.decay_steps or cfg.steps) - _schedule_start(cfg, name)
    return lambda s: warmup_cosine(s, cfg.warmup_steps, max(1, total), cfg.min_lr_ratio)


def _optimizers(cfg: TrainConfig, model: nn.Module,
                discriminators: nn.ModuleDict | None) -> dict[str, torch.optim.Optimizer]:
    """AdamW for the generator, with the GAN on one for all discriminators, and with fusion's
    head replay on (``fusion.align_head_steps`` > 0) one for the alignment heads' extra steps
    (the generator's still steps them once per batch with the rest of the model)."""
    optimizers = {"generator": build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                               betas=cfg.betas)}
    fusion = cfg.model.fusion
    if fusion.enabled and fusion.align_head_steps > 0:
        optimizers["align_heads"] = torch.optim.AdamW(
            model.fusion.alignment_heads(), lr=fusion.align_head_lr, betas=cfg.betas,
            weight_decay=0.0)
    if discriminators is not None:
        optimizers["discriminator"] = torch.optim.AdamW(
            discriminators.parameters(), lr=cfg.disc_lr or cfg.lr, betas=cfg.disc_betas,
            weight_decay=cfg.weight_decay)
    return optimizers


def _wrap(parts: _Parts) -> tuple[nn.Module, nn.ModuleDict | None]:
    """DDP through ``prepare_model`` (a no-op on one worker), around the sped-up parts.

    A compiled net was compiled in place (``nn.Module.compile``) by :func:`build_parts`, so DDP
    wraps the eager module tree and its hooks see the real parameters; Dynamo's DDP graph
    splitting does not apply (the DDP module itself is not compiled), so a compiled net's
    gradients reach DDP's buckets when that net's backward ends.
    """
    import ray.train.torch

    model = ray.train.torch.prepare_model(parts.model)
    discriminators = None
    if parts.discriminators is not None:
        # One DDP per discriminator, without buffer broadcasts (mmvq.discriminators says why).
        discriminators = nn.ModuleDict({
            name: ray.train.torch.prepare_model(
                disc, parallel_strategy_kwargs={"broadcast_buffers": False})
            for name, disc in parts.discriminators.items()})
    return model, discriminators


def train_step(cfg: TrainConfig, parts: _Parts, model: nn.Module,
               discriminators: nn.ModuleDict | None, micro: list, step: int) -> dict[str, float]:
    """Training step ``step`` on the micro-batches ``micro``: the generator (with the
    adversarial and perceptual terms once the discriminators start), the discriminators, the
    LR schedules and the EMA. ``model`` and ``discriminators`` are ``parts``' nets, wrapped in
    DDP on a Ray Train worker and as they are in one process (the benchmarks' plain loop), so
    both train exactly the same way."""
    # No autocast here: cfg.speed's bf16 autocast is inside the sped-up nets (mmvq.speed).
    opt = parts.optimizers["generator"]
    if discriminators is None:
        stats = generator_step(model, micro, opt, cfg.grad_clip, heads=parts.head_trainer)
    else:
        stats, recons = gan_generator_step(model, micro, opt, discriminators, cfg.gan, step,
                                           parts.perceptual, cfg.grad_clip,
                                           heads=parts.head_trainer)
        stats |= discriminator_step(recons, micro, discriminators,
                                    parts.optimizers["discriminator"], cfg.gan, step,
                                    cfg.grad_clip)
    stats["lr"] = opt.param_groups[0]["lr"]  # the rate this step used
    advance_schedules(parts.schedulers, cfg, step)
    if parts.ema is not None:
        update_ema(parts.ema, model, cfg.ema_decay)
    return stats


class _Loop:
    """The step loop of one worker; state lives in ``_Parts`` and the step counters here."""

    def __init__(self, cfg: TrainConfig, parts: _Parts, model: nn.Module,
                 discriminators: nn.ModuleDict | None, device: torch.device, rank: int,
                 world: int, logger: _TrainLogger | None, val_shard: Any) -> None:
        self.cfg, self.parts, self.model, self.discriminators = cfg, parts, model, discriminators
        self.device, self.rank, self.world = device, rank, world
        self.logger, self.val_shard = logger, val_shard
        self.val_cache: list[dict[str, np.ndarray]] | None = None  # val batches, read once
        self.started = time.perf_counter()
        self.start_step = 0

    def run(self, shard: Any, state: TrainState) -> None:
        cfg = self.cfg
        step, epoch, consumed = state.step, state.epoch, state.batches_in_epoch
        self.start_step = step
        window = _Window()
        # Streamed once, then replayed from memory when the shard fits (pipeline.train_data).
        source = EpochBatches(shard, cfg.batch_size, cfg.shuffle_buffer, cfg.seed,
                              cfg.prefetch_batches, cfg.epoch_cache_bytes)
        while step < cfg.steps:
            batches = source.epoch(epoch)
            # Resuming mid-epoch: the epoch's order is the same on every run; skip what the
            # checkpointed run had consumed.
            for _ in itertools.islice(batches, consumed):
                pass
            steps_this_epoch = 0
            while step < cfg.steps:
                window.data_start()
                micro = list(itertools.islice(batches, cfg.grad_accum))
                window.data_end()
                if len(micro) < cfg.grad_accum:
                    break  # end of the epoch; a partial accumulation is dropped, as drop_last
                consumed += len(micro)
                stats = self._step([to_model_inputs(b, self.device) for b in micro], step)
                step += 1
                steps_this_epoch += 1
                if step == self.start_step + 1 and self.rank == 0 and not self._report_due(step):
                    # A sign of life before the first report (and what bench-train times).
                    _print(f"[train] step {step}/{cfg.steps}: first step done, "
                           f"{time.perf_counter() - self.started:.1f} s after the workers began")
                window.step_end(stats, cfg.batch_size * cfg.grad_accum * self.world)
                position = TrainState(step, epoch, consumed, state.mlflow_run_id)
                if self._report_due(step):
                    self._report(position, window)
                    window = _Window()
            if step < cfg.steps:
                if steps_this_epoch == 0 and consumed == 0:
                    raise RuntimeError(
                        f"the train split gives no full step: each of {self.world} workers needs "
                        f"batch_size x grad_accum = {cfg.batch_size * cfg.grad_accum} rows")
                epoch, consumed = epoch + 1, 0

    def _step(self, micro: list, step: int) -> dict[str, float]:
        return train_step(self.cfg, self.parts, self.model, self.discriminators, micro, step)

    def _report_due(self, step: int) -> bool:
        cfg = self.cfg
        return (step == cfg.steps or step % cfg.log_every == 0 or self._checkpoint_due(step)
                or self._val_due(step))

    def _checkpoint_due(self, step: int) -> bool:
        every = self.cfg.checkpoint_every
        return step == self.cfg.steps or (every > 0 and step % every == 0)

    def _val_due(self, step: int) -> bool:
        every = self.cfg.val_every
        return self.val_shard is not None and self.cfg.val_batches > 0 and (
            self._checkpoint_due(step) or (every > 0 and step % every == 0))

    def _report(self, position: TrainState, window: _Window) -> None:
        """Metrics (rank 0), validation, progress and, when due, this rank's checkpoint part
        (reported to Ray Train with the metrics)."""
        import ray.train

        step = position.step
        metrics: dict[str, float] = {"step": step, "epoch": position.epoch}
        if self.rank == 0:
            metrics |= window.summary()
            if self._val_due(step):
                metrics |= self._validate(step)
            if self.logger:
                self.logger.metrics(metrics, step)
            _print(_progress_line(step, self.cfg.steps, metrics, self._eta(step)))
        if not self._checkpoint_due(step):
            # No ray.train.report between checkpoints: each report is a barrier of all workers
            # with Ray Train's controller (~0.5 s of 2 workers on 2 cores: the stage ran at half
            # the plain loop's speed with log_every=5). The metrics went to MLflow above; Ray
            # Train needs them only with a checkpoint, to rank it.
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp), position, self.parts.modules(), self.parts.optim(),
                            self.rank, export=self.parts.export())
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_{step:08d}")

    def _eta(self, step: int) -> float:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.started
        return elapsed / max(done, 1) * (self.cfg.steps - step)

    @torch.no_grad()
    def _validate(self, step: int) -> dict[str, float]:
        """Losses and the evaluate stage's scores of the shipped weights on val batches, under
        ``val/`` (``val/loss/total``, ``val/image/psnr``, ``val/image/codebook_usage``)."""
        model = self.parts.export()
        was_training = model.training
        model.eval()
        scores = ReconstructionScores(model.codebook_sizes(), model.config.audio.sample_rate)
        first = None
        if self.val_cache is None:  # the same first batches every time: read them once
            self.val_cache = list(itertools.islice(self.val_shard.iter_batches(
                batch_size=self.cfg.batch_size, batch_format="numpy"), self.cfg.val_batches))
        for batch in self.val_cache:
            inputs = to_model_inputs(batch, self.device)
            out = model(inputs)
            recon = out.reconstructions
            scores.add(inputs, {"image": recon["image"], "audio": recon["audio"],
                                "text_ids": recon["text_logits"].argmax(dim=-1)},
                       out.indices, out.embeddings)
            scores.add_losses(out.losses)
            if first is None:
                first = (inputs.image, out.reconstructions["image"])
        model.train(was_training)
        if first is not None and self.logger and self.cfg.sample_images > 0:
            self.logger.image_grid(*first, self.cfg.sample_images, step)
        return {f"val/{k}": v for k, v in scores.summary().items()}


class _TrainLogger:
    """Rank 0's MLflow logging: one continuous history, even across restarts and reruns.

    A restarted or resumed run repeats the steps after its last checkpoint; the ones the MLflow
    run already holds are not logged twice (their values are the same: the run replays them
    from the same state). Resuming a run that an earlier invocation started marks it running
    again and logs into it. No call waits for the server (``wait_s=0``); :meth:`close` waits up
    to ``FLUSH_S`` at the end of training for what is still unsent.
    """

    FLUSH_S = 30.0  # at the end: how long rank 0 waits for a server that is down to come back

    def __init__(self, tracking_uri: str, run_id: str, invocation_run_id: str | None) -> None:
        # Here, not at the top: the GPU benchmark builds through this module on a machine
        # without MLflow (pipeline/bench/gpu_check.sh).
        from pipeline.tracking import RunLogger

        self.logger = RunLogger(tracking_uri, run_id, wait_s=0.0)
        self.logged_up_to = self.logger.last_step(HISTORY_KEY)
        if invocation_run_id and invocation_run_id != run_id:
            self.logger.status("RUNNING")
            self.logger.tags({"mmvq.resumed_by_run": invocation_run_id})

    def metrics(self, values: dict[str, float], step: int) -> None:
        if step <= self.logged_up_to:
            return
        self.logger.metrics(values, step=step)

    def image_grid(self, images: torch.Tensor, recons: torch.Tensor, n: int, step: int) -> None:
        """Originals over reconstructions, ``n`` columns, as ``samples/step_XXXXXXXX.png``."""
        from pipeline.report import write_image_grid

        if step <= self.logged_up_to:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"step_{step:08d}.png"
            write_image_grid([to_uint8(images[:n]), to_uint8(recons[:n])], path)
            self.logger.artifact(path, "samples")  # copied at once: tmp may go

    def close(self) -> None:
        """Send what is left (bounded), and say loudly what the run will lack."""
        pending = self.logger.close(timeout_s=self.FLUSH_S)
        if pending:
            _print(f"[train] WARNING: MLflow run {self.logger.run_id} is missing "
                   f"{pending.describe()}; kept in {self.logger.spool_dir}, sent at the end of "
                   "the stage or when the workflow runs next")


class _Window:
    """Running means of the step statistics, throughput and data-wait share over a window."""

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

    def step_end(self, stats: dict[str, float], samples: int) -> None:
        for key, value in stats.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.steps += 1
        self.samples += samples

    def summary(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        # Bare loss names (``total``) get a ``loss/`` prefix; prefixed ones (``image/l1``,
        # ``adv/image_weight``, ``image/codebook_usage``) keep theirs.
        out = {k if "/" in k or k in ("grad_norm", "lr") else f"loss/{k}": v / max(self.steps, 1)
               for k, v in self.sums.items()}
        out["perf/samples_per_s"] = self.samples / elapsed
        out["perf/data_wait_fraction"] = self.wait_s / elapsed
        return out


def _progress_line(step: int, total: int, metrics: dict[str, float], eta_s: float) -> str:
    parts = [f"[train] step {step}/{total}", f"loss {metrics.get('loss/total', float('nan')):.4f}"]
    for key, label in (("val/loss/total", "val"), ("val/image/psnr", "psnr")):
        if key in metrics:
            parts.append(f"{label} {metrics[key]:.4f}")
    parts.append(f"{metrics.get('perf/samples_per_s', 0.0):.1f} samples/s")
    parts.append(f"data-wait {100 * metrics.get('perf/data_wait_fraction', 0.0):.0f}%")
    parts.append(f"ETA {int(eta_s) // 60}m{int(eta_s) % 60:02d}s")
    return "  ".join(parts)


def _print(line: str) -> None:
    # The real stdout: Ray Train's print patch would log the line twice.
    print(line, file=sys.__stdout__, flush=True)


def _quiet_report_log() -> None:
    """Silence Ray Train's per-report INFO line (the whole metrics dict, every report, every
    rank); rank 0's progress line and MLflow carry the same numbers."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
