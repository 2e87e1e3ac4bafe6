"""A tiny model, a preprocess-shaped dataset and an MLflow run for the train-stage tests,
shared by test_train.py, test_train_fault.py, test_tracking_outage.py and the row encoders'
tests."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from mmvq.config import AudioCodecConfig, ImageCodecConfig, TokenizerConfig
from pipeline.tracking import RunLogger
from pipeline.train_config import TrainConfig

# Small enough that a step takes a few tens of milliseconds on one thread.
MODEL = TokenizerConfig(image=ImageCodecConfig(image_size=32),
                        audio=AudioCodecConfig(num_samples=2000))
TRAIN_ROWS, VAL_ROWS = 24, 8  # 2 workers x batch 4: 3 steps per epoch


@functools.cache
def _batch_maker():
    """``tests/mmvq/conftest.py``'s ``make_preprocessed_batch`` (a conftest is not importable)."""
    path = Path(__file__).parents[1] / "mmvq" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_mmvq_batches", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_preprocessed_batch


def preprocessed_batch(n: int, seed: int, cfg: TokenizerConfig = MODEL) -> dict[str, np.ndarray]:
    """``n`` synthetic preprocessed rows shaped for ``cfg`` (DESIGN.md's columns)."""
    return _batch_maker()(n, seed=seed, cfg=cfg)


def write_dataset(root: Path, train_rows: int = TRAIN_ROWS, val_rows: int = VAL_ROWS) -> Path:
    """A preprocess-shaped output: ``{root}/{train,val}/*.parquet`` of synthetic rows and the
    data contract preprocess would write for them (MODEL's shapes, byte text ids)."""
    import ray.data

    from mmvq.text_vocab import BYTES
    from pipeline.formats.preprocessed import write_contract
    from pipeline.formats.samples import SampleSpec

    for split, rows, seed in (("train", train_rows, 1), ("val", val_rows, 2)):
        batch = preprocessed_batch(rows, seed=seed)
        items = [{k: v[i] for k, v in batch.items()} for i in range(rows)]
        ray.data.from_items(items).repartition(2).write_parquet(str(root / split))
    write_contract(root, SampleSpec.for_model(MODEL), BYTES)
    return root


def tiny_config(**overrides) -> TrainConfig:
    base = TrainConfig(model=MODEL, num_workers=2, batch_size=4, steps=6, lr=2e-3, log_every=1,
                       val_every=3, val_batches=1, sample_images=2, checkpoint_every=3,
                       shuffle_buffer=8, keep_checkpoints=1)
    return dataclasses.replace(base, **overrides)


def start_run(uri: str, experiment: str = "train-tests") -> RunLogger:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    exp_id = found.experiment_id if found else client.create_experiment(experiment)
    return RunLogger(uri, client.create_run(exp_id).info.run_id)
