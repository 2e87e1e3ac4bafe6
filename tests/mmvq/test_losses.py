import math

import torch

from mmvq import losses as L


def test_masked_mean_and_l1_skip_masked_samples():
    values = torch.tensor([1.0, 100.0, 3.0])
    mask = torch.tensor([True, False, True])
    assert L.masked_mean(values, mask).item() == 2.0
    assert L.masked_mean(values, torch.zeros(3, dtype=torch.bool)).item() == 0.0
    x = torch.zeros(3, 2, 2)
    y = torch.stack([torch.full((2, 2), 1.0), torch.full((2, 2), 50.0), torch.full((2, 2), 3.0)])
    assert L.masked_l1(x, y, mask).item() == 2.0


def test_masked_cross_entropy_by_hand():
    # Two classes, uniform logits: CE = log 2 on every counted position.
    logits = torch.zeros(2, 3, 2)
    logits[1, 2] = torch.tensor([100.0, -100.0])  # padding of sample 1: would add ~200 if counted
    targets = torch.tensor([[0, 1, 0], [0, 0, 1]])
    ce = L.masked_cross_entropy(logits, targets, torch.tensor([3, 2]), torch.tensor([True, True]))
    assert ce.item() == torch.tensor(math.log(2)).item()
    ce0 = L.masked_cross_entropy(logits, targets, torch.tensor([3, 2]), torch.tensor([False] * 2))
    assert ce0.item() == 0.0


def test_mel_filters_are_built_once_per_rate_and_size():
    dev = torch.device("cpu")
    a = L.mel_filters(8000, 128, dev)
    assert L.mel_filters(8000, 128, dev) is a
    assert L.mel_filters(8000, 512, dev) is not a
    window, fbank = a
    assert window.shape == (128,) and fbank.shape == (65, 16)
    assert (fbank.sum(dim=0) > 0).all()  # no empty mel band at this resolution


def test_log_mel_distance_is_zero_on_identical_input_and_differentiable_in_est():
    t = torch.arange(4000) / 8000
    ref = torch.sin(2 * math.pi * 440 * t)[None].repeat(2, 1)
    est = (ref + 0.1 * torch.randn_like(ref)).requires_grad_(True)
    assert (L.log_mel_distance(ref, ref, 8000, (128, 512)) == 0).all()
    d = L.log_mel_distance(ref, est, 8000, (128, 512))
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert est.grad is not None and torch.isfinite(est.grad).all() and est.grad.abs().sum() > 0
