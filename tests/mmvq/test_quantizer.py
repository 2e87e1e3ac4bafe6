"""Nearest-code quantizers (vq, simvq) over their lookup and gradient options: invariants."""

import pytest
import torch
import torch.nn.functional as F

from mmvq.config import QuantizerConfig
from mmvq.quantizers import QUANTIZERS, QuantizerOutput, SimVQ, VectorQuantizer, nearest_code
from mmvq.quantizers.distance import block_shape
from mmvq.quantizers.vq import rotate_to

# name -> (class, options); every distance mode (L2, cosine, factorised) and gradient path.
VARIANTS = {
    "l2": (VectorQuantizer, {"l2_normalize": False}),
    "cosine": (VectorQuantizer, {"l2_normalize": True}),
    "factorised-cosine": (VectorQuantizer, {"l2_normalize": True, "code_dim": 4}),
    "factorised-l2": (VectorQuantizer, {"l2_normalize": False, "code_dim": 4}),
    "rotation": (VectorQuantizer, {"l2_normalize": False, "rotation_trick": True}),
    "rotation-cosine": (VectorQuantizer, {"l2_normalize": True, "rotation_trick": True}),
    "ema": (VectorQuantizer, {"l2_normalize": False, "ema": True}),
    "ema-cosine": (VectorQuantizer, {"l2_normalize": True, "ema": True}),
    "simvq": (SimVQ, {"l2_normalize": True}),
    "simvq-l2-factorised": (SimVQ, {"l2_normalize": False, "code_dim": 4}),
}
LEARNED = [name for name, (_, opts) in VARIANTS.items() if not opts.get("ema")]


def make(name: str, k: int = 64, d: int = 8) -> VectorQuantizer:
    cls, options = VARIANTS[name]
    return cls(k, d, **options)


def brute_force_indices(q: VectorQuantizer, z: torch.Tensor) -> torch.Tensor:
    """Nearest code by the full float64 distance matrix, in the quantizer's code space."""
    with torch.no_grad():
        x = q.project_in(z)
        if q.l2_normalize:
            x = F.normalize(x, dim=-1)
        return torch.cdist(x.double(), q.codes().double()).argmin(dim=1)


def test_registry_builds_every_family():
    assert sorted(QUANTIZERS) == ["fsq", "lfq", "rvq", "simvq", "vq"]
    assert type(QUANTIZERS["vq"](QuantizerConfig(kind="vq"), 64, 8)) is VectorQuantizer
    assert type(QUANTIZERS["simvq"](QuantizerConfig(kind="simvq"), 64, 8)) is SimVQ


@pytest.mark.parametrize("option", [{"ema": True}, {"kmeans_init": True}, {"restart_threshold": 0.5}])
def test_simvq_refuses_the_options_that_write_codes(option):
    with pytest.raises(TypeError, match="SimVQ has no code rows to write"):
        SimVQ(64, 8, **option)


@pytest.mark.parametrize("name", VARIANTS)
def test_indices_are_the_brute_force_nearest_codes(name):
    q = make(name).eval()
    z = torch.randn(500, 8)
    assert torch.equal(q(z).indices, brute_force_indices(q, z))


@pytest.mark.parametrize("name", ["l2", "cosine", "factorised-cosine"])
def test_block_path_with_a_large_codebook_matches_brute_force(name):
    q = make(name, k=65536).eval()
    q.max_block_elements = 4096  # 50 rows -> blocks of 81 codes: the column-block path
    z = torch.randn(50, 8)
    assert torch.equal(q(z).indices, brute_force_indices(q, z))


@pytest.mark.parametrize("max_elements", [64, 1000, 2**22])
def test_blocked_nearest_code_matches_full_argmin(max_elements):
    z, codebook = torch.randn(1000, 16), torch.randn(300, 16)
    full = ((z[:, None, :] - codebook[None]) ** 2).sum(-1).argmin(dim=1)
    assert torch.equal(nearest_code(z, codebook, max_elements), full)


def test_nearest_code_never_builds_a_block_over_its_budget(monkeypatch):
    sizes = []
    mm = torch.mm

    def spy(*args, **kwargs):
        out = mm(*args, **kwargs)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch, "mm", spy)
    nearest_code(torch.randn(3000, 4), torch.randn(65536, 4), max_elements=2**16)
    assert sizes and max(sizes) <= 2**16  # the full matrix would be 3000 x 65536


@pytest.mark.parametrize("rows, codes, budget", [(1, 10**6, 7), (10**5, 3, 100), (300, 300, 2**22)])
def test_block_shape_stays_within_budget(rows, codes, budget):
    r, c = block_shape(rows, codes, budget)
    assert 1 <= c <= codes and r * c <= max(budget, 1)


def test_nearest_code_of_empty_input_is_empty():
    assert nearest_code(torch.zeros(0, 4), torch.randn(5, 4)).shape == (0,)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("training", [True, False])
