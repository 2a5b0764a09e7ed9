"""A synthetic BraTS-2021-layout dataset, simulated from a real brain template.

Template: the MNI152 2009c symmetric T1 and its grey/white matter probability maps, the files that
nilearn bundles (found with ``importlib.util.find_spec``; nilearn itself is never imported)::

    nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz

(197 x 233 x 189 at 1 mm, skull-stripped; block-averaged by floor(voxel_mm) when simulating on a
coarser grid). Without them a procedural ellipsoid brain is used and a
warning says so.

Patient i of seed s draws everything from ``np.random.default_rng([s, i])``:

1. Deformation: a random affine (scale 0.92-1.08 per axis, rotation up to 8 deg axial and 4 deg
   otherwise, shift up to 4 mm) plus a smooth displacement field (trilinear upsampling of N(0, 1)
   on a ~40 mm lattice, 2.5 mm amplitude) maps the output grid into the template; T1, GM and WM
   are sampled trilinearly. CSF = brain - GM - WM.
2. Tumours: 0 lesions with probability ``P_TUMOUR_FREE``, else 1-3. A lesion sits at a random
   white-matter voxel; a small lesion (``P_SMALL``) has radius 2-5 mm, else 8-22 mm. Its core is
   an ellipsoid with a noisy boundary, r_n = |D^-1 (p - c)| / (1 + 0.15 t) < 1 with t a smooth
   texture field: a necrotic centre (label 1, r_n < f, f ~ U(0.35, 0.7)) inside an enhancing rim
   (label 4); edema (label 2) grows from the core by geodesic dilation *inside white matter*
   (wm > 0.3, or r_n < 1.3 near the core) for 5-20 mm, so it follows the tracts.
3. Modalities: each voxel mixes the tissue intensities of the table ``TISSUE`` (WM, GM, CSF,
   necrosis, edema, enhancing; relative contrasts of T1, T1ce, T2 and FLAIR: enhancing bright on
   T1ce, edema bright on FLAIR and T2, CSF dark on FLAIR) with per-patient jitter (x U(0.9, 1.1));
   T1 also blends in the template's own T1 for realistic texture. Then a gamma (0.8-1.2), a smooth
   multiplicative bias field exp(0.15 b), Rician-like noise |x + sigma n|, sigma ~ U(0.01, 0.04),
   the skull-stripped mask (background exactly 0) and a random scanner scale (int16).
4. Written as BraTS 2021: ``BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz``,
   240 x 240 x 155 at 1 mm (``voxel_mm`` scales the grid, e.g. 2 mm -> 120 x 120 x 78), stored in
   BraTS' LPS-like orientation (affine diag(-v, -v, v)) so the reader's reorientation is exercised.

Generation is vectorised (torch trilinear sampling, cropped boxes per lesion, intensities on the
brain voxels only): about 2 s of CPU per 240 x 240 x 155 case (measured on the 2-core dev box). Deterministic: the same (seed, index, voxel_mm) gives the same
bytes.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from nvfp4bench.data.nifti import write_nifti

BRATS_SHAPE_MM = (240, 240, 155)  # (x, y, z) at 1 mm: BraTS 2021's grid
TEMPLATE_FILES = {k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
P_TUMOUR_FREE = 0.15
P_SMALL = 0.3
MODALITY_FILES = ("t1", "t1ce", "t2", "flair")
# Tissue intensities per modality (fractions of the template's WM T1 ~ 0.86):
#            WM    GM    CSF   necrosis edema enhancing
TISSUE = {
    "t1":    (0.86, 0.65, 0.27, 0.35, 0.55, 0.60),
    "t1ce":  (0.86, 0.65, 0.27, 0.30, 0.55, 1.25),
    "t2":    (0.45, 0.65, 1.00, 0.95, 0.85, 0.70),
    "flair": (0.55, 0.70, 0.12, 0.50, 1.00, 0.80),
}
LABEL_NECROSIS, LABEL_EDEMA, LABEL_ENHANCING = 1, 2, 4


def template_dir() -> Path | None:
    """nilearn's bundled-data folder when it holds the three MNI152 files, else None."""
    spec = importlib.util.find_spec("nilearn")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        d = Path(loc) / "datasets" / "data"
        if all((d / f).is_file() for f in TEMPLATE_FILES.values()):
            return d
    return None


