"""The LIDC pickle reader: format, safety (numpy-only unpickler), errors, cache, the real copy."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from rater_files import lidc_record, square_mask, write_evil_lidc, write_lidc

import pyroseg.data.lidc as lidc
from pyroseg.data import load_source, source_kind
from pyroseg.data.lidc import load_lidc, safe_load_pickle
from pyroseg.errors import DataError


def _three(tmp_path: Path) -> Path:
    recs = {"a0": lidc_record("s1", value=0.5), "a1": lidc_record("s2", value=1.0), "a2": lidc_record("s1", raters=3, value=0.0)}
    return write_lidc(tmp_path / "data_lidc.pickle", recs)


def test_reads_records_in_order_with_their_raters(tmp_path):
    d = load_lidc(_three(tmp_path), 16, cache_dir=tmp_path / "cache")
    assert d.images.shape == (3, 1, 16, 16) and d.masks.shape == (3, 4, 16, 16)
    assert d.patients.tolist() == ["s1", "s2", "s1"]
    assert d.slice_numbers.tolist() == [0, 0, 1]  # position among the series' records
    assert d.rater_counts.tolist() == [4, 4, 3]
    assert d.images[:, 0, 0, 0].tolist() == [128, 255, 0]  # round(255 x)
    for r in range(4):
        assert d.masks[0, r].sum() == (2 + 2 * r) ** 2
    assert d.masks[2, 3].sum() == 0  # padding after the third rater
    assert d.meta["intensity"] == "floats in [0, 1] times 255, rounded"
    assert d.summary()["raters_per_slice"] == [3, 4]


def test_resizes_masks_by_majority_vote(tmp_path):
    rec = lidc_record("s", size=16, raters=1)
    rec["masks"] = [square_mask(16, 0, 4)]
    d = load_lidc(write_lidc(tmp_path / "x.pickle", {"k": rec}), 8, cache_dir=tmp_path / "c")
    assert d.masks.shape == (1, 1, 8, 8) and d.masks[0, 0].sum() == 4  # 4x4 px -> 2x2 px


def test_a_folder_of_pickles_is_read_in_name_order(tmp_path):
    write_lidc(tmp_path / "lidc" / "b.pickle", {"k2": lidc_record("s2")})
    write_lidc(tmp_path / "lidc" / "a.pkl", {"k1": lidc_record("s1")})
    assert source_kind(str(tmp_path / "lidc")) == "lidc"
    d = load_source(str(tmp_path / "lidc"), 16, cache_dir=tmp_path / "cache")
    assert d.patients.tolist() == ["s1", "s2"]


def test_numpy_1_names_are_admitted(tmp_path):
    """Files written by numpy 1.x name numpy.core.multiarray._reconstruct (the published file does)."""
    raw = pickle.dumps({"k": lidc_record("s")}, protocol=3)  # GLOBAL opcodes: module names as plain text
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in raw
    (tmp_path / "old.pickle").write_bytes(raw)
    d = load_lidc(tmp_path / "old.pickle", 16, use_cache=False)
    assert d.rater_counts.tolist() == [4]


def test_a_pickle_that_would_create_a_file_is_refused_and_creates_nothing(tmp_path):
    target = tmp_path / "PWNED"
    path = write_evil_lidc(tmp_path / "evil.pickle", target)
    proof = tmp_path / "plain_pickle_ran_it"
    with open(write_evil_lidc(tmp_path / "proof.pickle", proof), "rb") as fh:
        pickle.load(fh)["k1"]["image"].close()  # the payload is real: plain pickle creates the file
    assert proof.exists()
    with pytest.raises(DataError) as e:
        load_lidc(path, 16, cache_dir=tmp_path / "cache")
    assert str(path) in str(e.value) and "io.open" in str(e.value) and "refused" in str(e.value)
    assert not target.exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("module, name", [("os", "system"), ("builtins", "eval"), ("numpy", "load"), ("numpy.core.multiarray", "frombuffer")])
def test_any_other_global_is_refused_by_name(tmp_path, module, name):
    raw = f"c{module}\n{name}\n.".encode()  # protocol 0 GLOBAL opcode, then STOP
    (tmp_path / "g.pickle").write_bytes(raw)
    with pytest.raises(DataError, match=f"refused to load the global {module}.{name}"):
        safe_load_pickle(tmp_path / "g.pickle")


def test_truncated_pickle(tmp_path):
    path = _three(tmp_path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="truncated or not a pickle") as e:
        load_lidc(path, 16, use_cache=False)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("field", ["image", "masks", "series_uid"])
def test_record_lacking_a_field(tmp_path, field):
    rec = lidc_record("s")
    del rec[field]
    path = write_lidc(tmp_path / "x.pickle", {"ok": lidc_record("s"), "bad_key": rec})
    with pytest.raises(DataError, match=f"record 'bad_key' lacks '{field}'") as e:
        load_lidc(path, 16, use_cache=False)
    assert str(path) in str(e.value)


def test_masks_of_different_sizes_in_one_record(tmp_path):
    rec = lidc_record("s")
    rec["masks"][2] = np.zeros((8, 8), np.uint8)
    path = write_lidc(tmp_path / "x.pickle", {"k7": rec})
    with pytest.raises(DataError, match=r"record 'k7': 'masks'\[2\] is 8x8 but 'masks'\[0\] is 16x16"):
        load_lidc(path, 16, use_cache=False)


def test_masks_not_binary_and_no_rater(tmp_path):
    rec = lidc_record("s")
    rec["masks"][1] = rec["masks"][1] * 255
    with pytest.raises(DataError, match="expected only 0 and 1"):
        load_lidc(write_lidc(tmp_path / "a.pickle", {"k": rec}), 16, use_cache=False)
    rec = lidc_record("s")
    rec["masks"] = []
    with pytest.raises(DataError, match="no rater"):
        load_lidc(write_lidc(tmp_path / "b.pickle", {"k": rec}), 16, use_cache=False)


def test_second_load_comes_from_the_cache(tmp_path, monkeypatch):
    path = _three(tmp_path)
    first = load_lidc(path, 16, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("lidc-*.npz"))) == 1

    def refuse(p):
        raise AssertionError("opened the pickle on a cache hit")

    monkeypatch.setattr(lidc, "safe_load_pickle", refuse)
    second = load_lidc(path, 16, cache_dir=tmp_path / "cache")
    assert np.array_equal(first.masks, second.masks) and second.rater_counts.tolist() == [4, 4, 3]
    os.utime(path, ns=(1, 1))  # touched: a fresh decode
    with pytest.raises(AssertionError, match="opened the pickle"):
        load_lidc(path, 16, cache_dir=tmp_path / "cache")


@pytest.fixture(scope="module")
def lidc_path() -> Path:
    path = os.environ.get("PYROSEG_LIDC_PATH")
    if not path:
        pytest.skip("PYROSEG_LIDC_PATH not set: point it at data_lidc.pickle (or the subset) to run this test")
    if not Path(path).exists():
        pytest.skip(f"PYROSEG_LIDC_PATH={path} does not exist")
    return Path(path)


@pytest.mark.realdata
def test_real_lidc_copy(lidc_path, tmp_path):
    d = load_source(str(lidc_path), 64, cache_dir=tmp_path / "cache")
    assert d.num_annotators == 4 and d.images.shape[1] == 1
    assert len(d.patient_ids) < len(d)  # several crops per scan: patients are series, not crops
    marked = d.masks.reshape(len(d), 4, -1).any(-1).sum(1)  # non-empty masks per crop
    assert set(np.unique(marked).tolist()) <= {0, 1, 2, 3, 4} and marked.max() == 4
    assert 0 < d.images.mean() < 255
