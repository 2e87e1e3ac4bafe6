"""Train stage on real Ray (in-process) and a real MLflow server: DDP, checkpoints, resume.

The fault test (a worker process killed mid-run, on a 2-node ``ray.cluster_utils.Cluster``)
is in ``test_train_fault.py``; it needs its own Ray, so it runs in a subprocess.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from mlflow.tracking import MlflowClient
from traindata import start_run, tiny_config, write_dataset

from mmvq.config import GanConfig
from mmvq.speed import SpeedConfig
from pipeline.formats.checkpoint import TOKENIZER_DIR, rank_weight_hashes, read_state
from pipeline.stage import StageContext
from pipeline.train import run
from pipeline.train_config import TrainConfig


def run_stage(config: TrainConfig, data: Path, out: Path, uri: str | None) -> dict:
    logger = start_run(uri) if uri else None
    out.mkdir(parents=True)
    ctx = StageContext(output_dir=out, inputs={"data": data}, logger=logger, tracking_uri=uri,
                       progress=False)
    summary = run(config, ctx)
    summary["stage_run_id"] = logger.run_id if logger else None
    return summary


def steps_logged(uri: str, run_id: str, key: str = "loss/total") -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def weights(out: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(out / TOKENIZER_DIR / "model.safetensors"))


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local):
    return write_dataset(tmp_path_factory.mktemp("train-data"))


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory, mlflow_server):
    """8 steps straight through, two DDP workers: the reference for the resume test."""
    root = tmp_path_factory.mktemp("straight")
    config = tiny_config(steps=8, decay_steps=8, warmup_steps=2, run_name="straight",
                         storage_path=str(root / "ckpt"))
    return run_stage(config, data, root / "out", mlflow_server), root


def test_two_worker_ddp_replicas_agree_and_loss_falls(uninterrupted, mlflow_server):
    summary, root = uninterrupted
    assert summary["steps"] == 8
    final = root / "ckpt" / "straight" / "checkpoint_00000008"
    hashes = rank_weight_hashes(final)
    assert set(hashes) == {0, 1} and hashes[0] == hashes[1]  # DDP kept the replicas identical
    history = MlflowClient(mlflow_server).get_metric_history(summary["mlflow_run_id"],
                                                             "loss/total")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(losses) == 8
    assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2]), losses
    metrics = MlflowClient(mlflow_server).get_run(summary["mlflow_run_id"]).data.metrics
    for key in ("image/codebook_perplexity", "text/codebook_usage", "grad_norm", "lr",
                "perf/samples_per_s", "perf/data_wait_fraction", "val/image/psnr",
                "val/loss/total", "val/audio/codebook_usage", "val/text/exact_match"):
        assert key in metrics, key
    # Warmup 2 then cosine to 0.1 x peak at step 8: the last step ran near the floor.
    lrs = {m.step: m.value for m in MlflowClient(mlflow_server).get_metric_history(
        summary["mlflow_run_id"], "lr")}
    assert lrs[1] == pytest.approx(1e-3) and lrs[2] == pytest.approx(2e-3)
    assert lrs[8] < 0.2 * 2e-3
    artifacts = {a.path for a in MlflowClient(mlflow_server).list_artifacts(
        summary["mlflow_run_id"], "samples")}
    assert "samples/step_00000003.png" in artifacts


def test_stop_and_rerun_continues_from_the_checkpoint_and_matches(
        uninterrupted, data, tmp_path, mlflow_server, capfd):
    _, straight_root = uninterrupted
    storage = str(tmp_path / "ckpt")
    # Stop after 4 steps: mid-epoch (3 steps per epoch), between checkpoints at 3 and 6; the
    # schedule is the 8-step one either way.
    first = run_stage(tiny_config(steps=4, decay_steps=8, warmup_steps=2, run_name="r",
                                  storage_path=storage), data, tmp_path / "a", mlflow_server)
    assert first["steps"] == 4
    assert read_state(tmp_path / "ckpt" / "r" / "checkpoint_00000004").batches_in_epoch == 1
    second = run_stage(tiny_config(steps=8, decay_steps=8, warmup_steps=2, run_name="r",
                                   storage_path=storage), data, tmp_path / "b", mlflow_server)
    assert "resumed from step 4 (epoch 1, 1 batches in)" in capfd.readouterr().out
    assert second["steps"] == 8
    # The second invocation continued the first one's MLflow run: one history, each step once.
    run_id = first["stage_run_id"]
    assert second["mlflow_run_id"] == run_id != second["stage_run_id"]
    assert steps_logged(mlflow_server, run_id) == list(range(1, 9))
    assert steps_logged(mlflow_server, second["stage_run_id"]) == []
    client = MlflowClient(mlflow_server)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_run(run_id).data.params["steps"] == "4"  # never re-logged with 8
    assert client.get_run(second["stage_run_id"]).data.tags["mmvq.training_run"] == run_id
    # Same seeds, same data order, same state restored: the weights of the resumed run are
    # those of the uninterrupted one (CPU, one thread per worker, gloo: bit-exact in practice;
    # the stated tolerance is 1e-6 absolute).
    resumed, reference = weights(tmp_path / "b"), weights(straight_root / "out")
    assert resumed.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=0, atol=1e-6, msg=name)


def test_gan_ema_accumulation_and_bf16_train_end_to_end(data, tmp_path):
    gan = GanConfig(disc_start=2, image_disc_channels=8, audio_disc_channels=4,
                    audio_disc_n_ffts=(64, 128), image_disc_norm="group")
    # The fast path's switches that need no compiler, on the CPU: bf16 autocast, fused AdamW.
    speed = SpeedConfig(device_types=("cpu",), compile=False)
    config = tiny_config(steps=4, gan=gan, ema_decay=0.9, grad_accum=2, speed=speed,
                         checkpoint_every=2, val_every=0, run_name="gan",
                         storage_path=str(tmp_path / "ckpt"), batch_size=2)
    summary = run_stage(config, data, tmp_path / "out", None)
    assert summary["steps"] == 4
    final = summary["final"]
    assert final["disc/image"] > 0 and final["adv/image_weight"] > 0  # the GAN ran after step 2
    assert "val/loss/total" in final
    checkpoint = tmp_path / "ckpt" / "gan" / "checkpoint_00000004"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"generator.safetensors", "ema.safetensors", "discriminators.safetensors",
            "optim.pt", "rng_rank0.pt", "rng_rank1.pt", "state.json", TOKENIZER_DIR} <= files
    # The shipped tokenizer is the EMA, not the last iterate.
    ema = safetensors.torch.load_file(str(checkpoint / "ema.safetensors"))
    raw = safetensors.torch.load_file(str(checkpoint / "generator.safetensors"))
    shipped = weights(tmp_path / "out")
    assert all(torch.equal(shipped[k], ema[k]) for k in ema)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)


def test_config_rejects_bad_values():
    from mmvq.config_io import ConfigError, from_dict

    with pytest.raises(ConfigError, match="train.grad_accum must be >= 1"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ConfigError, match="ema_decay"):
        TrainConfig(ema_decay=1.5)
    config = from_dict(TrainConfig, {"gan": {"disc_start": 5}, "betas": [0.5, 0.9]})
    assert config.gan.disc_start == 5 and config.betas == (0.5, 0.9)
    with pytest.raises(ConfigError, match="gan.disc_strat"):
        from_dict(TrainConfig, {"gan": {"disc_strat": 5}})


if __name__ == "__main__":  # pragma: no cover - handy for a manual run
    sys.exit(pytest.main([__file__, "-q"]))


def test_base_recipe_starts_its_discriminators_at_disc_start(data, tmp_path, mlflow_server):
    """workflows/base.yaml's GAN section, at a tiny size on the CPU: the discriminators and the
    adaptive weight come in at disc_start, and MLflow has both from there on."""
    from dataclasses import replace

    from pipeline.config import from_dict
    from workflows.plan import load_workflow

    entry = load_workflow("workflows/base.yaml").stages["train"]
    base = from_dict(TrainConfig, entry.config).gan
    assert base is not None and base.adaptive and base.perceptual and base.loss == "hinge"
    gan = replace(base, disc_start=3, image_disc_channels=8, audio_disc_channels=4,
                  audio_disc_n_ffts=(64, 128), image_disc_norm="group")
    config = tiny_config(steps=6, gan=gan, log_every=1, val_every=0, checkpoint_every=0,
                         run_name="base-gan", storage_path=str(tmp_path / "ckpt"))
    summary = run_stage(config, data, tmp_path / "out", mlflow_server)
    run_id = summary["stage_run_id"]
    for key in ("disc/image", "disc/audio", "adv/image_weight", "adv/audio_weight"):
        history = MlflowClient(mlflow_server).get_metric_history(run_id, key)
        before = [m.value for m in history if m.step < 3]
        after = [m.value for m in history if m.step >= 3]
        assert after and all(v > 0 for v in after), key
        assert all(v == 0 for v in before), (key, before)  # nothing before disc_start
