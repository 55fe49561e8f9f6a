"""The study's outputs, generated from its records: results.json, report.md and figures/*.png, logged
as artifacts of the study's MLflow parent run. Nothing in the report is written by hand: the
table, the intervals and the conclusion's sentences all come from the numbers.

    msa-study --config configs/study-tiny.toml --report-only     # rebuild them from the records
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.evaluate import IMAGE_TEXT_WINDOW, bucket_sort_key  # noqa: E402
from pipeline.study_stats import paired_difference, summarize, verdict  # noqa: E402

# metric -> (label, lower is better)
METRICS = {
    "eval_lm_loss": ("held-out LM loss", True),
    "eval_lm_loss_image_text": ("LM loss, image text", True),
    "eval_lm_loss_other_text": ("LM loss, other text", True),
    "retrieval_acc": ("retrieval accuracy", False),
    "step_ms": ("step time (ms)", True),
    "step_ms_sparse": ("step time, sparse steps (ms)", True),
    "tokens_per_s": ("tokens/s", False),
    "sparsity": ("sparsity", False),
    "blocks_per_token": ("blocks per token and group", True),
    "score_recall": ("score recall", False),
    "block_recall": ("block recall", False),
    "tokens": ("training tokens", False),
    "tokens_seen": ("training tokens (non-padding)", False),
}
COMPARED = ("eval_lm_loss", "eval_lm_loss_image_text", "eval_lm_loss_other_text", "retrieval_acc", "step_ms")
HEADLINE = ("eval_lm_loss", "retrieval_acc")
BASELINE = "dense"


def _arm_order(cfg, records: list[dict]) -> list[str]:
    names = [a.name for a in cfg.all_arms()]
    names.sort(key=lambda a: a != BASELINE)
    return [a for a in names if any(r["arm"] == a for r in records)]


def _by_seed(records: list[dict], arm: str, metric: str) -> dict[int, float]:
    return {r["seed"]: r.get(metric) for r in records if r["arm"] == arm and r.get(metric) is not None}


def setup_of(cfg, plan) -> dict:
    from data_prep.shards import Manifest
    from model.flops import count_parameters

    m = plan.base.model
    msa_model = dataclasses.replace(m, msa=dataclasses.replace(m.msa, enabled=True))
    params = count_parameters(msa_model)
    train_docs = 0
    for d in plan.base.data.shards:
        try:
            train_docs += Manifest.read(Path(d)).documents
        except (OSError, ValueError, KeyError):
            pass
    return {
        "model": {"d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads,
                  "head_dim": m.head_dim, "vocab_size": m.vocab_size, "image_tokens": m.image_tokens,
                  "msa": {k: getattr(m.msa, k) for k in ("n_dense_layers", "block_size", "topk", "index_dim",
                                                         "backend")},
                  "moe": {k: getattr(m.moe, k) for k in ("enabled", "n_experts", "top_k", "expert_hidden")}},
        "params_total": params["params_total"],
        "params_without_index_branch": params["params_total"] - params["params_index_branch"],
        "params_index_branch": params["params_index_branch"],
        "params_active": params["params_active"], "params_embedding": params["params_embedding"],
        "context": plan.base.seq_len, "tokens_per_step": plan.tokens_per_step, "steps": plan.steps,
        "tokens_per_run": plan.tokens, "retrofit_step": plan.retrofit_step,
        "retrofit_fraction": plan.retrofit_step / plan.steps, "warmup_tokens": plan.base.schedule.warmup_tokens,
        "lr": plan.base.train.lr, "dtype": plan.base.train.dtype, "seeds": list(cfg.seeds),
        "train_shards": list(plan.base.data.shards), "train_documents": train_docs,
        "base_config": cfg.base_config, "overrides": cfg.run_overrides,
    }


def build_results(cfg, plan, records: list[dict], meta: dict, commit: str, dirty: bool) -> dict:
    arms = _arm_order(cfg, records)
    out_arms = {}
    for a in arms:
        runs = sorted((r for r in records if r["arm"] == a), key=lambda r: r["seed"])
        out_arms[a] = {"mode": runs[0]["mode"], "runs": runs,
                       "summary": {k: summarize([r.get(k) for r in runs]) for k in METRICS}}
    comparisons, extra = [], []
    if BASELINE in out_arms:
        for a in arms:
            if a == BASELINE:
                continue
            for metric in COMPARED:
                d = paired_difference(_by_seed(records, a, metric), _by_seed(records, BASELINE, metric))
                if d["n"] == 0:
                    continue
                comparisons.append({"arm": a, "baseline": BASELINE, "metric": metric, **d,
                                    "verdict": verdict(d, METRICS[metric][1])})
    if "native" in out_arms and "retrofit" in out_arms:
        for metric in HEADLINE:
            d = paired_difference(_by_seed(records, "native", metric), _by_seed(records, "retrofit", metric))
            if d["n"]:
                extra.append({"arm": "native", "baseline": "retrofit", "metric": metric, **d,
                              "verdict": verdict(d, METRICS[metric][1])})
    # one evaluation set is the same documents at the same context, wherever the shards lay (a study
    # accumulated over sessions on other machines finds them at other paths)
    eval_sets = {json.dumps({k: v for k, v in r["eval_set"].items() if k != "shards"}, sort_keys=True)
                 for r in records}
    eval_paths = sorted({r["eval_set"].get("shards", "") for r in records})
    devices = sorted({r.get("device", meta["device"]) for r in records})
    # the commit that trained and evaluated each run (records made before this was recorded: unknown)
    run_commits = sorted({r["commit"] for r in records if r.get("commit")})
    return _relative_paths({
        "study": cfg.name, "arms": out_arms, "comparisons": comparisons, "extra_comparisons": extra,
        "commit": commit + ("+dirty" if dirty else ""), "run_commits": run_commits,
        "device": "; ".join(devices) or meta["device"],
        "date": time.strftime("%Y-%m-%d"), "command": meta["command"],
        "eval": {**json.loads(next(iter(eval_sets))), "shards": eval_paths[0], "shards_seen": eval_paths}
                if len(eval_sets) == 1 else None,
        "eval_sets_differ": len(eval_sets) > 1,
        # (arm, seed) pairs of the config without a record yet: a study that is still accumulating
        "missing": [f"{a.name}-s{seed}" for seed in cfg.seeds for a in cfg.all_arms()
                    if not any(r["arm"] == a.name and r["seed"] == seed for r in records)],
        "setup": setup_of(cfg, plan),
        "definitions": {
            "tokens": "row capacity trained per run: steps x batch x workers x seq_len (tokens_seen: non-padding)",
            "eval_lm_loss_image_text": f"LM loss on text targets within {IMAGE_TEXT_WINDOW} tokens after an image",
            "retrieval_acc_by_distance": "greedy answer exact, by tokens from the key item to the answer",
            "step_ms": "median over logging windows (the first left out) of window time / steps",
            "ci95": "paired by seed, mean +- t(0.975, n-1) sd / sqrt(n); null when n < 2",
        },
    })


def _relative_paths(x):
    """Every absolute path below where the study ran, made relative to it: results.json and the
    report travel to other machines (the study directory's records keep the absolute paths)."""
    if isinstance(x, dict):
        return {k: _relative_paths(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_relative_paths(v) for v in x]
    if isinstance(x, str) and x.startswith("/"):
        return _shown(x)
    if isinstance(x, str):  # a path inside a string, as in an override "data.shards=['/abs/dir']"
        return x.replace(str(Path.cwd().resolve()) + "/", "")
    return x


# ---------------------------------------------------------------------------------------------------
# report.md


def _fmt(v, metric: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if metric in ("step_ms", "step_ms_sparse"):
        return f"{v:.0f}"
    if metric in ("tokens_per_s", "tokens", "tokens_seen"):
        return f"{v:,.0f}"
    return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"


def _pm(s: dict, metric: str) -> str:
    if s["n"] == 0:
        return "–"
    if s["std"] is None:
        return _fmt(s["mean"], metric)
    return f"{_fmt(s['mean'], metric)} ± {_fmt(s['std'], metric)}"


def _diff(c: dict | None, metric: str) -> str:
    if c is None:
        return "–"
    if c["ci95"] is None:
        return f"{c['diff_mean']:+.3f} (n={c['n']}, no CI)" if metric != "step_ms" else f"{c['diff_mean']:+.0f} (n=1)"
    lo, hi = c["ci95"]
    if metric == "step_ms":
        return f"{c['diff_mean']:+.0f} [{lo:+.0f}, {hi:+.0f}]"
    return f"{c['diff_mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _trained_at(results: dict) -> str:
    """Which commit trained which runs, where that is not simply the commit that wrote the report (a
    study accumulated over sessions): ' (runs trained at `abc` (dense, native) and `def` (retrofit))'."""
    by_commit: dict[str, list[str]] = {}
    for name, body in results["arms"].items():
        for r in body["runs"]:
            if r.get("commit"):
                arms = by_commit.setdefault(r["commit"], [])
                if name not in arms:
                    arms.append(name)
    if not by_commit or set(by_commit) == {results["commit"]}:
        return ""
    if len(by_commit) == 1:
        return f" (runs trained at `{next(iter(by_commit))[:12]}`)"
    parts = [f"`{c[:12]}` ({', '.join(a)})" for c, a in sorted(by_commit.items(), key=lambda x: x[0])]
    return f" (runs trained at {', '.join(parts[:-1])} and {parts[-1]})"


def _shown(path: str) -> str:
    """A data path as the report shows it: relative to where the study ran, when it lies below it
    (a report is read on other machines; the absolute path is in results.json)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def conclusion(results: dict) -> list[str]:
    """Sentences that say what the paired intervals support, and no more."""
    arms = results["arms"]
    comp = {(c["arm"], c["metric"]): c for c in results["comparisons"]}
    lines = []
    if BASELINE not in arms:
        return ["There is no dense arm: nothing to compare against."]
    for a in arms:
        if a == BASELINE:
            continue
        parts = []
        for metric in HEADLINE:
            c = comp.get((a, metric))
            if c is None:
                continue
            label = METRICS[metric][0]
            v = c["verdict"]
            if c["n"] >= 2 and c["diff_std"] == 0 and c["diff_mean"] == 0:
                parts.append(f"its {label} equals dense's on every one of the {c['n']} seeds")
            elif v == "undefined":
                parts.append(f"its {label} differs from dense's by {c['diff_mean']:+.3f} on {c['n']} paired seed(s), "
                             f"with no interval: the difference cannot be told from seed noise")
            elif v == "within noise":
                lo, hi = c["ci95"]
                parts.append(f"its {label} is within noise of dense's ({c['diff_mean']:+.3f}, 95% CI "
                             f"[{lo:+.3f}, {hi:+.3f}] includes 0, {c['n']} seeds)")
            else:
                lo, hi = c["ci95"]
                parts.append(f"its {label} is **{v}** than dense's by {abs(c['diff_mean']):.3f} (95% CI "
                             f"[{lo:+.3f}, {hi:+.3f}], {c['n']} seeds)")
        if parts:
            lines.append(f"- **{a}**: " + "; ".join(parts) + ".")
    for c in results.get("extra_comparisons", []):
        label = METRICS[c["metric"]][0]
        if c["n"] >= 2 and c["diff_std"] == 0 and c["diff_mean"] == 0:
            lines.append(f"- native against retrofit, {label}: equal on every one of the {c['n']} seeds.")
        elif c["verdict"] == "undefined":
            lines.append(f"- native against retrofit, {label}: {c['diff_mean']:+.3f} on one paired seed, no interval.")
        elif c["verdict"] == "within noise":
            lo, hi = c["ci95"]
            lines.append(f"- native against retrofit, {label}: within noise ({c['diff_mean']:+.3f}, 95% CI "
                         f"[{lo:+.3f}, {hi:+.3f}]).")
        else:
            lo, hi = c["ci95"]
            lines.append(f"- native against retrofit, {label}: native is **{c['verdict']}** by "
                         f"{abs(c['diff_mean']):.3f} (95% CI [{lo:+.3f}, {hi:+.3f}]).")
    # arms that select blocks differently (budgets, top-k) compare fairly only at equal compute
    blocks = {a: b["summary"]["blocks_per_token"]["mean"] for a, b in arms.items()
              if b["summary"].get("blocks_per_token", {}).get("mean") is not None}
    if len(blocks) >= 2:
        lo, hi = min(blocks.values()), max(blocks.values())
        listed = ", ".join(f"{a} {v:.2f}" for a, v in blocks.items())
        if hi > 1.1 * lo:
            lines.append(f"- Compute: the MSA arms attended to different numbers of blocks per token and group on "
                         f"the held-out data ({listed}): they did not run at equal attention compute, so their "
                         f"quality differences mix how each selects with how much it selects.")
        else:
            lines.append(f"- Compute: the MSA arms attended to about the same number of blocks per token and "
                         f"group on the held-out data ({listed}; within 10%).")
    accs = [b["summary"]["retrieval_acc"]["mean"] for b in arms.values()]
    if accs and all(a == 0 for a in accs):
        lines.append("- No arm answers any retrieval question: at this scale retrieval cannot tell the arms apart.")
    ns = [c["n"] for c in results["comparisons"]]
    if ns and min(ns) == 2:
        lines.append("- With 2 seeds each interval rests on a single degree of freedom (t = 12.7): a narrow one "
                     "means the two seeds agreed, not that the noise is known; more seeds would tell.")
    s = results["setup"]
    lines.append(f"- Scope: {_params(s['params_total'])}-parameter models, {s['tokens_per_run']:,} training tokens "
                 f"per run at a {s['context']:,}-token context, {len(s['seeds'])} seed(s) per arm, on "
                 f"{', '.join('/'.join(Path(p).parts[-2:]) for p in s['train_shards'])}. What holds here need not hold at "
                 f"other scales; \"within noise\" means this study cannot separate the arms, not that they are equal.")
    return lines


def write_report(results: dict, path: Path, figures: list[str]) -> None:
    arms = results["arms"]
    comp = {(c["arm"], c["metric"]): c for c in results["comparisons"]}
    s = results["setup"]
    L = []
    names = list(arms)
    listed = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]
    L.append(f"# Study `{results['study']}`: {listed} at equal tokens")
    L.append("")
    L.append(f"Generated by `msa-study` from `results.json` on {results['date']}; commit `{results['commit']}`"
             + _trained_at(results) + f"; device: {results['device']}.")
    L.append("")
    L.append(f"    {results['command']}")
    L.append("")
    if results.get("missing"):
        L.append(f"**Incomplete**: not recorded yet: {', '.join(results['missing'])}. Running the study's "
                 f"command again trains and evaluates only what is missing.")
        L.append("")
    L.append("## Results")
    L.append("")
    L.append("Mean ± sample std over seeds; Δ = arm − dense paired by seed, with its 95% t-interval "
             "(– where undefined). Lower loss and step time are better; higher retrieval is better.")
    L.append("")
    L.append("| arm | seeds | held-out LM loss | Δ loss [95% CI] | image text | other text | retrieval acc "
             "| Δ retrieval [95% CI] | step ms | Δ step ms [95% CI] | tokens/s | sparsity | blocks/token "
             "| score recall | block recall |")
    L.append("|" + " --- |" * 15)
    for a, body in arms.items():
        sm = body["summary"]
        L.append(f"| {a} | {sm['eval_lm_loss']['n']} | {_pm(sm['eval_lm_loss'], 'eval_lm_loss')} "
                 f"| {_diff(comp.get((a, 'eval_lm_loss')), 'eval_lm_loss')} "
                 f"| {_pm(sm['eval_lm_loss_image_text'], '')} | {_pm(sm['eval_lm_loss_other_text'], '')} "
                 f"| {_pm(sm['retrieval_acc'], '')} | {_diff(comp.get((a, 'retrieval_acc')), 'retrieval_acc')} "
                 f"| {_pm(sm['step_ms'], 'step_ms')} | {_diff(comp.get((a, 'step_ms')), 'step_ms')} "
                 f"| {_pm(sm['tokens_per_s'], 'tokens_per_s')} | {_pm(sm['sparsity'], '')} "
                 f"| {_pm(sm['blocks_per_token'], '')} | {_pm(sm['score_recall'], '')} | {_pm(sm['block_recall'], '')} |")
    L.append("")
    L.append("Retrieval accuracy by distance (tokens from the key item to the answer), mean over seeds "
             "(questions per seed in parentheses):")
    L.append("")
    buckets = sorted({b for body in arms.values() for r in body["runs"] for b in r["retrieval_acc_by_distance"]},
                     key=bucket_sort_key)
    L.append("| arm | " + " | ".join(buckets) + " |")
    L.append("|" + " --- |" * (len(buckets) + 1))
    for a, body in arms.items():
        cells = []
        for b in buckets:
            vals = [r["retrieval_acc_by_distance"].get(b) for r in body["runs"]]
            ns = [r.get("retrieval_n_by_distance", {}).get(b, 0) for r in body["runs"]]
            sm = summarize(vals)
            cells.append(f"{_fmt(sm['mean'])} ({ns[0] if ns else 0})")
        L.append(f"| {a} | " + " | ".join(cells) + " |")
    L.append("")
    kinds = sorted({k for body in arms.values() for r in body["runs"] for k in r.get("retrieval_acc_by_kind", {})})
    if kinds:
        L.append("Retrieval accuracy by kind (text_fact: the answer is stated in text; image_fact: shown only in a "
                 "picture), mean ± std over seeds:")
        L.append("")
        L.append("| arm | " + " | ".join(kinds) + " |")
        L.append("|" + " --- |" * (len(kinds) + 1))
        for a, body in arms.items():
            L.append(f"| {a} | " + " | ".join(
                _pm(summarize([r.get("retrieval_acc_by_kind", {}).get(k) for r in body["runs"]]), "") for k in kinds)
                + " |")
        L.append("")
    L.append("## Conclusion")
    L.append("")
    L += conclusion(results)
    L.append("")
    L.append("## Figures")
    L.append("")
    for f in figures:
        L.append(f"![{Path(f).stem}]({f})")
        L.append("")
    L.append("## Set-up")
    L.append("")
    m = s["model"]
    L.append(f"- Model: d_model {m['d_model']}, {m['n_layers']} layers ({m['msa']['n_dense_layers']} dense + "
             f"{m['n_layers'] - m['msa']['n_dense_layers']} MSA in the MSA arms), {m['n_heads']} query / "
             f"{m['n_kv_heads']} KV heads of {m['head_dim']}, vocabulary {m['vocab_size']:,}, MoE "
             f"{m['moe']['n_experts']} experts top-{m['moe']['top_k']}" if m["moe"]["enabled"] else
             f"- Model: d_model {m['d_model']}, {m['n_layers']} layers, dense FFN")
    L.append(f"- MSA: blocks of {m['msa']['block_size']}, top-{m['msa']['topk']}, index dim {m['msa']['index_dim']} "
             f"(kernels: {m['msa']['backend']}); the dense-patched arm uses the same block size and top-k")
    L.append(f"- Parameters: {_params(s['params_total'])} with the index branch, "
             f"{_params(s['params_without_index_branch'])} without (the dense arm), index branch "
             f"{_params(s['params_index_branch'])}; {_params(s['params_active'])} active without embeddings "
             f"({_params(s['params_embedding'])} embeddings)")
    L.append(f"- Tokens: {s['tokens_per_run']:,} per run ({s['steps']} steps of {s['tokens_per_step']:,}), the same "
             f"for every arm; context {s['context']:,}; {s['dtype']}; peak LR {s['lr']}")
    L.append(f"- Native: dense warm-up of {s['warmup_tokens']:,} tokens (index branch learning from the KL), then "
             f"sparse. Retrofit: the dense run of the same seed to step {s['retrofit_step']} "
             f"({s['retrofit_fraction']:.0%} of the budget), then fresh index branch, warm-up of "
             f"{s['warmup_tokens']:,} tokens and sparse to the end, whole model training, same LR schedule and "
             f"the rest of the same data in the same order (a fresh optimizer state)")
    L.append(f"- Seeds: {', '.join(str(x) for x in s['seeds'])} (initialisation and data order; paired across arms)")
    L.append(f"- Training data: {', '.join(_shown(p) for p in s['train_shards'])} ({s['train_documents']:,} documents)")
    ev = results["eval"]
    if ev:
        L.append(f"- Evaluation: the first {ev['documents']} documents of {_shown(ev['shards'])} (sha256 "
                 f"`{ev['sha256'][:16]}…`), identical for every run")
    else:
        L.append("- Evaluation: **the runs were not all evaluated on the same documents** (see results.json)")
    L.append(f"- Definitions: {'; '.join(f'{k}: {v}' for k, v in results['definitions'].items())}")
    L.append("")
    path.write_text("\n".join(L) + "\n")


# ---------------------------------------------------------------------------------------------------
# figures


COLORS = {"dense": "#444444", "native": "#1f77b4", "retrofit": "#d62728", "dense-patched": "#ff7f0e"}


def _color(arm: str, i: int) -> str:
    return COLORS.get(arm, plt.cm.tab10(i % 10))


def _curve(records: list[dict], rec: dict) -> list[list[float]]:
    """The training curve of a run; a retrofit's starts at its dense run's point at the retrofit step
    (before it, it is the dense run, drawn as such)."""
    own = rec.get("train_curve", [])
    src = rec.get("source") or {}
    if rec["mode"] != "retrofit" or "step" not in src:
        return own
    dense = next((r for r in records if r["arm"] == BASELINE and r["seed"] == rec["seed"]), None)
    head = [p for p in (dense or {}).get("train_curve", []) if p[0] == src["step"]]
    return head + own


def figures(results: dict, records: list[dict], out_dir: Path) -> list[str]:
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    arms = results["arms"]
    tps = results["setup"]["tokens_per_step"]
    made = []

    # left: the whole run; right: its second half, where the arms' differences are a few hundredths
    # and the first panel's scale (set by the initial loss) hides them
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(10, 4))
    drawn = []  # (x, ys) per arm: the zoom's limits need every arm's end first
    for i, (a, body) in enumerate(arms.items()):
        if body["mode"] == "dense-patched":
            continue  # evaluation only: its curve is the dense arm's
        curves = [dict(map(tuple, _curve(records, r))) for r in body["runs"]]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        ys = np.array([[c[s] for s in steps] for c in curves])
        x = np.array(steps) * tps
        drawn.append((x, ys))
        for axis in (ax, zoom):
            axis.plot(x, ys.mean(0), label=f"{a} (n={len(curves)})", color=_color(a, i))
            if len(curves) > 1:
                axis.fill_between(x, ys.min(0), ys.max(0), color=_color(a, i), alpha=0.2)
    r_step = results["setup"]["retrofit_step"]
    for axis in (ax, zoom):
        if "retrofit" in arms:
            axis.axvline(r_step * tps, color="#999999", ls=":", lw=1)
        axis.set_xlabel("training tokens")
    if drawn:
        x_end = max(float(x[-1]) for x, _ in drawn)
        late = [ys[:, x >= x_end / 2] for x, ys in drawn if (x >= x_end / 2).any()]
        lo, hi = min(v.min() for v in late), max(v.max() for v in late)
        pad = 0.05 * (hi - lo or 1.0)
        zoom.set_xlim(x_end / 2, x_end)
        zoom.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel("train LM loss")
    ax.set_title("training loss (mean over seeds, band: min-max)", fontsize=9)
    zoom.set_title("second half of training, zoomed", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "loss_curves.png", dpi=90)
    plt.close(fig)
    made.append("figures/loss_curves.png")

    for key, fname, ylabel, title in (
            ("eval_lm_loss_by_position", "loss_by_position.png", "held-out LM loss",
             "loss by position in the document (tokens)"),
            ("retrieval_acc_by_distance", "retrieval_by_distance.png", "retrieval accuracy",
             "retrieval by distance from the key item (tokens)")):
        buckets = sorted({b for body in arms.values() for r in body["runs"] for b in r[key]}, key=bucket_sort_key)
        if not buckets:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4))
        n = len(arms)
        for i, (a, body) in enumerate(arms.items()):
            means, stds = [], []
            for b in buckets:
                sm = summarize([r[key].get(b) for r in body["runs"]])
                means.append(np.nan if sm["mean"] is None else sm["mean"])
                stds.append(0.0 if sm["std"] is None else sm["std"])
            x = np.arange(len(buckets)) + (i - (n - 1) / 2) * 0.8 / n
            ax.errorbar(x, means, yerr=stds, fmt="o-", ms=4, capsize=2, label=a, color=_color(a, i))
        ax.set_xticks(range(len(buckets)), buckets, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title + "; mean ± std over seeds", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=90)
        plt.close(fig)
        made.append(f"figures/{fname}")

    msa_arms = [a for a, body in arms.items() if any(r.get("per_layer") for r in body["runs"])]
    if msa_arms:
        stats = ("sparsity", "score_recall", "block_recall")
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
        layers = sorted({int(i) for a in msa_arms for r in arms[a]["runs"] for i in r.get("per_layer", {})})
        for ax, stat in zip(axes, stats):
            for i, a in enumerate(msa_arms):
                vals = [summarize([r["per_layer"].get(str(li), {}).get(stat) for r in arms[a]["runs"]])
                        for li in layers]
                x = np.arange(len(layers)) + (i - (len(msa_arms) - 1) / 2) * 0.8 / len(msa_arms)
                ax.bar(x, [np.nan if v["mean"] is None else v["mean"] for v in vals], width=0.8 / len(msa_arms),
                       yerr=[0 if v["std"] is None else v["std"] for v in vals], label=a,
                       color=_color(a, list(arms).index(a)))
            ax.set_xticks(range(len(layers)), [str(li) for li in layers])
            ax.set_xlabel("layer")
            ax.set_title(stat.replace("_", " "), fontsize=9)
            ax.set_ylim(0, 1.05)
        axes[0].legend(fontsize=7)
        fig.suptitle("MSA layers on the held-out set (mean ± std over seeds)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / "msa_layers.png", dpi=90)
        plt.close(fig)
        made.append("figures/msa_layers.png")
    return made


def write_outputs(cfg, plan, study_dir: Path, records: list[dict], meta: dict, client, parent_id: str | None) -> dict:
    from pipeline.study import git_state

    if not records:
        raise FileNotFoundError(f"{study_dir / 'records'}: no recorded run yet")
    commit, dirty = git_state()
    results = build_results(cfg, plan, records, meta, commit, dirty)
    made = figures(results, records, study_dir / "figures")
    (study_dir / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, study_dir / "report.md", made)
    if client is not None and parent_id:
        for name in ("results.json", "report.md"):
            client.log_artifact(parent_id, str(study_dir / name))
        for f in made:
            client.log_artifact(parent_id, str(study_dir / f), "figures")
    print(f"[msa-study] report: {study_dir / 'report.md'} ({len(records)} runs recorded)", flush=True)
    return results
