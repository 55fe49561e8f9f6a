"""`msa-flops`: per-token attention compute of dense and MSA attention for a model preset at a
context length, and the model's total and active parameter counts.

    msa-flops --preset paper-109b --context 1048576
    msa-flops --preset tiny --context 1024 --json

Attention compute follows docs/msa.md: at query position t (t visible keys), one layer costs
    dense  4*Hq*dh*t                            (q.k scores and p.v, 2 FLOPs per multiply-add)
    MSA    2*HI*dI*t + 4*Hq*dh*min(t, k*B)      (index scores over every visible key + the main
                                                 branch over at most k blocks of B keys)
averaged over t = 1..N. "per MSA layer" is the paper's figure (28.4x for paper-109b at 2^20);
"whole model" also counts the first layers, which stay dense in both models.
Projections, FFNs and the KL are left out: they are the same per token at any context length.

Selection budgets (`--budget`, kernels/select/budget.py) replace k by a count n(t) per token:
    ratio  n(t) = clamp(ceil(ratio * blocks(t)), k_min, k), blocks(t) = ceil(t / B) visible blocks
    top_p  data-dependent: from a measured distribution of counts (`--counts FILE`, the
           `selection/blocks_per_token.json` artifact of a training run, or {"hist": {n: tokens}}),
           taken as the same at every position; without one, the worst case n = k (= static)
and the main branch costs 4*Hq*dh*min(t, n(t)*B). The static top-k figure is printed beside it.

    msa-flops --preset paper-109b --context 1048576 --budget ratio --budget-ratio 0.01 --budget-k-min 4

Parameters are counted on the real module built on the meta device (no memory). "active" = the
parameters one token uses: all attention (index branch included), the shared experts and top_k of
the routed experts, the dense FFNs, norms, routers and the patch encoder; the input embedding
table and the LM head are reported apart (`params_embedding`) and are not in `params_active`
(the usual "non-embedding" convention); `params_active_with_embeddings` adds them.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from kernels.select.budget import BUDGETS, ratio_counts
from model.config import ModelConfig
from model.presets import PRESETS, get_preset

# the paper's published figures (docs/msa.md), printed beside ours for paper-109b
PAPER = {"preset": "paper-109b", "context": 1 << 20, "attention_compute_ratio": 28.4,
         "attention_compute_ratio_ceiling": 32.0, "params_total": 109e9, "params_active": 6e9}


def attention_flops_per_token(cfg: ModelConfig, context: int, counts: dict[int, float] | None = None) -> dict[str, float]:
    """Mean per-token attention FLOPs of one layer, dense and MSA, over positions 1..context, under
    the config's selection budget (`counts`: the measured distribution of blocks per token for top_p)."""
    N = context
    Hq, dh, HI, dI = cfg.n_heads, cfg.head_dim, cfg.n_kv_heads, cfg.msa.index_dim
    B, k = cfg.msa.block_size, cfg.msa.topk
    mean_t = (N + 1) / 2
    dense = 4 * Hq * dh * mean_t
    index = 2 * HI * dI * mean_t
    budget = cfg.msa.budget
    if budget == "static" or (budget == "top_p" and not counts):
        kB = k * B
        m = min(N, kB)
        mean_keys = (m * (m + 1) / 2 + (N - m) * kB) / N
    else:
        t_N = torch.arange(1, N + 1, dtype=torch.float64)
        if budget == "ratio":
            n_N = ratio_counts(torch.ceil(t_N / B).long(), cfg.msa.budget_k_min, k, cfg.msa.budget_ratio)
            mean_keys = float(torch.minimum(t_N, n_N.double() * B).mean())
        else:  # top_p from a measured distribution, the same at every position
            total = sum(counts.values())
            mean_keys = sum(w / total * float(torch.minimum(t_N, torch.tensor(n * B, dtype=torch.float64)).mean())
                            for n, w in counts.items())
    main = 4 * Hq * dh * mean_keys
    return {"dense": dense, "msa": index + main, "msa_index": index, "msa_main": main,
            "ratio": dense / (index + main), "ceiling": (4 * Hq * dh) / (2 * HI * dI),
            "mean_attended_keys": mean_keys}


