"""One case -> the slices the store keeps: normalise, select, resize, quantise to uint8.

Intensity rule (per case, per modality c, over its brain voxels B_c = {v : x_c(v) != 0})::

    z = (x - mean_B(x)) / std_B(x)                 z-score over the brain (nonzero) voxels
    u = clip((z - Z_LO) / (Z_HI - Z_LO), 0, 1)     on B_c;  u = 0 outside the brain
    stored = round(255 * u)  (uint8)               Z_LO, Z_HI = -3, 3: mean brain -> 0.5

so stored images are in [0, 1] after dividing by 255 and the Dataset applies ImageNet mean/std on
top, as the study does on its 3-channel [0, 1] images.

Slice rule (``SliceRule``), on the axial slices of the case at its own resolution:

- ``brain``: keep slice z when its brain area (pixels where any modality is nonzero) is at least
  ``min_brain`` x the case's largest brain area, then every ``stride``-th of those (starting with
  the first kept slice). Default for BraTS and MSD.
- ``tumour``: every slice with tumour, plus tumour-free brain slices (the ``brain`` rule) evenly
  spaced, ``free_ratio`` x as many as the tumour slices (at least 1 when the case has brain
  slices); a tumour-free case gets the ``brain`` rule.
- ``all``: every slice (default for LGG, as in the study).

Spacing recorded per patient: ``spacing`` = (slice_gap x slice_mm, row_mm, col_mm) is the voxel
size of the volume re-stacked *contiguously* from the kept slices (what per-patient metrics
build), with row/col scaled by the resize; slice_gap is the most common z step between kept
slices (``uniform_gap`` says whether all steps equal it; with the ``tumour`` rule they may not).
``voxel_spacing`` keeps the file's own (slice, row, col) mm.

Resize to ``size`` x ``size``: bilinear with antialiasing for images, nearest(-exact) for masks
(the whole-tumour target, labels > 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from nvfp4bench.data.errors import DataError
from nvfp4bench.data.sources import Volume

Z_LO, Z_HI = -3.0, 3.0
SLICE_MODES = ("brain", "tumour", "all")


@dataclass(frozen=True)
class SliceRule:
    """Which axial slices of a case the store keeps (see the module docstring)."""

    mode: str = "brain"
    min_brain: float = 0.25
    stride: int = 1
    free_ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in SLICE_MODES:
            raise ValueError(f"slice mode must be one of {SLICE_MODES}, got {self.mode!r}")
        if self.stride < 1:
            raise ValueError(f"slice stride must be >= 1, got {self.stride}")
        if not 0.0 <= self.min_brain <= 1.0:
            raise ValueError(f"min_brain must be in [0, 1], got {self.min_brain}")


@dataclass
class CaseSlices:
    """What one case adds to the store."""

    case_id: str
    images: np.ndarray  # uint8 (S, C, size, size)
    masks: np.ndarray  # uint8 (S, size, size) in {0, 1}
    positions: np.ndarray  # int32 (S,) axial index z in the case's canonical volume
    tumour_voxels: int  # whole-tumour voxels of the full volume (the burden used by the folds)
    tumour_ml: float | None  # the same in millilitres (None without spacing)
    depth: int  # number of axial slices in the volume
    shape: tuple[int, int]  # in-plane shape before resizing
    spacing: tuple[float, float, float] | None  # (slice, row, col) mm of the re-stacked slices
    voxel_spacing: tuple[float, float, float] | None = None  # (slice, row, col) mm, as read
    slice_gap: int = 1  # most common z step between kept slices (spacing[0] = gap x slice mm)
    uniform_gap: bool = True  # every step equals slice_gap


def normalise(image: np.ndarray) -> np.ndarray:
    """float32 (C, ...) raw -> float32 (C, ...) in [0, 1], per modality over its nonzero voxels:
    z = (x - mean) / std, u = clip((z + 3) / 6, 0, 1), 0 outside the brain (MRI volumes)."""
    out = np.zeros_like(image, dtype=np.float32)
    for c in range(image.shape[0]):
        x = image[c]
        brain = x != 0
        v = x[brain].astype(np.float64)
        mean, std = v.mean(), v.std()
        z = (x[brain] - mean) / (std if std > 0 else 1.0)
        out[c][brain] = np.clip((z - Z_LO) / (Z_HI - Z_LO), 0.0, 1.0)
    return out


def rgb_unit(image: np.ndarray) -> np.ndarray:
    """8-bit RGB slices (the study's LGG .tif) -> u = x / 255, as the study feeds them (its only
    normalisation is ImageNet's mean / std, which the Dataset applies)."""
    return image.astype(np.float32) / 255.0


# How raw intensities become u in [0, 1], by each source's ``intensity`` attribute.
INTENSITY_RULES = {
    "zscore": (normalise, "per case and modality: z-score over nonzero voxels, "
                          "u = clip((z + 3) / 6, 0, 1), 0 outside; uint8 = round(255 u)"),
    "rgb": (rgb_unit, "u = x / 255 (8-bit RGB slices, as the study); uint8 = round(255 u)"),
}


def _evenly(idx: np.ndarray, k: int) -> np.ndarray:
    """k elements of idx, evenly spaced (deterministic)."""
    if k >= len(idx):
        return idx
    return idx[np.round(np.linspace(0, len(idx) - 1, k)).astype(int)]


def select_slices(brain_area: np.ndarray, tumour_area: np.ndarray, rule: SliceRule) -> np.ndarray:
    """Axial indices to keep, sorted, from per-slice brain and tumour pixel counts (see module)."""
    depth = len(brain_area)
    if rule.mode == "all":
        return np.arange(depth)
    top = brain_area.max() if depth else 0
    brain = np.flatnonzero((brain_area > 0) & (brain_area >= rule.min_brain * top))
    by_brain = brain[::rule.stride]
    if rule.mode == "brain":
        return by_brain
    tumour = np.flatnonzero(tumour_area > 0)
    if len(tumour) == 0:
        return by_brain
    free = np.setdiff1d(brain, tumour)
    k = max(1, int(round(rule.free_ratio * len(tumour)))) if len(free) else 0
    return np.union1d(tumour, _evenly(free, k))


def resize(images: np.ndarray, masks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(S, C, H, W) float in [0, 1], (S, H, W) {0, 1} -> uint8 (S, C, size, size), (S, size, size)."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    m = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))[:, None]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)
        m = F.interpolate(m, size=(size, size), mode="nearest-exact")
    img = torch.round(x.clamp(0, 1) * 255).to(torch.uint8).numpy()
    return img, m[:, 0].to(torch.uint8).numpy()


def process_volume(vol: Volume, *, size: int, rule: SliceRule,
                   intensity: str = "zscore") -> CaseSlices:
    """Normalise (``INTENSITY_RULES[intensity]``), select and resize one loaded case."""
    if vol.image.shape[1:] != vol.labels.shape:
        raise DataError(f"image {vol.image.shape[1:]} and mask {vol.labels.shape} shapes differ",
                        case=vol.case_id)
    tumour = vol.labels > 0
    brain = (vol.image != 0).any(axis=0)
    keep = select_slices(brain.sum(axis=(1, 2)), tumour.sum(axis=(1, 2)), rule)
    if len(keep) == 0:
        raise DataError("no slice passes the slice rule (empty brain?)", case=vol.case_id)
    unit = INTENSITY_RULES[intensity][0](vol.image)[:, keep]  # whole-volume statistics, then select
    images, masks = resize(unit.transpose(1, 0, 2, 3), tumour[keep], size)
    depth, h, w = vol.labels.shape
    n_tumour = int(tumour.sum())
    steps = np.diff(keep)
    gap = int(np.bincount(steps).argmax()) if len(steps) else 1
    spacing = ml = None
    if vol.spacing is not None:
        sz, sy, sx = vol.spacing
        spacing = (sz * gap, sy * h / size, sx * w / size)
        ml = n_tumour * sz * sy * sx / 1000.0
    return CaseSlices(vol.case_id, images, masks, keep.astype(np.int32), n_tumour, ml, depth,
                      (h, w), spacing, vol.spacing, gap, bool((steps == gap).all()))
