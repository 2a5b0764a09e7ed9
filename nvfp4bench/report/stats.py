"""Statistics over folds and seeds: pure functions of plain lists of floats.

* Mean, sample sd (ddof 1) and the t-based 95 % CI  mean +- t_{0.975, n-1} sd / sqrt(n), cut at
  the metric's range when it crosses it (``summarize(..., bounds=)``).
* Paired comparison of a recipe x with its baseline y over the same (fold, seed) blocks,
  d_i = x_i - y_i:
  - % of baseline: r_i = 100 x_i / y_i per pair (pairs with y_i = 0 are left out), then mean and CI;
  - paired Cohen's d = mean(d) / sd(d);
  - Wilcoxon signed-rank test, two-sided, zero differences dropped (Wilcox), scipy's exact
    distribution for small samples. With 5 pairs the smallest possible p is 2 / 2^5 = 0.0625:
    five folds alone cannot reach p < 0.05; add seeds for more pairs.
  - Holm's step-down correction over the k recipes compared within one arch x scale:
    p_(i) sorted ascending, adjusted p_(i) = max_{j <= i} min(1, (k - j + 1) p_(j)).
* All recipe pairs, as the study's ``analyze_multi_seed.py`` tests them: for recipes r1, r2 over
  their common blocks, d_i = x_i(r1) - x_i(r2); the Wilcoxon signed-rank statistic (scipy's: the
  smaller of the positive and negative rank sums) and two-sided p (``wilcoxon_signed_rank``; p = 1
  when every difference is zero).
* Mean rank of each recipe: within each block the recipes are ranked 1 (best) to n, ties sharing
  their average rank (``scipy.stats.rankdata``); the mean and the sample sd (ddof 1) of a recipe's
  ranks over the blocks (``mean_ranks``), as the study prints them beside Kendall's W.
* Kendall's W, the agreement of the recipe ranking over m blocks (folds x seeds) of n recipes:
  ranks r_ij within each block (ties get mid-ranks), R_j = sum_i r_ij,
  S = sum_j (R_j - m (n + 1) / 2)^2,  W = 12 S / (m^2 (n^3 - n) - m sum_i T_i),
  T_i = sum over tie groups of block i of (t^3 - t). W = 1: every block ranks the recipes alike;
  W = 0: no agreement. The Friedman statistic (tie-corrected, as scipy computes it) is
  chi2 = m (n - 1) W.

Functions return None (JSON null) where a statistic does not exist (too few values, zero spread).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as sst

CONFIDENCE = 0.95


def _clean(values: Sequence[float | None]) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)


def summarize(values: Sequence[float | None], confidence: float = CONFIDENCE,
              bounds: tuple[float, float] = (-math.inf, math.inf)) -> dict:
    """n, mean, sd, ci_low, ci_high, ci_clipped, min, max of the finite values (None values left
    out).

    ``bounds``: the range of the metric (AUPRC [0, 1], HD95 [0, inf)). With few values the
    t-interval can cross it (two folds: t_{0.975,1} = 12.7); the mean lies in the range, so the
    interval is cut at the bound (its coverage can only grow) and ``ci_clipped`` says so.
    """
    x = _clean(values)
    n = int(x.size)
    out = {"n": n, "mean": None, "sd": None, "ci_low": None, "ci_high": None,
           "ci_clipped": False, "min": None, "max": None}
    if n == 0:
        return out
    out.update(mean=float(x.mean()), min=float(x.min()), max=float(x.max()))
    if n >= 2:
        sd = float(x.std(ddof=1))
        half = float(sst.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
        low, high = out["mean"] - half, out["mean"] + half
        lo, hi = bounds
        out.update(sd=sd, ci_low=max(low, lo), ci_high=min(high, hi),
                   ci_clipped=low < lo or high > hi)
    return out


def _pairs(x: Sequence[float | None], y: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    if len(x) != len(y):
        raise ValueError(f"paired samples need equal lengths, got {len(x)} and {len(y)}")
    keep = [(a, b) for a, b in zip(x, y) if a is not None and b is not None
            and math.isfinite(a) and math.isfinite(b)]
    arr = np.asarray(keep, dtype=np.float64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def percent_of_baseline(x: Sequence[float | None], baseline: Sequence[float | None],
                        confidence: float = CONFIDENCE) -> dict:
    """summarize() of 100 x_i / y_i over the pairs with y_i != 0."""
    a, b = _pairs(x, baseline)
    nonzero = b != 0
    return summarize((100.0 * a[nonzero] / b[nonzero]).tolist(), confidence)


def cohens_d_paired(x: Sequence[float | None], baseline: Sequence[float | None]) -> float | None:
    """mean(d) / sd(d) of d = x - baseline; None with < 2 pairs or sd(d) = 0."""
    a, b = _pairs(x, baseline)
    d = a - b
    if d.size < 2:
        return None
    sd = float(d.std(ddof=1))
    return None if sd == 0 else float(d.mean()) / sd


def wilcoxon_paired(x: Sequence[float | None], baseline: Sequence[float | None]) -> float | None:
    """Two-sided p of the Wilcoxon signed-rank test of x - baseline (zeros dropped).
    None without pairs; 1.0 when every difference is zero (no evidence of a difference)."""
    return wilcoxon_signed_rank(x, baseline)[1]


def wilcoxon_signed_rank(x: Sequence[float | None],
                         y: Sequence[float | None]) -> tuple[float | None, float | None]:
    """(statistic, two-sided p) of the Wilcoxon signed-rank test of x - y (zeros dropped);
    (None, None) without pairs; (None, 1.0) when every difference is zero."""
    a, b = _pairs(x, y)
    d = a - b
    if d.size == 0:
        return None, None
    if not np.any(d != 0):
        return None, 1.0
    res = sst.wilcoxon(d, zero_method="wilcox", alternative="two-sided")
    return float(res.statistic), float(res.pvalue)


def mean_ranks(table: Sequence[Sequence[float]], higher_is_better: bool = True
               ) -> tuple[list[float], list[float | None]]:
    """(mean rank, sd of the rank) of each column of a blocks x items table; rank 1 is the best
    item of a block (the highest value, or the lowest with ``higher_is_better=False``), ties get
    their average rank. The sd is None with fewer than 2 blocks."""
    x = np.asarray(table, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"mean_ranks needs a non-empty 2-D blocks x items table, got shape "
                         f"{x.shape}")
    ranks = np.apply_along_axis(sst.rankdata, 1, -x if higher_is_better else x)
    sds = ranks.std(axis=0, ddof=1) if x.shape[0] > 1 else [None] * x.shape[1]
    return ranks.mean(axis=0).tolist(), [None if s is None else float(s) for s in sds]


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-adjusted p-values in the input order; None entries stay None and do not count in k."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    order = sorted(idx, key=lambda i: pvalues[i])
    k = len(order)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (k - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def kendalls_w(table: Sequence[Sequence[float]]) -> float | None:
    """Kendall's W (tie-corrected) of a blocks x items table (m rows, n columns, no missing
    values). None when m < 2 or n < 2, or when every block ties every item."""
    x = np.asarray(table, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"kendalls_w needs a 2-D blocks x items table, got shape {x.shape}")
    m, n = x.shape
    if m < 2 or n < 2:
        return None
    if not np.isfinite(x).all():
        raise ValueError("kendalls_w needs a complete table (no None / NaN)")
    ranks = np.apply_along_axis(sst.rankdata, 1, x)
    r = ranks.sum(axis=0)
    s = float(((r - m * (n + 1) / 2.0) ** 2).sum())
    ties = 0.0
    for row in x:
        _, counts = np.unique(row, return_counts=True)
        ties += float((counts ** 3 - counts).sum())
    denominator = m ** 2 * (n ** 3 - n) - m * ties
    return None if denominator == 0 else 12.0 * s / denominator
