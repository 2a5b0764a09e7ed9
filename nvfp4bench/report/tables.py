"""The report's tables: summary statistics, each recipe against the baseline, ranking stability.

Per dataset view (one dataset, one split protocol: nvfp4bench.report.cells; every row names
both): ``summary_rows`` (mean, sd, 95 % CI, n of each metric
per arch x scale x recipe, the CI cut at the metric's range: ``metric_bounds``),
``comparison_rows`` (each recipe vs the baseline, paired per (fold, seed): % of baseline with its
CI, mean difference, paired Cohen's d, Wilcoxon signed-rank p, Holm over the recipes of one
arch x scale x metric), ``ranking_rows`` (Kendall's W of the recipe ranking over complete blocks),
and ``consistency_problems`` (options or data fingerprints that differ between cells that the
tables compare). The statistics themselves are nvfp4bench.report.stats.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from itertools import product

from nvfp4bench.config import NON_RESULT_FIELDS
from nvfp4bench.report import stats
from nvfp4bench.report.cells import DatasetView

TABLE_METRICS = ("auprc", "recall", "dice", "hd95_mean")
# The range of each metric: a confidence interval is cut at it (stats.summarize). Unlisted
# metrics (counts, HD95 variants) are >= 0.
UNIT_METRICS = ("auprc", "recall", "precision", "f2", "iou", "dice", "patient_dice_mean",
                "lesion_recall")


def metric_bounds(metric: str) -> tuple[float, float]:
    return (0.0, 1.0) if metric in UNIT_METRICS else (0.0, math.inf)


# Options that may differ between the cells of one arch x scale without making them incomparable:
# the cell's identity, where and how it ran, and the precision each baseline recipe resolves to.
IDENTITY_OPTIONS = frozenset({"arch", "scale", "recipe", "fold", "seed", "split"})
FREE_OPTIONS = NON_RESULT_FIELDS | {"device", "data", "precision", "diagnostics"}


def _count_values(values: list) -> str:
    counts: dict[str, int] = defaultdict(int)
    for v in values:
        counts[json.dumps(v, sort_keys=True)] += 1
    return ", ".join(f"{v} ({n} cell{'s' if n > 1 else ''})" for v, n in sorted(counts.items()))


def consistency_problems(view: DatasetView) -> list[str]:
    """Options that differ between the cells of one arch x scale (e.g. --epochs), and data
    fingerprints that differ within one dataset name: numbers that should not be compared."""
    problems = []
    prints = [c.fingerprint for c in view.cells if c.fingerprint is not None]
    if len(set(prints)) > 1:
        problems.append(f"dataset `{view.name}`: cells come from different stores (data "
                        f"fingerprints {_count_values(prints)})")
    for arch, scale in product(view.archs, view.scales):
        group = [c for c in view.cells if (c.arch, c.scale) == (arch, scale) and c.config]
        keys = sorted({k for c in group for k in c.config} - IDENTITY_OPTIONS - FREE_OPTIONS)
        for key in keys:
            values = [c.config.get(key) for c in group]
            if len({json.dumps(v, sort_keys=True) for v in values}) > 1:
                problems.append(f"{arch} / {scale}: cells differ in `{key}`: "
                                f"{_count_values(values)}")
    return problems


def summary_rows(view: DatasetView, metrics=TABLE_METRICS) -> list[dict]:
    rows = []
    for arch, scale, recipe in product(view.archs, view.scales, view.recipes):
        n_cells = len(view.complete(arch, scale, recipe))
        for metric in metrics:
            s = stats.summarize(list(view.values(arch, scale, recipe, metric).values()),
                                bounds=metric_bounds(metric))
            rows.append({"dataset": view.name, "split": view.split, "arch": arch,
                         "scale": scale, "recipe": recipe, "metric": metric, "n_cells": n_cells,
                         **s})
    return rows


def comparison_rows(view: DatasetView, baseline: str, metrics=TABLE_METRICS) -> list[dict]:
    """Each recipe vs the baseline, paired per (fold, seed) block (hold-out: per seed); Holm over
    the recipes of one arch x scale x metric."""
    rows = []
    if baseline not in view.recipes:
        return rows
    for arch, scale, metric in product(view.archs, view.scales, metrics):
        base = view.values(arch, scale, baseline, metric)
        group = []
        for recipe in view.recipes:
            if recipe == baseline:
                continue
            mine = view.values(arch, scale, recipe, metric)
            blocks = sorted(set(base) & set(mine))
            x, y = [mine[b] for b in blocks], [base[b] for b in blocks]
            pct = stats.percent_of_baseline(x, y)
            group.append({"dataset": view.name, "split": view.split, "arch": arch,
                          "scale": scale, "recipe": recipe, "baseline": baseline,
                          "metric": metric, "n_pairs": len(blocks),
                          "mean_diff": stats.summarize([a - b for a, b in zip(x, y)])["mean"],
                          "pct_mean": pct["mean"], "pct_ci_low": pct["ci_low"],
                          "pct_ci_high": pct["ci_high"], "pct_values": [100 * a / b for a, b in
                                                                        zip(x, y) if b != 0],
                          "cohens_d": stats.cohens_d_paired(x, y),
                          "wilcoxon_p": stats.wilcoxon_paired(x, y)})
        for row, adjusted in zip(group, stats.holm([r["wilcoxon_p"] for r in group])):
            row["holm_p"] = adjusted
        # recipes never run at this arch x scale (all cells missing or failed) get no row
        rows.extend(r for r in group if view.complete(arch, scale, r["recipe"]))
    return rows


def ranking_rows(view: DatasetView, metrics=TABLE_METRICS) -> list[dict]:
    """Kendall's W of the recipe ranking over the (fold, seed) blocks where every recipe of
    the arch x scale has a value (a complete-block design)."""
    rows = []
    for arch, scale, metric in product(view.archs, view.scales, metrics):
        per_recipe = {r: view.values(arch, scale, r, metric) for r in view.recipes}
        recipes = [r for r in view.recipes if per_recipe[r]]
        blocks = [b for b in view.blocks if all(b in per_recipe[r] for r in recipes)]
        table = [[per_recipe[r][b] for r in recipes] for b in blocks]
        w = stats.kendalls_w(table) if blocks and len(recipes) >= 2 else None
        rows.append({"dataset": view.name, "split": view.split, "arch": arch, "scale": scale,
                     "metric": metric, "kendalls_w": w, "m_blocks": len(blocks),
                     "n_recipes": len(recipes)})
    return rows


def hd95_unit(view: DatasetView) -> str:
    units = {c.test.get("hd95_unit") for c in view.cells if c.complete}
    units.discard(None)
    return units.pop() if len(units) == 1 else ("mixed units" if units else "unit not recorded")

