"""Metrics: equivalence with scikit-learn, hand-computed answers, empty-mask policy, streaming."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from nvfp4bench.evaluation import pixel_metrics as M
from nvfp4bench.evaluation import volume_metrics as V
from nvfp4bench.evaluation.meter import SegmentationMeter


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


def test_hard_dice_and_empty_mask_policy():
    a = np.zeros((4, 4), bool)
    b = a.copy()
    assert V.hard_dice(a, b) == 1.0 and V.hd95(a, b) == 0.0
    b[1, 1] = True
    diag = math.sqrt(4 ** 2 + 4 ** 2)
    assert V.hard_dice(a, b) == 0.0 and V.hd95(a, b) == pytest.approx(diag)   # hallucinated
    assert V.hard_dice(b, a) == 0.0 and V.hd95(b, a) == pytest.approx(diag)   # missed
    assert V.hd95(b, a, spacing=(2.0, 0.5)) == pytest.approx(math.sqrt(8 ** 2 + 2 ** 2))
    a[1, 1] = a[1, 2] = True
    assert V.hard_dice(a, b) == pytest.approx(2 / 3)


def test_hd95_known_shift():
    target = np.zeros((6, 30, 40), bool)
    target[:, 5:25, 10] = True                   # a one-voxel-thick plate, normal along x
    pred = np.roll(target, 3, axis=2)            # shifted 3 voxels along x: every distance is 3
    assert V.hd95(pred, target) == pytest.approx(3.0)
    assert V.hd95(pred, target, spacing=(5.0, 1.0, 0.5)) == pytest.approx(1.5)
    plate = np.zeros((6, 30, 40), bool)
    plate[2, 5:25, 5:25] = True
    assert V.hd95(np.roll(plate, 1, axis=0), plate, spacing=(5.0, 1.0, 1.0)) == pytest.approx(5.0)
    assert V.hd95(target, target) == 0.0


def _surface_bruteforce(mask):
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            inner &= np.roll(padded, step, axis=axis)[tuple(slice(1, -1) for _ in mask.shape)]
    return np.argwhere(mask & ~inner)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_equals_bruteforce_pairwise_distances(seed):
    from scipy.ndimage import gaussian_filter
    from scipy.spatial.distance import cdist
    rng = np.random.default_rng(seed)
    a = gaussian_filter(rng.random((5, 24, 24)), 1.5) > 0.52
    b = gaussian_filter(rng.random((5, 24, 24)), 1.5) > 0.52
    assert a.any() and b.any()
    spacing = (3.0, 0.8, 1.1)
    d = cdist(_surface_bruteforce(a) * spacing, _surface_bruteforce(b) * spacing)
    expected = max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))
    assert V.hd95(a, b, spacing) == pytest.approx(expected, rel=1e-12)


def test_hd95_takes_the_95th_percentile_not_the_maximum():
    target = np.zeros((1, 200, 200), bool)
    target[0, 50:150, 50:150] = True
    pred = target.copy()
    pred[0, 190, 190] = True                     # one far outlier among ~400 surface voxels
    assert V.hd95(pred, target) == 0.0


def test_lesion_recall_hand_made_components():
    target = np.zeros((3, 20, 20), bool)
    target[0:2, 1:4, 1:4] = True                 # lesion 1
    target[1, 10:12, 10:12] = True               # lesion 2
    target[2, 16, 16] = target[1, 17, 17] = True  # lesion 3: diagonal neighbours, one component
    pred = np.zeros_like(target)
    pred[1, 2, 2] = True                         # one voxel inside lesion 1: detected
    pred[1, 17, 17] = True                       # detects lesion 3
    pred[0, 10:12, 5:7] = True                   # false-positive component
    r = V.lesion_recall(pred, target)
    assert (r["n_lesions"], r["n_detected"], r["n_false_positive_components"]) == (3, 2, 1)
    assert r["recall"] == pytest.approx(2 / 3)
    none = V.lesion_recall(pred, np.zeros_like(target))
    assert none["recall"] is None and none["n_false_positive_components"] == 3
    assert V.lesion_recall(np.zeros_like(target), target)["recall"] == 0.0


def _volume_batches():
    """Two patients of 3 slices 8x8: 'a' with a tumour found on one slice, 'b' tumour-free."""
    g = torch.Generator().manual_seed(11)
    targets = torch.zeros(6, 1, 8, 8)
    targets[0:2, 0, 2:5, 2:5] = 1                 # patient a, slices 0 and 1
    logits = torch.randn(6, 1, 8, 8, generator=g) - 6
    logits[1, 0, 2:5, 2:5] = 5                    # found on slice 1 only
    patients = ["a", "a", "a", "b", "b", "b"]
    positions = [0, 1, 2, 0, 1, 2]
    return logits, targets, patients, positions


def test_meter_matches_one_shot_functions_and_patient_policy():
    logits, targets, patients, positions = _volume_batches()
    probs = torch.sigmoid(logits)
    meter = SegmentationMeter(from_logits=True)
    order = [4, 0, 5, 2, 1, 3]                    # arrive shuffled, in two batches
    for chunk in (order[:4], order[4:]):
        meter.update(logits[chunk], targets[chunk], patients=[patients[i] for i in chunk],
                     positions=[positions[i] for i in chunk])
    out = meter.compute()
    clipped = probs.clamp(1e-7, 1 - 1e-7)  # the study's clip before the pooled metrics
    expected_ap = average_precision_score(targets.flatten(), clipped.flatten())
    assert out["auprc"] == pytest.approx(expected_ap)
    for key, value in M.soft_scores(clipped, targets).items():
        assert out[key] == pytest.approx(value)
    study = [M.dice_per_image(probs[c], targets[c], 1e-6).mean() for c in (order[:4], order[4:])]
    assert out["dice"] == pytest.approx(float(sum(study) / 2))
    assert out["dice_s1"] == pytest.approx(float(M.dice_per_image(probs, targets).mean()))
    assert {k: out[k] for k in ("tp", "fp", "fn", "tn")} == M.confusion(probs, targets)
    assert out["n_pixels"] == 6 * 64 and out["prevalence"] == pytest.approx(18 / 384)
    # patient a: pred = slice 1 block (9 voxels), target = slices 0-1 (18): Dice 2*9/27;
    # patient b: both empty -> Dice 1, HD95 0. One lesion in all, detected.
    assert out["n_patients"] == 2
    assert out["patient_dice_mean"] == pytest.approx((18 / 27 + 1.0) / 2)
    hd_a = V.hd95(probs[:3, 0] >= 0.5, targets[:3, 0])
    assert hd_a > 0 and out["hd95_mean"] == pytest.approx(hd_a / 2)
    assert out["lesion_recall"] == 1.0 and out["n_lesions"] == 1
    assert all(v is None or isinstance(v, (int, float)) for v in out.values())


def test_meter_missed_tumour_counts_as_failure():
    targets = torch.zeros(2, 1, 8, 8)
    targets[0, 0, 3:5, 3:5] = 1
    meter = SegmentationMeter()
    meter.update(torch.zeros(2, 1, 8, 8), targets, patients=["p", "p"], positions=[0, 1])
    out = meter.compute()
    assert out["patient_dice_mean"] == 0.0
    assert out["hd95_mean"] == pytest.approx(math.sqrt(2 ** 2 + 8 ** 2 + 8 ** 2))
    assert out["lesion_recall"] == 0.0


class _Store:
    def patient_of(self, i):
        return "pq"[i // 3]

    def slice_position(self, i):
        return i % 3


def test_meter_maps_indices_through_the_store_and_checks_duplicates():
    logits, targets, patients, positions = _volume_batches()
    by_ids = SegmentationMeter(from_logits=True)
    by_ids.update(logits, targets, patients=patients, positions=positions)
    by_store = SegmentationMeter(from_logits=True, store=_Store())
    by_store.update(logits, targets, torch.arange(6))
    a, b = by_ids.compute(), by_store.compute()
    assert {k: a[k] for k in ("patient_dice_mean", "hd95_mean", "lesion_recall")} == \
        {k: b[k] for k in ("patient_dice_mean", "hd95_mean", "lesion_recall")}
    with pytest.raises(ValueError, match="seen twice"):
        by_store.update(logits[:1], targets[:1], torch.tensor([0]))
    no_ids = SegmentationMeter(from_logits=True)
    no_ids.update(logits, targets)
    assert no_ids.compute()["patient_dice_mean"] is None
    with pytest.raises(ValueError, match="probabilities"):
        SegmentationMeter().update(logits, targets)
    empty = SegmentationMeter().compute()
    assert empty["auprc"] is None and empty["dice"] is None and empty["n_pixels"] == 0
    assert empty["patient_dice_mean"] is None and empty["lesion_recall"] is None


def _study_dice(p, t, eps=1e-6):
    """The study's dice_coef_metric restated: per image (2 sum p t + eps) / (sum p + sum t + eps),
    float32, the batch's mean."""
    inter = (p * t).sum(dim=(2, 3))
    return float(((2 * inter + eps) / (p.sum(dim=(2, 3)) + t.sum(dim=(2, 3)) + eps)).mean())


