"""Readers of the raw datasets: find the cases under a directory, load one case as a Volume.

A *source* is a small object with ``discover(root) -> list[Case]`` and
``load(case, modalities) -> Volume``; ``SOURCES`` maps the ``--source`` names to them.
Every reader yields the same thing, so the rest of the pipeline does not know where a case
came from:

    Volume.image   float32 (C, Z, H, W)  raw intensities of the requested modalities, in order
    Volume.labels  uint8   (Z, H, W)     the dataset's labels (whole tumour = labels > 0)
    Volume.spacing (slice_mm, row_mm, col_mm), or None when the format has none (LGG .tif)

Modality names are canonical across datasets: ``t1``, ``t1ce``, ``t2``, ``flair``.

=========  ====================================================  =================  ==========
source     layout                                                modalities         labels
=========  ====================================================  =================  ==========
brats      ``BraTS2021_XXXXX/BraTS2021_XXXXX_{flair,t1,t1ce,     t1 t1ce t2 flair   0 1 2 4
           t2,seg}.nii[.gz]`` (any depth, e.g. HGG/ LGG/;
           also BraTS 2020's ``BraTS20_Training_XXX``)
brats      ``BraTS-GLI-XXXXX-XXX/...-{t1n,t1c,t2w,t2f,seg}``     same (t1n=t1 ...)  0 1 2 3
msd        ``Task01_BrainTumour/{imagesTr,labelsTr}/*.nii.gz``,  order of             0 1 2 3
           4-D images; ``._*`` files skipped                     dataset.json
lgg        ``kaggle_3m/<patient>/<patient>_<n>.tif`` and         t1 flair t1ce      0 255
           ``..._<n>_mask.tif``; slice order from <n>            (pre, FLAIR, post)
=========  ====================================================  =================  ==========
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nvfp4bench.data.errors import DataError
from nvfp4bench.data.nifti import check_labels, read_nifti

MODALITIES = ("t1", "t1ce", "t2", "flair")
# The NIfTI sources' default channels (BraTS, MSD, the synthetic set): the LGG .tif's modalities
# in the .tif's own RGB order.
DEFAULT_MODALITIES = ("t1", "flair", "t1ce")


@dataclass(frozen=True)
class Case:
    """One patient: its id, its files by role (modality names and "seg"), its label set."""

    case_id: str
    files: dict = field(hash=False)
    labels: tuple[int, ...] = ()


@dataclass
class Volume:
    """One loaded case, axial slices first (see the module docstring)."""

    case_id: str
    image: np.ndarray  # float32 (C, Z, H, W)
    labels: np.ndarray  # uint8 (Z, H, W)
    spacing: tuple[float, float, float] | None


def _stack_modalities(case: Case, modalities, read) -> tuple[np.ndarray, object]:
    missing = [m for m in modalities if m not in case.files]
    if missing:
        have = sorted(k for k in case.files if k != "seg")
        raise DataError(f"missing modality {', '.join(missing)} (found: {', '.join(have) or 'none'})",
                        case=case.case_id, file=None)
    if "seg" not in case.files:
        raise DataError("missing segmentation (seg) file", case=case.case_id)
    return [read(case.files[m]) for m in modalities]


def _check_shapes(case_id: str, named: dict[str, tuple], seg_file) -> None:
    """All modalities and the mask must share one shape."""
    shapes = {tuple(s) for s in named.values()}
    if len(shapes) > 1:
        desc = ", ".join(f"{Path(k).name} {tuple(v)}" for k, v in named.items())
        raise DataError(f"image and mask shapes differ: {desc}", case=case_id, file=seg_file)


def _check_content(case_id: str, image: np.ndarray, files) -> None:
    for c, f in enumerate(files):
        if not np.any(image[c]):
            raise DataError("empty volume (all zero)", case=case_id, file=f)


# --------------------------------------------------------------------------------------------
# BraTS 2021 and 2023+
# --------------------------------------------------------------------------------------------
_BRATS_LAYOUTS = (
    # (file name regex, modality name map, label set)
    (re.compile(r"^(?P<case>BraTS20\d\d_\d+|BraTS20_[A-Za-z]+_\d+)_(?P<role>flair|t1|t1ce|t2|seg)\.nii(\.gz)?$"),
     {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"}, (0, 1, 2, 4)),
    (re.compile(r"^(?P<case>BraTS-[A-Za-z]+-\d+-\d+)-(?P<role>t1n|t1c|t2w|t2f|seg)\.nii(\.gz)?$"),
     {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", "seg": "seg"}, (0, 1, 2, 3)),
)


class BratsSource:
    """BraTS 2021 (labels 0/1/2/4) and BraTS 2023+ (enhancing = 3), .nii or .nii.gz."""

    name = "brats"
    default_modalities = DEFAULT_MODALITIES
    default_slice_mode = "brain"
    intensity = "zscore"  # preprocess.INTENSITY_RULES

    def discover(self, root: Path) -> list[Case]:
        found: dict[str, tuple[Path, dict, tuple]] = {}
        for path in sorted(Path(root).rglob("*.nii*")):
            if path.name.startswith("._"):
                continue
            for regex, roles, labels in _BRATS_LAYOUTS:
                m = regex.match(path.name)
                if not m:
                    continue
                cid, role = m["case"], roles[m["role"]]
                folder, files, _ = found.setdefault(cid, (path.parent, {}, labels))
                if folder != path.parent:
                    raise DataError(f"case found in two folders: {folder} and {path.parent}",
                                    case=cid, file=path)
                if role in files:
                    raise DataError(f"two files for {role}: {files[role].name} and {path.name}",
                                    case=cid, file=path)
                files[role] = path
        if not found:
            raise DataError(f"no BraTS cases found under {root} (expected BraTS2021_XXXXX_t1.nii.gz"
                            " or BraTS-GLI-XXXXX-XXX-t1n.nii.gz files)")
        return [Case(cid, files, labels) for cid, (_, files, labels) in sorted(found.items())]

    def load(self, case: Case, modalities) -> Volume:
        spacings = {}

        def read(f):
            data, spacings[str(f)] = read_nifti(f, case=case.case_id)
            return data

        arrays = _stack_modalities(case, modalities, read)
        seg_file = case.files["seg"]
        seg = read(seg_file)
        _check_shapes(case.case_id, {str(case.files[m]): a.shape for m, a in zip(modalities, arrays)}
                      | {str(seg_file): seg.shape}, seg_file)
        image = np.stack(arrays)
        _check_content(case.case_id, image, [case.files[m] for m in modalities])
        labels = check_labels(seg, case.labels, case=case.case_id, file=seg_file)
        return Volume(case.case_id, image, labels, spacings[str(seg_file)])


# --------------------------------------------------------------------------------------------
# Medical Segmentation Decathlon, Task01_BrainTumour
# --------------------------------------------------------------------------------------------
MSD_DEFAULT_CHANNELS = ("flair", "t1", "t1ce", "t2")  # dataset.json: FLAIR, T1w, t1gd, T2w
_MSD_NAMES = {"flair": "flair", "t1w": "t1", "t1": "t1", "t1gd": "t1ce", "t1ce": "t1ce",
              "t2w": "t2", "t2": "t2"}


class MsdSource:
    """MSD Task01_BrainTumour: 4-D images (channel order from dataset.json), labels 0-3."""

    name = "msd"
    default_modalities = DEFAULT_MODALITIES
    default_slice_mode = "brain"
    intensity = "zscore"
    labels = (0, 1, 2, 3)

    @staticmethod
    def _task_dir(root: Path) -> Path:
        if (root / "imagesTr").is_dir():
            return root
        hits = sorted(p.parent for p in root.glob("*/imagesTr") if p.is_dir())
        if len(hits) != 1:
            raise DataError(f"no MSD task folder (with imagesTr/ and labelsTr/) under {root}"
                            if not hits else f"several MSD task folders under {root}: "
                            + ", ".join(h.name for h in hits))
        return hits[0]

    @staticmethod
    def channels(task: Path) -> tuple[str, ...]:
        meta = task / "dataset.json"
        if not meta.exists():
            return MSD_DEFAULT_CHANNELS
        try:
            mods = json.loads(meta.read_text())["modality"]
            names = [_MSD_NAMES[str(mods[str(i)]).lower()] for i in range(len(mods))]
        except Exception as e:
            raise DataError(f"cannot read the channel order ({type(e).__name__}: {e})",
                            file=meta) from None
        return tuple(names)

    def discover(self, root: Path) -> list[Case]:
        task = self._task_dir(Path(root))
        channels = self.channels(task)
        cases = []
        for img in sorted((task / "imagesTr").glob("*.nii*")):
            if img.name.startswith("._"):
                continue
            cid = re.sub(r"\.nii(\.gz)?$", "", img.name)
            files = {"image": img, "channels": channels}
            lab = task / "labelsTr" / img.name
            if lab.exists():
                files["seg"] = lab
            cases.append(Case(cid, files, self.labels))
        if not cases:
            raise DataError(f"no images in {task / 'imagesTr'}")
        return cases

    def load(self, case: Case, modalities) -> Volume:
        img_file = case.files["image"]
        channels = case.files["channels"]
        missing = [m for m in modalities if m not in channels]
        if missing:
            raise DataError(f"missing modality {', '.join(missing)} (channels: {', '.join(channels)})",
                            case=case.case_id, file=img_file)
        if "seg" not in case.files:
            raise DataError(f"missing label file labelsTr/{img_file.name}", case=case.case_id,
                            file=img_file)
        data, spacing = read_nifti(img_file, case=case.case_id, ndim=4)  # (Z, H, W, C)
        if data.shape[-1] != len(channels):
            raise DataError(f"expected {len(channels)} channels, got shape {data.shape}",
                            case=case.case_id, file=img_file)
        seg_file = case.files["seg"]
        seg, _ = read_nifti(seg_file, case=case.case_id)
        _check_shapes(case.case_id, {str(img_file): data.shape[:3], str(seg_file): seg.shape},
                      seg_file)
        image = np.stack([data[..., channels.index(m)] for m in modalities])
        for c, m in enumerate(modalities):
            if not np.any(image[c]):
                raise DataError(f"empty channel {m} (all zero)", case=case.case_id, file=img_file)
        labels = check_labels(seg, case.labels, case=case.case_id, file=seg_file)
        return Volume(case.case_id, image, labels, spacing)


# --------------------------------------------------------------------------------------------
# Kaggle lgg-mri-segmentation (kaggle_3m)
# --------------------------------------------------------------------------------------------
LGG_CHANNELS = ("t1", "flair", "t1ce")  # pre-contrast, FLAIR, post-contrast (the .tif's RGB)
# The study reads each .tif with cv2.imread, which returns the channels in BGR order, and never
# converts them (its BrainMriDataset): its channel 0 is the post-contrast image, channel 2 the
# pre-contrast one, and ImageNet's mean and std apply in that order. The LGG default is that order.
LGG_STUDY_ORDER = ("t1ce", "flair", "t1")
_LGG_SLICE = re.compile(r"^(?P<stem>.+)_(?P<n>\d+)(?P<mask>_mask)?\.tif$")


def _read_tif(path: Path, case: str) -> np.ndarray:
    from PIL import Image  # local: Pillow is needed by this reader only

    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im)
    except Exception as e:
        raise DataError(f"unreadable or truncated .tif ({type(e).__name__}: {e})",
                        case=case, file=path) from None


class LggSource:
    """Kaggle LGG: one folder per patient of 3-channel .tif slices with ``_mask.tif`` masks."""

    name = "lgg"
    default_modalities = LGG_STUDY_ORDER  # the study's cv2 (BGR) order
    default_slice_mode = "all"  # the study trains on every slice of the set
    intensity = "rgb"  # the study's 8-bit slices, as they are
    labels = (0, 255)

    def discover(self, root: Path) -> list[Case]:
        root = Path(root)
        if (root / "kaggle_3m").is_dir():
            root = root / "kaggle_3m"
        cases = []
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            slices: dict[int, dict] = {}
            for f in folder.glob("*.tif"):
                m = _LGG_SLICE.match(f.name)
                if f.name.startswith("._") or not m:
                    continue
                slices.setdefault(int(m["n"]), {})["seg" if m["mask"] else "image"] = f
            if slices:
                order = tuple(sorted(slices))
                cases.append(Case(folder.name, {"slices": tuple(slices[n] for n in order),
                                                "numbers": order}, self.labels))
        if not cases:
            raise DataError(f"no LGG patient folders with .tif slices under {root}")
        return cases

    def load(self, case: Case, modalities) -> Volume:
        missing = [m for m in modalities if m not in LGG_CHANNELS]
        if missing:
            raise DataError(f"missing modality {', '.join(missing)} (LGG has {', '.join(LGG_CHANNELS)})",
                            case=case.case_id)
        images, masks = [], []
        for n, pair in zip(case.files["numbers"], case.files["slices"]):
            if "image" not in pair or "seg" not in pair:
                have = next(iter(pair.values()))
                what = "mask" if "seg" not in pair else "image"
                raise DataError(f"slice {n} has no {what} file", case=case.case_id, file=have)
            img = _read_tif(pair["image"], case.case_id)
            mask = _read_tif(pair["seg"], case.case_id)
            if img.ndim != 3 or img.shape[2] != 3:
                raise DataError(f"expected a 3-channel image, got shape {img.shape}",
                                case=case.case_id, file=pair["image"])
            if mask.ndim == 3:
                mask = mask[..., 0]
            if mask.shape != img.shape[:2]:
                raise DataError(f"image and mask shapes differ: {img.shape[:2]} vs {mask.shape}",
                                case=case.case_id, file=pair["seg"])
            if images and img.shape != images[0].shape:
                raise DataError(f"slice shape {img.shape} differs from the patient's "
                                f"{images[0].shape}", case=case.case_id, file=pair["image"])
            masks.append(check_labels(mask, self.labels, case=case.case_id, file=pair["seg"]))
            images.append(img)
        volume = np.stack(images).astype(np.float32)  # (Z, H, W, 3)
        image = np.stack([volume[..., LGG_CHANNELS.index(m)] for m in modalities])
        first = case.files["slices"][0]["image"]
        _check_content(case.case_id, image, [first.parent / f"channel {m}" for m in modalities])
        return Volume(case.case_id, image, np.stack(masks), None)


SOURCES = {"brats": BratsSource(), "msd": MsdSource(), "lgg": LggSource()}


def default_modalities(source: str) -> tuple[str, ...]:
    """The channels, in order, of a store built from ``source`` when --modalities is not given:
    the study's BGR order for LGG, ``DEFAULT_MODALITIES`` for the NIfTI sources and the synthetic
    (BraTS-layout) set."""
    return getattr(SOURCES.get(source), "default_modalities", DEFAULT_MODALITIES)


def get_source(name: str):
    """The reader registered as ``name``; the error lists the valid names."""
    try:
        return SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown source {name!r}; valid: {', '.join(SOURCES)}") from None
