"""The shared reconstruction scorer: exact scores, exact codebook counts, the documented keys."""

import math

import numpy as np
import pytest
import torch

from mmvq import MultimodalTokenizer, TokenizerConfig, to_model_inputs
from mmvq.metrics import normalized_mutual_information as M_nmi
from mmvq.modalities.image import to_uint8
from mmvq.scoring import ReconstructionScores, codebook_stats
from mmvq.train_step import code_stats

SIZES = {"image": 8, "audio": 4, "text": 16}
RATE = TokenizerConfig().audio.sample_rate
PER_SAMPLE = {"image/psnr", "image/psnr_flat", "image/ssim", "audio/si_snr", "audio/mel_distance",
              "text/token_accuracy", "text/exact_match"}
CODEBOOK = {f"{m}/codebook_{s}" for m in SIZES for s in ("usage", "perplexity")}
CROSS = {"cross/nmi_image_audio", "cross/nmi_image_text", "cross/nmi_audio_text"}


@pytest.fixture
def inputs(make_batch):
    """Four samples; the last one has no image."""
    batch = make_batch(4, seed=3)
    batch["has_image"][3] = False
    return to_model_inputs(batch)


def _codes(audio_levels: int | None = None) -> dict[str, torch.Tensor]:
    """Known codes: sample i's image grid is all i (sample 3's, 7, belongs to no image)."""
    image = torch.tensor([0, 1, 2, 7]).view(4, 1, 1).expand(4, 2, 2).clone()  # (B, h, w)
    audio = torch.tensor([[0, 1, 0, 1]] * 4)  # (B, frames): codes 0 and 1, 8 of each
    if audio_levels:  # residual: level 0 as above, level k uses the codes (frame + k) % 4
        frames = torch.arange(4)
        audio = torch.stack([audio] + [((frames + k) % 4).expand(4, 4)
                                       for k in range(1, audio_levels)], dim=-1)
    text = torch.tensor([[3] * 6] * 4)  # (B, L): one code
    return {"image": image, "audio": audio, "text": text}


def _perfect(inputs) -> dict[str, torch.Tensor]:
    return {"image": inputs.image, "audio": inputs.audio, "text_ids": inputs.text_ids}


def test_perfect_reconstruction_gives_max_scores_and_exact_usage(inputs):
    scores = ReconstructionScores(SIZES, RATE)
    scores.add(inputs, _perfect(inputs), _codes())
    summary = scores.summary()
    assert set(summary) == PER_SAMPLE | CODEBOOK | CROSS | {"samples"}
    assert math.isinf(summary["image/psnr"]) and summary["image/psnr"] > 0
    assert summary["image/ssim"] == pytest.approx(1.0)
    assert summary["audio/si_snr"] > 60
    assert summary["audio/mel_distance"] == pytest.approx(0.0, abs=1e-6)
    assert summary["text/token_accuracy"] == 1.0 and summary["text/exact_match"] == 1.0
    assert summary["samples"] == 3.0  # the samples with an image
    # Image codes 0, 1, 2 on 4 positions each; sample 3's 7 is not an image's code.
    assert summary["image/codebook_usage"] == 3 / 8
    assert summary["image/codebook_perplexity"] == pytest.approx(3.0)
    assert summary["audio/codebook_usage"] == 2 / 4
    assert summary["audio/codebook_perplexity"] == pytest.approx(2.0)
    assert summary["text/codebook_usage"] == 1 / 16
    assert summary["text/codebook_perplexity"] == pytest.approx(1.0)
    counts = scores.code_counts()
    assert counts["image"].tolist() == [4, 4, 4, 0, 0, 0, 0, 0]
    assert counts["audio"].tolist() == [8, 8, 0, 0]
    assert counts["text"][3] == 24 and counts["text"].sum() == 24


def test_scores_average_per_sample_over_batches(inputs):
    scores = ReconstructionScores(SIZES, RATE)
    wrong = inputs.text_ids.clone()
    wrong[0, 0] = (wrong[0, 0] + 1) % 256  # one token of sample 0 (its text is not empty)
    noisy = inputs.image + 0.1 * torch.randn_like(inputs.image)
    scores.add(inputs, {**_perfect(inputs), "text_ids": wrong, "image": noisy}, _codes())
    scores.add(inputs, _perfect(inputs), _codes())
    summary = scores.summary()
    assert summary["text/exact_match"] == 7 / 8  # 8 samples, one wrong
    length = int(inputs.text_len[0])
    assert summary["text/token_accuracy"] == pytest.approx((7 + (length - 1) / length) / 8)
    assert math.isinf(summary["image/psnr"])  # the perfect batch's inf dominates the mean
    noisy_only = ReconstructionScores(SIZES, RATE)
    noisy_only.add(inputs, {**_perfect(inputs), "image": noisy}, _codes())
    assert 15 < noisy_only.summary()["image/psnr"] < 30  # noise 0.1 in [-1, 1]: about 26 dB
    assert summary["samples"] == 6.0


def test_residual_audio_scores_level_zero_and_every_level(inputs):
    scores = ReconstructionScores(SIZES, RATE)
    scores.add(inputs, _perfect(inputs), _codes(audio_levels=3))
    summary = scores.summary()
    levels = {f"audio/codebook_{s}_level{k}" for s in ("usage", "perplexity") for k in range(3)}
    assert set(summary) == PER_SAMPLE | CODEBOOK | CROSS | levels | {"samples"}
    # The plain keys mean level 0, the codebook every bitrate shares, as for one-level audio.
    assert summary["audio/codebook_usage"] == summary["audio/codebook_usage_level0"] == 2 / 4
    assert summary["audio/codebook_usage_level1"] == 4 / 4  # (frame + 1) % 4: every code
    assert summary["audio/codebook_perplexity_level2"] == pytest.approx(4.0)


