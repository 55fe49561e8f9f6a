"""The warm-up's dense-support KL on sampled query tokens against the fp32 reference: the same sum
over the kept tokens (the reference with every visible block listed for them), the same gradients,
and an unbiased estimate of the full loss."""
import pytest
import torch

from kernels.kl.reference import msa_kl_loss_reference
from kernels.kl.sampled import msa_kl_loss_dense_sampled


def _inputs(lengths, Hq=8, Hkv=2, D=32, I=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = sum(lengths)
    q = torch.randn(N, Hq, D, generator=g).to(dtype)
    k = torch.randn(N, Hkv, D, generator=g).to(dtype)
    qi = torch.randn(N, Hkv, I, generator=g).to(dtype).requires_grad_(True)
    ki = torch.randn(N, I, generator=g).to(dtype).requires_grad_(True)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return q, k, qi, ki, cu


def _all_visible_blocks(cu, keep, block, Hkv):
    """block_idx listing every block up to the token's own (dense support) for kept tokens, -1 else."""
    N = int(cu[-1])
    nb = max(-(-int(e - s) // block) for s, e in zip(cu[:-1], cu[1:]))
    idx = torch.full((1, N, Hkv, nb), -1, dtype=torch.int32)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        for t in range(s, e):
            if keep[t]:
                n = (t - s) // block + 1
                idx[0, t, :, :n] = torch.arange(n, dtype=torch.int32)
    return idx


@pytest.mark.parametrize("lengths,fraction", [([200], 0.25), ([37, 130, 1, 91], 0.5), ([64, 64], 1.0)])
def test_sampled_dense_kl_matches_the_reference_on_the_kept_tokens(lengths, fraction):
    q, k, qi, ki, cu = _inputs(lengths)
    keep = torch.rand(q.shape[0], generator=torch.Generator().manual_seed(1)) < fraction
    got = msa_kl_loss_dense_sampled(q, k, qi, ki, cu, keep, fraction)
    got.backward()
    g_qi, g_ki = qi.grad.clone(), ki.grad.clone()
    qi.grad = ki.grad = None
    block = 16
    ref = msa_kl_loss_reference(q[None], k[None], qi[None], ki[None], _all_visible_blocks(cu, keep, block, 2), block,
                                cu)
    ref.backward()
    torch.testing.assert_close(got * fraction, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_qi * fraction, qi.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g_ki * fraction, ki.grad, rtol=1e-4, atol=1e-7)
    assert (g_qi[~keep] == 0).all()  # tokens not drawn get no gradient


def test_small_chunks_give_the_same_sum(monkeypatch):
    import kernels.kl.sampled as sampled

    q, k, qi, ki, cu = _inputs([150, 80])
    keep = torch.rand(230, generator=torch.Generator().manual_seed(2)) < 0.6
    whole = msa_kl_loss_dense_sampled(q, k, qi, ki, cu, keep, 0.6)
    monkeypatch.setattr(sampled, "CHUNK_ELEMS", 8 * 100)  # a few tokens per chunk, windows across documents
    torch.testing.assert_close(msa_kl_loss_dense_sampled(q, k, qi, ki, cu, keep, 0.6), whole, rtol=1e-6, atol=1e-7)


def test_the_estimate_is_unbiased():
    q, k, qi, ki, cu = _inputs([96, 60])
    with torch.no_grad():
        exact = msa_kl_loss_reference(q[None], k[None], qi[None], ki[None], None, 16, cu)
        g = torch.Generator().manual_seed(3)
        draws = torch.stack([msa_kl_loss_dense_sampled(q, k, qi, ki, cu, torch.rand(156, generator=g) < 0.25, 0.25)
                             for _ in range(400)])
    # the mean of 400 draws is within 4 standard errors of the exact loss
    assert abs(draws.mean() - exact) < 4 * draws.std() / 20


def test_arguments_are_checked():
    q, k, qi, ki, cu = _inputs([10])
    with pytest.raises(ValueError, match="fraction"):
        msa_kl_loss_dense_sampled(q, k, qi, ki, cu, torch.ones(10, dtype=torch.bool), 0.0)
    with pytest.raises(ValueError, match="keep_N"):
        msa_kl_loss_dense_sampled(q, k, qi, ki, cu, torch.ones(9, dtype=torch.bool), 0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the compiled Triton kernels)")
def test_sparse_kl_with_unsampled_rows_matches_the_reference_on_gpu():
    """The sparse phase's sampling leaves rows of -1 in block_idx: the compiled kernels must give the
    reference's loss and gradients (bf16 inputs, fp32 reference on the same values)."""
    import kernels

    torch.manual_seed(0)
    T, Hq, Hkv, D, I, bs = 2048, 32, 2, 128, 128, 128
    dev = "cuda"
    q = torch.randn(1, T, Hq, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, T, Hkv, D, device=dev, dtype=torch.bfloat16)
    qi = torch.randn(1, T, Hkv, I, device=dev, dtype=torch.bfloat16)
    ki = torch.randn(1, T, I, device=dev, dtype=torch.bfloat16)
    cu = torch.tensor([0, 700, T], dtype=torch.int32, device=dev)
    bidx, ilse = kernels.msa_select(qi, ki, bs, 8, cu)
    _, lse = kernels.msa_attention(q, k, torch.randn_like(k), bidx, bs, cu)
    bidx = torch.where((torch.rand(T, device=dev) < 0.25)[None, :, None, None], bidx, -1)
    out = {}
    for backend in ("triton", "reference"):
        a, b = qi.float().requires_grad_(True), ki.float().requires_grad_(True)
        a_in, b_in = (a.to(torch.bfloat16), b.to(torch.bfloat16)) if backend == "triton" else (a, b)
        loss = kernels.msa_kl_loss(q if backend == "triton" else q.float(), k if backend == "triton" else k.float(),
                                   a_in, b_in, bidx, bs, cu, lse=lse, index_lse=ilse, backend=backend)
        loss.backward()
        out[backend] = (loss.detach().float(), a.grad, b.grad)
    for got, want in zip(out["triton"], out["reference"]):
        assert torch.isfinite(got).all()
        assert (got - want).norm() / want.norm().clamp(min=1e-12) < 2e-2
