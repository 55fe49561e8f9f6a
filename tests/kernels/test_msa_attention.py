"""Block-sparse attention: Triton kernels (forward, dQ, dK/dV) against the fp32 reference.

Run: `pytest -q tests/kernels/test_msa_attention.py` (CPU: Triton interpreter; GPU tests need CUDA).
"""
import math

import pytest
import torch

import kernels
from kernels import _common
from kernels.attention import op as attn_op
from kernels.attention.reference import msa_attention_reference
from msa_numerics import (assert_close, attention_lowp, gpu, launch_variant, needs_cuda, rand, random_block_idx,
                          support_BHTT)

# (B, T, Hq, Hkv, D, block, topk, cu_seqlens, schedule options) -- awkward on purpose: T not a
# multiple of the block, G = 1..16, packed sequences with one shorter than a block and one of a
# single token, tokens with fewer visible blocks than topk, both schedules, query chunks that split
# blocks' work lists (chunk_tokens not a multiple of the block) and tiles of several tokens.
SPLIT, QUERY = dict(schedule="split"), dict(schedule="query")
# Launch variants of the split kernels that change their code path (the forward's token prefetch)
# or only add cache hints (ignored by the interpreter): each is checked whichever is the default.
PLAIN = {"fwd_split": dict(prefetch=False, q_evict="", part_cache=""), "bwd_split": dict(q_evict="", part_cache=""),
         "merge": dict(part_evict="")}
PREFETCH = {"fwd_split": dict(prefetch=True, q_evict="evict_last", part_cache=".cs"),
            "bwd_split": dict(q_evict="evict_last", part_cache=".cs", num_stages=1),
            "merge": dict(part_evict="evict_first")}
CASES = {
    "batch2_G2_tail": (2, 77, 4, 2, 32, 16, 3, None, SPLIT),
    "G16_chunks": (1, 70, 16, 1, 64, 32, 2, None, dict(schedule="split", chunk_tokens=24)),
    "G1_chunks": (1, 50, 2, 2, 32, 16, 2, None, dict(schedule="split", chunk_tokens=7)),
    "packed_G4_chunks": (1, 100, 8, 2, 32, 32, 2, [0, 5, 40, 41, 100], dict(schedule="split", chunk_tokens=16)),
    "packed_G4_chunks_plain": (1, 100, 8, 2, 32, 32, 2, [0, 5, 40, 41, 100],
                               dict(schedule="split", chunk_tokens=16, variant=PLAIN)),
    "packed_G4_chunks_prefetch": (1, 100, 8, 2, 32, 32, 2, [0, 5, 40, 41, 100],
                                  dict(schedule="split", chunk_tokens=16, variant=PREFETCH)),
    "G16_chunks_prefetch": (1, 70, 16, 1, 64, 32, 2, None, dict(schedule="split", chunk_tokens=24, variant=PREFETCH)),
    "batch2_G2_tail_plain": (2, 77, 4, 2, 32, 16, 3, None, dict(schedule="split", variant=PLAIN)),
    "G8_block64_D128": (1, 150, 8, 1, 128, 64, 2, None, SPLIT),
    "query_G16": (1, 70, 16, 1, 64, 32, 2, None, QUERY),
    "query_packed_G4": (1, 100, 8, 2, 32, 32, 2, [0, 5, 40, 41, 100], QUERY),
    "query_G2_union_tiles4": (1, 90, 4, 2, 32, 16, 4, None, dict(tokens_per_tile=4)),
    # a count of blocks that varies per (token, group), as the adaptive budgets select
    "variable_packed_G4_chunks": (1, 100, 8, 2, 32, 16, 5, [0, 5, 40, 41, 100],
                                  dict(schedule="split", chunk_tokens=16, variable=True)),
    "variable_batch2_G2_tail": (2, 77, 4, 2, 32, 16, 4, None, dict(schedule="split", variable=True)),
    "variable_query_packed_G4": (1, 100, 8, 2, 32, 16, 5, [0, 5, 40, 41, 100], dict(schedule="query", variable=True)),
}


