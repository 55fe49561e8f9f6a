"""Plots logged to the MLflow run as artifacts: training curves, a block-selection map and where
the selection budget goes (blocks per token by position).

Made on rank 0 at checkpoints and at the end, from the run's own metric history (so a resumed run's
plots cover the whole run).
"""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CURVES = ("train/lm_loss", "train/kl_index_loss", "train/sparsity", "train/blocks_per_token", "train/score_recall",
          "eval/lm_loss", "eval/retrieval_acc")


def _history(client, run_id: str, key: str) -> tuple[list[int], list[float]]:
    pts = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.step for m in pts], [m.value for m in pts]


LAYER_STYLES = [(c, ls) for ls in ("-", "--", ":", "-.") for c in plt.get_cmap("tab10").colors]


def training_curves(client, run_id: str, out_path: Path, switch_step: int | None = None) -> Path | None:
    """One panel per curve that has data; per-layer sparsity and KL as one line per layer (each its
    own colour and dash). `switch_step`: where attention went from the dense warm-up to sparse, marked
    in every panel (the KL jumps there: from all visible keys to the selected ones)."""
    keys = set(client.get_run(run_id).data.metrics)
    panels = [k for k in CURVES if k in keys]
    layer_keys = sorted((k for k in keys if re.fullmatch(r"layer/\d+/(sparsity|kl_index_loss|blocks_per_token)", k)),
                        key=lambda k: (k.split("/")[2], int(k.split("/")[1])))
    per_layer = sorted({k.split("/")[2] for k in layer_keys})
    n = len(panels) + len(per_layer)
    if n == 0:
        return None
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    ax_iter = iter(axes.flat)
    def mark(ax):
        if switch_step:
            ax.axvline(switch_step, color="tab:red", lw=0.8, ls="--", label=f"sparse from step {switch_step}")

    for key in panels:
        ax = next(ax_iter)
        ax.plot(*_history(client, run_id, key), marker=".")
        mark(ax)
        ax.set_title(key)
        ax.set_xlabel("step")
        if switch_step:
            ax.legend(fontsize=7)
    for stat in per_layer:
        ax = next(ax_iter)
        for i, k in enumerate(k for k in layer_keys if k.endswith("/" + stat)):
            color, dash = LAYER_STYLES[i % len(LAYER_STYLES)]
            ax.plot(*_history(client, run_id, k), color=color, ls=dash, label=f"layer {k.split('/')[1]}")
        mark(ax)
        ax.set_title(f"per layer: {stat}")
        ax.set_xlabel("step")
        ax.legend(fontsize=7, ncol=2)
    for ax in ax_iter:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def selection_map(by_layer: dict[int, np.ndarray], block_size: int, out_path: Path, title: str) -> Path:
    """Which key blocks each query token of one document attends to, one panel per (layer, group).

    by_layer: {layer: int [T, groups, topk]} block numbers (-1 = unused slot). Each panel is
    [T, n_blocks]: the token's own (local) block in one colour, the other selected blocks in another.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    panels = [(layer, g) for layer in sorted(by_layer) for g in range(by_layer[layer].shape[1])][:8]
    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows + 0.6), squeeze=False)
    cmap = ListedColormap(["white", "tab:blue", "tab:orange"])
    for ax, (layer, g) in zip(axes.flat, panels):
        idx_TK = by_layer[layer][:, g]
        T = idx_TK.shape[0]
        n_blocks = (T + block_size - 1) // block_size
        img = np.zeros((T, n_blocks), np.int8)
        t_idx, k_idx = np.nonzero(idx_TK >= 0)
        blocks = idx_TK[t_idx, k_idx]
        img[t_idx, blocks] = np.where(blocks == t_idx // block_size, 2, 1)
        ax.imshow(img, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=2)
        ax.set_title(f"layer {layer}, group {g}", fontsize=9)
        ax.set_xlabel("key block")
        ax.set_ylabel("query token")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.legend(handles=[Patch(color="tab:orange", label="local block (always selected)"),
                        Patch(color="tab:blue", label="selected by the index branch"),
                        Patch(facecolor="white", edgecolor="grey", label="not attended")],
               loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def blocks_profile(by_layer: dict[int, np.ndarray], pos_N: np.ndarray, valid_N: np.ndarray, block_size: int) -> dict:
    """Where the selection budget goes, from one step's selections (every row of the batch).

    by_layer: {layer: int [N, groups, slots]} (-1 = unused slot) over the flat token axis, pos_N
    each token's position in its document, valid_N whether it is a real token. Returns
    {"hist": {blocks: (token, group) pairs, all layers}, "by_layer": {layer: {"position_block":
    [...], "mean_blocks": [...]}}}: the mean blocks per (token, group) at each position block."""
    hist: dict[int, int] = {}
    layers = {}
    blk_N = pos_N // block_size
    for layer, idx_NHK in sorted(by_layer.items()):
        n_NH = (idx_NHK >= 0).sum(-1)[valid_N]
        vals, cnt = np.unique(n_NH, return_counts=True)
        for v, c in zip(vals.tolist(), cnt.tolist()):
            hist[v] = hist.get(v, 0) + c
        b_N = blk_N[valid_N]
        sums = np.bincount(b_N, weights=n_NH.mean(-1))
        ns = np.bincount(b_N)
        have = np.nonzero(ns)[0]
        layers[str(layer)] = {"position_block": have.tolist(), "mean_blocks": (sums[have] / ns[have]).round(4).tolist()}
    return {"hist": {str(k): v for k, v in sorted(hist.items())}, "by_layer": layers}


def budget_plot(profile: dict, block_size: int, k_max: int, out_path: Path, title: str) -> Path:
    """Mean blocks per (token, group) against the position in the document, one line per MSA layer,
    with static top-k (min(k, visible blocks)) for reference; the histogram of counts beside it."""
    fig, (ax, ax_h) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    longest = 0
    for i, (layer, prof) in enumerate(profile["by_layer"].items()):
        color, dash = LAYER_STYLES[i % len(LAYER_STYLES)]
        x = np.asarray(prof["position_block"]) * block_size
        ax.plot(x, prof["mean_blocks"], color=color, ls=dash, label=f"layer {layer}")
        longest = max(longest, int(x.max()) + block_size if len(x) else 0)
    x = np.arange(0, max(longest, block_size), block_size)
    ax.plot(x, np.minimum(k_max, x // block_size + 1), color="black", lw=0.8, ls=":", label=f"static top-{k_max}")
    ax.set_xlabel("position in the document (tokens)")
    ax.set_ylabel("blocks per token and group")
    ax.legend(fontsize=7, ncol=2)
    counts = sorted((int(k), v) for k, v in profile["hist"].items())
    ax_h.bar([k for k, _ in counts], [v for _, v in counts], color="tab:blue")
    ax_h.set_xlabel("blocks per token and group (all MSA layers)")
    ax_h.set_ylabel("(token, group) pairs")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
