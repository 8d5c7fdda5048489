"""Segmentation metrics against cases counted by hand on 4x4 masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyroseg.metrics import (
    ECE_BINS,
    DistributionAccumulator,
    ReliabilityAccumulator,
    binary_cross_entropy,
    dice,
    ece,
    ged,
    ged_terms,
    hm_iou,
    iou,
    pairwise_iou,
    reliability_curve,
    sample_diversity,
    segmentation_report,
    volume_dice,
)

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


# ------------------------------------------------------------------ distributions of masks
#
# Four masks on the 4x4 grid:  A = 2 px, B = A + 2 px (so IoU(A, B) = 2/4), C = 1 px apart, E = empty.
# d = 1 - IoU:  d(A, B) = 0.5, d(A, E) = d(B, E) = d(A, C) = d(B, C) = d(C, E) = 1, d(E, E) = 0.

A = _mask((0, 0), (0, 1))
B = _mask((0, 0), (0, 1), (1, 0), (1, 1))
C = _mask((3, 3))
E = torch.zeros(H, W)


def _set(*masks) -> torch.Tensor:
    """One image's set of masks, ``(1, K, H, W)``."""
    return torch.stack(masks)[None]


def test_pairwise_iou_hand_counted_with_empty_on_empty_one():
    m = pairwise_iou(_set(A, B, E), _set(A, B, C, E))
    assert m.shape == (1, 3, 4)
    expected = [[1.0, 0.5, 0.0, 0.0], [0.5, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    assert m[0].flatten().tolist() == pytest.approx([v for row in expected for v in row])
    # bool, uint8 and float masks agree
    torch.testing.assert_close(pairwise_iou(_set(A, B, E).bool(), _set(A, B, C, E).to(torch.uint8)), m)
    with pytest.raises(ValueError, match="spatial"):
        pairwise_iou(_set(A), torch.zeros(1, 1, 5, 5))


def test_ged_hand_counted_both_estimators():
    samples, annots = _set(A, B), _set(A, E)
    # cross: d(A,A)=0, d(A,E)=1, d(B,A)=0.5, d(B,E)=1 -> 2.5 / 4
    # samples, all 4 ordered pairs: (0 + 0.5 + 0.5 + 0) / 4 = 0.25; distinct pairs only: 1 / 2 = 0.5
    # annotations: (0 + 1 + 1 + 0) / 4 = 0.5; distinct: 1
    terms = ged_terms(samples, annots)
    assert [float(terms[k][0]) for k in ("cross", "samples", "annotations")] == pytest.approx([0.625, 0.25, 0.5])
    assert float(ged(samples, annots)[0]) == pytest.approx(2 * 0.625 - 0.25 - 0.5)  # 0.5
    assert float(ged(samples, annots, unbiased=True)[0]) == pytest.approx(2 * 0.625 - 0.5 - 1.0)  # -0.25
    assert float(sample_diversity(samples)[0]) == pytest.approx(0.5)


def test_identical_sets_give_ged_zero_and_matched_iou_one():
    s = _set(A, B, E, C)
    assert float(ged(s, s)[0]) == pytest.approx(0.0, abs=1e-7)
    assert float(hm_iou(s, s)[0]) == pytest.approx(1.0)
    # the same set in another order is the same set
    assert float(hm_iou(s, _set(C, E, B, A))[0]) == pytest.approx(1.0)
    assert float(ged(s, _set(C, E, B, A))[0]) == pytest.approx(0.0, abs=1e-7)
    # the unbiased estimator of two identical sets of distinct masks is negative: for {A, B, E}
    # the 6 distinct ordered pairs sum to 2 * (0.5 + 1 + 1) = 5: 2 * 5/9 - 5/6 - 5/6 = -5/9
    s3 = _set(A, B, E)
    assert float(ged(s3, s3, unbiased=True)[0]) == pytest.approx(-5 / 9)


def test_empty_masks():
    # all empty: perfect agreement
    assert float(ged(_set(E, E), _set(E))[0]) == 0.0
    assert float(hm_iou(_set(E, E), _set(E))[0]) == 1.0
    assert float(sample_diversity(_set(E, E, E))[0]) == 0.0
    # empty samples on a non-empty annotation: d = 1 everywhere -> GED 2, matched IoU 0
    assert float(ged(_set(E, E), _set(A))[0]) == pytest.approx(2.0)
    assert float(hm_iou(_set(E, E), _set(A))[0]) == 0.0
    # half the annotators mark nothing: a model that always says A
    # cross = (0 + 1) / 2; annotations (0 + 1 + 1 + 0) / 4 = 0.5 -> 2 * 0.5 - 0 - 0.5 = 0.5
    assert float(ged(_set(A, A), _set(A, E))[0]) == pytest.approx(0.5)
    # ... and one that says A or nothing, like the annotators, at 4 samples: cross = 0.5,
    # samples: 8 of 16 ordered pairs differ -> 0.5: GED 2 * 0.5 - 0.5 - 0.5 = 0 (V) ; U: 1 - 8/12 - 1 = -2/3
    assert float(ged(_set(A, E, A, E), _set(A, E))[0]) == pytest.approx(0.0, abs=1e-7)
    assert float(ged(_set(A, E, A, E), _set(A, E), unbiased=True)[0]) == pytest.approx(1 - 8 / 12 - 1)


def test_hm_iou_replicates_the_smaller_set():
    # 4 samples, 2 annotators: each annotator twice -> A, A matched to A, B, B to B
    assert float(hm_iou(_set(A, A, B, B), _set(A, B))[0]) == pytest.approx(1.0)
    # a model that always says A: pairs (A, A) twice and (A, B) twice -> (1 + 1 + 0.5 + 0.5) / 4
    assert float(hm_iou(_set(A, A, A, A), _set(A, B))[0]) == pytest.approx(0.75)
    # one sample against 4 annotators: the sample replicated 4 times -> mean IoU with each
    assert float(hm_iou(_set(B), _set(A, B, E, E))[0]) == pytest.approx((0.5 + 1 + 0 + 0) / 4)
    # the best matching, not the greedy one: with pixels numbered 0..15 row by row,
    # S1 = 0..8, S2 = 3..9, Y1 = 0..9, Y2 = 0..2: IoU(S1, Y1) = 0.9, IoU(S1, Y2) = 1/3,
    # IoU(S2, Y1) = 0.7, IoU(S2, Y2) = 0. Greedy takes 0.9 then 0 (mean 0.45); the best
    # matching is (S1, Y2) + (S2, Y1): (1/3 + 0.7) / 2.
    def px(lo, hi):
        m = torch.zeros(H * W)
        m[lo : hi + 1] = 1
        return m.reshape(H, W)

    assert float(hm_iou(_set(px(0, 8), px(3, 9)), _set(px(0, 9), px(0, 2)))[0]) == pytest.approx((1 / 3 + 0.7) / 2)
    # 3 samples, 2 annotators (not a multiple): annotators become A, B, A
    assert float(hm_iou(_set(A, B, A), _set(A, B))[0]) == pytest.approx(1.0)


def test_batches_are_scored_image_by_image():
    samples = torch.cat([_set(A, B), _set(E, E), _set(A, A)])  # (3, 2, H, W)
    annots = torch.cat([_set(A, E), _set(E, E), _set(B, B)])
    g = ged(samples, annots)
    assert g.shape == (3,)
    assert g.tolist() == pytest.approx([0.5, 0.0, 2 * 0.5 - 0 - 0])
    assert hm_iou(samples, annots).tolist() == pytest.approx([0.5, 1.0, 0.5])
    assert sample_diversity(samples).tolist() == pytest.approx([0.5, 0.0, 0.0])
    acc = DistributionAccumulator()
    acc.update(samples[:2], annots[:2])
    acc.update(samples[2:], annots[2:])
    per = acc.per_image()
    assert per["ged"].tolist() == pytest.approx(g.tolist())
    assert per["ged_unbiased"].tolist() == pytest.approx(ged(samples, annots, unbiased=True).tolist())
    assert per["annotator_diversity"].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert acc.aggregate()["hm_iou"] == pytest.approx(2 / 3)


def test_unbiased_ged_of_the_true_distribution_is_zero_on_average():
    """Samples and annotations drawn from one distribution over {A, B, E} with p = (0.5, 0.3, 0.2):
    the unbiased estimator averages to 0; the default one to E[d] (1/S + 1/A)."""
    g = torch.Generator().manual_seed(0)
    masks = torch.stack([A, B, E])
    p = torch.tensor([0.5, 0.3, 0.2])
    n, s, a = 4000, 4, 3
    samples = masks[torch.multinomial(p, n * s, replacement=True, generator=g)].reshape(n, s, H, W)
    annots = masks[torch.multinomial(p, n * a, replacement=True, generator=g)].reshape(n, a, H, W)
    d = torch.tensor([[0, 0.5, 1], [0.5, 0, 1], [1, 1, 0]])
    e_d = float(p @ d @ p)  # E d(Y, Y') = 0.15 + 0.2 + 0.12 ... = 0.47
    unbiased = ged(samples, annots, unbiased=True)
    biased = ged(samples, annots)
    se = float(unbiased.std()) / n**0.5
    assert abs(float(unbiased.mean())) < 3 * se
    assert float(biased.mean()) == pytest.approx(e_d * (1 / s + 1 / a), abs=3 * float(biased.std()) / n**0.5)
    # diversity of samples from the distribution estimates E d without bias
    assert float(sample_diversity(samples).mean()) == pytest.approx(e_d, abs=0.02)


# ------------------------------------------------------------------ calibration


def test_ece_hand_counted():
    # 4 pixels at p = 0.05 (bin 0) of which 1 is lesion: |0.05 - 0.25| = 0.2
    # 4 pixels at p = 0.95 (bin 9), all lesion: |0.95 - 1| = 0.05; each bin holds half the pixels
    prob = torch.tensor([0.05] * 4 + [0.95] * 4).reshape(2, 2, 2)
    target = torch.tensor([0, 0, 0, 1] + [1] * 4, dtype=torch.float32).reshape(2, 2, 2)
    assert ece(prob, target) == pytest.approx(0.5 * 0.2 + 0.5 * 0.05)
    curve = reliability_curve(prob, target)
    assert len(curve["edges"]) == ECE_BINS + 1 == 11 and curve["edges"][0] == 0 and curve["edges"][-1] == 1
    assert curve["count"] == [4, 0, 0, 0, 0, 0, 0, 0, 0, 4]
    assert curve["confidence"][0] == pytest.approx(0.05) and curve["frequency"][0] == pytest.approx(0.25)
    assert math.isnan(curve["confidence"][5]) and math.isnan(curve["frequency"][5])
    # one bin: |mean p - mean y| over everything = |0.5 - 0.625|
    assert ece(prob, target, n_bins=1) == pytest.approx(0.125)


def test_ece_bin_edges_and_soft_targets():
    # 0.1 opens bin 1, 1.0 closes the last bin, 0.0 is bin 0
    curve = reliability_curve(torch.tensor([0.0, 0.1, 0.0999, 1.0]), torch.zeros(4))
    assert curve["count"] == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    # calibrated against soft targets (fraction of annotators): p = 0.25 where a quarter mark it
    prob = torch.full((3, H, W), 0.25)
    target = torch.full((3, H, W), 0.25)
    assert ece(prob, target) == pytest.approx(0.0, abs=1e-12)
    # the same calibration spread over 4 hard annotators: the mean of the targets per bin is what counts
    hard = torch.stack([torch.ones(H, W), torch.zeros(H, W), torch.zeros(H, W), torch.zeros(H, W)])  # (4, H, W)
    assert ece(torch.full((4, H, W), 0.25), hard) == pytest.approx(0.0, abs=1e-12)


def test_reliability_accumulator_equals_one_shot():
    g = torch.Generator().manual_seed(1)
    prob = torch.rand(6, H, W, generator=g)
    target = (torch.rand(6, H, W, generator=g) < prob).float()
    acc = ReliabilityAccumulator()
    acc.update(prob[:2], target[:2])
    acc.update(prob[2:], target[2:])
    assert acc.ece() == pytest.approx(ece(prob, target))
    assert acc.curve()["count"] == reliability_curve(prob, target)["count"]
    assert sum(acc.curve()["count"]) == 6 * H * W
    assert math.isnan(ReliabilityAccumulator().ece())
    with pytest.raises(ValueError, match="shape"):
        acc.update(prob, target[:1])


# ---------------------------------------------------------------------------------------
# every rater: rater counts (padding), rater mean, majority, per-rater Dice, QUBIQ score

from pyroseg.metrics import QUBIQ_THRESHOLDS, dice_per_rater, majority_vote, qubiq_score, rater_mean  # noqa: E402


def _row(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 1, -1)  # (1, 1, P): one slice, P pixels


def test_rater_mean_and_majority_read_only_real_raters():
    raters = torch.cat([_row(1, 1, 0, 0), _row(1, 0, 0, 0), _row(0, 0, 0, 0)], 1)  # (1, 3, 4); slot 2 padding
    counts = torch.tensor([2])
    assert rater_mean(raters, counts).tolist() == [[1.0, 0.5, 0.0, 0.0]]
    assert rater_mean(raters)[0].tolist() == pytest.approx([2 / 3, 1 / 3, 0.0, 0.0])  # None: all three
    assert majority_vote(raters, counts).tolist() == [[True, True, False, False]]  # 1 of 2 is a tie: lesion
    assert majority_vote(raters).tolist() == [[True, False, False, False]]


def test_dice_per_rater_is_nan_in_padded_slots():
    raters = torch.cat([_row(1, 1, 1, 0), _row(1, 1, 0, 0), _row(0, 0, 0, 0)], 1)
    d = dice_per_rater(_row(1, 1, 0, 0)[:, 0].bool(), raters, torch.tensor([2]))
    assert d[0, :2].tolist() == pytest.approx([0.8, 1.0]) and math.isnan(d[0, 2])


def test_qubiq_score_by_hand():
    """Raters' mean (1, 2/3, 1/3, 0), prediction (0.95, 0.55, 0.25, 0): the masks differ at t = 0.3
    (pred 2 px, raters 3 px: Dice 0.8) and t = 0.6 (1 px vs 2 px: 2/3); the other 7 thresholds agree."""
    raters = torch.cat([_row(1, 1, 1, 0), _row(1, 1, 0, 0), _row(1, 0, 0, 0)], 1)
    prob = _row(0.95, 0.55, 0.25, 0.0)[:, 0]
    assert QUBIQ_THRESHOLDS == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    assert qubiq_score(prob, raters).item() == pytest.approx((7 + 0.8 + 2 / 3) / 9)
    assert qubiq_score(torch.zeros(1, 4), torch.zeros(1, 3, 4)).item() == 1.0  # both empty: 1
    assert qubiq_score(torch.zeros(1, 4), raters).item() == 0.0  # nothing predicted where raters mark
    padded = torch.cat([raters, torch.zeros(1, 2, 4)], 1)  # the same three raters and two padded slots
    assert qubiq_score(prob, padded, torch.tensor([3])).item() == pytest.approx(qubiq_score(prob, raters).item())


def test_ged_and_hm_iou_with_counts_ignore_padding():
    """Slice 0 has 2 of 3 raters: scoring it against the padded set with counts equals scoring it
    against its two raters alone (an empty padded mask would otherwise count as a rater)."""
    g = torch.Generator().manual_seed(0)
    samples = (torch.rand(2, 5, H, W, generator=g) > 0.5).float()
    ann = (torch.rand(2, 3, H, W, generator=g) > 0.5).float()
    ann[0, 2] = 0
    counts = torch.tensor([2, 3])
    for fn in (ged, hm_iou):
        both = fn(samples, ann, counts=counts)
        assert both[0].item() == pytest.approx(fn(samples[:1], ann[:1, :2])[0].item())
        assert both[1].item() == pytest.approx(fn(samples[1:], ann[1:])[0].item())
        assert both[0].item() != pytest.approx(fn(samples[:1], ann[:1])[0].item())  # padding would change it
    acc = DistributionAccumulator()
    acc.update(samples, ann, counts)
    assert acc.per_image()["ged"][0] == pytest.approx(ged(samples[:1], ann[:1, :2])[0].item())
    assert acc.per_image()["annotator_diversity"][0] == pytest.approx(
        1 - pairwise_iou(ann[:1, :1], ann[:1, 1:2])[0, 0, 0].item())
