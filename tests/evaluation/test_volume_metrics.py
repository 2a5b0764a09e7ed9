"""Per-patient metrics: hard Dice and the empty-mask policy, HD95, lesion recall."""
import math

import numpy as np
import pytest

from nvfp4bench.evaluation import volume_metrics as V



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
