"""Block selection: the Triton kernel against the fp32 reference (sets, tie-aware) and its index_lse.

Run: `pytest -q tests/kernels/test_msa_select.py` (CPU: Triton interpreter; GPU tests need CUDA).
"""
import pytest
import torch

import kernels
from kernels.select import reference as ref
from kernels.select import op as sel_op
from msa_numerics import assert_close, gpu, launch_variant, needs_cuda, rand

# (B, T, H, dI, block, topk, cu_seqlens): T not a multiple of the block, packed sequences with one
# shorter than a block and one of a single token, topk = 1, several index heads per program (H=8)
# and one (H=3), tokens with fewer visible blocks than topk.
CASES = {
    "batch2": (2, 100, 2, 32, 16, 4, None),
    "packed": (1, 130, 2, 32, 16, 3, [0, 7, 50, 51, 130]),
    "topk1": (1, 40, 1, 16, 16, 1, None),
    "H8_block32": (1, 90, 8, 64, 32, 3, None),
    "H3": (1, 90, 3, 32, 16, 5, None),
    "dI128_block64": (1, 200, 1, 128, 64, 2, None),
}


def check_selection(bidx, qi, ki, block_size, topk, cu, tie_abs=None):
    """Every (token, head) holds a valid top-k under the reference's pooled scores (ties within
    rounding, 1e-5 of the largest score or `tie_abs`, may go either way), in the contract's layout;
    returns the fraction equal as sets."""
    B, T, H, _ = qi.shape
    rb, _ = ref.msa_select_reference(qi, ki, block_size, topk, cu)
    same = (bidx.sort(-1).values == rb.sort(-1).values).all(-1)
    for b, s0, e0, pooled_HLM in ref.pooled_scores_reference(qi, ki, block_size, cu):
        L = e0 - s0
        local = torch.arange(L) // block_size
        n_valid = torch.clamp(local + 1, max=topk)
        sel = bidx[b, s0:e0].long()  # [L, H, K]
        slot = torch.arange(topk)
        # Layout: local block in slot n_valid-1, blocks before it, -1 after it.
        assert (sel.gather(-1, (n_valid - 1)[:, None, None].expand(L, H, 1)).squeeze(-1) == local[:, None]).all()
        after = slot[None, None, :] >= n_valid[:, None, None]
        assert (sel[after.expand_as(sel)] == -1).all()
        before = slot[None, None, :] < (n_valid - 1)[:, None, None]
        others = torch.where(before, sel, -1)
        assert ((others < local[:, None, None]) | (others == -1)).all(), "selected a non-visible or the local block"
        srt = others.sort(-1).values
        assert not ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any(), "duplicate block"
        # Top-k up to rounding: the weakest chosen block is no worse than the best one left out.
        scores = pooled_HLM.permute(1, 0, 2)  # [L, H, M]
        M = scores.shape[-1]
        visible_other = torch.arange(M)[None, None, :] < local[:, None, None]
        chosen = torch.zeros(L, H, M + 1, dtype=torch.bool).scatter_(-1, torch.where(others >= 0, others, M), True)[..., :M]
        worst_in = torch.where(chosen, scores, float("inf")).amin(-1)
        best_out = torch.where(visible_other & ~chosen, scores, float("-inf")).amax(-1)
        eps = 1e-5 * scores[torch.isfinite(scores)].abs().max() if tie_abs is None else tie_abs
        assert (worst_in >= best_out - eps).all(), "a better block was left out"
    return same.float().mean().item()


# Launch variants that change the kernel's code path (software-pipelined ranking, 64- or 128-row
# tiles), each checked whichever is the default.
VARIANTS = {"rows64_pipe": dict(rows=64, pipe=True), "rows128_pipe": dict(rows=128, pipe=True),
            "rows128": dict(rows=128, pipe=False)}


def _select(qi, ki, BS, K, cu_t, variant):
    with launch_variant(sel_op.GPU_CONFIG, VARIANTS[variant]):
        return kernels.msa_select(qi, ki, BS, K, cu_seqlens=cu_t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case, variant", [(c, "rows64_pipe") for c in CASES] +
                         [("packed", "rows128_pipe"), ("H3", "rows128"), ("dI128_block64", "rows128")])
