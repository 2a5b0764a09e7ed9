"""SegmentationMeter: the one-shot functions over an evaluation set, the study's Dice."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from nvfp4bench.evaluation import pixel_metrics as M
from nvfp4bench.evaluation import volume_metrics as V
from nvfp4bench.evaluation.meter import SegmentationMeter



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
