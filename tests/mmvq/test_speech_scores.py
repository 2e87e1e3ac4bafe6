"""STOI and PESQ of real synthesized speech through the scorer: the reference implementations'
numbers, ordered as a listener would order the clips; and the flat-colour image baseline."""

import math

import numpy as np
import pytest
import torch

from mmvq.batch import ModelInputs
from mmvq.scoring import ReconstructionScores
from mmvq.speech_scores import pesq, speech_scores, stoi
from pipeline.synth.speech import Speaker

RATE = 8000


@pytest.fixture(scope="module")
def speech():
    with Speaker(sample_rate=RATE) as speaker:
        clip = speaker.speak("a small red circle above a blue square", voice="en",
                             rate_wpm=160, pitch=50)
    return np.asarray(clip, np.float32)[: 3 * RATE]


def _inputs(audio: torch.Tensor, image: torch.Tensor) -> ModelInputs:
    n = audio.shape[0]
    return ModelInputs(image=image, audio=audio, audio_len=torch.full((n,), audio.shape[1]),
                       text_ids=torch.zeros(n, 4, dtype=torch.long),
                       text_len=torch.zeros(n, dtype=torch.long),
                       has_image=torch.ones(n, dtype=torch.bool),
                       has_audio=torch.ones(n, dtype=torch.bool),
                       has_text=torch.zeros(n, dtype=torch.bool))


def test_scores_order_clean_noisy_and_garbled_speech(speech):
    rng = np.random.default_rng(0)
    noisy = speech + 0.05 * rng.normal(size=speech.shape).astype(np.float32)
    garbled = rng.permutation(speech)  # the same samples, no speech left
    s_clean, s_noisy, s_garbled = (stoi(speech, x, RATE) for x in (speech, noisy, garbled))
    assert s_clean > 0.99 and s_clean > s_noisy > s_garbled
    p_clean, p_noisy = pesq(speech, speech, RATE), pesq(speech, noisy, RATE)
    assert p_clean > 4.0 and p_clean > p_noisy > 1.0
    # At a rate PESQ does not define, the clips are resampled to 16 kHz (wide-band) first.
    import soxr
    up = soxr.resample(speech, RATE, 22050)
    assert pesq(up, up, 22050) > 4.0


def test_silence_is_left_out_not_scored(speech):
    silent = np.zeros_like(speech)
    assert math.isnan(pesq(silent, silent, RATE))
    scores = speech_scores(np.stack([speech, silent]), np.stack([speech, silent]),
                           np.array([len(speech), len(speech)]), RATE)
    assert len(scores["pesq"]) == 1 and len(scores["stoi"]) == 2


def test_the_scorer_reports_them_and_the_flat_image_baseline(speech):
    rng = np.random.default_rng(1)
    audio = torch.from_numpy(np.stack([speech, speech]))
    recon = audio + 0.05 * torch.from_numpy(rng.normal(size=audio.shape).astype(np.float32))
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    inputs = _inputs(audio, image)
    codes = {"image": torch.zeros(2, 4, 4, dtype=torch.long),
             "audio": torch.zeros(2, 10, dtype=torch.long),
             "text": torch.zeros(2, 4, dtype=torch.long)}
    outputs = {"image": image * 0.9, "audio": recon, "text_ids": torch.zeros(2, 4,
                                                                             dtype=torch.long)}
    scores = ReconstructionScores({"image": 16, "audio": 16, "text": 16}, RATE, speech=True)
    scores.add(inputs, outputs, codes)
    summary = scores.summary()
    assert summary["audio/stoi"] == pytest.approx(stoi(speech, recon[0].numpy(), RATE) / 2
                                                  + stoi(speech, recon[1].numpy(), RATE) / 2)
    assert summary["audio/pesq"] == pytest.approx(np.mean([pesq(speech, r.numpy(), RATE)
                                                           for r in recon]))
    flat = image.mean(dim=(2, 3), keepdim=True).expand_as(image)
    mse = (image - flat).pow(2).flatten(1).mean(1)
    assert summary["image/psnr_flat"] == pytest.approx(float((10 * torch.log10(4 / mse)).mean()))
    assert summary["image/psnr"] > summary["image/psnr_flat"]  # 0.9x the image beats its mean
    # Training's validation does not pay for them.
    quick = ReconstructionScores({"image": 16, "audio": 16, "text": 16}, RATE)
    quick.add(inputs, outputs, codes)
    assert "audio/stoi" not in quick.summary() and "image/psnr_flat" in quick.summary()
