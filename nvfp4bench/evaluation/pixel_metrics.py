"""The study's segmentation metrics, pooled over every pixel of an evaluation set.

Every metric is a small pure function of probabilities ``p`` in [0, 1] and binary targets ``t``
(nvfp4bench.evaluation.meter.SegmentationMeter accumulates them over an evaluation set; the per-patient
metrics on hard volumes are nvfp4bench.evaluation.volume_metrics, with their EMPTY_MASK_POLICY).

* AUPRC = average precision, exactly scikit-learn's ``average_precision_score`` (ties included)::

      AP = sum_n (R_n - R_{n-1}) * P_n

  over the distinct score values s_n taken as thresholds (prediction positive when p >= s_n), with
  P_n = TP(>= s_n) / (TP(>= s_n) + FP(>= s_n)) and R_n = TP(>= s_n) / #positives. Only thresholds
  that hold at least one positive pixel move R, so AP = sum_v  c_pos(v) / #pos * P(v)  over the
  distinct scores v of positive pixels. :class:`PooledScores` streams it exactly (see there).
* ROC-AUC (scikit-learn's ``roc_auc_score``, ties included), the study's ECE (15 bins), the mean
  and sd of the pixels' logits and their mean binary entropy: from the same exact histograms
  (:class:`PooledScores`), never from a list of every pixel.
* Soft scores from probabilities, no threshold:
  TP = sum p t, FP = sum p (1 - t), FN = sum (1 - p) t;
  recall = TP / (TP + FN), precision = TP / (TP + FP),
  F2 = 5 TP / (5 TP + 4 FN + FP) (= 5 P R / (4 P + R)), IoU = TP / (TP + FP + FN).
  As the study does, these pooled scores and AUPRC see the probabilities clipped to
  [1e-7, 1 - 1e-7] in float32 (``PROB_CLIP``): every pixel below 1e-7 ties at 1e-7 for AUPRC.
* ``dice``, the study's soft Dice: per image (2 sum p t + eps) / (sum p + sum t + eps) with
  eps = 1e-6 on the unclipped probabilities, averaged as the study averages it: the mean over the
  evaluation batches (one ``update`` call each; batch 32, in store order) of each batch's mean.
  A tumour-free slice with (near-)empty prediction mass m scores eps / (m + eps), about 0 (e.g.
  m = 4096 pixels x sigmoid(-20) = 8.4e-6 gives 0.11), not 1.
* ``dice_s1``, ours: the same per-image formula with smoothing s = 1 (one pixel), averaged over
  images, so a tumour-free slice with empty prediction scores ~1 and predicted mass m scores
  1 / (m + 1).
* Confusion counts at threshold 0.5: a pixel is predicted positive when p >= 0.5 (logit >= 0).

Both soft Dice scores are defined for every image (see above for the empty target).
With s = 0, an image where both sum p and sum t are 0 scores 1.0 (the first row of
volume_metrics.EMPTY_MASK_POLICY).
Pooled soft scores whose denominator is 0 (e.g. recall of a set without a positive pixel) and
AUPRC of a set without a positive pixel are null. (scikit-learn returns 0.0 there, with a warning.)
"""
from __future__ import annotations

import numpy as np
import torch

THRESHOLD = 0.5          # hard prediction: p >= THRESHOLD
DICE_SMOOTH = 1.0        # our soft Dice (dice_s1) smoothing s, in pixels
STUDY_DICE_EPS = 1e-6    # the study's soft Dice smoothing (common/loss.py dice_coef_metric)
PROB_CLIP = 1e-7         # the study clips probabilities to [c, 1 - c] before the pooled metrics
ECE_BINS = 15            # the study's compute_ece: 15 equal bins of (0, 1]
ENTROPY_EPS = 1e-10      # the study's entropy: log(p + 1e-10), log(1 - p + 1e-10)
# AveragePrecision merges its per-batch tables once they hold more entries than this (or than the
# merged table): amortised O(N log N), and a bounded number of small tensors in flight.
_MERGE_MIN_ENTRIES = 1 << 22


# ----------------------------------------------------------------------------------------------
# input checks