def test_lookup_of_indices_is_the_quantized_value(name, training):
    q = make(name).train(training)
    z = torch.randn(3, 5, 7, 8, requires_grad=True)
    out = q(z)
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == (3, 5, 7, 8)
    assert out.indices.shape == (3, 5, 7) and out.indices.dtype == torch.long
    if training and q.ema:  # the EMA step has moved the codes since; the next forward sees them
        q.eval()
        out = q(z)
    assert torch.equal(q.lookup(out.indices), out.quantized.detach())  # bit-exact


@pytest.mark.parametrize("name", ["l2", "ema", "simvq-l2-factorised"])
def test_gradient_reaches_the_encoder_input(name):
    q = make(name)
    z = torch.randn(10, 8, requires_grad=True)
    out = q(z)
    (out.quantized.sum() + out.commit_loss).backward()
    assert torch.isfinite(z.grad).all() and (z.grad.abs().sum(dim=1) > 0).all()
    if not hasattr(q.project_in, "weight"):  # no projection: the decoder gradient is copied
        z.grad = None
        q(z).quantized.sum().backward()
        assert torch.equal(z.grad, torch.ones_like(z))


def test_rotation_trick_rotates_the_gradient_back_onto_the_input():
    q = make("rotation")
    z = (torch.randn(20, 8) * 3).requires_grad_()
    out = q(z)
    code = out.quantized.detach()
    # Upstream gradient along each code's direction: R^T q_hat = z_hat, scaled by |q| / |z|.
    out.quantized.backward(F.normalize(code, dim=-1))
    scale = code.norm(dim=-1, keepdim=True) / z.detach().norm(dim=-1, keepdim=True)
    torch.testing.assert_close(z.grad, scale * F.normalize(z.detach(), dim=-1))


def paper_rotation(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Fifty et al. 2024's forward form: s R x with R and s detached, differentiated by autograd."""
    u = F.normalize(x, dim=-1).detach()
    v = F.normalize(q, dim=-1).detach()
    w = F.normalize(u + v, dim=-1).detach()
    rotated = x - 2 * (x * w).sum(-1, keepdim=True) * w + 2 * (x * u).sum(-1, keepdim=True) * v
    return rotated * (q.norm(dim=-1, keepdim=True) / x.norm(dim=-1, keepdim=True)).detach()


def test_rotation_trick_gradient_equals_autograd_through_the_papers_formula():
    x = torch.randn(50, 6, requires_grad=True)
    q, upstream = torch.randn(50, 6), torch.randn(50, 6)
    reference = torch.autograd.grad((paper_rotation(x, q) * upstream).sum(), x)[0]
    ours = torch.autograd.grad((rotate_to(x, q) * upstream).sum(), x)[0]
    torch.testing.assert_close(ours, reference)
    assert torch.equal(rotate_to(x, q), q)  # the value is the code, bit for bit


def test_rotation_trick_falls_back_to_straight_through_at_a_zero_input():
    x = torch.zeros(1, 4, requires_grad=True)
    rotate_to(x, torch.randn(1, 4)).sum().backward()
    assert torch.equal(x.grad, torch.ones(1, 4))


@pytest.mark.parametrize("name", LEARNED)
def test_codebook_learns_from_codebook_loss_only(name):
    q = make(name)
    codebook_params = [p for n, p in q.named_parameters() if not n.startswith("project_")]
    z = torch.randn(10, 8, requires_grad=True)
    out = q(z)
    out.quantized.sum().backward(retain_graph=True)
    assert all(p.grad is None for p in codebook_params)  # the decoder path does not touch codes
    out.codebook_loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in codebook_params)


def test_ema_codebook_has_no_gradient_loss_and_no_parameters():
    q = make("ema")
    out = q(torch.randn(10, 8, requires_grad=True))
    assert out.codebook_loss.item() == 0.0 and not out.codebook_loss.requires_grad
    assert list(q.parameters()) == []


@pytest.mark.parametrize("name", ["l2", "cosine", "factorised-cosine", "simvq"])
def test_losses_ignore_masked_vectors(name):
    q = make(name)
    z = torch.randn(2, 6, 8)
    mask = torch.tensor([[True] * 6, [False] * 6])
    a = q(z, mask)
    z2 = z.clone()
    z2[1] = torch.randn(6, 8) * 5  # change only masked-out vectors
    b = q(z2, mask)
    assert torch.equal(a.commit_loss, b.commit_loss)
    assert torch.equal(a.codebook_loss, b.codebook_loss)
    none = q(z, torch.zeros(2, 6, dtype=torch.bool))
    assert none.commit_loss.item() == 0.0 and none.codebook_loss.item() == 0.0
    assert q(z2).commit_loss != a.commit_loss  # unmasked, the changed vectors do count


@pytest.mark.parametrize("name", ["cosine", "factorised-cosine", "ema", "simvq"])
def test_quantization_runs_in_fp32_under_autocast(name):
    q = make(name).eval()
    z = torch.randn(4, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
        looked_up = q.lookup(out.indices)
    assert out.quantized.dtype == torch.float32
    assert torch.equal(looked_up, out.quantized)
