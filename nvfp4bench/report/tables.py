"""The report's tables: summary statistics, each recipe against the baseline, ranking stability.

Per dataset view (one dataset, one split protocol: nvfp4bench.report.cells; every row names
both): ``summary_rows`` (mean, sd, 95 % CI, n of each metric
per arch x scale x recipe, the CI cut at the metric's range: ``metric_bounds``),
``comparison_rows`` (each recipe vs the baseline, paired per (fold, seed): % of baseline with its
CI, mean difference, paired Cohen's d, Wilcoxon signed-rank p, Holm over the recipes of one
arch x scale x metric), ``format_rows`` (each recipe in another block format against the same
recipe in nvfp4, the same statistics), ``pairwise_rows`` (every recipe pair as the study's
``analyze_multi_seed.py`` tests it: Wilcoxon signed-rank statistic, raw and Holm-adjusted p, flags
at 0.05 and 0.01; pairs with fewer than 3 common blocks skipped and listed), ``ranking_rows``
(Kendall's W of the recipe ranking over complete blocks), ``mean_rank_rows`` (each recipe's mean
rank +- sd over those blocks), and ``consistency_problems`` (options or data fingerprints that differ between cells that the
tables compare). The statistics themselves are nvfp4bench.report.stats.
"""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from itertools import combinations, product

from nvfp4bench.cell import split_variant
from nvfp4bench.config import DEFAULT_FORMAT, NON_RESULT_FIELDS
from nvfp4bench.quant.recipes import RECIPES
from nvfp4bench.report import stats
from nvfp4bench.report.cells import DatasetView

TABLE_METRICS = ("auprc", "recall", "dice", "hd95_mean")
# The range of each metric: a confidence interval is cut at it (stats.summarize). Unlisted
# metrics (counts, HD95 variants) are >= 0.
UNIT_METRICS = ("auprc", "recall", "precision", "f2", "iou", "dice", "patient_dice_mean",
                "lesion_recall")


# Metrics where lower is better: their best recipe ranks 1 (mean ranks).
LOWER_IS_BETTER = frozenset({"hd95_mean", "ece", "n_false_positive_components"})
MIN_PAIR_BLOCKS = 3  # the study skips a recipe pair with fewer common blocks (seeds)
HOLM_SCOPES = ("arch_scale", "global")  # Holm over one arch x scale's pairs, or every pair
SIGNIFICANCE_LEVELS = (0.05, 0.01)


def metric_bounds(metric: str) -> tuple[float, float]:
    return (0.0, 1.0) if metric in UNIT_METRICS else (0.0, math.inf)


# Options that may differ between the cells of one arch x scale without making them incomparable:
# the cell's identity, where and how it ran, and the precision each baseline recipe resolves to.
# what names a cell (the format is part of its variant, <recipe>@<format>)
IDENTITY_OPTIONS = frozenset({"arch", "scale", "recipe", "format", "fold", "seed", "split"})
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


def nvfp4_recipes(recipes) -> list[str]:
    """The recipes in the default format (not the variants ``<recipe>@<format>``): the family of
    the study's recipe comparisons, pair tests and rankings."""
    return [r for r in recipes if split_variant(r)[1] == DEFAULT_FORMAT]


def summary_rows(view: DatasetView, metrics=TABLE_METRICS) -> list[dict]:
    """Every arch x scale x recipe x metric; a recipe in another format only where it has a
    complete cell (format cells are usually run for a few arches)."""
    rows = []
    for arch, scale, recipe in product(view.archs, view.scales, view.recipes):
        n_cells = len(view.complete(arch, scale, recipe))
        if not n_cells and split_variant(recipe)[1] != DEFAULT_FORMAT:
            continue
        for metric in metrics:
            s = stats.summarize(list(view.values(arch, scale, recipe, metric).values()),
                                bounds=metric_bounds(metric))
            rows.append({"dataset": view.name, "split": view.split, "eval_set": view.eval_set,
                         "arch": arch, "scale": scale, "recipe": recipe, "metric": metric,
                         "n_cells": n_cells, **s})
    return rows


def comparison_rows(view: DatasetView, baseline: str, metrics=TABLE_METRICS) -> list[dict]:
    """Each recipe vs the baseline, paired per (fold, seed) block (hold-out: per seed); Holm over
    the recipes of one arch x scale x metric in one format: the recipes in nvfp4 are the study's
    family, and the recipes of each other format form their own, so running more formats never
    changes the study's adjusted p-values."""
    rows = []
    if baseline not in view.recipes:
        return rows
    for arch, scale, metric in product(view.archs, view.scales, metrics):
        base = view.values(arch, scale, baseline, metric)
        group = []
        for recipe in view.recipes:
            if recipe == baseline:
                continue
            group.append({"dataset": view.name, "split": view.split,
                          "eval_set": view.eval_set, "arch": arch,
                          "scale": scale, "recipe": recipe, "baseline": baseline,
                          "metric": metric,
                          **paired_stats(view.values(arch, scale, recipe, metric), base)})
        families: dict[str, list[dict]] = defaultdict(list)
        for row in group:
            families[split_variant(row["recipe"])[1]].append(row)
        for family in families.values():
            for row, adjusted in zip(family, stats.holm([r["wilcoxon_p"] for r in family])):
                row["holm_p"] = adjusted
        # recipes never run at this arch x scale (all cells missing or failed) get no row
        rows.extend(r for r in group if view.complete(arch, scale, r["recipe"]))
    return rows


