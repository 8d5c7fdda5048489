"""Tests for the LGG reader (:mod:`pyroseg.data.lgg`) and the resizers (:mod:`pyroseg.data.resize`).

Most tests build tiny fake kaggle_3m folders in ``tmp_path``; the ``realdata``
tests read the development copy named by ``PYROSEG_LGG_DIR``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pyroseg.data.core import SegData
from pyroseg.data.lgg import SliceFiles, default_cache_dir, load_lgg, scan_lgg
from pyroseg.data.resize import resize_image, resize_mask
from pyroseg.errors import DataError, UsageError

P1, P2, P3 = "TCGA_AA_0001_20000101", "TCGA_AA_0002_20000202", "TCGA_BB_0003_20000303"
LAYOUT = {P1: [1, 2, 10], P2: [3, 1, 2], P3: [11, 9]}


# --------------------------------------------------------------------------- fake data


def _image(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _mask(seed: int, size: int = 32) -> np.ndarray:
    m = np.zeros((size, size), dtype=np.uint8)
    r = np.random.default_rng(1000 + seed)
    y, x = r.integers(0, size // 2, 2)
    m[y : y + size // 3, x : x + size // 4] = 255
    return m


def _save(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    img = Image.fromarray(arr)
    if mode is not None:
        img = img.convert(mode)
    img.save(path)


def make_lgg(parent: Path, layout: dict[str, list[int]] = LAYOUT, size: int | dict = 32) -> Path:
    """Write a fake ``parent/kaggle_3m`` (plus data.csv) and return the kaggle_3m path."""
    root = parent / "kaggle_3m"
    root.mkdir(parents=True)
    (root / "data.csv").write_text("Patient,x\n")
    for k, (p, slices) in enumerate(layout.items()):
        side = size[p] if isinstance(size, dict) else size
        (root / p).mkdir()
        for n in slices:
            seed = 100 * k + n
            _save(root / p / f"{p}_{n}.tif", _image(seed, side))
            _save(root / p / f"{p}_{n}_mask.tif", _mask(seed, side))
    return root


@pytest.fixture
def lgg(tmp_path: Path) -> Path:
    return make_lgg(tmp_path / "data")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _forbid_open(monkeypatch) -> None:
    """Make every ``PIL.Image.open`` fail, to prove a load opens no image file."""

    def boom(*args, **kwargs):
        raise AssertionError(f"Image.open called on a cache hit: {args}")

    monkeypatch.setattr(Image, "open", boom)


@pytest.fixture
def no_tiff(monkeypatch):
    _forbid_open(monkeypatch)


def _count_opens(monkeypatch) -> list:
    opened: list = []
    real = Image.open

    def counting(fp, *args, **kwargs):
        opened.append(fp)
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting)
    return opened


def _assert_same(a: SegData, b: SegData) -> None:
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.patients, b.patients)
    np.testing.assert_array_equal(a.slice_numbers, b.slice_numbers)
    assert a.meta == b.meta


def _data_error(root: Path, culprit: str, **kwargs) -> str:
    """Load ``root`` expecting a one-line DataError that names ``culprit``; return the message."""
    with pytest.raises(DataError) as info:
        load_lgg(root, 16, use_cache=False, **kwargs)
    msg = str(info.value)
    assert culprit in msg, msg
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- resize


def test_resize_image_integer_factor_is_exact_block_mean():
    img = np.zeros((4, 4, 2), dtype=np.uint8)
    img[:2, :2, 0] = [[0, 1], [1, 1]]  # mean 0.75 -> 1
    img[:2, 2:, 0] = [[0, 0], [1, 1]]  # mean 0.5  -> 1 (half up)
    img[2:, :2, 0] = [[1, 2], [3, 4]]  # mean 2.5  -> 3
    img[2:, 2:, 0] = [[255, 255], [255, 254]]  # 254.75 -> 255
    img[..., 1] = 7
    out = resize_image(img, 2)
    assert out.shape == (2, 2, 2) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], [[1, 1], [3, 255]])
    np.testing.assert_array_equal(out[1], 7)


@pytest.mark.parametrize("side,size", [(12, 4), (12, 3), (128, 64), (256, 64), (12, 1)])
def test_resize_image_matches_block_averaging(side, size):
    img = np.random.default_rng(side * size).integers(0, 256, (side, side, 3), dtype=np.uint8)
    f = side // size
    ref = img.astype(np.float64).reshape(size, f, size, f, 3).mean(axis=(1, 3))
    ref = np.floor(ref + 0.5).astype(np.uint8).transpose(2, 0, 1)
    np.testing.assert_array_equal(resize_image(img, size), ref)


def test_resize_image_same_size_is_channels_first_copy():
    img = _image(3, 8)
    out = resize_image(img, 8)
    assert out.shape == (3, 8, 8)
    np.testing.assert_array_equal(out, img.transpose(2, 0, 1))


def test_resize_image_non_integer_factor_uses_area_average():
    img = _image(4, 10)
    out = resize_image(img, 4)
    assert out.shape == (3, 4, 4) and out.dtype == np.uint8
    for c in range(3):
        ref = Image.fromarray(img[:, :, c].astype(np.float32), mode="F").resize((4, 4), Image.BOX)
        np.testing.assert_array_equal(out[c], np.floor(np.asarray(ref) + 0.5).astype(np.uint8))
    const = np.full((10, 10, 3), 77, dtype=np.uint8)
    np.testing.assert_array_equal(resize_image(const, 3), 77)
    assert resize_image(img, 15).shape == (3, 15, 15)  # upsampling works too


def test_resize_mask_majority_vote_tie_counts_as_lesion():
    m = np.zeros((4, 4), dtype=np.uint8)
    m[0, 0] = 1  # 1 of 4 -> 0
    m[0:2, 2:4] = [[1, 1], [0, 0]]  # 2 of 4 (tie) -> 1
    m[2:4, 0:2] = [[1, 1], [1, 0]]  # 3 of 4 -> 1
    out = resize_mask(m, 2)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 1], [1, 0]])
    np.testing.assert_array_equal(resize_mask(m.astype(bool), 2), out)


def test_resize_mask_same_size_unchanged_and_non_integer():
    m = (_mask(5, 9) > 0).astype(np.uint8)
    np.testing.assert_array_equal(resize_mask(m, 9), m)
    np.testing.assert_array_equal(resize_mask(np.ones((10, 10), bool), 3), 1)
    np.testing.assert_array_equal(resize_mask(np.zeros((10, 10), bool), 3), 0)
    half = np.zeros((6, 6), np.uint8)
    half[:, :3] = 1  # 6 -> 4: the middle columns straddle the edge
    assert set(np.unique(resize_mask(half, 4))) <= {0, 1}


def test_resize_rejects_bad_arguments():
    with pytest.raises(ValueError):
        resize_image(np.zeros((4, 6, 3), np.uint8), 2)
    with pytest.raises(ValueError):
        resize_mask(np.zeros((4, 4), np.uint8) + 255, 2)
    with pytest.raises(ValueError):
        resize_mask(np.zeros((4, 4), np.uint8), 0)


# --------------------------------------------------------------------------- scanning


def test_scan_pairs_files_and_sorts_slices_as_integers(lgg):
    files = scan_lgg(lgg)
    assert all(isinstance(f, SliceFiles) for f in files)
    assert [(f.patient, f.slice_number) for f in files] == [
        (P1, 1), (P1, 2), (P1, 10), (P2, 1), (P2, 2), (P2, 3), (P3, 9), (P3, 11),
    ]  # fmt: skip
    for f in files:
        assert f.image_path.name == f"{f.patient}_{f.slice_number}.tif"
        assert f.mask_path.name == f"{f.patient}_{f.slice_number}_mask.tif"
        assert f.image_path.parent.name == f.patient


def test_scan_accepts_parent_of_kaggle_3m_and_ignores_stray_files(lgg):
    (lgg.parent / "README.md").write_text("hi")
    (lgg / P1 / "notes.txt").write_text("not an image")
    (lgg / P1 / ".DS_Store").write_bytes(b"\0")
    (lgg / ".hidden").mkdir()
    assert scan_lgg(lgg.parent) == scan_lgg(lgg)
    assert load_lgg(lgg.parent, 16, use_cache=False).source == str(lgg)


# --------------------------------------------------------------------------- loading


def test_load_shapes_values_and_meta(lgg):
    data = load_lgg(lgg, 16, use_cache=False)
    files = scan_lgg(lgg)
    assert len(data) == len(files) == 8
    assert data.images.shape == (8, 3, 16, 16) and data.images.dtype == np.uint8
    assert data.masks.shape == (8, 1, 16, 16) and data.masks.dtype == np.uint8
    assert data.patient_ids == [P1, P2, P3]
    assert data.slice_numbers.tolist() == [1, 2, 10, 1, 2, 3, 9, 11]
    assert data.meta == {"image_size": 16, "original_sizes": [32]}
    assert data.source == str(lgg)
    for i, f in enumerate(files):
        img = np.asarray(Image.open(f.image_path))
        mask = np.asarray(Image.open(f.mask_path)) // 255
        np.testing.assert_array_equal(data.images[i], resize_image(img, 16))
        np.testing.assert_array_equal(data.masks[i, 0], resize_mask(mask, 16))
    assert set(np.unique(data.masks)) == {0, 1}


def test_load_mixed_original_sizes_and_mode_1_masks(tmp_path):
    root = make_lgg(tmp_path, {P1: [1, 2], P2: [1]}, size={P1: 32, P2: 48})
    _save(root / P1 / f"{P1}_2_mask.tif", _mask(7, 32), mode="1")
    data = load_lgg(root, 16, use_cache=False)
    assert data.meta["original_sizes"] == [32, 48]
    assert data.images.shape == (3, 3, 16, 16)
    np.testing.assert_array_equal(data.masks[1, 0], resize_mask(_mask(7, 32) // 255, 16))


def test_load_reports_progress(lgg, cache):
    calls: list = []
    load_lgg(lgg, 8, cache_dir=cache, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 8) for i in range(1, 9)]
    calls.clear()
    load_lgg(lgg, 8, cache_dir=cache, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(8, 8)]


@pytest.mark.parametrize("size", [0, -3, True, 2.5])
def test_bad_image_size_is_a_usage_error(lgg, size):
    with pytest.raises(UsageError):
        load_lgg(lgg, size, use_cache=False)


# --------------------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    _data_error(tmp_path / "nowhere", "nowhere")


def test_path_is_a_file(tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("x")
    msg = _data_error(f, "data.csv")
    assert "not a directory" in msg


def test_no_patient_folders(tmp_path):
    root = tmp_path / "kaggle_3m"
    root.mkdir()
    (root / "data.csv").write_text("x")
    assert "no patient folders" in _data_error(root, "kaggle_3m")


def test_patient_folder_without_slices(lgg):
    (lgg / "TCGA_ZZ_9999_20200202").mkdir()
    (lgg / "TCGA_ZZ_9999_20200202" / "notes.txt").write_text("x")
    assert "no slices" in _data_error(lgg, "TCGA_ZZ_9999_20200202")


def test_image_without_mask(lgg):
    (lgg / P2 / f"{P2}_2_mask.tif").unlink()
    msg = _data_error(lgg, f"{P2}_2.tif")
    assert "no mask" in msg and f"{P2}_2_mask.tif" in msg


def test_mask_without_image(lgg):
    (lgg / P1 / f"{P1}_10.tif").unlink()
    assert "no image" in _data_error(lgg, f"{P1}_10_mask.tif")


@pytest.mark.parametrize("name", ["foo.tif", f"{P1}_x.tif", f"{P1}_3_seg.tif", "TCGA_OTHER_1.tif", f"{P1}_4.TIF"])
def test_unexpected_tif_name(lgg, name):
    _save(lgg / P1 / name, _image(1))
    msg = _data_error(lgg, name)
    assert f"{P1}_<slice>.tif" in msg


def test_duplicate_slice_number(lgg):
    _save(lgg / P1 / f"{P1}_01.tif", _image(1))
    _data_error(lgg, f"{P1}_01.tif")


@pytest.mark.parametrize("cut", [0, 40, "half"])
def test_truncated_or_garbage_tiff(lgg, cut):
    path = lgg / P3 / f"{P3}_9.tif"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if cut == "half" else raw[:cut])
    assert "unreadable" in _data_error(lgg, f"{P3}_9.tif")


def test_truncated_mask(lgg):
    path = lgg / P3 / f"{P3}_11_mask.tif"
    path.write_bytes(path.read_bytes()[:300])
    _data_error(lgg, f"{P3}_11_mask.tif")


def test_image_not_square(lgg):
    _save(lgg / P2 / f"{P2}_3.tif", _image(1)[:, :20])
    msg = _data_error(lgg, f"{P2}_3.tif")
    assert "20x32" in msg and "square" in msg


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_image_not_rgb(lgg, mode):
    _save(lgg / P2 / f"{P2}_1.tif", _image(1), mode=mode)
    msg = _data_error(lgg, f"{P2}_1.tif")
    assert f"mode {mode}" in msg and "RGB" in msg


def test_mask_not_single_channel(lgg):
    _save(lgg / P1 / f"{P1}_2_mask.tif", _mask(1), mode="RGB")
    msg = _data_error(lgg, f"{P1}_2_mask.tif")
    assert "mode RGB" in msg and "single-channel" in msg


def test_mask_size_differs_from_image(lgg):
    _save(lgg / P1 / f"{P1}_2_mask.tif", _mask(1, 16))
    msg = _data_error(lgg, f"{P1}_2_mask.tif")
    assert "16x16" in msg and "32x32" in msg


def test_mask_values_other_than_0_and_255(lgg):
    m = _mask(1)
    m[0, :7] = [1, 2, 3, 4, 5, 6, 128]
    _save(lgg / P1 / f"{P1}_1_mask.tif", m)
    msg = _data_error(lgg, f"{P1}_1_mask.tif")
    assert "1, 2, 3, 4, 5" in msg and "128" not in msg and "2 more" in msg


# --------------------------------------------------------------------------- cache


def test_cache_hit_opens_no_tiff(lgg, cache, monkeypatch):
    first = load_lgg(lgg, 16, cache_dir=cache)
    files = list(cache.iterdir())
    assert len(files) == 1 and re.fullmatch(r"lgg-[0-9a-f]{16}\.npz", files[0].name)
    _forbid_open(monkeypatch)
    second = load_lgg(lgg, 16, cache_dir=cache)
    _assert_same(first, second)
    assert second.source == str(lgg)
    assert list(cache.iterdir()) == files  # no stray temp file


def test_cache_dir_defaults_to_env(lgg, tmp_path, monkeypatch):
    monkeypatch.setenv("PYROSEG_CACHE_DIR", str(tmp_path / "envcache"))
    assert default_cache_dir() == tmp_path / "envcache"
    load_lgg(lgg, 8)
    assert len(list((tmp_path / "envcache").glob("lgg-*.npz"))) == 1
    monkeypatch.delenv("PYROSEG_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "pyroseg"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "pyroseg"


def test_use_cache_false_neither_reads_nor_writes(lgg, cache, monkeypatch):
    load_lgg(lgg, 8, cache_dir=cache, use_cache=False)
    assert not cache.exists()
    load_lgg(lgg, 8, cache_dir=cache)
    opened = _count_opens(monkeypatch)
    load_lgg(lgg, 8, cache_dir=cache, use_cache=False)
    assert len(opened) == 16


def test_cache_invalidated_by_touch(lgg, cache, monkeypatch):
    load_lgg(lgg, 16, cache_dir=cache)
    path = lgg / P2 / f"{P2}_3_mask.tif"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))
    opened = _count_opens(monkeypatch)
    load_lgg(lgg, 16, cache_dir=cache)
    assert len(opened) == 16
    assert len(list(cache.glob("lgg-*.npz"))) == 2


def test_cache_invalidated_by_new_content(lgg, cache):
    before = load_lgg(lgg, 16, cache_dir=cache)
    path = lgg / P1 / f"{P1}_1_mask.tif"
    st = path.stat()
    _save(path, np.full((32, 32), 255, np.uint8))  # same file size (raw TIFF), new content
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a coarse clock must not hide the write
    after = load_lgg(lgg, 16, cache_dir=cache)
    assert before.masks[0].sum() < 256 and after.masks[0].sum() == 256


def test_cache_invalidated_by_added_slice_and_image_size(lgg, cache, monkeypatch):
    load_lgg(lgg, 16, cache_dir=cache)
    opened = _count_opens(monkeypatch)
    assert load_lgg(lgg, 8, cache_dir=cache).image_size == 8
    assert len(opened) == 16
    _save(lgg / P3 / f"{P3}_12.tif", _image(5))
    _save(lgg / P3 / f"{P3}_12_mask.tif", _mask(5))
    assert len(load_lgg(lgg, 16, cache_dir=cache)) == 9
    assert len(opened) == 16 + 18


def test_cache_survives_moving_the_folder(lgg, cache, tmp_path, monkeypatch):
    first = load_lgg(lgg, 16, cache_dir=cache)
    moved = tmp_path / "elsewhere" / "kaggle_3m"
    shutil.copytree(lgg, moved)  # copy2 keeps mtimes; the key uses paths relative to the data folder
    _forbid_open(monkeypatch)
    second = load_lgg(moved, 16, cache_dir=cache)
    _assert_same(first, second)
    assert second.source == str(moved)


@pytest.mark.parametrize("damage", ["garbage", "empty", "wrong_keys", "wrong_shape"])
def test_corrupt_cache_file_is_rebuilt(lgg, cache, caplog, damage):
    first = load_lgg(lgg, 16, cache_dir=cache)
    (path,) = cache.glob("lgg-*.npz")
    if damage == "garbage":
        path.write_bytes(b"this is not a zip file" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "wrong_keys":
        np.savez(path, images=first.images)
    else:
        with np.load(path) as z:
            arrays = dict(z)
        arrays["images"] = arrays["images"][:, :, :8]
        np.savez(path, **arrays)
    with caplog.at_level(logging.WARNING, logger="pyroseg.data.lgg"):
        second = load_lgg(lgg, 16, cache_dir=cache)
    _assert_same(first, second)
    assert any("cache" in r.getMessage() and path.name in r.getMessage() for r in caplog.records)
    with np.load(path) as z:  # rewritten whole
        np.testing.assert_array_equal(z["images"], first.images)


def test_unwritable_cache_dir_warns_and_continues(lgg, tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger="pyroseg.data.lgg"):
        data = load_lgg(lgg, 16, cache_dir=blocker / "cache")
    assert len(data) == 8
    assert any("continuing without a cache" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- real data


def _real_dir() -> Path:
    value = os.environ.get("PYROSEG_LGG_DIR")
    if not value:
        pytest.skip("PYROSEG_LGG_DIR not set: point it at the LGG kaggle_3m folder to run the real-data tests")
    path = Path(value).expanduser()
    if not path.is_dir():
        pytest.skip(f"PYROSEG_LGG_DIR={value} does not exist or is not a folder")
    return path


@pytest.fixture(scope="module")
def real_lgg(tmp_path_factory):
    """The real data loaded once at 32x32: ``(data folder, SegData, cache folder)``."""
    root = _real_dir()
    cache_dir = tmp_path_factory.mktemp("lgg-cache")
    data = load_lgg(root, 32, cache_dir=cache_dir)
    return Path(data.source), data, cache_dir


def _pairs_on_disk(root: Path) -> dict[str, list[int]]:
    """Slice numbers per patient folder, counted independently of the reader."""
    out: dict[str, list[int]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        names = {p.name for p in folder.glob("*.tif")}
        masks = {n[: -len("_mask.tif")] for n in names if n.endswith("_mask.tif")}
        images = {n[: -len(".tif")] for n in names if not n.endswith("_mask.tif")}
        assert masks == images, f"unpaired files in {folder}"
        out[folder.name] = sorted(int(n.rsplit("_", 1)[1]) for n in images)
    return out


@pytest.mark.realdata
def test_real_counts_and_pairing(real_lgg):
    root, data, _ = real_lgg
    on_disk = _pairs_on_disk(root)
    assert len(data) == sum(len(v) for v in on_disk.values())
    assert data.patient_ids == list(on_disk)  # patient id == folder name, sorted
    for patient, numbers in on_disk.items():
        assert data.slice_numbers[data.patients == patient].tolist() == numbers


@pytest.mark.realdata
def test_real_values(real_lgg):
    _, data, _ = real_lgg
    assert data.images.shape == (len(data), 3, 32, 32) and data.images.dtype == np.uint8
    assert data.masks.shape == (len(data), 1, 32, 32) and data.masks.dtype == np.uint8
    assert set(np.unique(data.masks)) == {0, 1}
    assert 0 < data.images.max() <= 255
    assert data.meta["image_size"] == 32
    assert all(isinstance(s, int) and s >= 1 for s in data.meta["original_sizes"])
    assert 0 < data.summary()["slices_with_lesion"] < len(data)


@pytest.mark.realdata
def test_real_second_load_is_a_cache_hit(real_lgg, no_tiff):
    root, data, cache_dir = real_lgg
    again = load_lgg(root, 32, cache_dir=cache_dir)
    _assert_same(data, again)


@pytest.mark.parametrize("saver", [np.savez, np.savez_compressed])
def test_read_npz_equals_numpys_reader(tmp_path, saver):
    """The cache reader reads stored members straight into the arrays; compressed
    ones go through numpy. Either way: numpy's arrays, dtypes and layouts."""
    from pyroseg.data.lgg import read_npz

    rng = np.random.default_rng(0)
    arrays = {
        "images": rng.integers(0, 256, (5, 3, 8, 8), dtype=np.uint8),
        "patients": np.array(["TCGA_CS_4941", "p2"]),
        "image_size": np.array(64, dtype=np.int64),
        "empty": np.zeros((0, 3), np.float32),
        "fortran": np.asfortranarray(rng.random((3, 4))),
    }
    saver(tmp_path / "a.npz", **arrays)
    got = read_npz(tmp_path / "a.npz")
    assert got.keys() == arrays.keys()
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and np.array_equal(got[k], v), k
    assert got["fortran"].flags["F_CONTIGUOUS"]


def test_read_npz_refuses_objects_and_truncation(tmp_path):
    from pyroseg.data.lgg import read_npz

    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="objects"):
        read_npz(tmp_path / "obj.npz")
    np.savez(tmp_path / "big.npz", x=np.zeros(10_000, np.uint8))
    raw = (tmp_path / "big.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[:5000] + raw[-200:])  # data cut short, directory kept
    with pytest.raises(OSError):
        read_npz(tmp_path / "cut.npz")
