"""Segmentation metrics of the study, and the per-patient metrics that go beyond it.

Every metric is a small pure function of probabilities ``p`` in [0, 1] and binary targets ``t``;
:class:`SegmentationMeter` accumulates batches of an evaluation set and returns all of them as a
dict of plain Python floats (``None``, i.e. JSON ``null``, where a value does not exist).

The study's metrics, pooled over every pixel of the evaluation set
------------------------------------------------------------------
* AUPRC = average precision, exactly scikit-learn's ``average_precision_score`` (ties included)::

      AP = sum_n (R_n - R_{n-1}) * P_n

  over the distinct score values s_n taken as thresholds (prediction positive when p >= s_n), with
  P_n = TP(>= s_n) / (TP(>= s_n) + FP(>= s_n)) and R_n = TP(>= s_n) / #positives. Only thresholds
  that hold at least one positive pixel move R, so AP = sum_v  c_pos(v) / #pos * P(v)  over the
  distinct scores v of positive pixels. :class:`AveragePrecision` streams it exactly (see there).
* Soft scores from probabilities, no threshold:
  TP = sum p t, FP = sum p (1 - t), FN = sum (1 - p) t;
  recall = TP / (TP + FN), precision = TP / (TP + FP),
  F2 = 5 TP / (5 TP + 4 FN + FP) (= 5 P R / (4 P + R)), IoU = TP / (TP + FP + FN).
  As the study does, these pooled scores and AUPRC see the probabilities clipped to
  [1e-7, 1 - 1e-7] in float32 (``PROB_CLIP``): every pixel below 1e-7 ties at 1e-7 for AUPRC.
* ``dice``, the study's soft Dice: per image (2 sum p t + eps) / (sum p + sum t + eps) with
  eps = 1e-6 on the unclipped probabilities, averaged as the study averages it: the mean over the
  evaluation batches (one ``update`` call each; batch 32, in store order) of each batch's mean.
  A tumour-free slice with (near-)empty prediction mass m scores eps / (m + eps), about 0 (e.g.
  m = 4096 pixels x sigmoid(-20) = 8.4e-6 gives 0.11), not 1.
* ``dice_s1``, ours: the same per-image formula with smoothing s = 1 (one pixel), averaged over
  images, so a tumour-free slice with empty prediction scores ~1 and predicted mass m scores
  1 / (m + 1).
* Confusion counts at threshold 0.5: a pixel is predicted positive when p >= 0.5 (logit >= 0).

Beyond the study: per patient, on the re-stacked volume
-------------------------------------------------------
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
Both soft Dice scores are defined for every image (see above for the empty target).
With s = 0, an image where both sum p and sum t are 0 scores 1.0 (the table's first row).
Pooled soft scores whose denominator is 0 (e.g. recall of a set without a positive pixel) and
AUPRC of a set without a positive pixel are null. (scikit-learn returns 0.0 there, with a warning.)
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

THRESHOLD = 0.5          # hard prediction: p >= THRESHOLD
DICE_SMOOTH = 1.0        # our soft Dice (dice_s1) smoothing s, in pixels
STUDY_DICE_EPS = 1e-6    # the study's soft Dice smoothing (common/loss.py dice_coef_metric)
PROB_CLIP = 1e-7         # the study clips probabilities to [c, 1 - c] before the pooled metrics
PERCENTILE = 95.0        # HD95
# AveragePrecision merges its per-batch tables once they hold more entries than this (or than the
# merged table): amortised O(N log N), and a bounded number of small tensors in flight.
_MERGE_MIN_ENTRIES = 1 << 22

EMPTY_MASK_POLICY = {
    "both_empty": {"dice": 1.0, "hd95": 0.0, "lesion_recall": None},
    "target_empty_prediction_not": {"dice": 0.0, "hd95": "volume diagonal", "lesion_recall": None},
    "prediction_empty_target_not": {"dice": 0.0, "hd95": "volume diagonal", "lesion_recall": 0.0},
}


# ----------------------------------------------------------------------------------------------
# input checks


def _flat_pair(probs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs fp32 flat, targets bool flat), after checking shapes, ranges and binariness."""
    probs, targets = torch.as_tensor(probs), torch.as_tensor(targets)
    if probs.shape != targets.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and targets {tuple(targets.shape)} must have "
                         "the same shape")
    p = probs.detach().reshape(-1).to(torch.float32)
    if p.numel() and (torch.isnan(p).any() or p.min() < 0 or p.max() > 1):
        raise ValueError("probs must be probabilities in [0, 1] without NaN (apply torch.sigmoid "
                         "to logits, or use SegmentationMeter(from_logits=True))")
    t = targets.detach().reshape(-1)
    if t.dtype != torch.bool:
        if t.numel() and not ((t == 0) | (t == 1)).all():
            raise ValueError("targets must be binary (0/1 or bool)")
        t = t != 0
    return p, t.to(p.device)


