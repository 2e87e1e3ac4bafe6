"""Joint tokens carry information: the fusion/recon target keeps the joint codebook alive."""

import dataclasses

import numpy as np
import pytest
import torch

from mmvq import metrics as M
from mmvq.config import DEFAULT_LOSS_WEIGHTS, JOINT_QUANTIZER, FusionConfig, QuantizerConfig
from mmvq.fusion import Fusion
from mmvq.quantizers import build_quantizer

DIMS = {"image": 16, "audio": 12, "text": 8}
CLASSES, BATCH, K = 8, 64, 32
# No caption head: these tests are about the joint tokens, and a head's initialisation would
# shift every later random draw.
CONFIG = FusionConfig(enabled=True, dim=32, num_layers=1, num_heads=4, num_queries=4,
                      codebook_size=K, embed_dim=16, caption_ngrams=0)
# A gradient-learned codebook (simvq, the modality default): without a target nothing moves its
# codes toward the joint latents, which shows what the target alone does.
GRADIENT_CODEBOOK = dataclasses.replace(CONFIG, quantizer=QuantizerConfig())


def _aligned(labels: torch.Tensor, proto: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each modality's latents: its class prototype (4 positions) plus noise."""
    return {m: proto[m][labels] + 0.3 * torch.randn(len(labels), 4, d) for m, d in DIMS.items()}


def _train_joint_tokens(recon_weight: float, config: FusionConfig = CONFIG,
                        steps: int = 100, diversity_weight: float = 0.0,
                        seed: int = 0) -> dict[str, float]:
    """Train fusion alone on a fixed aligned batch; score its joint tokens on a fresh draw.
    The diversity term is off unless asked, so that the tests see what the target does."""
    torch.manual_seed(seed)
    proto = {m: torch.randn(CLASSES, 4, d) for m, d in DIMS.items()}
    labels = torch.randint(0, CLASSES, (BATCH,))
    latents = _aligned(labels, proto)
    present = {m: torch.ones(BATCH, dtype=torch.bool) for m in DIMS}
    weights = {**DEFAULT_LOSS_WEIGHTS, "fusion/recon": recon_weight,
               "fusion/diversity": diversity_weight}
    fusion = Fusion(config, DIMS).train()
    optimizer = torch.optim.Adam(fusion.parameters(), lr=3e-3)
    for _ in range(steps):
        losses = fusion(latents, present).losses
        total = sum(weights[k] * v for k, v in losses.items())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    test_labels = torch.randint(0, CLASSES, (BATCH,))  # unseen samples of the same classes
    with torch.no_grad():
        joint = fusion.eval()(_aligned(test_labels, proto), present).indices  # (B, Q)
    nmi = [M.normalized_mutual_information(joint[:, q].numpy(), test_labels.numpy())
           for q in range(joint.shape[1])]
    return {"usage": M.codebook_usage(joint, K), "perplexity": M.codebook_perplexity(joint, K),
            "nmi": float(np.mean(nmi))}


@pytest.mark.parametrize("recon_weight", [DEFAULT_LOSS_WEIGHTS["fusion/recon"], 0.0])
def test_prediction_target_makes_joint_tokens_informative(recon_weight):
    """With the target the joint codes follow the class (8 classes, 32 codes); at weight 0
    nothing depends on their value and a gradient-learned codebook collapses to one code."""
    scores = _train_joint_tokens(recon_weight, GRADIENT_CODEBOOK)
    print(f"fusion/recon={recon_weight}: {scores}")
    if recon_weight > 0:
        assert scores["perplexity"] > 4.0  # of at most 8 class-driven codes
        assert scores["nmi"] > 0.6  # mean over the 4 query positions, on unseen samples
    else:
        assert scores["perplexity"] < 1.5 and scores["nmi"] < 0.1


def test_default_joint_quantizer_keeps_more_codes_alive_and_informative():
    """The default joint quantizer (EMA codes, k-means start, restarts) with the target: more
    of the codebook in use and joint codes closer to the class than the gradient codebook's."""
    default = _train_joint_tokens(DEFAULT_LOSS_WEIGHTS["fusion/recon"])
    gradient = _train_joint_tokens(DEFAULT_LOSS_WEIGHTS["fusion/recon"], GRADIENT_CODEBOOK)
    print(f"default {default}\ngradient codebook {gradient}")
    assert default["usage"] > gradient["usage"] + 0.2
    assert default["nmi"] > max(0.85, gradient["nmi"])


def test_prediction_loss_counts_present_modalities_only():
    torch.manual_seed(0)
    fusion = Fusion(CONFIG, DIMS).eval()
    latents = _aligned(torch.arange(4), {m: torch.randn(4, 4, d) for m, d in DIMS.items()})
    present = {m: torch.ones(4, dtype=torch.bool) for m in DIMS}
    present["audio"][2] = False
    before = fusion(latents, present).losses["fusion/recon"]
    latents["audio"][2] = torch.randn(4, 12) * 100  # garbage where the sample has no audio
    after = fusion(latents, present).losses["fusion/recon"]
    torch.testing.assert_close(before, after)
    latents["audio"][1] = torch.randn(4, 12) * 100  # a present modality's target does count
    assert fusion(latents, present).losses["fusion/recon"] != after


def test_prediction_loss_is_one_minus_r2_one_for_a_constant_guess():
    torch.manual_seed(0)
    fusion = Fusion(CONFIG, DIMS).eval()
    for head in fusion.predict.values():  # the head now predicts 0, the targets' mean
        torch.nn.init.zeros_(head[-1].weight)
        torch.nn.init.zeros_(head[-1].bias)
    latents = _aligned(torch.arange(16) % CLASSES, {m: torch.randn(CLASSES, 4, d)
                                                    for m, d in DIMS.items()})
    present = {m: torch.ones(16, dtype=torch.bool) for m in DIMS}
    loss = fusion(latents, present).losses["fusion/recon"]
    torch.testing.assert_close(loss, torch.tensor(1.0), atol=1e-4, rtol=0)


def test_diversity_term_spreads_joint_tokens_over_more_codes():
    """The default fusion/diversity weight against none, default quantizer and target: more of
    the codebook in use on unseen samples, and the codes still follow the class."""
    without = _train_joint_tokens(DEFAULT_LOSS_WEIGHTS["fusion/recon"])
    spread = _train_joint_tokens(DEFAULT_LOSS_WEIGHTS["fusion/recon"],
                                 diversity_weight=DEFAULT_LOSS_WEIGHTS["fusion/diversity"])
    print(f"without {without}\nwith diversity {spread}")
    assert spread["usage"] > without["usage"]
    assert spread["nmi"] > 0.85


def test_a_diversity_temperature_near_the_hard_lookup_fills_the_codebook():
    """At the default temperature the soft assignments the diversity term spreads are close to
    the hard codes, so every code ends up in use; at 0.1 the soft batch looks spread while the
    hard codes leave some unused (0.90 against 1.0 here over 4 seeds, one of which fills the
    codebook at 0.1 too; 0.48-0.83 against 0.88-0.95 in the demo's training, BENCHMARKS.md)."""
    weights = {"recon_weight": DEFAULT_LOSS_WEIGHTS["fusion/recon"],
               "diversity_weight": DEFAULT_LOSS_WEIGHTS["fusion/diversity"]}
    # At the EMA decay of the time (0.99): with the joint quantizer's faster EMA (0.95) this
    # toy fills its 32 codes at either temperature (1.0 against 0.96), so it would not tell.
    config = dataclasses.replace(CONFIG, quantizer=dataclasses.replace(JOINT_QUANTIZER,
                                                                       decay=0.99))
    seeds = range(4)  # one seed decides too little: a single unused code of 32 is 0.03
    sharp = [_train_joint_tokens(config=config, seed=s, **weights) for s in seeds]
    soft = [_train_joint_tokens(config=dataclasses.replace(config, diversity_temperature=0.1),
                                seed=s, **weights) for s in seeds]
    usage_sharp = float(np.mean([r["usage"] for r in sharp]))
    usage_soft = float(np.mean([r["usage"] for r in soft]))
    print(f"default temperature {sharp}\nat 0.1 {soft}")
    assert usage_sharp > 0.95 and usage_sharp > usage_soft + 0.05
    assert min(r["nmi"] for r in sharp) > 0.85  # spreading did not cost the class information


def _usage_after_drift(quantizer_config, seed: int, steps: int = 200, codes: int = 64,
                       dim: int = 32) -> float:
    """Train a quantizer on 64 clusters that each move a little every step (as joint latents do
    while fusion learns), 256 vectors a step (the demo's 32 samples x 8 queries); the share of
    the codes that fresh vectors from where the clusters ended up use."""
    torch.manual_seed(seed)
    quantizer = build_quantizer(quantizer_config, codes, dim).train()
    centres = torch.randn(codes, dim)
    velocity = 0.05 * torch.randn(codes, dim)
    for _ in range(steps):
        centres = centres + velocity
        quantizer(centres[torch.randint(0, codes, (256,))] + 0.1 * torch.randn(256, dim))
    with torch.no_grad():
        fresh = centres[torch.randint(0, codes, (4096,))] + 0.1 * torch.randn(4096, dim)
        return quantizer.eval()(fresh).indices.unique().numel() / codes


def test_the_joint_quantizers_faster_ema_keeps_up_with_drifting_latents():
    """EMA codes averaging ~100 steps (decay 0.99) sit where drifting latents were, so fewer of
    them are used where the latents are (0.88-0.91 here against 0.98 at the default 0.95; in
    the demo's training 0.86 against 1.0 on seed 0, BENCHMARKS.md)."""
    slow = dataclasses.replace(JOINT_QUANTIZER, decay=0.99)
    default = [_usage_after_drift(JOINT_QUANTIZER, seed) for seed in range(3)]
    before = [_usage_after_drift(slow, seed) for seed in range(3)]
    print(f"decay {JOINT_QUANTIZER.decay}: {default}\ndecay 0.99: {before}")
    assert min(default) > 0.95 and np.mean(default) > np.mean(before) + 0.05
