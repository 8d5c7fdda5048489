"""SegData (validation, subset, summary) and its torch view SegDataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pyroseg.data.core import SegData, SegDataset, collate_batch, rater_pairs

N, C, H = 6, 3, 8  # slices, channels, size
A = 4  # annotators of the multi-annotator set


def _data(n=N, annotators=1, patients=None, seed=0) -> SegData:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, C, H, H), dtype=np.uint8)
    masks = np.zeros((n, annotators, H, H), dtype=np.uint8)
    for a in range(annotators):
        masks[:, a].reshape(n, -1)[:, : a + 1] = 1  # annotator a marks a + 1 pixels: identifiable by its sum
    if patients is None:
        patients = ["p1", "p1", "p2", "p3", "p3", "p3"][:n]
    return SegData(images, masks, np.array(patients), np.arange(n) + 1, source="test", meta={"k": 1})


# ------------------------------------------------------------------ SegData


@pytest.mark.parametrize(
    "images_shape, masks_shape, n_patients, n_slices, match",
    [
        ((N, H, H), (N, 1, H, H), N, N, "images must be"),  # images not 4-D
        ((N, C, H, H), (N, H, H), N, N, "masks"),  # masks not 4-D
        ((N, C, H, H), (N - 1, 1, H, H), N, N, "length mismatch"),
        ((N, C, H, H), (N, 1, H, H), N - 1, N, "length mismatch"),
        ((N, C, H, H), (N, 1, H, H), N, N + 1, "length mismatch"),
        ((N, C, H, H), (N, 1, H // 2, H // 2), N, N, "masks are"),
    ],
)
def test_segdata_validation(images_shape, masks_shape, n_patients, n_slices, match):
    with pytest.raises(ValueError, match=match):
        SegData(np.zeros(images_shape, np.uint8), np.zeros(masks_shape, np.uint8),
                np.array(["p"] * n_patients), np.arange(n_slices))


def test_segdata_properties():
    d = _data(annotators=A)
    assert len(d) == N and d.image_size == H and d.num_annotators == A
    assert d.patient_ids == ["p1", "p2", "p3"]


def test_subset_keeps_only_the_given_patients_in_data_order():
    d = _data()
    s = d.subset(["p3", "p1"])  # asked in another order: the data's order is kept
    assert s.patients.tolist() == ["p1", "p1", "p3", "p3", "p3"]
    assert s.slice_numbers.tolist() == [1, 2, 4, 5, 6]
    np.testing.assert_array_equal(s.images, d.images[[0, 1, 3, 4, 5]])
    np.testing.assert_array_equal(s.masks, d.masks[[0, 1, 3, 4, 5]])
    assert s.source == "test" and s.meta == {"k": 1} and s.meta is not d.meta
    assert len(d.subset([])) == 0
    assert len(d.subset(["nobody"])) == 0


def test_subset_does_not_match_an_id_by_its_prefix():
    """An id longer than the stored ones must not be cut to a stored one."""
    d = _data()
    assert len(d.subset(["p1_other"])) == 0
    assert d.subset(["p2", "p1_other"]).patients.tolist() == ["p2"]


def test_summary_counts():
    images = np.full((4, C, H, H), 51, dtype=np.uint8)
    masks = np.zeros((4, 2, H, H), dtype=np.uint8)
    masks[0, 0, :2, :2] = 1  # 4 px on slice 0 (annotator 0)
    masks[2, 0, 0, :4] = 1  # 4 px on slice 2
    masks[3, 1, 0, 0] = 1  # only annotator 1 marks slice 3: not counted (annotator 0 is the reference)
    d = SegData(images, masks, np.array(["a", "a", "b", "c"]), np.arange(4), source="hand")
    assert d.summary() == {
        "source": "hand",
        "n_patients": 3,
        "n_slices": 4,
        "image_size": H,
        "channels": C,
        "annotators": 2,
        "raters_per_slice": [2, 2],
        "slices_with_lesion": 2,
        "lesion_pixel_fraction": pytest.approx(8 / (4 * H * H)),
    }
    empty = d.subset([])
    assert empty.summary()["n_slices"] == 0 and empty.summary()["slices_with_lesion"] == 0


# ------------------------------------------------------------------ SegDataset


def test_getitems_scales_images_and_shapes_masks():
    d = _data()
    ds = SegDataset(d)
    b = ds.__getitems__([4, 0, 2])
    assert b["image"].shape == (3, C, H, H) and b["image"].dtype == torch.float32
    assert b["mask"].shape == (3, 1, H, H) and b["mask"].dtype == torch.float32
    assert b["masks"].shape == (3, 1, H, H)
    assert b["index"].tolist() == [4, 0, 2]
    torch.testing.assert_close(b["image"], torch.from_numpy(d.images[[4, 0, 2]]).float() / 255)
    assert float(b["image"].min()) >= 0 and float(b["image"].max()) <= 1
    torch.testing.assert_close(b["mask"], torch.from_numpy(d.masks[[4, 0, 2]]).float())
    # the stored uint8 data is not changed by the in-place division
    assert ds.images.dtype == torch.uint8 and torch.equal(ds.images, torch.from_numpy(d.images))


def test_indices_select_a_view_and_getitem_drops_the_batch_dim():
    d = _data()
    ds = SegDataset(d, indices=[5, 3])
    assert len(ds) == 2
    item = ds[1]
    assert item["image"].shape == (C, H, H) and item["mask"].shape == (1, H, H)
    assert int(item["index"]) == 3
    torch.testing.assert_close(item["image"], torch.from_numpy(d.images[3]).float() / 255)


def test_random_annotator_varies_and_is_always_one_of_them():
    d = _data(annotators=A)
    torch.manual_seed(0)
    ds = SegDataset(d, random_annotator=True)
    picked = []
    for _ in range(50):
        b = ds.__getitems__([0, 1, 2, 3])
        sums = b["mask"].reshape(4, -1).sum(1).long() - 1  # annotator a marks a + 1 pixels
        picked += sums.tolist()
        # the chosen mask is exactly that annotator's mask, and every annotator is still in "masks"
        for i, a in enumerate(sums.tolist()):
            assert torch.equal(b["mask"][i, 0], b["masks"][i, a])
        assert b["masks"].shape == (4, A, H, H)
    assert set(picked) == set(range(A))  # varies, and only ever one of the 4
    fixed = SegDataset(d, random_annotator=False)
    for _ in range(5):
        assert torch.equal(fixed.__getitems__([0, 1])["mask"][:, 0], fixed.masks[[0, 1], 0].float())


def test_dataloader_gives_whole_batches():
    d = _data(n=10, patients=[f"p{i}" for i in range(10)])
    ds = SegDataset(d)
    loader = DataLoader(ds, batch_size=4, shuffle=False, collate_fn=collate_batch)
    batches = list(loader)
    assert [len(b["index"]) for b in batches] == [4, 4, 2]
    assert batches[0]["image"].shape == (4, C, H, H) and batches[0]["mask"].shape == (4, 1, H, H)
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(10))
    torch.testing.assert_close(torch.cat([b["image"] for b in batches]), torch.from_numpy(d.images).float() / 255)


def test_rater_pairs_gives_every_real_rater_once_with_its_image():
    """Slice 0 has 3 real raters, slice 1 has 1 (two padded slots): 4 pairs, slice-major,
    no padded mask, each image beside its own raters' masks."""
    image = torch.stack([torch.full((1, 2, 2), 10.0), torch.full((1, 2, 2), 20.0)])  # (2, 1, 2, 2)
    masks = torch.arange(6, dtype=torch.float32).view(2, 3, 1, 1).expand(2, 3, 2, 2)  # rater k of slice i: 3i + k
    pairs, pair_masks = rater_pairs(image, masks, torch.tensor([3, 1]))
    assert pairs.shape == (4, 1, 2, 2) and pair_masks.shape == (4, 1, 2, 2)
    assert pairs[:, 0, 0, 0].tolist() == [10.0, 10.0, 10.0, 20.0]
    assert pair_masks[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]  # slice 1's padded slots 4, 5 never used
