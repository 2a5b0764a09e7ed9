"""Pooled pixel metrics: equivalence with scikit-learn, hand-computed answers, streaming."""

import pytest
import torch
from sklearn.metrics import average_precision_score

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
    ap = M.AveragePrecision()
    for p, t in zip(probs.split(700), targets.split(700)):
        ap.update(p, t)
    assert ap._pos.keys.numel() > 0 and len(ap._neg._pending) < 9   # merges happened
    assert ap.compute() == pytest.approx(M.average_precision(probs, targets), rel=1e-13)
    assert ap.compute() == pytest.approx(average_precision_score(targets, probs), rel=1e-12)


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
