"""KL alignment loss: the Triton kernels (forward, d qi, d ki) of both schedules against the fp32 reference.

Run: `pytest -q tests/kernels/test_msa_kl.py` (CPU: Triton interpreter; GPU tests need CUDA).
"""
import math

import pytest
import torch

import kernels
from kernels.kl.reference import msa_kl_loss_reference
from kernels.kl import op as kl_op
from msa_numerics import assert_close, gpu, kl_lowp, launch_variant, needs_cuda, rand, random_block_idx, support_BHTT

# (B, T, Hq, Hkv, D, dI, block, topk, cu_seqlens, split options, query options): G = 1..16, T not a
# multiple of the block, packed sequences (one shorter than a block, one of a single token), query
# chunks that split blocks' work lists (chunk_tokens not a multiple of the block, or the default).
CASES = {
    "batch2_G2_tail": (2, 77, 4, 2, 32, 32, 16, 3, None, dict(chunk_tokens=24), {}),
    "G16": (1, 70, 16, 1, 64, 32, 32, 2, None, dict(chunk_tokens=7), {}),
    "packed_G4": (1, 100, 8, 2, 32, 64, 32, 2, [0, 5, 40, 41, 100], dict(chunk_tokens=16), {}),
    "G1_tiles4": (1, 60, 2, 2, 32, 16, 16, 3, None, {}, dict(tokens_per_tile=4)),
}
# How the model calls it: sparse with lse (from msa_attention) and index_lse (from msa_select);
# sparse recomputing both; the dense warm-up form with lse recomputed; dense with a given lse.
# The sparse modes run both schedules against one reference; the dense form has only the query one.
KL_CALLS = ["sparse_given", "sparse_recomputed", "dense", "dense_given_lse"]


