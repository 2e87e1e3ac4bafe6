"""Codebook maintenance of VectorQuantizer: EMA updates, k-means init, dead-code restarts."""

import pytest
import torch
import torch.nn.functional as F

from mmvq.quantizers import VectorQuantizer
from mmvq.quantizers.kmeans import kmeans


def blobs(n: int, centers: torch.Tensor, spread: float = 0.05) -> torch.Tensor:
    """``n`` points around random rows of ``centers`` (C, D)."""
    return centers[torch.randint(len(centers), (n,))] + spread * torch.randn(n, centers.shape[1])


def usage(q: VectorQuantizer, z: torch.Tensor) -> float:
    """Fraction of codes that some row of ``z`` maps to, in eval mode."""
    q.eval()
    used = q(z).indices.unique().numel() / q.codebook_size
    q.train()
    return used


def test_ema_update_follows_the_laplace_smoothed_formula():
    k, d, decay, eps = 8, 4, 0.9, 0.1  # a large eps, so that the smoothing is visible
    q = VectorQuantizer(k, d, l2_normalize=False, ema=True, decay=decay, eps=eps)
    codes0 = q.embed.clone()
    z = torch.randn(50, d)
    mask = torch.rand(50) > 0.3
    indices = q(z, mask).indices
    onehot = F.one_hot(indices, k).float() * mask[:, None]  # (N, K), masked rows count 0
    counts = decay * 1.0 + (1 - decay) * onehot.sum(0)  # counts start at 1
    sums = decay * codes0 + (1 - decay) * onehot.t() @ z  # embed_sum starts at the codes
    smoothed = (counts + eps) / (counts.sum() + k * eps) * counts.sum()
    torch.testing.assert_close(q.cluster_size, counts)
    torch.testing.assert_close(q.embed, sums / smoothed[:, None])


def test_ema_codes_converge_to_their_cluster_means():
    centers = torch.randn(8, 4) * 3
    z = blobs(400, centers)
    q = VectorQuantizer(8, 4, l2_normalize=False, ema=True, decay=0.8)
    with torch.no_grad():  # codes in the data's range, but not at the clusters
        q.embed.copy_(torch.randn(8, 4) * 3)
        q.embed_sum.copy_(q.embed)
    first = q(z).commit_loss.item()
    for _ in range(30):
        last = q(z).commit_loss.item()
    assert last < 0.2 * first
    # Each code in use ends at the mean of the vectors it takes (a k-means fixed point).
    indices = q.eval()(z).indices
    for code in indices.unique():
        torch.testing.assert_close(q.embed[code], z[indices == code].mean(0), atol=1e-2, rtol=0)


def test_step_with_every_vector_masked_leaves_ema_state_unchanged():
    q = VectorQuantizer(8, 4, l2_normalize=False, ema=True, restart_threshold=0.5)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(torch.randn(30, 4), torch.zeros(30, dtype=torch.bool))
    for key, value in q.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_kmeans_lloyd_steps_reach_a_fixed_point_below_the_random_start():
    samples = blobs(600, torch.randn(6, 3) * 5, spread=0.5)

    def objective(centroids):
        return torch.cdist(samples, centroids).min(dim=1).values.pow(2).mean()

    torch.manual_seed(1)
    start = kmeans(samples, num_codes=6, iters=0, cosine=False)  # random rows
    torch.manual_seed(1)
    found = kmeans(samples, num_codes=6, iters=20, cosine=False)
    assert objective(found) < 0.7 * objective(start)
    assign = torch.cdist(samples, found).argmin(dim=1)
    for code in range(6):  # Lloyd's fixed point: every centroid is the mean of its samples
        torch.testing.assert_close(found[code], samples[assign == code].mean(0))


def test_spherical_kmeans_keeps_unit_centroids():
    samples = F.normalize(torch.randn(200, 4), dim=-1)
    found = kmeans(samples, num_codes=5, iters=5, cosine=True)
    torch.testing.assert_close(found.norm(dim=-1), torch.ones(5))


@pytest.mark.parametrize("ema", [False, True])
def test_kmeans_init_puts_codes_on_the_data_once(ema):
    centers = torch.randn(16, 8) * 3
    z = blobs(512, centers)
    plain = VectorQuantizer(16, 8, l2_normalize=False, ema=ema)
    init = VectorQuantizer(16, 8, l2_normalize=False, ema=ema, kmeans_init=True)
    out = init(z)
    assert bool(init.initted)
    assert out.commit_loss < 0.25 * plain(z).commit_loss
    codes = init.codes().clone()
    init(blobs(512, torch.randn(16, 8) * 3))  # other data: no second k-means
    if not ema:
        assert torch.equal(init.codes(), codes)


def test_kmeans_init_waits_for_a_batch_with_vectors():
    q = VectorQuantizer(4, 2, l2_normalize=False, kmeans_init=True)
    q(torch.randn(10, 2), torch.zeros(10, dtype=torch.bool))
    assert not bool(q.initted)
    q(torch.randn(10, 2))
    assert bool(q.initted)


def test_kmeans_init_is_skipped_in_eval_mode():
    q = VectorQuantizer(4, 2, l2_normalize=False, kmeans_init=True).eval()
    q(torch.randn(10, 2))
    assert not bool(q.initted)


@pytest.mark.parametrize("ema", [False, True])
@pytest.mark.parametrize("threshold, min_usage", [(0.5, 0.8), (0.0, None)])
def test_dead_code_restart_revives_a_collapsed_codebook(ema, threshold, min_usage):
    k, d = 32, 4
    q = VectorQuantizer(k, d, l2_normalize=False, ema=ema, decay=0.8, restart_threshold=threshold)
    with torch.no_grad():  # code 0 at the data, every other code far away: all inputs pick 0
        codes = torch.full((k, d), 100.0)
        codes[0] = 0.0
        (q.embed if ema else q.codebook.weight).copy_(codes)
        if ema:
            q.embed_sum.copy_(codes)
    data = torch.randn(256, d)
    assert usage(q, data) == 1 / k
    for _ in range(20):
        q(torch.randn(256, d))
    if min_usage is None:  # the control: without restarts the collapse stays
        assert usage(q, data) == 1 / k
    else:
        assert usage(q, data) >= min_usage