def paired_stats(mine: dict, reference: dict) -> dict:
    """``mine`` against ``reference`` (block -> value) over their common blocks: pairs, mean
    difference, % of the reference with its CI, paired Cohen's d, Wilcoxon p."""
    blocks = sorted(set(reference) & set(mine))
    x, y = [mine[b] for b in blocks], [reference[b] for b in blocks]
    pct = stats.percent_of_baseline(x, y)
    return {"n_pairs": len(blocks),
            "mean_diff": stats.summarize([a - b for a, b in zip(x, y)])["mean"],
            "pct_mean": pct["mean"], "pct_ci_low": pct["ci_low"], "pct_ci_high": pct["ci_high"],
            "pct_values": [100 * a / b for a, b in zip(x, y) if b != 0],
            "cohens_d": stats.cohens_d_paired(x, y), "wilcoxon_p": stats.wilcoxon_paired(x, y)}


def format_rows(view: DatasetView, metrics=TABLE_METRICS) -> list[dict]:
    """Each recipe in another block format (the variant ``<recipe>@<format>``) against the same
    recipe in nvfp4, paired per (fold, seed) block; Holm over the variants of one arch x scale x
    metric. Empty when the view has no other format."""
    variants = [v for v in view.recipes
                if split_variant(v)[1] != DEFAULT_FORMAT and split_variant(v)[0] in view.recipes]
    rows = []
    for arch, scale, metric in product(view.archs, view.scales, metrics):
        group = []
        for variant in variants:
            recipe, fmt = split_variant(variant)
            group.append({"dataset": view.name, "split": view.split, "eval_set": view.eval_set,
                          "arch": arch, "scale": scale, "recipe": recipe, "format": fmt,
                          "reference": DEFAULT_FORMAT, "variant": variant, "metric": metric,
                          **paired_stats(view.values(arch, scale, variant, metric),
                                         view.values(arch, scale, recipe, metric))})
        for row, adjusted in zip(group, stats.holm([r["wilcoxon_p"] for r in group])):
            row["holm_p"] = adjusted
        rows.extend(r for r in group if view.complete(arch, scale, r["variant"]))
    return rows


def _complete_table(view: DatasetView, arch: str, scale: str, metric: str):
    """(recipes, blocks, blocks x recipes table) over the blocks where every recipe (in nvfp4)
    of the arch x scale has a value (a complete-block design)."""
    per_recipe = {r: view.values(arch, scale, r, metric) for r in nvfp4_recipes(view.recipes)}
    recipes = [r for r in per_recipe if per_recipe[r]]
    blocks = [b for b in view.blocks if all(b in per_recipe[r] for r in recipes)]
    return recipes, blocks, [[per_recipe[r][b] for r in recipes] for b in blocks]


def ranking_rows(view: DatasetView, metrics=TABLE_METRICS) -> list[dict]:
    """Kendall's W of the recipe ranking over the (fold, seed) blocks where every recipe of
    the arch x scale has a value (a complete-block design)."""
    rows = []
    for arch, scale, metric in product(view.archs, view.scales, metrics):
        recipes, blocks, table = _complete_table(view, arch, scale, metric)
        w = stats.kendalls_w(table) if blocks and len(recipes) >= 2 else None
        rows.append({"dataset": view.name, "split": view.split, "eval_set": view.eval_set,
                     "arch": arch, "scale": scale, "metric": metric, "kendalls_w": w,
                     "m_blocks": len(blocks), "n_recipes": len(recipes)})
    return rows


def mean_rank_rows(view: DatasetView, metrics=TABLE_METRICS) -> list[dict]:
    """Each recipe's mean rank +- sd (1 = best) over the complete blocks of ``ranking_rows``."""
    rows = []
    for arch, scale, metric in product(view.archs, view.scales, metrics):
        recipes, blocks, table = _complete_table(view, arch, scale, metric)
        if not blocks or len(recipes) < 2:
            continue
        means, sds = stats.mean_ranks(table, higher_is_better=metric not in LOWER_IS_BETTER)
        rows += [{"dataset": view.name, "split": view.split, "eval_set": view.eval_set,
                  "arch": arch, "scale": scale, "metric": metric, "recipe": r, "mean_rank": m,
                  "rank_sd": s, "m_blocks": len(blocks)} for r, m, s in zip(recipes, means, sds)]
    return rows


def study_order(recipes) -> list[str]:
    """Recipes (variants ``<recipe>@<format>`` too) by the study's recipe id (0 = baseline
    first), each recipe's nvfp4 cells before its other formats; recipes without an id last."""
    def key(variant):
        recipe, fmt = split_variant(variant)
        study_id = RECIPES[recipe].study_id
        return (study_id is None, study_id or 0, recipe, fmt != DEFAULT_FORMAT, fmt)
    return sorted(recipes, key=key)


