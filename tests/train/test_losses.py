"""Known answers of the study's loss (BCE-with-logits + Tversky), computed by hand."""
import math

import pytest
import torch

from nvfp4bench.train.losses import BCETverskyLoss, bce_tversky_loss, tversky_index

EPS = 1e-5


def _sig(z):
    return 1.0 / (1.0 + math.exp(-z))


def test_all_tumour_image_at_zero_logits():
    # p = 0.5 everywhere, 4 tumour pixels: BCE = ln 2; TP = 2, FP = 0, FN = 2
    logits = torch.zeros(1, 1, 2, 2)
    targets = torch.ones(1, 1, 2, 2)
    ti = (2 + EPS) / (2 + 0.3 * 0 + 0.7 * 2 + EPS)
    expected = math.log(2) + (1 - ti)
    assert bce_tversky_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_tversky_is_per_image_and_logits_are_clamped():
    # image A: t = [1, 0], z = [0, 0]        -> TP = .5, FP = .5, FN = .5
    # image B: t = [0, 0], z = [100, -3]     -> 100 is clamped to 20
    logits = torch.tensor([[0.0, 0.0], [100.0, -3.0]]).view(2, 1, 1, 2)
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(2, 1, 1, 2)
    pb = [_sig(20.0), _sig(-3.0)]
    bce = (-math.log(0.5) - math.log(0.5) - math.log(1 - pb[0]) - math.log(1 - pb[1])) / 4
    ti_a = (0.5 + EPS) / (0.5 + 0.3 * 0.5 + 0.7 * 0.5 + EPS)
    ti_b = (0 + EPS) / (0 + 0.3 * sum(pb) + 0.7 * 0 + EPS)
    expected = bce + ((1 - ti_a) + (1 - ti_b)) / 2
    got = bce_tversky_loss(logits, targets)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # without the clamp the BCE term of the 100 logit would be ~100, not ~20
    assert got.item() < 7.0


def test_tversky_weights_false_negatives_more_than_false_positives():
    probs = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 2, 2)
    # one FP pixel (prediction where no tumour) vs one FN pixel (missed tumour), TP = 1 each
    fp_case = tversky_index(torch.tensor([1.0, 1.0, 0, 0]).view(1, 1, 2, 2),
                            torch.tensor([1.0, 0, 0, 0]).view(1, 1, 2, 2))
    fn_case = tversky_index(probs, torch.tensor([1.0, 1.0, 0, 0]).view(1, 1, 2, 2))
    assert fp_case.item() == pytest.approx((1 + EPS) / (1 + 0.3 + EPS), rel=1e-6)
    assert fn_case.item() == pytest.approx((1 + EPS) / (1 + 0.7 + EPS), rel=1e-6)


def test_half_half_tversky_is_soft_dice():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(3, 1, 8, 8, generator=g)
    t = (torch.rand(3, 1, 8, 8, generator=g) > 0.6).float()
    ti = tversky_index(p, t, alpha=0.5, beta=0.5, eps=0.0)
    inter = (p * t).flatten(1).sum(1)
    dice = 2 * inter / (p.flatten(1).sum(1) + t.flatten(1).sum(1))
    torch.testing.assert_close(ti, dice)


def test_low_precision_logits_give_a_finite_fp32_loss_and_gradient():
    logits = torch.tensor([6e4, -6e4, 0.0, 3.0], dtype=torch.float16).view(1, 1, 2, 2)
    logits.requires_grad_(True)
    targets = torch.tensor([0.0, 1.0, 1.0, 0.0]).view(1, 1, 2, 2)
    loss = BCETverskyLoss()(logits, targets)
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert torch.isfinite(logits.grad).all()


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="same shape"):
        bce_tversky_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4))
