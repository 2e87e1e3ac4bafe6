"""Residual VQ, FSQ, LFQ, the config builder, and every kind inside the tokenizer."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mmvq import MultimodalTokenizer, TokenizerConfig, to_model_inputs
from mmvq.config import QuantizerConfig
from mmvq.config_io import ConfigError
from mmvq.quantizers import (
    APPLICABLE_FIELDS,
    FSQ,
    LFQ,
    QUANTIZERS,
    ResidualVQ,
    SimVQ,
    VectorQuantizer,
    build_quantizer,
)
from mmvq.quantizers.lfq import BlockedCodeDistribution

# One instance per family for the shared invariants; dims 8 so that FSQ/LFQ project.
FAMILIES = {
    "rvq": lambda: ResidualVQ(32, 8, num_levels=3),
    "rvq-ema-factorised-rotation": lambda: ResidualVQ(
        32, 8, num_levels=3, ema=True, code_dim=4, rotation_trick=True
    ),
    "fsq": lambda: FSQ(8, (8, 5, 5, 5)),
    "fsq-unprojected": lambda: FSQ(3, (4, 3, 5)),
    "lfq": lambda: LFQ(64, 8),
    "lfq-unprojected": lambda: LFQ(16, 4),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_lookup_of_indices_is_the_quantized_value(name):
    q = FAMILIES[name]().eval()
    out = q(torch.randn(3, 5, 8 if "unprojected" not in name else q.dim))
    assert out.quantized.dtype == torch.float32
    assert torch.equal(q.lookup(out.indices), out.quantized)


@pytest.mark.parametrize("name", FAMILIES)
def test_gradient_reaches_the_encoder_input(name):
    q = FAMILIES[name]()
    z = torch.randn(4, 6, q.dim, requires_grad=True)
    out = q(z)
    upstream = torch.randn_like(out.quantized)  # (a loss like q^2 has zero gradient at q = 0)
    ((out.quantized * upstream).sum() + out.commit_loss + out.codebook_loss).backward()
    assert torch.isfinite(z.grad).all() and (z.grad.abs().sum(dim=-1) > 0).all()


# -- residual VQ -------------------------------------------------------------------------------


def test_rvq_error_falls_with_every_level_used_at_inference():
    torch.manual_seed(0)
    q = ResidualVQ(64, 8, num_levels=6, kmeans_init=True)
    q(torch.randn(4096, 8))  # one training step: each level k-means-initialised on its residual
    q.eval()
    z = torch.randn(2048, 8)  # held-out data
    errors = [(q(z, num_levels=n).quantized - z).pow(2).mean().item() for n in range(1, 7)]
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.4 * errors[0], errors


def test_rvq_with_fewer_levels_decodes_from_the_leading_indices():
    q = ResidualVQ(16, 4, num_levels=4).eval()
    z = torch.randn(2, 7, 4)
    full = q(z)
    assert full.indices.shape == (2, 7, 4)
    two = q(z, num_levels=2)
    assert torch.equal(two.indices, full.indices[..., :2])
    assert torch.equal(q.lookup(full.indices[..., :2]), two.quantized)
    with pytest.raises(ValueError, match="num_levels must be in 1..4"):
        q(z, num_levels=5)


def test_rvq_straight_through_gradient_is_the_identity():
    q = ResidualVQ(16, 4, num_levels=3)
    z = torch.randn(10, 4, requires_grad=True)
    q(z).quantized.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))


def test_quantizer_dropout_gives_samples_random_depths_during_training_only():
    q = ResidualVQ(16, 4, num_levels=4, quantizer_dropout=1.0)
    z = torch.randn(64, 3, 4)  # 64 samples of 3 vectors
    out = q(z)
    depths = []
    for b in range(64):  # each sample's output is the sum of its first n levels' codes
        matches = [
            n for n in range(1, 5) if torch.equal(q.lookup(out.indices[b, :, :n]), out.quantized[b])
        ]
        assert matches, b
        depths.append(matches[0])
    assert len(set(depths)) >= 3  # random per sample, all of 1..4 likely among 64
    q.eval()
    assert torch.equal(q.lookup(q(z).indices), q(z).quantized)  # eval: every level


# -- FSQ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (4, 3, 5), (2, 2)])
def test_fsq_codes_and_indices_round_trip_over_the_whole_grid(levels):
    q = FSQ(len(levels), levels)
    everything = torch.arange(math.prod(levels))
    codes = q.codes_from_indices(everything)  # (K, w)
    assert torch.equal(q.indices_from_codes(codes), everything)
    assert codes.unique(dim=0).shape[0] == math.prod(levels)
    assert codes.min() >= -1 and codes.max() <= 1


def test_fsq_rounds_each_dimension_to_exactly_its_levels():
    levels = (8, 5, 3)
    q = FSQ(3, levels).eval()
    z = torch.randn(20000, 3) * 4  # wide enough to reach every level
    out = q(z)
    for i, n in enumerate(levels):
        assert out.quantized[:, i].unique().numel() == n
    assert torch.equal(q.codes_from_indices(out.indices), out.quantized)
    assert out.indices.unique().numel() == math.prod(levels)


# -- LFQ ---------------------------------------------------------------------------------------


def test_lfq_codes_and_indices_round_trip_and_follow_the_signs():
    q = LFQ(256, 8).eval()
    everything = torch.arange(256)
    codes = q.codes_from_indices(everything)
    assert torch.equal(q.indices_from_codes(codes), everything)
    assert set(codes.unique().tolist()) == {-1.0, 1.0}
    x = torch.randn(100, 8)
    assert torch.equal(LFQ(256, 8)(x).quantized, torch.where(x > 0, 1.0, -1.0))


def brute_force_entropy_loss(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """MAGVIT-v2's loss from the full (N, K) softmax over every sign code."""
    codes = LFQ(2 ** x.shape[1], x.shape[1]).codes_from_indices(torch.arange(2 ** x.shape[1]))
    probs = torch.softmax(-torch.cdist(x, codes).pow(2) / temperature, dim=-1)  # (N, K)
    per_sample = -(probs * probs.clamp_min(1e-10).log()).sum(-1).mean()
    avg = probs.mean(0)
    return per_sample + (avg * avg.clamp_min(1e-10).log()).sum()