def _flat_pair(probs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs fp32 flat, targets bool flat), after checking shapes, ranges and binariness."""
    probs, targets = torch.as_tensor(probs), torch.as_tensor(targets)
    if probs.shape != targets.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and targets {tuple(targets.shape)} must have "
                         "the same shape")
    p = probs.detach().reshape(-1).to(torch.float32)
    if p.numel() and (torch.isnan(p).any() or p.min() < 0 or p.max() > 1):
        raise ValueError("probs must be probabilities in [0, 1] without NaN (apply torch.sigmoid "
                         "to logits, or use SegmentationMeter(from_logits=True))")
    t = targets.detach().reshape(-1)
    if t.dtype != torch.bool:
        if t.numel() and not ((t == 0) | (t == 1)).all():
            raise ValueError("targets must be binary (0/1 or bool)")
        t = t != 0
    return p, t.to(p.device)


def _per_image(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, pixels)."""
    if x.dim() < 2:
        raise ValueError(f"expected a batch (B, ...) of images, got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


# ----------------------------------------------------------------------------------------------
# AUPRC


class _CountTable:
    """Exact histogram of float32 values: sorted unique ``keys`` with int64 ``counts``.

    Each batch is reduced with ``torch.unique(return_counts=True)`` (exact: keys are the float32
    values themselves), kept pending, and merged into the table (concatenate, unique, index_add of
    the counts) once the pending entries outnumber the table. Memory: 12 bytes per distinct value
    (4 key + 8 count), about 3x that transiently while merging.
    """

    def __init__(self) -> None:
        self.keys = torch.empty(0, dtype=torch.float32)
        self.counts = torch.empty(0, dtype=torch.int64)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_entries = 0

    def add(self, values: torch.Tensor) -> None:
        if values.numel() == 0:
            return
        keys, counts = torch.unique(values, sorted=True, return_counts=True)
        self._pending.append((keys.cpu(), counts.cpu().to(torch.int64)))
        self._pending_entries += keys.numel()
        if self._pending_entries > max(self.keys.numel(), _MERGE_MIN_ENTRIES):
            self.merge()

    def merge(self) -> None:
        if not self._pending:
            return
        keys = torch.cat([self.keys] + [k for k, _ in self._pending])
        counts = torch.cat([self.counts] + [c for _, c in self._pending])
        self._pending, self._pending_entries = [], 0
        self.keys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
        self.counts = torch.zeros(self.keys.numel(), dtype=torch.int64)
        self.counts.index_add_(0, inverse, counts)

    def total(self) -> int:
        return int(self.counts.sum()) + sum(int(c.sum()) for _, c in self._pending)


class PooledScores:
    """Streaming, exact histograms of the pooled scores, from which every ranking and calibration
    metric of an evaluation set is computed without a list of its pixels.

    Keeps one exact histogram of the scores of positive pixels and one of negative pixels
    (:class:`_CountTable`). Scores are compared as float32 (the dtype of sigmoid outputs): values
    that differ only beyond float32 precision tie, exactly as scikit-learn sees a float32 score
    array. Memory is 12 bytes per distinct score of each class: at most ~3 GB for a 260M-pixel
    set of all-distinct scores, and far less in practice (sigmoid outputs saturate and repeat).

    From the histograms, with c_pos(v), c_neg(v) the counts of score v and N = #pos + #neg:

    * ``average_precision``: for every distinct positive score v (descending), TP(>= v) is a
      suffix sum of the positive counts, FP(>= v) = #neg - #neg(< v) by a ``searchsorted`` into
      the negative keys, and AP = sum_v c_pos(v) P(v) / #pos in float64.
    * ``roc_auc``: the area under the ROC curve with ties, as scikit-learn's ``roc_auc_score``
      (its trapezoids through tied thresholds are the Mann-Whitney count of ties as halves):
      AUC = sum_v c_pos(v) (#neg(< v) + #neg(= v) / 2) / (#pos #neg), summed exactly in int64.
    * ``expected_calibration_error``: the study's ``compute_ece`` (15 equal bins of (0, 1],
      bin b holding e_b < p <= e_{b+1}): ECE = sum_b n_b / N |mean_b(t) - mean_b(p)|.
    * ``logit_stats``: mean and population sd (numpy's ddof 0) of log(p / (1 - p)), each
      pixel's logit computed by the study's NumPy float32 operations, averaged in float64 (the
      study averages in float32).
    * ``prob_entropy``: the mean binary entropy, -mean(p log(p + 1e-10) + (1 - p) log(1 - p +
      1e-10)), as the study computes it.
    """

    def __init__(self) -> None:
        self._pos = _CountTable()
        self._neg = _CountTable()
        self._combined = None  # _all_scores' tables, made once per state of the histograms

    def update(self, probs: torch.Tensor, targets: torch.Tensor) -> None:
        p, t = _flat_pair(probs, targets)
        self._pos.add(p[t])
        self._neg.add(p[~t])
        self._combined = None

    def _merged(self) -> tuple[_CountTable, _CountTable]:
        self._pos.merge()
        self._neg.merge()
        return self._pos, self._neg

    def average_precision(self) -> float | None:
        """AP, or None when no positive pixel was seen."""
        pos, neg = self._merged()
        n_pos = int(pos.counts.sum())
        if n_pos == 0:
            return None
        pos_keys, pos_counts = pos.keys.flip(0), pos.counts.flip(0)  # descending
        tp = torch.cumsum(pos_counts, 0)                              # TP(>= v)
        fp = int(neg.counts.sum()) - _count_below(neg, pos_keys)      # FP(>= v)
        precision = tp.double() / (tp + fp).double()
        return float((pos_counts.double() * precision).sum() / n_pos)

    def distinct_scores(self) -> int:
        """How many distinct score values were seen (1: the model's output is constant)."""
        return int(self._all_scores()[0].numel())

    def roc_auc(self) -> float | None:
        """ROC-AUC, or None without a positive or without a negative pixel (undefined)."""
        pos, neg = self._merged()
        n_pos, n_neg = int(pos.counts.sum()), int(neg.counts.sum())
        if n_pos == 0 or n_neg == 0:
            return None
        below = _count_below(neg, pos.keys)
        tied = _count_below(neg, pos.keys, side="right") - below
        twice_wins = int((pos.counts * (2 * below + tied)).sum())  # exact: < 2 n_pos n_neg
        return twice_wins / (2.0 * n_pos * n_neg)

    def _all_scores(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys fp32, counts int64, positive counts int64) over both classes, keys sorted;
        computed once after the last update, shared by the calibration metrics."""
        if self._combined is not None:
            return self._combined
        pos, neg = self._merged()
        keys, inverse = torch.unique(torch.cat([pos.keys, neg.keys]), sorted=True,
                                     return_inverse=True)
        counts = torch.zeros(keys.numel(), dtype=torch.int64)
        counts.index_add_(0, inverse, torch.cat([pos.counts, neg.counts]))
        positives = torch.zeros(keys.numel(), dtype=torch.int64)
        positives.index_add_(0, inverse[:pos.keys.numel()], pos.counts)
        self._combined = (keys, counts, positives)
        return keys, counts, positives

    def expected_calibration_error(self, n_bins: int = ECE_BINS) -> float | None:
        """The study's ECE (class docstring); None for an empty set."""
        keys, counts, positives = self._all_scores()
        n = int(counts.sum())
        if n == 0:
            return None
        edges = torch.from_numpy(np.linspace(0.0, 1.0, n_bins + 1))  # the study's float64 edges
        bins = torch.searchsorted(edges, keys.double(), side="left") - 1  # e_b < p <= e_{b+1}
        inside = (bins >= 0) & (bins < n_bins)
        per_bin = [torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins[inside], v[inside])
                   for v in (counts.double(), positives.double(), keys.double() * counts)]
        n_b, t_b, p_b = per_bin
        used = n_b > 0
        gap = (t_b[used] / n_b[used] - p_b[used] / n_b[used]).abs()
        return float((gap * n_b[used]).sum() / n)

    def logit_stats(self) -> tuple[float | None, float | None]:
        """(mean, population sd) of the pixels' logits log(p / (1 - p)) (class docstring)."""
        keys, counts, _ = self._all_scores()
        n = int(counts.sum())
        if n == 0:
            return None, None
        k = keys.numpy()
        # the study's per-pixel float32 logits, by the same NumPy float32 operations
        logits = torch.from_numpy(np.log(k / (1 - k)).astype(np.float64))
        w = counts.double()
        mean = float((w * logits).sum() / n)
        return mean, float(((w * (logits - mean) ** 2).sum() / n).sqrt())

    def prob_entropy(self) -> float | None:
        """The mean binary entropy of the probabilities (class docstring); None when empty."""
        keys, counts, _ = self._all_scores()
        n = int(counts.sum())
        if n == 0:
            return None
        p = keys.double()
        h = -(p * torch.log(p + ENTROPY_EPS) + (1 - p) * torch.log(1 - p + ENTROPY_EPS))
        return float((counts.double() * h).sum() / n)


