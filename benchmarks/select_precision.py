"""What the selection on FP8 index scores (`model.msa.select_fp8`) changes on a *trained* index
branch: per MSA layer, how often its selected set differs from the exact (fp32) selection's, and
how much of the true attention mass each selection keeps.

    python -m benchmarks.select_precision --checkpoint runs/demo/ray/<run> --rows 8 --out sel.json
    python -m benchmarks.select_precision --preset tiny --shards DIR --tokenizer DIR/tokenizer.json  # checks it

The model runs its forward on held-out rows (packed as in training, `--seq-len` tokens each); every
MSA layer's index queries and keys and its attention queries and keys are taken as the forward
computes them (bf16 under autocast on CUDA, fp32 on the CPU). For each layer, three selections of
the same blocks budget from the same inputs:

  exact   the fp32 reference (`kernels/select/reference.py`), the index scores in fp32;
  model   what training runs by default (the Triton kernel on bf16 inputs; the reference on CPU);
  fp8     qi and ki rounded to e4m3 with one scale per tensor (the kernel on the GPU, the
          reference's rounding on CPU).

and, against the exact one, the share of (token, group) rows whose selected set is the same and the
share of the exact selection's blocks that each keeps; then, for each, the score recall (the true
head-averaged attention mass inside the selected blocks) and the block recall (`model/stats.py`).
The measurements on random inputs are in docs/perf/kernels_h200.md; random index scores stand close
together, a trained branch's best blocks further apart, which is what this measures.
Results: docs/perf/select_precision_cpu.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import kernels
from benchmarks.msa_kernels import agreement
from model.attention import DocLayout
from model.msa import MSAAttention, _flat
from model.stats import recalls
from pipeline.tracking import git_commit


class Capture:
    """Every MSA layer's (qi, ki) and (q, k) of the last forward, flat [1, N, ...] as the kernels take them."""

    def __init__(self, model):
        self.layers: dict[int, dict[str, torch.Tensor]] = {}
        for block in model.blocks:
            attn = block.attn
            if isinstance(attn, MSAAttention):
                self._wrap(block.layer, attn)

    def _wrap(self, layer: int, attn: MSAAttention) -> None:
        index_qk, qkv = attn.index_qk, attn.qkv

        def index_qk_hook(x, rope):
            qi, ki = index_qk(x, rope)
            self.layers.setdefault(layer, {}).update(qi=_flat(qi).detach(), ki=_flat(ki).detach())
            return qi, ki

        def qkv_hook(x, rope):
            q, k, v = qkv(x, rope)
            self.layers.setdefault(layer, {}).update(q=_flat(q).detach(), k=_flat(k).detach())
            return q, k, v

        attn.index_qk, attn.qkv = index_qk_hook, qkv_hook


