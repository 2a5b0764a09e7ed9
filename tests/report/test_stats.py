"""Statistics: known answers and equivalence with scipy."""
import math

import numpy as np
import pytest
from scipy import stats as sst

from nvfp4bench.report import stats as S


def test_summarize_matches_scipy_t_interval():
    x = [0.71, 0.64, 0.80, 0.77, 0.69]
    s = S.summarize(x)
    lo, hi = sst.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=sst.sem(x))
    assert s["n"] == 5 and s["mean"] == pytest.approx(np.mean(x))
    assert s["sd"] == pytest.approx(np.std(x, ddof=1))
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))


def test_summarize_small_and_missing():
    assert S.summarize([]) == {"n": 0, "mean": None, "sd": None, "ci_low": None, "ci_high": None,
                               "ci_clipped": False, "min": None, "max": None}
    one = S.summarize([0.5, None, float("nan")])
    assert one["n"] == 1 and one["mean"] == 0.5 and one["sd"] is None and one["ci_low"] is None
    assert (one["min"], one["max"]) == (0.5, 0.5)
    assert (S.summarize([0.3, 0.9, None, 0.1])["min"], S.summarize([0.3, 0.9, 0.1])["max"]) == (
        0.1, 0.9)


def test_wilcoxon_matches_scipy_and_known_exact_answer():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=9), rng.normal(size=9)
    assert S.wilcoxon_paired(x, y) == pytest.approx(sst.wilcoxon(x - y).pvalue)
    # five positive differences: the exact two-sided p is 2 / 2^5
    assert S.wilcoxon_paired([2, 3, 4, 5, 6], [1, 1, 1, 1, 1]) == pytest.approx(0.0625)
    # ties and a zero difference (dropped)
    x, y = [1.0, 2.0, 2.0, 0.5, 4.0, 3.0], [0.0, 0.0, 0.0, 3.5, 0.0, 3.0]
    expected = sst.wilcoxon(np.subtract(x, y), zero_method="wilcox").pvalue
    assert S.wilcoxon_paired(x, y) == pytest.approx(expected)
    assert S.wilcoxon_paired([1, 2], [1, 2]) == 1.0
    assert S.wilcoxon_paired([None], [1.0]) is None


def test_cohens_d_and_percent_of_baseline():
    x, y = [0.9, 0.8, 0.85, 0.7], [1.0, 0.9, 0.8, 0.8]
    d = np.subtract(x, y)
    assert S.cohens_d_paired(x, y) == pytest.approx(d.mean() / d.std(ddof=1))
    assert S.cohens_d_paired([1, 2], [0, 1]) is None            # zero spread
    p = S.percent_of_baseline(x, y)
    assert p["mean"] == pytest.approx(np.mean(100 * np.divide(x, y))) and p["n"] == 4
    assert S.percent_of_baseline([1.0, 2.0], [0.0, 4.0])["n"] == 1  # baseline 0 left out
    with pytest.raises(ValueError, match="equal lengths"):
        S.cohens_d_paired([1, 2], [1])


def test_holm_known_answer():
    assert S.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert S.holm([0.5, None, 0.01]) == [pytest.approx(0.5), None, pytest.approx(0.02)]
    assert S.holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize("seed,levels", [(0, None), (1, 3), (2, 2)])
def test_kendalls_w_matches_friedman(seed, levels):
    rng = np.random.default_rng(seed)
    m, n = 6, 5
    table = rng.normal(size=(m, n)) + np.arange(n) * 0.7
    if levels:                                                   # force ties within blocks
        table = np.round(table * levels / 3) / levels
    w = S.kendalls_w(table)
    chi2 = sst.friedmanchisquare(*table.T).statistic
    assert w == pytest.approx(chi2 / (m * (n - 1)))


def test_kendalls_w_extremes():
    assert S.kendalls_w([[1, 2, 3], [10, 20, 30], [0.1, 0.2, 0.3]]) == pytest.approx(1.0)
    assert S.kendalls_w([[1, 2], [2, 1]]) == pytest.approx(0.0)
    assert S.kendalls_w([[1, 1], [2, 2]]) is None
    assert S.kendalls_w([[1, 2, 3]]) is None
    assert not math.isnan(S.kendalls_w([[1, 2, 2], [1, 3, 2]]))


def test_an_interval_stays_inside_the_metric_range():
    hd95 = S.summarize([10.0, 60.0], bounds=(0.0, math.inf))  # two folds: t = 12.7
    free = S.summarize([10.0, 60.0])
    assert free["ci_low"] < 0 and not free["ci_clipped"]
    assert hd95["ci_low"] == 0.0 and hd95["ci_high"] == free["ci_high"] and hd95["ci_clipped"]
    auprc = S.summarize([0.2, 0.9], bounds=(0.0, 1.0))
    assert (auprc["ci_low"], auprc["ci_high"]) == (0.0, 1.0) and auprc["ci_clipped"]
    narrow = S.summarize([0.5, 0.51, 0.49], bounds=(0.0, 1.0))
    assert narrow == S.summarize([0.5, 0.51, 0.49]) and not narrow["ci_clipped"]
