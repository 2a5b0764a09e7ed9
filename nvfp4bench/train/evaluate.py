"""Evaluation of a cell: the per-epoch validation, the test metrics, the diagnostics.

``validate`` (every epoch) gives the validation loss, the study's mean over batches of each
batch's mean loss, and the pooled pixel metrics (``VAL_METRICS``); ``evaluate`` (the best
checkpoint, val and test) gives every metric of docs/protocol.md
(nvfp4bench.evaluation.meter.SegmentationMeter) with the per-patient rows, HD95 in mm when the patients
share one voxel spacing (``voxel_spacing``); ``measure_diagnostics`` runs nvfp4bench.evaluation.diagnostics
on a validation batch.
Probabilities are the sigmoid of the fp32 logits, unclamped (``_probs``).
"""
from __future__ import annotations

import math

import torch

from nvfp4bench.evaluation.diagnostics import measure
from nvfp4bench.evaluation.meter import SegmentationMeter
from nvfp4bench.train.loop import NonFiniteError
from nvfp4bench.train.setup import CellRun

# pooled pixel metrics recorded every epoch (SegmentationMeter keys)
VAL_METRICS = ("auprc", "dice", "recall", "precision", "f2", "iou")


def _probs(logits: torch.Tensor) -> torch.Tensor:
    """sigmoid of the fp32 logits, unclamped as the study's evaluation (its soft Dice sees them)."""
    return torch.sigmoid(logits.float())


@torch.no_grad()
def _predict(model, loader, meter, cell: CellRun, loss_fn=None) -> tuple[float | None, bool]:
    """Feed every batch's probabilities to ``meter`` -> (the mean over batches of each batch's
    mean loss when asked (the study's average), whether every output was finite). A batch with
    non-finite outputs is not metered: its loss is NaN, so the caller knows."""
    model.eval()
    batch_losses, finite = [], True
    for images, masks, index in loader:
        images = images.to(cell.device)
        with cell.run_context():
            logits = model(images)
        if loss_fn is not None:
            batch_losses.append(float(loss_fn(logits.float(), masks.to(cell.device))))
        probs = _probs(logits).cpu()
        if not torch.isfinite(probs).all():
            finite = False
            continue
        meter.update(probs, masks, index)
    loss = sum(batch_losses) / len(batch_losses) if loss_fn is not None else None
    return loss, finite


def validate(model, loader, loss_fn, cell: CellRun, epoch: int) -> dict:
    """The per-epoch validation: loss (the study's mean of per-batch means) and the pooled pixel
    metrics (AUPRC, soft recall / precision / F2 / IoU, soft Dice per image), no per-patient ones.
    A non-finite loss is NaN here (the epoch does not improve, as in the study) and its metrics
    are None."""
    meter = SegmentationMeter(patient_metrics=False)
    loss, finite = _predict(model, loader, meter, cell, loss_fn)
    if not (finite and math.isfinite(loss)):
        return {"loss": math.nan, **{k: None for k in VAL_METRICS}}
    m = meter.compute()
    return {"loss": loss, **{k: m[k] for k in VAL_METRICS}}


def voxel_spacing(cell: CellRun, patients) -> tuple[float, float, float] | None:
    """(slice, row, col) mm of the evaluated volumes when all ``patients`` share one spacing in
    the store, in-plane scaled by --image-size; None otherwise (HD95 is then in voxels)."""
    found = {tuple(cell.store.record(p).get("spacing") or ()) for p in patients}
    if len(found) != 1 or len(next(iter(found))) != 3:
        return None
    sz, sy, sx = (float(v) for v in found.pop())
    factor = float(cell.store.image_size) / float(cell.config.image_size)
    return (sz, sy * factor, sx * factor)


def evaluate(model, loader, cell: CellRun, part: str) -> dict:
    """Every metric of docs/protocol.md on one partition (nvfp4bench.evaluation.meter.SegmentationMeter),
    plus the per-patient rows and the spacing HD95 is measured in."""
    spacing = voxel_spacing(cell, cell.split[part])
    meter = SegmentationMeter(store=cell.store, spacing=spacing)
    _, finite = _predict(model, loader, meter, cell)
    if not finite:
        raise NonFiniteError(f"the best checkpoint's outputs on the {part} set are not finite")
    rows = meter.per_patient()
    return {**meter.compute(rows), "hd95_unit": "voxel" if spacing is None else "mm",
            "spacing": spacing, "per_patient": rows}


def measure_diagnostics(model, loader, loss_fn, cell: CellRun) -> dict | None:
    """diagnostics.measure on the first validation batch with tumour; None if not available."""
    images, masks = None, None
    for x, y, _ in loader:
        if images is None or y.any():
            images, masks = x, y
        if y.any():
            break
    try:
        with cell.run_context():
            out = measure(model, images.to(cell.device), masks.to(cell.device), loss_fn,
                          cell.recipe)
        return _finite_or_none(out)
    except Exception as e:  # a diagnostic must not sink a trained cell: record why it is missing
        return {"error": f"{type(e).__name__}: {e}"}


def _finite_or_none(obj):
    """Diagnostics with NaN / inf replaced by None (a ratio of zeros is 'undefined', not 0)."""
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj

