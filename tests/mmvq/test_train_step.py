import itertools
import math

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mmvq import MultimodalTokenizer, TokenizerConfig, to_model_inputs
from mmvq.train_step import (
    build_optimizer,
    generator_step,
    update_ema,
    warmup_cosine,
)

LOSS_KEYS = {"image/l1", "audio/l1", "audio/mel", "text/ce", "vq/commit", "vq/codebook", "total"}
CODE_KEYS = {f"{m}/codebook_{s}" for m in ("image", "audio", "text")
             for s in ("usage", "perplexity")}


@pytest.fixture
def inputs(make_batch):
    return to_model_inputs(make_batch(2, seed=5))


def test_generator_step_updates_weights_and_reports_floats(inputs):
    model = MultimodalTokenizer(TokenizerConfig())
    before = model.weights_hash()
    stats = generator_step(model, inputs, build_optimizer(model), grad_clip=1.0)
    assert set(stats) == LOSS_KEYS | CODE_KEYS | {"grad_norm"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in stats.values())
    assert 0 < stats["image/codebook_usage"] <= 1
    assert 1 <= stats["image/codebook_perplexity"] <= 256
    assert stats["grad_norm"] > 0
    assert model.weights_hash() != before


def test_grad_clip_bounds_the_applied_gradient(inputs):
    model = MultimodalTokenizer(TokenizerConfig())
    # Plain SGD makes the update proportional to the (clipped) gradient we can inspect.
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    stats = generator_step(model, inputs, opt, grad_clip=1e-3)
    clipped = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None))
    assert stats["grad_norm"] > 1e-3
    assert clipped.item() == pytest.approx(1e-3, rel=1e-3)


def _codec_gradient_after_a_clipped_step(inputs, fusion_recon_weight: float) -> torch.Tensor:
    import dataclasses

    from mmvq.config import FusionConfig

    base = TokenizerConfig(fusion=FusionConfig(enabled=True, dim=32, num_layers=1, num_queries=4))
    weights = dict(base.loss_weights) | {"fusion/recon": fusion_recon_weight,
                                         "align/infonce": 0.0}
    torch.manual_seed(0)
    model = MultimodalTokenizer(dataclasses.replace(base, loss_weights=weights))
    stats = generator_step(model, inputs, torch.optim.SGD(model.parameters(), lr=0.0),
                           grad_clip=1.0)
    assert set(stats) >= {"grad_norm", "fusion/grad_norm"}
    own = {id(p) for p in model.fusion.parameters()}
    return torch.cat([p.grad.flatten() for p in model.parameters()
                      if p.grad is not None and id(p) not in own])


def test_huge_fusion_gradients_do_not_shrink_the_codec_step(inputs):
    # No fusion loss reaches the codecs here (align weight 0, detached joint path), so their
    # clipped gradient must not depend on how large fusion's own gradient is. Under one global
    # norm the 1000x fusion loss made the clip shrink the codec gradient too.
    normal = _codec_gradient_after_a_clipped_step(inputs, 1.0)
    huge = _codec_gradient_after_a_clipped_step(inputs, 1000.0)
    assert torch.allclose(normal, huge, rtol=1e-4, atol=1e-7)
    assert normal.norm() <= 1.0 + 1e-4


def _head_gradient_after_a_clipped_step(inputs, fusion_recon_weight: float) -> torch.Tensor:
    import dataclasses

    from mmvq.config import FusionConfig

    base = TokenizerConfig(fusion=FusionConfig(enabled=True, dim=32, num_layers=1, num_queries=4,
                                               modality_dropout=0.0))
    weights = dict(base.loss_weights) | {"fusion/recon": fusion_recon_weight}
    torch.manual_seed(0)
    model = MultimodalTokenizer(dataclasses.replace(base, loss_weights=weights))
    stats = generator_step(model, inputs, torch.optim.SGD(model.parameters(), lr=0.0),
                           grad_clip=1.0)
    assert stats["align/grad_norm"] > 0 and stats["fusion/grad_norm"] > 0
    return torch.cat([p.grad.flatten() for p in model.fusion.alignment_heads()])


