"""SegmentationMeter: an evaluation set, batch by batch -> every metric of docs/protocol.md.

It feeds each batch to the pooled pixel metrics (nvfp4bench.evaluation.pixel_metrics: AUPRC,
ROC-AUC, the study's ECE, logit mean and sd, probability entropy, soft scores, the study's soft
Dice and ours, confusion counts at 0.5) and keeps the hard slices bit-packed per
patient, which ``compute`` re-stacks into volumes for the per-patient metrics
(nvfp4bench.evaluation.volume_metrics: hard Dice, HD95, lesion recall). It returns all of them as a dict of
plain Python floats (``None``, i.e. JSON ``null``, where a value does not exist).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from nvfp4bench.evaluation.pixel_metrics import (DICE_SMOOTH, PROB_CLIP, STUDY_DICE_EPS, THRESHOLD,
                                                 PooledScores, confusion, dice_per_image,
                                                 scores_from_soft_counts, soft_counts)
from nvfp4bench.evaluation.volume_metrics import patient_metrics


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
        self._scores = PooledScores()
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
        self._scores.update(pooled, targets)
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
        logit_mean, logit_std = self._scores.logit_stats()
        out = {"auprc": self._scores.average_precision(), "roc_auc": self._scores.roc_auc(),
               **scores_from_soft_counts(self._tp, self._fp, self._fn),
               "ece": self._scores.expected_calibration_error(),
               "logit_mean": logit_mean, "logit_std": logit_std,
               "prob_entropy": self._scores.prob_entropy(),
               "distinct_probabilities": self._scores.distinct_scores(),
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
