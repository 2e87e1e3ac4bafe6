"""The alignment's gradient at the shared latents stays below the reconstruction's."""

import dataclasses

import pytest
import torch

from mmvq import MultimodalTokenizer, TokenizerConfig, to_model_inputs
from mmvq.config import FusionConfig
from mmvq.grad_balance import GradientCap


def _grads(cap: GradientCap, reference_scale: float, capped_scale: float) -> torch.Tensor:
    x = torch.ones(4, 3, requires_grad=True)
    (reference_scale * cap.reference("a", x).sum() + capped_scale * cap.capped("a", x).sum()
     ).backward()
    return x.grad


def test_cap_scales_only_the_capped_branch_down_to_the_ratio():
    cap = GradientCap(("a",), ratio=0.5, decay=0.0)  # decay 0: the last reference norm
    # First backward: no reference norm yet, so nothing is capped (10 + 1 per element).
    assert torch.allclose(_grads(cap, 1.0, 10.0), torch.full((4, 3), 11.0))
    # Now the reference norm is sqrt(12) (ones); the capped branch's 10 * sqrt(12) is held to
    # half of it: its gradient per element becomes 0.5, the reference's stays 1.
    assert torch.allclose(_grads(cap, 1.0, 10.0), torch.full((4, 3), 1.5))
    assert float(cap.scale[0]) == pytest.approx(0.05)
    # A capped gradient already below the cap is left as it is: never scaled up.
    assert torch.allclose(_grads(cap, 1.0, 0.1), torch.full((4, 3), 1.1))


def _codec_grad_norm(make_batch, align_weight: float, ratio: float | None) -> float:
    base = TokenizerConfig(fusion=FusionConfig(enabled=True, dim=32, num_layers=1,
                                               num_queries=4, align_grad_ratio=ratio))
    config = dataclasses.replace(base, loss_weights=dict(base.loss_weights)
                                 | {"align/infonce": align_weight})
    torch.manual_seed(0)
    model = MultimodalTokenizer(config).train()
    inputs = to_model_inputs(make_batch(8, seed=1))
    for _ in range(2):  # the first backward gives the reference norm, the second is capped
        model.zero_grad()
        model(inputs).losses["total"].backward()
    encoders = [model.image_encoder, model.audio_encoder, model.text_encoder]
    return float(torch.sqrt(sum(p.grad.pow(2).sum() for e in encoders for p in e.parameters()
                                if p.grad is not None)))


def test_a_huge_alignment_weight_cannot_take_over_the_encoders(make_batch):
    plain = _codec_grad_norm(make_batch, 0.0, 0.5)
    capped = _codec_grad_norm(make_batch, 1e4, 0.5)
    uncapped = _codec_grad_norm(make_batch, 1e4, None)
    assert uncapped > 20 * plain  # the attack: alignment swamps reconstruction
    assert capped < 2.0 * plain, (plain, capped)
