"""The study's training augmentations, in torch, applied jointly to a slice and its mask.

Order and parameters (albumentations names of the study in brackets)::

    horizontal flip            p 0.5                          [HorizontalFlip]
    vertical flip              p 0.5                          [VerticalFlip]
    brightness / contrast      p 0.3   x' = clip(a x + b, 0, 1),  [RandomBrightnessContrast]
                                       a ~ 1 + U(-0.2, 0.2), b ~ U(-0.2, 0.2)   (image only)
    shift-scale-rotate         p 0.3   shift U(-0.1, 0.1) of the size per axis,  [ShiftScaleRotate]
                                       scale 1 + U(-0.1, 0.1), rotation U(-15, 15) deg about the
                                       centre; image bilinear, mask nearest, zeros outside

Images are in [0, 1] (before the ImageNet normalisation), so the zero border is background.
All randomness comes from one ``torch.Generator`` seeded from (seed, epoch, index) by
``aug_generator``; ``sample_params`` always draws the same 10 numbers, so each decision is
independent of the others and of the image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

P_HFLIP = 0.5
P_VFLIP = 0.5
P_BRIGHTNESS_CONTRAST = 0.3
BRIGHTNESS_LIMIT = 0.2
CONTRAST_LIMIT = 0.2
P_SHIFT_SCALE_ROTATE = 0.3
SHIFT_LIMIT = 0.1
SCALE_LIMIT = 0.1
ROTATE_LIMIT_DEG = 15.0


def aug_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A torch.Generator whose state depends only on (seed, epoch, index)."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]) & ((1 << 63) - 1))


@dataclass(frozen=True)
class AugParams:
    """One draw: None for a transform that is not applied."""

    hflip: bool
    vflip: bool
    contrast: float | None  # a
    brightness: float | None  # b
    shift: tuple[float, float] | None  # (dx, dy) fractions of (W, H)
    scale: float | None
    angle_deg: float | None


def sample_params(gen: torch.Generator) -> AugParams:
    u = torch.rand(10, generator=gen, dtype=torch.float64).tolist()
    bc = u[2] < P_BRIGHTNESS_CONTRAST
    ssr = u[5] < P_SHIFT_SCALE_ROTATE

    def sym(x: float, limit: float) -> float:  # U(0, 1) -> U(-limit, limit)
        return (2 * x - 1) * limit

    return AugParams(
        hflip=u[0] < P_HFLIP, vflip=u[1] < P_VFLIP,
        contrast=1 + sym(u[3], CONTRAST_LIMIT) if bc else None,
        brightness=sym(u[4], BRIGHTNESS_LIMIT) if bc else None,
        shift=(sym(u[6], SHIFT_LIMIT), sym(u[7], SHIFT_LIMIT)) if ssr else None,
        scale=1 + sym(u[8], SCALE_LIMIT) if ssr else None,
        angle_deg=sym(u[9], ROTATE_LIMIT_DEG) if ssr else None)


def affine_theta(p: AugParams, h: int, w: int) -> torch.Tensor:
    """(2, 3) affine_grid matrix (output -> input, normalised coords) of shift-scale-rotate.

    Forward map in pixels about the centre: p_out = s R(angle) p_in + t, t = (dx W, dy H);
    sampling needs its inverse p_in = R(-angle) (p_out - t) / s, conjugated by D = diag(W/2, H/2)
    to normalised coordinates.
    """
    a = math.radians(p.angle_deg)
    rinv = torch.tensor([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]],
                        dtype=torch.float64) / p.scale
    d = torch.diag(torch.tensor([w / 2, h / 2], dtype=torch.float64))
    m = torch.linalg.inv(d) @ rinv @ d
    t = torch.tensor([p.shift[0] * w, p.shift[1] * h], dtype=torch.float64)
    offset = -(torch.linalg.inv(d) @ rinv @ t)
    return torch.cat([m, offset[:, None]], dim=1).float()


def apply(image: torch.Tensor, mask: torch.Tensor, p: AugParams) -> tuple[torch.Tensor, torch.Tensor]:
    """image float32 (C, H, W) in [0, 1], mask float32 (1, H, W) {0, 1}, CPU -> augmented copies."""
    # flips and brightness/contrast in numpy (single-threaded, views where possible)
    img, msk = image.numpy(), mask.numpy()
    if p.hflip:
        img, msk = img[..., ::-1], msk[..., ::-1]
    if p.vflip:
        img, msk = img[..., ::-1, :], msk[..., ::-1, :]
    if p.contrast is not None:
        img = np.clip(np.float32(p.contrast) * img + np.float32(p.brightness), 0.0, 1.0)
    image = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
    mask = torch.from_numpy(np.ascontiguousarray(msk, dtype=np.float32))
    if p.angle_deg is not None:
        h, w = image.shape[-2:]
        theta = affine_theta(p, h, w)[None]
        grid = F.affine_grid(theta, [1, 1, h, w], align_corners=False)
        image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False)[0]
        mask = F.grid_sample(mask[None], grid, mode="nearest", padding_mode="zeros",
                             align_corners=False)[0]
    return image.contiguous(), mask.contiguous()


def augment(image: torch.Tensor, mask: torch.Tensor, *, seed: int, epoch: int, index: int):
    """The study's augmentation of one slice, a deterministic function of (seed, epoch, index)."""
    return apply(image, mask, sample_params(aug_generator(seed, epoch, index)))