@pytest.mark.parametrize("max_block_elements", [2**22, 100])
def test_lfq_entropy_loss_equals_the_brute_force_softmax(max_block_elements):
    q = LFQ(64, 6, entropy_weight=1.0, temperature=0.5, max_block_elements=max_block_elements)
    x = torch.randn(300, 6, dtype=torch.float64).float()
    torch.testing.assert_close(
        q(x).codebook_loss, brute_force_entropy_loss(x, 0.5), atol=1e-4, rtol=1e-4
    )


def test_blocked_code_distribution_gradient_matches_finite_differences():
    bits = LFQ(16, 4).codes_from_indices(torch.arange(16)).gt(0).double()  # (K, b)
    logits = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    weights = (torch.rand(7) > 0.3).double()
    assert torch.autograd.gradcheck(
        lambda x: BlockedCodeDistribution.apply(x, weights, bits, 3), (logits,)
    )


def test_lfq_entropy_loss_spreads_a_collapsed_batch_over_the_codes():
    torch.manual_seed(0)
    q = LFQ(16, 4, entropy_weight=1.0, temperature=0.5)
    x = (torch.randn(256, 4) * 0.1 + 1.0).requires_grad_()  # every vector in code 15
    optimizer = torch.optim.Adam([x], lr=0.05)
    for _ in range(40):
        optimizer.zero_grad()
        q(x).codebook_loss.backward()
        optimizer.step()
    assert q(x).indices.unique().numel() >= 12


def test_lfq_rejects_a_codebook_size_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        LFQ(100, 8)


# -- builder and config ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, codebook_size, cls",
    [
        (QuantizerConfig(), 256, SimVQ),
        (QuantizerConfig(kind="vq", ema=True, kmeans_init=True, code_dim=8), 256, VectorQuantizer),
        (QuantizerConfig(kind="rvq", num_levels=2, quantizer_dropout=0.5), 256, ResidualVQ),
        (QuantizerConfig(kind="fsq", fsq_levels=(4, 4, 4, 4)), 256, FSQ),
        (QuantizerConfig(kind="lfq", entropy_weight=0.2), 256, LFQ),
    ],
)
def test_build_quantizer_makes_the_configured_kind(config, codebook_size, cls):
    q = build_quantizer(config, codebook_size, 32)
    assert type(q) is cls and q.codebook_size == codebook_size


