"""Benchmark of the MSA kernels against dense causal SDPA (cuDNN and flash backends, GQA) and
FlexAttention with a tile-shared block mask, in one run.

Run (GPU, from the repo root):   python -m benchmarks.msa_kernels [--check] [--sweep] [--out DIR]
CPU smoke test of this script:   TRITON_INTERPRET=1 python -m benchmarks.msa_kernels --smoke
scripts/kernels_gpu_check.sh runs it with the GPU tests, the sweep and an ncu profile in one go.

Measures forward, backward and forward+backward time (triton.testing.do_bench, median) and
achieved TFLOP/s, at T = 8K, 32K, 64K, 128K with Hq=32, Hkv=2 (G=16), dh=dI=128, block 128,
topk 16, bf16, batch 1. FLOPs follow docs/msa.md ("Measuring it"): attention forward 4*dh*Hq*E,
backward 10*dh*Hq*E, indexer 2*dI*Hkv*C, KL forward 2*(dh*Hq + dI*Hkv)*E and forward+backward
2*(dh*Hq + 3*dI*Hkv)*E, with E the attended (token, key) pairs per group and C the causal pairs.
With --check the GPU tests (`pytest -m gpu tests/kernels`) run first; --sweep times launch
variants of the split schedule's kernels at --sweep-t (64K) and keeps the fastest for the rest of the run.
Writes bench.json, bench.md (and the test log) to --out (default: runs/benchmarks/msa_kernels) and
prints the table last. Results measured on an H100 and their analysis: docs/perf/kernels_h100.md and
docs/perf/kernels_notes.md.

Shape legend: B batch, T tokens, H heads (Hq for q/o, Hkv for k/v/qi/block_idx), D head dim,
I index dim, K top-k slots, Q query tiles of 128 tokens, M key blocks.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch
import triton
import triton.language as tl

import kernels
from kernels.attention import op as attn_op
from kernels.kl import op as kl_op
from kernels.select import op as sel_op

HQ, HKV, DH, DI, BLOCK, TOPK = 32, 2, 128, 128, 128, 16
KL_SAMPLE = 0.25  # the sampled KL's fraction of query tokens in the rows that time it
BUDGET_K_MAX = 32  # slots of the adaptive budgets' rows (model.msa.topk as k_max)
BUDGET_QI_SCALE = 3.0  # index queries scaled so that block probabilities are peaked and top_p counts vary


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def bench_ms(fn, slow=False):
    """Median time in ms. CUDA: triton.testing.do_bench (events, L2 flushed between calls)."""
    if not torch.cuda.is_available():
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing

    # Slow calls (dense attention at long T) take ~1 s: do_bench's 5 estimate calls plus one
    # warm-up and one timed call is already 7 runs.
    return triton.testing.do_bench(fn, warmup=1 if slow else 25, rep=1 if slow else 100, return_mode="median")


def timed(name, fn, results, **extra):
    try:
        ms = fn()
        results.append(dict(name=name, ms=ms, **extra))
        print(f"  {name:<44s} {ms:10.3f} ms", flush=True)
        return ms
    except Exception as e:  # keep going: one broken baseline must not cost the whole run
        results.append(dict(name=name, ms=None, error=f"{type(e).__name__}: {e}"[:400], **extra))
        print(f"  {name:<44s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        return None


# ---------------------------------------------------------------------------------------------
# Selections and their pair counts
# ---------------------------------------------------------------------------------------------
def attended_pairs(block_idx_BTHK, block_size):
    """E: attended (token, key) pairs per group (mean over groups) of a per-token selection."""
    B, T, H, K = block_idx_BTHK.shape
    t = torch.arange(T, device=block_idx_BTHK.device)[None, :, None, None]
    b = block_idx_BTHK.long()
    keys = torch.clamp(t - b * block_size + 1, min=0, max=block_size)
    keys = torch.where(b >= 0, keys, 0)
    return keys.sum().item() / H


def tile_shared_selection(block_idx_BTHK, block_size, topk):
    """Per 128-token query tile and group: the tile's own block plus the topk-1 earlier blocks its
    tokens selected most often. Returns the per-token form (for our kernel) and the per-tile form."""
    B, T, H, K = block_idx_BTHK.shape
    dev = block_idx_BTHK.device
    M = -(-T // block_size)
    tile_T = torch.arange(T, device=dev) // block_size
    b = block_idx_BTHK.long()
    counts_QHM = torch.zeros(M, H, M + 1, device=dev)
    idx = torch.where(b >= 0, b, M)[0]  # [T, H, K]
    counts_QHM.index_put_((tile_T[:, None, None].expand_as(idx), torch.arange(H, device=dev)[None, :, None].expand_as(idx), idx),
                          torch.ones_like(idx, dtype=torch.float), accumulate=True)
    counts_QHM = counts_QHM[..., :M]
    q_tile = torch.arange(M, device=dev)
    earlier = torch.arange(M, device=dev)[None, :] < q_tile[:, None]  # [Q, M]
    # Ties broken towards recent blocks by a tiny bias; blocks no token chose still fill the tile.
    score = counts_QHM + 1e-3 * torch.arange(M, device=dev) / M
    score = score.masked_fill(~earlier[:, None, :], float("-inf"))
    kk = min(topk - 1, M)
    top_QHk = torch.topk(score, kk, dim=-1).indices
    n_other = torch.clamp(q_tile, max=topk - 1)
    keep = torch.arange(kk, device=dev)[None, None, :] < n_other[:, None, None]
    other_QHk = torch.where(keep, top_QHk, -1)
    sel_QHK = torch.full((M, H, topk), -1, dtype=torch.long, device=dev)
    sel_QHK[..., :kk] = other_QHk
    sel_QHK.scatter_(-1, n_other[:, None, None].expand(M, H, 1), q_tile[:, None, None].expand(M, H, 1))
    per_token = sel_QHK[tile_T][None].to(torch.int32).contiguous()  # [1, T, H, K]
    return per_token, other_QHk, n_other


def flex_block_mask(other_QHk, n_other, T, block_size, hq):
    from torch.nn.attention.flex_attention import BlockMask

    M, H, kk = other_QHk.shape
    G = hq // H
    dev = other_QHk.device
    # Partial blocks: the diagonal (causal inside); full blocks: the tile's other selections.
    kv_num = torch.ones(1, hq, M, dtype=torch.int32, device=dev)
    # Index tensors are [1, Hq, Q, M] (padded to the number of key blocks, as BlockMask expects).
    kv_idx = torch.zeros(1, hq, M, M, dtype=torch.int32, device=dev)
    kv_idx[..., 0] = torch.arange(M, dtype=torch.int32, device=dev)
    full = torch.sort(torch.where(other_QHk >= 0, other_QHk, M), dim=-1).values  # valid first
    full = torch.where(full >= M, 0, full).to(torch.int32)
    full_idx = torch.zeros(1, hq, M, M, dtype=torch.int32, device=dev)
    full_idx[..., :kk] = full.permute(1, 0, 2).repeat_interleave(G, 0)[None]
    full_num = n_other.to(torch.int32)[None, None, :].expand(1, hq, M).contiguous()

    # The mask_mod must describe the same mask (eager flex evaluates it everywhere; the compiled
    # kernel only inside partial blocks): selected block and causal.
    table_HQM = torch.zeros(hq, M, M + 1, dtype=torch.bool, device=dev)
    table_HQM.scatter_(-1, torch.where(other_QHk >= 0, other_QHk, M).permute(1, 0, 2).repeat_interleave(G, 0), True)
    table_HQM = table_HQM[..., :M] | torch.eye(M, dtype=torch.bool, device=dev)[None]

    def selected_causal(b, h, q_idx, kv_idx_):
        return table_HQM[h, q_idx // block_size, kv_idx_ // block_size] & (q_idx >= kv_idx_)

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=selected_causal,
                                    seq_lengths=(T, T))


def tile_union_size(block_idx_BTHK, tokens):
    """Mean number of distinct blocks selected by `tokens` consecutive tokens (per group)."""
    B, T, H, K = block_idx_BTHK.shape
    n = T // tokens
    b = block_idx_BTHK[0, : n * tokens].long().view(n, tokens, H, K).permute(0, 2, 1, 3).reshape(n, H, tokens * K)
    b = torch.sort(b, dim=-1).values
    distinct = (b[..., 1:] != b[..., :-1]) & (b[..., 1:] >= 0)
    return (distinct.sum(-1) + (b[..., 0] >= 0)).float().mean().item()


# ---------------------------------------------------------------------------------------------
# One sequence length
# ---------------------------------------------------------------------------------------------
def agreement(a_NHK, b_NHK) -> tuple[float, float]:
    """(share of rows whose selected sets are equal, share of b's selected blocks that a selects too)."""
    same = (a_NHK.sort(-1).values == b_NHK.sort(-1).values).all(-1).float().mean().item()
    valid = b_NHK >= 0
    hit = (b_NHK[..., :, None] == a_NHK[..., None, :]).any(-1) & valid
    return same, (hit.sum() / valid.sum()).item()


# Up to this length the FP8 and bf16 selections are also compared with the fp32 reference's (slow).
FP8_REF_T = 32768


def fp8_agreement(qi, ki, bs, K, bf16_idx, results, T):
    """How often FP8 index scores change the selected set: against the bf16 kernel's selection at
    every length, and (up to FP8_REF_T) both against the fp32 reference's, which puts the FP8
    rounding beside the bf16 rounding the default path already has."""
    from kernels.select.reference import msa_select_reference

    fp8_idx, _ = kernels.msa_select(qi, ki, bs, K, with_lse=False, fp8=True)
    rec = dict(name="fp8 selection agreement", op="select-agreement", T=T)
    rec["fp8_vs_bf16_same_set"], rec["fp8_vs_bf16_block_recall"] = agreement(fp8_idx, bf16_idx)
    if T <= FP8_REF_T:
        ref_idx, _ = msa_select_reference(qi.float(), ki.float(), bs, K)
        rec["fp8_vs_fp32_same_set"], rec["fp8_vs_fp32_block_recall"] = agreement(fp8_idx, ref_idx)
        rec["bf16_vs_fp32_same_set"], rec["bf16_vs_fp32_block_recall"] = agreement(bf16_idx, ref_idx)
    print("  fp8 selection: " + ", ".join(f"{k} {v:.4f}" for k, v in rec.items() if isinstance(v, float)), flush=True)
    results.append(rec)


def bench_seqlen(T, results, smoke=False, flex_compiled=None, dense=True, tm_variants=()):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float16
    hq, hkv, dh, di, bs, K = (HQ, HKV, DH, DI, BLOCK, TOPK) if not smoke else (8, 2, 32, 32, 32, 4)
    long_T = T >= 32768
    g = torch.Generator(device=dev).manual_seed(T)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=dev).to(dt)

    q, k, v = rnd(1, T, hq, dh), rnd(1, T, hkv, dh), rnd(1, T, hkv, dh)
    qi, ki = rnd(1, T, hkv, di), rnd(1, T, di)
    do = rnd(1, T, hq, dh)
    C = T * (T + 1) / 2
    print(f"T={T}", flush=True)
    tag = dict(T=T)

    # Selection
    block_idx, index_lse = kernels.msa_select(qi, ki, bs, K)
    E = attended_pairs(block_idx, bs)
    flops_sel = 2 * di * hkv * C
    timed("select fwd", lambda: bench_ms(lambda: kernels.msa_select(qi, ki, bs, K)), results,
               op="select", pass_="fwd", flops=flops_sel, **tag)
    # without the blocks' log-sum-exps (the model's default, msa.index_lse = "kl": the KL computes
    # the student's over the tokens it samples)
    timed("lse-free select fwd", lambda: bench_ms(lambda: kernels.msa_select(qi, ki, bs, K, with_lse=False)), results,
          op="select", pass_="fwd", flops=flops_sel, with_lse=False, **tag)
    # ranked on FP8 index scores (model.msa.select_fp8), and how often that changes the selection
    timed("fp8 select fwd", lambda: bench_ms(lambda: kernels.msa_select(qi, ki, bs, K, with_lse=False, fp8=True)),
          results, op="select", pass_="fwd", flops=flops_sel, with_lse=False, fp8=True, **tag)
    fp8_agreement(qi, ki, bs, K, block_idx, results, T)
    stats = dict(T=T, E_per_token=E / T, union_8tok=tile_union_size(block_idx, 8),
                 union_128tok=tile_union_size(block_idx, min(128, T)))
    print(f"  attended keys/token {E / T:.0f}; blocks in the union of 8 tokens {stats['union_8tok']:.1f}, "
          f"of 128 tokens {stats['union_128tok']:.1f}", flush=True)

    # Our attention, per-token selection (the default tile of one token x G heads)
    def our_attention(bidx, tm=None, name="msa attention", pattern="per-token", schedule=None):
        qq, kk_, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
        Ep = attended_pairs(bidx, bs)
        ff, fb = 4 * dh * hq * Ep, 10 * dh * hq * Ep
        sched = schedule or ("query" if tm else attn_op.GPU_CONFIG["schedule"]["name"])
        extra = dict(op="attention", pattern=pattern, tokens_per_tile=tm or 1, schedule=sched, **tag)

        def fwd():
            return kernels.msa_attention(qq, kk_, vv, bidx, bs, tokens_per_tile=tm, schedule=sched)

        timed(f"{name} fwd", lambda: bench_ms(fwd), results, pass_="fwd", flops=ff, **extra)
        o, lse = fwd()
        timed(f"{name} bwd", lambda: bench_ms(lambda: torch.autograd.grad(o, (qq, kk_, vv), do, retain_graph=True)),
              results, pass_="bwd", flops=fb, **extra)

        def fwdbwd():
            o2, _ = fwd()
            torch.autograd.grad(o2, (qq, kk_, vv), do)

        timed(f"{name} fwd+bwd", lambda: bench_ms(fwdbwd), results, pass_="fwd+bwd", flops=ff + fb, **extra)
        return o

    our_attention(block_idx)
    if attn_op.GPU_CONFIG["schedule"]["name"] != "query":
        our_attention(block_idx, None, "msa attention [query schedule]", schedule="query")
    for tm in tm_variants:
        our_attention(block_idx, tm, f"msa attention [query schedule], {tm}-token tiles")

    # Selection + attention forward+backward (what a training step pays per layer, minus KL)
    qq, kk_, vv = (x.detach().requires_grad_(True) for x in (q, k, v))

    def sel_attn():
        bidx, _ = kernels.msa_select(qi, ki, bs, K)
        o2, _ = kernels.msa_attention(qq, kk_, vv, bidx, bs)
        torch.autograd.grad(o2, (qq, kk_, vv), do)

    timed("select + attention fwd+bwd", lambda: bench_ms(sel_attn), results, op="select+attention",
          pass_="fwd+bwd", flops=flops_sel + 14 * dh * hq * E, **tag)

    # KL as the model calls it (lse from the attention, index_lse from the selection)
    with torch.no_grad():
        _, lse = kernels.msa_attention(q, k, v, block_idx, bs)
    qi_g, ki_g = qi.detach().requires_grad_(True), ki.detach().requires_grad_(True)
    kf, kfb = 2 * (dh * hq + di * hkv) * E, 2 * (dh * hq + 3 * di * hkv) * E
    kl_default = kl_op.GPU_CONFIG["schedule"]["name"]
    for sched in [kl_default] + (["query"] if kl_default != "query" else []):
        name = "kl" if sched == kl_default else f"kl [{sched} schedule]"

        def kl_fwd(sched=sched):
            return kernels.msa_kl_loss(q, k, qi_g, ki_g, block_idx, bs, lse=lse, index_lse=index_lse, schedule=sched)

        kx = dict(op="kl", schedule=sched, **tag)
        timed(f"{name} fwd", lambda: bench_ms(kl_fwd), results, pass_="fwd", flops=kf, **kx)
        loss = kl_fwd()
        timed(f"{name} bwd",
              lambda loss=loss: bench_ms(lambda: torch.autograd.grad(loss, (qi_g, ki_g), retain_graph=True)),
              results, pass_="bwd", flops=kfb - kf, **kx)
        timed(f"{name} fwd+bwd", lambda: bench_ms(lambda: torch.autograd.grad(kl_fwd(), (qi_g, ki_g))), results,
              pass_="fwd+bwd", flops=kfb, **kx)

    # The KL on a quarter of the query tokens (model.msa.kl_sample): rows of -1 have an empty support
    keep_T = torch.rand(T, device=q.device, generator=torch.Generator(device=q.device).manual_seed(5)) < KL_SAMPLE

    def sampled(bidx):
        return torch.where(keep_T[None, :, None, None], bidx, -1)

    kls = dict(op="kl", schedule=kl_default, kl_sample=KL_SAMPLE, **tag)
    timed(f"kl, sampled {KL_SAMPLE:g} fwd+bwd", lambda: bench_ms(lambda: torch.autograd.grad(
        kernels.msa_kl_loss(q, k, qi_g, ki_g, sampled(block_idx), bs, lse=lse, index_lse=index_lse) / KL_SAMPLE,
        (qi_g, ki_g))), results, pass_="fwd+bwd", flops=kfb * KL_SAMPLE, **kls)
    timed(f"kl computing index lse, sampled {KL_SAMPLE:g} fwd+bwd", lambda: bench_ms(lambda: torch.autograd.grad(
        kernels.msa_kl_loss(q, k, qi_g, ki_g, sampled(block_idx), bs, lse=lse) / KL_SAMPLE,
        (qi_g, ki_g))), results, pass_="fwd+bwd", flops=kfb * KL_SAMPLE, index_lse_in="kl", **kls)

    # What a training step pays per MSA layer in these kernels: select + attention + KL, fwd+bwd.
    # lse_in: where the student's log-sum-exp comes from (model.msa.index_lse)
    def sel_attn_kl(fraction, lse_in="select"):
        bidx, ilse = kernels.msa_select(qi, ki, bs, K, with_lse=lse_in == "select")
        o2, lse2 = kernels.msa_attention(qq, kk_, vv, bidx, bs)
        torch.autograd.grad(o2, (qq, kk_, vv), do)
        kl_idx = bidx if fraction == 1 else sampled(bidx)
        kl = kernels.msa_kl_loss(q, k, qi_g, ki_g, kl_idx, bs, lse=lse2.detach(), index_lse=ilse) / fraction
        torch.autograd.grad(kl, (qi_g, ki_g))

    for fraction, lse_in in ((1.0, "select"), (KL_SAMPLE, "select"), (1.0, "kl"), (KL_SAMPLE, "kl")):
        name = ("lse-free " if lse_in == "kl" else "") + "select + attention + kl" + (
            "" if fraction == 1 else f" (kl sampled {fraction:g})")
        timed(f"{name} fwd+bwd", lambda fraction=fraction, lse_in=lse_in: bench_ms(lambda: sel_attn_kl(fraction, lse_in)),
              results, op="select+attention+kl", pass_="fwd+bwd", kl_sample=fraction, index_lse_in=lse_in,
              flops=flops_sel + 14 * dh * hq * E + kfb * fraction, **tag)

    # Tile-shared selection: our kernel on FlexAttention's pattern, tiles of 1 and of 8 tokens
    shared_idx, other_QHk, n_other = tile_shared_selection(block_idx, bs, K)
    o_shared = our_attention(shared_idx, None, "msa attention, tile-shared sel.", "tile-shared")
    our_attention(shared_idx, 8, "msa attention [query schedule], tile-shared sel., 8-token tiles", "tile-shared")

    # Dense causal SDPA, GQA (cuDNN and flash backends)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)] if dev == "cuda" \
        else [("math", SDPBackend.MATH)]
    if not dense:
        backends = []
    fd, fbd = 4 * dh * hq * C, 10 * dh * hq * C
    qt = q.transpose(1, 2).detach().requires_grad_(True)
    kt = k.transpose(1, 2).detach().requires_grad_(True)
    vt = v.transpose(1, 2).detach().requires_grad_(True)
    dot_ = do.transpose(1, 2)
    for name, backend in backends:
        def run(gqa=True, bwd=False):
            with sdpa_kernel([backend]):
                if gqa:
                    o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
                else:
                    o = torch.nn.functional.scaled_dot_product_attention(qt, ke, ve, is_causal=True)
                if bwd:
                    torch.autograd.grad(o, (qt, kt, vt) if gqa else (qt, ke, ve), dot_)
            return o

        gqa = True
        try:
            run(True, True)
        except Exception as e:  # backend without GQA: give it K/V expanded to Hq heads (outside the timing)
            print(f"  sdpa {name}: enable_gqa failed ({type(e).__name__}); using K/V expanded to {hq} heads")
            gqa = False
            ke = kt.detach().repeat_interleave(hq // hkv, 1).requires_grad_(True)
            ve = vt.detach().repeat_interleave(hq // hkv, 1).requires_grad_(True)
        label = f"dense sdpa {name}" + ("" if gqa else " (kv expanded)")
        ex = dict(op="dense", backend=name, **tag)
        f_ms = timed(f"{label} fwd", lambda: bench_ms(lambda: run(gqa), slow=long_T), results, pass_="fwd", flops=fd, **ex)
        fb_ms = timed(f"{label} fwd+bwd", lambda: bench_ms(lambda: run(gqa, True), slow=long_T), results,
                      pass_="fwd+bwd", flops=fd + fbd, **ex)
        if f_ms and fb_ms:
            results.append(dict(name=f"{label} bwd (fwd+bwd - fwd)", ms=fb_ms - f_ms, pass_="bwd", flops=fbd, **ex))

    # FlexAttention, block mask with 16 blocks per 128-query tile
    if (dev == "cuda" and flex_compiled is not None) or smoke:
        try:
            from torch.nn.attention.flex_attention import flex_attention

            flex = flex_compiled or flex_attention
            t0 = time.time()
            bm = flex_block_mask(other_QHk, n_other, T, bs, hq)
            Ef = attended_pairs(shared_idx, bs)
            ex = dict(op="flex", pattern="tile-shared", **tag)

            def fflex(bwd=False):
                o = flex(qt, kt, vt, block_mask=bm, enable_gqa=True)
                if bwd:
                    torch.autograd.grad(o, (qt, kt, vt), dot_)
                return o

            o_flex = fflex(dev == "cuda")  # compile forward and backward (no flex backward on CPU)
            print(f"  flex mask + compile {time.time() - t0:.1f} s", flush=True)
            err = (o_flex.transpose(1, 2).float() - o_shared.float()).abs().max().item()
            print(f"  flex vs msa attention on the same tile-shared selection: max |diff| {err:.3e}", flush=True)
            stats["flex_vs_msa_maxdiff"] = err
            timed("flex attention (tile-shared) fwd", lambda: bench_ms(fflex), results, pass_="fwd",
                  flops=4 * dh * hq * Ef, **ex)
            timed("flex attention (tile-shared) fwd+bwd", lambda: bench_ms(lambda: fflex(True)), results,
                  pass_="fwd+bwd", flops=14 * dh * hq * Ef, **ex)
        except Exception as e:
            results.append(dict(name="flex attention", ms=None, error=f"{type(e).__name__}: {e}"[:400], **tag))
            print(f"  flex FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    del q, k, v, do, qt, kt, vt
    if dev == "cuda":
        torch.cuda.empty_cache()
    return stats


# ---------------------------------------------------------------------------------------------
# Launch-variant sweep of the attention kernels
# ---------------------------------------------------------------------------------------------
_FWD = dict(BN=128, rows=64, num_warps=4, num_stages=1, prefetch=False, q_evict="", part_cache="")
_BWD = dict(BN=128, rows=64, num_warps=8, num_stages=3, q_evict="", part_cache="")
_MERGE = dict(BN=128, rows=16, num_warps=4, num_stages=1, part_evict="")
_HINTS = dict(q_evict="evict_last", part_cache=".cs")  # keep the chunk's q in L2, stream the partials
SWEEP = [  # (op, its GPU_CONFIG key (None: the variant updates the whole table), variants, pass timed);
    # the other kernels are the same in every variant, and later entries run with the winners
    # Measured slower and dropped (docs/perf/kernels_notes.md): 32-row forward steps (mma.sync, 3 programs per
    # SM), 3 forward stages, the backward's token prefetch, 5 backward stages; the KL forward's
    # token prefetch.
    ("attention", "fwd_split", [{**_FWD, **_HINTS, "prefetch": True}, _FWD], "fwd"),
    ("attention", "bwd_split", [{**_BWD, "part_cache": ".cs"}, {**_BWD, "part_cache": ".cs", "num_stages": 2}], "bwd"),
    ("attention", "merge", [_MERGE, {**_MERGE, "part_evict": "evict_first"}], "fwd+bwd"),
    ("attention", "schedule", [dict(name="split", chunk_tokens=None), dict(name="split", chunk_tokens=2048),
                               dict(name="split", chunk_tokens=8192)], "fwd+bwd"),
    ("kl", "fwd_split", [dict(BN=128, rows=64, num_warps=8, num_stages=1), dict(BN=128, rows=64, num_warps=4, num_stages=1)],
     "fwd"),
    ("kl", "bwd_split", [dict(BN=128, rows=64, num_warps=8, num_stages=3, prefetch=True),
                         dict(BN=128, rows=64, num_warps=8, num_stages=3, prefetch=False)], "bwd"),
    ("select", None, [dict(num_stages=3, rows=128, pipe=True), dict(num_stages=3, rows=64, pipe=True),
                      dict(num_stages=3, rows=128, pipe=False)], "fwd"),
]


def sweep(T, results):
    """Time each launch variant of the split schedules (and the selection's stages) at T and keep
    the fastest (ties: the first, the current default)."""
    configs = {"attention": attn_op.GPU_CONFIG, "kl": kl_op.GPU_CONFIG, "select": sel_op.GPU_CONFIG}
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (a check of this function)
    dt = torch.bfloat16 if dev == "cuda" else torch.float16
    g = torch.Generator(device=dev).manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g, device=dev).to(dt)  # noqa: E731
    q, k, v, do = rnd(1, T, HQ, DH), rnd(1, T, HKV, DH), rnd(1, T, HKV, DH), rnd(1, T, HQ, DH)
    qi, ki = rnd(1, T, HKV, DI), rnd(1, T, DI)
    bidx, ilse = kernels.msa_select(qi, ki, BLOCK, TOPK)
    with torch.no_grad():
        _, lse = kernels.msa_attention(q, k, v, bidx, BLOCK)
    q, k, v, qi, ki = (x.requires_grad_(True) for x in (q, k, v, qi, ki))
    passes = {
        "attention": (lambda: kernels.msa_attention(q, k, v, bidx, BLOCK)[0], (q, k, v), do),
        "kl": (lambda: kernels.msa_kl_loss(q.detach(), k.detach(), qi, ki, bidx, BLOCK, lse=lse, index_lse=ilse),
               (qi, ki), None),
        "select": (lambda: kernels.msa_select(qi.detach(), ki.detach(), BLOCK, TOPK), None, None),
    }
    print(f"sweep at T={T}", flush=True)
    best = {}
    for op, key, variants, pass_ in SWEEP:
        fwd, inputs, grad_out = passes[op]
        times = []
        for cfg in variants:
            if key is None:
                configs[op].update(cfg)
            else:
                configs[op][key] = cfg
            if pass_ == "fwd":
                fn = fwd
            elif pass_ == "bwd":
                out = fwd()
                fn = lambda out=out: torch.autograd.grad(out, inputs, grad_out, retain_graph=True)  # noqa: E731
            else:
                fn = lambda: torch.autograd.grad(fwd(), inputs, grad_out)  # noqa: E731
            ms = timed(f"sweep {op} {key} {cfg}", lambda: bench_ms(fn), results, op="sweep", kernel=f"{op}.{key}",
                       cfg=cfg, T=T)
            times.append((ms if ms is not None else float("inf"), cfg))
        won = min(times, key=lambda x: x[0])[1]  # later entries use the winners
        if key is None:
            configs[op].update(won)
        else:
            configs[op][key] = won
        best[op if key is None else f"{op}.{key}"] = won
    print(f"  chosen {best}", flush=True)
    return best


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _match(mean_blocks, lo, hi, target, steps=14):
    """Bisection for the parameter in [lo, hi] whose mean blocks per token (increasing in it) is target."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_blocks(mid) < target else (lo, mid)
    return (lo + hi) / 2


def bench_budgets(T, results, smoke=False):
    """The adaptive selection budgets at the same mean blocks per (token, group) as static top-k:
    select, attention and select + attention + KL, forward+backward, each beside static top-k on
    the same inputs (kernels/select/budget.py; the target: top_p within 15% of static's time)."""
    from kernels import Budget

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float16
    hq, hkv, dh, di, bs, K = (HQ, HKV, DH, DI, BLOCK, TOPK) if not smoke else (8, 2, 32, 32, 32, 4)
    k_max = min(BUDGET_K_MAX if not smoke else 2 * K, -(-T // bs))
    g = torch.Generator(device=dev).manual_seed(T + 1)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, device=dev)).to(dt)

    q, k, v = (rnd(1, T, h, dh).requires_grad_(True) for h in (hq, hkv, hkv))
    qi, ki = rnd(1, T, hkv, di, scale=BUDGET_QI_SCALE), rnd(1, T, di)
    qi_g, ki_g = qi.detach().requires_grad_(True), ki.detach().requires_grad_(True)
    do = rnd(1, T, hq, dh)

    def blocks(budget, topk):
        bidx, _ = kernels.msa_select(qi, ki, bs, topk, budget=budget)
        n = (bidx >= 0).sum(-1).float()
        return float(n.mean()), float(n.std())

    target, _ = blocks(None, K)
    steps = 4 if smoke else 14
    ratio = _match(lambda r: blocks(Budget("ratio", k_min=1, ratio=r), k_max)[0], 1e-3, 1.0, target, steps)
    p = _match(lambda x: blocks(Budget("top_p", k_min=1, p=x), k_max)[0], 1e-3, 1.0, target, steps)
    print(f"  budgets at {target:.2f} blocks/token: ratio {ratio:.4f}, top_p p {p:.4f}", flush=True)
    for name, budget, topk in (("static", None, K), ("ratio", Budget("ratio", k_min=1, ratio=ratio), k_max),
                               ("top_p", Budget("top_p", k_min=1, p=p), k_max)):
        mean, std = blocks(budget, topk)
        tag = dict(T=T, budget=name, k_max=topk, blocks_mean=mean, blocks_std=std,
                   budget_param=None if budget is None else (budget.ratio if name == "ratio" else budget.p))
        bidx, ilse = kernels.msa_select(qi, ki, bs, topk, budget=budget)
        E = attended_pairs(bidx, bs)
        timed(f"[{name} budget] select fwd", lambda: bench_ms(lambda: kernels.msa_select(qi, ki, bs, topk, budget=budget)),
              results, op="budget select", pass_="fwd", **tag)

        def attn():
            o, _ = kernels.msa_attention(q, k, v, bidx, bs)
            torch.autograd.grad(o, (q, k, v), do)

        timed(f"[{name} budget] attention fwd+bwd", lambda: bench_ms(attn), results, op="budget attention",
              pass_="fwd+bwd", flops=14 * dh * hq * E, **tag)

        def sel_attn_kl():
            b2, il2 = kernels.msa_select(qi, ki, bs, topk, budget=budget)
            o, lse = kernels.msa_attention(q, k, v, b2, bs)
            torch.autograd.grad(o, (q, k, v), do)
            kl = kernels.msa_kl_loss(q.detach(), k.detach(), qi_g, ki_g, b2, bs, lse=lse.detach(), index_lse=il2)
            torch.autograd.grad(kl, (qi_g, ki_g))

        timed(f"[{name} budget] select + attention + kl fwd+bwd", lambda: bench_ms(sel_attn_kl), results,
              op="budget select+attention+kl", pass_="fwd+bwd", **tag)


def budget_table(results, seqlens):
    """The budgets' rows against static top-k on the same inputs: time and ratio to static."""
    rows = [r for r in results if r.get("op", "").startswith("budget ") and r.get("ms")]
    if not rows:
        return ""
    lines = ["| T | budget | k_max | parameter | blocks/token (mean ± std) | op | ms | vs static |",
             "|---|---|---|---|---|---|---|---|"]
    for t in seqlens:
        for r in (x for x in rows if x["T"] == t):
            base = next((x["ms"] for x in rows if x["T"] == t and x["budget"] == "static" and x["op"] == r["op"]), None)
            param = "" if r["budget_param"] is None else f"{r['budget_param']:.4f}"
            lines.append(f"| {_k(t)} | {r['budget']} | {r['k_max']} | {param} | {r['blocks_mean']:.2f} ± "
                         f"{r['blocks_std']:.2f} | {r['op'][7:]} {r['pass_']} | {r['ms']:.2f} | "
                         f"{r['ms'] / base:.2f}x |" if base else "")
    return "\n".join(lines)


def table(results, seqlens):
    """Markdown table: rows = op/pass, columns = T (ms, TFLOP/s)."""
    names = []
    for r in results:
        if r.get("op") in ("sweep", "select-agreement") or r.get("op", "").startswith("budget "):
            continue
        if r["name"] not in names:
            names.append(r["name"])
    head = "| op | " + " | ".join(f"T={_k(t)} ms (TFLOP/s)" for t in seqlens) + " |"
    lines = [head, "|" + "---|" * (len(seqlens) + 1)]
    for n in names:
        cells = []
        for t in seqlens:
            r = next((x for x in results if x["name"] == n and x.get("T") == t), None)
            if r is None:
                cells.append("")
            elif r.get("ms") is None:
                cells.append("failed")
            else:
                tf = r.get("flops", 0) / (r["ms"] * 1e-3) / 1e12 if r.get("flops") else None
                cells.append(f"{r['ms']:.2f}" + (f" ({tf:.0f})" if tf is not None else ""))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(results, seqlens):
    """Speed-ups against the fastest dense backend of the same run (the goals in docs/perf/kernels_notes.md)."""
    def ms(name_prefix, t, pass_="fwd+bwd", op=None):
        xs = [r["ms"] for r in results if r.get("T") == t and r.get("pass_") == pass_ and r.get("ms")
              and r["name"].startswith(name_prefix) and (op is None or r.get("op") == op)]
        return min(xs) if xs else None

    lines = ["| T | dense best fwd+bwd ms | attention speed-up | select+attention vs dense | "
             "select+attention+KL vs dense | same, KL sampled | same, index lse in the KL | attention / flex | "
             "select / attention fwd | lse-free select / attention fwd | fp8 select / attention fwd |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in seqlens:
        dense = ms("dense sdpa", t)
        att = ms("msa attention fwd+bwd", t)
        sa = ms("select + attention fwd+bwd", t)
        sak = ms("select + attention + kl fwd+bwd", t)
        saks = ms("select + attention + kl (kl sampled", t)
        flex = ms("flex attention", t)
        saksl = ms("lse-free select + attention + kl (kl sampled", t)
        sel = ms("select fwd", t, "fwd")
        sell = ms("lse-free select fwd", t, "fwd")
        sel8 = ms("fp8 select fwd", t, "fwd")
        attf = ms("msa attention fwd", t, "fwd")
        f = lambda a, b: f"{a / b:.2f}" if a and b else "n/a"  # noqa: E731
        lines.append(f"| {_k(t)} | {dense:.1f} | {f(dense, att)}x | {f(dense, sa)}x | {f(dense, sak)}x | "
                     f"{f(dense, saks)}x | {f(dense, saksl)}x | {f(att, flex)} | {f(sel, attf)} | {f(sell, attf)} | "
                     f"{f(sel8, attf)} |" if dense else f"| {_k(t)} | n/a | | | | | | | | | |")
    return "\n".join(lines)


def _k(t):
    return f"{t // 1024}K" if t % 1024 == 0 else str(t)


def device_info():
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, python=sys.version.split()[0])
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1))
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as e:
            info["nvidia_smi"] = str(e)
    return info


@triton.jit
def _probe_kernel(x_ptr, idx_ptr, out_ptr, n_iter, ROWS: tl.constexpr, D: tl.constexpr):
    pid = tl.program_id(0)
    r = tl.arange(0, ROWS)
    d = tl.arange(0, D)
    acc = tl.zeros([ROWS, D], tl.float32)
    for i in range(n_iter):
        blk = tl.load(idx_ptr + pid * n_iter + i)
        acc += tl.load(x_ptr + (blk * ROWS + r)[:, None] * D + d[None, :]).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(tl.sum(acc, 1), 0))


