"""GPU checks of the model's fast paths (skipped without CUDA): the compiled Triton kernels, the
compiled FlexAttention dense path and grouped-GEMM experts, and the `small` preset training in every
mode at 8K and 32K tokens under bf16 autocast.

    pytest -q -m gpu tests/model/test_gpu.py
    python tests/model/test_gpu.py          # the same checks, printing step times and peak memory
"""
from __future__ import annotations

import os
import sys
import time

import torch

try:
    import pytest
except ImportError:  # run as a script on a GPU machine without pytest
    pytest = None

sys.path.insert(0, os.path.dirname(__file__))
from model_helpers import IMG_PATCH, attn_context, build_batch, small_config  # noqa: E402

from model.config import MoEConfig  # noqa: E402
from model.moe import MoE  # noqa: E402
from model.msa import MSAAttention  # noqa: E402
from model.presets import get_preset  # noqa: E402
from model.transformer import MultimodalTransformer  # noqa: E402

if pytest is not None:
    pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_triton_topk_covering_every_block_equals_dense():
    T = 512
    cfg = small_config(msa=dict(block_size=128, topk=4, index_dim=64, backend="triton"), max_seq_len=T, head_dim=64,
                       d_model=256)
    batch = build_batch(cfg, [[300, 212], [T]], T).to("cuda")
    layer = MSAAttention(cfg).cuda()
    x = torch.randn(2, T, cfg.d_model, device="cuda")
    outs = {}
    for mode, impl in (("dense", "sdpa"), ("dense", "flex"), ("sparse", "sdpa")):
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        o, _ = layer(xx, attn_context(cfg, batch, mode, impl))
        (o * torch.linspace(-1, 1, o.numel(), device="cuda").view_as(o)).sum().backward()
        outs[(mode, impl)] = (o.detach(), xx.grad, layer.q_proj.weight.grad, layer.k_proj.weight.grad)
    ref = outs[("dense", "sdpa")]
    for key in (("dense", "flex"), ("sparse", "sdpa")):
        for a, b in zip(outs[key], ref):
            torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-3)


def test_grouped_mm_matches_bmm():
    d = 256
    moe = MoE(d, MoEConfig(n_experts=8, top_k=2, expert_hidden=128)).cuda()
    x = torch.randn(2, 1000, d, device="cuda")
    valid = torch.ones(2000, dtype=torch.bool, device="cuda")
    res = {}
    for dispatch in ("bmm", "grouped_mm"):
        moe.cfg.dispatch = dispatch
        moe.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = moe(xx, valid)
        y.float().square().sum().backward()
        res[dispatch] = (y.float(), xx.grad, moe.experts.w_gate.grad, moe.experts.w_down.grad)
    for a, b in zip(res["grouped_mm"], res["bmm"]):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)


def _small_step(T: int, docs: list[int], modes=("warmup", "sparse", "dense"), stats=False) -> dict:
    cfg = get_preset("small")
    torch.manual_seed(0)
    model = MultimodalTransformer(cfg, IMG_PATCH).cuda()
    batch = build_batch(cfg, [docs], T, images_per_row=[2]).to("cuda")
    w = model.loss_weights()
    report = {}
    for mode in modes:
        model.set_mode(mode)
        for i in range(2):  # the first step compiles
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(batch, compute_stats=stats and i == 1)
            loss = sum(w[k] * v for k, v in out.losses.items())
            model.zero_grad(set_to_none=True)
            loss.backward()
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        assert all(torch.isfinite(v) for v in out.losses.values()), out.losses
        report[mode] = {"step_s": dt, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                        **{k: float(v.detach()) for k, v in out.losses.items()},
                        **{k: float(v) for k, v in out.stats.items() if "/" not in k}}
    return report


def test_varlen_flash_matches_an_fp32_reference_forward_and_backward():
    """dense_impl = "varlen" on packed rows: documents of several lengths, a padding run, empty
    document slots (the fixed shapes a CUDA graph replays), GQA; output and every input's gradient
    against explicit fp32 softmax attention over each document's causal keys."""
    from model.attention import DenseMask, DocLayout, dense_attention

    torch.manual_seed(0)
    B, T, Hq, Hkv, D = 2, 1024, 8, 2, 128
    seg = torch.ones(B, T, dtype=torch.int32)
    seg[0, 300:700], seg[0, 700:1000], seg[0, 1000:] = 2, 3, 0  # three documents, then padding
    seg[1, 5:] = 2  # a 5-token document, then a long one
    n_docs = DocLayout.count_documents(seg)
    layout = DocLayout.from_segments(seg.cuda(), n_docs=n_docs, doc_slots=8)  # 2 empty slots at the end
    qkv = [torch.randn(B, T, h, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (Hq, Hkv, Hkv)]
    o = dense_attention(*qkv, DenseMask(layout, "varlen"))
    w = torch.randn_like(o, dtype=torch.float32)
    (o.float() * w).sum().backward()
    grads = [x.grad for x in qkv]

    q, k, v = (x.detach().float().requires_grad_() for x in qkv)
    doc = layout.doc_BT
    keep_BTS = (doc[:, :, None] == doc[:, None, :]) & torch.ones(T, T, dtype=torch.bool, device="cuda").tril()
    kk, vv = (x.repeat_interleave(Hq // Hkv, 2) for x in (k, v))
    s = torch.einsum("bthd,bshd->bhts", q, kk) / D ** 0.5
    ref = torch.einsum("bhts,bshd->bthd", s.masked_fill(~keep_BTS[:, None], float("-inf")).softmax(-1), vv)
    (ref * w).sum().backward()
    assert o.dtype == torch.bfloat16 and o.shape == ref.shape
    torch.testing.assert_close(o.float(), ref.detach(), atol=2e-2, rtol=2e-2)
    for name, got, want in zip("qkv", grads, (q.grad, k.grad, v.grad)):
        err = (got.float() - want).norm() / want.norm()
        assert err < 2e-2, f"d{name}: relative error {err:.3g} against the fp32 reference"


def test_small_preset_every_mode_8k():
    r = _small_step(8192, [5000, 2000, 1192], stats=True)
    # documents of 5000/2000/1192 tokens against k*B = 2048 keys: only mildly sparse (~0.1)
    assert 0 < r["sparse"]["sparsity"] < 0.3 and 0 < r["sparse"]["score_recall"] <= 1
    return r


def test_small_preset_sparse_32k():
    r = _small_step(32768, [32768], modes=("sparse", "warmup", "dense"))
    assert r["sparse"]["sparsity"] > 0.7
    return r


if __name__ == "__main__":
    fns = (test_triton_topk_covering_every_block_equals_dense, test_grouped_mm_matches_bmm,
           test_varlen_flash_matches_an_fp32_reference_forward_and_backward,
           test_small_preset_every_mode_8k, test_small_preset_sparse_32k)
    for fn in [f for f in fns if len(sys.argv) < 2 or f.__name__ in sys.argv[1:]]:
        t0 = time.perf_counter()
        try:
            r = fn()
            print(f"PASS {fn.__name__} ({time.perf_counter() - t0:.1f}s)", flush=True)
            if r:
                for mode, v in r.items():
                    print(f"   {mode:7s} " + "  ".join(f"{k}={x:.4g}" for k, x in v.items()), flush=True)
        except Exception as e:  # report and go on: one run on a GPU checks them all
            import traceback

            traceback.print_exc()
            print(f"FAIL {fn.__name__}: {type(e).__name__}: {e}", flush=True)
