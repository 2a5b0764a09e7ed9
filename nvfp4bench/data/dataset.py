"""The torch Dataset of store slices, and the re-stacking of per-slice outputs per patient.

Item k of ``SliceDataset(store, patients)`` is store slice i = ``dataset.indices[k]``::

    image  float32 (C, H, W)  (u - mean_c) / std_c, u = stored uint8 / 255 in [0, 1] (augmented)
    mask   float32 (1, H, W)  whole tumour in {0, 1}
    i      int                the *store* index (store.patient_of(i), store.slice_position(i))

mean/std: ImageNet's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) for 3 channels, as the study;
for any other channel count every channel uses their averages, 0.449 / 0.226.
The image stays uint8 until that normalisation, as in the study, whose albumentations transforms
work on ``cv2.imread``'s uint8 image. With ``image_size`` different from the store's, slices are
resized on the fly (bilinear with antialiasing for the image, rounded back to uint8; nearest for
the mask) before augmentation. Augmentation (``augment.py``) draws from (seed, epoch, i): call
``set_epoch(epoch)`` before each epoch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from nvfp4bench.data.augment import augment as augment_slice
from nvfp4bench.data.store import SliceStore

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def channel_stats(channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) float32 (C, 1, 1): ImageNet's for 3 channels, their averages otherwise."""
    if channels == 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean = (sum(IMAGENET_MEAN) / 3,) * channels
        std = (sum(IMAGENET_STD) / 3,) * channels
    return (torch.tensor(mean, dtype=torch.float32)[:, None, None],
            torch.tensor(std, dtype=torch.float32)[:, None, None])


class SliceDataset(Dataset):
    """Slices of ``patients`` from a store (path or SliceStore); see the module docstring."""

    def __init__(self, store: SliceStore | str | Path, patients, *, image_size: int | None = None,
                 augment: bool = False, seed: int = 2026):
        self.store = store if isinstance(store, SliceStore) else SliceStore(store)
        self.patients = list(patients)
        self.indices = np.asarray(self.store.slice_indices(self.patients), dtype=np.int64)
        self.image_size = int(image_size or self.store.image_size)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.epoch = 0
        self.mean, self.std = channel_stats(self.store.channels)
        self._mean, self._std = self.mean.numpy(), self.std.numpy()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = int(self.indices[k])
        image = self.store.images[i]  # uint8 (C, H, W), memory-mapped
        mask = torch.from_numpy(self.store.masks[i].astype(np.float32))[None]  # (1, H, W)
        if self.image_size != image.shape[-1]:
            image, mask = self._resized(image, mask)
        if self.augment:
            augmented, mask = augment_slice(torch.from_numpy(np.array(image)), mask,
                                            seed=self.seed, epoch=self.epoch, index=i)
            image = augmented.numpy()
        # numpy for the per-pixel work: single-threaded, so it does not fight the training loop
        # (or other processes) for torch's intra-op threads
        image = image * np.float32(1 / 255)  # (C, H, W) float32 in [0, 1]
        return torch.from_numpy((image - self._mean) / self._std), mask, i

    def _resized(self, image: np.ndarray, mask: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """The slice at ``image_size``: the image bilinear with antialiasing, rounded back to
        uint8 (the study resizes its uint8 images), the mask nearest."""
        size = (self.image_size, self.image_size)
        resized = F.interpolate(torch.from_numpy(image.astype(np.float32))[None], size=size,
                                mode="bilinear", align_corners=False, antialias=True)[0]
        image = resized.round_().clamp_(0, 255).to(torch.uint8).numpy()
        return image, F.interpolate(mask[None], size=size, mode="nearest-exact")[0]


def patient_volumes(store: SliceStore, indices, values) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Re-stack per-slice arrays by patient.

    indices: store indices (S,) of the slices; values: array-like (S, ...) aligned with them.
    -> {patient: (positions int (S_p,), stacked values (S_p, ...))}, each sorted by axial
    position z. Spacing of a patient: ``store.record(p)["spacing"]`` (slice, row, col) mm.
    """
    indices = np.asarray(indices, dtype=np.int64)
    values = np.asarray(values)
    if len(values) != len(indices):
        raise ValueError(f"{len(indices)} indices but {len(values)} values")
    groups: dict[str, list[int]] = {}
    for k, i in enumerate(indices.tolist()):
        groups.setdefault(store.patient_of(i), []).append(k)
    out = {}
    for p, ks in groups.items():
        ks = np.asarray(ks)
        pos = np.array([store.slice_position(int(indices[k])) for k in ks])
        order = np.argsort(pos, kind="stable")
        out[p] = (pos[order], values[ks[order]])
    return out