def read_counts(path: str) -> dict[int, float]:
    """A distribution of blocks per token: {"hist": {n: tokens}} (the training run's
    selection/blocks_per_token.json artifact has it) or a plain {n: tokens} mapping."""
    with open(path) as f:
        raw = json.load(f)
    hist = raw.get("hist", raw) if isinstance(raw, dict) else None
    if not isinstance(hist, dict) or not hist:
        raise ValueError(f"{path}: expected {{\"hist\": {{blocks: tokens, ...}}}}, got {type(raw).__name__}")
    out = {}
    for n, w in hist.items():
        try:
            n_i, w_f = int(n), float(w)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: hist entry {n!r}: {w!r} is not (blocks, tokens)") from None
        if n_i < 1 or w_f < 0:
            raise ValueError(f"{path}: hist entry {n!r}: {w!r}: blocks must be >= 1 and tokens >= 0")
        out[n_i] = out.get(n_i, 0.0) + w_f
    if sum(out.values()) <= 0:
        raise ValueError(f"{path}: the histogram counts no tokens")
    return out


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    from model.moe import MoE
    from model.transformer import MultimodalTransformer

    with torch.device("meta"):
        model = MultimodalTransformer(cfg, img_patch_id=0)
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    inactive = 0
    for block in model.blocks:
        if isinstance(block.ffn, MoE):
            per_expert = sum(p.numel() for p in block.ffn.experts.parameters()) // cfg.moe.n_experts
            inactive += per_expert * (cfg.moe.n_experts - cfg.moe.top_k)
    embedding = model.embed.weight.numel() + (0 if cfg.tie_embeddings else model.lm_head.weight.numel())
    index = sum(p.numel() for n, p in model.named_parameters() if ".attn.index_" in n)
    return {"params_total": total, "params_active": total - inactive - embedding,
            "params_active_with_embeddings": total - inactive, "params_embedding": embedding,
            "params_index_branch": index}


def report(preset: str, context: int, budget: dict | None = None, counts: dict[int, float] | None = None) -> dict:
    """The figures of a preset at a context; `budget`: model.msa fields to override (budget,
    topk, budget_ratio, budget_k_min), `counts`: the measured blocks per token for top_p."""
    cfg = get_preset(preset)
    static = attention_flops_per_token(cfg, context)
    if budget:
        for key, v in budget.items():
            setattr(cfg.msa, key, v)
        cfg.msa.validate()
    a = attention_flops_per_token(cfg, context, counts)
    n_msa = len(cfg.msa_layers)
    n_full = cfg.n_layers - n_msa
    model_dense = cfg.n_layers * a["dense"]
    model_msa = n_full * a["dense"] + n_msa * a["msa"]
    out = {
        "preset": preset, "context": context,
        "n_layers": cfg.n_layers, "n_msa_layers": n_msa,
        "attention_flops_per_token_dense": a["dense"],
        "attention_flops_per_token_msa": a["msa"],
        "attention_flops_per_token_msa_index": a["msa_index"],
        "attention_flops_per_token_msa_main": a["msa_main"],
        "attention_compute_ratio": a["ratio"],
        "attention_compute_ratio_ceiling": a["ceiling"],
        "model_attention_flops_per_token_dense": model_dense,
        "model_attention_flops_per_token_msa": model_msa,
        "model_attention_compute_ratio": model_dense / model_msa,
        "budget": cfg.msa.budget, "topk": cfg.msa.topk,
        "mean_attended_keys": a["mean_attended_keys"],
        "static_attention_compute_ratio": static["ratio"],
        **count_parameters(cfg),
    }
    if cfg.msa.budget == "ratio":
        out.update(budget_ratio=cfg.msa.budget_ratio, budget_k_min=cfg.msa.budget_k_min)
    if cfg.msa.budget == "top_p":
        out["budget_counts"] = "measured" if counts else "worst case (k_max blocks for every token)"
    if preset == PAPER["preset"]:
        out["paper"] = dict(PAPER)
    return out


