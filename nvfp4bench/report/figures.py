"""The report's figures (matplotlib): cross-validation bars, sensitivity grid, diagnostics.

``make_figures(view, comparison, baseline, metric, label, recipe, out_dir)`` writes, for one dataset of
``nvfp4bench.report`` under one split protocol (files ``<dataset>_*.png``, hold-out
``<dataset>_holdout_*.png``): the study's cross-validation bar chart (baseline vs ``recipe`` per
arch, one point per fold, hold-out: per seed), its sensitivity grid (arch rows x scale columns, each recipe as % of
baseline with its 95 % CI), and the diagnostics (attention collapse, gradient fidelity: every
numeric summary found under a cell's ``diagnostics``, grouped by ``DIAGNOSTIC_GROUPS``). Without
matplotlib it returns a note instead.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING

from nvfp4bench.atomic import write_atomic
from nvfp4bench.report import stats

if TYPE_CHECKING:  # the report's types; figures import nothing from it at run time
    from nvfp4bench.report.cells import CellResult, DatasetView

# Diagnostics figures: a numeric summary goes to the first group whose words its key contains.
DIAGNOSTIC_GROUPS = {"attention": ("collapse", "entropy", "attention", "attn", "distinct"),
                     "gradient": ("cosine", "grad", "sqnr", "relative_error")}
MAX_PANELS = 9


def _numeric_leaves(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_numeric_leaves(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
    return out


def diagnostic_summaries(cell: CellResult) -> dict[str, float]:
    """The numeric summaries of a cell's diagnostics: its ``summary`` block when there is one,
    else every numeric leaf."""
    d = cell.diagnostics
    return _numeric_leaves(d["summary"] if isinstance(d.get("summary"), dict) else d)


def _group_of(key: str) -> str | None:
    low = key.lower()
    return next((g for g, words in DIAGNOSTIC_GROUPS.items() if any(w in low for w in words)), None)


def percent_axis_limits(rows: list[dict], margin: float = 0.5,
                        min_span: float = 4.0) -> tuple[float, float]:
    """The y range of the sensitivity grid, from the point estimates (``pct_mean``) and 100, not
    from the intervals: a recipe with two seeds has an interval wider than every difference the
    grid exists to show. The span of the points (at least ``min_span`` percentage points) is
    widened by ``margin`` of itself on each side; intervals beyond are cut at the axes."""
    points = [r["pct_mean"] for r in rows if r["pct_mean"] is not None] + [100.0]
    low, high = min(points), max(points)
    span = max(high - low, min_span)
    centre = (low + high) / 2
    return centre - span * (0.5 + margin), centre + span * (0.5 + margin)


def make_figures(view: DatasetView, comparison, baseline, metric, label, recipe,
                 out_dir: Path) -> list[str]:
    """Write the figures; return the Markdown lines that reference them (or say why not)."""
    try:
        import matplotlib  # optional: the report is written without its figures otherwise
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # after use("Agg"): no display needed
    except ImportError:
        return ["Figures skipped: matplotlib is not installed (`pip install -r requirements.txt` "
                "installs it with nvfp4bench's other needs)."]
    notes = []
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", view.stem)  # <dataset>[_holdout]
    unit = view.protocol.unit
    part = f"{view.eval_set} partition"

    def save(fig, name, caption):
        path = out_dir / f"{stem}_{name}.png"
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120,
                                                   bbox_inches="tight"))
        plt.close(fig)
        notes.append(f"![{caption}]({path.name})")

    # 1. cross-validation bars: baseline vs one recipe per arch, a panel per scale
    if baseline in view.recipes and recipe in view.recipes and recipe != baseline:
        fig, axes = plt.subplots(1, len(view.scales), figsize=(4 * len(view.scales), 3.5),
                                 squeeze=False, layout="constrained")
        for ax, scale in zip(axes[0], view.scales):
            for j, (name, color) in enumerate(((baseline, "tab:gray"), (recipe, "tab:blue"))):
                for i, arch in enumerate(view.archs):
                    vals = list(view.values(arch, scale, name, metric).values())
                    x = i + (j - 0.5) * 0.38
                    if vals:
                        sd = stats.summarize(vals)["sd"]
                        ax.bar(x, sum(vals) / len(vals), 0.36, color=color, alpha=0.6,
                               yerr=sd, capsize=4, error_kw={"lw": 1},
                               label=name if i == 0 else None)
                        ax.plot([x] * len(vals), vals, "o", color="black", ms=3)
            ax.set_xticks(range(len(view.archs)), view.archs)
            ax.set_title(f"{scale} ({part})")
            ax.set_ylabel(label)
        axes[0][0].legend(fontsize=8)
        save(fig, "cv_bars", f"{label} ({part}): {baseline} vs {recipe}, mean ± SD, one point per "
                             f"{unit}")
    else:
        notes.append(f"Cross-validation bars skipped: need `{baseline}` and `{recipe}` cells "
                     "(choose another with --recipe).")

    # 2. sensitivity grid: % of baseline with 95 % CI, arch rows x scale columns
    rows = [r for r in comparison if r["metric"] == metric and r["pct_mean"] is not None]
    if rows:
        others = [r for r in view.recipes if r != baseline]
        fig, axes = plt.subplots(len(view.archs), len(view.scales), squeeze=False, sharey=True,
                                 figsize=(3.6 * len(view.scales), 3.2 * len(view.archs)),
                                 layout="constrained")
        by = {(r["arch"], r["scale"], r["recipe"]): r for r in rows}
        for (i, arch), (j, scale) in product(enumerate(view.archs), enumerate(view.scales)):
            ax = axes[i][j]
            ax.axhline(100, color="gray", lw=0.8)
            for k, name in enumerate(others):
                r = by.get((arch, scale, name))
                if r is None:
                    continue
                lo, hi = r["pct_ci_low"], r["pct_ci_high"]
                err = [[r["pct_mean"] - lo], [hi - r["pct_mean"]]] if lo is not None else None
                ax.errorbar(k, r["pct_mean"], yerr=err, fmt="o", capsize=3, color=f"C{k}")
            ax.set_xlim(-0.6, len(others) - 0.4)
            ax.set_xticks(range(len(others)), others, rotation=60, fontsize=7)
            ax.set_title(f"{arch} / {scale}", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"% of {baseline} {label}")
        low, high = percent_axis_limits(rows)
        axes[0][0].set_ylim(low, high)  # shared by every panel
        cut = any(r["pct_ci_low"] is not None and (r["pct_ci_low"] < low or r["pct_ci_high"] > high)
                  for r in rows)
        note = "; intervals cut at the axes" if cut else ""
        fig.suptitle(f"{label} as % of {baseline} ({part}){note}", fontsize=10)
        save(fig, "sensitivity", f"{label} as % of {baseline}, 95 % CI ({part}){note}")
    else:
        notes.append("Sensitivity grid skipped: no paired comparison with the baseline.")

    # 3. diagnostics: every numeric summary, grouped (attention collapse, gradient fidelity)
    per_key: dict[str, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in view.cells:
        if c.complete:
            for key, v in diagnostic_summaries(c).items():
                per_key[key][(c.arch, c.scale, c.recipe)].append(v)
    if not per_key:
        notes.append("Diagnostics figures skipped: no cell has numeric diagnostics.")
    for group in (*DIAGNOSTIC_GROUPS, None):
        keys = sorted(k for k in per_key if _group_of(k) == group)
        if not keys:
            continue
        shown = keys[:MAX_PANELS]
        cols = min(3, len(shown))
        nrows = math.ceil(len(shown) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False,
                                 layout="constrained")
        series = list(product(view.archs, view.scales))
        for ax, key in zip(axes.flat, shown):
            for s_i, (arch, scale) in enumerate(series):
                offset = 0.3 * (s_i - (len(series) - 1) / 2) / max(1, len(series) - 1)
                xs, ys = [], []
                for k, name in enumerate(view.recipes):
                    vals = per_key[key].get((arch, scale, name))
                    if vals:
                        xs.append(k + offset)
                        ys.append(sum(vals) / len(vals))
                if xs:
                    ax.plot(xs, ys, "o", ms=4, label=f"{arch}/{scale}")
            ax.set_xlim(-0.5, len(view.recipes) - 0.5)
            ax.set_xticks(range(len(view.recipes)), view.recipes, rotation=60, fontsize=7)
            ax.set_title(key, fontsize=9)
        for ax in list(axes.flat)[len(shown):]:
            ax.axis("off")
        axes[0][0].legend(fontsize=6)
        name = group or "other"
        save(fig, f"diagnostics_{name}", f"diagnostics ({name}): mean over {unit}s")
        if len(keys) > len(shown):
            notes.append(f"({name} diagnostics: {len(keys) - len(shown)} more keys in cells.csv "
                         "are not plotted.)")
    return notes
