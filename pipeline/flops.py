"""Model FLOPs of a training step, for `train/mfu`: what the model needs, not what a kernel spent.

    6 * (active non-embedding params + the LM head) per token        (forward 2x, backward 4x)
  + 3 * attention forward FLOPs of the step's documents, per layer    (backward ~2x the forward)
      dense layer or step: 4*Hq*dh per visible (query, key) pair
      MSA layer, sparse:   4*Hq*dh per attended pair (at most k*B keys per query)
                           + 2*HI*dI per visible pair (the index scores)
                           under an adaptive budget (model.msa.budget) the attended pairs depend on
                           the selection: the model counts them (ModelOutput.attended_pairs, summed
                           over (token, group), so 4*dh*G each) and `attended_flops` adds them
      MSA layer, warmup:   dense main branch + the index scores
Attention is counted per document (packed documents do not attend to each other), so short
documents are not credited with a full row's quadratic cost.
"""
from __future__ import annotations

import torch

from model.config import ModelConfig
from model.flops import count_parameters

# dense bf16 tensor-core peaks (no sparsity), per device, from the vendors' datasheets
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def device_peak_tflops(configured: float) -> float | None:
    if configured:
        return configured
    if not torch.cuda.is_available():
        return None  # no meaningful peak for a CPU: MFU is not reported
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def _pairs(lengths: torch.Tensor, window: int | None = None) -> float:
    """Sum over documents of sum_{t=1..L} min(t, window): (query, key) pairs attended causally."""
    L = lengths.double()
    if window is None:
        return float((L * (L + 1) / 2).sum())
    w = torch.clamp(L, max=window)
    return float((w * (w + 1) / 2 + (L - w) * window).sum())


class StepFlops:
    def __init__(self, cfg: ModelConfig):
        counts = count_parameters(cfg)
        lm_head = cfg.vocab_size * cfg.d_model
        self.per_token = 6.0 * (counts["params_active"] + lm_head)
        self.cfg = cfg

    def __call__(self, segment_ids_BT: torch.Tensor, mode: str) -> float:
        """Training FLOPs of one step on this batch (segment 0 is padding and costs nothing here)."""
        cfg = self.cfg
        seg = segment_ids_BT.long()
        lengths = torch.cat([torch.bincount(row[row > 0])[1:] for row in seg]) if seg.numel() else seg
        lengths = lengths[lengths > 0]
        tokens = float(lengths.sum())
        dense_pairs = _pairs(lengths)
        main = 4.0 * cfg.n_heads * cfg.head_dim
        index = 2.0 * cfg.n_kv_heads * cfg.msa.index_dim
        attn = 0.0
        for layer in range(cfg.n_layers):
            if not cfg.msa.enabled or not cfg.is_msa_layer(layer) or mode == "dense":
                attn += main * dense_pairs
            elif mode == "warmup":
                attn += main * dense_pairs + index * dense_pairs
            elif cfg.msa.budget == "static":
                attn += main * _pairs(lengths, cfg.msa.topk * cfg.msa.block_size) + index * dense_pairs
            else:  # the main branch is counted from the selection: attended_flops
                attn += index * dense_pairs
        return self.per_token * tokens + 3.0 * attn

    def attended_flops(self, attended_pairs: torch.Tensor) -> torch.Tensor:
        """Training FLOPs of the sparse main branches from the (token, group, key) triples they
        attended (a 0-dim device tensor; it stays there until the window is reduced)."""
        cfg = self.cfg
        return 3.0 * 4.0 * cfg.head_dim * (cfg.n_heads // cfg.n_kv_heads) * attended_pairs.double()