# Parameters at D = 32, by hand. A lookup in 8 dims adds project_in (32 * 8 + 8) and project_out
# (8 * 32 + 32), 552 in all; SimVQ learns its d x d map, not its K codes (a frozen basis).
@pytest.mark.parametrize(
    "config, codebook_size, cls, num_params",
    [
        (QuantizerConfig(kind="vq"), 256, VectorQuantizer, 256 * 32),
        (QuantizerConfig(kind="vq", code_dim=8), 256, VectorQuantizer, 256 * 8 + 552),
        (QuantizerConfig(kind="simvq"), 256, SimVQ, 32 * 32),
        (QuantizerConfig(kind="simvq", code_dim=8), 256, SimVQ, 8 * 8 + 552),
        (QuantizerConfig(kind="rvq"), 256, ResidualVQ, 4 * 256 * 32),  # 4 levels by default
        (QuantizerConfig(kind="fsq"), 1000, FSQ, 4 * 32 + 4 + 32 * 4 + 32),  # 4 levels: 4 dims
        (QuantizerConfig(kind="lfq"), 256, LFQ, 552),  # 256 codes: 8 bits
    ],
    ids=lambda v: getattr(v, "kind", None),
)
def test_every_registered_kind_builds_its_module(config, codebook_size, cls, num_params):
    q = build_quantizer(config, codebook_size, 32)
    assert type(q) is cls
    assert sum(p.numel() for p in q.parameters()) == num_params


def test_the_registry_and_the_applicable_fields_name_the_same_kinds():
    assert sorted(QUANTIZERS) == sorted(APPLICABLE_FIELDS) == ["fsq", "lfq", "rvq", "simvq", "vq"]


def test_build_quantizer_passes_the_options_through():
    cfg = QuantizerConfig(
        kind="vq",
        l2_normalize=False,
        ema=True,
        decay=0.7,
        restart_threshold=0.3,
        code_dim=4,
        rotation_trick=True,
    )
    q = build_quantizer(cfg, 64, 16)
    assert (q.ema, q.decay, q.restart_threshold, q.code_dim) == (True, 0.7, 0.3, 4)
    assert q.rotation_trick and not q.l2_normalize
    rvq = build_quantizer(QuantizerConfig(kind="rvq", num_levels=3, ema=True), 64, 16)
    assert len(rvq.levels) == 3 and all(level.ema for level in rvq.levels)
    # quantizer.l2_normalize (default True) is the vq/simvq lookup: residual levels keep raw L2.
    assert not any(level.l2_normalize for level in rvq.levels)


@pytest.mark.parametrize(
    "config, codebook_size, message",
    [
        (QuantizerConfig(kind="nope"), 256, "unknown quantizer.kind 'nope'"),
        (QuantizerConfig(kind="simvq", ema=True), 256, "quantizer.ema does not apply"),
        (QuantizerConfig(kind="fsq", num_levels=2), 1000, "quantizer.num_levels does not apply"),
        (QuantizerConfig(kind="vq", fsq_levels=(4, 4)), 256, "quantizer.fsq_levels does not"),
        (QuantizerConfig(kind="fsq"), 256, r"give 1000 codes.*codebook_size is 256"),
        (QuantizerConfig(kind="lfq"), 1000, "power-of-two"),
    ],
)
def test_build_quantizer_rejects_what_the_kind_cannot_use(config, codebook_size, message):
    with pytest.raises(ValueError, match=message):
        build_quantizer(config, codebook_size, 32)


@pytest.mark.parametrize(
    "field, value",
    [
        ("decay", 1.0),
        ("eps", 0.0),
        ("num_levels", 0),
        ("quantizer_dropout", 1.5),
        ("fsq_levels", (8, 1)),
        ("code_dim", 0),
        ("restart_threshold", -1.0),
    ],
)
def test_config_rejects_out_of_range_values(field, value):
    with pytest.raises(ConfigError, match=f"quantizer.{field}"):
        QuantizerConfig(**{field: value})


@pytest.mark.parametrize(
    "quantizer",
    [
        QuantizerConfig(kind="vq", ema=True, restart_threshold=0.5, rotation_trick=True),
        QuantizerConfig(kind="rvq", l2_normalize=False, num_levels=2, quantizer_dropout=1.0),
        QuantizerConfig(kind="fsq", fsq_levels=(4, 4, 4, 4)),
        QuantizerConfig(kind="lfq"),
    ],
    ids=lambda c: c.kind,
)
def test_tokenizer_trains_a_step_with_every_kind(make_batch, quantizer):
    # Residual VQ is an audio-only choice (audio_quantizer); the other kinds serve every modality.
    residual = quantizer.kind == "rvq"
    model = MultimodalTokenizer(TokenizerConfig(audio_quantizer=quantizer) if residual
                                else TokenizerConfig(quantizer=quantizer))
    out = model(to_model_inputs(make_batch(2, seed=0)))
    out.losses["total"].backward()
    assert torch.isfinite(out.losses["total"])
    modality = "audio" if residual else "image"
    encoder = model.audio_encoder if residual else model.image_encoder
    grads = [p.grad for p in encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    codes = model.encode(to_model_inputs(make_batch(2, seed=1)))
    assert F.mse_loss(model.decode(codes)[modality], model.decode(codes)[modality]) == 0