def l2_probe(results):
    """Achievable gather bandwidth for the attention forward's access pattern: programs that each
    read random [128, 128] bf16 blocks (32 KB, like one K or V block) from a buffer of a given size,
    with no math. Buffers below the 50 MB L2 measure L2 -> SM; larger ones mix in DRAM."""
    n_prog, n_iter = 132 * 8, 256
    out = {}
    for mb in (16, 32, 64, 128, 1024):
        n_blocks = mb * 2**20 // (128 * 128 * 2)
        x = torch.randn(n_blocks * 128, 128, device="cuda", dtype=torch.bfloat16)
        idx = torch.randint(0, n_blocks, (n_prog * n_iter,), device="cuda", dtype=torch.int32)
        o = torch.empty(n_prog, device="cuda")
        fn = lambda: _probe_kernel[(n_prog,)](x, idx, o, n_iter, ROWS=128, D=128, num_warps=4, num_stages=3)  # noqa: E731
        fn()
        torch.cuda.synchronize()
        # No L2 flush between calls (unlike do_bench): the buffer is meant to stay resident.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            fn()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / 10
        tb_s = n_prog * n_iter * 128 * 128 * 2 / (ms * 1e-3) / 1e12
        out[f"gather_{mb}MB_tb_s"] = tb_s
        results.append(dict(name=f"probe: random 32 KB block gathers from {mb} MB", ms=ms, op="probe", tb_s=tb_s))
        print(f"  gather bandwidth, {mb:5d} MB buffer: {tb_s:.2f} TB/s", flush=True)
    return out


