"""Report: hand-made cell JSONs (with a missing and a failed cell) against scipy and numpy."""
import csv
import json
import sys
import zlib

import numpy as np
import pytest
from scipy import stats as sst

from nvfp4bench.report import build as R
from nvfp4bench.report import cli as report_cli

RECIPES = ("baseline", "nvfp4_full", "2d_rht_sr")
ARCHS = ("cnn", "vit")
FOLDS = range(5)
SEED = 2026
MISSING = ("vit", "tiny", "2d_rht_sr", 3)
FAILED = ("cnn", "tiny", "nvfp4_full", 2)


def _value(arch, recipe, fold, metric, part="test"):
    """Deterministic, distinct values per cell (and per partition)."""
    rng = np.random.default_rng(zlib.crc32(f"{arch}|{recipe}|{fold}|{metric}|{part}".encode()))
    base = {"auprc": 0.7, "recall": 0.8, "dice": 0.6, "hd95_mean": 12.0}[metric]
    shift = {"baseline": 0.0, "nvfp4_full": -0.05, "2d_rht_sr": -0.01}[recipe]
    return float(base + shift * (1 if metric != "hd95_mean" else -40) + rng.normal(0, 0.02))


def _write(root, arch, scale, recipe, fold, seed, obj):
    path = root / "synthetic" / arch / scale / recipe / f"fold{fold}_seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _timing(arch, recipe, fold):
    step = {"cnn": 300.0, "vit": 100.0}.get(arch, 200.0) * {"baseline": 1.0, "nvfp4_full": 1.5,
                                                 "2d_rht_sr": 1.8}[recipe] + 7.0 * fold
    return {"train_seconds": step * (40 + 3 * fold) * 0.05, "median_step_ms": step}


def _cell(arch, recipe, fold, status="complete"):
    obj = {"schema_version": 1, "status": status, "error": None, "config_hash": "0" * 16,
           "config": {"arch": arch, "scale": "tiny", "recipe": recipe, "fold": fold, "seed": SEED,
                      "epochs": 100, "out": f"/somewhere/{fold}"},
           "data": {"name": "synthetic", "synthetic": True, "fingerprint": "abc"},
           **{part: {m: _value(arch, recipe, fold, m, part)
                     for m in ("auprc", "recall", "dice", "hd95_mean")} | {"hd95_unit": "voxel"}
              for part in ("test", "val")},
           "diagnostics": {"summary": {"attention_collapsed_share": 0.1 * fold,
                                       "gradient_cosine": 0.9 - 0.01 * fold, "flag": True}},
           "timing": _timing(arch, recipe, fold), "epochs_run": 40 + 3 * fold}
    if status == "failed":
        obj.update(test=None, val=None,
                   error="NonFiniteError: epoch 3: validation loss is nan\ntrace")
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