def test_joint_codes_count_every_sample_and_losses_get_the_loss_prefix(inputs):
    sizes = {**SIZES, "joint": 4}
    scores = ReconstructionScores(sizes, RATE)
    codes = {**_codes(), "joint": torch.tensor([[0], [1], [2], [3]])}  # (B, num_queries)
    scores.add(inputs, _perfect(inputs), codes)
    scores.add_losses({"total": torch.tensor(2.0), "image/l1": torch.tensor(0.5)})
    scores.add_losses({"total": torch.tensor(4.0), "image/l1": torch.tensor(0.5)})
    summary = scores.summary()
    assert summary["joint/codebook_usage"] == 1.0  # sample 3, without an image, counts too
    assert summary["loss/total"] == 3.0 and summary["loss/image/l1"] == 0.5


def test_an_empty_scorer_reports_zero_usage():
    summary = ReconstructionScores(SIZES, RATE).summary()
    assert summary == {**dict.fromkeys(CODEBOOK, 0.0), "samples": 0.0}


def test_train_step_statistics_are_the_scorers_numbers(make_batch):
    model = MultimodalTokenizer(TokenizerConfig()).eval()
    batch = make_batch(3, seed=1)
    batch["has_audio"][1] = False
    inputs = to_model_inputs(batch)
    with torch.no_grad():
        out = model(inputs)
    stats = code_stats(model, out, inputs)
    scores = ReconstructionScores(model.codebook_sizes(), RATE)
    recon = out.reconstructions
    scores.add(inputs, {"image": recon["image"], "audio": recon["audio"],
                        "text_ids": recon["text_logits"].argmax(-1)}, out.indices)
    summary = scores.summary()
    assert set(stats) == {f"{m}/codebook_{s}" for m in ("image", "audio", "text")
                          for s in ("usage", "perplexity")}
    assert stats == {k: summary[k] for k in stats}


def test_codebook_stats_reject_codes_outside_the_codebook():
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        codebook_stats({"image": torch.tensor([0, 4])}, {"image": 4})


def test_to_uint8_inverts_the_model_input_scaling(make_batch):
    batch = make_batch(2, seed=0)
    inputs = to_model_inputs(batch)
    assert to_uint8(inputs.image).dtype == np.uint8
    assert np.array_equal(to_uint8(inputs.image), batch["image"])  # (B, H, W, 3)
    assert np.array_equal(to_uint8(inputs.image[0]), batch["image"][0])  # (H, W, 3)
    out_of_range = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0]).view(1, 1, 5).expand(3, 1, 5)
    assert to_uint8(out_of_range)[0].tolist() == [[0] * 3, [0] * 3, [128] * 3, [255] * 3,
                                                  [255] * 3]


def test_retrieval_counts_a_sample_with_the_same_caption_as_a_hit(make_batch):
    batch = make_batch(4, seed=3)
    batch["text_ids"][1] = batch["text_ids"][0]  # samples 0 and 1: one caption
    batch["text_len"][1] = batch["text_len"][0]
    inputs = to_model_inputs(batch)
    # Image i is closest to text 1 - i for the first pair (a duplicate, so still a hit) and to
    # itself for the others.
    image = torch.eye(4)
    text = torch.eye(4)[[1, 0, 2, 3]]
    scores = ReconstructionScores(SIZES, RATE)
    scores.add(inputs, _perfect(inputs), _codes(), {"image": image, "audio": image, "text": text})
    summary = scores.summary()
    assert summary["cross/retrieval_image_to_text_r1"] == 1.0
    assert summary["cross/retrieval_image_to_audio_r1"] == 1.0
    assert {"cross/retrieval_image_to_text_r5", "cross/retrieval_image_to_text_r10"} <= set(summary)


def test_nmi_labels_come_from_real_positions_only(inputs):
    """Captions whose padding outnumbers their content: NMI is 1 only if padding is ignored."""
    inputs.has_image[3] = True  # every sample complete, to pair all four
    codes = _codes()
    codes["image"] = torch.tensor([0, 1, 2, 3]).view(4, 1, 1).expand(4, 2, 2).clone()
    inputs.text_len[:] = 2
    codes["text"] = torch.full((4, 6), 9)  # padding code 9 on positions 2..5
    codes["text"][:, :2] = torch.tensor([10, 11, 12, 13])[:, None]
    audio_window = inputs.audio.shape[-1]
    inputs.audio_len[:] = audio_window // 4  # the first of the 4 frames is real
    codes["audio"] = torch.full((4, 4), 2)
    codes["audio"][:, 0] = torch.tensor([0, 1, 3, 0])
    scores = ReconstructionScores(SIZES, RATE)
    scores.add(inputs, _perfect(inputs), codes)
    summary = scores.summary()
    assert summary["cross/nmi_image_text"] == pytest.approx(1.0)
    assert summary["cross/nmi_image_audio"] == pytest.approx(M_nmi([0, 1, 2, 3], [0, 1, 3, 0]))
    assert summary["cross/nmi_audio_text"] == pytest.approx(M_nmi([0, 1, 3, 0], [0, 1, 2, 3]))