def _run(case, mode, dtype, device):
    B, T, Hq, Hkv, D, I, BS, K, cu, split_opts, query_opts = case
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
    q = rand(B, T, Hq, D, dtype=dtype, device=device, requires_grad=True)
    k = rand(B, T, Hkv, D, dtype=dtype, device=device, requires_grad=True)
    v = rand(B, T, Hkv, D, dtype=dtype, device=device)
    # Scaled so that the student is neither uniform nor one-hot (a sharper test of the gradient).
    qi = (2 * torch.randn(B, T, Hkv, I, device=device)).to(dtype).requires_grad_(True)
    ki = rand(B, T, I, dtype=dtype, device=device, requires_grad=True)
    dense = mode.startswith("dense")
    split_opts = dict(split_opts)
    variable = split_opts.pop("variable", False)
    bidx = None if dense else random_block_idx(B, T, Hkv, K, BS, cu_t, device, variable=variable)
    lse = index_lse = None
    if mode in ("sparse_given", "sparse_given_lse", "dense_given_lse"):
        att_idx = bidx
        if dense:  # every visible block: lse of dense causal attention
            n = -(-T // BS)
            att_idx = torch.arange(n, dtype=torch.int32, device=device).expand(B, T, Hkv, n).contiguous()
        # the fp32 reference's lse, as index_lse below (the Triton attention's lse is checked against it
        # in test_msa_attention.py; in the interpreter it cost a quarter of these tests' time)
        _, lse = kernels.msa_attention(q.detach(), k.detach(), v, att_idx, BS, cu_seqlens=cu_t, backend="reference")
    if mode in ("sparse_given", "sparse_given_index_lse"):
        from kernels.select.reference import index_lse_reference
        index_lse = index_lse_reference(qi.detach(), ki.detach(), bidx, BS, cu_t)

    g = torch.randn((), device=device)  # a non-unit upstream gradient
    rkl = msa_kl_loss_reference(q, k, qi, ki, bidx, BS, cu_t, lse=lse)
    rdqi, rdki = torch.autograd.grad(rkl * g, [qi, ki])
    allowed = support_BHTT(bidx, B, T, Hkv, BS, cu_t, device)
    lkl = kl_lowp(q, k, qi, ki, allowed, lse, 1 / math.sqrt(D), dtype)
    ldqi, ldki = torch.autograd.grad(lkl * g, [qi, ki])

    schedules = dict(query=query_opts) if dense else dict(split=split_opts, query=query_opts)
    for schedule, opts in schedules.items():
        opts = dict(opts)
        with launch_variant(kl_op.GPU_CONFIG, opts.pop("variant", None)):
            kl = kernels.msa_kl_loss(q, k, qi, ki, bidx, BS, cu_seqlens=cu_t, lse=lse, index_lse=index_lse,
                                     schedule=None if dense else schedule, **opts)
            assert kl.dtype == torch.float32 and kl.dim() == 0
            dqi, dki = torch.autograd.grad(kl * g, [qi, ki])
        assert q.grad is None and k.grad is None
        assert dqi.dtype == qi.dtype and dki.dtype == ki.dtype
        assert_close(f"{schedule}: kl", kl, rkl, lkl, dtype)
        assert_close(f"{schedule}: dqi", dqi, rdqi, ldqi, dtype)
        assert_close(f"{schedule}: dki", dki, rdki, ldki, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", KL_CALLS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference(case, mode, dtype, device):
    _run(CASES[case], mode, dtype, device)


# The split backward's token prefetch switched off and on (a code path: each is checked whichever is
# the default); only the sparse modes use the split schedule.
NO_PREFETCH = {"bwd_split": dict(prefetch=False)}
PREFETCH = {"bwd_split": dict(prefetch=True)}
VARIANT_CASES = {
    "packed_G4_noprefetch": (1, 100, 8, 2, 32, 64, 32, 2, [0, 5, 40, 41, 100], dict(chunk_tokens=16, variant=NO_PREFETCH),
                             {}),
    "G16_prefetch": (1, 70, 16, 1, 64, 32, 32, 2, None, dict(chunk_tokens=7, variant=PREFETCH), {}),
    # a count of blocks that varies per (token, group), as the adaptive budgets select
    "variable_packed_G4": (1, 100, 8, 2, 32, 64, 16, 5, [0, 5, 40, 41, 100], dict(chunk_tokens=16, variable=True), {}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["sparse_given", "sparse_recomputed"])
@pytest.mark.parametrize("case", list(VARIANT_CASES), ids=list(VARIANT_CASES))
def test_split_launch_variants_match_reference(case, mode, dtype, device):
    _run(VARIANT_CASES[case], mode, dtype, device)


@pytest.mark.parametrize("mode", ["sparse_given_lse", "sparse_given_index_lse"])
def test_one_of_lse_and_index_lse_given(mode, device):
    _run(CASES["packed_G4"], mode, torch.float32, device)


# lse given, index_lse computed by the KL: the model's default (msa.index_lse = "kl"); the student's
# partials run one row per token, whatever the group size
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", ["G16", "variable_packed_G4"])
def test_index_lse_computed_by_the_kl(case, dtype, device):
    _run({**CASES, **VARIANT_CASES}[case], "sparse_given_lse", dtype, device)


def test_no_gradient_reaches_q_k_or_lse(device):
    B, T, Hq, Hkv, D, BS, K = 1, 48, 4, 2, 16, 16, 2
    q = rand(B, T, Hq, D, dtype=torch.float32, device=device, requires_grad=True)
    k = rand(B, T, Hkv, D, dtype=torch.float32, device=device, requires_grad=True)
    v = rand(B, T, Hkv, D, dtype=torch.float32, device=device, requires_grad=True)
    qi = rand(B, T, Hkv, 16, dtype=torch.float32, device=device, requires_grad=True)
    ki = rand(B, T, 16, dtype=torch.float32, device=device, requires_grad=True)
    bidx, index_lse = kernels.msa_select(qi.detach(), ki.detach(), BS, K)
    _, lse = kernels.msa_attention(q, k, v, bidx, BS)  # lse carries a graph to q, k
    for backend in ("triton", "reference"):
        kl = kernels.msa_kl_loss(q, k, qi, ki, bidx, BS, lse=lse, index_lse=index_lse, backend=backend)
        kl.backward()
        assert q.grad is None and k.grad is None and v.grad is None, backend
        assert qi.grad is not None and ki.grad is not None
        qi.grad = ki.grad = None


@pytest.mark.parametrize("schedule", ["split", "query"])
def test_backward_is_deterministic(schedule, device):
    B, T, Hq, Hkv, D, BS, K = 1, 64, 4, 2, 16, 16, 3
    q = rand(B, T, Hq, D, dtype=torch.float16, device=device)
    k = rand(B, T, Hkv, D, dtype=torch.float16, device=device)
    qi = rand(B, T, Hkv, 16, dtype=torch.float16, device=device, requires_grad=True)
    ki = rand(B, T, 16, dtype=torch.float16, device=device, requires_grad=True)
    bidx = random_block_idx(B, T, Hkv, K, BS, None, device)
    opts = dict(chunk_tokens=24) if schedule == "split" else {}
    runs = [torch.autograd.grad(kernels.msa_kl_loss(q, k, qi, ki, bidx, BS, schedule=schedule, **opts), [qi, ki])
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lse=torch.zeros(1, 32, 4, dtype=torch.float16)), "lse must have dtype"),
    (dict(lse=torch.zeros(1, 32, 2)), "lse must have shape"),
    (dict(index_lse=torch.zeros(1, 32, 4)), "index_lse must have shape"),
    (dict(qi=torch.randn(1, 32, 4, 16)), "qi must have shape"),
    (dict(ki=torch.randn(1, 32, 8)), "ki must have shape"),
    (dict(block_idx=torch.zeros(1, 32, 2, 2, dtype=torch.int64)), "block_idx must have dtype"),
    (dict(k=torch.randn(1, 32, 2, 16).half()), "share a dtype"),
    (dict(backend="fast"), "backend"),
    (dict(schedule="tiles"), "schedule must be one of"),
    (dict(schedule="split"), "schedule='split' needs block_idx"),
    (dict(schedule="split", tokens_per_tile=4, block_idx=torch.zeros(1, 32, 2, 2, dtype=torch.int32)),
     "tokens_per_tile applies to schedule='query'"),
    (dict(chunk_tokens=0), "chunk_tokens must be a positive int"),
])
def test_input_errors_name_the_argument(kwargs, match):
    args = dict(q=torch.randn(1, 32, 4, 16), k=torch.randn(1, 32, 2, 16), qi=torch.randn(1, 32, 2, 16),
                ki=torch.randn(1, 32, 16), block_idx=None, block_size=16)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        kernels.msa_kl_loss(**args)


