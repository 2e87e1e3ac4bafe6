"""Fusion: joint tokens from any subset of modalities; contrastive alignment that learns."""

import dataclasses
import math

import pytest
import torch

from mmvq import metrics as M
from mmvq.config import FusionConfig
from mmvq.fusion import Fusion

DIMS = {"image": 16, "audio": 12, "text": 8}
CONFIG = FusionConfig(
    enabled=True, dim=32, num_layers=1, num_heads=4, num_queries=4, codebook_size=32, embed_dim=16
)


def _latents(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(batch, 6, 16, generator=g),
        "audio": torch.randn(batch, 5, 12, generator=g),
        "text": torch.randn(batch, 7, 8, generator=g),
    }


def _present(batch: int, **absent) -> dict[str, torch.Tensor]:
    present = {m: torch.ones(batch, dtype=torch.bool) for m in DIMS}
    for m, rows in absent.items():
        present[m][rows] = False
    return present


def test_shapes_ranges_and_unit_embeddings():
    torch.manual_seed(0)
    fusion = Fusion(CONFIG, DIMS).eval()
    out = fusion(_latents(5), _present(5))
    assert out.indices.shape == (5, 4) and out.quantized.shape == (5, 4, 32)
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < 32
    for emb in out.embeddings.values():
        assert torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert set(out.losses) == {"fusion/commit", "fusion/codebook", "fusion/recon",
                               "fusion/diversity", "align/infonce", "align/caption"}


def test_absent_modality_does_not_influence_joint_tokens():
    torch.manual_seed(0)
    fusion = Fusion(CONFIG, DIMS).eval()
    latents, present = _latents(4), _present(4, image=[1])
    before = fusion(latents, present)
    latents["image"][1] = torch.randn(6, 16) * 10  # garbage where the sample has no image
    after = fusion(latents, present)
    assert torch.allclose(before.quantized[1], after.quantized[1], atol=1e-5)
    assert torch.equal(before.indices[1], after.indices[1])
    assert not torch.allclose(
        before.quantized[0], fusion(_latents(4, seed=3), present).quantized[0]
    )  # present modalities do matter


def test_only_alignment_reaches_the_modality_latents():
    """The joint tokens' losses train fusion alone; InfoNCE's gradient reaches the latents."""
    torch.manual_seed(0)
    fusion = Fusion(CONFIG, DIMS).train()
    latents = {m: x.requires_grad_() for m, x in _latents(6).items()}
    losses = fusion(latents, _present(6)).losses
    for name in ("fusion/commit", "fusion/recon"):
        grads = torch.autograd.grad(losses[name], list(latents.values()), allow_unused=True,
                                    retain_graph=True)
        assert all(g is None or not g.any() for g in grads), name
    grads = torch.autograd.grad(losses["align/infonce"], list(latents.values()))
    assert all(g.abs().sum() > 0 for g in grads)


def test_modality_dropout_keeps_one_modality_per_sample():
    torch.manual_seed(0)
    fusion = Fusion(FusionConfig(modality_dropout=0.9, dim=32, num_heads=4), DIMS).train()
    present = _present(256, audio=list(range(0, 256, 2)))
    visible = fusion._drop_modalities(present)
    stacked = torch.stack([visible[m] for m in DIMS], dim=1)
    assert stacked.any(dim=1).all()  # nobody left with nothing
    assert not (visible["audio"] & ~present["audio"]).any()  # never invents a modality
    assert stacked.float().mean() < 0.5  # and it does drop a lot at p = 0.9


