"""The statistics of a study: per-arm summaries over seeds and paired differences to a baseline arm
with a Student-t 95% interval. Plain Python (scipy only for the t quantile).

Pairing is by seed: seed s of an arm is compared with seed s of the baseline, which trained on the
same data order from the same initialisation seed, so seed-to-seed noise that both share cancels.
With n pairs the interval is mean(d) +- t(0.975, n-1) * sd(d) / sqrt(n); with one pair it is
undefined (no estimate of the noise) and reported as such, never invented.

    pytest -q tests/pipeline/test_study_stats.py
"""
from __future__ import annotations

import math
import statistics


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with df degrees of freedom."""
    if df < 1:
        raise ValueError(f"t_quantile: df must be >= 1, got {df}")
    from scipy.stats import t  # installed with mlflow

    return float(t.ppf(p, df))


def summarize(values: list[float]) -> dict:
    """{"mean", "std", "n"} over the finite values; std is the sample std (None for n < 2)."""
    xs = [float(v) for v in values if _finite(v)]
    n = len(xs)
    return {"mean": statistics.fmean(xs) if n else None, "std": statistics.stdev(xs) if n >= 2 else None, "n": n}


def paired_difference(arm: dict[int, float], baseline: dict[int, float]) -> dict:
    """arm - baseline over the seeds both have (finite values): diff_mean, the 95% t-interval, n."""
    seeds = sorted(s for s in arm if s in baseline and _finite(arm[s]) and _finite(baseline[s]))
    d = [arm[s] - baseline[s] for s in seeds]
    n = len(d)
    out = {"diff_mean": statistics.fmean(d) if n else None, "ci95": None, "n": n, "seeds": seeds,
           "diff_std": statistics.stdev(d) if n >= 2 else None}
    if n >= 2:
        half = t_quantile(0.975, n - 1) * out["diff_std"] / math.sqrt(n)
        out["ci95"] = [out["diff_mean"] - half, out["diff_mean"] + half]
    else:
        out["note"] = ("no paired seeds" if n == 0 else
                       "one paired seed: the 95% interval is undefined (no estimate of the seed noise)")
    return out


def verdict(diff: dict, lower_is_better: bool) -> str:
    """'better' | 'worse' | 'within noise' | 'undefined' for the arm against its baseline."""
    if diff["ci95"] is None:
        return "undefined"
    lo, hi = diff["ci95"]
    if lo <= 0 <= hi:
        return "within noise"
    above = lo > 0
    return "worse" if above == lower_is_better else "better"
