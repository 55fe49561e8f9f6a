"""Plots logged to the MLflow run as artifacts: training curves and a block-selection map.

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

CURVES = ("train/lm_loss", "train/kl_index_loss", "train/sparsity", "train/score_recall", "eval/lm_loss",
          "eval/retrieval_acc")


def _history(client, run_id: str, key: str) -> tuple[list[int], list[float]]:
    pts = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.step for m in pts], [m.value for m in pts]


def training_curves(client, run_id: str, out_path: Path) -> Path | None:
    """One panel per curve that has data; per-layer sparsity and KL as one line per layer."""
    keys = set(client.get_run(run_id).data.metrics)
    panels = [k for k in CURVES if k in keys]
    layer_keys = sorted((k for k in keys if re.fullmatch(r"layer/\d+/(sparsity|kl_index_loss)", k)),
                        key=lambda k: (k.split("/")[2], int(k.split("/")[1])))
    per_layer = sorted({k.split("/")[2] for k in layer_keys})
    n = len(panels) + len(per_layer)
    if n == 0:
        return None
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    ax_iter = iter(axes.flat)
    for key in panels:
        ax = next(ax_iter)
        ax.plot(*_history(client, run_id, key), marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
    for stat in per_layer:
        ax = next(ax_iter)
        for k in (k for k in layer_keys if k.endswith("/" + stat)):
            ax.plot(*_history(client, run_id, k), label=f"layer {k.split('/')[1]}")
        ax.set_title(f"per layer: {stat}")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in ax_iter:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def selection_map(block_idx_TK: np.ndarray, block_size: int, out_path: Path, title: str) -> Path:
    """Which key blocks each query token of one sequence attends to (one group of one layer).

    block_idx_TK: int [T, topk] block numbers (-1 = unused slot). The picture is [T, n_blocks]: a
    coloured cell where token t selected block b; the diagonal band is the local block.
    """
    T = block_idx_TK.shape[0]
    n_blocks = (T + block_size - 1) // block_size
    img = np.zeros((T, n_blocks), np.float32)
    t_idx, k_idx = np.nonzero(block_idx_TK >= 0)
    img[t_idx, block_idx_TK[t_idx, k_idx]] = 1.0
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(img, aspect="auto", interpolation="nearest", cmap="Greys")
    ax.set_xlabel("key block")
    ax.set_ylabel("query token")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
