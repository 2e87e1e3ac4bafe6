"""One fast path: the train worker, the tokenize encoder and the GPU benchmark all go through
:func:`mmvq.speed.apply_speed` with their stage's ``speed`` config, and on the CPU (outside the
default ``device_types``) that changes nothing.

The switches checked here need no compiler (torch.compile takes minutes on this CPU): NHWC
weights, the bf16 autocast wrapper, fused AdamW and the quantizers' search block.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from traindata import preprocessed_batch

from mmvq import MultimodalTokenizer, to_model_inputs
from mmvq.config import AudioCodecConfig, GanConfig, ImageCodecConfig, TokenizerConfig
from mmvq.perceptual import build_perceptual
from mmvq.quantizers.distance import DEFAULT_BLOCK_ELEMENTS
from mmvq.speed import TOKENIZER_TARGETS, FastForward, SpeedConfig
from mmvq.train_step import build_optimizer, generator_step, warmup_cosine
from pipeline.bench import gpu
from pipeline.formats.checkpoint import TOKENIZER_DIR
from pipeline.formats.tokens import TokenEncoder
from pipeline.stage import StageContext
from pipeline.tokenize import TokenizeConfig
from pipeline.tokenize import run as tokenize_run
from pipeline.train_config import TrainConfig
from pipeline.train_loop import advance_schedules, build_parts

MODEL = TokenizerConfig(image=ImageCodecConfig(image_size=32),
                        audio=AudioCodecConfig(num_samples=2000))
GAN = GanConfig(disc_start=0, image_disc_channels=8, audio_disc_channels=4,
                audio_disc_n_ffts=(64, 128), image_disc_norm="group")
BLOCK = 4096  # a search block no quantizer has by default
# The cheap switches, made to apply on the CPU; fp32 so that nothing but them changes.
CPU_SWITCHES = SpeedConfig(device_types=("cpu",), bf16=False, tf32=False, cudnn_benchmark=False,
                           channels_last=True, compile=False, fused_optimizer=True,
                           search_block_elements=BLOCK)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _restore_backend_flags(torch_backend_flags):
    """apply_speed sets process-wide flags; each test gets torch's back (tests/conftest.py)."""


def _rows(n: int) -> dict[str, np.ndarray]:
    return preprocessed_batch(n, seed=3, cfg=MODEL)


def _saved_tokenizer(root: Path) -> Path:
    torch.manual_seed(0)
    MultimodalTokenizer(MODEL).save(root / TOKENIZER_DIR)
    return root / TOKENIZER_DIR


def _sped_up(module: torch.nn.Module) -> bool:
    return isinstance(vars(module).get("forward"), FastForward)


def _nhwc(module: torch.nn.Module) -> bool:
    weights = [p for p in module.parameters() if p.dim() == 4]
    assert weights, type(module).__name__  # a net without 4-D weights would prove nothing
    # A 1x1 kernel is contiguous both ways; the larger ones show the layout.
    return (all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
            and any(not p.is_contiguous() for p in weights))


def _assert_plain(model: MultimodalTokenizer) -> None:
    assert not any(_sped_up(getattr(model, name)) for name in TOKENIZER_TARGETS)
    assert all(p.is_contiguous() for p in model.parameters())
    assert {q.max_block_elements for q in model.quantizers.values()} == {DEFAULT_BLOCK_ELEMENTS}


# -- train -----------------------------------------------------------------------------------


def test_train_build_applies_the_configs_switches():
    perceptual = build_perceptual(None, random_weights=True)
    config = TrainConfig(model=MODEL, gan=GAN, ema_decay=0.9, speed=CPU_SWITCHES)
    parts = build_parts(config, CPU, perceptual=perceptual)
    model = parts.model
    assert all(_sped_up(getattr(model, name)) for name in TOKENIZER_TARGETS)
    assert _nhwc(model.image_encoder) and _nhwc(model.image_decoder)
    assert all(_sped_up(d) and _nhwc(d) for d in parts.discriminators.values())
    assert parts.perceptual is perceptual and _sped_up(perceptual) and _nhwc(perceptual)
    assert {q.max_block_elements for q in model.quantizers.values()} == {BLOCK}
    # The discriminators' AdamW was unfused; the schedulers step the fused replacement.
    assert parts.optimizers["discriminator"].defaults["fused"] is True
    assert {name: s.optimizer for name, s in parts.schedulers.items()} == parts.optimizers
    # The EMA is copied before the speed-up: a plain model that still averages the same weights.
    _assert_plain(parts.ema)
    assert parts.ema.state_dict().keys() == model.state_dict().keys()
    assert torch.get_float32_matmul_precision() == "highest"  # tf32=False, set explicitly


