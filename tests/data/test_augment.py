"""The study's augmentation (data/augment.py): geometry, albumentations 2.x's draws and its uint8
brightness / contrast arithmetic."""
import numpy as np
import pytest
import torch
from scipy import stats

from nvfp4bench.data.augment import (P_SHIFT_SCALE_ROTATE, AugParams, apply, aug_generator,
                                     augment, brightness_contrast_lut, sample_params,
                                     shift_pixels)


def _blob():
    m = torch.zeros(1, 32, 32)
    m[0, 5:12, 8:20] = 1
    m[0, 20:26, 3:6] = 1
    return m


def _image(mask, seed=0):
    noise = torch.randint(0, 256, (1, 32, 32), generator=torch.Generator().manual_seed(seed))
    return torch.cat([255 * mask, 128 * mask, noise]).to(torch.uint8)


def test_flips_and_quarter_turn_known_answers():
    mask = _blob()
    image = _image(mask)
    p = AugParams(True, True, None, None, None, None, None)
    img2, m2 = apply(image, mask, p)
    assert img2.dtype == torch.uint8
    assert torch.equal(m2, mask.flip(-1).flip(-2)) and torch.equal(img2, image.flip(-1).flip(-2))
    q = AugParams(False, False, None, None, (0.0, 0.0), (1.0, 1.0), 90.0)
    img3, m3 = apply(image, mask, q)
    turned = [torch.rot90(mask, k, dims=(-2, -1)) for k in (1, 3)]
    assert any(torch.equal(m3, t) for t in turned)  # pixel centres map onto pixel centres
    assert torch.equal(img3[:1], (255 * m3).to(torch.uint8))  # the image turned the same way


def test_random_augmentation_moves_image_and_mask_together():
    mask = _blob()
    image = _image(mask)
    moved = 0
    for index in range(40):
        img, m = augment(image, mask, seed=1, epoch=0, index=index)
        assert set(m.unique().tolist()) <= {0.0, 1.0} and img.dtype == torch.uint8
        agree = ((img[1] > 64) == (m[0] > 0.5)).float().mean()
        assert agree > 0.97
        moved += not torch.equal(m, mask)
    assert moved > 20
    a = augment(image, mask, seed=1, epoch=3, index=7)
    b = augment(image, mask, seed=1, epoch=3, index=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_x_and_y_scales_are_independent_and_each_uniform_0_9_to_1_1():
    """albumentations 2.x's ShiftScaleRotate is an Affine with keep_ratio=False: sx and sy are
    two independent U(0.9, 1.1) draws (not one isotropic scale)."""
    draws = [sample_params(aug_generator(7, epoch, index))
             for epoch in range(4) for index in range(2500)]
    scales = np.array([p.scale for p in draws if p.scale is not None])
    n = len(scales)
    assert abs(n / len(draws) - P_SHIFT_SCALE_ROTATE) < 0.02
    for axis in (0, 1):
        assert scales[:, axis].min() >= 0.9 and scales[:, axis].max() <= 1.1
        assert stats.kstest(scales[:, axis], stats.uniform(0.9, 0.2).cdf).pvalue > 1e-3
    assert np.mean(scales[:, 0] != scales[:, 1]) == 1.0
    # independence: a 4 x 4 table of quartiles, chi-square; and no linear correlation
    bins = np.linspace(0.9, 1.1, 5)
    table = np.histogram2d(scales[:, 0], scales[:, 1], bins=[bins, bins])[0]
    assert stats.chi2_contingency(table).pvalue > 1e-3
    assert abs(stats.pearsonr(scales[:, 0], scales[:, 1]).statistic) < 4 / np.sqrt(n)


@pytest.mark.parametrize("a, b, pixels", [
    # contrast 1.1, brightness -0.1 (b = -25.5): x -> trunc(fl(fl(1.1 x) - 25.5)), clipped
    (1.1, -0.1, {0: 0, 3: 0, 100: 84, 101: 85, 200: 194, 255: 255}),
    # 101 * fl(1.1) = 111.1000024..., in float32 111.10000610; minus 25.5 is 85.60000610:
    # truncated to 85 (rounding would give 86)
    # contrast 0.8, brightness 0.2 (b = 51): 255 * 0.8 + 51 = 255, 1 * 0.8 + 51 = 51.8 -> 51
    (0.8, 0.2, {0: 51, 1: 51, 2: 52, 254: 254, 255: 255}),
    # contrast 1.2, brightness 0.0: 213 * 1.2 = 255.6 -> 255 (clipped), 212 * 1.2 = 254.4 -> 254
    (1.2, 0.0, {5: 6, 10: 12, 212: 254, 213: 255}),
])
def test_brightness_contrast_is_albumentations_uint8_arithmetic(a, b, pixels):
    lut = brightness_contrast_lut(a, b)
    assert lut.dtype == np.uint8
    assert {x: int(lut[x]) for x in pixels} == pixels
    image = torch.tensor(list(pixels), dtype=torch.uint8).reshape(1, 1, -1)
    out, _ = apply(image, torch.zeros(1, 1, len(pixels)), AugParams(False, False, a, b, None,
                                                                    None, None))
    assert out.flatten().tolist() == list(pixels.values())


def test_shifts_are_whole_pixels_truncated_toward_zero():
    assert shift_pixels((0.099, -0.099), 64, 64) == (6, -6)     # 6.336 -> 6, -6.336 -> -6
    assert shift_pixels((0.05, -0.02), 32, 40) == (2, 0)        # x: 0.05 * 40, y: -0.64 -> 0
    mask = _blob()
    p = AugParams(False, False, None, None, (3 / 32 + 1e-3, 0.0), (1.0, 1.0), 0.0)
    _, moved = apply(_image(mask), mask, p)
    assert torch.equal(moved[..., 3:], mask[..., :-3]) and not moved[..., :3].any()
