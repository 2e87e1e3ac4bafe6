import math

import numpy as np
import pytest
import torch

from mmvq.metrics import (
    code_histogram,
    codebook_perplexity,
    codebook_usage,
    exact_match,
    mel_distance,
    psnr,
    si_snr,
    token_accuracy,
)


def test_psnr_of_a_known_mse():
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[0] += 0.1  # MSE 0.01 -> 10 log10(2^2 / 0.01) = 26.0206 dB
    y[1, :, :2] += 0.2  # half the pixels off by 0.2: MSE 0.02 -> 23.0103 dB
    torch.testing.assert_close(psnr(x, y), torch.tensor([26.0206, 23.0103]), atol=1e-3, rtol=0)
    assert psnr(x, y, data_range=1.0)[0].item() == pytest.approx(20.0, abs=1e-3)
    assert psnr(x, x).isinf().all()


def test_si_snr_of_a_known_mixture():
    n = torch.arange(8000)
    ref = torch.sin(2 * math.pi * 5 * n / 8000)[None]  # whole periods: zero mean
    noise = 0.1 * torch.sin(2 * math.pi * 17 * n / 8000)[None]  # orthogonal to ref
    assert si_snr(ref, ref + noise).item() == pytest.approx(20.0, abs=1e-3)  # 10 log10(1/0.01)
    assert si_snr(ref, 3.0 * ref + noise * 3.0).item() == pytest.approx(20.0, abs=1e-3)


def test_si_snr_of_a_scaled_copy_is_huge_and_of_noise_is_low():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 4000, generator=g)
    assert (si_snr(ref, 0.5 * ref) > 60).all()
    assert (si_snr(ref, torch.randn(3, 4000, generator=g)) < -15).all()


def test_si_snr_ignores_samples_after_length():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 1000, generator=g)
    est = ref.clone()
    est[:, 600:] = torch.randn(2, 400, generator=g) * 10  # garbage only in the padding
    lengths = torch.tensor([600, 1000])
    scores = si_snr(ref, est, lengths)
    assert scores[0] > 60 and scores[1] < 0


def test_mel_distance_is_zero_for_identical_and_grows_with_error():
    t = torch.arange(8000) / 8000
    ref = torch.stack([torch.sin(2 * math.pi * 440 * t), torch.sin(2 * math.pi * 300 * t)])
    same = mel_distance(ref, ref.clone(), 8000)
    assert same.shape == (2,) and (same == 0).all()
    near = mel_distance(ref, ref + 0.01 * torch.randn_like(ref), 8000)
    far = mel_distance(ref, ref + 0.3 * torch.randn_like(ref), 8000)
    assert (near > 0).all() and (far > near).all()


def test_token_accuracy_and_exact_match_by_hand():
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]])
    pred = torch.tensor([[1, 2, 0, 4], [5, 6, 0, 0], [0, 0, 0, 0]])
    lengths = torch.tensor([4, 2, 0])
    torch.testing.assert_close(token_accuracy(ids, pred, lengths), torch.tensor([0.75, 1.0, 1.0]))
    assert exact_match(ids, pred, lengths).tolist() == [False, True, True]


def test_codebook_statistics_by_hand():
    idx = torch.tensor([[0, 1], [1, 3]])
    np.testing.assert_array_equal(code_histogram(idx, 4), [1, 2, 0, 1])
    assert codebook_usage(idx, 4) == 0.75
    assert codebook_usage(np.array([2, 2, 2]), 8) == 0.125
    assert codebook_perplexity(torch.arange(4), 4) == pytest.approx(4.0)
    assert codebook_perplexity(torch.zeros(10, dtype=torch.long), 4) == pytest.approx(1.0)
    assert codebook_perplexity(torch.tensor([0, 0, 1, 1]), 4) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="outside"):
        code_histogram(torch.tensor([4]), 4)


def test_per_sample_metrics_accept_an_empty_batch():
    # Evaluate masks samples by has_*; a batch may hold no sample of a modality.
    wav, ids = torch.zeros(0, 8000), torch.zeros(0, 5, dtype=torch.long)
    none = torch.zeros(0, dtype=torch.long)
    assert mel_distance(wav, wav, 8000).shape == (0,)
    assert si_snr(wav, wav, none).shape == (0,)
    assert psnr(torch.zeros(0, 3, 4, 4), torch.zeros(0, 3, 4, 4)).shape == (0,)
    assert token_accuracy(ids, ids, none).shape == (0,) and exact_match(ids, ids, none).shape == (
        0,
    )
    assert codebook_usage(torch.zeros(0, dtype=torch.long), 4) == 0.0
    assert codebook_perplexity(torch.zeros(0, dtype=torch.long), 4) == 0.0
