import pytest
import torch

from mmvq.quantizers import QUANTIZERS, QuantizerOutput, VectorQuantizer, nearest_code

KINDS = sorted(QUANTIZERS)


def make(kind: str, l2_normalize: bool, k: int = 64, d: int = 8) -> VectorQuantizer:
    return QUANTIZERS[kind](k, d, l2_normalize=l2_normalize)


def test_registry_has_plain_vq():
    assert QUANTIZERS["vq"] is VectorQuantizer


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("l2_normalize", [True, False])
def test_lookup_of_indices_is_the_quantized_value(kind, l2_normalize):
    q = make(kind, l2_normalize)
    z = torch.randn(3, 5, 7, 8, requires_grad=True)
    out = q(z)
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == (3, 5, 7, 8)
    assert out.indices.shape == (3, 5, 7) and out.indices.dtype == torch.long
    # Bit-exact: decode(encode(x)) must equal the forward pass.
    assert torch.equal(q.lookup(out.indices), out.quantized.detach())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("l2_normalize", [True, False])
def test_indices_are_the_brute_force_nearest_codes(kind, l2_normalize):
    q = make(kind, l2_normalize)
    z = torch.randn(500, 8)
    out = q(z)
    codes = q.lookup(torch.arange(q.codebook_size))  # (K, D)
    target = torch.nn.functional.normalize(z, dim=-1) if l2_normalize else z
    brute = torch.cdist(target, codes).argmin(dim=1)
    assert torch.equal(out.indices, brute)


@pytest.mark.parametrize("chunk_size", [1, 7, 100, 8192])
def test_chunked_nearest_code_matches_full_argmin(chunk_size):
    z, codebook = torch.randn(1000, 16), torch.randn(300, 16)
    full = ((z[:, None, :] - codebook[None]) ** 2).sum(-1).argmin(dim=1)
    assert torch.equal(nearest_code(z, codebook, chunk_size), full)


def test_nearest_code_of_empty_input_is_empty():
    assert nearest_code(torch.zeros(0, 4), torch.randn(5, 4)).shape == (0,)


@pytest.mark.parametrize("kind", KINDS)
def test_straight_through_gradient_reaches_the_input_unchanged(kind):
    q = make(kind, l2_normalize=False)
    z = torch.randn(10, 8, requires_grad=True)
    out = q(z)
    out.quantized.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # identity Jacobian through STE


@pytest.mark.parametrize("kind", KINDS)
def test_codebook_learns_from_codebook_loss_only(kind):
    q = make(kind, l2_normalize=True)
    z = torch.randn(10, 8, requires_grad=True)
    out = q(z)
    out.quantized.sum().backward()
    assert all(p.grad is None for p in q.parameters())  # the decoder path does not touch codes
    out.codebook_loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in q.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_losses_ignore_masked_vectors(kind):
    q = make(kind, l2_normalize=True)
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


@pytest.mark.parametrize("kind", KINDS)
def test_quantization_runs_in_fp32_under_autocast(kind):
    q = make(kind, l2_normalize=True)
    z = torch.randn(4, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
    assert out.quantized.dtype == torch.float32
    assert torch.equal(q.lookup(out.indices), out.quantized)