def _per_image(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, pixels)."""
    if x.dim() < 2:
        raise ValueError(f"expected a batch (B, ...) of images, got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


# ----------------------------------------------------------------------------------------------
# AUPRC


class _CountTable:
    """Exact histogram of float32 values: sorted unique ``keys`` with int64 ``counts``.

    Each batch is reduced with ``torch.unique(return_counts=True)`` (exact: keys are the float32
    values themselves), kept pending, and merged into the table (concatenate, unique, index_add of
    the counts) once the pending entries outnumber the table. Memory: 12 bytes per distinct value
    (4 key + 8 count), about 3x that transiently while merging.
    """

    def __init__(self) -> None:
        self.keys = torch.empty(0, dtype=torch.float32)
        self.counts = torch.empty(0, dtype=torch.int64)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_entries = 0

    def add(self, values: torch.Tensor) -> None:
        if values.numel() == 0:
            return
        keys, counts = torch.unique(values, sorted=True, return_counts=True)
        self._pending.append((keys.cpu(), counts.cpu().to(torch.int64)))
        self._pending_entries += keys.numel()
        if self._pending_entries > max(self.keys.numel(), _MERGE_MIN_ENTRIES):
            self.merge()

    def merge(self) -> None:
        if not self._pending:
            return
        keys = torch.cat([self.keys] + [k for k, _ in self._pending])
        counts = torch.cat([self.counts] + [c for _, c in self._pending])
        self._pending, self._pending_entries = [], 0
        self.keys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
        self.counts = torch.zeros(self.keys.numel(), dtype=torch.int64)
        self.counts.index_add_(0, inverse, counts)

    def total(self) -> int:
        return int(self.counts.sum()) + sum(int(c.sum()) for _, c in self._pending)


class AveragePrecision:
    """Streaming, exact average precision (== sklearn ``average_precision_score``).

    Keeps one exact histogram of the scores of positive pixels and one of negative pixels
    (:class:`_CountTable`). At ``compute``, for every distinct positive score v (descending):
    TP(>= v) is a suffix sum of the positive counts, FP(>= v) = #neg - #neg(< v) by a
    ``searchsorted`` into the negative keys, and AP = sum_v c_pos(v) P(v) / #pos in float64.
    Scores are compared as float32 (the dtype of sigmoid outputs): values that differ only beyond
    float32 precision tie, exactly as sklearn sees a float32 score array.
    Memory is 12 bytes per distinct score of each class: at most ~3 GB for a 260M-pixel set of
    all-distinct scores, and far less in practice (sigmoid outputs saturate and repeat).
    """

    def __init__(self) -> None:
        self._pos = _CountTable()
        self._neg = _CountTable()

    def update(self, probs: torch.Tensor, targets: torch.Tensor) -> None:
        p, t = _flat_pair(probs, targets)
        self._pos.add(p[t])
        self._neg.add(p[~t])

    def compute(self) -> float | None:
        """AP, or None when no positive pixel was seen."""
        self._pos.merge()
        self._neg.merge()
        n_pos = int(self._pos.counts.sum())
        if n_pos == 0:
            return None
        pos_keys, pos_counts = self._pos.keys.flip(0), self._pos.counts.flip(0)  # descending
        tp = torch.cumsum(pos_counts, 0)                                        # TP(>= v)
        zero = torch.zeros(1, dtype=torch.int64)
        neg_below = torch.cat([zero, torch.cumsum(self._neg.counts, 0)])  # #neg(< key_i)
        n_neg = int(neg_below[-1])
        fp = n_neg - neg_below[torch.searchsorted(self._neg.keys, pos_keys, side="left")]
        precision = tp.double() / (tp + fp).double()
        return float((pos_counts.double() * precision).sum() / n_pos)


def average_precision(probs: torch.Tensor, targets: torch.Tensor) -> float | None:
    """AUPRC pooled over every element; equals sklearn's ``average_precision_score`` (ties
    included). None when ``targets`` holds no positive (sklearn returns 0.0 with a warning)."""
    ap = AveragePrecision()
    ap.update(probs, targets)
    return ap.compute()


# ----------------------------------------------------------------------------------------------
# soft scores, soft Dice, confusion


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else float(num / den)


def scores_from_soft_counts(tp: float, fp: float, fn: float) -> dict[str, float | None]:
    """recall, precision, F2, IoU from (soft) counts; None where the denominator is 0."""
    return {"recall": _ratio(tp, tp + fn), "precision": _ratio(tp, tp + fp),
            "f2": _ratio(5 * tp, 5 * tp + 4 * fn + fp), "iou": _ratio(tp, tp + fp + fn)}


def soft_counts(probs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, float]:
    """Soft (TP, FP, FN) = (sum p t, sum p (1 - t), sum (1 - p) t), summed in float64."""
    p, t = _flat_pair(probs, targets)
    p, t = p.double(), t.double()
    return float((p * t).sum()), float((p * (1 - t)).sum()), float(((1 - p) * t).sum())


def soft_scores(probs: torch.Tensor, targets: torch.Tensor) -> dict[str, float | None]:
    """Pooled soft recall, precision, F2 and IoU (see the module docstring)."""
    return scores_from_soft_counts(*soft_counts(probs, targets))


def dice_per_image(probs: torch.Tensor, targets: torch.Tensor,
                   smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Soft Dice of each image of a batch (B, ...): (2 sum p t + s) / (sum p + sum t + s), float64
    (B,). With smooth = 0 an image with sum p + sum t = 0 scores 1.0 (EMPTY_MASK_POLICY)."""
    if smooth < 0:
        raise ValueError(f"smooth must be >= 0, got {smooth}")
    _flat_pair(probs, targets)  # checks
    p = _per_image(torch.as_tensor(probs).detach().double())
    t = _per_image(torch.as_tensor(targets).detach().to(p.device).double())
    inter, total = (p * t).sum(1), p.sum(1) + t.sum(1)
    dice = (2 * inter + smooth) / (total + smooth)
    return torch.where(total + smooth == 0, torch.ones_like(dice), dice)


