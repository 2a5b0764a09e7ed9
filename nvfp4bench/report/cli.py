"""``python -m nvfp4bench.report RESULTS_DIR``: the command line over ``build.build_report``."""
from __future__ import annotations

import argparse
import sys

from nvfp4bench.report.build import DEFAULT_FIGURE_RECIPE, ReportError, build_report
from nvfp4bench.report.cells import EVAL_SETS
from nvfp4bench.report.tables import HOLM_SCOPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nvfp4bench.report",
                                description="Aggregate cell results into tables, statistics "
                                            "and figures.")
    p.add_argument("results_dir", help="the --out directory of the runs (e.g. results/)")
    p.add_argument("--out", default=None, help="where to write (default RESULTS_DIR/report)")
    p.add_argument("--baseline", default="baseline", help="recipe the others are compared with")
    p.add_argument("--metric", default="auprc", help="metric of the comparison, ranking, "
                                                     "all-pairs tests and figures (default auprc)")
    p.add_argument("--eval-set", choices=EVAL_SETS, default="test",
                   help="the partition of every table and figure: test (default: the held-out "
                        "patients) or val (the best checkpoint's validation metrics, which the "
                        "study's own statistics aggregate)")
    p.add_argument("--holm", choices=HOLM_SCOPES, default="arch_scale",
                   help="the all-pairs Holm family: the pairs of one arch x scale (default, the "
                        "study's analyze_multi_seed.py) or every pair at once (its main.py)")
    p.add_argument("--recipe", default=None, help="recipe of the cross-validation bar chart "
                                                  f"(default {DEFAULT_FIGURE_RECIPE})")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = build_report(args.results_dir, args.out, baseline=args.baseline,
                              metric=args.metric, recipe=args.recipe, figures=not args.no_figures,
                              eval_set=args.eval_set, holm_scope=args.holm)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cells = result["cells"]
    n_complete = sum(c.complete for c in cells)
    n_missing = sum(len(v.missing) for v in result["views"])
    print(f"{len(cells)} cells ({n_complete} complete, {len(cells) - n_complete} not complete, "
          f"{n_missing} missing) -> {result['out'] / 'report.md'}")
    if args.baseline not in {c.recipe for c in cells}:
        print(f"note: no `{args.baseline}` cell yet, so the report compares no recipe with the "
              f"baseline (it says which comparisons are missing)")
    return 0

