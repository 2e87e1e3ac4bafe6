"""Train stage: Ray Train DDP over the preprocessed train split, checkpointed and resumable.

The driver side lives here: the typed config, the ``TorchTrainer`` (scaling, checkpoint
retention, failure handling, data ingest options) and the commit of the final tokenizer to
``{output}/tokenizer``, where tokenize and evaluate load it. What every worker runs is in
:mod:`pipeline.train_loop`, the checkpoint layout in :mod:`pipeline.formats.checkpoint`.

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
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.config import flatten, to_dict
from pipeline.formats.checkpoint import TOKENIZER_DIR, read_state
from pipeline.formats.preprocessed import model_config_for_data
from pipeline.stage import StageContext, code_version
from pipeline.train_config import TrainConfig

CHECKPOINTS_DIR = "checkpoints"  # default storage, beside the stage's committed outputs


def run(config: TrainConfig, ctx: StageContext) -> dict[str, Any]:
    """Fit the tokenizer with a ``TorchTrainer`` and commit the final checkpoint's tokenizer."""
    # The data contract: the model takes the shapes preprocess produced (checked again here for
    # a stage run on its own), and its text vocabulary (text_vocab.json, else bytes) sizes the
    # text codec.
    model_config, text_vocab = model_config_for_data(config.model, ctx.inputs["data"])
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
                          "code": code_version((__name__,))}, sort_keys=True, default=str)
    return "train-" + hashlib.sha256(payload.encode()).hexdigest()[:16]


def _datasets(data_dir: Path, config: TrainConfig) -> dict[str, Any]:
    """The train split (and the val split when there is one), only the model's columns."""
    from mmvq.columns import MODEL_COLUMNS
    from pipeline.raydata import parquet_split

    datasets = {}
    for split in ("train", "val"):
        if split == "val" and (config.val_batches == 0 or not (data_dir / split).is_dir()):
            continue
        # A streamed split's read tasks reserve no CPU: the workers hold theirs for the whole
        # run, and on a machine with exactly num_workers CPUs a 1-CPU read would never run.
        dataset = parquet_split(data_dir / split, list(MODEL_COLUMNS), config.preload_bytes)
        # One data progress bar per epoch per worker buries the training progress line.
        dataset.context.enable_progress_bars = False
        datasets[split] = dataset
    return datasets


def _run_worker(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: :func:`pipeline.train_loop.train_loop_per_worker`,
    imported here, in the worker, so that the driver does not import torch and the model code
    (~2 s of the driver's CPU before it starts the controller, on the path to the first step).

    It asks for the train shard first: rank 0's call makes Ray Data's split coordinator, an
    actor in a new process (~3 s on 2 cores), which then starts while this worker imports torch
    and builds the model instead of after. The loop's own call gets the same iterator back.
    """
    import ray.train

    ray.train.get_dataset_shard("train")
    from pipeline.train_loop import train_loop_per_worker

    train_loop_per_worker(loop_config)


def _trainer(config: TrainConfig, ctx: StageContext, datasets: dict[str, Any], storage: str,
             name: str, text_vocab: Any) -> Any:
    import ray
    import ray.train
    from ray.data import ExecutionOptions, ExecutionResources
    from ray.train.torch import TorchConfig

    from pipeline.train_config import WorkerArgs

    has_val = "val" in datasets
    metric = config.checkpoint_metric if has_val else None
    # Ray Train reserves the workers' CPUs/GPUs before Ray Data plans its operators, so the
    # read tasks run on what is left and never starve the workers (or the other way round).
    # preserve_order: the same rows reach the same worker in the same order on every run,
    # which is what makes a resumed run replay exactly what an uninterrupted one would see.
    ingest = ExecutionOptions(
        preserve_order=True,
        resource_limits=ExecutionResources(object_store_memory=config.data_memory_bytes))
    return trainer_class()(
        _run_worker,
        # Ray Train passes a dict to every worker; it holds one typed value.
        train_loop_config={"args": WorkerArgs(
            config=config, text_vocab=text_vocab, tracking_uri=ctx.tracking_uri,
            has_val=has_val, run_id=ctx.logger.run_id if ctx.logger else None)},
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


def trainer_class() -> Any:
    """``TorchTrainer``; on the embedded Ray, one without Ray Train's placement-group cleaner.

    The cleaner is a detached actor that polls the controller through Ray's state API, served
    by the dashboard, to remove the workers' placement group should the controller die while
    the cluster lives on. The embedded Ray lives and dies with this process, its placement
    groups with it, and it starts no dashboard (half the CPU of a 2-core machine while
    training started; BENCHMARKS.md, issue 15), without which the cleaner warns every second.
    ``_create_default_callbacks`` is Ray Train 2.58's (ray is pinned);
    ``tests/workflows/test_stage_alone.py`` trains on the embedded Ray and fails on the warning.
    """
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import (
        PlacementGroupCleanerCallback,
    )

    from pipeline.raydata import in_process_ray

    if not in_process_ray():
        return TorchTrainer

    class EmbeddedTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            return [callback for callback in super()._create_default_callbacks()
                    if not isinstance(callback, PlacementGroupCleanerCallback)]

    return EmbeddedTorchTrainer


def _close_resumed_run(ctx: StageContext, training_run_id: str | None) -> None:
    """When this invocation continued a run an earlier one started, link the two and mark the
    training run finished (the earlier invocation died with it running)."""
    from pipeline.tracking import RunLogger

    if not training_run_id or ctx.logger is None or training_run_id == ctx.logger.run_id:
        return
    ctx.logger.tags({"mmvq.training_run": training_run_id})
    RunLogger(ctx.logger.tracking_uri, training_run_id).status("FINISHED")
