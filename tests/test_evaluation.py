"""Segmentation metrics: conventions, ignore handling, per-image vs dataset, threshold curves."""

from __future__ import annotations

import numpy as np
import pytest

from wsss.evaluation import SegMeter, cross_validated_threshold, per_image_ious, threshold_curve


def fg_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """One image's pet IoU, as the meter scores it."""
    return SegMeter().add(pred, gt)


# 4x4 GT with three ignore (border) pixels: 13 valid pixels, 4 of them pet.
GT = np.array(
    [
        [0, 0, 255, 0],
        [0, 1, 1, 255],
        [255, 1, 1, 0],
        [0, 0, 0, 0],
    ],
    dtype=np.uint8,
)


def test_perfect_prediction_scores_one() -> None:
    meter = SegMeter()
    assert meter.add(GT == 1, GT) == 1.0
    meter.add((GT == 1).astype(np.uint8), GT)
    scores = meter.result().to_dict()
    assert scores.pop("n_images") == 2
    assert scores == {k: 1.0 for k in scores}


def test_all_pet_prediction_by_hand() -> None:
    meter = SegMeter()
    iou = meter.add(np.ones((4, 4), np.uint8), GT)
    # valid = 13, |G| = 4, |P| = 13 (ignore pixels dropped), I = 4, U = 13
    assert iou == pytest.approx(4 / 13)
    s = meter.result()
    assert s.iou_mean == s.iou_dataset == pytest.approx(4 / 13)
    assert s.dice_mean == s.dice_dataset == pytest.approx(2 * 4 / (13 + 4))
    # background: I_bg = 0, so bg IoU = 0 and mIoU = (4/13 + 0) / 2
    assert s.miou == pytest.approx(2 / 13)


def test_ignore_pixels_do_not_count() -> None:
    pred = (GT == 1).astype(np.uint8)
    noisy = pred.copy()
    noisy[GT == 255] = 1  # predictions inside the ignore region are free
    assert fg_iou(noisy, GT) == 1.0
    marked = pred.copy()
    marked[1, 1] = 255  # a 255 in the prediction counts as background
    assert fg_iou(marked, GT) == pytest.approx(3 / 4)


def test_empty_prediction_and_gt_is_perfect() -> None:
    gt = np.zeros((3, 3), np.uint8)
    gt[0, 0] = 255
    assert fg_iou(np.zeros((3, 3), bool), gt) == 1.0
    assert fg_iou(np.ones((3, 3), bool), gt) == 0.0


def test_dataset_vs_per_image_mean() -> None:
    meter = SegMeter()
    big = np.ones((4, 4), np.uint8)
    meter.add(big, big)  # I = 16, U = 16 -> 1.0
    small_gt = np.ones((2, 2), np.uint8)
    small_pred = np.zeros((2, 2), np.uint8)
    small_pred[0, 0] = 1
    assert meter.add(small_pred, small_gt) == pytest.approx(0.25)  # I = 1, U = 4
    s = meter.result()
    assert s.iou_mean == pytest.approx((1.0 + 0.25) / 2)
    assert s.iou_dataset == pytest.approx(17 / 20)
    assert s.dice_mean == pytest.approx((1.0 + 2 / 5) / 2)
    assert s.dice_dataset == pytest.approx(2 * 17 / (17 + 20))
    assert s.n_images == 2


def test_merge_equals_single_meter() -> None:
    a, b, both = SegMeter(), SegMeter(), SegMeter()
    rng = np.random.default_rng(0)
    for i in range(4):
        pred = rng.random((4, 4)) > 0.5
        (a if i < 2 else b).add(pred, GT)
        both.add(pred, GT)
    a.merge(b)
    assert a.result() == both.result()


def test_shape_and_value_errors() -> None:
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(3, 4\)"):
        fg_iou(np.zeros((4, 4)), np.zeros((3, 4), np.uint8))
    with pytest.raises(ValueError, match="0, 1 or 255"):
        fg_iou(np.zeros((2, 2)), np.full((2, 2), 3, np.uint8))


def test_empty_meter_is_nan() -> None:
    s = SegMeter().result()
    assert s.n_images == 0 and np.isnan(s.iou_mean)


