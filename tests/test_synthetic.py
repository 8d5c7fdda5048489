"""Tests of the synthetic data sources (pyroseg.data.synthetic): values, not only shapes."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pyroseg.data import synthetic as sy
from pyroseg.data.core import SegData
from pyroseg.data.synthetic import (
    ANNOTATOR_LEVELS,
    SOURCES,
    make_synthetic,
    make_synthetic_ambiguous,
    oracle_masks,
    oracle_masks_for,
    oracle_probabilities,
)
from pyroseg.errors import DataError, UsageError

N_PAT, N_SL = 20, 16
SEED = 0


@pytest.fixture(scope="module")
def plain() -> SegData:
    return make_synthetic(64, seed=SEED)


@pytest.fixture(scope="module")
def ambiguous() -> SegData:
    return make_synthetic_ambiguous(64, seed=SEED)


def _components(size=64, n_patients=N_PAT, slices=N_SL, seed=SEED, lesion_fraction=0.6, ambiguous=False):
    """Brain masks and level functions of every slice (N, S, S), from the private renderer."""
    edge = sy.AMBIGUOUS_EDGE_WIDTH if ambiguous else sy.EDGE_WIDTH
    faint = sy.FAINT_PATIENT_FRACTION if ambiguous else None
    parts = [r for _, r in sy._iter_patients(size, n_patients, slices, seed, lesion_fraction, edge, faint)]
    return (
        np.concatenate([r.brain for r in parts]),
        np.concatenate([r.rho_main for r in parts]),
        np.concatenate([r.rho_faint for r in parts]),
    )


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary dilation of (S, S) by a 3x3 cross, ``steps`` times."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    axes = tuple(range(1, a.ndim))
    inter = (a & b).sum(axes)
    union = (a | b).sum(axes)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


# --------------------------------------------------------------------------- make_synthetic


def test_same_seed_same_arrays_other_seed_differs():
    a = make_synthetic(32, n_patients=4, seed=3)
    b = make_synthetic(32, n_patients=4, seed=3)
    c = make_synthetic(32, n_patients=4, seed=4)
    for name in ("images", "masks", "patients", "slice_numbers"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.images, c.images)
    assert not np.array_equal(a.masks, c.masks)
    d = make_synthetic_ambiguous(32, n_patients=4, seed=3)
    e = make_synthetic_ambiguous(32, n_patients=4, seed=3)
    np.testing.assert_array_equal(d.images, e.images)
    np.testing.assert_array_equal(d.masks, e.masks)


def test_a_patient_does_not_depend_on_how_many_are_asked_for():
    few = make_synthetic(32, n_patients=3, seed=1)
    many = make_synthetic(32, n_patients=5, seed=1)
    np.testing.assert_array_equal(few.images, many.images[: len(few)])
    np.testing.assert_array_equal(few.masks, many.masks[: len(few)])


def test_shapes_dtypes_ids_and_meta(plain):
    n = N_PAT * N_SL
    assert plain.images.shape == (n, 3, 64, 64) and plain.images.dtype == np.uint8
    assert plain.masks.shape == (n, 1, 64, 64) and plain.masks.dtype == np.uint8
    assert set(np.unique(plain.masks).tolist()) == {0, 1}
    assert plain.patient_ids == [f"synth_{i:03d}" for i in range(N_PAT)]
    np.testing.assert_array_equal(plain.slice_numbers, np.tile(np.arange(1, N_SL + 1), N_PAT))
    assert plain.source == "synthetic"
    assert plain.meta["seed"] == SEED and plain.meta["generator"] == "make_synthetic"
    assert plain.meta["lesion_fraction"] == 0.6 and plain.meta["image_size"] == 64


def test_images_use_most_of_the_range_and_look_like_a_head(plain):
    img = plain.images.astype(np.float64)
    assert np.percentile(img, 99.5) > 200  # bright scalp
    assert np.percentile(img, 5) < 15  # dark background
    brain, _, _ = _components()
    # Background (corners) dark, brain mid-grey on every channel.
    assert img[:, :, :4, :4].mean() < 15
    for ch in range(3):
        assert 60 < img[:, ch][brain].mean() < 190
    # Channels differ (tissue contrasts are channel specific).
    assert np.abs(img[:, 0] - img[:, 1]).mean() > 10


def test_lesion_fraction_and_lesion_free_slices(plain):
    has = plain.masks.reshape(len(plain), -1).any(1)
    assert abs(has.mean() - 0.6) < 0.08
    assert (~has).sum() > 40
    for frac in (0.3, 0.8):
        d = make_synthetic(32, seed=5, lesion_fraction=frac)
        assert abs(d.masks.reshape(len(d), -1).any(1).mean() - frac) < 0.1
    none = make_synthetic(32, n_patients=3, lesion_fraction=0.0)
    assert none.masks.sum() == 0


def test_masks_are_inside_the_brain(plain):
    brain, rho, _ = _components()
    m = plain.masks[:, 0].astype(bool)
    assert not (m & ~brain).any()
    np.testing.assert_array_equal(m, rho <= 1.0)


def test_lesions_are_hyperintense_on_flair_with_varied_contrast(plain):
    brain, _, _ = _components()
    flair = plain.images[:, 1].astype(np.float64)
    diffs = []
    for i in np.flatnonzero(plain.masks.reshape(len(plain), -1).any(1)):
        m = plain.masks[i, 0].astype(bool)
        ring = _dilate(m, 3) & ~m & brain[i]
        diffs.append(flair[i][m].mean() - flair[i][ring].mean())
    diffs = np.array(diffs)
    assert (diffs > 0).mean() > 0.95
    assert np.median(diffs) > 10
    # From faint to clear.
    assert (diffs < 20).sum() >= 10 and (diffs > 45).sum() >= 10
    # Weaker, and the other way, on pre-contrast: darker than the ring on average.
    pre = plain.images[:, 0].astype(np.float64)
    pre_diffs = []
    for i in np.flatnonzero(plain.masks.reshape(len(plain), -1).any(1)):
        m = plain.masks[i, 0].astype(bool)
        ring = _dilate(m, 3) & ~m & brain[i]
        pre_diffs.append(pre[i][m].mean() - pre[i][ring].mean())
    assert np.mean(pre_diffs) < 0 and np.abs(pre_diffs).mean() < np.abs(diffs).mean()


def test_lesion_sizes_vary(plain):
    area = plain.masks.reshape(len(plain), -1).sum(1)
    area = area[area > 0]
    assert area.std() > 20
    assert area.min() < 15 and area.max() > 100


def test_lesions_are_3d_consistent(plain):
    m = plain.masks[:, 0].astype(bool).reshape(N_PAT, N_SL, 64, 64)
    has = m.any((2, 3))
    overlaps = []
    for p in range(N_PAT):
        idx = np.flatnonzero(has[p])
        if len(idx) == 0:
            continue
        assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), f"patient {p}: lesion slices not contiguous"
        overlaps += [(m[p, k] & m[p, k + 1]).any() for k in idx[:-1]]
    assert np.mean(overlaps) > 0.95
    # Some patients' lesions end before the first or the last slice.
    assert (~has[:, 0]).sum() > 5 and (~has[:, -1]).sum() > 5
    # The lesion grows then shrinks: the middle slice is bigger than the end slices.
    areas = m.sum((2, 3))
    bigger = []
    for p in range(N_PAT):
        idx = np.flatnonzero(has[p])
        if len(idx) >= 5:
            mid = areas[p, idx[len(idx) // 2]]
            bigger.append(mid > areas[p, idx[0]] and mid > areas[p, idx[-1]])
    assert np.mean(bigger) > 0.8


def test_resolution_consistency():
    lo = make_synthetic(64, n_patients=8, seed=SEED)
    hi = make_synthetic(128, n_patients=8, seed=SEED)
    m_lo = lo.masks[:, 0].astype(bool)
    m_hi = hi.masks[:, 0].reshape(-1, 64, 2, 64, 2).mean((2, 4)) >= 0.5
    lesion = m_lo.any((1, 2)) | m_hi.any((1, 2))
    iou = _iou(m_lo, m_hi)[lesion]
    assert (m_lo & m_hi).sum() / (m_lo | m_hi).sum() > 0.9
    assert np.median(iou) > 0.85
    big = m_lo.sum((1, 2))[lesion] >= 40  # small lesions lose a pixel or two on the border
    assert big.sum() > 10 and (iou[big] > 0.8).all()
    assert (iou > 0.6).mean() > 0.9  # the rest are lesion tips of a pixel or two
    # Same picture: the area-downsampled 128 image is close to the 64 one.
    img_hi = hi.images.astype(np.float64).reshape(-1, 3, 64, 2, 64, 2).mean((3, 5))
    assert np.abs(img_hi - lo.images).mean() < 8


@pytest.mark.parametrize("size", [16, 100])
def test_other_sizes(size):
    d = make_synthetic(size, n_patients=2, slices_per_patient=4)
    assert d.images.shape == (8, 3, size, size) and d.masks.shape == (8, 1, size, size)


def test_default_set_is_fast():
    start = time.perf_counter()
    make_synthetic(64)
    assert time.perf_counter() - start < 5.0  # about 0.2 s: guards against per-pixel loops


def test_bad_arguments_are_usage_errors():
    for kwargs in ({"image_size": 8}, {"seed": -1}, {"lesion_fraction": 1.5}, {"n_patients": 0}, {"slices_per_patient": 0}):
        with pytest.raises(UsageError):
            make_synthetic(**kwargs)
    for kwargs in ({"n_annotators": 0}, {"faint_prob": -0.1}, {"faint_fraction": 2}):
        with pytest.raises(UsageError):
            make_synthetic_ambiguous(**kwargs)


def test_sources_registry():
    assert SOURCES == {"synthetic": make_synthetic, "synthetic-ambiguous": make_synthetic_ambiguous}


# --------------------------------------------------------------------------- ambiguous


def test_ambiguous_shapes_and_meta(ambiguous):
    n = N_PAT * N_SL
    assert ambiguous.images.shape == (n, 3, 64, 64) and ambiguous.images.dtype == np.uint8
    assert ambiguous.masks.shape == (n, 4, 64, 64) and ambiguous.masks.dtype == np.uint8
    assert set(np.unique(ambiguous.masks).tolist()) == {0, 1}
    assert ambiguous.source == "synthetic-ambiguous"
    assert ambiguous.meta["annotator_levels"] == list(ANNOTATOR_LEVELS)
    assert ambiguous.meta["n_annotators"] == 4 and ambiguous.meta["faint_prob"] == 0.5
    assert make_synthetic_ambiguous(32, n_patients=2, n_annotators=7).masks.shape[1] == 7


def test_ambiguous_shares_the_heads_of_the_plain_source(plain, ambiguous):
    # Same heads, noise and main lesions; only the lesion borders and faint lesions differ.
    assert (plain.images == ambiguous.images).mean() > 0.95


def test_annotators_disagree_but_main_lesions_are_nested(ambiguous):
    brain, rho_main, rho_faint = _components(ambiguous=True)
    m = ambiguous.masks.astype(bool)
    lesion = m.any((1, 2, 3))
    differ = np.array([(m[i] != m[i, :1]).any() for i in range(len(m))])
    assert differ[lesion].mean() > 0.5
    main = m & ~(rho_faint <= 1.0)[:, None]  # the main lesions' part of every mask
    assert not (m & ~brain[:, None]).any()
    area = main.sum((2, 3))
    for i in np.flatnonzero(main.any((1, 2, 3))):
        order = np.argsort(area[i])
        for small, large in zip(order[:-1], order[1:]):
            assert not (main[i, small] & ~main[i, large]).any(), f"slice {i}: annotator masks not nested"
    # Every main mask is rho_main cut at one of the levels.
    for i in np.flatnonzero(main.any((1, 2, 3)))[:50]:
        for a in range(m.shape[1]):
            outside = ~(rho_faint[i] <= 1.0)
            assert any(np.array_equal(main[i, a], (rho_main[i] <= t) & outside) for t in ANNOTATOR_LEVELS)


def test_faint_lesion_is_marked_with_probability_p(ambiguous):
    _, rho_main, rho_faint = _components(ambiguous=True)
    region = (rho_faint <= 1.0) & (rho_main > max(ANNOTATOR_LEVELS))
    has = region.any((1, 2))
    assert has.sum() >= 15  # enough slices with a faint lesion
    own = (ambiguous.masks.astype(bool) & region[:, None]).any((2, 3))[has]
    assert abs(own.mean() - 0.5) < 0.15
    # Whole faint lesion or nothing: marked pixels are the whole region.
    marked = ambiguous.masks.astype(bool) & region[:, None]
    full = marked.sum((2, 3)) == region.sum((1, 2))[:, None]
    assert np.all(full[has] | ~own)
    fresh = oracle_masks(64, seed=SEED, n_samples=32, sample_seed=7).astype(bool)
    rate = (fresh & region[:, None]).any((2, 3))[has].mean()
    assert abs(rate - 0.5) < 0.05
    p02 = oracle_masks(64, seed=SEED, n_samples=32, sample_seed=7, faint_prob=0.2).astype(bool)
    assert abs((p02 & region[:, None]).any((2, 3))[has].mean() - 0.2) < 0.05


def test_oracle_regenerates_the_images_and_draws_fresh_masks(ambiguous):
    images, masks = oracle_masks(64, seed=SEED, n_samples=4, sample_seed=0, return_images=True)
    np.testing.assert_array_equal(images, ambiguous.images)
    assert masks.shape == ambiguous.masks.shape and masks.dtype == np.uint8
    assert not np.array_equal(masks, ambiguous.masks)  # fresh draws, not the data set's
    np.testing.assert_array_equal(masks, oracle_masks(64, seed=SEED, n_samples=4, sample_seed=0))
    assert not np.array_equal(masks, oracle_masks(64, seed=SEED, n_samples=4, sample_seed=1))
    np.testing.assert_array_equal(oracle_masks_for(ambiguous, n_samples=4, sample_seed=0), masks)


def test_oracle_masks_for_needs_an_ambiguous_full_set(plain, ambiguous):
    with pytest.raises(DataError):
        oracle_masks_for(plain)
    with pytest.raises(DataError):
        oracle_masks_for(ambiguous.subset(["synth_000"]))


def test_oracle_probabilities_match_the_sampled_frequencies():
    kwargs = dict(n_patients=4, slices_per_patient=8, seed=2, faint_fraction=1.0)
    prob = oracle_probabilities(32, **kwargs)
    assert prob.shape == (32, 32, 32) and prob.dtype == np.float32
    assert prob.min() >= 0.0 and prob.max() <= 1.0
    # Values are the documented mixture: multiples of 1/5 combined with faint_prob.
    assert ((prob > 0) & (prob < 1)).any()
    freq = oracle_masks(32, n_samples=400, sample_seed=3, **kwargs).mean(1)
    assert np.abs(freq - prob).mean() < 0.01
    assert np.abs(freq - prob).max() < 0.15