def _run(case, dtype, device):
    B, T, Hq, Hkv, D, BS, K, cu, opts = case
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
    q = rand(B, T, Hq, D, dtype=dtype, device=device, requires_grad=True)
    k = rand(B, T, Hkv, D, dtype=dtype, device=device, requires_grad=True)
    v = rand(B, T, Hkv, D, dtype=dtype, device=device, requires_grad=True)
    opts = dict(opts)
    bidx = random_block_idx(B, T, Hkv, K, BS, cu_t, device, variable=opts.pop("variable", False))
    with launch_variant(attn_op.GPU_CONFIG, opts.pop("variant", None)):
        o, lse = kernels.msa_attention(q, k, v, bidx, BS, cu_seqlens=cu_t, **opts)
        do = torch.randn_like(o)
        dlse = torch.randn_like(lse)  # lse is an output too: check its gradient path
        grads = torch.autograd.grad([o, lse], [q, k, v], [do, dlse])

    ro, rlse = msa_attention_reference(q, k, v, bidx, BS, cu_t)
    rgrads = torch.autograd.grad([ro, rlse], [q, k, v], [do.float(), dlse])
    allowed = support_BHTT(bidx, B, T, Hkv, BS, cu_t, device)
    lo, llse = attention_lowp(q, k, v, allowed, 1 / math.sqrt(D), dtype)
    lgrads = torch.autograd.grad([lo, llse], [q, k, v], [do, dlse])

    assert o.dtype == dtype and lse.dtype == torch.float32
    assert_close("o", o, ro, lo, dtype)
    assert_close("lse", lse, rlse, llse, dtype)
    for name, g, rg, lg in zip(("dq", "dk", "dv"), grads, rgrads, lgrads):
        assert g.dtype == dtype
        assert_close(name, g, rg, lg, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference(case, dtype, device):
    _run(CASES[case], dtype, device)


@pytest.mark.parametrize("schedule", ["split", "query"])
def test_full_selection_equals_dense_causal_sdpa(schedule, device):
    # With every visible block selected, MSA attention is dense causal attention.
    B, T, Hq, Hkv, D, BS = 1, 96, 8, 2, 32, 32
    n_blocks = T // BS
    q = rand(B, T, Hq, D, dtype=torch.float32, device=device, requires_grad=True)
    k = rand(B, T, Hkv, D, dtype=torch.float32, device=device, requires_grad=True)
    v = rand(B, T, Hkv, D, dtype=torch.float32, device=device, requires_grad=True)
    local = torch.arange(T, device=device) // BS
    blocks = torch.arange(n_blocks, device=device)
    bidx = torch.where(blocks[None, :] <= local[:, None], blocks[None, :], -1).to(torch.int32)
    bidx = bidx[None, :, None, :].expand(B, T, Hkv, n_blocks).contiguous()
    o, _ = kernels.msa_attention(q, k, v, bidx, BS, schedule=schedule, chunk_tokens=40)
    G = Hq // Hkv
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(G, 2).transpose(1, 2), v.repeat_interleave(G, 2).transpose(1, 2),
        is_causal=True).transpose(1, 2)
    do = torch.randn_like(o)
    g = torch.autograd.grad(o, [q, k, v], do)
    rg = torch.autograd.grad(ref, [q, k, v], do)
    torch.testing.assert_close(o, ref, atol=2e-5, rtol=2e-5)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("schedule", ["split", "query"])
def test_backward_is_deterministic(schedule, device):
    B, T, Hq, Hkv, D, BS, K = 1, 64, 4, 1, 32, 16, 3
    q = rand(B, T, Hq, D, dtype=torch.float16, device=device, requires_grad=True)
    k = rand(B, T, Hkv, D, dtype=torch.float16, device=device, requires_grad=True)
    v = rand(B, T, Hkv, D, dtype=torch.float16, device=device, requires_grad=True)
    bidx = random_block_idx(B, T, Hkv, K, BS, None, device)
    do = torch.randn(B, T, Hq, D, device=device).half()
    runs = []
    for _ in range(2):
        o, _ = kernels.msa_attention(q, k, v, bidx, BS, schedule=schedule, chunk_tokens=24)
        runs.append(torch.autograd.grad(o, [q, k, v], do))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_reference_backend_has_same_semantics(device):
    B, T, Hq, Hkv, D, BS, K = 2, 40, 4, 2, 16, 16, 2
    q = rand(B, T, Hq, D, dtype=torch.float16, device=device, requires_grad=True)
    k = rand(B, T, Hkv, D, dtype=torch.float16, device=device, requires_grad=True)
    v = rand(B, T, Hkv, D, dtype=torch.float16, device=device, requires_grad=True)
    bidx = random_block_idx(B, T, Hkv, K, BS, None, device)
    o, lse = kernels.msa_attention(q, k, v, bidx, BS, backend="reference")
    assert o.dtype == torch.float16 and lse.dtype == torch.float32
    o.float().sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None
    ro, _ = kernels.msa_attention(q, k, v, bidx, BS)
    torch.testing.assert_close(o.float(), ro.float(), atol=2e-3, rtol=2e-3)


