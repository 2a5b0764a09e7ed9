"""Pooled pixel metrics: equivalence with scikit-learn, hand-computed answers, streaming."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from nvfp4bench.evaluation import pixel_metrics as M


def _tied_scores(n, levels, prevalence, seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.randint(0, levels, (n,), generator=g).float() / (levels - 1)  # many ties
    targets = (torch.rand(n, generator=g) < prevalence).float()
    return probs, targets


@pytest.mark.parametrize("levels,prevalence,seed", [(7, 0.3, 0), (50, 0.05, 1), (1000, 0.5, 2),
                                                    (2, 0.1, 3)])
def test_average_precision_equals_sklearn_with_ties(levels, prevalence, seed):
    probs, targets = _tied_scores(5000, levels, prevalence, seed)
    expected = average_precision_score(targets.numpy(), probs.numpy())
    assert M.average_precision(probs, targets) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_average_precision_equals_sklearn_on_distinct_sigmoid_scores():
    g = torch.Generator().manual_seed(5)
    targets = (torch.rand(4, 1, 16, 16, generator=g) < 0.2).float()
    probs = torch.sigmoid(torch.randn(4, 1, 16, 16, generator=g) * 3 + 2 * targets)
    expected = average_precision_score(targets.flatten().numpy(), probs.flatten().numpy())
    assert M.average_precision(probs, targets) == pytest.approx(expected, rel=1e-12)


def test_average_precision_hand_computed():
    # scores 0.9(+) 0.8(-) 0.7(+) 0.7(-): thresholds 0.9 -> P=1, R=1/2; 0.8 -> no recall step;
    # 0.7 -> P=2/4, R=1  =>  AP = 0.5 * 1 + 0.5 * 0.5 = 0.75
    probs = torch.tensor([0.9, 0.8, 0.7, 0.7])
    targets = torch.tensor([1, 0, 1, 0])
    assert M.average_precision(probs, targets) == pytest.approx(0.75)


def test_average_precision_edge_cases():
    probs = torch.tensor([0.1, 0.4, 0.4, 0.9])
    assert M.average_precision(probs, torch.zeros(4)) is None           # no positive: undefined
    assert M.average_precision(probs, torch.ones(4)) == 1.0             # all positive
    assert M.average_precision(torch.full((6,), 0.5), torch.tensor([1, 0, 0, 1, 0, 0])) \
        == pytest.approx(1 / 3)                                          # one tie: prevalence


def test_average_precision_streaming_equals_one_shot(monkeypatch):
    monkeypatch.setattr(M, "_MERGE_MIN_ENTRIES", 8)  # force many merges of the count tables
    probs, targets = _tied_scores(6000, 300, 0.2, 7)
    ap = M.PooledScores()
    for p, t in zip(probs.split(700), targets.split(700)):
        ap.update(p, t)
    assert ap._pos.keys.numel() > 0 and len(ap._neg._pending) < 9   # merges happened
    assert ap.average_precision() == pytest.approx(M.average_precision(probs, targets), rel=1e-13)
    assert ap.average_precision() == pytest.approx(average_precision_score(targets, probs),
                                                   rel=1e-12)
    assert ap.roc_auc() == pytest.approx(roc_auc_score(targets, probs), rel=1e-12)


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="same shape"):
        M.average_precision(torch.rand(3), torch.zeros(4))
    with pytest.raises(ValueError, match="probabilities"):
        M.soft_scores(torch.tensor([1.5, 0.2]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="binary"):
        M.confusion(torch.tensor([0.5, 0.2]), torch.tensor([0.5, 0.0]))


def test_soft_scores_hand_computed():
    probs = torch.tensor([0.9, 0.6, 0.2, 0.1])
    targets = torch.tensor([1.0, 0.0, 1.0, 0.0])
    tp, fp, fn = 0.9 + 0.2, 0.6 + 0.1, 0.1 + 0.8
    s = M.soft_scores(probs, targets)
    assert s["recall"] == pytest.approx(tp / (tp + fn))
    assert s["precision"] == pytest.approx(tp / (tp + fp))
    p, r = tp / (tp + fp), tp / (tp + fn)
    assert s["f2"] == pytest.approx(5 * p * r / (4 * p + r))
    assert s["iou"] == pytest.approx(tp / (tp + fp + fn))
    empty = M.soft_scores(torch.zeros(3), torch.zeros(3))
    assert empty == {"recall": None, "precision": None, "f2": None, "iou": None}


def test_dice_per_image_and_empty_images():
    probs = torch.tensor([[[1.0, 0.5], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[0.2, 0.0], [0, 0]]])
    targets = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[0, 0], [0, 0]]])
    raw = M.dice_per_image(probs, targets, smooth=0.0)
    assert raw.tolist() == pytest.approx([2 * 1.5 / 3.5, 1.0, 0.0])   # both empty -> 1; FP -> 0
    smoothed = M.dice_per_image(probs, targets)                         # s = 1 pixel
    assert smoothed.tolist() == pytest.approx([4 / 4.5, 1.0, 1 / 1.2])


def test_confusion_at_threshold():
    probs = torch.tensor([0.5, 0.49, 0.7, 0.1, 0.9])
    targets = torch.tensor([1, 1, 0, 0, 1])
    assert M.confusion(probs, targets) == {"tp": 2, "fp": 1, "fn": 1, "tn": 1}


# ---------------------------------------------------------------- ROC-AUC and calibration
@pytest.mark.parametrize("levels, prevalence, seed", [(2, 0.3, 0), (7, 0.05, 1), (50, 0.5, 2),
                                                      (1000, 0.01, 3), (2**20, 0.2, 4)])
def test_roc_auc_equals_sklearn_with_ties(levels, prevalence, seed):
    probs, targets = _tied_scores(20000, levels, prevalence, seed)
    assert M.roc_auc(probs, targets) == pytest.approx(roc_auc_score(targets.numpy(),
                                                                    probs.numpy()), rel=1e-12)


def test_roc_auc_hand_computed_and_undefined():
    # positives 0.8 and 0.4, negatives 0.4 and 0.1: pairs (0.8 > 0.4, 0.8 > 0.1, 0.4 = 0.4 tie,
    # 0.4 > 0.1) = (1 + 1 + 0.5 + 1) / 4
    p, t = torch.tensor([0.8, 0.4, 0.4, 0.1]), torch.tensor([1, 1, 0, 0])
    assert M.roc_auc(p, t) == 3.5 / 4
    assert M.roc_auc(p, torch.zeros(4)) is None and M.roc_auc(p, torch.ones(4)) is None


def _study_ece(probs, targets, n_bins=15):
    """The study's compute_ece (common/utils.py), written out independently in NumPy."""
    p, t = np.asarray(probs, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for i in range(n_bins):
        inside = (p > edges[i]) & (p <= edges[i + 1])
        if inside.mean() > 0:
            ece += abs(t[inside].mean() - p[inside].mean()) * inside.mean()
    return ece


@pytest.mark.parametrize("levels, prevalence, seed", [(15, 0.2, 0), (300, 0.05, 1),
                                                      (2**20, 0.5, 2)])
def test_ece_logits_and_entropy_equal_the_studys_numpy_definitions(levels, prevalence, seed):
    probs, targets = _tied_scores(20000, levels, prevalence, seed)
    probs[:16] = torch.linspace(0, 1, 16)                 # values on every bin edge: (e_b, e_b+1]
    probs = probs.clamp(M.PROB_CLIP, 1 - M.PROB_CLIP)     # the study's clipped probabilities
    scores = M.PooledScores()
    for p, t in zip(probs.split(3000), targets.split(3000)):
        scores.update(p, t)
    p32, t64 = probs.numpy(), targets.numpy().astype(np.float64)
    assert scores.expected_calibration_error() == pytest.approx(_study_ece(p32, t64), rel=1e-12,
                                                                abs=1e-15)
    clipped = np.clip(p32, np.float32(1e-7), np.float32(1 - 1e-7))
    logits = np.log(clipped / (1 - clipped)).astype(np.float64)   # float32 logits, as the study's
    mean, sd = scores.logit_stats()
    assert mean == pytest.approx(logits.mean(), rel=1e-12, abs=1e-15)
    assert sd == pytest.approx(logits.std(), rel=1e-12)
    q = p32.astype(np.float64)
    entropy = -np.mean(q * np.log(q + 1e-10) + (1 - q) * np.log(1 - q + 1e-10))
    assert scores.prob_entropy() == pytest.approx(entropy, rel=1e-12)


def test_ece_hand_computed():
    # bin (0.2, 0.2667]: p 0.25 x2, targets 1 and 0 -> |0.5 - 0.25| * 2/4; bin (0.8667, 0.9333]:
    # p 0.9 x2, targets 1 and 1 -> |1 - 0.9| * 2/4
    p = torch.tensor([0.25, 0.25, 0.9, 0.9])
    t = torch.tensor([1, 0, 1, 1])
    scores = M.PooledScores()
    scores.update(p, t)
    assert scores.expected_calibration_error() == pytest.approx(0.25 * 0.5 + 0.1 * 0.5,
                                                                rel=1e-7)
    assert M.PooledScores().expected_calibration_error() is None
