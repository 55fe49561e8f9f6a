"""Test helpers: the same math as the kernels, done by plain PyTorch in a chosen (low) precision,
to set tolerances from numerics, plus the checks the kernel tests share.

Imported by tests/kernels/test_msa_*.py; run those with `pytest -q tests/kernels`.

The tolerance rule (flash-attention's): the kernel's max error against the fp32 reference must be
at most twice the max error of PyTorch doing the same math in the kernel's input precision
(matmul operands and probabilities rounded to that dtype, fp32 softmax), plus a floor of one
rounding of the largest value in that dtype (fp16/bf16 outputs are rounded once more than
PyTorch's sometimes are, and max-abs errors move in whole ulps). For fp32 the floor is 32 ulps:
PyTorch often sums in the reference's own order (error 0), while the kernel's fp32 sums over up
to ~1000 terms in another order differ by about sqrt(terms) ulps.

Shape legend: B batch, T tokens, H heads, G heads per group, D head dim, I index dim, K top-k slots.
"""
from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch

from kernels.attention import reference as attn_ref

FLOOR = {torch.float32: 32 * torch.finfo(torch.float32).eps, torch.float16: torch.finfo(torch.float16).eps,
         torch.bfloat16: torch.finfo(torch.bfloat16).eps}

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bf16 and large shapes)")


@contextlib.contextmanager
def launch_variant(table: dict, updates: dict | None):
    """Run with entries of an op's GPU_CONFIG updated (code-path switches such as the forward's
    prefetch take effect in the interpreter too), restoring the table afterwards."""
    saved = copy.deepcopy(table)
    for key, upd in (updates or {}).items():
        table[key] = {**table[key], **upd} if isinstance(table[key], dict) else upd
    try:
        yield
    finally:
        table.clear()
        table.update(saved)


def support_BHTT(block_idx_BTHK, B, T, H, block_size, cu_seqlens, device):
    """[B, H, T, T] bool: key j in a selected block of query t, j <= t, same sequence (all visible keys
    when block_idx is None). Built from the reference's own helper, independent of the kernels."""
    out = torch.zeros(B, H, T, T, dtype=torch.bool, device=device)
    for b, s0, e0 in attn_ref.sequences(B, T, cu_seqlens):
        L = e0 - s0
        pos = torch.arange(L, device=device)
        bidx = None if block_idx_BTHK is None else block_idx_BTHK[b, s0:e0]
        out[b, :, s0:e0, s0:e0] = attn_ref.allowed_keys(bidx, pos, L, block_size)
    return out


def attention_lowp(q, k, v, allowed_BHTT, scale, dtype):
    """Masked GQA attention with matmuls in `dtype` and an fp32 softmax (p rounded to `dtype`)."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    G = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(G, dim=2)
    v = v.repeat_interleave(G, dim=2)
    mask = allowed_BHTT.repeat_interleave(G, dim=1)
    s = torch.einsum("bthd,bshd->bhts", q, k).float() * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).to(dtype)
    o = torch.einsum("bhts,bshd->bthd", p, v)
    return o, lse.transpose(1, 2)


def kl_lowp(q, k, qi, ki, allowed_BHTT, lse_BTH, scale, dtype):
    """The KL loss with matmuls in `dtype` (teacher and student logits), fp32 softmax and sums."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    I = qi.shape[-1]
    with torch.no_grad():
        s = torch.einsum("bthd,bshd->bhts", q.to(dtype), k.to(dtype).repeat_interleave(G, dim=2)).float() * scale
        s = s.masked_fill(~allowed_BHTT.repeat_interleave(G, dim=1), float("-inf"))
        lse = torch.logsumexp(s, -1) if lse_BTH is None else lse_BTH.transpose(1, 2).float()
        p = torch.exp(s - lse[..., None]).view(B, Hkv, G, T, T).mean(2)
    z = torch.einsum("bthi,bsi->bhts", qi.to(dtype), ki.to(dtype)).float() / math.sqrt(I)
    log_pi = torch.log_softmax(z.masked_fill(~allowed_BHTT, float("-inf")), -1)
    pos = p > 0
    terms = torch.where(pos, p * (torch.log(torch.where(pos, p, 1.0)) - torch.where(pos, log_pi, 0.0)), 0.0)
    return terms.sum() / (B * T * Hkv)


def assert_close(name, out, ref, lowp, dtype):
    """max|out - ref| <= 2 max|lowp - ref| + floor * max|ref|; NaN never passes."""
    out, ref, lowp = out.double(), ref.double(), lowp.double()
    assert torch.isfinite(out).all(), f"{name}: non-finite values (an element left unwritten?)"
    err = (out - ref).abs().max().item()
    base = (lowp - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-30)
    tol = 2 * base + FLOOR[dtype] * scale
    assert err <= tol, f"{name}: max error {err:.3e} > tolerance {tol:.3e} (PyTorch {dtype} error {base:.3e})"


def rand(*shape, dtype, device, requires_grad=False):
    return torch.randn(*shape, device=device).to(dtype).requires_grad_(requires_grad)


def random_block_idx(B, T, H, topk, block_size, cu_seqlens=None, device="cpu", variable=False):
    """A valid selection in the contract's layout: top-(k-1) of random scores over the visible
    non-local blocks, then the local block in slot n_valid - 1, then -1. `variable`: each (token,
    head) keeps a random count in [1, n_valid] instead, as the adaptive budgets do."""
    out = torch.full((B, T, H, topk), -1, dtype=torch.int32)
    for b, s0, e0 in attn_ref.sequences(B, T, cu_seqlens):
        L = e0 - s0
        M = -(-L // block_size)
        local_L = torch.arange(L) // block_size
        score = torch.rand(L, H, M).masked_fill(torch.arange(M)[None, None, :] >= local_L[:, None, None], -1.0)
        kk = min(topk - 1, M)
        slots = torch.full((L, H, topk), -1, dtype=torch.long)
        n_other = local_L.clamp(max=topk - 1)[:, None].expand(L, H)
        if variable:
            n_other = (torch.rand(L, H) * (n_other + 1)).long()
        if kk > 0:
            top = torch.topk(score, kk, dim=-1).indices
            keep = torch.arange(kk)[None, None, :] < n_other[..., None]
            slots[..., :kk] = torch.where(keep, top, -1)
        is_local = torch.arange(topk)[None, None, :] == n_other[..., None]
        slots = torch.where(is_local, local_L[:, None, None], slots)
        out[b, s0:e0] = slots.to(torch.int32)
    return out.to(device)
