"""Training-step time of one model in dense, MSA-warm-up and MSA-sparse mode at long context (GPU).

    python -m benchmarks.train_steps --preset small --contexts 8192 32768 --out steps.json   # GPU, from the repo root
    python -m benchmarks.train_steps --device cpu --preset tiny --contexts 256 --iters 1 --warmup 0   # checks the script

One row of `context` tokens holding one document, bf16 autocast, forward + backward + AdamW step, on
one GPU, no Ray: the model's own cost. The dense baseline is the same preset with
model.msa.enabled=false (no index branch). Steps are timed with CUDA events after warm-up
iterations; the median is reported with tokens/s, MFU (model FLOPs, pipeline/flops.py) and peak
memory. Prints a table last; `--out` writes the numbers as JSON. Results on an H100:
docs/perf/pipeline_h100.md.
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
from model.presets import get_preset
from model.transformer import MultimodalTransformer
from pipeline.flops import StepFlops, device_peak_tflops


def _batch(cfg, T: int, device) -> Batch:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, cfg.vocab_size, (1, T), generator=g)
    targets = torch.cat([tokens[:, 1:], torch.full((1, 1), IGNORE_INDEX)], 1)
    return Batch(
        tokens_BT=tokens, targets_BT=targets, positions_BT=torch.arange(T)[None],
        segment_ids_BT=torch.ones(1, T, dtype=torch.int32),
        images_BNCHW=torch.zeros(1, 1, 3, cfg.image_size, cfg.image_size, dtype=torch.uint8),
        n_images_B=torch.zeros(1, dtype=torch.int32), answer_mask_BT=torch.zeros(1, T, dtype=torch.bool),
    ).to(device)


def time_mode(preset: str, mode: str, T: int, iters: int, warmup: int, overrides: dict,
              device: torch.device = torch.device("cuda")) -> dict:
    cuda = device.type == "cuda"
    cfg = get_preset(preset)
    cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, T), **overrides)
    if mode == "dense":
        cfg = dataclasses.replace(cfg, msa=dataclasses.replace(cfg.msa, enabled=False))
    model = MultimodalTransformer(cfg, img_patch_id=4).to(device)
    if mode != "dense":
        model.set_mode(mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    batch = _batch(cfg, T, device)
    weights = model.loss_weights()
    flops = StepFlops(cfg)(batch.segment_ids_BT.cpu(), mode)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = model(batch)
        loss = sum(weights[k] * v for k, v in out.losses.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return out

    for _ in range(warmup):
        out = step()
    times = []
    for _ in range(iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = step()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:  # a CPU run only checks the script
            t0 = time.perf_counter()
            out = step()
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    peak = device_peak_tflops(0.0) if cuda else None
    res = {"preset": preset, "mode": mode, "context": T, "step_s": t, "step_s_all": times,
           "tokens_per_s": T / t, "model_tflops": flops / t / 1e12, "mfu": (flops / t / (peak * 1e12)) if peak else None,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, "sparsity": float(out.stats.get("sparsity", 0.0)),
           "loss": float(out.losses["lm"])}
    del model, opt, batch, out
    if cuda:
        torch.cuda.empty_cache()
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_steps", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--modes", nargs="+", default=["dense", "warmup", "sparse"])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda", help="cuda; cpu only checks the script (with the tiny preset)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("train_steps: no CUDA GPU here (use --device cpu --preset tiny to check the script)", file=sys.stderr)
        return 2
    rows = []
    t0 = time.time()
    for T in args.contexts:
        for mode in args.modes:
            r = time_mode(args.preset, mode, T, args.iters, args.warmup, {}, device)
            rows.append(r)
            print(f"[bench] {mode:>7} T={T:>6}: {r['step_s'] * 1e3:8.1f} ms  ({time.time() - t0:.0f}s)", flush=True)
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)
    print(f"\n{info['device']}, torch {info['torch']}, preset {args.preset}, bf16, one row, fwd+bwd+AdamW")
    print(f"{'context':>8} {'mode':>8} {'step ms':>9} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>8} "
          f"{'sparsity':>8} {'vs dense':>8}")
    for T in args.contexts:
        dense = next((r for r in rows if r["context"] == T and r["mode"] == "dense"), None)
        for r in (r for r in rows if r["context"] == T):
            speed = f"{dense['step_s'] / r['step_s']:.2f}x" if dense else "-"
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            print(f"{T:>8} {r['mode']:>8} {r['step_s'] * 1e3:>9.1f} {r['tokens_per_s']:>9,.0f} "
                  f"{r['model_tflops']:>8.1f} {mfu:>6} {r['peak_mem_gib']:>8.1f} {r['sparsity']:>8.2f} {speed:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
