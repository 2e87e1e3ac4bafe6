import math

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mmvq import MultimodalTokenizer, TokenizerConfig, to_model_inputs
from mmvq.train_step import build_optimizer, generator_step

LOSS_KEYS = {"image/l1", "audio/l1", "audio/mel", "text/ce", "vq/commit", "vq/codebook", "total"}


@pytest.fixture
def inputs(make_batch):
    return to_model_inputs(make_batch(2, seed=5))


def test_generator_step_updates_weights_and_reports_floats(inputs):
    model = MultimodalTokenizer(TokenizerConfig())
    before = model.weights_hash()
    stats = generator_step(model, inputs, build_optimizer(model), grad_clip=1.0)
    assert set(stats) == LOSS_KEYS | {"grad_norm"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in stats.values())
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
