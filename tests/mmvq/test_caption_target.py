"""The caption's hashed n-gram bag, and fusion's caption loss that predicts it."""

import pytest
import torch

from mmvq.caption_target import caption_bag
from mmvq.config import ConfigError, FusionConfig
from mmvq.fusion import Fusion

WIDE = 1 << 20  # buckets: collisions among a few n-grams are then vanishingly unlikely


def test_the_bag_holds_every_real_ngram_and_nothing_after_the_length():
    ids = torch.tensor([[10, 11, 12, 13, 256, 256], [10, 11, 12, 13, 99, 98]])
    lengths = torch.tensor([4, 4])
    bag = caption_bag(ids, lengths, ngrams=3, buckets=WIDE)
    assert bag.sum(dim=1).tolist() == [4 + 3 + 2, 4 + 3 + 2]  # unigrams, bigrams, trigrams
    assert torch.equal(bag[0], bag[1])  # what follows the length is not the caption
    longer = caption_bag(ids, torch.tensor([4, 6]), ngrams=3, buckets=WIDE)
    assert longer[1].sum() == 6 + 5 + 4 and not torch.equal(longer[0], longer[1])


def test_bigrams_tell_which_colour_goes_with_which_shape():
    red, blue, circle, square = 1, 2, 3, 4
    ids = torch.tensor([[red, circle, blue, square], [blue, circle, red, square]])
    lengths = torch.tensor([4, 4])
    words = caption_bag(ids, lengths, ngrams=1, buckets=WIDE)
    assert torch.equal(words[0], words[1])  # the same bag of words
    pairs = caption_bag(ids, lengths, ngrams=2, buckets=WIDE)
    assert not torch.equal(pairs[0], pairs[1])


def test_ngrams_outside_one_to_three_are_refused():
    with pytest.raises(ValueError, match="ngrams"):
        caption_bag(torch.zeros(1, 4, dtype=torch.long), torch.tensor([4]), 4, 16)


DIMS = {"image": 16, "audio": 12, "text": 8}
CONFIG = FusionConfig(enabled=True, dim=32, num_layers=1, num_heads=4, num_queries=4,
                      codebook_size=32, embed_dim=16, caption_ngrams=3, caption_buckets=64)


def _inputs(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = {m: torch.randn(batch, 5, d, generator=g) for m, d in DIMS.items()}
    present = {m: torch.ones(batch, dtype=torch.bool) for m in DIMS}
    caption = (torch.rand(batch, CONFIG.caption_buckets, generator=g) < 0.1).float()
    return latents, present, caption


def test_the_caption_loss_skips_samples_without_text_and_reaches_every_modality():
    torch.manual_seed(0)
    fusion = Fusion(CONFIG, DIMS).eval()
    latents, present, caption = _inputs(6)
    present["text"][2] = False
    loss = fusion(latents, present, caption).losses["align/caption"]
    changed = caption.clone()
    changed[2] = 1 - changed[2]  # another "caption" where the sample has none
    assert torch.allclose(fusion(latents, present, changed).losses["align/caption"], loss)
    changed[0] = 1 - changed[0]
    assert not torch.allclose(fusion(latents, present, changed).losses["align/caption"], loss)
    with torch.no_grad():  # no caption given: no loss
        assert float(fusion(latents, present).losses["align/caption"]) == 0.0
    leaves = {m: x.requires_grad_() for m, x in latents.items()}
    grads = torch.autograd.grad(fusion(leaves, present, caption).losses["align/caption"],
                                list(leaves.values()))
    assert all(g.abs().sum() > 0 for g in grads)  # each modality's tokens are asked for it


def test_only_the_captioned_modalities_get_a_head_and_a_gradient():
    import dataclasses

    torch.manual_seed(0)
    fusion = Fusion(dataclasses.replace(CONFIG, caption_modalities=("audio",)), DIMS).eval()
    assert list(fusion.caption) == ["audio"]
    latents, present, caption = _inputs(6)
    leaves = {m: x.requires_grad_() for m, x in latents.items()}
    loss = fusion(leaves, present, caption).losses["align/caption"]
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)))
    assert grads["audio"].abs().sum() > 0
    assert all(grads[m] is None or grads[m].abs().sum() == 0 for m in ("image", "text"))
    with pytest.raises(ConfigError, match="caption_modalities"):
        dataclasses.replace(CONFIG, caption_modalities=("video",))


def test_the_caption_head_learns_to_read_a_caption_from_an_image():
    """Separable data: each of 8 classes has its own caption bag and its own image latents. After
    training on the caption loss alone, the image's predicted bag matches its caption's."""
    torch.manual_seed(0)
    classes = torch.arange(64) % 8
    bags = (torch.rand(8, CONFIG.caption_buckets) < 0.15).float()
    proto = {m: torch.randn(8, 5, d) for m, d in DIMS.items()}
    latents = {m: proto[m][classes] + 0.3 * torch.randn(64, 5, d) for m, d in DIMS.items()}
    present = {m: torch.ones(64, dtype=torch.bool) for m in DIMS}
    fusion = Fusion(CONFIG, DIMS)

    def f1() -> float:
        with torch.no_grad():
            pooled = fusion.pool_latents("image", latents["image"])
            guess = (fusion.caption["image"](pooled) > 0).float()
        target = bags[classes]
        hits = (guess * target).sum()
        return float(2 * hits / (guess.sum() + target.sum()))

    before = f1()
    optimizer = torch.optim.Adam(fusion.parameters(), lr=3e-3)
    for _ in range(100):
        loss = fusion(latents, present, bags[classes]).losses["align/caption"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert before < 0.4 and f1() > 0.95


def test_a_caption_weight_without_a_caption_head_is_refused():
    import dataclasses

    from mmvq import TokenizerConfig

    fusion = FusionConfig(enabled=True)  # caption_ngrams 0 by default
    with pytest.raises(ConfigError, match="align/caption is 3 but fusion.caption_ngrams is 0"):
        TokenizerConfig(fusion=fusion, loss_weights={"align/caption": 3.0})
    TokenizerConfig(fusion=dataclasses.replace(fusion, caption_ngrams=3),
                    loss_weights={"align/caption": 3.0})  # with its head it is fine


def test_a_version_5_fusion_checkpoint_loads_without_a_caption_head(make_batch, tmp_path):
    """Format 5 had no caption head; its config loads with caption_ngrams 0, so its weights fit
    and its joint tokens stay the same."""
    import dataclasses
    import json

    from mmvq import MultimodalTokenizer, TokenizerConfig, to_model_inputs

    torch.manual_seed(0)
    fusion = FusionConfig(enabled=True, dim=32, num_layers=1, num_heads=4, num_queries=4,
                          codebook_size=32, caption_ngrams=0)
    old = MultimodalTokenizer(dataclasses.replace(TokenizerConfig(), fusion=fusion)).eval()
    assert not any(name.startswith("fusion.caption.") for name in old.state_dict())
    old.save(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    del meta["config"]["fusion"]["caption_ngrams"]  # as version 5 wrote it
    meta["format_version"] = 5
    (tmp_path / "config.json").write_text(json.dumps(meta))
    loaded = MultimodalTokenizer.load(tmp_path)
    assert loaded.config.fusion.caption_ngrams == 0
    inputs = to_model_inputs(make_batch(4, seed=0))
    assert torch.equal(loaded.encode(inputs)["joint"], old.encode(inputs)["joint"])