def _count_below(table: _CountTable, keys: torch.Tensor, side: str = "left") -> torch.Tensor:
    """For each of ``keys``: how many of the table's values are < it (``side="left"``) or <= it
    (``"right"``), int64."""
    cumulative = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(table.counts, 0)])
    return cumulative[torch.searchsorted(table.keys, keys, side=side)]


def average_precision(probs: torch.Tensor, targets: torch.Tensor) -> float | None:
    """AUPRC pooled over every element; equals sklearn's ``average_precision_score`` (ties
    included). None when ``targets`` holds no positive (sklearn returns 0.0 with a warning)."""
    scores = PooledScores()
    scores.update(probs, targets)
    return scores.average_precision()


def roc_auc(probs: torch.Tensor, targets: torch.Tensor) -> float | None:
    """ROC-AUC pooled over every element; equals sklearn's ``roc_auc_score`` (ties included).
    None when ``targets`` holds only one class (sklearn raises)."""
    scores = PooledScores()
    scores.update(probs, targets)
    return scores.roc_auc()


# ----------------------------------------------------------------------------------------------
# soft scores, soft Dice, confusion


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else float(num / den)


def scores_from_soft_counts(tp: float, fp: float, fn: float) -> dict[str, float | None]:
    """recall, precision, F2, IoU from (soft) counts; None where the denominator is 0."""
    return {"recall": _ratio(tp, tp + fn), "precision": _ratio(tp, tp + fp),
            "f2": _ratio(5 * tp, 5 * tp + 4 * fn + fp), "iou": _ratio(tp, tp + fp + fn)}