def test_contrastive_alignment_learns_retrieval():
    torch.manual_seed(0)
    classes = torch.randint(0, 16, (64,))
    proto = {m: torch.randn(16, 4, d) for m, d in DIMS.items()}  # per class, per modality
    latents = {m: proto[m][classes] + 0.3 * torch.randn(64, 4, d) for m, d in DIMS.items()}
    present = _present(64)
    fusion = Fusion(CONFIG, DIMS)
    start = M.retrieval_recall(
        *(fusion.eval()(latents, present).embeddings[m] for m in ("image", "text")), ks=(5,)
    )[5]
    optimizer = torch.optim.Adam(fusion.parameters(), lr=3e-3)
    fusion.train()
    for _ in range(60):
        loss = fusion(latents, present).losses["align/infonce"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = fusion.eval()(latents, present)
    end = M.retrieval_recall(out.embeddings["image"], out.embeddings["text"], ks=(1, 5))
    # 16 classes of 4 near-duplicates: R@5 can reach 1, R@1 about 1/4 at best by class alone.
    assert end[5] > 0.9 and end[5] > start + 0.3


def test_tokenizer_with_fusion_gives_joint_tokens_that_survive_save_load(make_batch, tmp_path):
    import dataclasses

    from mmvq import MultimodalTokenizer, TokenizerConfig, to_model_inputs
    from mmvq.train_step import build_optimizer, generator_step

    config = dataclasses.replace(TokenizerConfig(), fusion=FusionConfig(
        enabled=True, dim=32, num_layers=1, num_heads=4, num_queries=4, codebook_size=32))
    model = MultimodalTokenizer(config)
    batch = make_batch(4, seed=0)
    batch["has_audio"][1] = False  # a sample without audio still gets joint tokens
    inputs = to_model_inputs(batch)
    out = model(inputs)
    assert out.indices["joint"].shape == (4, 4)
    assert {"fusion/commit", "fusion/codebook", "fusion/recon", "align/infonce"} <= set(out.losses)
    assert model.codebook_sizes()["joint"] == 32 and model.token_shapes()["joint"] == (4,)
    stats = generator_step(model, inputs, build_optimizer(model))
    assert stats["align/infonce"] > 0
    model.eval()
    tokens = model.encode(inputs)
    model.save(tmp_path / "tok")
    loaded = MultimodalTokenizer.load(tmp_path / "tok")
    again = loaded.encode(inputs)
    assert all(torch.equal(tokens[k], again[k]) for k in ("image", "audio", "text", "joint"))
    decoded = loaded.decode(tokens)  # joint tokens are accepted and not decoded
    assert set(decoded) == {"image", "audio", "text_ids"}
    assert loaded.embed(inputs)["image"].shape == (4, 64)


def test_a_version_3_fusion_checkpoint_loads_without_pooling(make_batch, tmp_path):
    """Version 3 had no max_tokens_per_modality and fused every latent; loading one must not
    give it today's default pooling (its joint tokens would change under the same weights)."""
    import dataclasses
    import json

    from mmvq import MultimodalTokenizer, TokenizerConfig, to_model_inputs

    torch.manual_seed(0)
    fusion = FusionConfig(enabled=True, dim=32, num_layers=1, num_heads=4, num_queries=4,
                          codebook_size=32, max_tokens_per_modality=None)
    old = MultimodalTokenizer(dataclasses.replace(TokenizerConfig(), fusion=fusion)).eval()
    old.save(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    del meta["config"]["fusion"]["max_tokens_per_modality"]  # as version 3 wrote it
    meta["format_version"] = 3
    (tmp_path / "config.json").write_text(json.dumps(meta))
    loaded = MultimodalTokenizer.load(tmp_path)
    assert loaded.config.fusion.max_tokens_per_modality is None
    inputs = to_model_inputs(make_batch(4, seed=0))
    assert torch.equal(loaded.encode(inputs)["joint"], old.encode(inputs)["joint"])
    pooled = dataclasses.replace(loaded.config.fusion, max_tokens_per_modality=8)
    pooled_model = MultimodalTokenizer(dataclasses.replace(loaded.config, fusion=pooled)).eval()
    pooled_model.load_state_dict(old.state_dict())
    assert not torch.equal(pooled_model.encode(inputs)["joint"], old.encode(inputs)["joint"])


def test_a_version_4_fusion_checkpoint_loads_with_mean_pooled_embeddings(make_batch, tmp_path):
    """Version 4 embedded each modality from the plain mean of its latents; loading one gives it
    that pooling (its weights have no per-position MLP), and its embeddings stay the same."""
    import dataclasses
    import json

    from mmvq import MultimodalTokenizer, TokenizerConfig, to_model_inputs

    torch.manual_seed(0)
    fusion = FusionConfig(enabled=True, dim=32, num_layers=1, num_heads=4, num_queries=4,
                          codebook_size=32, embedding_pool="mean")
    old = MultimodalTokenizer(dataclasses.replace(TokenizerConfig(), fusion=fusion)).eval()
    assert not any(name.startswith("fusion.pool.") for name in old.state_dict())
    old.save(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    del meta["config"]["fusion"]["embedding_pool"]  # as version 4 wrote it
    meta["format_version"] = 4
    (tmp_path / "config.json").write_text(json.dumps(meta))
    loaded = MultimodalTokenizer.load(tmp_path)
    assert loaded.config.fusion.embedding_pool == "mean"
    inputs = to_model_inputs(make_batch(4, seed=0))
    for m, emb in old.embed(inputs).items():
        assert torch.allclose(loaded.embed(inputs)[m], emb), m
    assert FusionConfig().embedding_pool == "position_mlp"  # today's default, for new models


def test_a_checkpoint_with_position_free_pooling_loads_and_embeds_as_before(make_batch,
                                                                           tmp_path):
    """Format-5 checkpoints saved before positions were pooled say embedding_pool "mlp" and
    have no per-position bias; they load with that pooling and give the same embeddings."""
    import dataclasses

    from mmvq import MultimodalTokenizer, TokenizerConfig, to_model_inputs

    torch.manual_seed(0)
    fusion = FusionConfig(enabled=True, dim=32, num_layers=1, num_heads=4, num_queries=4,
                          codebook_size=32, embedding_pool="mlp")
    old = MultimodalTokenizer(dataclasses.replace(TokenizerConfig(), fusion=fusion)).eval()
    assert not any(name.endswith(".position") for name in old.state_dict())
    old.save(tmp_path)
    loaded = MultimodalTokenizer.load(tmp_path)
    assert loaded.config.fusion.embedding_pool == "mlp"
    inputs = to_model_inputs(make_batch(4, seed=0))
    for m, emb in old.embed(inputs).items():
        assert torch.allclose(loaded.embed(inputs)[m], emb), m


def test_position_pooling_tells_a_sequence_from_its_reverse():
    from mmvq.pooling import PositionMLP

    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    reverse = x.flip(1)
    plain, positional = PositionMLP(8, 16, positional=False), PositionMLP(8, 16, positional=True)
    assert torch.allclose(plain(x), plain(reverse), atol=1e-6)  # a bag forgets the order
    with torch.no_grad():
        positional[0].load_state_dict(plain[0].state_dict())
        positional[2].load_state_dict(plain[2].state_dict())
        assert torch.allclose(positional(x), plain(x))  # zero biases: the plain MLP
        positional.position.normal_()
    assert not torch.allclose(positional(x), positional(reverse), atol=1e-3)
    assert positional(torch.randn(2, 64, 8)).shape == (2, 16)  # any length: relative buckets


def test_position_pooling_is_the_mean_of_the_whole_mlp_at_every_position():
    """The second layer runs once on the mean, not at every position: the same vector as the
    MLP applied per position and averaged, which is what checkpoints were trained as."""
    from mmvq.pooling import POSITION_BUCKETS, PositionMLP

    torch.manual_seed(0)
    pool = PositionMLP(8, 16, positional=True)
    with torch.no_grad():
        pool.position.normal_()
    x = torch.randn(3, 40, 8)
    buckets = torch.arange(40) * POSITION_BUCKETS // 40
    per_position = pool[2](pool[1](pool[0](x) + pool.position[buckets]))  # (3, 40, 16)
    assert torch.allclose(pool(x), per_position.mean(dim=1), atol=1e-6)


def test_diversity_loss_is_zero_when_spread_and_log_k_when_collapsed():
    torch.manual_seed(0)
    fusion = Fusion(CONFIG, DIMS)
    codes = fusion.quantizer.codes().detach()  # (32, d) unit codes
    project = fusion.quantizer.project_in
    # Latents whose code-space images are the codes themselves, each once: an even spread at a
    # low temperature. Solve the (factorised) projection back for them by least squares.
    weight, bias = project.weight.detach(), project.bias.detach()
    spread = torch.linalg.lstsq(weight, (codes * 50 - bias).T).solution.T  # (32, dim)
    sharp = Fusion(dataclasses.replace(CONFIG, diversity_temperature=1e-3), DIMS)
    sharp.load_state_dict(fusion.state_dict())
    with torch.no_grad():
        assert float(sharp.diversity_loss(spread)) < 0.05
        collapsed = spread[:1].expand(64, -1)
        assert float(sharp.diversity_loss(collapsed)) == pytest.approx(math.log(32), abs=0.05)
    loss = fusion.diversity_loss(torch.randn(16, CONFIG.dim, requires_grad=True))
    loss.backward()  # reaches the latents, not the codes
    assert 0 < loss.item() < math.log(32)
