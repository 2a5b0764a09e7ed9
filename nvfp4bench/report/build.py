"""``python -m nvfp4bench.report RESULTS_DIR``: aggregate cell results into tables and figures.

Reads every ``OUT/<dataset>/<arch>/<scale>/<recipe>/fold<k>_seed<s>.json`` (k-fold split) and
``.../holdout_seed<s>.json`` (hold-out split) under RESULTS_DIR and writes, per dataset and split
protocol (each its own section, never pooled), to ``--out`` (default ``RESULTS_DIR/report``):

* ``report.md``: mean, sd, 95 % CI, min, max and n of the metrics of one partition
  (``--eval-set``: test, the default, or val, the study's) per arch x scale x recipe; each recipe
  against the baseline (``--baseline``, default baseline) on ``--metric`` (default auprc), paired
  per (fold, seed) (hold-out: per seed): % of baseline with its CI, mean difference, paired
  Cohen's d, Wilcoxon signed-rank p and its Holm correction over the recipes of one arch x scale;
  every recipe pair as the study tests it (``tables.pairwise_rows``; Holm per arch x scale or
  ``--holm global``); Kendall's W of the recipe ranking over folds (seeds) with each recipe's mean
  rank +- sd; the cost of training each arch x scale x recipe (``tables.cost_rows``: seconds,
  epochs, median step and its multiple of the baseline's); the missing cells (expected from the
  grid of the archs, scales, recipes, folds and seeds present) and the failed ones. Synthetic
  data is said at the top; every table and figure names its partition.
* ``summary.csv``, ``comparison.csv`` (every table metric), ``pairwise.csv``, ``ranking.csv``,
  ``mean_ranks.csv``, ``cost.csv``, ``cells.csv``; every row names its ``dataset``, ``split`` and
  ``eval_set``.
* Figures when matplotlib is installed (else a note): nvfp4bench.report.figures.

The statistics are nvfp4bench.report.stats; the cells are read by nvfp4bench.report.cells, the tables
computed by nvfp4bench.report.tables; this module renders and writes them.
"""
from __future__ import annotations

import csv
import io
from itertools import product
from pathlib import Path

from nvfp4bench.atomic import write_text_atomic
from nvfp4bench.config import SPLITS
from nvfp4bench.quant.recipes import RECIPES
from nvfp4bench.report.cells import (PROTOCOLS, DatasetView, dataset_views, load_cells,
                                     metric_value, ordered)
from nvfp4bench.report.figures import diagnostic_summaries, make_figures
from nvfp4bench.report.tables import (MIN_PAIR_BLOCKS, TABLE_METRICS, comparison_rows,
                                      consistency_problems, cost_rows, format_rows, hd95_unit,
                                      mean_rank_rows, nvfp4_recipes, pairwise_rows, ranking_rows,
                                      summary_rows)

METRIC_LABELS = {"auprc": "AUPRC", "recall": "recall", "precision": "precision", "f2": "F2",
                 "iou": "IoU", "dice": "Dice (soft, per image)", "hd95_mean": "HD95",
                 "patient_dice_mean": "Dice (patient)", "lesion_recall": "lesion recall"}
DEFAULT_FIGURE_RECIPE = "2d_rht_sr"   # TE's default recipe
EVAL_SET_NOTES = {
    "test": "the held-out test patients, at the best validation checkpoint; `--eval-set val` "
            "gives the study's own statistics",
    "val": "the validation patients that chose the best checkpoint, as the study's statistics "
           "use them; `--eval-set test` gives the held-out patients",
}


class ReportError(Exception):
    """Bad input: the CLI prints it and exits 2."""


# ----------------------------------------------------------------------------------------------
# formatting