def soft_counts(probs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, float]:
    """Soft (TP, FP, FN) = (sum p t, sum p (1 - t), sum (1 - p) t), summed in float64."""
    p, t = _flat_pair(probs, targets)
    p, t = p.double(), t.double()
    return float((p * t).sum()), float((p * (1 - t)).sum()), float(((1 - p) * t).sum())


def soft_scores(probs: torch.Tensor, targets: torch.Tensor) -> dict[str, float | None]:
    """Pooled soft recall, precision, F2 and IoU (see the module docstring)."""
    return scores_from_soft_counts(*soft_counts(probs, targets))


def dice_per_image(probs: torch.Tensor, targets: torch.Tensor,
                   smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Soft Dice of each image of a batch (B, ...): (2 sum p t + s) / (sum p + sum t + s), float64
    (B,). With smooth = 0 an image with sum p + sum t = 0 scores 1.0 (EMPTY_MASK_POLICY)."""
    if smooth < 0:
        raise ValueError(f"smooth must be >= 0, got {smooth}")
    _flat_pair(probs, targets)  # checks
    p = _per_image(torch.as_tensor(probs).detach().double())
    t = _per_image(torch.as_tensor(targets).detach().to(p.device).double())
    inter, total = (p * t).sum(1), p.sum(1) + t.sum(1)
    dice = (2 * inter + smooth) / (total + smooth)
    return torch.where(total + smooth == 0, torch.ones_like(dice), dice)


def confusion(probs: torch.Tensor, targets: torch.Tensor,
              threshold: float = THRESHOLD) -> dict[str, int]:
    """Counts tp, fp, fn, tn (ints) of the hard prediction p >= threshold."""
    p, t = _flat_pair(probs, targets)
    pred = p >= threshold
    tp, fp, fn = int((pred & t).sum()), int((pred & ~t).sum()), int((~pred & t).sum())
    return {"tp": tp, "fp": fp, "fn": fn, "tn": p.numel() - tp - fp - fn}

