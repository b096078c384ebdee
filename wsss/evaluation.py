"""Segmentation metrics for the pet (foreground) class, with ignore pixels (255, the trimap border) excluded.

Conventions:

- Ground truth holds 0 (background), 1 (pet) and 255 (ignore). Ignore pixels never count, in the
  prediction or the GT. A prediction of 255 counts as background.
- Per-image scores are averaged over images (``*_mean``); dataset scores accumulate intersections and
  unions over every pixel of every image first (``*_dataset``), so large images weigh more.
- IoU = I / U and Dice = 2I / (|P| + |G|). When both the prediction and the GT are empty (no pet pixel
  outside the ignore region), the prediction is perfect and scores 1.0; this keeps background-only images
  from producing NaN.
- ``miou`` is the mean of the dataset IoU of the background and of the pet class.
- Maps are thresholded as ``map >= t`` compared in float32, exactly as :mod:`wsss.refine` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

IGNORE = 255


@dataclass(frozen=True)
class SegScores:
    """Foreground IoU and Dice, per-image means and dataset-accumulated, plus the two-class mIoU."""

    iou_mean: float
    dice_mean: float
    iou_dataset: float
    dice_dataset: float
    miou: float
    n_images: int

    def to_dict(self) -> dict[str, float]:
        """Plain dict for JSON reports and MLflow."""
        return asdict(self)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else 1.0


def _check_shapes(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"prediction shape {pred.shape} and ground-truth shape {gt.shape} must be equal (H, W)")


def _check_gt(gt: np.ndarray) -> None:
    if np.any((gt > 1) & (gt != IGNORE)):
        bad = sorted({int(v) for v in np.unique(gt)} - {0, 1, IGNORE})
        raise ValueError(f"ground truth must hold 0, 1 or {IGNORE}; found {bad[:5]} (a raw trimap?)")


def _counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int, int]:
    """``(I, |P|, |G|, n_valid)`` over the non-ignored pixels."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    _check_shapes(pred, gt)
    _check_gt(gt)
    valid = gt != IGNORE
    p = (pred if pred.dtype == bool else pred == 1) & valid
    g = gt == 1
    inter = int(np.count_nonzero(p & g))
    return inter, int(np.count_nonzero(p)), int(np.count_nonzero(g)), int(np.count_nonzero(valid))


class SegMeter:
    """Streaming accumulator: add one image at a time (at its own resolution), then read :meth:`result`."""

    def __init__(self) -> None:
        self.ious: list[float] = []
        self.dices: list[float] = []
        self.inter = 0
        self.pred = 0
        self.gt = 0
        self.valid = 0

    def add(self, pred: np.ndarray, gt: np.ndarray) -> float:
        """Add one image and return its pet IoU.

        Args:
            pred: (H, W) bool or {0, 1} (255 counts as background).
            gt: (H, W) {0, 1, 255}.

        Raises:
            ValueError: the shapes differ, or ``gt`` holds other values.
        """
        inter, n_pred, n_gt, n_valid = _counts(pred, gt)
        iou = _ratio(inter, n_pred + n_gt - inter)
        self.ious.append(iou)
        self.dices.append(_ratio(2 * inter, n_pred + n_gt))
        self.inter += inter
        self.pred += n_pred
        self.gt += n_gt
        self.valid += n_valid
        return iou

    def merge(self, other: SegMeter) -> None:
        """Fold in another meter's images (e.g. one filled by a worker process)."""
        self.ious.extend(other.ious)
        self.dices.extend(other.dices)
        self.inter += other.inter
        self.pred += other.pred
        self.gt += other.gt
        self.valid += other.valid

    def result(self) -> SegScores:
        """Scores over every image added so far (NaN everywhere when none was added)."""
        if not self.ious:
            nan = float("nan")
            return SegScores(nan, nan, nan, nan, nan, 0)
        union = self.pred + self.gt - self.inter
        iou_fg = _ratio(self.inter, union)
        # Background: intersection = valid pixels outside the pet union; union = valid pixels outside I.
        iou_bg = _ratio(self.valid - union, self.valid - self.inter)
        return SegScores(
            iou_mean=float(np.mean(self.ious)),
            dice_mean=float(np.mean(self.dices)),
            iou_dataset=iou_fg,
            dice_dataset=_ratio(2 * self.inter, self.pred + self.gt),
            miou=(iou_fg + iou_bg) / 2,
            n_images=len(self.ious),
        )


def per_image_ious(pairs: Iterable[tuple[np.ndarray, np.ndarray]], thresholds: Sequence[float]) -> dict[float, np.ndarray]:
    """Per-image pet IoU at each threshold of ``(map or probability, GT {0, 1, 255})`` pairs (``map >= t``)."""
    meters = {t: SegMeter() for t in thresholds}
    for prob, gt in pairs:
        prob = np.asarray(prob, dtype=np.float32)
        for t, meter in meters.items():
            meter.add(prob >= np.float32(t), gt)
    return {t: np.asarray(m.ious, dtype=np.float64) for t, m in meters.items()}


# Folds of the cross-validated threshold of every map report (5 folds of 6 images on 30 val images).
THRESHOLD_CV_FOLDS = 5


@dataclass(frozen=True)
class CrossValidatedThreshold:
    """The pet IoU of a map at a threshold chosen on images it is not scored on.

    Attributes:
        iou_mean: mean over the images of each image's IoU at the threshold its fold's complement chose.
        thresholds: the threshold chosen for each fold, in fold order.
        folds: the number of folds actually used (fewer than asked when there are fewer images).
    """

    iou_mean: float
    thresholds: tuple[float, ...]
    folds: int


