"""Segmentation metrics against cases counted by hand on 4x4 masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyroseg.metrics import binary_cross_entropy, dice, iou, segmentation_report, volume_dice

H = W = 4
EPS = 1e-6  # binary_cross_entropy's default clip
LOG2 = math.log(2.0)


def _mask(*pixels, h=H, w=W) -> torch.Tensor:
    """A (H, W) 0/1 float mask with ones at the given (row, col) pixels."""
    m = torch.zeros(h, w)
    for r, c in pixels:
        m[r, c] = 1.0
    return m


def _stack(*masks) -> torch.Tensor:
    return torch.stack(masks)  # (N, H, W)


# ------------------------------------------------------------------ dice / iou

# pred: 3 pixels, truth: 3 pixels, 2 shared.
PRED = _mask((0, 0), (0, 1), (1, 0))
TRUTH = _mask((0, 0), (0, 1), (2, 2))


def test_dice_and_iou_hand_counted():
    d = dice(PRED[None], TRUTH[None])
    j = iou(PRED[None], TRUTH[None])
    assert d.shape == (1,) and j.shape == (1,)
    assert float(d[0]) == pytest.approx(2 * 2 / (3 + 3))  # 0.667
    assert float(j[0]) == pytest.approx(2 / (3 + 3 - 2))  # 0.5


def test_dice_per_slice_and_trailing_dims():
    """Each slice scored alone; a (N, 1, H, W) input gives the same (N,) result."""
    full = torch.ones(H, W)
    half = _mask(*[(r, c) for r in range(2) for c in range(W)])  # 8 pixels, top half
    pred = _stack(PRED, full, half)
    truth = _stack(TRUTH, half, half)
    expected = [4 / 6, 2 * 8 / (16 + 8), 1.0]
    assert dice(pred, truth).tolist() == pytest.approx(expected)
    assert dice(pred[:, None], truth[:, None]).tolist() == pytest.approx(expected)
    assert iou(pred, truth).tolist() == pytest.approx([0.5, 8 / 16, 1.0])
    # booleans work as well as floats
    assert dice(pred.bool(), truth.bool()).tolist() == pytest.approx(expected)


def test_empty_conventions():
    empty = torch.zeros(H, W)
    some = _mask((1, 1), (2, 2))
    pred = _stack(empty, empty, some)
    truth = _stack(empty, some, empty)
    # empty on empty = 1; empty pred on non-empty truth = 0; non-empty pred on empty truth = 0
    assert dice(pred, truth).tolist() == [1.0, 0.0, 0.0]
    assert iou(pred, truth).tolist() == [1.0, 0.0, 0.0]
    assert dice(pred, truth, empty_score=0.0).tolist() == [0.0, 0.0, 0.0]
    assert iou(pred, truth, empty_score=float("nan"))[0].isnan()


def test_dice_is_symmetric_and_bounded():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(20, H, W, generator=g) > 0.5
    b = torch.rand(20, H, W, generator=g) > 0.5
    d, j = dice(a, b), iou(a, b)
    torch.testing.assert_close(d, dice(b, a))
    assert bool(((d >= 0) & (d <= 1)).all())
    # Dice = 2 J / (1 + J) for every pair
    torch.testing.assert_close(d, 2 * j / (1 + j))


# ------------------------------------------------------------------ cross-entropy


def test_bce_of_half_is_log2_whatever_the_target():
    prob = torch.full((3, H, W), 0.5)
    target = _stack(torch.zeros(H, W), torch.ones(H, W), TRUTH)
    out = binary_cross_entropy(prob, target)
    assert out.shape == (3,)
    assert out.tolist() == pytest.approx([LOG2] * 3)


def test_bce_hand_counted_and_clipped():
    # slice 0: 4 of 16 pixels certain and wrong (p = 0 where t = 1), the rest certain and right
    # slice 1: p = 0.25 where t = 0 everywhere: -log(0.75)
    t0 = _mask((0, 0), (1, 1), (2, 2), (3, 3))
    p0 = torch.zeros(H, W)
    p1 = torch.full((H, W), 0.25)
    out = binary_cross_entropy(_stack(p0, p1), _stack(t0, torch.zeros(H, W)))
    wrong, right = -math.log(EPS), -math.log(1 - EPS)
    assert torch.isfinite(out).all()  # p = 0 where t = 1 costs -log(eps), not inf
    assert float(out[0]) == pytest.approx((4 * wrong + 12 * right) / 16, rel=1e-5)
    assert float(out[1]) == pytest.approx(-math.log(0.75), rel=1e-6)
    # p = 1 where t = 1: about 0 (clipped to 1 - eps), not NaN
    perfect = binary_cross_entropy(torch.ones(1, H, W), torch.ones(1, H, W))
    assert 0 < float(perfect[0]) < 1e-5
    # a larger eps caps the cost of a confident mistake lower
    capped = binary_cross_entropy(torch.zeros(1, H, W), torch.ones(1, H, W), eps=1e-2)
    assert float(capped[0]) == pytest.approx(-math.log(1e-2), rel=1e-5)


# ------------------------------------------------------------------ volume Dice


def test_volume_dice_pools_the_slices_of_a_patient():
    # patient "a": slice 1 a perfect 1-pixel hit (Dice 1), slice 2 misses 3 pixels (Dice 0):
    # mean of slices 0.5, but pooled 2*1 / (1 + 4) = 0.4.
    # patient "b": empty everywhere -> 1.  patient "c": prediction, no truth -> 0.
    a1p, a1t = _mask((0, 0)), _mask((0, 0))
    a2p, a2t = torch.zeros(H, W), _mask((1, 1), (1, 2), (2, 1))
    e = torch.zeros(H, W)
    pred = _stack(a1p, a2p, e, e, _mask((3, 3)))
    truth = _stack(a1t, a2t, e, e, e)
    groups = ["a", "a", "b", "b", "c"]
    vol = volume_dice(pred, truth, groups)
    assert list(vol) == ["a", "b", "c"]  # order of first appearance
    assert vol["a"] == pytest.approx(0.4)
    assert float(dice(pred[:2], truth[:2]).mean()) == pytest.approx(0.5)  # what pooling must not give
    assert vol["b"] == 1.0
    assert vol["c"] == 0.0


def test_volume_dice_groups_need_not_be_contiguous():
    pred = _stack(_mask((0, 0)), _mask((0, 0)), _mask((0, 0)))
    truth = _stack(_mask((0, 0)), torch.zeros(H, W), _mask((0, 0), (0, 1)))
    vol = volume_dice(pred, truth, np.array(["p", "q", "p"]))
    # p: slices 0 and 2 -> inter 2, |P| 2, |T| 3 -> 0.8 ; q: 1 predicted, 0 true -> 0
    assert vol == pytest.approx({"p": 0.8, "q": 0.0})


# ------------------------------------------------------------------ the report


def _report_case():
    """4 slices of 2 patients; probabilities 0 or 1 so BCE counts the mistakes.

    0 (a): truth 2 px, predicted exactly              Dice 1,   IoU 1
    1 (a): truth 2 px, predicted 1 of them + 1 extra  Dice 0.5, IoU 1/3
    2 (b): truth empty, 1 px predicted                Dice 0    (false-positive slice)
    3 (b): truth empty, nothing predicted             Dice 1
    """
    t0, p0 = _mask((0, 0), (0, 1)), _mask((0, 0), (0, 1))
    t1, p1 = _mask((2, 2), (2, 3)), _mask((2, 2), (3, 3))
    t2, p2 = torch.zeros(H, W), _mask((1, 1))
    t3, p3 = torch.zeros(H, W), torch.zeros(H, W)
    return _stack(p0, p1, p2, p3), _stack(t0, t1, t2, t3), np.array(["a", "a", "b", "b"])


def test_segmentation_report_hand_counted():
    prob, truth, groups = _report_case()
    rep = segmentation_report(prob, truth, groups)
    assert set(rep) == {"dice_all", "dice_tumour", "dice_volume", "iou_tumour", "bce", "false_positive_slices",
                        "empty_slices", "n_patients", "n_slices"}
    assert rep["dice_all"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)  # 0.625
    assert rep["dice_tumour"] == pytest.approx((1 + 0.5) / 2)  # empty slices ignored
    assert rep["iou_tumour"] == pytest.approx((1 + 1 / 3) / 2)
    # volume: a pooled: inter 2 + 1, |P| 4, |T| 4 -> 0.75; b: prediction without truth -> 0
    assert rep["dice_volume"] == pytest.approx((0.75 + 0.0) / 2)
    assert rep["false_positive_slices"] == pytest.approx(1 / 2)
    assert rep["empty_slices"] == pytest.approx(2 / 4)
    assert rep["n_patients"] == 2 and rep["n_slices"] == 4
    # 3 wrong pixels out of 64, every one certain (rel 1e-3: 1 - eps rounds in float32)
    wrong, right = -math.log(EPS), -math.log(1 - EPS)
    assert rep["bce"] == pytest.approx((3 * wrong + 61 * right) / 64, rel=1e-3)
    for k in ("n_patients", "n_slices"):
        assert isinstance(rep[k], int)
    for k in ("dice_all", "dice_tumour", "dice_volume", "iou_tumour", "bce", "false_positive_slices", "empty_slices"):
        assert isinstance(rep[k], float)


def test_report_thresholds_at_half_inclusive_and_predicting_nothing():
    _, truth, groups = _report_case()
    at_half = segmentation_report(torch.full((4, H, W), 0.5), truth, groups)
    assert at_half["false_positive_slices"] == 1.0  # p = 0.5 counts as predicted
    below = segmentation_report(torch.full((4, H, W), 0.49), truth, groups)
    # predicting nothing anywhere scores dice_all = the share of empty slices, nothing on tumour slices
    assert below["dice_all"] == pytest.approx(below["empty_slices"]) == pytest.approx(0.5)
    assert below["dice_tumour"] == 0.0 and below["iou_tumour"] == 0.0
    assert below["false_positive_slices"] == 0.0
    # a custom threshold moves the cut
    assert segmentation_report(torch.full((4, H, W), 0.3), truth, groups, threshold=0.25)["false_positive_slices"] == 1.0


def test_report_without_tumour_or_without_empty_slices_gives_nan_not_an_error():
    empty = torch.zeros(2, H, W)
    rep = segmentation_report(empty, empty, ["a", "b"])
    assert rep["dice_all"] == 1.0 and rep["dice_volume"] == 1.0
    assert math.isnan(rep["dice_tumour"]) and math.isnan(rep["iou_tumour"])
    assert rep["empty_slices"] == 1.0 and rep["n_patients"] == 2
    full = torch.ones(2, H, W)
    rep = segmentation_report(full, full, ["a", "a"])
    assert math.isnan(rep["false_positive_slices"])
    assert rep["dice_tumour"] == 1.0 and rep["empty_slices"] == 0.0 and rep["n_patients"] == 1