def test_threshold_curve_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    maps, gts = [], []
    for h, w in [(7, 9), (12, 5), (6, 6)]:
        gt = (rng.random((h, w)) > 0.6).astype(np.uint8)
        gt[rng.random((h, w)) > 0.85] = 255
        maps.append(rng.random((h, w)).astype(np.float16))
        gts.append(gt)
    gts[2][gts[2] == 1] = 0  # one image without any pet pixel
    maps[0][0, 0] = np.float16(0.3)  # a value exactly at a threshold
    thresholds = [0.5, 0.3, 0.0, 0.9, 1.0, 0.3]
    curve = threshold_curve(iter(maps), iter(gts), thresholds)
    assert curve["threshold"] == thresholds
    for k, t in enumerate(thresholds):
        meter = SegMeter()
        for m, gt in zip(maps, gts, strict=True):
            meter.add(m.astype(np.float32) >= np.float32(t), gt)
        s = meter.result()
        assert curve["iou_mean"][k] == pytest.approx(s.iou_mean)
        assert curve["iou_dataset"][k] == pytest.approx(s.iou_dataset)
        assert curve["dice_mean"][k] == pytest.approx(s.dice_mean)
        assert curve["dice_dataset"][k] == pytest.approx(s.dice_dataset)


def test_threshold_curve_nan_map_is_background() -> None:
    gt = np.array([[1, 0]], np.uint8)
    curve = threshold_curve([np.array([[np.nan, 0.0]], np.float32)], [gt], [0.5])
    assert curve["iou_mean"] == [0.0]


# --- cross-validated threshold ------------------------------------------------------------------------------


def test_per_image_ious_matches_the_curve_and_casts_like_it() -> None:
    rng = np.random.default_rng(2)
    maps = [rng.random((5, 6)).astype(np.float16) for _ in range(3)]
    gts = [(rng.random((5, 6)) > 0.5).astype(np.uint8) for _ in range(3)]
    ious = per_image_ious(zip(maps, gts, strict=True), (0.3, 0.6))
    curve = threshold_curve(maps, gts, (0.3, 0.6))
    assert [float(ious[t].mean()) for t in (0.3, 0.6)] == pytest.approx(curve["iou_mean"])
    assert all(len(v) == 3 for v in ious.values())


def test_cross_validated_threshold_scores_each_image_at_a_threshold_it_did_not_choose() -> None:
    # Each image prefers a different threshold: the best threshold on all images scores 0.5, but a
    # threshold chosen on the other image is always the wrong one for the held-out image.
    ious = {0.3: np.array([1.0, 0.0]), 0.7: np.array([0.0, 1.0])}
    cv = cross_validated_threshold(ious, folds=2)
    assert cv.iou_mean == 0.0 and cv.thresholds == (0.7, 0.3) and cv.folds == 2
    assert max(float(v.mean()) for v in ious.values()) == 0.5


def test_cross_validated_threshold_equals_the_best_when_every_image_agrees() -> None:
    rng = np.random.default_rng(3)
    base = rng.random(30)
    ious = {0.3: base * 0.5, 0.5: base * 0.8, 0.8: base}  # 0.8 is the best for every image
    cv = cross_validated_threshold(ious, folds=5)
    assert cv.thresholds == (0.8,) * 5 and cv.iou_mean == pytest.approx(float(base.mean()))


def test_cross_validated_threshold_ties_fewer_images_and_one_image() -> None:
    tied = {0.2: np.array([0.5, 0.5, 0.5]), 0.4: np.array([0.5, 0.5, 0.5]), 0.9: np.array([0.5, 0.5, 0.5])}
    assert cross_validated_threshold(tied, folds=5, prefer=0.25).thresholds == (0.2, 0.2, 0.2)  # 3 folds
    assert cross_validated_threshold(tied, folds=5, prefer=0.8).thresholds == (0.9, 0.9, 0.9)
    one = cross_validated_threshold({0.5: np.array([0.7])})
    assert np.isnan(one.iou_mean) and one.folds == 0 and one.thresholds == ()
    with pytest.raises(ValueError, match="no thresholds"):
        cross_validated_threshold({})
