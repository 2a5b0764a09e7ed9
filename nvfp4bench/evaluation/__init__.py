"""Metrics of a trained cell.

    pixel_metrics.py   pooled pixel metrics: AUPRC, soft scores, soft Dice, confusion counts
    volume_metrics.py  per patient: hard Dice, HD95, lesion recall, the empty-mask policy
    meter.py           SegmentationMeter: accumulates both over an evaluation pass
    diagnostics.py     attention discretization, gradient fidelity, SQNR of a quantized model
"""