def test_dice_is_the_studys_soft_dice_averaged_over_batches():
    torch.manual_seed(0)
    empty = torch.sigmoid(torch.full((1, 1, 64, 64), -20.0))  # a confident empty prediction
    meter = SegmentationMeter()
    meter.update(empty, torch.zeros(1, 1, 64, 64))
    out = meter.compute()
    # an empty slice with an empty prediction scores about 0 in the study's Dice, ~1 in ours
    assert out["dice"] == pytest.approx(1e-6 / (4096 * float(empty[0, 0, 0, 0]) + 1e-6))
    assert out["dice"] < 0.11 and out["dice_s1"] > 0.99
    probs = torch.rand(3, 1, 16, 16)
    targets = (torch.rand(3, 1, 16, 16) > 0.7).float()
    meter = SegmentationMeter()
    meter.update(probs[:2], targets[:2])
    meter.update(probs[2:], targets[2:])  # a last batch of one weighs as much as the first
    want = (_study_dice(probs[:2], targets[:2]) + _study_dice(probs[2:], targets[2:])) / 2
    out = meter.compute()
    assert out["dice"] == pytest.approx(want, rel=1e-6)
    assert out["dice"] != pytest.approx(_study_dice(probs, targets), rel=1e-6)


def test_pooled_metrics_see_the_studys_clipped_probabilities():
    """Below 1e-7 every probability ties at 1e-7, as the study's np.clip makes them."""
    probs = torch.tensor([[[[0.9, 5e-8, 3e-8, 1e-9]]]])
    targets = torch.tensor([[[[1.0, 0.0, 1.0, 0.0]]]])
    meter = SegmentationMeter()
    meter.update(probs, targets)
    clipped = np.clip(probs.numpy().ravel(), 1e-7, 1 - 1e-7)
    assert clipped.dtype == np.float32
    raw = average_precision_score(targets.ravel(), probs.ravel())
    study = average_precision_score(targets.ravel(), clipped)
    assert raw != pytest.approx(study)
    assert meter.compute()["auprc"] == pytest.approx(study)
    unclipped = SegmentationMeter(clip=None)
    unclipped.update(probs, targets)
    assert unclipped.compute()["auprc"] == pytest.approx(raw)