def test_train_build_on_the_cpu_by_default_changes_nothing():
    assert TrainConfig().speed == SpeedConfig()
    flags = (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark)
    parts = build_parts(TrainConfig(model=MODEL, gan=GAN), CPU)
    _assert_plain(parts.model)
    assert not any(_sped_up(d) for d in parts.discriminators.values())
    assert not parts.optimizers["discriminator"].defaults.get("fused")
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark) == flags
    # Bit-identical training: a step of the built parts equals one of a hand-built plain model.
    config = TrainConfig(model=MODEL)
    torch.manual_seed(0)
    parts = build_parts(config, CPU)
    torch.manual_seed(0)
    plain = MultimodalTokenizer(MODEL)
    plain_opt = build_optimizer(plain, lr=config.lr, weight_decay=config.weight_decay,
                                betas=config.betas)
    batch = to_model_inputs(_rows(4))
    for model, opt in ((parts.model, parts.optimizers["generator"]), (plain, plain_opt)):
        torch.manual_seed(1)
        generator_step(model, batch, opt, config.grad_clip)
    trained, reference = parts.model.state_dict(), plain.state_dict()
    assert all(torch.equal(trained[k], reference[k]) for k in reference)


def test_bench_builds_its_variants_with_the_train_workers_build(monkeypatch):
    calls = []

    def recorded(cfg, device, **kwargs):
        calls.append(cfg)
        return build_parts(cfg, device, **kwargs)

    monkeypatch.setattr(gpu, "build_parts", recorded)
    setup = gpu.build_setup(gpu.tokenizer_config(gpu.SMALL_IMAGE), CPU_SWITCHES, "cpu")
    assert [c.speed for c in calls] == [CPU_SWITCHES] and calls[0].gan == gpu.GAN
    assert _sped_up(setup.model.image_encoder) and _sped_up(setup.parts.perceptual)
    assert setup.parts.optimizers["discriminator"].defaults["fused"] is True


# -- tokenize --------------------------------------------------------------------------------


def test_token_encoder_applies_the_configs_switches(tmp_path):
    model_dir = _saved_tokenizer(tmp_path)
    encoder = TokenEncoder(str(model_dir), speed=CPU_SWITCHES)
    assert _sped_up(encoder.model.image_encoder) and _nhwc(encoder.model.image_encoder)
    assert {q.max_block_elements for q in encoder.model.quantizers.values()} == {BLOCK}
    plain = TokenEncoder(str(model_dir))
    _assert_plain(plain.model)
    assert encoder.tokenizer_id == plain.tokenizer_id  # the weights are the same
    batch = _rows(3)
    table, reference = encoder(batch), plain(batch)
    assert table.schema == reference.schema and table.num_rows == reference.num_rows == 3


def test_token_encoder_on_the_cpu_by_default_writes_the_same_rows(tmp_path):
    model_dir = _saved_tokenizer(tmp_path)
    encoder = TokenEncoder(str(model_dir), speed=TokenizeConfig().speed)
    _assert_plain(encoder.model)
    batch = _rows(3)
    assert encoder(batch).equals(TokenEncoder(str(model_dir))(batch))


class _Captured(Exception):
    """Raised by the fake dataset once the stage has made its map_batches call."""


def test_tokenize_stage_hands_its_speed_config_to_the_encoder(tmp_path, monkeypatch):
    import pipeline.tokenize as stage

    class Rows:
        def map_batches(self, fn, **kwargs):
            raise _Captured(fn, kwargs)

    monkeypatch.setattr(stage, "read_parquet", lambda paths, **kw: Rows())
    _saved_tokenizer(tmp_path / "model")
    (tmp_path / "data" / "train").mkdir(parents=True)
    config = dataclasses.replace(TokenizeConfig(), speed=CPU_SWITCHES)
    ctx = StageContext(output_dir=tmp_path / "out",
                       inputs={"model": tmp_path / "model", "data": tmp_path / "data"})
    with pytest.raises(_Captured) as captured:
        tokenize_run(config, ctx)
    fn, kwargs = captured.value.args
    encoder = fn(*kwargs["fn_constructor_args"])  # what each actor builds
    assert isinstance(encoder, TokenEncoder) and _sped_up(encoder.model.image_encoder)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler")  # no optimizer here
def test_discriminator_schedule_starts_at_disc_start():
    """The discriminator's warmup and cosine run over its own updates: at disc_start it gets
    its warmup's first rate, not the generator's nearly decayed one (the demo starts it at
    step 250 of 300, where the generator's multiplier is 0.16)."""
    config = TrainConfig(model=MODEL, gan=dataclasses.replace(GAN, disc_start=75), steps=100,
                         warmup_steps=5)
    parts = build_parts(config, CPU)
    generator, discriminator = (parts.optimizers[k] for k in ("generator", "discriminator"))
    disc_peak = discriminator.param_groups[0]["initial_lr"]
    rates = []
    for step in range(config.steps):
        rates.append((generator.param_groups[0]["lr"], discriminator.param_groups[0]["lr"]))
        advance_schedules(parts.schedulers, config, step)
    assert rates[0] == (config.lr / 5, disc_peak / 5)  # both begin with the warmup
    assert all(d == disc_peak / 5 for _, d in rates[:76])  # waits, unchanged, until step 75
    assert rates[79][1] == pytest.approx(disc_peak)  # warmed up over its own steps 75-79
    assert rates[75][0] < 0.3 * config.lr  # the generator is far into its decay there
    # Its cosine spans its own 25 steps; the generator's all 100.
    assert rates[99][1] == pytest.approx(disc_peak * warmup_cosine(24, 5, 25, config.min_lr_ratio))
    assert rates[99][0] == pytest.approx(config.lr * warmup_cosine(99, 5, 100, config.min_lr_ratio))