def _fmt_params(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def print_report(r: dict) -> None:
    cfg = get_preset(r["preset"])
    msa = cfg.msa
    print(f"preset {r['preset']}  context {r['context']:,} tokens")
    print(f"  shape: {cfg.n_layers} layers ({r['n_layers'] - r['n_msa_layers']} full attention + "
          f"{r['n_msa_layers']} MSA), Hq {cfg.n_heads}, Hkv {cfg.n_kv_heads}, dh {cfg.head_dim}, "
          f"dI {msa.index_dim}, k {r['topk']} x B {msa.block_size} = {r['topk'] * msa.block_size} keys")
    if not msa.enabled:
        print("  (msa.enabled = false in this preset: the MSA figures are what its shape would cost)")
    print("per-token attention FLOPs, one MSA layer, mean over positions 1..N:")
    print(f"  dense  4*Hq*dh*t                        {r['attention_flops_per_token_dense']:.4g}")
    keys = "k*B" if r["budget"] == "static" else "n(t)*B"
    print(f"  MSA    2*HI*dI*t + 4*Hq*dh*min(t, {keys})  {r['attention_flops_per_token_msa']:.4g}  "
          f"(index {r['attention_flops_per_token_msa_index']:.4g}, main {r['attention_flops_per_token_msa_main']:.4g})")
    if r["budget"] != "static":
        how = {"ratio": f"n(t) = clamp(ceil({r.get('budget_ratio')} * blocks(t)), {r.get('budget_k_min')}, {r['topk']})",
               "top_p": f"n(t) from {r.get('budget_counts')}"}[r["budget"]]
        print(f"  budget {r['budget']}: {how}; {r['mean_attended_keys']:,.0f} keys attended per token on average")
    print(f"  ratio dense / MSA                       {r['attention_compute_ratio']:.1f}x  "
          f"(ceiling 4*Hq*dh / (2*HI*dI) = {r['attention_compute_ratio_ceiling']:.1f}x)")
    if r["budget"] != "static":
        print(f"  static top-{get_preset(r['preset']).msa.topk} for comparison        "
              f"{r['static_attention_compute_ratio']:.1f}x")
    print(f"whole model (full-attention layers stay dense): {r['model_attention_flops_per_token_dense']:.4g} vs "
          f"{r['model_attention_flops_per_token_msa']:.4g} FLOPs per token, {r['model_attention_compute_ratio']:.1f}x")
    print(f"parameters: total {_fmt_params(r['params_total'])}, active {_fmt_params(r['params_active'])} per token "
          f"without embeddings ({_fmt_params(r['params_active_with_embeddings'])} with the embedding table and "
          f"LM head, {_fmt_params(r['params_embedding'])}); index branch {_fmt_params(r['params_index_branch'])}")
    if "paper" in r:
        p = r["paper"]
        note = "" if r["context"] == p["context"] else f" (at {p['context']:,} tokens)"
        print(f"paper{note}: {p['attention_compute_ratio']}x (ceiling {p['attention_compute_ratio_ceiling']:.0f}x), "
              f"{p['params_total'] / 1e9:.0f}B total / {p['params_active'] / 1e9:.0f}B active; "
              f"see model/README.md for how our counts relate to these")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msa-flops", description="Per-token attention compute (dense vs MSA) and "
                                "parameter counts of a model preset at a context length.")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--context", required=True, type=int, help="context length N in tokens, e.g. 1048576")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    b = p.add_argument_group("selection budget (default: the preset's)")
    b.add_argument("--budget", choices=BUDGETS, help="static top-k, ratio of the visible blocks, or top_p")
    b.add_argument("--topk", type=int, help="k (k_max of an adaptive budget)")
    b.add_argument("--budget-ratio", type=float, help="ratio: the fraction of the visible blocks")
    b.add_argument("--budget-k-min", type=int, help="ratio, top_p: the fewest blocks per token")
    b.add_argument("--counts", metavar="FILE", help="top_p: the measured blocks per token, a JSON "
                   "histogram {\"hist\": {blocks: tokens}} (a run's selection/blocks_per_token.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.context < 1:
        print(f"msa-flops: error: --context must be a positive number of tokens, got {args.context}", file=sys.stderr)
        return 2
    budget = {k: v for k, v in (("budget", args.budget), ("topk", args.topk), ("budget_ratio", args.budget_ratio),
                                 ("budget_k_min", args.budget_k_min)) if v is not None}
    try:
        counts = read_counts(args.counts) if args.counts else None
        r = report(args.preset, args.context, budget, counts)
    except (OSError, ValueError) as e:  # a bad file or a field out of range (ConfigError names it)
        print(f"msa-flops: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(r))
    else:
        print_report(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