GPU_CASES = [  # (B, T, Hq, Hkv, D, dI, block, topk, cu_seqlens, split options, query options), mode, dtype
    pytest.param((1, 2048, 32, 2, 128, 128, 128, 16, None, {}, {}), "sparse_given", torch.bfloat16,
                 id="bench-sparse-bf16"),
    pytest.param((1, 2048, 32, 2, 128, 128, 128, 16, None, {}, {}), "dense", torch.bfloat16, id="bench-dense-bf16"),
    pytest.param((1, 2048, 32, 2, 128, 128, 128, 16, None,
                  dict(chunk_tokens=300, variant=NO_PREFETCH), {}), "sparse_given", torch.float16,
                 id="bench-sparse-fp16-noprefetch"),
    pytest.param((1, 3000, 16, 2, 128, 64, 128, 16, [0, 100, 1100, 1101, 3000], dict(chunk_tokens=700), {}),
                 "sparse_recomputed", torch.bfloat16, id="packed-sparse-bf16"),
    pytest.param((1, 2048, 32, 2, 128, 128, 128, 16, None, {}, {}), "sparse_given_lse", torch.bfloat16,
                 id="bench-sparse-index-lse-in-kl-bf16"),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("shape, mode, dtype", GPU_CASES)
def test_gpu_matches_reference(shape, mode, dtype):
    _run(shape, mode, dtype, "cuda")
