"""The study's augmentation geometry (data/augment.py)."""
import torch

from nvfp4bench.data.augment import AugParams, apply, augment


def _blob():
    m = torch.zeros(1, 32, 32)
    m[0, 5:12, 8:20] = 1
    m[0, 20:26, 3:6] = 1
    return m


def test_flips_and_quarter_turn_known_answers():
    mask = _blob()
    image = torch.cat([mask, 0.5 * mask, torch.rand(1, 32, 32)])
    p = AugParams(True, True, None, None, None, None, None)
    img2, m2 = apply(image, mask, p)
    assert torch.equal(m2, mask.flip(-1).flip(-2)) and torch.equal(img2, image.flip(-1).flip(-2))
    q = AugParams(False, False, None, None, (0.0, 0.0), 1.0, 90.0)
    img3, m3 = apply(image, mask, q)
    turned = [torch.rot90(mask, k, dims=(-2, -1)) for k in (1, 3)]
    assert any(torch.equal(m3, t) for t in turned)  # pixel centres map onto pixel centres
    assert torch.allclose(img3[:1], m3, atol=1e-5)  # the image turned the same way


def test_random_augmentation_moves_image_and_mask_together():
    mask = _blob()
    image = torch.cat([mask, mask, mask])
    moved = 0
    for index in range(40):
        img, m = augment(image, mask, seed=1, epoch=0, index=index)
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        agree = ((img[1] > 0.5) == (m[0] > 0.5)).float().mean()
        assert agree > 0.97
        moved += not torch.equal(m, mask)
    assert moved > 20
    a = augment(image, mask, seed=1, epoch=3, index=7)
    b = augment(image, mask, seed=1, epoch=3, index=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