def test_matches_reference(case, variant, dtype, device):
    B, T, H, I, BS, K, cu = CASES[case]
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
    qi = rand(B, T, H, I, dtype=dtype, device=device)
    ki = rand(B, T, I, dtype=dtype, device=device)
    bidx, lse = _select(qi, ki, BS, K, cu_t, variant)
    assert bidx.dtype == torch.int32 and bidx.shape == (B, T, H, K)
    assert lse.dtype == torch.float32 and lse.shape == (B, T, H)
    frac = check_selection(bidx.cpu(), qi.cpu(), ki.cpu(), BS, K, None if cu is None else cu_t.cpu())
    assert frac > 0.99, f"only {frac:.3f} of the selections equal the reference's (continuous inputs)"
    # index_lse on the kernel's own choice (so a tie decided the other way cannot matter).
    rlse = ref.index_lse_reference(qi, ki, bidx, BS, cu_t)
    assert_close("index_lse", lse, rlse, rlse, torch.float32)


@pytest.mark.parametrize("variant", ["rows64_pipe", "rows128"])
def test_without_lse_the_same_selection(variant, device):
    # with_lse=False leaves the blocks' log-sum-exps out of the scan: the ranking must not change
    B, T, H, I, BS, K, cu = CASES["packed"]
    cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
    qi = rand(B, T, H, I, dtype=torch.float32, device=device)
    ki = rand(B, T, I, dtype=torch.float32, device=device)
    with launch_variant(sel_op.GPU_CONFIG, VARIANTS[variant]):
        b_lse, lse = kernels.msa_select(qi, ki, BS, K, cu_seqlens=cu_t)
        b_no, none = kernels.msa_select(qi, ki, BS, K, cu_seqlens=cu_t, with_lse=False)
    assert none is None and lse is not None
    assert torch.equal(b_no, b_lse)
    assert kernels.msa_select(qi, ki, BS, K, cu_seqlens=cu_t, with_lse=False, backend="reference")[1] is None


def test_reference_backend_agrees(device):
    qi = rand(1, 64, 2, 16, dtype=torch.float32, device=device)
    ki = rand(1, 64, 16, dtype=torch.float32, device=device)
    b1, l1 = kernels.msa_select(qi, ki, 16, 3, backend="reference")
    b2, l2 = kernels.msa_select(qi, ki, 16, 3)
    assert torch.equal(b1.sort(-1).values, b2.sort(-1).values)
    torch.testing.assert_close(l1, l2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(topk=5), "larger than useful"),
    (dict(topk=0), "topk must be a positive int"),
    (dict(block_size=20), "block_size"),
    (dict(ki=torch.randn(1, 64, 8)), "ki must have shape"),
    (dict(ki=torch.randn(1, 64, 16).half()), "ki dtype"),
    (dict(qi=torch.randn(1, 64, 2, 16).to(torch.int8)), "qi must have dtype"),
    (dict(qi=torch.randn(1, 64, 16, 2).transpose(2, 3)), "contiguous"),
    (dict(cu_seqlens=torch.tensor([0, 64], dtype=torch.int32), qi=torch.randn(2, 64, 2, 16),
          ki=torch.randn(2, 64, 16)), "batch size 1"),
    (dict(backend="torch"), "backend"),
    (dict(fp8=True), "needs with_lse=False"),
    (dict(fp8=True, with_lse=False, budget=kernels.Budget("top_p")), "static budget"),
    (dict(fp8=1, with_lse=False), "fp8 must be True or False"),
])
def test_input_errors_name_the_argument(kwargs, match):
    args = dict(qi=torch.randn(1, 64, 2, 16), ki=torch.randn(1, 64, 16), block_size=16, topk=3)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        kernels.msa_select(**args)


def test_to_fp8_rounds_to_e4m3_with_one_scale():
    # independent of the op's arithmetic: e4m3 keeps 3 mantissa bits, so every normal value comes
    # back within 2^-4 of itself; the largest magnitude maps to the format's largest finite value
    x = torch.randn(300, 2, 64) * 3.0
    x8, scale = sel_op.to_fp8(x)
    assert x8.dtype == torch.float8_e4m3fn and scale.shape == () and scale.dtype == torch.float32
    assert x8.float().abs().max().item() == 448.0
    back = x8.float() * scale
    normal = x.abs() >= scale * 2.0 ** -6  # e4m3's smallest normal, in x's units
    assert ((back - x).abs() <= x.abs() * 2.0 ** -4)[normal].all()
    assert torch.isfinite(back).all()
    assert sel_op.to_fp8(torch.zeros(4, 8))[0].float().abs().max() == 0  # no 0/0


@pytest.mark.parametrize("case, variant", [("batch2", "rows64_pipe"), ("packed", "rows128_pipe"),
                                           ("H8_block32", "rows64_pipe"), ("dI128_block64", "rows128")])