def _inputs(device, dtype=torch.float16):
    q = torch.randn(1, 32, 4, 16, device=device).to(dtype)
    k = torch.randn(1, 32, 2, 16, device=device).to(dtype)
    v = torch.randn(1, 32, 2, 16, device=device).to(dtype)
    bidx = random_block_idx(1, 32, 2, 2, 16, None, device)
    return q, k, v, bidx


@pytest.mark.parametrize("mutate, match", [
    (lambda a: a.update(q=a["q"][..., :8].contiguous()), "k and v must have shape"),
    (lambda a: a.update(k=a["k"].float()), "share a dtype"),
    (lambda a: a.update(q=a["q"].to(torch.int32)), "q must have dtype"),
    (lambda a: a.update(block_idx=a["block_idx"].long()), "block_idx must have dtype"),
    (lambda a: a.update(block_idx=a["block_idx"][:, :16]), "block_idx must have shape"),
    (lambda a: a.update(q=torch.randn(1, 32, 16, 8).half().transpose(2, 3)), "q must have shape|contiguous"),
    (lambda a: a.update(block_size=24), "block_size"),
    (lambda a: a.update(q=torch.randn(1, 32, 6, 16).half()), "multiple of k/v heads|power of two"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 32], dtype=torch.int64)), "cu_seqlens must have dtype"),
    (lambda a: a.update(backend="cuda"), "backend"),
    (lambda a: a.update(schedule="tiles"), "schedule must be one of"),
    (lambda a: a.update(schedule="split", tokens_per_tile=4), "tokens_per_tile applies to schedule='query'"),
    (lambda a: a.update(chunk_tokens=0), "chunk_tokens must be a positive int"),
])
def test_input_errors_name_the_argument(mutate, match, device):
    q, k, v, bidx = _inputs(device)
    args = dict(q=q, k=k, v=v, block_idx=bidx, block_size=16)
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=match):
        kernels.msa_attention(**args)


def test_bf16_in_the_interpreter_is_refused():
    if torch.cuda.is_available():
        pytest.skip("the interpreter is a CPU-only path")
    q, k, v, bidx = _inputs("cpu", torch.bfloat16)
    with pytest.raises(TypeError, match="bf16.*interpreter"):
        kernels.msa_attention(q, k, v, bidx, 16)
    o, _ = kernels.msa_attention(q, k, v, bidx, 16, backend="reference")  # the reference takes bf16
    assert o.dtype == torch.bfloat16


def test_cpu_without_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setattr(_common, "INTERPRETED", False)
    q, k, v, bidx = _inputs("cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*backend='reference'"):
        kernels.msa_attention(q, k, v, bidx, 16)


GPU_CASES = [  # (B, T, Hq, Hkv, D, block, topk, cu_seqlens), dtype
    pytest.param((1, 2048, 32, 2, 128, 128, 16, None), torch.bfloat16, id="bench_G16-bf16"),  # bench shape, scaled
    pytest.param((1, 2048, 32, 2, 128, 128, 16, None), torch.float16, id="bench_G16-fp16"),
    pytest.param((2, 1000, 16, 1, 64, 64, 8, None), torch.bfloat16, id="batch2_D64-bf16"),
    pytest.param((1, 3000, 16, 2, 128, 128, 16, [0, 100, 1100, 1101, 3000]), torch.bfloat16, id="packed-bf16"),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("opts", [dict(schedule="split"), dict(schedule="split", chunk_tokens=1024), QUERY,
                                  dict(schedule="split", variant=PLAIN), dict(schedule="split", variant=PREFETCH)],
                         ids=["split", "split_chunks1024", "query", "split_plain", "split_prefetch_hints"])
@pytest.mark.parametrize("shape, dtype", GPU_CASES)
def test_gpu_matches_reference(shape, dtype, opts):
    B, T, Hq, Hkv, D, BS, K, cu = shape
    _run((B, T, Hq, Hkv, D, BS, K, cu, opts), dtype, "cuda")