def _f(v, digits=4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"
    return str(v)


def _digits(metric: str) -> int:
    return 2 if metric.startswith("hd95") else 4


def _p(v) -> str:
    return "n/a" if v is None else (f"{v:.3g}" if v >= 1e-3 else f"{v:.1e}")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _summary_cell(s: dict, metric: str) -> str:
    d = _digits(metric)
    if s["mean"] is None:
        return "n/a"
    if s["sd"] is None:  # one value: no spread to show
        return _f(s["mean"], d)
    text = f"{_f(s['mean'], d)} ± {_f(s['sd'], d)}"
    if s["ci_low"] is not None:
        text += f" [{_f(s['ci_low'], d)}, {_f(s['ci_high'], d)}]" + ("*" if s["ci_clipped"] else "")
        text += f" ({_f(s['min'], d)}–{_f(s['max'], d)})"
    return text


def render_cost(view: DatasetView, baseline: str, cost) -> list[str]:
    """The cost section: training time, epochs and step per arch x scale x recipe."""
    out = ["\n### Cost of training (complete cells)\n"]
    if not cost:
        return out + ["No complete cell."]
    out.append(_md_table(
        ["arch", "scale", "recipe", "n", "train s (mean)", "train h (total)", "epochs (mean)",
         "median step ms", f"x `{baseline}` step"],
        [[r["arch"], r["scale"], r["recipe"], str(r["n_cells"]), _f(r["train_s_mean"], 0),
          _f(None if r["train_s_total"] is None else r["train_s_total"] / 3600, 2),
          _f(r["epochs_mean"], 1), _f(r["step_ms_median"], 0), _f(r["step_x_baseline"], 2)]
         for r in cost]))
    totals: dict[tuple[str, str], list] = {}
    for r in cost:
        entry = totals.setdefault((r["arch"], r["scale"]), [0.0, 0])
        entry[0] += r["train_s_total"] or 0.0
        entry[1] += r["n_cells"]
    out.append("\nTraining time in all: " + "; ".join(
        f"{a} / {s} {_f(h / 3600, 2)} h ({n} cells)" for (a, s), (h, n) in totals.items())
        + f"; together {_f(sum(h for h, _ in totals.values()) / 3600, 2)} h "
          f"({sum(n for _, n in totals.values())} cells).")
    out.append("\nFrom each result's `timing`: training seconds summed over resumed runs, "
               "evaluation excluded; the median step is the median over cells of each cell's "
               "median training step. Wall-clock time on whatever machine ran the cells, and "
               "under whatever else it ran: compare recipes of one arch x scale, run side by "
               "side, rather than absolute times.")
    return out


def render_dataset(view: DatasetView, baseline: str, metric: str, summary, comparison,
                   ranking, mean_ranks, pairs, skipped, holm_scope: str, cost=(),
                   formats=()) -> str:
    unit = hd95_unit(view)
    proto = view.protocol
    part = f"{view.eval_set} partition"
    out = [f"## Dataset `{view.name}`: {proto.title}" + (" (synthetic)" if view.synthetic else "")]
    if view.synthetic:
        out.append(f"\n**Synthetic data**: `{view.name}` is simulated tumours on a brain template; "
                   "these numbers test the pipeline and say nothing about real patients.")
    n_complete = sum(c.complete for c in view.cells)
    expected = len(view.cells) + len(view.missing)
    full = len(view.archs) * len(view.scales) * len(view.recipes) * len(view.blocks)
    shape = (f"archs x scales x recipes x {proto.blocks} = {len(view.archs)} x "
             f"{len(view.scales)} x {len(view.recipes)} x {len(view.blocks)}" if expected == full
             else f"each arch x scale: the recipes run there x the {proto.blocks} it has cells "
                  f"of; run matrices of different shapes share this folder")
    out.append(f"\nCells: {len(view.cells)} found, {n_complete} complete, "
               f"{len(view.cells) - n_complete} not complete, {len(view.missing)} missing of the "
               f"{expected} expected ({shape}).")

    conflicts = consistency_problems(view)
    if conflicts:
        out.append("\n**Warning: cells that should not be compared** (their options differ):\n"
                   + "\n".join(f"- {p}" for p in conflicts))
    out.append(f"\n### Metrics of the {part}: mean ± sd [95 % CI] (min–max) over {proto.over}\n")
    by = {(r["arch"], r["scale"], r["recipe"], r["metric"]): r for r in summary}
    labels = [METRIC_LABELS.get(m, m) + (f" ({unit})" if m.startswith("hd95") else "")
              for m in TABLE_METRICS]
    rows = []
    for arch, scale, recipe in product(view.archs, view.scales, view.recipes):
        if (arch, scale, recipe, TABLE_METRICS[0]) not in by:
            continue  # a recipe in another format that this arch x scale never ran
        cols = [by[(arch, scale, recipe, m)] for m in TABLE_METRICS]
        n_cells = cols[0]["n_cells"]
        n_text = str(n_cells)
        if any(c["n"] != n_cells for c in cols):   # some metric is null in some cells
            n_text += " (values: " + "/".join(str(c["n"]) for c in cols) + ")"
        rows.append([arch, scale, recipe, n_text] +
                    [_summary_cell(c, m) for c, m in zip(cols, TABLE_METRICS)])
    out.append(_md_table(["arch", "scale", "recipe", "n"] + labels, rows))
    out.append("\nDice (soft, per image) is the study's: an empty prediction scores 1 on an "
               "empty (tumour-free) slice, so a model that predicts no tumour at all still scores "
               "the share of tumour-free slices (see \"Collapsed cells\").")
    if any(r.get("ci_clipped") for r in summary):
        out.append(f"\n\\* the t-interval crossed the metric's range (few {proto.unit}s: with 2 "
                   f"values t = 12.7) and is cut at its bound; read it as \"too few "
                   f"{proto.unit}s to say\".")

    label = METRIC_LABELS.get(metric, metric)
    out.append(f"\n### {label} ({part}): each recipe against `{baseline}`, paired per "
               f"{proto.block}\n")
    mine = [r for r in comparison if r["metric"] == metric]
    if baseline not in view.recipes:
        out.append(f"Missing: no `{baseline}` cell in this dataset, so no comparison "
                   f"(recipes present: {', '.join(f'`{r}`' for r in view.recipes)}).")
    elif not mine:
        out.append("No recipe besides the baseline.")
    else:
        out.append(_md_table(
            ["arch", "scale", "recipe", "pairs", "% of baseline [95 % CI]", "mean diff",
             "Cohen's d", "Wilcoxon p", "Holm p"],
            [[r["arch"], r["scale"], r["recipe"], str(r["n_pairs"]),
              (f"{_f(r['pct_mean'], 2)} [{_f(r['pct_ci_low'], 2)}, {_f(r['pct_ci_high'], 2)}]"
               if r["pct_ci_low"] is not None else _f(r["pct_mean"], 2)),
              _f(r["mean_diff"], _digits(metric)), _f(r["cohens_d"], 3), _p(r["wilcoxon_p"]),
              _p(r["holm_p"])] for r in mine]))
        out.append("\n% of baseline: mean over pairs of 100 x recipe / baseline; Cohen's d = "
                   "mean(diff) / sd(diff), diff = recipe - baseline; Wilcoxon signed-rank, "
                   "two-sided, Holm-corrected over the recipes of one arch x scale"
                   + (" in one format (the recipes in nvfp4 are the study's family; those "
                      "in each other format, `<recipe>@<format>`, their own)"
                      if any("@" in r["recipe"] for r in mine) else "")
                   + f". With n pairs the smallest possible Wilcoxon p is 2 / 2^n (0.0625 for 5 "
                     f"{proto.unit}s).")

    out += _render_formats(view, metric, label, formats)
    out += _render_pairs(view, metric, label, pairs, skipped, holm_scope)

    out.append(f"\n### Stability of the recipe ranking over {proto.unit}s (Kendall's W, {label}, "
               f"{part})\n")
    rk = [r for r in ranking if r["metric"] == metric]
    ranks = {(r["arch"], r["scale"], r["recipe"]): r for r in mean_ranks if r["metric"] == metric}
    ranked = nvfp4_recipes(view.recipes)
    out.append(_md_table(
        ["arch", "scale", "W", "blocks", *ranked],
        [[r["arch"], r["scale"], _f(r["kendalls_w"], 3), str(r["m_blocks"])]
         + [_rank_text(ranks.get((r["arch"], r["scale"], name))) for name in ranked]
         for r in rk]))
    out.append(f"\nW = 1: every {proto.unit} ranks the recipes alike; 0: no agreement. Only "
               f"{proto.blocks} where every recipe has a value count. Beside W, each recipe's "
               f"mean rank ± sd over those {proto.blocks} (1 = the best {label}; ties share "
               f"their average rank)."
               + (" The recipes in nvfp4 only: the format section compares the other formats."
                  if len(ranked) < len(view.recipes) else ""))

    out += render_cost(view, baseline, cost)

    out.append("\n### Collapsed cells (judged on validation)\n")
    groups = collapsed_groups(view)
    if groups:
        out.append(_md_table(["arch", "scale", "recipe", "collapsed", "of complete", "which"],
                             [[a, s, r, str(len(c)), str(n), ", ".join(c)]
                              for (a, s, r), (c, n) in groups.items()]))
        out.append("\nA collapsed cell's best checkpoint, on the validation set, predicts no "
                   "tumour pixel and ranks pixels no better than a constant output (AUPRC at "
                   "most 1.1x the prevalence, or one constant probability). It is "
                   "counted in the tables above, as the study would; a recipe that collapses is "
                   "a finding.")
    else:
        out.append("None: no complete cell collapsed.")
    out.append("\n### Missing cells\n")
    if view.missing:
        out.append("\n".join(f"- {a} / {s} / {r} / {view.block_label(f, sd)}"
                             for _, a, s, r, f, sd in view.missing))
    else:
        out.append(f"None: the grid of the archs, scales, recipes, {proto.over} present is full.")
    out.append("\n### Failed or unfinished cells\n")
    bad = [c for c in view.cells if not c.complete]
    if bad:
        out.append("\n".join(
            f"- {c.arch} / {c.scale} / {c.recipe} / {view.block_label(c.fold, c.seed)}: "
            f"**{c.status}**"
            + (f": {str(c.error).strip().splitlines()[0][:200]}" if c.error else "") for c in bad))
    else:
        out.append("None.")
    return "\n".join(out)


def collapsed_groups(view: DatasetView) -> dict[tuple, tuple[list[str], int]]:
    """(arch, scale, recipe) -> (the blocks of its collapsed cells, its complete cells), for the
    groups with at least one collapsed cell."""
    groups = {}
    for arch, scale, recipe in product(view.archs, view.scales, view.recipes):
        complete = view.complete(arch, scale, recipe)
        which = [view.block_label(*b) for b, c in complete.items() if c.collapsed]
        if which:
            groups[(arch, scale, recipe)] = (which, len(complete))
    return groups


def _rank_text(row: dict | None) -> str:
    if row is None:
        return "-"
    sd = "" if row["rank_sd"] is None else f" ± {row['rank_sd']:.1f}"
    return f"{row['mean_rank']:.1f}{sd}"


def _flags(row: dict, prefix: str) -> str:
    return "**" if row[f"{prefix}_below_0.01"] else "*" if row[f"{prefix}_below_0.05"] else ""


def _render_formats(view: DatasetView, metric: str, label: str, formats) -> list[str]:
    """The format comparison of one metric; nothing when the view holds one format only."""
    mine = [r for r in formats if r["metric"] == metric]
    if not mine:
        return []
    proto = view.protocol
    return [f"\n### {label} ({view.eval_set} partition): each block format against nvfp4 under "
            f"the same recipe, paired per {proto.block}\n",
            _md_table(["arch", "scale", "recipe", "format", "pairs", "% of nvfp4 [95 % CI]",
                       "mean diff", "Cohen's d", "Wilcoxon p", "Holm p"],
                      [[r["arch"], r["scale"], r["recipe"], r["format"], str(r["n_pairs"]),
                        (f"{_f(r['pct_mean'], 2)} [{_f(r['pct_ci_low'], 2)}, "
                         f"{_f(r['pct_ci_high'], 2)}]" if r["pct_ci_low"] is not None
                         else _f(r["pct_mean"], 2)),
                        _f(r["mean_diff"], _digits(metric)), _f(r["cohens_d"], 3),
                        _p(r["wilcoxon_p"]), _p(r["holm_p"])] for r in mine]),
            "\n% of nvfp4: mean over pairs of 100 x (recipe in the format) / (recipe in nvfp4); "
            "diff = format - nvfp4; Wilcoxon signed-rank, two-sided, Holm-corrected over the "
            "format variants of one arch x scale. A baseline quantizes nothing and has no "
            "format."]


def _render_pairs(view: DatasetView, metric: str, label: str, pairs, skipped,
                  holm_scope: str) -> list[str]:
    """The all-pairs section of one metric: tested pairs, then the skipped ones."""
    proto = view.protocol
    out = [f"\n### {label} ({view.eval_set} partition): every recipe pair, Wilcoxon signed-rank, "
           f"paired per {proto.block}\n"]
    mine = [r for r in pairs if r["metric"] == metric]
    if mine:
        d = _digits(metric)
        out.append(_md_table(
            ["arch", "scale", "r1", "r2", proto.blocks, "mean r1", "mean r2", "mean diff r1 - r2",
             "Cohen's d", "W statistic", "p", "Holm p"],
            [[r["arch"], r["scale"], r["recipe_1"], r["recipe_2"], str(r["n_blocks"]),
              _f(r["mean_1"], d), _f(r["mean_2"], d), _f(r["mean_diff"], d),
              _f(r["cohens_d"], 3), _f(r["statistic"], 1), _p(r["p"]) + _flags(r, "p"),
              _p(r["holm_p"]) + _flags(r, "holm")] for r in mine]))
        family = ("all pairs of every arch x scale" if holm_scope == "global"
                  else "the pairs of one arch x scale")
        variants = len(nvfp4_recipes(view.recipes)) < len(view.recipes)
        out.append(("\nThe recipes in nvfp4; a recipe in another format is compared with nvfp4 "
                    "in the format section.\n\n" if variants else "\n")
                   + f"r1 is the recipe with the lower study id, so every difference is r1 - r2 "
                   f"(against the baseline, recipe 0: baseline - recipe); Cohen's d = "
                   f"mean(diff) / sd(diff). Two-sided Wilcoxon signed-rank test over the common "
                   f"{proto.blocks}, zero differences dropped, p = 1 when every difference is "
                   f"zero; Holm over {family}. * p < 0.05, ** p < 0.01. With n {proto.blocks} the "
                   f"smallest possible p is 2 / 2^n.")
    else:
        out.append(f"No pair has {MIN_PAIR_BLOCKS} or more common {proto.blocks}.")
    skip = [r for r in skipped if r["metric"] == metric]
    if skip:
        out.append(f"\nSkipped, fewer than {MIN_PAIR_BLOCKS} common {proto.blocks}: "
                   + "; ".join(_skipped_text(view, metric, group)
                               for group in _by_arch_scale(skip)) + ".")
    return out


def _by_arch_scale(rows: list[dict]) -> list[list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["scale"]), []).append(r)
    return list(groups.values())


