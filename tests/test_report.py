"""Report: hand-made cell JSONs (with a missing and a failed cell) against scipy and numpy."""
import csv
import json
import sys
import zlib

import numpy as np
import pytest
from scipy import stats as sst

from nvfp4bench import report as R

RECIPES = ("baseline", "nvfp4_full", "2d_rht_sr")
ARCHS = ("cnn", "vit")
FOLDS = range(5)
SEED = 2026
MISSING = ("vit", "tiny", "2d_rht_sr", 3)
FAILED = ("cnn", "tiny", "nvfp4_full", 2)


def _value(arch, recipe, fold, metric):
    """Deterministic, distinct values per cell."""
    rng = np.random.default_rng(zlib.crc32(f"{arch}|{recipe}|{fold}|{metric}".encode()))
    base = {"auprc": 0.7, "recall": 0.8, "dice": 0.6, "hd95_mean": 12.0}[metric]
    shift = {"baseline": 0.0, "nvfp4_full": -0.05, "2d_rht_sr": -0.01}[recipe]
    return float(base + shift * (1 if metric != "hd95_mean" else -40) + rng.normal(0, 0.02))


def _write(root, arch, scale, recipe, fold, seed, obj):
    path = root / "synthetic" / arch / scale / recipe / f"fold{fold}_seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _cell(arch, recipe, fold, status="complete"):
    obj = {"schema_version": 1, "status": status, "error": None,
           "config": {"arch": arch, "scale": "tiny", "recipe": recipe, "fold": fold, "seed": SEED,
                      "epochs": 100, "out": f"/somewhere/{fold}"},
           "data": {"name": "synthetic", "synthetic": True, "fingerprint": "abc"},
           "test": {m: _value(arch, recipe, fold, m)
                    for m in ("auprc", "recall", "dice", "hd95_mean")} | {"hd95_unit": "voxel"},
           "diagnostics": {"summary": {"attention_collapsed_share": 0.1 * fold,
                                       "gradient_cosine": 0.9 - 0.01 * fold, "flag": True}}}
    if status == "failed":
        obj.update(test=None, error="NonFiniteError: epoch 3: validation loss is nan\ntrace")
    return obj


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    for arch in ARCHS:
        for recipe in RECIPES:
            for fold in FOLDS:
                if (arch, "tiny", recipe, fold) == MISSING:
                    continue
                status = "failed" if (arch, "tiny", recipe, fold) == FAILED else "complete"
                _write(root, arch, "tiny", recipe, fold, SEED, _cell(arch, recipe, fold, status))
    return root


def _vals(arch, recipe, metric, folds=FOLDS):
    return [_value(arch, recipe, f, metric) for f in folds
            if (arch, "tiny", recipe, f) not in (MISSING, FAILED)]


def test_summary_matches_numpy_and_scipy(results, tmp_path):
    out = R.build_report(results, tmp_path / "rep", figures=False)
    row = next(r for r in out["summary"] if (r["arch"], r["recipe"], r["metric"])
               == ("cnn", "nvfp4_full", "dice"))
    x = _vals("cnn", "nvfp4_full", "dice")
    assert row["n"] == 4 and row["n_cells"] == 4
    assert row["mean"] == pytest.approx(np.mean(x))
    assert row["sd"] == pytest.approx(np.std(x, ddof=1))
    lo, hi = sst.t.interval(0.95, 3, loc=np.mean(x), scale=sst.sem(x))
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))


def test_paired_comparison_against_scipy_with_holm(results, tmp_path):
    out = R.build_report(results, tmp_path / "rep", figures=False)
    rows = {r["recipe"]: r for r in out["comparison"]
            if (r["arch"], r["metric"]) == ("cnn", "auprc")}
    assert set(rows) == {"nvfp4_full", "2d_rht_sr"}
    folds = [f for f in FOLDS if f != 2]                     # fold 2 failed for nvfp4_full
    x = np.array([_value("cnn", "nvfp4_full", f, "auprc") for f in folds])
    y = np.array([_value("cnn", "baseline", f, "auprc") for f in folds])
    r = rows["nvfp4_full"]
    assert r["n_pairs"] == 4
    assert r["wilcoxon_p"] == pytest.approx(sst.wilcoxon(x - y).pvalue)
    assert r["cohens_d"] == pytest.approx((x - y).mean() / (x - y).std(ddof=1))
    assert r["pct_mean"] == pytest.approx(np.mean(100 * x / y))
    assert r["mean_diff"] == pytest.approx((x - y).mean())
    p = sorted([rows["nvfp4_full"]["wilcoxon_p"], rows["2d_rht_sr"]["wilcoxon_p"]])
    adjusted = sorted([rows["nvfp4_full"]["holm_p"], rows["2d_rht_sr"]["holm_p"]])
    assert adjusted[0] == pytest.approx(min(1, 2 * p[0]))
    assert adjusted[1] == pytest.approx(max(min(1, 2 * p[0]), p[1]))
    vit = {r["recipe"]: r for r in out["comparison"]
           if (r["arch"], r["metric"]) == ("vit", "auprc")}
    assert vit["2d_rht_sr"]["n_pairs"] == 4 and vit["nvfp4_full"]["n_pairs"] == 5


def test_kendalls_w_uses_complete_blocks_and_matches_friedman(results, tmp_path):
    out = R.build_report(results, tmp_path / "rep", figures=False)
    row = next(r for r in out["ranking"] if (r["arch"], r["metric"]) == ("cnn", "auprc"))
    folds = [f for f in FOLDS if f != 2]
    table = np.array([[_value("cnn", rc, f, "auprc") for rc in RECIPES] for f in folds])
    chi2 = sst.friedmanchisquare(*table.T).statistic
    assert (row["m_blocks"], row["n_recipes"]) == (4, 3)
    assert row["kendalls_w"] == pytest.approx(chi2 / (4 * (3 - 1)))