def ceilings():
    """Measured ceilings of this card: bf16 matmul rate and device-to-device copy bandwidth."""
    import triton.testing

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    x = torch.randn(2**28, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    cp = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    return dict(bf16_matmul_tflops=2 * 8192**3 / (mm * 1e-3) / 1e12, copy_tb_s=2 * x.numel() * 4 / (cp * 1e-3) / 1e12)


def profile_run(T):
    """One select + attention fwd/bwd + KL fwd/bwd at T, after a warm-up, between
    cudaProfilerStart/Stop (for `ncu --profile-from-start off`, see scripts/kernels_gpu_check.sh)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda").to(torch.bfloat16)  # noqa: E731
    q, k, v, do = rnd(1, T, HQ, DH), rnd(1, T, HKV, DH), rnd(1, T, HKV, DH), rnd(1, T, HQ, DH)
    qi, ki = rnd(1, T, HKV, DI).requires_grad_(True), rnd(1, T, DI).requires_grad_(True)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))

    def step():
        bidx, ilse = kernels.msa_select(qi.detach(), ki.detach(), BLOCK, TOPK)
        o, lse = kernels.msa_attention(q, k, v, bidx, BLOCK)
        torch.autograd.grad(o, (q, k, v), do)
        kl = kernels.msa_kl_loss(q, k, qi, ki, bidx, BLOCK, lse=lse.detach(), index_lse=ilse)
        torch.autograd.grad(kl, (qi, ki))

    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def breakdown(T, results, chunks=()):
    """Where the split schedule's time goes at T: CUDA time per kernel (torch.profiler) of one
    selection + attention forward+backward, and fwd / bwd / fwd+bwd for each query-chunk size in `chunks`."""
    g = torch.Generator(device="cuda").manual_seed(2)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda").to(torch.bfloat16)  # noqa: E731
    q, k, v, do = rnd(1, T, HQ, DH), rnd(1, T, HKV, DH), rnd(1, T, HKV, DH), rnd(1, T, HQ, DH)
    bidx, _ = kernels.msa_select(rnd(1, T, HKV, DI), rnd(1, T, DI), BLOCK, TOPK)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    print(f"breakdown at T={T}", flush=True)
    for ch in chunks:
        fwd = lambda ch=ch: kernels.msa_attention(q, k, v, bidx, BLOCK, schedule="split", chunk_tokens=ch)  # noqa: E731
        o, _ = fwd()
        tag = dict(op="chunk-scan", T=T, chunk_tokens=ch)
        timed(f"chunk {ch} fwd", lambda: bench_ms(fwd), results, pass_="fwd", **tag)
        timed(f"chunk {ch} bwd", lambda: bench_ms(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True)),
              results, pass_="bwd", **tag)
        timed(f"chunk {ch} fwd+bwd", lambda: bench_ms(lambda: torch.autograd.grad(fwd()[0], (q, k, v), do)),
              results, pass_="fwd+bwd", **tag)
        del o
    from torch.profiler import ProfilerActivity, profile

    qi, ki = rnd(1, T, HKV, DI), rnd(1, T, DI)
    timed("select fwd (alone)", lambda: bench_ms(lambda: kernels.msa_select(qi, ki, BLOCK, TOPK)), results,
          op="breakdown", T=T)

    def step():
        kernels.msa_select(qi, ki, BLOCK, TOPK)
        o, _ = kernels.msa_attention(q, k, v, bidx, BLOCK)
        torch.autograd.grad(o, (q, k, v), do)

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    rows = {}
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        if t > 0:
            rows[ev.key] = rows.get(ev.key, 0.0) + t / 3 / 1e3
    total = sum(rows.values())
    for name, ms in sorted(rows.items(), key=lambda x: -x[1])[:14]:
        results.append(dict(name=f"kernel {name[:60]}", ms=ms, op="breakdown", T=T))
        print(f"  {ms:8.3f} ms {100 * ms / total:5.1f}%  {name[:90]}", flush=True)
    print(f"  {total:8.3f} ms in kernels (one fwd+bwd)", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqlens", default="8192,32768,65536,131072")
    ap.add_argument("--check", action="store_true", help="run the GPU tests first")
    ap.add_argument("--sweep", action="store_true", help="pick attention launch variants at --sweep-t first")
    ap.add_argument("--sweep-t", type=int, default=65536)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter): checks this script")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense SDPA baselines")
    ap.add_argument("--budget-seqlens", default="65536",
                    help="T values at which to time the adaptive selection budgets against static top-k ('' = none)")
    ap.add_argument("--tm-variants", default="", help="also time per-token selection with these tokens_per_tile")
    ap.add_argument("--l2-probe", action="store_true", help="measure gather bandwidth by buffer size")
    ap.add_argument("--breakdown", default="", help="T values: per-kernel time of the split schedule, then exit")
    ap.add_argument("--chunks", default="", help="with --breakdown: query-chunk sizes to time")
    ap.add_argument("--profile", type=int, default=0, help="run one training step of the ops at this T for ncu")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip sequence lengths that start after this")
    ap.add_argument("--out", default=os.path.join("runs", "benchmarks", "msa_kernels"))
    args = ap.parse_args(argv)
    if args.profile:
        profile_run(args.profile)
        return 0
    if args.breakdown:
        results = []
        for T in (int(x) for x in args.breakdown.split(",")):
            breakdown(T, results, [int(x) for x in args.chunks.split(",") if x])
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "breakdown.json"), "w") as f:
            json.dump(dict(info=device_info(), results=results), f, indent=1)
        return 0
    t_begin = time.time()
    os.makedirs(args.out, exist_ok=True)
    seqlens = [int(x) for x in args.seqlens.split(",")] if not args.smoke else [130, 200]
    budget_seqlens = {int(x) for x in args.budget_seqlens.split(",") if x} if not args.smoke else {200}
    info = device_info()
    print(json.dumps(info), flush=True)
    tests_ok = None
    if args.check:
        log = os.path.join(args.out, "gpu_tests.log")
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/kernels", "-p", "no:cacheprovider"]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        open(log, "w").write(proc.stdout + proc.stderr)
        tests_ok = proc.returncode == 0
        print(proc.stdout[-3000:], flush=True)
        print(f"GPU tests {'passed' if tests_ok else 'FAILED'} in {time.time() - t0:.0f} s", flush=True)
    results = []
    if torch.cuda.is_available():
        info.update(ceilings())
        print(f"ceilings: bf16 matmul {info['bf16_matmul_tflops']:.0f} TFLOP/s, copy {info['copy_tb_s']:.2f} TB/s",
              flush=True)
    if args.l2_probe and torch.cuda.is_available():
        info.update(l2_probe(results))
    if args.sweep and torch.cuda.is_available():
        info["chosen_config"] = sweep(args.sweep_t, results)
    flex_compiled = None
    if torch.cuda.is_available() and not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex_compiled = torch.compile(flex_attention, dynamic=False)
    stats = []
    t_start = time.time()
    for T in seqlens:
        if time.time() - t_begin > args.budget_s:
            print(f"T={T} skipped: past --budget-s", flush=True)
            continue
        stats.append(bench_seqlen(T, results, smoke=args.smoke, flex_compiled=None if args.no_flex else flex_compiled,
                                  dense=not args.no_dense, tm_variants=[int(x) for x in args.tm_variants.split(",") if x]))
        if T in budget_seqlens:
            bench_budgets(T, results, smoke=args.smoke)
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump(dict(info=info, tests_ok=tests_ok, stats=stats, results=results), f, indent=1)
    print(f"benchmark {time.time() - t_start:.0f} s", flush=True)
    md = [f"Device: {info.get('device', 'cpu')} ({info.get('nvidia_smi', '')}); torch {info['torch']}, "
          f"triton {info.get('triton')}; {info['date']}",
          f"GPU tests: {'passed' if tests_ok else ('FAILED' if tests_ok is False else 'not run')}",
          "", table(results, seqlens), "", ratios(results, seqlens), "", budget_table(results, seqlens), "",
          "Selection statistics: " + json.dumps(stats)]
    text = "\n".join(md)
    open(os.path.join(args.out, "bench.md"), "w").write(text + "\n")
    print("\n" + text, flush=True)
    return 0 if tests_ok is not False else 1


if __name__ == "__main__":
    sys.exit(main())
