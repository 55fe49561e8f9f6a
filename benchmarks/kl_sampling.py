"""Does the KL on sampled query tokens train the index branch as well as the exact KL? (CPU)

    python -m benchmarks.kl_sampling --out runs/benchmarks/kl_sampling.json

Two trainings of the same model from the same initialisation on the same batches, one with the
exact KL and one with `model.msa.kl_sample` / `warmup_kl_sample` below 1, through a dense warm-up and
then sparse attention. Every `--every` steps both are measured the same way on fixed held-out rows
with the exact forms: the KL of the index branch (warm-up: dense support, sparse: the selected
blocks), score recall and block recall (model/stats.py). Plain PyTorch, no Ray: the `tiny` preset
on the embedded demo corpus (documents long enough that blocks are skipped). Prints a table last.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data_prep.reader import iter_documents
from data_prep.schema import IMG_PATCH, SPECIAL_TOKENS
from data_prep.tokenizer import load_tokenizer
from model.batch import Batch
from model.presets import get_preset
from model.transformer import MultimodalTransformer
from pipeline.packing import ImageDecoder, PackSpec, Tokenizer, pack_documents


def _rows(shards: Path, cfg, n_docs: int) -> dict[str, np.ndarray]:
    tok = Tokenizer(load_tokenizer(shards / "tokenizer.json"))
    spec = PackSpec(cfg.max_seq_len, cfg.image_size, cfg.patch_size)
    docs = list(iter_documents(shards, limit=n_docs))
    return pack_documents(docs, tok, spec, ImageDecoder(cfg.image_size))


def _batch(rows, idx) -> Batch:
    return Batch.from_dict({k: v[idx] for k, v in rows.items()})


@torch.no_grad()
def _measure(model: MultimodalTransformer, batch: Batch) -> dict[str, float]:
    """Exact KL (mean over MSA layers) and recalls on held-out rows, in the model's current mode."""
    exact = copy.deepcopy(model)
    for block in exact.blocks:  # the exact forms, whatever the run trains with
        block.attn.cfg = dataclasses.replace(block.attn.cfg, msa=dataclasses.replace(block.attn.cfg.msa, kl_sample=1.0,
                                                                                      warmup_kl_sample=1.0))
    exact.eval()
    out = exact(batch, compute_stats=True)
    return {"kl": float(out.losses["kl_index"]), "score_recall": float(out.stats["score_recall"]),
            "block_recall": float(out.stats["block_recall"])}


def run(cfg, rows, held, steps: int, warmup_steps: int, batch_size: int, every: int, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    model = MultimodalTransformer(cfg, img_patch_id=SPECIAL_TOKENS.index(IMG_PATCH))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    weights = model.loss_weights()
    g = np.random.default_rng(seed)
    log = []
    for step in range(steps):
        model.set_mode("warmup" if step < warmup_steps else "sparse")
        torch.manual_seed(seed * 100003 + step)  # the same sampled tokens only if both runs sample
        out = model(_batch(rows, g.choice(len(rows["tokens"]), batch_size, replace=False)))
        loss = sum(weights[k] * v for k, v in out.losses.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % every == 0:
            log.append({"step": step + 1, "mode": model.mode, "lm_loss": float(out.losses["lm"]),
                        **_measure(model, held)})
    return log


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kl_sampling", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--kl-sample", type=float, default=0.25)
    p.add_argument("--warmup-kl-sample", type=float, default=0.125)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from data_prep.cli import main as prep_main

    base = get_preset("tiny")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        shards = Path(d) / "shards"
        assert prep_main(["demo", "--output", str(shards), "--documents", "240", "--max-chars", "4000",
                          "--vocab-size", "2048", "--quiet"]) == 0
        rows = _rows(shards, base, 240)
    n = len(rows["tokens"])
    held = _batch(rows, np.arange(n - 4, n))
    train = {k: v[:n - 4] for k, v in rows.items()}
    results = {}
    for name, (f, fw) in {"exact": (1.0, 1.0), "sampled": (args.kl_sample, args.warmup_kl_sample)}.items():
        cfg = dataclasses.replace(base, msa=dataclasses.replace(base.msa, kl_sample=f, warmup_kl_sample=fw))
        results[name] = [run(cfg, train, held, args.steps, args.warmup_steps, args.batch_size, args.every, s)
                         for s in args.seeds]
        print(f"[kl_sampling] {name} done ({time.time() - t0:.0f} s)", flush=True)
    info = {"preset": "tiny", "rows": n, "seq_len": base.max_seq_len, "block_size": base.msa.block_size,
            "topk": base.msa.topk, "kl_sample": args.kl_sample, "warmup_kl_sample": args.warmup_kl_sample,
            "steps": args.steps, "warmup_steps": args.warmup_steps, "seeds": args.seeds, "results": results,
            "date": time.strftime("%Y-%m-%d")}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(info, indent=1))
    print(f"\ntiny preset, {n} rows of {base.max_seq_len} tokens; exact vs KL on sampled tokens "
          f"(sparse {args.kl_sample:g}, warm-up {args.warmup_kl_sample:g}); measured with the exact forms, "
          f"mean over seeds {args.seeds}")
    print(f"{'step':>5} {'mode':>7} | {'KL exact':>9} {'KL smp':>9} | {'score rec':>9} {'smp':>6} | "
          f"{'block rec':>9} {'smp':>6} | {'lm exact':>8} {'smp':>6}")
    for i, rec in enumerate(results["exact"][0]):
        def m(name, key):
            return float(np.mean([r[i][key] for r in results[name]]))
        print(f"{rec['step']:>5} {rec['mode']:>7} | {m('exact', 'kl'):>9.4f} {m('sampled', 'kl'):>9.4f} | "
              f"{m('exact', 'score_recall'):>9.3f} {m('sampled', 'score_recall'):>6.3f} | "
              f"{m('exact', 'block_recall'):>9.3f} {m('sampled', 'block_recall'):>6.3f} | "
              f"{m('exact', 'lm_loss'):>8.3f} {m('sampled', 'lm_loss'):>6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