def test_report_names_missing_failed_and_synthetic(results, tmp_path):
    out = R.build_report(results, tmp_path / "rep", figures=False)
    assert [m[1:] for m in out["views"][0].missing] == [("vit", "tiny", "2d_rht_sr", 3, SEED)]
    text = (tmp_path / "rep" / "report.md").read_text()
    head = text.split("\n## ")[0]
    assert "synthetic dataset" in head
    assert "- vit / tiny / 2d_rht_sr / fold 3 seed 2026" in text
    assert "cnn / tiny / nvfp4_full / fold 2 seed 2026: **failed**: NonFiniteError" in text
    assert "HD95 (voxel)" in text
    with open(tmp_path / "rep" / "cells.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 * 5 - 1
    assert {r["status"] for r in rows} == {"complete", "failed"}
    assert "diag.gradient_cosine" in rows[0] and "diag.flag" not in rows[0]
    with open(tmp_path / "rep" / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 2 * 3 * 4


def test_mismatched_content_and_unreadable_files_are_reported(results, tmp_path):
    wrong = _cell("cnn", "baseline", 0)
    wrong["config"]["recipe"] = "fwd_only"
    _write(results, "cnn", "tiny", "baseline", 0, 7, wrong)               # path says baseline, seed 7
    bad = results / "synthetic" / "cnn" / "tiny" / "baseline" / "fold1_seed7.json"
    bad.write_text("{not json")
    out = R.build_report(results, tmp_path / "rep", figures=False)
    assert any("disagrees with its path" in p and "fwd_only" in p for p in out["problems"])
    unreadable = [c for c in out["cells"] if c.status == "unreadable"]
    assert len(unreadable) == 1 and unreadable[0].seed == 7
    assert "**Problems**" in (tmp_path / "rep" / "report.md").read_text()


def test_cli_errors_exit_nonzero_without_traceback(results, tmp_path, capsys):
    assert R.main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert R.main([str(tmp_path / "empty")]) == 2
    assert "no cell results" in capsys.readouterr().err
    assert R.main([str(results), "--baseline", "nope"]) == 2
    assert "not a recipe" in capsys.readouterr().err
    assert R.main([str(results), "--metric", "nope"]) == 2
    assert "available:" in capsys.readouterr().err
    assert R.main([str(results), "--out", str(tmp_path / "cli"), "--metric", "dice",
                   "--no-figures"]) == 0
    assert "29 cells" in capsys.readouterr().out
    assert "Dice (soft, per image): each recipe against `baseline`" in \
        (tmp_path / "cli" / "report.md").read_text()


def test_figures_skip_cleanly_without_matplotlib(results, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)        # import matplotlib -> ImportError
    R.build_report(results, tmp_path / "rep")
    assert "matplotlib is not installed" in (tmp_path / "rep" / "report.md").read_text()


def test_figures_are_written_with_matplotlib(results, tmp_path):
    pytest.importorskip("matplotlib")
    R.build_report(results, tmp_path / "rep")
    names = {p.name for p in (tmp_path / "rep").glob("*.png")}
    assert {"synthetic_cv_bars.png", "synthetic_sensitivity.png",
            "synthetic_diagnostics_attention.png", "synthetic_diagnostics_gradient.png"} <= names
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "![" in text and "synthetic_sensitivity.png" in text


def test_cells_run_with_different_options_or_data_are_flagged(results, tmp_path):
    out = R.build_report(results, tmp_path / "rep", figures=False)
    assert "should not be compared" not in (tmp_path / "rep" / "report.md").read_text()
    odd = _cell("vit", "baseline", 4)
    odd["config"]["epochs"] = 2
    odd["data"]["fingerprint"] = "xyz"
    _write(results, "vit", "tiny", "baseline", 4, SEED, odd)
    out = R.build_report(results, tmp_path / "rep", figures=False)
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "should not be compared" in text
    assert "vit / tiny: cells differ in `epochs`: 100 (13 cells), 2 (1 cell)" in text
    assert "different stores" in text and "cnn / tiny: cells differ" not in text
    assert len(out["cells"]) == 29                      # flagged, not dropped


def test_report_without_baseline_cells_says_what_is_missing(tmp_path, capsys):
    # what the README's first command leaves: one nvfp4_full cell, no baseline
    root = tmp_path / "results"
    _write(root, "swin", "tiny", "nvfp4_full", 0, SEED, _cell("swin", "nvfp4_full", 0))
    assert R.main([str(root), "--no-figures"]) == 0
    assert "no `baseline` cell yet" in capsys.readouterr().out
    text = (root / "report" / "report.md").read_text()
    assert "**Missing comparisons**: no cell of the baseline `baseline`" in text
    assert "recipes present: `nvfp4_full`" in text
    assert "| swin | tiny | nvfp4_full | 1 |" in text  # its numbers are still reported
    assert R.main([str(root), "--baseline", "fp32", "--no-figures"]) == 0  # absent, but valid


def test_report_with_only_failed_cells_still_writes(tmp_path, capsys):
    root = tmp_path / "results"
    _write(root, "cnn", "tiny", "baseline", 0, SEED, _cell("cnn", "baseline", 0, status="failed"))
    assert R.main([str(root), "--no-figures"]) == 0
    assert "NonFiniteError" in (root / "report" / "report.md").read_text()