def test_fp8_scores_rank_like_the_reference_on_rounded_inputs(case, variant, device):
    # fp8=True is exact top-k of the scores of qi and ki rounded to e4m3 (the reference rounds them
    # itself, as the format defines, and scores in fp32)
    B, T, H, I, BS, K, cu = CASES[case]
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
    qi = rand(B, T, H, I, dtype=torch.float16, device=device) * 2.5
    ki = rand(B, T, I, dtype=torch.float16, device=device)
    with launch_variant(sel_op.GPU_CONFIG, VARIANTS[variant]):
        bidx, none = kernels.msa_select(qi, ki, BS, K, cu_seqlens=cu_t, with_lse=False, fp8=True)
    assert none is None and bidx.shape == (B, T, H, K)
    cu_c = None if cu is None else cu_t.cpu()
    frac = check_selection(bidx.cpu(), ref.fp8_rounded(qi.cpu()), ref.fp8_rounded(ki.cpu()), BS, K, cu_c)
    assert frac > 0.99, f"only {frac:.3f} of the selections equal the reference's on the rounded inputs"
    rb, _ = kernels.msa_select(qi, ki, BS, K, cu_seqlens=cu_t, with_lse=False, fp8=True, backend="reference")
    assert (rb.sort(-1).values == bidx.sort(-1).values).all(-1).float().mean() > 0.99


GPU_CASES = [  # (B, T, H, dI, block, topk, cu_seqlens), dtype
    pytest.param((1, 4096, 2, 128, 128, 16, None), torch.bfloat16, id="bench-bf16"),  # bench shape, scaled
    pytest.param((1, 4096, 2, 128, 128, 16, None), torch.float16, id="bench-fp16"),
    pytest.param((2, 1500, 4, 64, 64, 8, None), torch.bfloat16, id="batch2_H4-bf16"),
    pytest.param((1, 3000, 2, 128, 128, 16, [0, 100, 1100, 1101, 3000]), torch.bfloat16, id="packed-bf16"),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape, dtype", GPU_CASES)
def test_gpu_matches_reference(shape, dtype, variant):
    B, T, H, I, BS, K, cu = shape
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")
    qi = rand(B, T, H, I, dtype=dtype, device="cuda")
    ki = rand(B, T, I, dtype=dtype, device="cuda")
    bidx, lse = _select(qi, ki, BS, K, cu_t, variant)
    frac = check_selection(bidx.cpu(), qi.float().cpu(), ki.float().cpu(), BS, K, None if cu is None else cu_t.cpu())
    assert frac > 0.99
    with launch_variant(sel_op.GPU_CONFIG, VARIANTS[variant]):  # without the log-sum-exps: the same ranking
        assert torch.equal(kernels.msa_select(qi, ki, BS, K, cu_seqlens=cu_t, with_lse=False)[0], bidx)
    rlse = ref.index_lse_reference(qi, ki, bidx, BS, cu_t)
    assert_close("index_lse", lse, rlse, rlse, torch.float32)


@gpu
@needs_cuda
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape, dtype", GPU_CASES[:1] + GPU_CASES[2:])
def test_gpu_fp8_matches_reference_on_rounded_inputs(shape, dtype, variant):
    B, T, H, I, BS, K, cu = shape
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")
    qi = rand(B, T, H, I, dtype=dtype, device="cuda")
    ki = rand(B, T, I, dtype=dtype, device="cuda")
    with launch_variant(sel_op.GPU_CONFIG, VARIANTS[variant]):
        bidx, _ = kernels.msa_select(qi, ki, BS, K, cu_seqlens=cu_t, with_lse=False, fp8=True)
        for _ in range(3):  # the same inputs, the same selection
            assert torch.equal(kernels.msa_select(qi, ki, BS, K, cu_seqlens=cu_t, with_lse=False, fp8=True)[0], bidx)
    qr, kr = ref.fp8_rounded(qi.float().cpu()), ref.fp8_rounded(ki.float().cpu())
    # Hopper's FP8 tensor cores do not sum in fp32: the products are aligned to the largest of them
    # and about 13 bits below it are kept, so a score can be off by up to dI * 2^-12 * max|qi| max|ki|
    # / sqrt(dI), about 0.05 at these inputs (a first GPU run that allowed ties only within 0.021 failed
    # one case of nine). Blocks within twice that of each other may swap, and how many rows then hold
    # a different set depends on how many blocks sit that close to the k-th best: 94.5% of the rows
    # equal in the bench case (top-16 of 32 blocks: half of them near the boundary), 99.8-100% in the
    # others.
    tie_abs = 2 * I ** 0.5 * 2.0 ** -12 * qr.abs().max().item() * kr.abs().max().item()
    frac = check_selection(bidx.cpu(), qr, kr, BS, K, None if cu is None else cu_t.cpu(), tie_abs=tie_abs)
    print(f"fp8 selection equal to the reference's on rounded inputs: {frac:.4f} (ties within {tie_abs:.3f})")
    assert frac > 0.9
