"""Training-step time of one model in dense, MSA-warm-up and MSA-sparse mode at long context (GPU).

    python -m benchmarks.train_steps --preset small --contexts 8192 32768 --out steps.json   # GPU, from the repo root
    python -m benchmarks.train_steps --device cpu --preset tiny --contexts 256 --iters 1 --warmup 0   # checks the script

One row of `context` tokens holding one document, bf16 autocast, forward + backward + AdamW step, on
one GPU, no Ray: the model's own cost. The dense baseline is the same preset with
model.msa.enabled=false (no index branch); with one document per row the model's dense attention is
causal SDPA with cuDNN first, the fastest dense attention for that mask (`dense`); `dense-flex` and
`dense-varlen` force the document-mask paths that packed rows take (FlexAttention; flash attention
over the packed documents, `model.dense_impl`), for comparison. `warmup-s` and
`sparse-s` sample the KL's query tokens (model.msa.warmup_kl_sample / kl_sample, --warmup-kl-sample
and --kl-sample). Steps are timed with CUDA events after warm-up iterations; the median is reported
with tokens/s, MFU (model FLOPs, pipeline/flops.py, against the bf16 matmul rate measured in the same
run) and peak memory. `--profile T` adds a torch.profiler breakdown of one sparse step at T, and for
every variant at T the host's time to issue each phase of the step against the GPU's time for it
(and a cProfile of the host's time by function).
`--msa-set budget=top_p --msa-set budget_p=0.9 --msa-set topk=32` sets model.msa fields of the MSA
variants (an adaptive selection budget, for one); rows then also give the mean blocks per token and
the MFU counts the keys the selection attended. `--eager-ops` times the model with its small
elementwise ops unfused (model.compile_ops=false; model/fused.py). Each row also gives the mean of
the same steps run back to back without a sync between them (`step_ms_back_to_back`: the host issues
the next step while the GPU finishes this one, as the training loop does). `--cuda-graph` captures
the whole step in one CUDA graph and times its replays: the step's cost to the GPU with the host's
launches out of the way (the batch is counted on the host, so the forward reads nothing back).
Prints a table last; `--out` writes the numbers as JSON. Results: docs/perf/.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch

from model.batch import IGNORE_INDEX, Batch
from model.presets import PRESETS, get_preset
from model.transformer import MultimodalTransformer
from pipeline.flops import StepFlops


def _batch(cfg, T: int, device) -> Batch:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, cfg.vocab_size, (1, T), generator=g)
    targets = torch.cat([tokens[:, 1:], torch.full((1, 1), IGNORE_INDEX)], 1)
    return Batch(
        tokens_BT=tokens, targets_BT=targets, positions_BT=torch.arange(T)[None],
        segment_ids_BT=torch.ones(1, T, dtype=torch.int32),
        images_BNCHW=torch.zeros(1, 1, 3, cfg.image_size, cfg.image_size, dtype=torch.uint8),
        n_images_B=torch.zeros(1, dtype=torch.int32), answer_mask_BT=torch.zeros(1, T, dtype=torch.bool),
    ).with_counts(img_patch_id=4).to(device)  # counted on the host, as the pipeline's batches are


VARIANTS = ("dense", "dense-flex", "dense-varlen", "warmup", "warmup-s", "sparse", "sparse-s")
DOCUMENT_MASK_IMPL = {"dense-flex": "flex", "dense-varlen": "varlen"}  # the dense variants that time packed rows' path


def _build(preset: str, variant: str, T: int, overrides: dict, kl_sample: float, warmup_kl_sample: float,
           msa_set: dict | None = None):
    cfg = get_preset(preset)
    cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, T), **overrides)
    if variant in DOCUMENT_MASK_IMPL:
        cfg = dataclasses.replace(cfg, dense_impl=DOCUMENT_MASK_IMPL[variant])
    msa = {"dense": dict(enabled=False), "dense-flex": dict(enabled=False), "dense-varlen": dict(enabled=False),
           "warmup": dict(warmup_kl_sample=1.0), "sparse": dict(kl_sample=1.0),  # the exact KL
           "warmup-s": dict(warmup_kl_sample=warmup_kl_sample), "sparse-s": dict(kl_sample=kl_sample)}[variant]
    if not variant.startswith("dense"):
        msa = {**(msa_set or {}), **msa}
    return dataclasses.replace(cfg, msa=dataclasses.replace(cfg.msa, **msa))


def _msa_set(items: list[str]) -> dict:
    """--msa-set key=value items (TOML values) -> model.msa fields."""
    import tomllib

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"train_steps: --msa-set wants key=value, got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value.strip()  # a bare word: a string
    return out


def time_mode(preset: str, variant: str, T: int, iters: int, warmup: int, overrides: dict,
              device: torch.device = torch.device("cuda"), kl_sample: float = 0.25, warmup_kl_sample: float = 1 / 32,
              peak: float | None = None, profile: bool = False, msa_set: dict | None = None,
              cuda_graph: bool = False) -> dict:
    cuda = device.type == "cuda"
    mode = variant.split("-")[0]
    cfg = _build(preset, variant, T, overrides, kl_sample, warmup_kl_sample, msa_set)
    model = MultimodalTransformer(cfg, img_patch_id=4).to(device)
    if mode != "dense":
        model.set_mode(mode)
    if cuda_graph and not cuda:
        raise ValueError("--cuda-graph needs a CUDA device")
    # capturable: the step count and the bias corrections on the device, as a graph replay needs
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda, capturable=cuda_graph)
    batch = _batch(cfg, T, device)
    if variant in DOCUMENT_MASK_IMPL:  # dense-flex, dense-varlen: the document-mask path, as if the row were packed
        batch = dataclasses.replace(batch, document_mask=True)
    weights = model.loss_weights()
    step_flops = StepFlops(cfg)
    flops = step_flops(batch.segment_ids_BT.cpu(), mode)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step(mark=lambda phase: None):
        # autocast's weight-cast cache holds tensors across a graph capture's boundary: off when graphed
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda, cache_enabled=not cuda_graph):
            out = model(batch)
        loss = sum(weights[k] * v for k, v in out.losses.items())
        mark("forward")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        mark("backward")
        opt.step()
        mark("optimizer")
        return out

    if cuda_graph:  # the whole step (forward, backward, optimizer) captured once, then replayed
        graph, captured = _capture(step, max(warmup, 3))

        def run():
            graph.replay()  # refreshes the captured step's outputs in place
            return captured
    else:
        for _ in range(warmup):
            out = step()
        run = step
    times = []
    for _ in range(iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = run()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:  # a CPU run only checks the script
            t0 = time.perf_counter()
            out = step()
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    # the same steps back to back, no sync between them (the training loop's way: the host issues the
    # next step while the GPU finishes this one), their mean
    back_to_back = None
    if cuda:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            out = run()
        b.record()
        torch.cuda.synchronize()
        back_to_back = a.elapsed_time(b) / iters
    if out.attended_pairs is not None:  # an adaptive budget: the main branch as the selection made it
        flops += float(step_flops.attended_flops(out.attended_pairs))
    dense_impl = DOCUMENT_MASK_IMPL.get(variant, "cudnn-causal-sdpa") if mode in ("dense", "warmup") else "msa-kernels"
    res = {"preset": preset, "variant": variant, "mode": mode, "context": T, "dense_impl": dense_impl,
           "kl_sample": cfg.msa.kl_sample if mode == "sparse" else cfg.msa.warmup_kl_sample if mode == "warmup" else None,
           "step_ms": t * 1e3, "step_ms_all": [x * 1e3 for x in times], "step_ms_back_to_back": back_to_back,
           "cuda_graph": cuda_graph,
           "tokens_per_s": T / t, "model_tflops": flops / t / 1e12, "mfu": (flops / t / (peak * 1e12)) if peak else None,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
           "sparsity": float(out.stats.get("sparsity", 0.0)), "loss": float(out.losses["lm"].detach()),
           "budget": cfg.msa.budget if mode == "sparse" else None,
           "blocks_per_token": float(out.stats["blocks_per_token"]) if "blocks_per_token" in out.stats else None}
    if profile and cuda and not cuda_graph:
        res["host"] = _host_phases(step)
        if mode == "sparse":
            res["profile"] = _profile(step)
    del model, opt, batch, out
    if cuda:
        torch.cuda.empty_cache()
    return res


def _capture(step, warmup: int):
    """The step as one CUDA graph (PyTorch's whole-network capture): warm-up steps on a side stream
    (compilation, the kernels' first launches, the optimizer's state), then one captured step. A
    replay reruns its kernels on the same tensors: the batch, the weights, the gradients and the
    optimizer state stay where they are; the sampled KL draws new tokens each replay (the CUDA RNG
    is graph-safe). Returns the graph and the captured step's outputs (refreshed by each replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # captured on the warm-up's stream: autograd keeps, per parameter, the stream of its first backward
    with torch.cuda.graph(graph, stream=side):
        out = step()
    torch.cuda.synchronize()
    return graph, out


def _host_phases(step, iters: int = 3) -> dict:
    """Is the step bound by the host? Per phase (forward, backward, optimizer), the host's time to
    issue its work (no sync inside the step) against the GPU's time for it (CUDA events at the same
    points); medians over `iters` steps. A phase whose host time is close to its GPU time, or above
    it, keeps the GPU waiting for launches. Then the Python functions that take the host's time in
    one step (cProfile, by own time; its overhead inflates the host's times, not their order)."""
    import cProfile
    import pstats

    phases = ("forward", "backward", "optimizer")
    host = {p: [] for p in phases}
    gpu = {p: [] for p in phases}
    for _ in range(iters):
        torch.cuda.synchronize()
        marks = [("start", time.perf_counter(), torch.cuda.Event(enable_timing=True))]
        marks[0][2].record()

        def mark(phase):
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append((phase, time.perf_counter(), ev))

        step(mark)
        torch.cuda.synchronize()
        for (_, t0, e0), (phase, t1, e1) in zip(marks, marks[1:]):
            host[phase].append((t1 - t0) * 1e3)
            gpu[phase].append(e0.elapsed_time(e1))
    out = {"host_ms": {p: statistics.median(v) for p, v in host.items()},
           "gpu_ms": {p: statistics.median(v) for p, v in gpu.items()}}
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    step()
    torch.cuda.synchronize()
    prof.disable()
    st = pstats.Stats(prof)
    rows = sorted(((f"{fn[0].split('site-packages/')[-1]}:{fn[1]}:{fn[2]}", v[1], v[2] * 1e3, v[3] * 1e3)
                   for fn, v in st.stats.items()), key=lambda r: -r[2])[:40]
    out["cprofile_top"] = [{"function": f, "calls": n, "own_ms": own, "cum_ms": cum} for f, n, own, cum in rows]
    return out


def _profile(step) -> dict:
    """CUDA time per kernel of one step, grouped: the MSA Triton kernels, dense attention, matmuls,
    the rest (the small ops around the kernels)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels_ms = {}
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        if t > 0:
            kernels_ms[ev.key] = kernels_ms.get(ev.key, 0.0) + t / 1e3

    from pipeline.profiling import group_of

    groups: dict[str, float] = {}
    for k, v in kernels_ms.items():
        groups[group_of(k)] = groups.get(group_of(k), 0.0) + v
    top = sorted(kernels_ms.items(), key=lambda kv: -kv[1])[:30]
    return {"groups_ms": groups, "top_kernels_ms": top, "total_ms": sum(kernels_ms.values())}


def matmul_ceiling_tflops() -> float:
    """The card's bf16 matmul rate, measured (8192^3, median): the MFU's denominator."""
    import triton.testing

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_steps", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--modes", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--skip", nargs="*", default=[], metavar="T:VARIANT", help="e.g. 65536:warmup (too slow to time)")
    p.add_argument("--kl-sample", type=float, default=0.25)
    p.add_argument("--warmup-kl-sample", type=float, default=1 / 32)
    p.add_argument("--profile", type=int, default=0, help="profile the sparse-s step at this context")
    p.add_argument("--commit", default="", help="recorded with the results")
    p.add_argument("--msa-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a model.msa field for the MSA variants, e.g. budget=top_p (repeatable)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="every variant recomputes its blocks' activations in the backward "
                        "(model.activation_checkpointing; what fits 128K); the MFU does not count the recompute")
    p.add_argument("--eager-ops", action="store_true",
                   help="model.compile_ops=false: the small elementwise ops unfused (model/fused.py), for comparison")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time the step captured as one CUDA graph and replayed (the host's launches out of "
                        "the way: what the step costs the GPU alone)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda", help="cuda; cpu only checks the script (with the tiny preset)")
    args = p.parse_args(argv)
    if args.profile and args.profile not in args.contexts:
        p.error(f"--profile {args.profile} is not one of --contexts {args.contexts}")
    if args.cuda_graph and (args.device != "cuda" or args.profile):
        p.error("--cuda-graph times CUDA graph replays: it needs --device cuda and no --profile")
    device = torch.device(args.device)
    if device.type != "cuda":  # FlexAttention has no CPU backward, flash attention no CPU kernel
        for m in [m for m in args.modes if m in DOCUMENT_MASK_IMPL]:
            args.modes.remove(m)
            print(f"[bench] {m} skipped: its attention ({DOCUMENT_MASK_IMPL[m]}) trains on CUDA only", flush=True)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("train_steps: no CUDA GPU here (use --device cpu --preset tiny to check the script)", file=sys.stderr)
        return 2
    rows = []
    t0 = time.time()
    peak = matmul_ceiling_tflops() if device.type == "cuda" else None
    if peak:
        print(f"[bench] measured bf16 matmul ceiling: {peak:.0f} TFLOP/s", flush=True)
    skip = set(args.skip)
    overrides = {"activation_checkpointing": True} if args.activation_checkpointing else {}
    if args.eager_ops:
        overrides["compile_ops"] = False
    for T in args.contexts:
        for variant in args.modes:
            if f"{T}:{variant}" in skip:
                continue
            try:
                r = time_mode(args.preset, variant, T, args.iters, args.warmup, overrides, device, args.kl_sample,
                              args.warmup_kl_sample, peak, profile=args.profile == T,
                              msa_set=_msa_set(args.msa_set), cuda_graph=args.cuda_graph)
            except torch.OutOfMemoryError as e:
                r = {"variant": variant, "mode": variant.split("-")[0], "context": T, "error": f"out of memory: {e}"[:300]}
                torch.cuda.empty_cache()
            rows.append(r)
            took = f"{r['step_ms']:8.1f} ms" if "step_ms" in r else r["error"][:60]
            print(f"[bench] {variant:>10} T={T:>6}: {took}  ({time.time() - t0:.0f}s)", flush=True)
    info = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "triton": _version("triton"), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": args.commit, "preset": args.preset, "bf16_matmul_tflops": peak,
            "kl_sample": args.kl_sample, "warmup_kl_sample": args.warmup_kl_sample, "msa_set": _msa_set(args.msa_set),
            "activation_checkpointing": args.activation_checkpointing, "compile_ops": not args.eager_ops,
            "cuda_graph": args.cuda_graph, "rows": rows}
    for r in rows:  # every record names its card and commit (the raw output is read record by record)
        r.update(gpu=info["gpu"], commit=args.commit, activation_checkpointing=args.activation_checkpointing,
                 compile_ops=not args.eager_ops)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)
    print(f"\n{info['gpu']}, torch {info['torch']}, preset {args.preset}, bf16, one row, fwd+bwd+AdamW"
          f"{', activations recomputed' if args.activation_checkpointing else ''}"
          f"{', small ops eager' if args.eager_ops else ', small ops compiled'}; "
          f"MFU against the measured {peak or 0:.0f} TFLOP/s")
    print(f"{'context':>8} {'variant':>10} {'step ms':>9} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'GiB':>6} "
          f"{'sparsity':>8} {'vs dense':>8} {'back-to-back ms':>15}")
    for T in args.contexts:
        done = [r for r in rows if r["context"] == T and "step_ms" in r]
        dense = min((r for r in done if r["mode"] == "dense"), key=lambda r: r["step_ms"], default=None)
        for r in (r for r in rows if r["context"] == T):
            if "step_ms" not in r:
                print(f"{T:>8} {r['variant']:>10} {r['error'][:60]}")
                continue
            speed = f"{dense['step_ms'] / r['step_ms']:.2f}x" if dense else "-"
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            b2b = f"{r['step_ms_back_to_back']:.1f}" if r.get("step_ms_back_to_back") else "-"
            print(f"{T:>8} {r['variant']:>10} {r['step_ms']:>9.1f} {r['tokens_per_s']:>9,.0f} "
                  f"{r['model_tflops']:>8.1f} {mfu:>6} {r['peak_gib']:>6.1f} {r['sparsity']:>8.2f} {speed:>8} {b2b:>15}")
    prof = next((r["profile"] for r in rows if r.get("profile")), None)
    if prof:
        print(f"\nprofile of one sparse-s step at {args.profile}: {prof['total_ms']:.1f} ms of kernels")
        for g, ms in sorted(prof["groups_ms"].items(), key=lambda kv: -kv[1]):
            print(f"  {ms:8.1f} ms {100 * ms / prof['total_ms']:5.1f}%  {g}")
    hosts = [r for r in rows if r.get("host")]
    if hosts:
        print(f"\nhost time to issue each phase vs the GPU's time for it, at {args.profile} (ms, median of 3 steps)")
        for r in hosts:
            h, g = r["host"]["host_ms"], r["host"]["gpu_ms"]
            print(f"  {r['variant']:>10}: " + ", ".join(f"{p} {h[p]:.1f} host / {g[p]:.1f} GPU" for p in h))
        for r in hosts:
            print(f"  {r['variant']}: host's own time by function (cProfile, one step):")
            for row in r["host"]["cprofile_top"][:12]:
                print(f"    {row['own_ms']:8.1f} ms {row['calls']:>6}x  {row['function'][-90:]}")
    return 0


def _version(pkg: str) -> str:
    try:
        return __import__(pkg).__version__
    except Exception:
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())
