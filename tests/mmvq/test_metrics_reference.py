"""mmvq's metrics against independent implementations (scikit-image, scikit-learn, numpy)."""

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity
from sklearn.metrics import normalized_mutual_info_score

from mmvq import metrics as M


@pytest.mark.parametrize("seed", [0, 1])
def test_ssim_matches_scikit_image(seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
    ours = M.ssim(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    for i in range(2):
        ref = structural_similarity(x[i], y[i], data_range=2.0, channel_axis=0,
                                    gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False)
        assert ours[i] == pytest.approx(ref, abs=1e-4)
    same = M.ssim(torch.from_numpy(x), torch.from_numpy(x))
    assert torch.allclose(same, torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nmi_matches_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 7, 500)
    b = np.where(rng.random(500) < 0.6, a * 3 % 11, rng.integers(0, 11, 500))
    assert M.normalized_mutual_information(a, b) == pytest.approx(
        normalized_mutual_info_score(a, b), abs=1e-9)
    assert M.normalized_mutual_information(a, a * 5 + 1) == pytest.approx(1.0)


def test_cross_modal_nmi_sees_aligned_codes():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 8, (2000, 5))
    text_aligned = image[:, ::-1] + 100  # a relabelled copy: fully predictive
    text_random = rng.integers(0, 8, (2000, 5))
    assert M.dominant_codes(np.array([[3, 1, 3], [7, 7, 2]])).tolist() == [3, 7]
    assert M.cross_modal_nmi(image, text_aligned) == pytest.approx(1.0)
    assert M.cross_modal_nmi(image, text_random) < 0.02


def test_retrieval_recall_against_brute_force():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(20, 8)).astype(np.float32)
    t = q + rng.normal(0, 1.0, q.shape).astype(np.float32)
    ours = M.retrieval_recall(torch.from_numpy(q), torch.from_numpy(t), ks=(1, 5))
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    order = np.argsort(-(qn @ tn.T), axis=1)
    for k in (1, 5):
        expected = np.mean([i in order[i, :k] for i in range(20)])
        assert ours[k] == pytest.approx(expected)
    perfect = M.retrieval_recall(torch.eye(6), torch.eye(6), ks=(1,))
    assert perfect == {1: 1.0}


def test_retrieval_with_duplicate_groups_against_brute_force():
    # Samples 0-3 share one caption, 4-5 another: any of a group's targets is a hit.
    rng = np.random.default_rng(1)
    groups = np.array([0, 0, 0, 0, 1, 1] + list(range(2, 16)))
    q = rng.normal(size=(20, 8)).astype(np.float32)
    t = q + rng.normal(0, 1.5, q.shape).astype(np.float32)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    order = np.argsort(-(qn @ tn.T), axis=1)
    first_hit = np.array([np.flatnonzero(groups[order[i]] == groups[i])[0] for i in range(20)])
    ranks = M.retrieval_ranks(torch.from_numpy(q), torch.from_numpy(t), groups)
    assert ranks.tolist() == first_hit.tolist()
    ours = M.retrieval_recall(torch.from_numpy(q), torch.from_numpy(t), (1, 5), groups)
    alone = M.retrieval_recall(torch.from_numpy(q), torch.from_numpy(t), (1, 5))
    for k in (1, 5):
        assert ours[k] == pytest.approx(np.mean(first_hit < k))
        assert ours[k] >= alone[k]  # a duplicate can only add hits


def test_chance_recall_matches_random_rankings():
    groups = np.array([0] * 10 + [1] * 3 + list(range(2, 50)))  # 61 targets
    rng = np.random.default_rng(2)
    q = torch.from_numpy(rng.normal(size=(61, 4)).astype(np.float32))
    draws = [M.retrieval_recall(q, torch.from_numpy(rng.normal(size=(61, 4)).astype(np.float32)),
                                (1, 5), groups) for _ in range(3000)]
    for k in (1, 5):
        simulated = np.mean([d[k] for d in draws])
        assert M.chance_recall(groups, k) == pytest.approx(simulated, abs=0.005)
    assert M.chance_recall(np.arange(100), 5) == pytest.approx(0.05)
    assert M.chance_recall(np.zeros(7), 1) == 1.0


def test_a_captions_padding_does_not_decide_its_nmi_label():
    # Content codes equal the image's label; each caption is padded with code 99 to 12
    # positions, and captions of 3 content positions have more padding than content.
    rng = np.random.default_rng(1)
    image = rng.integers(0, 6, (600, 4))
    labels = M.dominant_codes(image)
    lengths = rng.choice([3, 9], 600)
    text = np.full((600, 12), 99)
    real = np.arange(12)[None] < lengths[:, None]
    text[real] = np.repeat(labels, lengths)
    short = lengths == 3
    assert (M.dominant_codes(text)[short] == 99).all()  # padding outvotes the content
    assert M.dominant_codes(text, real).tolist() == labels.tolist()
    assert M.cross_modal_nmi(image, text) < 0.7
    assert M.cross_modal_nmi(image, text, real_b=real) == pytest.approx(1.0)


def test_dominant_codes_of_no_samples_is_empty():
    assert M.dominant_codes(np.zeros((0, 4), np.int64), np.zeros((0, 4), bool)).shape == (0,)
