"""The study's training augmentations, applied jointly to a uint8 slice and its mask.

The study composes albumentations 2.x transforms on the uint8 image that ``cv2.imread`` returns
(its ``get_transforms``; albumentations 2.0.8 with its pinned albucore 0.0.24). In order, with
the albumentations name in brackets::

    horizontal flip            p 0.5                                          [HorizontalFlip]
    vertical flip              p 0.5                                          [VerticalFlip]
    brightness / contrast      p 0.3   a = 1 + U(-0.2, 0.2), b = 255 U(-0.2, 0.2)
                                       x' = trunc(clip(fl(fl(x a) + b), 0, 255))   [RandomBrightnessContrast]
    shift-scale-rotate         p 0.3   tx = int(U(-0.1, 0.1) W), ty = int(U(-0.1, 0.1) H) pixels
                                       (truncated toward zero), sx and sy independently
                                       U(0.9, 1.1), angle U(-15, 15) deg     [ShiftScaleRotate]

Brightness / contrast is albucore's ``multiply_add`` on uint8: a lookup table over the 256 values,
computed in float32 (``fl``: a and b rounded to float32, then one float32 product and one float32
sum), clipped to [0, 255] and cast to uint8, which truncates. The image only; the mask is kept.

Shift-scale-rotate is an ``Affine`` with ``keep_ratio=False`` (so x and y scale independently)
and no shear. With c = (W/2 - 0.5, H/2 - 0.5) the centre in pixel-centre coordinates, it maps
an input pixel q to::

    q' = c + t + R S (q - c),   S = diag(sx, sy),   R = [[cos A, sin A], [-sin A, cos A]]

The output pixel q' samples the input at the inverse map. The image is bilinear and rounded to
uint8; the mask is nearest. Zeros lie outside the input (background). nvfp4bench samples with
``torch.nn.functional.grid_sample`` in float, where OpenCV's ``warpAffine`` uses fixed-point
coordinates (1/32 px) and weights. The sampled pixels can therefore differ by one grey level
or, at a mask edge, by one pixel.

All randomness comes from one ``torch.Generator`` seeded from (seed, epoch, index) by
``aug_generator``. ``sample_params`` always draws the same 11 numbers, so each decision is
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
BRIGHTNESS_LIMIT = 0.2  # b = 255 U(-0.2, 0.2) (brightness_by_max: a fraction of uint8's 255)
CONTRAST_LIMIT = 0.2    # a = 1 + U(-0.2, 0.2)
P_SHIFT_SCALE_ROTATE = 0.3
SHIFT_LIMIT = 0.1
SCALE_LIMIT = 0.1
ROTATE_LIMIT_DEG = 15.0
UINT8_MAX = 255
N_DRAWS = 11  # uniforms drawn per slice, whatever is applied


def aug_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A torch.Generator whose state depends only on (seed, epoch, index)."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]) & ((1 << 63) - 1))


@dataclass(frozen=True)
class AugParams:
    """One draw: None for a transform that is not applied."""

    hflip: bool
    vflip: bool
    contrast: float | None  # a, the multiplier
    brightness: float | None  # b / 255, the added fraction of the uint8 range
    shift: tuple[float, float] | None  # (tx, ty) fractions of (W, H), before truncation to pixels
    scale: tuple[float, float] | None  # (sx, sy)
    angle_deg: float | None


def sample_params(gen: torch.Generator) -> AugParams:
    u = torch.rand(N_DRAWS, generator=gen, dtype=torch.float64).tolist()
    bc = u[2] < P_BRIGHTNESS_CONTRAST
    ssr = u[5] < P_SHIFT_SCALE_ROTATE

    def sym(x: float, limit: float) -> float:  # U(0, 1) -> U(-limit, limit)
        return (2 * x - 1) * limit

    return AugParams(
        hflip=u[0] < P_HFLIP, vflip=u[1] < P_VFLIP,
        contrast=1 + sym(u[3], CONTRAST_LIMIT) if bc else None,
        brightness=sym(u[4], BRIGHTNESS_LIMIT) if bc else None,
        shift=(sym(u[6], SHIFT_LIMIT), sym(u[7], SHIFT_LIMIT)) if ssr else None,
        scale=(1 + sym(u[8], SCALE_LIMIT), 1 + sym(u[9], SCALE_LIMIT)) if ssr else None,
        angle_deg=sym(u[10], ROTATE_LIMIT_DEG) if ssr else None)


def brightness_contrast_lut(contrast: float, brightness: float) -> np.ndarray:
    """The uint8 lookup table of albucore's ``multiply_add``: for every value x in 0..255,
    ``trunc(clip(fl(fl(x * a) + b), 0, 255))`` with a = contrast and b = 255 * brightness, each
    rounded to float32 (module docstring)."""
    x = np.arange(UINT8_MAX + 1, dtype=np.float32)
    y = x * np.float32(contrast) + np.float32(brightness * UINT8_MAX)
    return np.clip(y, 0, UINT8_MAX).astype(np.uint8)


def shift_pixels(shift: tuple[float, float], h: int, w: int) -> tuple[int, int]:
    """(tx, ty) in whole pixels: int() of the fraction times the size, truncated toward zero."""
    return int(shift[0] * w), int(shift[1] * h)


def affine_theta(p: AugParams, h: int, w: int) -> torch.Tensor:
    """(2, 3) ``affine_grid`` matrix (output -> input, normalised coordinates) of
    shift-scale-rotate.

    The forward map about the centre is q' - c = t + R S (q - c) (module docstring). Sampling
    needs its inverse (q - c) = S^-1 R^-1 ((q' - c) - t). With ``align_corners=False`` a
    normalised coordinate is (q - c) / (W/2, H/2), so that inverse is conjugated by
    D = diag(W/2, H/2).
    """
    a = math.radians(p.angle_deg % 360)
    sx, sy = p.scale
    r_inv = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]],
                         dtype=torch.float64)
    m_inv = torch.diag(torch.tensor([1 / sx, 1 / sy], dtype=torch.float64)) @ r_inv
    d = torch.diag(torch.tensor([w / 2, h / 2], dtype=torch.float64))
    d_inv = torch.linalg.inv(d)
    t = torch.tensor(shift_pixels(p.shift, h, w), dtype=torch.float64)
    offset = -(d_inv @ m_inv @ t)
    return torch.cat([d_inv @ m_inv @ d, offset[:, None]], dim=1).float()


def apply(image: torch.Tensor, mask: torch.Tensor, p: AugParams) -> tuple[torch.Tensor, torch.Tensor]:
    """image uint8 (C, H, W), mask float32 (1, H, W) {0, 1}, CPU -> augmented copies (uint8,
    float32)."""
    if image.dtype != torch.uint8:
        raise ValueError(f"augmentation works on the uint8 image (as the study's), got "
                         f"{image.dtype}")
    # flips and brightness/contrast in numpy (single-threaded, views where possible)
    img, msk = image.numpy(), mask.numpy()
    if p.hflip:
        img, msk = img[..., ::-1], msk[..., ::-1]
    if p.vflip:
        img, msk = img[..., ::-1, :], msk[..., ::-1, :]
    if p.contrast is not None:
        img = brightness_contrast_lut(p.contrast, p.brightness)[img]
    image = torch.from_numpy(np.ascontiguousarray(img))
    mask = torch.from_numpy(np.ascontiguousarray(msk, dtype=np.float32))
    if p.angle_deg is not None:
        h, w = image.shape[-2:]
        grid = F.affine_grid(affine_theta(p, h, w)[None], [1, 1, h, w], align_corners=False)
        warped = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False)[0]
        image = warped.round_().clamp_(0, UINT8_MAX).to(torch.uint8)
        mask = F.grid_sample(mask[None], grid, mode="nearest", padding_mode="zeros",
                             align_corners=False)[0]
    return image.contiguous(), mask.contiguous()


def augment(image: torch.Tensor, mask: torch.Tensor, *, seed: int, epoch: int, index: int):
    """The study's augmentation of one uint8 slice, a deterministic function of (seed, epoch,
    index)."""
    return apply(image, mask, sample_params(aug_generator(seed, epoch, index)))