def confusion(probs: torch.Tensor, targets: torch.Tensor,
              threshold: float = THRESHOLD) -> dict[str, int]:
    """Counts tp, fp, fn, tn (ints) of the hard prediction p >= threshold."""
    p, t = _flat_pair(probs, targets)
    pred = p >= threshold
    tp, fp, fn = int((pred & t).sum()), int((pred & ~t).sum()), int((~pred & t).sum())
    return {"tp": tp, "fp": fp, "fn": fn, "tn": p.numel() - tp - fp - fn}


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


# ----------------------------------------------------------------------------------------------
# the meter the training loop uses


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


class SegmentationMeter:
    """Accumulates an evaluation set batch by batch and returns every metric of docs/protocol.md.

    meter = SegmentationMeter(from_logits=True, store=store, spacing=None)
    for images, masks, indices in loader:
        meter.update(model(images), masks, indices)
    metrics = meter.compute()   # dict of plain floats / ints, None where undefined

    Per-patient metrics need each slice's patient and slice position: either pass ``store`` (any
    object with ``patient_of(i)`` and ``slice_position(i)``, e.g. a SliceStore) and the slice
    ``indices`` to ``update``, or pass ``patients`` and ``positions`` to ``update`` directly.
    Without either (or with ``patient_metrics=False``) the per-patient keys are None.
    ``spacing`` is the voxel size of the arrays given to ``update`` ((z, y, x) in mm, or one
    number): HD95 is in mm with it, in voxels without. Hard slices are kept bit-packed
    (2 bits per pixel: prediction and target) until ``compute``.
    """

    def __init__(self, *, from_logits: bool = False, threshold: float = THRESHOLD,
                 dice_smooth: float = DICE_SMOOTH, store=None, spacing=None,
                 patient_metrics: bool = True, clip: float | None = PROB_CLIP) -> None:
        self.from_logits, self.threshold, self.dice_smooth = from_logits, threshold, dice_smooth
        self.clip = clip
        self.store, self.spacing, self.patient_metrics = store, spacing, patient_metrics
        self._ap = AveragePrecision()
        self._tp = self._fp = self._fn = 0.0
        self._dice_sum, self._n_images = 0.0, 0
        self._study_dice_batches: list[float] = []
        self._conf = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
        self._slices: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        self._slice_shape: tuple[int, ...] | None = None

    def update(self, outputs: torch.Tensor, targets: torch.Tensor, indices=None, *,
               patients: Sequence[str] | None = None,
               positions: Sequence[int] | None = None) -> None:
        """outputs and targets (B, 1, H, W) or (B, H, W); indices: the store's slice indices."""
        outputs = torch.as_tensor(outputs).detach().float()
        targets = torch.as_tensor(targets).detach().to(outputs.device)
        if outputs.dim() == 4 and outputs.shape[1] == 1:
            outputs = outputs[:, 0]
        if targets.dim() == 4 and targets.shape[1] == 1:
            targets = targets[:, 0]
        if outputs.dim() != 3:
            raise ValueError("outputs must be (B, 1, H, W) or (B, H, W), got "
                             f"{tuple(outputs.shape)}")
        probs = torch.sigmoid(outputs) if self.from_logits else outputs
        pooled = probs if self.clip is None else probs.clamp(self.clip, 1 - self.clip)
        self._ap.update(pooled, targets)
        tp, fp, fn = soft_counts(pooled, targets)
        self._tp, self._fp, self._fn = self._tp + tp, self._fp + fp, self._fn + fn
        dice = dice_per_image(probs, targets, self.dice_smooth)
        self._dice_sum += float(dice.sum())
        self._n_images += dice.numel()
        if dice.numel():
            study = dice_per_image(probs, targets, STUDY_DICE_EPS)
            self._study_dice_batches.append(float(study.mean()))
        for key, value in confusion(probs, targets, self.threshold).items():
            self._conf[key] += value
        if self.patient_metrics:
            self._keep_slices(probs >= self.threshold, targets != 0, indices, patients, positions)

    def _keep_slices(self, pred, target, indices, patients, positions) -> None:
        if patients is None and indices is not None and self.store is not None:
            idx = [int(i) for i in torch.as_tensor(indices).reshape(-1).tolist()]
            patients = [self.store.patient_of(i) for i in idx]
            positions = [int(self.store.slice_position(i)) for i in idx]
        if patients is None:
            return
        if positions is None or len(patients) != pred.shape[0] or len(positions) != pred.shape[0]:
            raise ValueError("update needs one patient id and one slice position per image")
        shape = tuple(pred.shape[1:])
        if self._slice_shape not in (None, shape):
            raise ValueError(f"slice shape {shape} differs from earlier batches' "
                             f"{self._slice_shape}")
        self._slice_shape = shape
        pred, target = pred.cpu().numpy(), target.cpu().numpy()
        for b, (patient, position) in enumerate(zip(patients, positions)):
            slices = self._slices.setdefault(str(patient), {})
            if int(position) in slices:
                raise ValueError(f"slice position {position} of patient {patient} seen twice")
            slices[int(position)] = (np.packbits(pred[b]), np.packbits(target[b]))

    def volumes(self):
        """Yield (patient, pred (Z, H, W) bool, target (Z, H, W) bool), slices sorted by position
        and stacked contiguously."""
        size = int(np.prod(self._slice_shape)) if self._slice_shape else 0

        def unpack(bits: np.ndarray) -> np.ndarray:
            return np.unpackbits(bits, count=size).reshape(self._slice_shape).astype(bool)

        for patient in sorted(self._slices):
            slices = self._slices[patient]
            order = sorted(slices)
            pred = np.stack([unpack(slices[z][0]) for z in order])
            target = np.stack([unpack(slices[z][1]) for z in order])
            yield patient, pred, target

    def per_patient(self) -> list[dict]:
        """One dict per patient: patient, n_slices, dice, hd95, lesion counts and recall."""
        return [{"patient": patient, "n_slices": int(pred.shape[0]),
                 **patient_metrics(pred, target, self.spacing)}
                for patient, pred, target in self.volumes()]

    def compute(self, patients: list[dict] | None = None) -> dict:
        """Every metric as plain Python floats / ints (None where undefined).

        ``patients``: the rows of ``per_patient()`` when the caller already has them (they cost a
        distance transform and a labelling per patient); computed here otherwise."""
        n_pixels = sum(self._conf.values())
        out = {"auprc": self._ap.compute(), **scores_from_soft_counts(self._tp, self._fp, self._fn),
               "dice": _mean(self._study_dice_batches),
               "dice_s1": self._dice_sum / self._n_images if self._n_images else None,
               **self._conf, "n_pixels": n_pixels, "n_images": self._n_images,
               "prevalence": (self._conf["tp"] + self._conf["fn"]) / n_pixels if n_pixels else None}
        if patients is None:
            patients = self.per_patient() if self._slices else []
        n_lesions = sum(p["n_lesions"] for p in patients)
        n_detected = sum(p["n_detected"] for p in patients)
        out.update({
            "n_patients": len(patients),
            "patient_dice_mean": _mean([p["dice"] for p in patients]),
            "hd95_mean": _mean([p["hd95"] for p in patients]),
            "lesion_recall": n_detected / n_lesions if n_lesions else None,
            "n_lesions": n_lesions,
            "n_false_positive_components": sum(p["n_false_positive_components"] for p in patients),
        })
        return out