def cross_validated_threshold(ious: Mapping[float, np.ndarray], folds: int = THRESHOLD_CV_FOLDS,
                              prefer: float = 0.5) -> CrossValidatedThreshold:
    """K-fold estimate of "the IoU at a threshold chosen on val", free of the optimism of scoring the
    threshold on the images that chose it.

    Image ``i`` (in the order of ``ious``' arrays) falls in fold ``i % folds``. Each fold's threshold is
    the best mean IoU over the other folds' images (ties go to the threshold nearest ``prefer``); the
    fold's images are scored at it. With one image no choice can be held out: the estimate is NaN.

    Args:
        ious: per-image IoUs by threshold, every array over the same images (:func:`per_image_ious`).
        folds: number of folds (at most the number of images).
        prefer: the tie-break's reference threshold (the configured one).
    """
    thresholds = sorted(ious)
    if not thresholds:
        raise ValueError("no thresholds to choose from")
    table = np.stack([np.asarray(ious[t], dtype=np.float64) for t in thresholds], axis=1)
    n = len(table)
    k = min(int(folds), n)
    if k < 2:
        return CrossValidatedThreshold(float("nan"), (), 0)
    fold = np.arange(n) % k
    held_out = np.empty(n)
    chosen = []
    for f in range(k):
        rest = table[fold != f].mean(axis=0)
        j = max(range(len(thresholds)), key=lambda j: (rest[j], -abs(thresholds[j] - prefer)))
        chosen.append(float(thresholds[j]))
        held_out[fold == f] = table[fold == f, j]
    return CrossValidatedThreshold(float(held_out.mean()), tuple(chosen), k)


# Thresholds every map report's IoU curve is read at (and the ensemble tuning's threshold choices).
THRESHOLD_GRID: list[float] = [round(0.05 * i, 2) for i in range(21)]


def threshold_curve(
    maps: Iterable[np.ndarray], gts: Iterable[np.ndarray], thresholds: Sequence[float]
) -> dict[str, list[float]]:
    """Pet IoU and Dice of ``map >= t`` for every threshold, in one pass over the images.

    Each image's valid pixels are binned by how many (sorted) thresholds they reach, separately for pet
    and background pixels; reverse cumulative sums then give every threshold's counts at once. The
    result is exact, not a histogram approximation.

    Args:
        maps: (H, W) float maps in [0, 1], one per image.
        gts: matching (H, W) {0, 1, 255} ground truths.
        thresholds: decision thresholds, any order.

    Returns:
        ``threshold``, ``iou_mean``, ``iou_dataset``, ``dice_mean``, ``dice_dataset``: lists in the order of
        ``thresholds`` (NaN scores when there are no images).
    """
    thr = np.asarray(thresholds, dtype=np.float32).reshape(-1)
    order = np.argsort(thr, kind="stable")
    sorted_thr = thr[order]
    n_thr = len(thr)
    iou_sum = np.zeros(n_thr)
    dice_sum = np.zeros(n_thr)
    inter_tot = np.zeros(n_thr, dtype=np.int64)
    pred_tot = np.zeros(n_thr, dtype=np.int64)
    gt_tot = 0
    n_images = 0
    for m, gt in zip(maps, gts, strict=True):
        m, gt = np.asarray(m, dtype=np.float32), np.asarray(gt)
        _check_shapes(m, gt)
        _check_gt(gt)
        valid = gt != IGNORE
        fg = gt == 1
        # Number of sorted thresholds each pixel reaches (map >= t).
        reached = np.searchsorted(sorted_thr, m, side="right")
        reached[np.isnan(m)] = 0  # searchsorted puts NaN above every threshold; `NaN >= t` is False
        fg_hist = np.bincount(reached[fg], minlength=n_thr + 1)
        bg_hist = np.bincount(reached[valid & ~fg], minlength=n_thr + 1)
        # Pixels reaching sorted threshold k are those with bin index > k.
        inter = np.cumsum(fg_hist[::-1])[::-1][1:]
        false_pos = np.cumsum(bg_hist[::-1])[::-1][1:]
        n_gt = int(fg_hist.sum())
        union = n_gt + false_pos
        iou_sum += np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        denom = inter + false_pos + n_gt
        dice_sum += np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0)
        inter_tot += inter
        pred_tot += inter + false_pos
        gt_tot += n_gt
        n_images += 1
    union_tot = pred_tot + gt_tot - inter_tot
    denom_tot = pred_tot + gt_tot
    by_sorted = {
        "iou_mean": iou_sum / max(n_images, 1),
        "iou_dataset": np.where(union_tot > 0, inter_tot / np.maximum(union_tot, 1), 1.0),
        "dice_mean": dice_sum / max(n_images, 1),
        "dice_dataset": np.where(denom_tot > 0, 2 * inter_tot / np.maximum(denom_tot, 1), 1.0),
    }
    if n_images == 0:
        by_sorted = {k: np.full(n_thr, np.nan) for k in by_sorted}
    out: dict[str, list[float]] = {"threshold": [float(t) for t in np.asarray(thresholds, dtype=float)]}
    inverse = np.empty_like(order)
    inverse[order] = np.arange(n_thr)
    for key, values in by_sorted.items():
        out[key] = [float(v) for v in np.asarray(values)[inverse]]
    return out


def balanced_accuracy(pred: Tensor, target: Tensor) -> float:
    """Mean per-class recall of class predictions over the classes present in ``target`` (NaN when empty).

    Unlike accuracy it exposes a predictor that always answers the majority class (it scores 1 / #classes).
    """
    recalls = [float((pred[target == c] == c).float().mean()) for c in target.unique().tolist()]
    return sum(recalls) / len(recalls) if recalls else float("nan")
