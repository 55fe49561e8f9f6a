"""The work an MSA layer does outside its kernels, per layer, measured: one MSA attention layer and
one dense attention layer of the same preset, forward + backward at `T` tokens, on one GPU.

    python -m benchmarks.msa_layer --contexts 8192 32768 --out layer.json    # GPU, from the repo root
    TRITON_INTERPRET=1 python -m benchmarks.msa_layer --device cpu --preset tiny --contexts 256 --iters 1  # checks it

Both layers share the main branch (q/k/v/o projections, RoPE); the dense one runs cuDNN's causal
attention, the MSA one the selection, the sparse attention and the KL (the preset's defaults: the KL
on a quarter of the tokens, small ops compiled). Each layer's fwd+bwd is timed with CUDA events
(median), and one iteration is profiled for its kernels. What the MSA layer does besides its Triton
kernels (the index branch's projections, norms and RoPE, the work lists, the statistics, and any gap
in which the GPU waits for the host) is then

    outside = MSA layer - its MSA Triton kernels - (dense layer - its cuDNN attention kernels)

the last term being the main branch both layers share. Prints a table; `--out` writes JSON.
Results: docs/perf/steps_h200.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch

from model.attention import AttnContext, DenseMask, DocLayout, GQAAttention
from model.layers import rope_cos_sin
from model.msa import MSAAttention
from model.presets import PRESETS, get_preset


def _context(cfg, T: int, device, mode: str) -> AttnContext:
    layout = DocLayout.from_segments(torch.ones(1, T, dtype=torch.int32, device=device))
    rope = rope_cos_sin(torch.arange(T, device=device)[None], cfg.effective_rope_dim, cfg.rope_theta)
    return AttnContext(layout=layout, mask=DenseMask(layout, cfg.dense_impl), rope=rope, mode=mode,
                       compute_stats=False)


def time_layer(layer, cfg, T: int, mode: str, device, iters: int, warmup: int, profile: bool) -> dict:
    cuda = device.type == "cuda"
    x = torch.randn(1, T, cfg.d_model, device=device, requires_grad=True)

    def step():
        ctx = _context(cfg, T, device, mode)  # a new layout each step, as the model builds one per forward
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            o, extras = layer(x, ctx)
        loss = o.float().square().mean() + extras.get("kl", 0.0)
        loss.backward()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    res = {"mode": mode, "context": T, "ms": statistics.median(times), "ms_all": times}
    if profile and cuda:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        from pipeline.profiling import group_of

        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        groups, kernels = {}, {}
        for ev in prof.key_averages():
            t = getattr(ev, "self_device_time_total", 0) / 1e3
            if t > 0:
                groups[group_of(ev.key)] = groups.get(group_of(ev.key), 0.0) + t
                kernels[ev.key] = kernels.get(ev.key, 0.0) + t
        res["groups_ms"] = groups
        res["top_kernels_ms"] = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--commit", default="", help="recorded with the results")
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda", help="cuda; cpu only checks the script (Triton interpreter: fp32)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    from model import fused

    cfg = get_preset(args.preset)
    fused.set_enabled(cfg.compile_ops)

    rows = []
    for T in args.contexts:
        c = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, T))
        torch.manual_seed(0)
        msa_layer = MSAAttention(c).to(device)
        dense_layer = GQAAttention(c).to(device)
        dense = time_layer(dense_layer, c, T, "dense", device, args.iters, args.warmup, True)
        sparse = time_layer(msa_layer, c, T, "sparse", device, args.iters, args.warmup, True)
        row = {"context": T, "dense_layer_ms": dense["ms"], "msa_layer_ms": sparse["ms"], "dense": dense, "msa": sparse}
        if "groups_ms" in sparse:
            msa_k = sparse["groups_ms"].get("msa triton kernels", 0.0)
            cudnn = dense["groups_ms"].get("dense attention (cudnn/flash)", 0.0)
            row.update(msa_kernels_ms=msa_k, dense_attention_kernels_ms=cudnn,
                       shared_main_branch_ms=dense["ms"] - cudnn,
                       outside_ms=sparse["ms"] - msa_k - (dense["ms"] - cudnn))
        rows.append(row)
        del msa_layer, dense_layer
        print(f"[layer] T={T}: dense layer {dense['ms']:.2f} ms, MSA layer {sparse['ms']:.2f} ms", flush=True)
    info = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": args.commit,
            "preset": args.preset, "kl_sample": cfg.msa.kl_sample, "compile_ops": cfg.compile_ops, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)
    print(f"\n{info['gpu']}, preset {args.preset}, one layer fwd+bwd, bf16, median of {args.iters}")
    print(f"{'context':>8} {'dense layer':>12} {'cuDNN attn':>11} {'MSA layer':>10} {'MSA kernels':>12} {'outside':>8}")
    for r in rows:
        if "outside_ms" in r:
            print(f"{r['context']:>8} {r['dense_layer_ms']:>12.2f} {r['dense_attention_kernels_ms']:>11.2f} "
                  f"{r['msa_layer_ms']:>10.2f} {r['msa_kernels_ms']:>12.2f} {r['outside_ms']:>8.2f}")
        else:
            print(f"{r['context']:>8} {r['dense_layer_ms']:>12.2f} {'-':>11} {r['msa_layer_ms']:>10.2f}")
    for r in rows:
        if "msa" in r and "groups_ms" in r["msa"]:
            print(f"  T={r['context']} MSA layer kernels: " + ", ".join(
                f"{g} {ms:.2f} ms" for g, ms in sorted(r["msa"]["groups_ms"].items(), key=lambda kv: -kv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
