"""The train stage's parts with fusion's head replay: its step, schedule and checkpoint."""

from __future__ import annotations

import pytest
import torch
from traindata import preprocessed_batch

from mmvq import to_model_inputs
from mmvq.config import AudioCodecConfig, FusionConfig, ImageCodecConfig, TokenizerConfig
from mmvq.train_step import generator_step
from pipeline.formats.checkpoint import TrainState, load_checkpoint, save_checkpoint
from pipeline.train_config import TrainConfig
from pipeline.train_loop import advance_schedules, build_parts

CPU = torch.device("cpu")


def _config(head_steps: int = 2) -> TrainConfig:
    fusion = FusionConfig(enabled=True, dim=32, num_layers=1, num_heads=4, num_queries=4,
                          codebook_size=16, embed_dim=16, align_head_steps=head_steps,
                          align_replay_samples=16)
    model = TokenizerConfig(image=ImageCodecConfig(image_size=32),
                            audio=AudioCodecConfig(num_samples=2000), fusion=fusion)
    return TrainConfig(model=model, gan=None, steps=10, warmup_steps=2)


def _steps(parts, cfg: TrainConfig, n: int) -> list[dict[str, float]]:
    stats = []
    for step in range(n):
        inputs = to_model_inputs(preprocessed_batch(6, seed=step, cfg=cfg.model))
        stats.append(generator_step(parts.model, [inputs], parts.optimizers["generator"],
                                    cfg.grad_clip, heads=parts.head_trainer))
        advance_schedules(parts.schedulers, cfg, step)
    return stats


def test_each_step_trains_the_heads_on_the_replay_and_the_heads_have_a_schedule():
    cfg = _config()
    parts = build_parts(cfg, CPU)
    assert set(parts.optimizers) == {"generator", "align_heads"}
    heads = {id(p) for p in parts.model.fusion.alignment_heads()}
    assert {id(p) for g in parts.optimizers["align_heads"].param_groups
            for p in g["params"]} == heads
    stats = _steps(parts, cfg, 3)
    assert all(s["align/head_infonce"] > 0 for s in stats)
    assert len(parts.head_trainer) == 16  # 18 samples seen, the ring holds 16
    assert parts.optimizers["align_heads"].state  # it stepped
    off = build_parts(_config(head_steps=0), CPU)
    assert off.head_trainer is None and set(off.optimizers) == {"generator"}
    assert "align/head_infonce" not in _steps(off, _config(head_steps=0), 1)[0]


def test_a_checkpoint_restores_the_heads_optimizer_and_schedule(tmp_path):
    cfg = _config()
    parts = build_parts(cfg, CPU)
    _steps(parts, cfg, 3)
    save_checkpoint(tmp_path, TrainState(3, 0, 3), parts.modules(), parts.optim(), rank=0)
    restored = build_parts(cfg, CPU)
    load_checkpoint(tmp_path, restored.modules(), restored.optim(), rank=0)
    saved, loaded = (p.optimizers["align_heads"].state_dict() for p in (parts, restored))
    assert loaded["state"].keys() == saved["state"].keys()
    for key, state in saved["state"].items():
        assert torch.equal(state["exp_avg"], loaded["state"][key]["exp_avg"])
    assert (restored.schedulers["align_heads"].last_epoch
            == parts.schedulers["align_heads"].last_epoch == 3)


def test_resuming_without_the_heads_optimizer_names_it(tmp_path):
    off = _config(head_steps=0)
    parts = build_parts(off, CPU)
    save_checkpoint(tmp_path, TrainState(0, 0, 0), parts.modules(), parts.optim(), rank=0)
    on = build_parts(_config(), CPU)
    with pytest.raises(ValueError, match="optimizer/align_heads.*align_head_steps"):
        load_checkpoint(tmp_path, on.modules(), on.optim(), rank=0)
