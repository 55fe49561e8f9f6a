"""The MSA training schedule: which attention mode each step runs, and what it trains.

    native msa:  warmup (dense attention + dense-support KL) for schedule.warmup_tokens, then sparse
    retrofit:    the dense checkpoint's weights + fresh index projections; warmup (backbone frozen by
                 default: only the index branch learns) for schedule.retrofit_warmup_tokens, then sparse
    dense:       dense throughout (no index branch)
The mode depends on the step alone (counted from the run's start: a continued retrofit,
schedule.retrofit_continue, counts its warm-up from the dense checkpoint's step), so every rank (and a
resumed run) takes the same decision.
"""
from __future__ import annotations

import math

from pipeline.config import RunConfig


def warmup_steps(cfg: RunConfig) -> int:
    s = cfg.schedule
    tokens = {"dense": 0, "msa": s.warmup_tokens, "retrofit": s.retrofit_warmup_tokens}[s.mode]
    return math.ceil(tokens / cfg.tokens_per_step)


def attention_mode(cfg: RunConfig, step: int) -> str:
    """The model mode for optimizer step `step` (0-based)."""
    if cfg.schedule.mode == "dense":
        return "dense"
    return "warmup" if step < warmup_steps(cfg) else "sparse"


def frozen_groups(cfg: RunConfig, mode: str) -> frozenset[str]:
    """Parameter groups whose learning rate is 0 in this mode."""
    if cfg.schedule.mode == "retrofit" and mode == "warmup" and cfg.schedule.freeze_backbone_in_warmup:
        return frozenset({"backbone", "experts"})
    return frozenset()