def pairwise_rows(view: DatasetView, metrics=TABLE_METRICS,
                  holm_scope: str = "arch_scale") -> tuple[list[dict], list[dict]]:
    """(tested pairs, skipped pairs) of every pair of recipes in nvfp4, per arch x scale x
    metric (a recipe in another format is compared with nvfp4 in ``format_rows``).

    r1 is the recipe with the lower study id, so ``mean_diff`` and ``cohens_d`` are r1 - r2
    (against the baseline, recipe 0: baseline - recipe), as the study reports them. A pair is
    tested over its common blocks when it has at least ``MIN_PAIR_BLOCKS``, else skipped. Holm
    adjusts the p-values of the tested pairs of one arch x scale x metric (``holm_scope``
    "arch_scale", the study's ``analyze_multi_seed.py``) or of every arch x scale at once
    ("global", its ``main.py``).
    """
    if holm_scope not in HOLM_SCOPES:
        raise ValueError(f"holm_scope must be one of {', '.join(HOLM_SCOPES)}, got "
                         f"{holm_scope!r}")
    tested, skipped = [], []
    for arch, scale, metric in product(view.archs, view.scales, metrics):
        recipes = [r for r in study_order(nvfp4_recipes(view.recipes))
                   if view.values(arch, scale, r, metric)]
        for r1, r2 in combinations(recipes, 2):
            v1, v2 = view.values(arch, scale, r1, metric), view.values(arch, scale, r2, metric)
            blocks = sorted(set(v1) & set(v2))
            row = {"dataset": view.name, "split": view.split, "eval_set": view.eval_set,
                   "arch": arch, "scale": scale, "metric": metric, "recipe_1": r1,
                   "recipe_2": r2, "n_blocks": len(blocks)}
            if len(blocks) < MIN_PAIR_BLOCKS:
                skipped.append(row)
                continue
            x, y = [v1[b] for b in blocks], [v2[b] for b in blocks]
            statistic, p = stats.wilcoxon_signed_rank(x, y)
            tested.append({**row, "mean_1": sum(x) / len(x), "mean_2": sum(y) / len(y),
                           "mean_diff": sum(a - b for a, b in zip(x, y)) / len(x),
                           "cohens_d": stats.cohens_d_paired(x, y), "statistic": statistic,
                           "p": p})
    scope = ("metric",) if holm_scope == "global" else ("arch", "scale", "metric")
    families: dict[tuple, list[dict]] = defaultdict(list)
    for row in tested:
        families[tuple(row[k] for k in scope)].append(row)
    for family in families.values():
        for row, adjusted in zip(family, stats.holm([r["p"] for r in family])):
            row["holm_p"] = adjusted
            for level in SIGNIFICANCE_LEVELS:
                row[f"p_below_{level}"] = row["p"] is not None and row["p"] < level
                row[f"holm_below_{level}"] = adjusted is not None and adjusted < level
    return tested, skipped


def _timing_value(timing: dict, key: str) -> float | None:
    v = timing.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def cost_rows(view: DatasetView, baseline: str) -> list[dict]:
    """What each arch x scale x recipe cost to train, from its complete cells' ``timing``:
    the mean and total training seconds (over resumes), the mean epochs run, the median over
    cells of each cell's median step, and that step as a multiple of the baseline's median step
    of the same arch x scale (None without a baseline cell). Wall-clock figures: they depend on
    the machine and on what else it ran."""
    rows = []
    for arch, scale in product(view.archs, view.scales):
        group = []
        for recipe in view.recipes:
            cells = list(view.complete(arch, scale, recipe).values())
            if not cells:
                continue
            seconds = [v for c in cells if (v := _timing_value(c.timing, "train_seconds"))
                       is not None]
            steps = [v for c in cells if (v := _timing_value(c.timing, "median_step_ms"))
                     is not None]
            epochs = [c.epochs_run for c in cells if c.epochs_run is not None]
            group.append({"dataset": view.name, "split": view.split, "eval_set": view.eval_set,
                          "arch": arch, "scale": scale, "recipe": recipe,
                          "n_cells": len(cells),
                          "train_s_mean": sum(seconds) / len(seconds) if seconds else None,
                          "train_s_total": sum(seconds) if seconds else None,
                          "epochs_mean": sum(epochs) / len(epochs) if epochs else None,
                          "step_ms_median": statistics.median(steps) if steps else None})
        base = next((r["step_ms_median"] for r in group if r["recipe"] == baseline), None)
        for row in group:
            step = row["step_ms_median"]
            row["step_x_baseline"] = step / base if step is not None and base else None
        rows += group
    return rows


def hd95_unit(view: DatasetView) -> str:
    units = {c.metrics.get("hd95_unit") for c in view.cells if c.complete}
    units.discard(None)
    return units.pop() if len(units) == 1 else ("mixed units" if units else "unit not recorded")