def test_huge_joint_path_gradients_do_not_shrink_the_alignment_heads_step(inputs):
    # Only align/infonce trains the pooling and embedding heads; a 1000x joint-token loss must
    # not change their clipped gradient. With one norm over all of fusion it scaled them down.
    normal = _head_gradient_after_a_clipped_step(inputs, 1.0)
    huge = _head_gradient_after_a_clipped_step(inputs, 1000.0)
    assert normal.norm() > 0
    assert torch.allclose(normal, huge, rtol=1e-4, atol=1e-7)


def test_build_optimizer_decays_only_conv_and_linear_weights():
    model = MultimodalTokenizer(TokenizerConfig())
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = ({id(p) for p in g["params"]} for g in opt.param_groups)
    every = {id(p) for p in model.parameters()}
    assert decay | no_decay == every and not decay & no_decay
    assert id(model.text_encoder.tok.weight) in no_decay  # embedding
    assert id(model.image_encoder.out[0].weight) in no_decay  # GroupNorm
    assert id(model.quantizers["image"].proj.weight) in decay  # SimVQ's shared map is a Linear
    assert id(model.image_encoder.stem.weight) in decay
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0


def test_generator_step_under_ddp_matches_plain_step(inputs, tmp_path):
    torch.manual_seed(0)
    plain = MultimodalTokenizer(TokenizerConfig())
    wrapped = MultimodalTokenizer(TokenizerConfig())
    wrapped.load_state_dict(plain.state_dict())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(wrapped)
        ddp_opt = build_optimizer(ddp, lr=1e-3)
        plain_opt = build_optimizer(plain, lr=1e-3)
        for _ in range(2):
            a = generator_step(plain, inputs, plain_opt)
            b = generator_step(ddp, inputs, ddp_opt)
            assert a["total"] == pytest.approx(b["total"], rel=1e-5)
    finally:
        dist.destroy_process_group()
    for (name, p), q in zip(plain.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def _rows(inputs, rows):
    import dataclasses

    return dataclasses.replace(inputs, **{f.name: getattr(inputs, f.name)[rows]
                                          for f in dataclasses.fields(inputs)})


def test_gradient_accumulation_matches_the_full_batch_step(make_batch):
    # Text CE and audio L1 average over real positions, so micro-batch means equal the batch
    # mean only when every sample has as many: full-length audio and text here.
    batch = make_batch(4, seed=3)
    batch["audio_len"][:] = batch["audio"].shape[1]
    batch["text_len"][:] = batch["text_ids"].shape[1]
    inputs = to_model_inputs(batch)
    micro = [_rows(inputs, slice(0, 2)), _rows(inputs, slice(2, 4))]
    torch.manual_seed(0)
    full = MultimodalTokenizer(TokenizerConfig())
    accum = MultimodalTokenizer(TokenizerConfig())
    accum.load_state_dict(full.state_dict())
    a = generator_step(full, inputs, torch.optim.SGD(full.parameters(), lr=0.1))
    b = generator_step(accum, micro, torch.optim.SGD(accum.parameters(), lr=0.1))
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for (name, p), q in zip(full.named_parameters(), accum.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_step_keeps_fp32_weights_and_finite_losses(inputs):
    model = MultimodalTokenizer(TokenizerConfig())
    stats = generator_step(model, inputs, build_optimizer(model), grad_clip=1.0,
                           amp_dtype=torch.bfloat16)
    assert all(math.isfinite(v) for v in stats.values())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(inputs)
    assert out.reconstructions["image"].dtype == torch.bfloat16  # the convs ran in bf16
    # The quantizers compute distances and code lookups in fp32 whatever the autocast dtype.
    z = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.quantizers["image"](z, None).quantized.dtype == torch.float32


def test_warmup_cosine_schedule_shape():
    lrs = [warmup_cosine(s, warmup_steps=4, total_steps=14, min_ratio=0.1) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))  # monotone decay after warmup
    assert lrs[9] == pytest.approx(0.55)  # halfway through the cosine: (1 + 0.1) / 2
    assert lrs[14:] == pytest.approx([0.1] * 6)  # flat at the floor after total_steps
    assert warmup_cosine(0, 0, 10) == pytest.approx(1.0)


def test_ema_tracks_the_model_and_copies_buffers():
    import copy

    model = MultimodalTokenizer(TokenizerConfig())
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        next(model.buffers()).fill_(7)
    before = [p.clone() for p in ema.parameters()]
    update_ema(ema, model, decay=0.9)
    for old, new, target in zip(before, ema.parameters(), model.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * target)
    assert torch.equal(next(ema.buffers()), next(model.buffers()))