def _procedural_template() -> dict:
    """An ellipsoid brain (WM core, GM shell, two ventricles) on the MNI grid, 1 mm."""
    x, y, z = (np.arange(n, dtype=np.float32).reshape([-1 if i == k else 1 for i in range(3)])
               for k, n in enumerate((197, 233, 189)))  # open grid: broadcasting, no meshgrid
    c = (98.0, 117.0, 77.0)

    def ell(a, b, d, off=(0, 0, 0)):
        return ((x - c[0] - off[0]) / a) ** 2 + ((y - c[1] - off[1]) / b) ** 2 + \
            ((z - c[2] - off[2]) / d) ** 2

    brain = np.clip((1.0 - ell(72, 90, 76)) * 8, 0, 1)
    wm = np.clip((1.0 - ell(56, 72, 58)) * 6, 0, 1) * brain
    vent = sum(np.clip((1.0 - ell(6, 22, 9, (s, 5, 10))) * 4, 0, 1) for s in (-9, 9))
    wm = wm * (1 - vent)
    gm = np.clip(brain - wm - vent, 0, 1)
    t1 = (0.86 * wm + 0.65 * gm + 0.27 * np.clip(brain - wm - gm, 0, 1)) * (brain > 0.5)
    return {"t1": t1, "gm": gm, "wm": wm}


@functools.lru_cache(maxsize=1)
def _template_1mm() -> tuple[dict, tuple, bool]:
    """(maps at 1 mm, brain bounding-box centre, procedural?) read once per process."""
    d = template_dir()
    if d is None:
        warnings.warn("nilearn's MNI152 template files were not found (pip install nilearn); "
                      "the synthetic dataset uses a procedural ellipsoid brain instead",
                      stacklevel=3)
        maps, procedural = _procedural_template(), True
    else:

        maps = {k: np.asarray(nib.as_closest_canonical(nib.load(str(d / f))).dataobj,
                              dtype=np.float32) / 255.0 for k, f in TEMPLATE_FILES.items()}
        procedural = False
    nz = np.nonzero(maps["t1"] > 0.05)
    centre = tuple((float(a.min()) + float(a.max())) / 2 for a in nz)
    return maps, centre, procedural


