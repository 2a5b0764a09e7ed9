"""NIfTI reading with checks, and the one orientation rule of the package.

Every volume is reoriented to the closest canonical (RAS+) orientation with
``nib.as_closest_canonical`` and then laid out as axial slices in display orientation::

    canonical a[x, y, z]   (x: left->right, y: posterior->anterior, z: inferior->superior)
    slices    s[z, i, j] = a[j, Y-1-i, z]     (rows: anterior at the top; columns: x)

i.e. ``np.rot90`` of each axial slice, so a slice looks like a radiology viewer's axial view
(neurological left-right). Spacing follows the same order: (slice_mm, row_mm, col_mm) =
(sz, sy, sx).
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from nvfp4bench.data.errors import DataError


def to_slices(a: np.ndarray) -> np.ndarray:
    """Canonical (X, Y, Z[, C]) -> (Z, H=Y, W=X[, C]) axial slices, anterior at the top."""
    b = np.moveaxis(a, (0, 1, 2), (2, 1, 0))  # (Z, Y, X, ...)
    return b[:, ::-1]


def read_nifti(path: str | Path, *, case: str | None = None, ndim: int = 3):
    """Read one NIfTI file -> (slices float32 (Z, H, W[, C]), spacing (sz, sy, sx) in mm).

    Raises DataError (naming ``case`` and ``path``) when the file is unreadable or truncated,
    has the wrong number of dimensions, or holds NaN/inf values.
    """
    path = Path(path)
    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # nibabel raises many types (EOFError, zlib.error, ImageFileError...)
        raise DataError(f"unreadable or truncated NIfTI file ({type(e).__name__}: {e})",
                        case=case, file=path) from None
    if data.ndim == 4 and data.shape[3] == 1 and ndim == 3:
        data = data[..., 0]
    if data.ndim != ndim:
        raise DataError(f"expected a {ndim}-D volume, got shape {data.shape}", case=case, file=path)
    if not np.isfinite(data).all():
        raise DataError("volume holds NaN or infinite values", case=case, file=path)
    zooms = img.header.get_zooms()[:3]
    spacing = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
    return np.ascontiguousarray(to_slices(data)), spacing


def check_labels(seg: np.ndarray, labels: tuple[int, ...], *, case: str | None, file) -> np.ndarray:
    """Check a label volume holds only integer values of ``labels``; return it as uint8."""
    values = np.unique(seg)
    bad = [v for v in values.tolist() if v not in labels]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:8]) + (" ..." if len(bad) > 8 else "")
        raise DataError(f"label values {shown} outside the dataset's set {list(labels)}",
                        case=case, file=file)
    return seg.astype(np.uint8)


def write_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write one NIfTI volume (the dtype of ``data`` is kept)."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