def _vals(arch, recipe, metric, folds=FOLDS, part="test"):
    return [_value(arch, recipe, f, metric, part) for f in folds
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
    assert not [c for c in out["cells"] if c.seed == 7]                 # neither is counted
    assert any("fold1_seed7.json`: left out, not a well-formed result: JSONDecodeError" in p
               for p in out["problems"])
    assert "**Problems**" in (tmp_path / "rep" / "report.md").read_text()


def _malformed(base: dict) -> dict[str, object]:
    """Name -> a malformed variant of a valid cell result (or raw text for broken JSON)."""
    import copy

    def variant(edit):
        obj = copy.deepcopy(base)
        edit(obj)
        return obj

    cases = {"a list at the top": [base], "a string at the top": '"complete"',
             "truncated JSON": json.dumps(base)[:-40], "empty file": "",
             "NaN metric (non-standard JSON)": json.dumps(variant(
                 lambda o: o["test"].update(auprc=float("nan")))),
             "Infinity metric": json.dumps(variant(lambda o: o["val"].update(dice=float("inf")))),
             "two-key file": {"status": "complete", "test": {"auprc": 0.9}}}
    for key in ("schema_version", "status", "config_hash", "config", "data", "val", "test"):
        cases[f"no {key}"] = variant(lambda o, k=key: o.pop(k))
    for key in ("arch", "scale", "recipe", "fold", "seed"):
        cases[f"no config.{key}"] = variant(lambda o, k=key: o["config"].pop(k))
    swaps = {"config is a list": ("config", []), "data is a string": ("data", "synthetic"),
             "test is a list": ("test", [0.7]), "val is a number": ("val", 0.7),
             "status unknown": ("status", "done"), "status is a number": ("status", 1),
             "schema_version 2": ("schema_version", 2), "schema_version a string": (
                 "schema_version", "1"), "config_hash short": ("config_hash", "abc"),
             "config_hash a number": ("config_hash", 123)}
    for name, (key, value) in swaps.items():
        cases[name] = variant(lambda o, k=key, v=value: o.__setitem__(k, v))
    config_swaps = {"config.fold a string": ("fold", "0"), "config.seed a float": ("seed", 1.5),
                    "config.arch a number": ("arch", 3), "config.fold a bool": ("fold", True),
                    "config.split unknown": ("split", "loo")}
    for name, (key, value) in config_swaps.items():
        cases[name] = variant(lambda o, k=key, v=value: o["config"].__setitem__(k, v))
    metric_swaps = {"test metric a string": ("test", "auprc", "0.7"),
                    "val metric a list": ("val", "recall", [0.8]),
                    "test metric a bool": ("test", "dice", True),
                    "hd95_unit a number": ("test", "hd95_unit", 5)}
    for name, (part, key, value) in metric_swaps.items():
        cases[name] = variant(lambda o, p=part, k=key, v=value: o[p].__setitem__(k, v))
    return cases


def test_the_report_counts_only_well_formed_results_and_lists_the_rest(results, tmp_path, capsys):
    valid = _cell("cnn", "baseline", 0)
    cases = _malformed(valid)
    assert len(cases) >= 20
    paths = {}
    for seed, (name, obj) in enumerate(cases.items(), start=100):
        path = results / "synthetic" / "cnn" / "tiny" / "baseline" / f"fold0_seed{seed}.json"
        path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
        paths[name] = path
    assert report_cli.main([str(results), "--out", str(tmp_path / "rep"), "--no-figures"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    out = R.build_report(results, tmp_path / "rep2", figures=False)
    assert len(out["cells"]) == 2 * 3 * 5 - 1                 # exactly the valid fixture cells
    assert not [c for c in out["cells"] if c.seed != SEED]
    for name, path in paths.items():
        listed = [p for p in out["problems"] if f"fold0_seed{path.stem.split('seed')[1]}.json`"
                  in p]
        assert len(listed) == 1 and "not a well-formed result" in listed[0], name
    row = next(r for r in out["summary"] if (r["arch"], r["recipe"], r["metric"])
               == ("cnn", "baseline", "auprc"))
    assert row["mean"] == pytest.approx(np.mean(_vals("cnn", "baseline", "auprc")))


def test_cli_errors_exit_nonzero_without_traceback(results, tmp_path, capsys):
    assert report_cli.main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report_cli.main([str(tmp_path / "empty")]) == 2
    assert "no cell results" in capsys.readouterr().err
    assert report_cli.main([str(results), "--baseline", "nope"]) == 2
    assert "not a recipe" in capsys.readouterr().err
    assert report_cli.main([str(results), "--metric", "nope"]) == 2
    assert "available:" in capsys.readouterr().err
    assert report_cli.main([str(results), "--out", str(tmp_path / "cli"), "--metric", "dice",
                   "--no-figures"]) == 0
    assert "29 cells" in capsys.readouterr().out
    assert "Dice (soft, per image) (test partition): each recipe against `baseline`" in \
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
    assert report_cli.main([str(root), "--no-figures"]) == 0
    assert "no `baseline` cell yet" in capsys.readouterr().out
    text = (root / "report" / "report.md").read_text()
    assert "**Missing comparisons**: no cell of the baseline `baseline`" in text
    assert "recipes present: `nvfp4_full`" in text
    assert "| swin | tiny | nvfp4_full | 1 |" in text  # its numbers are still reported
    assert report_cli.main([str(root), "--baseline", "fp32", "--no-figures"]) == 0  # absent, but valid


def test_report_with_only_failed_cells_still_writes(tmp_path, capsys):
    root = tmp_path / "results"
    _write(root, "cnn", "tiny", "baseline", 0, SEED, _cell("cnn", "baseline", 0, status="failed"))
    assert report_cli.main([str(root), "--no-figures"]) == 0
    assert "NonFiniteError" in (root / "report" / "report.md").read_text()


# hold-out split: <recipe>/holdout_seed<s>.json, one partition (fold 0), replicates are seeds
HOLDOUT_SEEDS = range(SEED, SEED + 6)
HOLDOUT_MISSING = ("cnn", "nvfp4_full", SEED + 2)


def _holdout_cell(arch, recipe, seed):
    obj = _cell(arch, recipe, 0)
    obj["config"].update(split="holdout", seed=seed)
    obj["test"] = {m: _value(arch, recipe, f"holdout{seed}", m)
                   for m in ("auprc", "recall", "dice", "hd95_mean")} | {"hd95_unit": "voxel"}
    return obj


def _write_holdout(root, arch, recipe, seed, obj):
    path = root / "synthetic" / arch / "tiny" / recipe / f"holdout_seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _add_holdout(root, archs=("cnn",), recipes=("baseline", "nvfp4_full")):
    for arch in archs:
        for recipe in recipes:
            for seed in HOLDOUT_SEEDS:
                if (arch, recipe, seed) != HOLDOUT_MISSING:
                    _write_holdout(root, arch, recipe, seed, _holdout_cell(arch, recipe, seed))


def test_holdout_cells_are_read_paired_by_seed_and_never_pooled_with_kfold(results, tmp_path,
                                                                          capsys):
    kfold_only = R.build_report(results, tmp_path / "k", figures=False)
    _add_holdout(results)                   # seed 2026 and fold 0 also name k-fold cells
    out = R.build_report(results, tmp_path / "rep", figures=False)
    assert [(v.name, v.split) for v in out["views"]] == [("synthetic", "kfold"),
                                                         ("synthetic", "holdout")]
    for key in ("summary", "comparison", "ranking"):     # k-fold numbers exactly as before
        assert [r for r in out[key] if r["split"] == "kfold"] == kfold_only[key]
    holdout = out["views"][1]
    assert holdout.blocks == [(0, s) for s in HOLDOUT_SEEDS]
    assert [m[1:] for m in holdout.missing] == [("cnn", "tiny", "nvfp4_full", 0, SEED + 2)]
    seeds = [s for s in HOLDOUT_SEEDS if s != SEED + 2]  # paired by seed, not by position
    x = np.array([_value("cnn", "nvfp4_full", f"holdout{s}", "auprc") for s in seeds])
    y = np.array([_value("cnn", "baseline", f"holdout{s}", "auprc") for s in seeds])
    r = next(r for r in out["comparison"] if r["split"] == "holdout" and r["metric"] == "auprc")
    assert (r["arch"], r["recipe"], r["n_pairs"]) == ("cnn", "nvfp4_full", 5)
    assert r["wilcoxon_p"] == pytest.approx(sst.wilcoxon(x - y).pvalue)
    assert r["pct_mean"] == pytest.approx(np.mean(100 * x / y))
    assert r["cohens_d"] == pytest.approx((x - y).mean() / (x - y).std(ddof=1))
    s = next(r for r in out["summary"] if (r["split"], r["recipe"], r["metric"])
             == ("holdout", "baseline", "auprc"))
    base = [_value("cnn", "baseline", f"holdout{s}", "auprc") for s in HOLDOUT_SEEDS]
    assert s["n"] == 6 and s["mean"] == pytest.approx(np.mean(base))
    w = next(r for r in out["ranking"] if (r["split"], r["metric"]) == ("holdout", "auprc"))
    assert (w["m_blocks"], w["n_recipes"]) == (5, 2)
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "## Dataset `synthetic`: k-fold cross-validation (synthetic)" in text
    holdout_text = text.split("## Dataset `synthetic`: patient hold-out (synthetic)")[1]
    assert "each recipe against `baseline`, paired per seed" in holdout_text
    assert "- cnn / tiny / nvfp4_full / holdout seed 2028" in holdout_text
    assert "fold" not in holdout_text
    assert "k-fold cross-validation (29 cells), patient hold-out (11 cells)" in text
    assert "synthetic dataset** (`synthetic`), not" in text      # the dataset named once
    with open(tmp_path / "rep" / "cells.csv") as f:
        rows = list(csv.DictReader(f))
    assert sum(r["split"] == "holdout" for r in rows) == 11 and len(rows) == 40
    assert report_cli.main([str(results), "--out", str(tmp_path / "cli"), "--no-figures"]) == 0
    assert "40 cells" in capsys.readouterr().out


def test_holdout_only_results_get_their_own_figures(tmp_path):
    pytest.importorskip("matplotlib")
    root = tmp_path / "results"
    _add_holdout(root, archs=("cnn", "vit"))
    out = R.build_report(root, tmp_path / "rep")
    assert [v.split for v in out["views"]] == ["holdout"] and not out["problems"]
    names = {p.name for p in (tmp_path / "rep").glob("*.png")}
    assert {"synthetic_holdout_cv_bars.png", "synthetic_holdout_sensitivity.png"} <= names
    assert not any(n.startswith("synthetic_cv") for n in names)


def test_holdout_file_disagreeing_with_its_name_is_flagged(results, tmp_path):
    _add_holdout(results)
    as_kfold = _holdout_cell("cnn", "baseline", 7)
    as_kfold["config"].update(split="kfold", fold=3)      # a k-fold result, hold-out name
    _write_holdout(results, "cnn", "baseline", 7, as_kfold)
    as_holdout = _holdout_cell("cnn", "baseline", 7)     # a hold-out result, fold name
    _write(results, "cnn", "tiny", "baseline", 0, 7, as_holdout)
    out = R.build_report(results, tmp_path / "rep", figures=False)
    flagged = {p.split("`")[1]: p for p in out["problems"]}
    wrong_holdout = flagged["synthetic/cnn/tiny/baseline/holdout_seed7.json"]
    assert "split='kfold' (path says 'holdout')" in wrong_holdout and "fold=3" in wrong_holdout
    assert "split='holdout' (path says 'kfold')" in \
        flagged["synthetic/cnn/tiny/baseline/fold0_seed7.json"]
    assert len(out["problems"]) == 2
    assert all("disagrees with its path" in p for p in flagged.values())
    assert 7 not in {c.seed for c in out["cells"]}
    assert "**Problems**" in (tmp_path / "rep" / "report.md").read_text()


def _holm(pvalues):
    """Holm's step-down adjustment, written out independently: the i-th smallest of m p-values
    is multiplied by (m - i), then made non-decreasing and capped at 1."""
    order = np.argsort(pvalues, kind="stable")
    m = len(pvalues)
    adjusted = np.empty(m)
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, (m - i) * pvalues[j])
        adjusted[j] = min(1.0, running)
    return adjusted


@pytest.mark.parametrize("part", ["test", "val"])
def test_all_pairs_equal_scipy_wilcoxon_and_an_independent_holm(results, tmp_path, part):
    out = R.build_report(results, tmp_path / "rep", figures=False, eval_set=part)
    for arch in ARCHS:
        rows = [r for r in out["pairs"] if (r["arch"], r["metric"]) == (arch, "auprc")]
        assert [(r["recipe_1"], r["recipe_2"]) for r in rows] == [      # lower study id first
            ("baseline", "nvfp4_full"), ("baseline", "2d_rht_sr"), ("nvfp4_full", "2d_rht_sr")]
        for r in rows:
            blocks = [f for f in FOLDS
                      if not {(arch, "tiny", r["recipe_1"], f), (arch, "tiny", r["recipe_2"], f)}
                      & {MISSING, FAILED}]
            x = np.array([_value(arch, r["recipe_1"], f, "auprc", part) for f in blocks])
            y = np.array([_value(arch, r["recipe_2"], f, "auprc", part) for f in blocks])
            res = sst.wilcoxon(x, y)
            assert r["n_blocks"] == len(blocks) >= 3
            assert (r["statistic"], r["p"]) == (pytest.approx(res.statistic),
                                                pytest.approx(res.pvalue))
            assert r["mean_diff"] == pytest.approx((x - y).mean())     # r1 - r2
            assert r["cohens_d"] == pytest.approx((x - y).mean() / (x - y).std(ddof=1))
            assert r["p_below_0.05"] == (r["p"] < 0.05)
        expected = _holm(np.array([r["p"] for r in rows]))
        assert [r["holm_p"] for r in rows] == pytest.approx(expected.tolist())
        assert all(r["holm_below_0.01"] == (r["holm_p"] < 0.01) for r in rows)
    glob = R.build_report(results, tmp_path / "glob", figures=False, eval_set=part,
                          holm_scope="global")
    rows = [r for r in glob["pairs"] if r["metric"] == "auprc"]
    assert len(rows) == 6
    assert [r["holm_p"] for r in rows] == pytest.approx(_holm(np.array([r["p"] for r in rows])))


def test_pairs_with_fewer_than_three_blocks_are_skipped_and_listed(tmp_path):
    root = tmp_path / "results"
    for recipe in RECIPES:
        for fold in (0, 1) if recipe == "2d_rht_sr" else FOLDS:
            _write(root, "cnn", "tiny", recipe, fold, SEED, _cell("cnn", recipe, fold))
    out = R.build_report(root, tmp_path / "rep", figures=False)
    skipped = [(r["recipe_1"], r["recipe_2"], r["n_blocks"]) for r in out["skipped_pairs"]
               if r["metric"] == "auprc"]
    assert skipped == [("baseline", "2d_rht_sr", 2), ("nvfp4_full", "2d_rht_sr", 2)]
    assert [(r["recipe_1"], r["recipe_2"]) for r in out["pairs"] if r["metric"] == "auprc"] == [
        ("baseline", "nvfp4_full")]
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "Skipped, fewer than 3 common (fold, seed) blocks: cnn / tiny baseline vs 2d_rht_sr (2)" \
        in text


def test_mean_ranks_equal_scipy_rankdata_per_block(results, tmp_path):
    out = R.build_report(results, tmp_path / "rep", figures=False)
    for metric, sign in (("auprc", -1), ("hd95_mean", 1)):             # rank 1 = the best
        rows = {r["recipe"]: r for r in out["mean_ranks"]
                if (r["arch"], r["metric"]) == ("cnn", metric)}
        folds = [f for f in FOLDS if f != 2]                             # complete blocks only
        table = np.array([[_value("cnn", rc, f, metric) for rc in RECIPES] for f in folds])
        ranks = np.array([sst.rankdata(sign * row) for row in table])
        for k, recipe in enumerate(RECIPES):
            assert rows[recipe]["mean_rank"] == pytest.approx(ranks[:, k].mean())
            assert rows[recipe]["rank_sd"] == pytest.approx(ranks[:, k].std(ddof=1))
            assert rows[recipe]["m_blocks"] == 4


def test_summary_has_min_and_max(results, tmp_path):
    out = R.build_report(results, tmp_path / "rep", figures=False)
    row = next(r for r in out["summary"] if (r["arch"], r["recipe"], r["metric"])
               == ("vit", "baseline", "recall"))
    x = _vals("vit", "baseline", "recall")
    assert (row["min"], row["max"]) == (min(x), max(x))
    with open(tmp_path / "rep" / "summary.csv") as f:
        assert {"min", "max", "eval_set"} <= set(csv.DictReader(f).fieldnames)


@pytest.mark.parametrize("part", ["test", "val"])
def test_the_eval_set_chooses_the_partition_and_every_table_and_figure_names_it(
        results, tmp_path, capsys, part):
    pytest.importorskip("matplotlib")
    assert report_cli.main([str(results), "--out", str(tmp_path / part), "--eval-set", part]) == 0
    out = R.build_report(results, tmp_path / "again", eval_set=part)
    row = next(r for r in out["summary"] if (r["arch"], r["recipe"], r["metric"])
               == ("cnn", "baseline", "auprc"))
    assert row["mean"] == pytest.approx(np.mean(_vals("cnn", "baseline", "auprc", part=part)))
    text = (tmp_path / part / "report.md").read_text()
    other = {"test": "val", "val": "test"}[part]
    assert f"every metric from the **{part} partition**" in text
    headings = [ln for ln in text.splitlines() if ln.startswith("### ")
                and not ln.startswith(("### Missing", "### Failed", "### Figures",
                                       "### Collapsed", "### Cost"))]  # of no partition
    assert headings and all(f"{part} partition" in h for h in headings), headings
    assert f"{other} partition)" not in text
    figures = [ln for ln in text.splitlines() if ln.startswith("![")]
    named = [ln for ln in figures if "diagnostics" not in ln]
    assert named and all(f"({part} partition)" in ln for ln in named), named
    for name in ("summary", "comparison", "pairwise", "ranking", "mean_ranks", "cost", "cells"):
        with open(tmp_path / part / f"{name}.csv") as f:
            assert {r["eval_set"] for r in csv.DictReader(f)} == {part}, name


def test_cost_table_from_the_complete_cells_timing(results, tmp_path):
    R.build_report(results, tmp_path / "rep", figures=False)
    rows = {(r["arch"], r["recipe"]): r for r in
            csv.DictReader(open(tmp_path / "rep" / "cost.csv"))}
    assert len(rows) == len(ARCHS) * len(RECIPES)
    for arch in ARCHS:
        base_steps = [_timing(arch, "baseline", f)["median_step_ms"] for f in FOLDS
                      if (arch, "tiny", "baseline", f) not in (MISSING, FAILED)]
        for recipe in RECIPES:
            folds = [f for f in FOLDS if (arch, "tiny", recipe, f) not in (MISSING, FAILED)]
            seconds = [_timing(arch, recipe, f)["train_seconds"] for f in folds]
            steps = [_timing(arch, recipe, f)["median_step_ms"] for f in folds]
            row = rows[(arch, recipe)]
            assert int(row["n_cells"]) == len(folds)
            assert float(row["train_s_mean"]) == pytest.approx(np.mean(seconds), rel=1e-12)
            assert float(row["train_s_total"]) == pytest.approx(np.sum(seconds), rel=1e-12)
            assert float(row["epochs_mean"]) == pytest.approx(np.mean([40 + 3 * f for f in folds]))
            assert float(row["step_ms_median"]) == pytest.approx(np.median(steps))
            assert float(row["step_x_baseline"]) == pytest.approx(
                np.median(steps) / np.median(base_steps))
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "### Cost of training (complete cells)" in report
    for arch in ARCHS:
        cells = [(r, f) for r in RECIPES for f in FOLDS
                 if (arch, "tiny", r, f) not in (MISSING, FAILED)]
        hours = sum(_timing(arch, r, f)["train_seconds"] for r, f in cells) / 3600
        assert f"{arch} / tiny {hours:.2f} h ({len(cells)} cells)" in report


def test_a_single_seed_shows_its_value_without_a_spread(tmp_path):
    root = tmp_path / "results"
    for recipe in ("baseline", "nvfp4_full"):
        _write_holdout(root, "cnn", recipe, SEED, _holdout_cell("cnn", recipe, SEED))
    R.build_report(root, tmp_path / "rep", figures=False)
    text = (tmp_path / "rep" / "report.md").read_text()
    value = _value("cnn", "baseline", f"holdout{SEED}", "auprc")
    row = next(ln for ln in text.splitlines() if ln.startswith("| cnn | tiny | baseline | 1 |"))
    assert f"| {value:.4f} |" in row and "±" not in row


def test_a_single_seed_skips_every_pair_in_one_line_per_arch_and_scale(tmp_path):
    root = tmp_path / "results"
    for arch in ("cnn", "vit"):
        for recipe in RECIPES:
            _write_holdout(root, arch, recipe, SEED, _holdout_cell(arch, recipe, SEED))
    R.build_report(root, tmp_path / "rep", figures=False)
    text = (tmp_path / "rep" / "report.md").read_text()
    assert ("Skipped, fewer than 3 common seeds: cnn / tiny: all 3 pairs of its 3 recipes "
            "(1 common each); vit / tiny: all 3 pairs of its 3 recipes (1 common each).") in text


def test_results_deeper_than_the_layout_are_not_pooled_with_the_folder_s_own(tmp_path):
    """``report results/`` reads results/<dataset>/<arch>/<scale>/<recipe>/<cell>.json only:
    the examples committed under results/examples/<name>/ stay out of the user's report."""
    root = tmp_path / "results"
    _write_holdout(root, "cnn", "baseline", SEED, _holdout_cell("cnn", "baseline", SEED))
    nested = root / "examples" / "some-study"
    for recipe in RECIPES:
        _write_holdout(nested, "cnn", recipe, SEED, _holdout_cell("cnn", recipe, SEED))
    out = R.build_report(root, tmp_path / "rep", figures=False)
    assert [(c.arch, c.recipe) for c in out["cells"]] == [("cnn", "baseline")]
    assert len(R.build_report(nested, tmp_path / "rep2", figures=False)["cells"]) == len(RECIPES)


def test_formats_are_compared_with_nvfp4_under_the_same_recipe(results, tmp_path):
    """Cells of 2d_rht_sr in two more formats (folders 2d_rht_sr@<format>): a format section
    paired per fold against 2d_rht_sr in nvfp4, equal to scipy's Wilcoxon and an independent
    Holm; the baseline comparison lists each variant as a recipe of its own, in its own Holm
    family, so the study's recipes keep their adjusted p-values; the all-pairs tests and the
    ranking stay over the recipes in nvfp4."""
    plain = R.build_report(results, tmp_path / "plain", figures=False)
    shift = {"mxfp4": -0.03, "nvfp4_4over6": 0.004}
    for fmt, delta in shift.items():
        for fold in FOLDS:
            obj = _cell("cnn", "2d_rht_sr", fold)
            obj["config"]["format"] = fmt
            obj["test"]["auprc"] += delta + 0.003 * fold
            _write(results, "cnn", "tiny", f"2d_rht_sr@{fmt}", fold, SEED, obj)
    before = R.build_report(results, tmp_path / "before", figures=False)
    assert not [r for r in before["formats"] if r["format"] == "nvfp4"]
    rows = {r["format"]: r for r in before["formats"]
            if (r["arch"], r["metric"]) == ("cnn", "auprc")}
    assert set(rows) == set(shift) and all(r["recipe"] == "2d_rht_sr" for r in rows.values())
    ref = np.array([_value("cnn", "2d_rht_sr", f, "auprc") for f in FOLDS])
    for fmt, delta in shift.items():
        x = ref + delta + 0.003 * np.arange(5)
        assert rows[fmt]["n_pairs"] == 5
        assert rows[fmt]["wilcoxon_p"] == pytest.approx(sst.wilcoxon(x - ref).pvalue)
        assert rows[fmt]["pct_mean"] == pytest.approx(np.mean(100 * x / ref))
    holm = _holm([rows["mxfp4"]["wilcoxon_p"], rows["nvfp4_4over6"]["wilcoxon_p"]])
    assert [rows["mxfp4"]["holm_p"], rows["nvfp4_4over6"]["holm_p"]] == pytest.approx(holm)
    report = (tmp_path / "before" / "report.md").read_text()
    assert "each block format against nvfp4 under the same recipe" in report
    assert "should not be compared" not in report  # the format names a cell, like the recipe
    assert "| cnn | tiny | 2d_rht_sr | mxfp4 | 5 |" in report
    assert {r["recipe"] for r in before["comparison"]} >= {"2d_rht_sr@mxfp4", "nvfp4_full"}
    with open(tmp_path / "before" / "formats.csv") as f:
        assert sum(1 for r in csv.DictReader(f) if r["arch"] == "cnn") == 2 * 4  # x 4 metrics

    def by_recipe(rows, key="recipe"):
        return {(r["arch"], r[key], r["metric"]): r for r in rows}
    study = by_recipe(plain["comparison"])
    with_formats = by_recipe(before["comparison"])
    assert all(with_formats[k]["holm_p"] == study[k]["holm_p"] for k in study)
    for fmt in shift:  # each format a family of its own (here one recipe: Holm p = p)
        family = [r for r in before["comparison"] if r["recipe"].endswith(f"@{fmt}")
                  and (r["arch"], r["metric"]) == ("cnn", "auprc")]
        assert len(family) == 1 and [r["holm_p"] for r in family] == pytest.approx(
            _holm([r["wilcoxon_p"] for r in family]))
    assert before["pairs"] == plain["pairs"] and before["ranking"] == plain["ranking"]
    assert not any("@" in r["recipe"] for r in before["mean_ranks"])
    # the summary lists a format only where it ran: cnn, not vit
    assert {(r["arch"], r["recipe"]) for r in before["summary"] if "@" in r["recipe"]} == {
        ("cnn", "2d_rht_sr@mxfp4"), ("cnn", "2d_rht_sr@nvfp4_4over6")}
    assert "| vit | tiny | 2d_rht_sr@mxfp4 |" not in report


def test_the_sensitivity_axis_follows_the_points_not_the_widest_interval():
    from nvfp4bench.report.figures import percent_axis_limits
    rows = [{"pct_mean": 92.0, "pct_ci_low": 1.0, "pct_ci_high": 180.0},
            {"pct_mean": 103.0, "pct_ci_low": 101.0, "pct_ci_high": 105.0},
            {"pct_mean": None, "pct_ci_low": None, "pct_ci_high": None}]
    assert percent_axis_limits(rows) == pytest.approx((86.5, 108.5))  # 92..103 widened by half
    # points all at 100: a span of at least 4 points, centred
    assert percent_axis_limits([{"pct_mean": 100.0}]) == pytest.approx((96.0, 104.0))
    assert percent_axis_limits([{"pct_mean": 60.0}]) == pytest.approx((40.0, 120.0))


def test_the_recipes_of_one_other_format_are_one_holm_family_against_the_baseline(results,
                                                                                   tmp_path):
    for recipe, delta in (("nvfp4_full", -0.02), ("2d_rht_sr", 0.001)):
        for fold in FOLDS:
            obj = _cell("cnn", recipe, fold)
            obj["config"]["format"] = "mxfp4"
            obj["test"]["auprc"] += delta - 0.002 * fold
            _write(results, "cnn", "tiny", f"{recipe}@mxfp4", fold, SEED, obj)
    out = R.build_report(results, tmp_path / "rep", figures=False)
    rows = {r["recipe"]: r for r in out["comparison"] if (r["arch"], r["metric"]) == ("cnn",
                                                                                    "auprc")}
    for members in (["nvfp4_full", "2d_rht_sr"], ["nvfp4_full@mxfp4", "2d_rht_sr@mxfp4"]):
        assert [rows[m]["holm_p"] for m in members] == pytest.approx(
            _holm([rows[m]["wilcoxon_p"] for m in members]))
    assert rows["nvfp4_full@mxfp4"]["holm_p"] > rows["nvfp4_full@mxfp4"]["wilcoxon_p"]


def test_a_report_without_other_formats_has_no_format_section(results, tmp_path):
    R.build_report(results, tmp_path / "rep", figures=False)
    assert "block format" not in (tmp_path / "rep" / "report.md").read_text()
    assert (tmp_path / "rep" / "formats.csv").read_text().count("\n") == 1  # the header


def test_matrices_of_different_shapes_do_not_count_each_others_cells_as_missing(tmp_path):
    """The hold-out matrix (cnn and vit at one seed) beside a multi-seed one (cnn only, three
    seeds, one cell not run yet) and one cnn recipe in mxfp4 at one seed: only that cell is
    missing, not vit or the mxfp4 cell at the other seeds."""
    root = tmp_path / "results"
    for arch in ("cnn", "vit"):
        for recipe in ("baseline", "nvfp4_full"):
            _write_holdout(root, arch, recipe, SEED, _holdout_cell(arch, recipe, SEED))
    for seed in (SEED + 1, SEED + 2):
        for recipe in ("baseline", "nvfp4_full"):
            if (recipe, seed) != ("nvfp4_full", SEED + 2):
                _write_holdout(root, "cnn", recipe, seed, _holdout_cell("cnn", recipe, seed))
    obj = _holdout_cell("cnn", "nvfp4_full", SEED)  # one recipe in another format, one seed
    obj["config"]["format"] = "mxfp4"
    path = root / "synthetic" / "cnn" / "tiny" / "nvfp4_full@mxfp4" / f"holdout_seed{SEED}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(obj))
    out = R.build_report(root, tmp_path / "rep", figures=False)
    (view,) = out["views"]
    assert [m[1:] for m in view.missing] == [("cnn", "tiny", "nvfp4_full", 0, SEED + 2)]
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "1 missing of the 9 expected (each arch x scale: the recipes run there" in report