def compare_layer(cap: dict[str, torch.Tensor], msa, layout: DocLayout, budget_param) -> dict[str, float]:
    """The three selections of one layer and how they compare (see the module's docstring)."""
    qi, ki, q, k = cap["qi"], cap["ki"], cap["q"], cap["k"]
    bs = msa.block_size
    cu = layout.cu_seqlens
    topk = min(msa.topk, -(-qi.shape[1] // bs))
    budget = msa.selection_budget(topk, budget_param)
    backend = msa.backend if qi.is_cuda else "reference"
    exact, _ = kernels.msa_select(qi.float(), ki.float(), bs, topk, cu, budget=budget, with_lse=False,
                                  backend="reference")
    model_sel, _ = kernels.msa_select(qi, ki, bs, topk, cu, budget=budget, with_lse=False, backend=backend)
    fp8, _ = kernels.msa_select(qi, ki, bs, topk, cu, budget=budget, with_lse=False, fp8=True, backend=backend)
    row: dict[str, float] = {}
    for name, sel in (("model", model_sel), ("fp8", fp8)):
        row[f"{name}_same_set"], row[f"{name}_blocks_kept"] = agreement(sel, exact)
    row["fp8_vs_model_same_set"], row["fp8_vs_model_blocks_kept"] = agreement(fp8, model_sel)
    for name, sel in (("exact", exact), ("model", model_sel), ("fp8", fp8)):
        score, block = recalls(q[0], k[0], sel[0], layout, bs)
        row[f"{name}_score_recall"], row[f"{name}_block_recall"] = float(score), float(block)
    return row


@torch.no_grad()
def measure(model, batches, device: torch.device) -> dict:
    """Run the model (sparse mode) on each batch and compare the selections of every MSA layer."""
    model.eval()
    model.set_mode("sparse")
    cap = Capture(model)
    per_layer: dict[int, list[dict]] = {}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    tokens = 0
    for batch in batches:
        batch = batch.to(device)
        cap.layers.clear()
        with autocast:
            model(batch, index_loss=False)
        layout = DocLayout.from_segments(batch.segment_ids_BT, batch.n_docs)
        tokens += batch.tokens_BT.numel()
        for layer, c in sorted(cap.layers.items()):
            per_layer.setdefault(layer, []).append(compare_layer(c, model.cfg.msa, layout, model.budget_param))
    if not per_layer:
        raise ValueError("the model has no MSA layer, or no batch was given: nothing to compare")
    layers = {layer: {key: statistics.fmean(r[key] for r in rows) for key in rows[0]}
              for layer, rows in per_layer.items()}
    mean = {key: statistics.fmean(v[key] for v in layers.values()) for key in next(iter(layers.values()))}
    return {"layers": layers, "mean": mean, "tokens": tokens, "batches": len(next(iter(per_layer.values())))}


def table(res: dict) -> str:
    cols = [("fp8_same_set", "FP8 = exact, same set"), ("fp8_blocks_kept", "FP8 keeps of exact's blocks"),
            ("model_same_set", "default = exact, same set"), ("exact_score_recall", "score recall, exact"),
            ("model_score_recall", "default"), ("fp8_score_recall", "FP8"),
            ("exact_block_recall", "block recall, exact"), ("fp8_block_recall", "FP8")]
    lines = ["| layer | " + " | ".join(h for _, h in cols) + " |", "|---:|" + "---:|" * len(cols)]
    rows = [(str(layer), v) for layer, v in res["layers"].items()] + [("mean", res["mean"])]
    for name, v in rows:
        lines.append(f"| {name} | " + " | ".join(f"{v[key]:.4f}" for key, _ in cols) + " |")
    return "\n".join(lines)


def _batches(args, cfg, img_patch_id: int):
    from data_prep.reader import iter_documents
    from data_prep.tokenizer import load_tokenizer
    from pipeline.evaluate import _batches
    from pipeline.packing import ImageDecoder, PackSpec, Tokenizer, pack_documents

    tok = Tokenizer(load_tokenizer(Path(args.tokenizer)))
    spec = PackSpec(args.seq_len, cfg.image_size, cfg.patch_size)
    docs = list(iter_documents(Path(args.shards), limit=args.max_documents))
    cols = pack_documents(docs, tok, spec, ImageDecoder(cfg.image_size))  # packed as the evaluation packs them
    if len(cols["tokens"]) == 0:
        raise ValueError(f"{args.shards}: no document could be packed into a row")
    rows = {key: v[:args.rows] for key, v in cols.items()}
    return [batch.with_counts(img_patch_id) for batch in _batches(rows, args.batch_size)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="select_precision", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="a checkpoint, or a run directory (its newest)")
    src.add_argument("--preset", help="an untrained model of this preset (checks the script)")
    p.add_argument("--shards", help="held-out shards (default: the run's data.eval_shards)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the run's)")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per row (default: the run's)")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="write the results as JSON")
    args = p.parse_args(argv)
    if args.rows < 1 or args.batch_size < 1:
        p.error("--rows and --batch-size must be at least 1")
    from pipeline.checkpoint import CheckpointError

    try:
        return _run(p, args)
    except (FileNotFoundError, ValueError, CheckpointError) as e:  # a missing checkpoint or shard, no row
        print(f"select_precision: error: {e}", file=sys.stderr)
        return 2


def _run(p: argparse.ArgumentParser, args) -> int:
    device = torch.device(args.device)
    if args.checkpoint:
        from pipeline.evaluate import load_checkpoint_model

        model, run_cfg, state, _ = load_checkpoint_model(args.checkpoint)
        cfg, step = run_cfg.model, state["step"]
        args.shards = args.shards or run_cfg.data.eval_shards
        args.tokenizer = args.tokenizer or run_cfg.tokenizer_path
        args.seq_len = args.seq_len or run_cfg.seq_len
    else:
        from model.presets import get_preset
        from model.transformer import MultimodalTransformer
        from data_prep.schema import IMG_PATCH, SPECIAL_TOKENS

        cfg, step = get_preset(args.preset), None
        torch.manual_seed(0)
        model = MultimodalTransformer(cfg, img_patch_id=SPECIAL_TOKENS.index(IMG_PATCH))
        args.seq_len = args.seq_len or cfg.max_seq_len
    if not args.shards or not args.tokenizer:
        p.error("held-out shards and their tokenizer are needed: --shards and --tokenizer")
    model.to(device)
    t0 = time.perf_counter()
    res = measure(model, _batches(args, cfg, model.img_patch_id), device)
    res.update(source=str(args.checkpoint or f"preset {args.preset}, untrained"), step=step, seq_len=args.seq_len,
               device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               torch=torch.__version__, commit=git_commit(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               block_size=cfg.msa.block_size, topk=cfg.msa.topk, seconds=round(time.perf_counter() - t0, 1))
    print(f"{res['source']} (step {step}), {res['batches']} batches of {args.seq_len} tokens, {res['device']}")
    print(table(res))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
