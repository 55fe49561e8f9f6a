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
from dataclasses import dataclass

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


@dataclass
class BudgetMatch:
    """Equal compute with static top-k for an adaptive selection budget (model.msa.budget_match_topk).

    After each logged window the loop passes the window's mean blocks per (token, group) and what
    static top-k would have selected on the same tokens (reduced over every rank, so every rank takes
    the same step); the budget's free parameter moves toward the value that makes them equal:

        ratio:  u = log(budget_ratio); the count grows about in proportion to the ratio (less where
                k_min or k_max bind), so u += log(target / measured) lands on the target or short of it
        top_p:  u = logit(budget_p); the count's response to p depends on the trained index branch, so
                the slope d log(count) / du is estimated from the last two windows (secant, within
                [0.1, 4]; 1 before there are two), and u += log(target / measured) / slope

    Each step is at most 1 in u, so one noisy window cannot throw the parameter far. The parameter
    is used from the next step on: a window's count never depends on its own measurement.
    """

    kind: str  # "ratio" | "top_p"
    param: float  # the budget_ratio or budget_p in use
    prev: tuple[float, float] | None = None  # (u, log measured) of the previous update

    MAX_STEP = 1.0
    SLOPE_RANGE = (0.1, 4.0)

    def _to_u(self, param: float) -> float:
        param = min(1 - 1e-4, max(1e-4, param)) if self.kind == "top_p" else max(1e-4, param)
        return math.log(param) if self.kind == "ratio" else math.log(param / (1 - param))

    def _from_u(self, u: float) -> float:
        if self.kind == "ratio":
            return min(1.0, max(1e-4, math.exp(u)))
        return min(1 - 1e-4, max(1e-4, 1 / (1 + math.exp(-u))))

    def update(self, measured: float, target: float) -> float:
        """The parameter for the next window, given this window's mean count and its static target."""
        if not (measured > 0 and target > 0 and math.isfinite(measured) and math.isfinite(target)):
            return self.param
        u, err = self._to_u(self.param), math.log(target / measured)
        slope = 1.0
        if self.kind == "top_p" and self.prev is not None and abs(u - self.prev[0]) > 1e-6:
            lo, hi = self.SLOPE_RANGE
            slope = min(hi, max(lo, (math.log(measured) - self.prev[1]) / (u - self.prev[0])))
        self.prev = (u, math.log(measured))
        du = max(-self.MAX_STEP, min(self.MAX_STEP, err / slope))
        self.param = self._from_u(u + du)
        return self.param

    def to_json(self) -> dict:
        return {"kind": self.kind, "param": self.param, "prev": list(self.prev) if self.prev else None}

    @classmethod
    def from_json(cls, d: dict) -> "BudgetMatch":
        return cls(d["kind"], float(d["param"]), tuple(d["prev"]) if d.get("prev") else None)