def block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """Mean over f x f x f blocks (the array cropped to multiples of f): a box anti-alias filter."""
    n = [s // f for s in a.shape]
    a = a[:n[0] * f, :n[1] * f, :n[2] * f]
    return a.reshape(n[0], f, n[1], f, n[2], f).mean(axis=(1, 3, 5), dtype=np.float32)


@functools.lru_cache(maxsize=4)
def load_template(voxel_mm: float = 1.0) -> dict:
    """{"t1", "gm", "wm": float32 maps in [0, 1]; "step": their voxel size in mm; "centre": the
    brain's bounding-box centre in 1 mm template voxels; "procedural": bool}.

    Sampled coarser than 1 mm, the maps are block-averaged by step = floor(voxel_mm) first (an
    anti-alias filter that also makes sampling cheaper).
    """
    maps, centre, procedural = _template_1mm()
    step = max(1, int(voxel_mm))
    if step > 1:
        maps = {k: block_mean(v, step) for k, v in maps.items()}
    return {**maps, "centre": centre, "step": step, "procedural": procedural}


def grid_shape(voxel_mm: float) -> tuple[int, int, int]:
    """The output grid (x, y, z) for a voxel size: (240, 240, 155) at 1 mm."""
    return tuple(int(round(n / voxel_mm)) for n in BRATS_SHAPE_MM)


def smooth_field(rng: np.random.Generator, shape, cell_vox: float, channels: int = 1) -> np.ndarray:
    """float32 (channels, *shape): N(0, 1) on a lattice of ``cell_vox`` voxels, trilinear upsampled."""
    coarse = [max(2, int(math.ceil(n / cell_vox)) + 1) for n in shape]
    z = torch.from_numpy(rng.standard_normal((1, channels, *coarse), dtype=np.float32))
    return F.interpolate(z, size=tuple(shape), mode="trilinear", align_corners=True)[0].numpy()


def _rotation(rng: np.random.Generator) -> np.ndarray:
    ax, ay = np.deg2rad(rng.uniform(-4, 4, 2))
    az = np.deg2rad(rng.uniform(-8, 8))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def deform_template(rng: np.random.Generator, tmpl: dict, shape, voxel_mm: float) -> np.ndarray:
    """float32 (3, *shape): T1, GM, WM of the template under a random smooth deformation."""
    m = _rotation(rng) @ np.diag(rng.uniform(0.92, 1.08, 3))
    shift = rng.uniform(-4, 4, 3)
    disp = 2.5 * smooth_field(rng, shape, 40.0 / voxel_mm, channels=3)
    q = [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * voxel_mm for n in shape]
    q = (q[0][:, None, None], q[1][None, :, None], q[2][None, None, :])
    src = torch.from_numpy(np.stack([tmpl["t1"], tmpl["gm"], tmpl["wm"]]))[None]  # (1,3,X,Y,Z)
    size = src.shape[2:]
    grid = np.empty((*shape, 3), dtype=np.float32)
    f = tmpl["step"]
    for k in range(3):  # template index along axis k; grid_sample wants (z, y, x) order, in [-1, 1]
        # position in 1 mm template voxels: centre + shift + disp + M q; in the block-averaged
        # maps (step f) block j covers 1 mm voxels f j .. f j + f - 1, centred at f j + (f - 1) / 2
        g = grid[..., 2 - k]
        np.add(disp[k], float(tmpl["centre"][k] + shift[k] - (f - 1) / 2), out=g)
        g += float(m[k, 0]) * q[0] + float(m[k, 1]) * q[1] + float(m[k, 2]) * q[2]  # small: 2-D
        g *= 2.0 / (f * (size[k] - 1))
        g -= 1.0
    out = F.grid_sample(src, torch.from_numpy(grid)[None], mode="bilinear", padding_mode="zeros",
                        align_corners=True)
    return out[0].numpy()


def _lesion(rng, seg, wm, brain, tex, voxel_mm) -> None:
    """Draw one lesion into ``seg`` in place (labels 1, 2, 4)."""
    cand = np.flatnonzero((wm > 0.5) & (seg == 0))
    if len(cand) == 0:
        return
    centre = np.array(np.unravel_index(cand[rng.integers(len(cand))], seg.shape))
    small = rng.random() < P_SMALL
    radius = rng.uniform(2, 5) if small else rng.uniform(8, 22)  # mm
    axes = radius * rng.uniform(0.75, 1.25, 3) / voxel_mm  # voxels
    edema_mm = rng.uniform(0, 6) if small else rng.uniform(5, 20)
    half = np.ceil(axes * 1.6 + edema_mm / voxel_mm + 2).astype(int)
    lo = np.maximum(centre - half, 0)
    hi = np.minimum(centre + half + 1, seg.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    d = [(np.arange(a, b) - c) / ax for a, b, c, ax in zip(lo, hi, centre, axes)]
    r = np.sqrt(d[0][:, None, None] ** 2 + d[1][None, :, None] ** 2 + d[2][None, None, :] ** 2)
    r_n = r / (1.0 + 0.15 * tex[box])
    inside = brain[box]
    core = (r_n < 1.0) & inside
    if not core.any():
        core[tuple(np.clip(centre - lo, 0, np.array(core.shape) - 1))] = inside.any()
    steps = int(round(edema_mm / voxel_mm))
    edema = core
    if steps > 0:
        allowed = ((wm[box] > 0.3) | (r_n < 1.3)) & inside
        edema = ndimage.binary_dilation(core, iterations=steps, mask=allowed)
    nec_frac = 0.0 if small or rng.random() < 0.2 else rng.uniform(0.35, 0.7)
    sub = seg[box]  # a view: writes go to seg
    sub[edema & (sub == 0)] = LABEL_EDEMA
    sub[core] = LABEL_ENHANCING
    sub[core & (r_n < nec_frac)] = LABEL_NECROSIS


def simulate_case(seed: int, index: int, voxel_mm: float = 1.0):
    """One synthetic patient -> ({modality: int16 (X, Y, Z) RAS}, seg uint8 (X, Y, Z), info dict).

    Deterministic in (seed, index, voxel_mm).
    """
    rng = np.random.default_rng([seed, index])
    tmpl = load_template(voxel_mm)
    shape = grid_shape(voxel_mm)
    t1_t, gm, wm = deform_template(rng, tmpl, shape, voxel_mm)
    brain = t1_t > 0.05
    wm = np.clip(wm, 0, 1) * brain  # full volume: the lesions need it in their boxes
    tex = smooth_field(rng, shape, 6.0 / voxel_mm)[0]

    seg = np.zeros(shape, dtype=np.uint8)
    n_lesions = 0 if rng.random() < P_TUMOUR_FREE else int(rng.choice([1, 2, 3], p=[0.55, 0.3, 0.15]))
    for _ in range(n_lesions):
        _lesion(rng, seg, wm, brain, tex, voxel_mm)

    bias = smooth_field(rng, shape, 80.0 / voxel_mm, channels=len(MODALITY_FILES))
    # intensities are computed on the brain voxels only (a vector, ~1/6 of the grid), then
    # scattered into a zero background
    at = np.flatnonzero(brain)
    wm_b, t1_b, seg_b, tex_b = (a.reshape(-1)[at] for a in (wm, t1_t, seg, tex))
    gm_b = np.clip(gm.reshape(-1)[at], 0, 1)
    csf_b = np.clip(1.0 - gm_b - wm_b, 0, 1)
    labels = (LABEL_NECROSIS, LABEL_EDEMA, LABEL_ENHANCING)
    lesion_w = {lab: (seg_b == lab).astype(np.float32) * (1.0 + 0.08 * tex_b) for lab in labels}
    healthy = (seg_b == 0).astype(np.float32)
    out = {}
    for c, mod in enumerate(MODALITY_FILES):
        # python floats keep every array op in float32 (numpy scalars would promote to float64)
        v = [float(a) for a in np.asarray(TISSUE[mod]) * rng.uniform(0.9, 1.1, 6)]
        x = v[0] * wm_b + v[1] * gm_b + v[2] * csf_b
        if mod == "t1":
            x = 0.5 * x + 0.5 * t1_b
        x *= healthy
        for lab, val in zip(labels, v[3:]):
            x += val * lesion_w[lab]
        np.maximum(x, 1e-6, out=x)
        gamma, sigma, scale = (float(a) for a in (rng.uniform(0.8, 1.2), rng.uniform(0.01, 0.04),
                                                     rng.uniform(400, 1500)))
        # x^gamma * exp(0.15 b) in one exp: exp(gamma log x + 0.15 b)
        x = np.exp(gamma * np.log(x) + 0.15 * bias[c].reshape(-1)[at])
        x += sigma * rng.standard_normal(len(at), dtype=np.float32)
        x = np.abs(x) * scale
        np.round(x, out=x)
        vol = np.zeros(shape, dtype=np.int16)
        vol.reshape(-1)[at] = np.maximum(x, 1)  # >= 1: the brain stays nonzero
        out[mod] = vol
    info = {"lesions": n_lesions, "tumour_voxels": int((seg > 0).sum()),
            "procedural_template": bool(tmpl["procedural"])}
    return out, seg, info


def brats_affine(voxel_mm: float, shape) -> np.ndarray:
    """BraTS' LPS-like affine: x and y flipped, origin so the grid's corner sits at (0, 239, 0)."""
    a = np.diag([-voxel_mm, -voxel_mm, voxel_mm, 1.0])
    a[1, 3] = (shape[1] - 1) * voxel_mm
    return a


def case_id(index: int) -> str:
    return f"BraTS2021_{index:05d}"


def write_case(root: str | Path, seed: int, index: int, *, voxel_mm: float = 1.0,
               compress: bool = True) -> Path:
    """Simulate patient ``index`` and write it as a BraTS 2021 case folder under ``root``."""
    images, seg, _ = simulate_case(seed, index, voxel_mm)
    cid = case_id(index)
    folder = Path(root) / cid
    folder.mkdir(parents=True, exist_ok=True)
    affine = brats_affine(voxel_mm, seg.shape)
    ext = ".nii.gz" if compress else ".nii"
    for name, data in [*images.items(), ("seg", seg)]:
        # RAS array -> BraTS storage order (x and y reversed), undone by as_closest_canonical
        write_nifti(folder / f"{cid}_{name}{ext}", np.ascontiguousarray(data[::-1, ::-1, :]), affine)
    return folder