def _skipped_text(view: DatasetView, metric: str, group: list[dict]) -> str:
    """The skipped pairs of one arch x scale: each pair with its count of common blocks, or,
    when every pair of its recipes is skipped with one count (e.g. a single seed), one line."""
    arch, scale = group[0]["arch"], group[0]["scale"]
    present = [r for r in nvfp4_recipes(view.recipes) if view.values(arch, scale, r, metric)]
    counts = sorted({r["n_blocks"] for r in group})
    if len(group) == len(present) * (len(present) - 1) // 2:
        common = (f"{counts[0]} common each" if len(counts) == 1
                  else f"{counts[0]}-{counts[-1]} common")
        return f"{arch} / {scale}: all {len(group)} pairs of its {len(present)} recipes ({common})"
    return "; ".join(f"{arch} / {scale} {r['recipe_1']} vs {r['recipe_2']} ({r['n_blocks']})"
                     for r in group)


# ----------------------------------------------------------------------------------------------
# writing


def _csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()


def build_report(results_dir, out_dir=None, *, baseline: str = "baseline", metric: str = "auprc",
                 recipe: str | None = None, figures: bool = True, eval_set: str = "test",
                 holm_scope: str = "arch_scale") -> dict:
    """Read the cells, write report.md and the CSVs (and figures); return what was computed.

    ``eval_set``: the partition of every metric (``cells.EVAL_SETS``); ``holm_scope``: the family
    of the all-pairs Holm correction (``tables.HOLM_SCOPES``)."""
    root = Path(results_dir)
    if not root.is_dir():
        raise ReportError(f"results directory {root} does not exist")
    cells, problems = load_cells(root, eval_set)
    if not cells and problems:
        raise ReportError(f"no well-formed cell result under {root}: {len(problems)} file(s) "
                          f"left out, the first {problems[0]}")
    if not cells:
        raise ReportError("no cell results (<dataset>/<arch>/<scale>/<recipe>/"
                          f"fold<k>_seed<s>.json or holdout_seed<s>.json) under {root}")
    all_recipes = {c.recipe for c in cells}
    if baseline not in RECIPES:
        raise ReportError(f"--baseline {baseline!r} is not a recipe; choose from "
                          f"{', '.join(RECIPES)}")
    numeric = {k for c in cells if c.complete for k in c.metrics
               if metric_value(c, k) is not None}
    if numeric and metric not in numeric:
        raise ReportError(f"--metric {metric!r} is in no complete cell's {eval_set} block; "
                          f"available: "
                          f"{', '.join(sorted(numeric)) or 'none'}")
    out = Path(out_dir) if out_dir is not None else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    metrics = tuple(dict.fromkeys((*TABLE_METRICS, metric)))

    views = dataset_views(cells, eval_set)
    summary, comparison, ranking, ranks, pairs, skipped, costs, sections = ([], [], [], [], [],
                                                                            [], [], [])
    format_comparison = []
    for view in views:
        s = summary_rows(view, metrics)
        cmp = comparison_rows(view, baseline, metrics)
        rk = ranking_rows(view, metrics)
        mr = mean_rank_rows(view, metrics)
        tested, untested = pairwise_rows(view, metrics, holm_scope)
        cost = cost_rows(view, baseline)
        fmt = format_rows(view, metrics)
        format_comparison += fmt
        summary += s
        comparison += cmp
        ranking += rk
        ranks += mr
        pairs += tested
        skipped += untested
        costs += cost
        text = render_dataset(view, baseline, metric, s, cmp, rk, mr, tested, untested,
                              holm_scope, cost, fmt)
        if figures:
            chosen = recipe or (DEFAULT_FIGURE_RECIPE if DEFAULT_FIGURE_RECIPE in view.recipes
                                else next((r for r in view.recipes if r != baseline), baseline))
            text += "\n\n### Figures\n\n" + "\n\n".join(
                make_figures(view, cmp, baseline, metric, METRIC_LABELS.get(metric, metric),
                             chosen, out))
        sections.append(text)

    synthetic = list(dict.fromkeys(v.name for v in views if v.synthetic))  # once per dataset
    head = ["# nvfp4bench report"]
    if synthetic:
        head.append(f"\n> **These results come from a synthetic dataset** "
                    f"({', '.join(f'`{n}`' for n in synthetic)}), not from patients.")
    head.append(f"\nSource: `{root}`; {len(cells)} cell files; baseline `{baseline}`; "
                f"primary metric {METRIC_LABELS.get(metric, metric)}; every metric from the "
                f"**{eval_set} partition** ({EVAL_SET_NOTES[eval_set]}).")
    head.append("\nSplit protocols: " + ", ".join(
        f"{PROTOCOLS[s].title} ({sum(c.split == s for c in cells)} cells)"
        for s in SPLITS if any(c.split == s for c in cells))
        + "; each has its own sections: cells of different protocols are never pooled or paired.")
    if baseline not in all_recipes:
        head.append(f"\n**Missing comparisons**: no cell of the baseline `{baseline}`, so no "
                    f"recipe is compared with it (recipes present: "
                    f"{', '.join(f'`{r}`' for r in ordered(all_recipes, tuple(RECIPES)))}). "
                    f"Run the `{baseline}` cells of the same arch, scale, fold and seed (e.g. "
                    f"`python -m nvfp4bench --arch A --scale S --recipe {baseline} --fold K`), or "
                    f"pass `--baseline` one of the recipes present.")
    if problems:
        head.append("\n**Problems**:\n" + "\n".join(f"- {p}" for p in problems))
    write_text_atomic(out / "report.md", "\n".join(head) + "\n\n" + "\n\n".join(sections) + "\n")

    view_cols = ["dataset", "split", "eval_set", "arch", "scale"]
    stat_cols = ["n", "mean", "sd", "ci_low", "ci_high", "ci_clipped", "min", "max"]
    write_text_atomic(out / "summary.csv", _csv(
        summary, [*view_cols, "recipe", "metric", "n_cells", *stat_cols]))
    write_text_atomic(out / "comparison.csv", _csv(
        comparison, [*view_cols, "recipe", "baseline", "metric", "n_pairs", "mean_diff",
                     "pct_mean", "pct_ci_low", "pct_ci_high", "cohens_d", "wilcoxon_p",
                     "holm_p"]))
    write_text_atomic(out / "formats.csv", _csv(
        format_comparison, [*view_cols, "recipe", "format", "reference", "metric", "n_pairs",
                            "mean_diff", "pct_mean", "pct_ci_low", "pct_ci_high", "cohens_d",
                            "wilcoxon_p", "holm_p"]))
    write_text_atomic(out / "pairwise.csv", _csv(
        pairs + [{**r, "skipped": True} for r in skipped],
        [*view_cols, "metric", "recipe_1", "recipe_2", "n_blocks", "skipped", "mean_1",
         "mean_2", "mean_diff", "cohens_d", "statistic", "p", "holm_p", "p_below_0.05",
         "p_below_0.01", "holm_below_0.05", "holm_below_0.01"]))
    write_text_atomic(out / "ranking.csv", _csv(
        ranking, [*view_cols, "metric", "kendalls_w", "m_blocks", "n_recipes"]))
    write_text_atomic(out / "mean_ranks.csv", _csv(
        ranks, [*view_cols, "metric", "recipe", "mean_rank", "rank_sd", "m_blocks"]))
    write_text_atomic(out / "cost.csv", _csv(
        costs, [*view_cols, "recipe", "n_cells", "train_s_mean", "train_s_total", "epochs_mean",
                "step_ms_median", "step_x_baseline"]))
    cell_rows, test_keys, diag_keys = [], set(), set()
    for c in cells:
        tests = {k: c.metrics[k] for k in c.metrics
                 if metric_value(c, k) is not None}  # ints stay ints
        diags = {f"diag.{k}": v for k, v in diagnostic_summaries(c).items()}
        test_keys |= set(tests)
        diag_keys |= set(diags)
        cell_rows.append({"dataset": c.dataset, "split": c.split, "eval_set": eval_set,
                          "arch": c.arch, "scale": c.scale,
                          "recipe": c.recipe, "fold": c.fold, "seed": c.seed, "status": c.status,
                          "collapsed": c.collapsed,
                          "synthetic": c.synthetic, "path": str(c.path.relative_to(root)),
                          **tests, **diags})
    write_text_atomic(out / "cells.csv", _csv(
        cell_rows, ["dataset", "split", "eval_set", "arch", "scale", "recipe", "fold", "seed",
                    "status", "collapsed",
                    "synthetic", "path", *sorted(test_keys), *sorted(diag_keys)]))
    return {"out": out, "cells": cells, "problems": problems, "summary": summary,
            "comparison": comparison, "ranking": ranking, "mean_ranks": ranks, "pairs": pairs,
            "skipped_pairs": skipped, "cost": costs, "formats": format_comparison,
            "views": views}
