"""The study's segmentation loss: binary cross-entropy plus a Tversky term.

For one image with logits z (clamped to [-C, C], C = 20, in fp32), probabilities p = sigmoid(z)
and a binary target t, over its pixels i::

    BCE     = mean_i [ -t_i log p_i - (1 - t_i) log(1 - p_i) ]        (with logits, stable)
    TP      = sum_i p_i t_i
    FP      = sum_i p_i (1 - t_i)
    FN      = sum_i (1 - p_i) t_i
    TI      = (TP + eps) / (TP + alpha FP + beta FN + eps)             (Tversky index)
    loss    = BCE_batch + mean_images (1 - TI)

with alpha = 0.3 (false positives), beta = 0.7 (false negatives), eps = 1e-5. Weighting false
negatives more than false positives makes the loss recall-oriented; alpha = beta = 0.5 is soft
Dice. BCE is the mean over every pixel of the batch; the Tversky index is computed per image and
then averaged, so a tumour-free image contributes 1 - eps / (alpha FP + eps): zero when it
predicts nothing, close to one as soon as it predicts any tumour.

The logits are cast to fp32 and clamped before anything else, so a bf16 / fp16 forward cannot
overflow the loss and a saturated logit keeps a (tiny) gradient scale bounded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ALPHA = 0.3  # Tversky weight of false positives
BETA = 0.7  # Tversky weight of false negatives
EPS = 1e-5  # smoothing of the Tversky index
LOGIT_CLAMP = 20.0  # |logit| bound before the loss


def _check(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.shape != targets.shape:
        raise ValueError(f"loss: logits {tuple(logits.shape)} and targets "
                         f"{tuple(targets.shape)} must have the same shape (B, 1, H, W)")
    if logits.dim() < 2:
        raise ValueError(f"loss: expected a batch (B, ...), got shape {tuple(logits.shape)}")


def tversky_index(probs: torch.Tensor, targets: torch.Tensor, *, alpha: float = ALPHA,
                  beta: float = BETA, eps: float = EPS) -> torch.Tensor:
    """Tversky index per image, shape (B,): (TP + eps) / (TP + alpha FP + beta FN + eps)."""
    _check(probs, targets)
    p = probs.float().flatten(1)
    t = targets.float().flatten(1)
    tp = (p * t).sum(1)
    fp = (p * (1 - t)).sum(1)
    fn = ((1 - p) * t).sum(1)
    return (tp + eps) / (tp + alpha * fp + beta * fn + eps)


def bce_tversky_loss(logits: torch.Tensor, targets: torch.Tensor, *, alpha: float = ALPHA,
                     beta: float = BETA, eps: float = EPS,
                     clamp: float = LOGIT_CLAMP) -> torch.Tensor:
    """BCE-with-logits (mean over pixels) + mean over images of (1 - Tversky index). A 0-d fp32."""
    _check(logits, targets)
    z = logits.float().clamp(-clamp, clamp)
    t = targets.float()
    bce = F.binary_cross_entropy_with_logits(z, t)
    tversky = 1.0 - tversky_index(torch.sigmoid(z), t, alpha=alpha, beta=beta, eps=eps)
    return bce + tversky.mean()


class BCETverskyLoss(nn.Module):
    """Module form of :func:`bce_tversky_loss` (what the trainer and diagnostics call)."""

    def __init__(self, alpha: float = ALPHA, beta: float = BETA, eps: float = EPS,
                 clamp: float = LOGIT_CLAMP) -> None:
        super().__init__()
        self.alpha, self.beta, self.eps, self.clamp = alpha, beta, eps, clamp

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return bce_tversky_loss(logits, targets, alpha=self.alpha, beta=self.beta,
                                eps=self.eps, clamp=self.clamp)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, eps={self.eps}, clamp={self.clamp}"
