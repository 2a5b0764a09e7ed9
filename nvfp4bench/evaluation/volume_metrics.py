"""Per-patient metrics on hard volumes: Dice, HD95, lesion-wise detection (beyond the study).

The hard (p >= 0.5) slices of one patient are stacked by slice position into a (Z, H, W) volume:
* hard Dice = 2 |A n B| / (|A| + |B|);
* HD95 = max(q95 of d(surface A -> surface B), q95 of d(surface B -> surface A)), the symmetric
  95th-percentile Hausdorff distance as MONAI computes it (the larger of the two directed 95th
  percentiles; MedPy's hd95 takes the 95th percentile of both directions pooled, never more).
  A surface voxel is a mask voxel with a
  face neighbour outside the mask (the volume border counts as outside). Distances are Euclidean
  (scipy.ndimage.distance_transform_edt), in mm when a voxel spacing is given, else in voxels;
* lesion-wise detection: lesions are the connected components of the target (full connectivity:
  26 neighbours in 3-D, 8 in 2-D); a lesion is *detected* when at least one predicted voxel lies
  inside it. Per patient: n_lesions, n_detected, recall = n_detected / n_lesions, and the predicted
  components that touch no lesion (n_false_positive_components).

EMPTY_MASK_POLICY (target = ground truth A, prediction = B)
-----------------------------------------------------------
======================  =========  ==================================  =============
case                    hard Dice  HD95                                lesion recall
======================  =========  ==================================  =============
A empty, B empty        1.0        0.0                                 null
A empty, B not empty    0.0        worst case: the volume's diagonal   null
A not empty, B empty    0.0        worst case: the volume's diagonal   0.0
both not empty          formula    formula                             formula
======================  =========  ==================================  =============

The worst case is sqrt(sum_i (n_i s_i)^2) for a volume of n_i voxels of spacing s_i along axis i
(BraTS's convention: 373.13 mm for 240 x 240 x 155 at 1 mm). A missed tumour or a tumour
hallucinated in a tumour-free patient is therefore a failure that counts in every mean, never a NaN
that silently drops out. Lesion recall is null for a patient without lesions (there is nothing to
detect; its false-positive components still count), and the pooled lesion recall is
sum(n_detected) / sum(n_lesions) over all patients (null when no patient has a lesion).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

PERCENTILE = 95.0        # HD95

EMPTY_MASK_POLICY = {
    "both_empty": {"dice": 1.0, "hd95": 0.0, "lesion_recall": None},
    "target_empty_prediction_not": {"dice": 0.0, "hd95": "volume diagonal", "lesion_recall": None},
    "prediction_empty_target_not": {"dice": 0.0, "hd95": "volume diagonal", "lesion_recall": 0.0},
}


# ----------------------------------------------------------------------------------------------
# hard masks: Dice, HD95, lesions (numpy; 2-D slices or 3-D volumes)


def _bool_pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred)
    target = np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target)
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} must have the same shape")
    return pred.astype(bool), target.astype(bool)


def hard_dice(pred, target) -> float:
    """2 |A n B| / (|A| + |B|) of two binary masks; 1.0 when both are empty (EMPTY_MASK_POLICY)."""
    pred, target = _bool_pair(pred, target)
    total = int(pred.sum()) + int(target.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & target).sum()) / total


def _sampling(spacing, ndim: int) -> tuple[float, ...]:
    """Voxel size per axis: None -> 1 (voxel units), a number -> isotropic, a sequence -> as is."""
    if spacing is None:
        return (1.0,) * ndim
    if isinstance(spacing, (int, float)):
        sampling = (float(spacing),) * ndim
    else:
        sampling = tuple(float(s) for s in spacing)
    if len(sampling) != ndim or not all(s > 0 for s in sampling):
        raise ValueError(f"spacing {spacing!r} must be None, a positive number or {ndim} positive "
                         "numbers (one per axis of the mask)")
    return sampling


def worst_case_distance(shape: Sequence[int], spacing=None) -> float:
    """The volume's diagonal sqrt(sum (n_i s_i)^2): HD95 of a missed or hallucinated tumour."""
    sampling = _sampling(spacing, len(shape))
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, sampling)))


def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a face neighbour outside the mask (outside the array counts as outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def hd95(pred, target, spacing=None) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the surfaces of two binary masks
    (2-D or 3-D), in the units of ``spacing`` (voxels when None). EMPTY_MASK_POLICY: 0.0 when both
    are empty, the volume's diagonal when exactly one is."""
    pred, target = _bool_pair(pred, target)
    sampling = _sampling(spacing, pred.ndim)
    has_pred, has_target = bool(pred.any()), bool(target.any())
    if not has_pred and not has_target:
        return 0.0
    if not (has_pred and has_target):
        return worst_case_distance(pred.shape, sampling)
    # Crop to the bounding box of both masks: every voxel outside it is background in both, so the
    # surfaces and the distances between them are unchanged, and the EDT runs on far fewer voxels.
    box = ndimage.find_objects((pred | target).astype(np.uint8))[0]
    pred, target = pred[box], target[box]
    surf_p, surf_t = _surface(pred), _surface(target)
    # distance_transform_edt(~S) gives each voxel's distance to the nearest voxel of S.
    d_pt = ndimage.distance_transform_edt(~surf_t, sampling=sampling)[surf_p]
    d_tp = ndimage.distance_transform_edt(~surf_p, sampling=sampling)[surf_t]
    return float(max(np.percentile(d_pt, PERCENTILE), np.percentile(d_tp, PERCENTILE)))


def lesion_recall(pred, target) -> dict:
    """Lesion-wise detection on binary masks (2-D or 3-D): lesions are the target's connected
    components (full connectivity), detected when >= 1 predicted voxel lies inside.

    Returns n_lesions, n_detected, recall (None without lesions), n_pred_components and
    n_false_positive_components (predicted components that touch no lesion)."""
    pred, target = _bool_pair(pred, target)
    structure = ndimage.generate_binary_structure(pred.ndim, pred.ndim)
    lesions, n_lesions = ndimage.label(target, structure=structure)
    components, n_components = ndimage.label(pred, structure=structure)
    n_detected = int(np.unique(lesions[pred & target]).size)
    n_touching = int(np.unique(components[pred & target]).size)
    return {"n_lesions": int(n_lesions), "n_detected": n_detected,
            "recall": None if n_lesions == 0 else n_detected / n_lesions,
            "n_pred_components": int(n_components),
            "n_false_positive_components": int(n_components) - n_touching}


def patient_metrics(pred, target, spacing=None) -> dict:
    """Hard Dice, HD95 and lesion detection of one patient's (Z, H, W) volume."""
    lesions = lesion_recall(pred, target)
    return {"dice": hard_dice(pred, target), "hd95": hd95(pred, target, spacing),
            "n_lesions": lesions["n_lesions"], "n_detected": lesions["n_detected"],
            "lesion_recall": lesions["recall"],
            "n_false_positive_components": lesions["n_false_positive_components"]}

