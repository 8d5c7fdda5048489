"""The LIDC pickle reader: format, safety (numpy-only unpickler), errors, cache, the real copy.

The crafted pickles below are written opcode by opcode (``_asm``): each is an attack
a security review found against an allow-list unpickler (numpy's own ``__setstate__``
driven into a segfault, memory bombs from small files), or a legitimate spelling
(protocols 2, 4 and 5; ``numpy.core`` and ``numpy._core``) that must load.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from rater_files import lidc_record, square_mask, write_evil_lidc, write_lidc

import pyroseg.data.lidc as lidc
from pyroseg.data import load_source, source_kind
from pyroseg.data.lidc import MAX_SLOTS, load_lidc, safe_load_pickle
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


# --------------------------------------------------------------------------- hand-built pickles
# (the public builders are also rows of tests/test_bad_inputs.py)

P = pickle
MA = "numpy._core.multiarray"


def _g(module: str, name: str) -> bytes:
    return P.GLOBAL + f"{module}\n{name}\n".encode()


def _s(text: str) -> bytes:
    data = text.encode()
    return P.BINUNICODE + struct.pack("<I", len(data)) + data


def _b(data: bytes) -> bytes:
    return P.BINBYTES + struct.pack("<I", len(data)) + data


def _i(n: int) -> bytes:
    return P.BININT + struct.pack("<i", n)


def _put(k: int) -> bytes:
    return P.LONG_BINPUT + struct.pack("<I", k)


def _get(k: int) -> bytes:
    return P.BINGET + bytes([k]) if k < 256 else P.LONG_BINGET + struct.pack("<I", k)


def _tuple(*items: bytes) -> bytes:
    return P.MARK + b"".join(items) + P.TUPLE


def _asm(*ops: bytes) -> bytes:
    """A protocol-2 pickle of ``ops``."""
    return P.PROTO + b"\x02" + b"".join(ops) + P.STOP


def _dtype(spec: str, order: str = "<", elsize: int = -1, align: int = -1, flags: int = 0,
           names: bytes = P.NONE, fields: bytes = P.NONE) -> bytes:
    """``numpy.dtype(spec)``, then BUILD with the state numpy's own pickles carry (or a hostile one)."""
    state = _tuple(_i(3), _s(order), P.NONE, names, fields, _i(elsize), _i(align), _i(flags))
    return _g("numpy", "dtype") + _s(spec) + P.NEWFALSE + P.NEWTRUE + P.TUPLE3 + P.REDUCE + state + P.BUILD


def _array(shape: tuple[int, ...], dtype: bytes, raw: bytes, module: str = MA) -> bytes:
    """``_reconstruct(ndarray, (0,), b'b')``, then BUILD with ``(1, shape, dtype, False, raw)``, as numpy pickles arrays."""
    head = _g(module, "_reconstruct") + _g("numpy", "ndarray") + _i(0) + P.TUPLE1 + _b(b"b") + P.TUPLE3 + P.REDUCE
    return head + _tuple(_i(1), _tuple(*[_i(d) for d in shape]), dtype, P.NEWFALSE, raw) + P.BUILD


def segfault_pickle() -> bytes:
    """A V8 dtype whose state (BUILD) gives it an object field, over 8 bytes of 'pointer':
    plain ``pickle.load`` (numpy's own setstate) crashes when it frees the array."""
    obj = _dtype("O8", "|", flags=63)
    fields = P.EMPTY_DICT + _s("f0") + P.MARK + obj + _i(0) + P.TUPLE + P.SETITEM
    v8 = _dtype("V8", "|", elsize=8, align=1, flags=1, names=_s("f0") + P.TUPLE1, fields=fields)
    return _asm(_array((1,), v8, _b(struct.pack("<Q", 0x4141414141414141))))


def object_array_pickle() -> bytes:
    """``numpy.ndarray((10**8,), 'O')``: 32 bytes asking for 800 MB."""
    return _asm(_g("numpy", "ndarray") + _i(10**8) + P.TUPLE1 + _s("O") + P.TUPLE2 + P.REDUCE)


def short_data_pickle() -> bytes:
    """An array of 100,000 x 100,000 float32 (40 GB) with 16 bytes of data."""
    return _asm(_array((100_000, 100_000), _dtype("f4"), _b(bytes(16))))


def huge_bytes_pickle() -> bytes:
    """BINBYTES8 declaring a terabyte, with 16 bytes behind it."""
    return _asm(_array((2**19, 2**19), _dtype("f4"), P.BINBYTES8 + struct.pack("<Q", 2**40) + bytes(16)))


def memo_bomb(records: int, raters: int = 4, side: int = 512) -> bytes:
    """``records`` LIDC records whose image and masks are each rebuilt (``_reconstruct`` + BUILD) from one
    ``side x side`` image's and one mask's bytes, stored once and fetched from the memo: ~100 bytes a record,
    where an unpickler that copies the bytes into each array takes ``(4 + raters) x side^2`` bytes a record."""
    quarter = np.pad(np.ones((side // 2, side // 2), np.uint8), (0, side // 2))
    head = [_b(np.full((side, side), 0.5, np.float32).tobytes()), _put(0), _b(quarter.tobytes()), _put(1),
            _dtype("f4"), _put(2), _dtype("u1", "|"), _put(3), _tuple(_i(side), _i(side)), _put(4), _s("image"), _put(5),
            _s("masks"), _put(6), _s("series_uid"), _put(7), _s("s1"), _put(8), _g(MA, "_reconstruct"), _put(9),
            _g("numpy", "ndarray") + _i(0) + P.TUPLE1 + _b(b"b") + P.TUPLE3, _put(10), _i(1), _put(11)]

    def arr(raw: int, dt: int) -> bytes:
        return _get(9) + _get(10) + P.REDUCE + _tuple(_get(11), _get(4), _get(dt), P.NEWFALSE, _get(raw)) + P.BUILD

    rec = (P.EMPTY_DICT + P.MARK + _get(5) + arr(0, 2) + _get(6) + P.EMPTY_LIST + P.MARK + arr(1, 3) * raters + P.APPENDS
           + _get(7) + _get(8) + P.SETITEMS)
    body = b"".join(_s(f"k{k}") + rec for k in range(records))
    return _asm(*head, P.EMPTY_DICT, P.MARK, body, P.SETITEMS)


def many_raters_pickle(records: int, raters: int) -> bytes:
    """``records`` records sharing one image and one list of ``raters`` references to one 16x16 mask."""
    image = _array((16, 16), _dtype("f4"), _b(np.full((16, 16), 0.5, np.float32).tobytes()))
    mask = _array((16, 16), _dtype("u1", "|"), _b(np.eye(16, dtype=np.uint8).tobytes()))
    masks = P.EMPTY_LIST + P.MARK + mask + _put(1) + _get(1) * (raters - 1) + P.APPENDS
    first = P.EMPTY_DICT + P.MARK + _s("image") + image + _s("masks") + masks + _s("series_uid") + _s("s") + P.SETITEMS + _put(2)
    rest = b"".join(_s(f"k{k}") + _get(2) for k in range(1, records))
    return _asm(P.EMPTY_DICT, P.MARK, _s("k0"), first, rest, P.SETITEMS)


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / "in" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


REFUSED = {
    "segfault": (segfault_pickle, "refused the numpy dtype 'V8'"),
    "object array": (object_array_pickle, "refused numpy.ndarray(...) called directly"),
    "short data": (short_data_pickle, "needs 40,000,000,000 bytes where the pickle gives 16"),
    "huge bytes": (huge_bytes_pickle, "truncated or not a pickle (pickle data was truncated (it declares 1,099,511,627,776 bytes"),
    "dtype with fields": (lambda: _asm(_array((1,), _dtype("f4", fields=P.EMPTY_DICT), _b(bytes(4)))), "refused the state"),
    "dtype with flags": (lambda: _asm(_array((1,), _dtype("f8", flags=1), _b(bytes(8)))), "refused the state"),
    "object data": (lambda: _asm(_array((1,), _dtype("f4"), P.EMPTY_LIST)), "an array of Python objects"),
    "negative shape": (lambda: _asm(_array((-4,), _dtype("u1", "|"), _b(bytes(4)))), "refused the array shape (-4,)"),
    "bytes(n)": (lambda: _asm(_g("__builtin__", "bytes") + _i(10**9) + P.TUPLE1 + P.REDUCE), "refused bytes(1000000000,)"),
    "BUILD on a dict": (lambda: _asm(P.EMPTY_DICT + P.EMPTY_DICT + P.BUILD), "refused setting the state of a dict (BUILD)"),
    "REDUCE on a dict": (lambda: _asm(P.EMPTY_DICT + P.EMPTY_TUPLE + P.REDUCE), "refused a call of {} (REDUCE)"),
    "tuple key": (lambda: _asm(P.EMPTY_DICT + _i(1) + P.TUPLE1 + _i(2) + P.SETITEM), "a dict key of type tuple"),
    "set": (lambda: _asm(P.EMPTY_SET), "refused the opcode EMPTY_SET"),
    "extension code": (lambda: _asm(P.EXT1 + b"\x01"), "refused the extension code 1"),
    "NEWOBJ": (lambda: _asm(_g("numpy", "dtype") + P.EMPTY_TUPLE + P.NEWOBJ), "refused the opcode NEWOBJ"),
    "out-of-band buffer": (lambda: _asm(P.NEXT_BUFFER), "pickled out-of-band"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_crafted_pickle_is_refused_in_one_line(tmp_path, name):
    build, words = REFUSED[name]
    path = _write(tmp_path, "data_lidc.pickle", build())
    with pytest.raises(DataError) as e:
        safe_load_pickle(path)
    msg = str(e.value)
    assert words in msg and str(path) in msg and "\n" not in msg, msg


def test_the_segfault_payload_is_real(tmp_path):
    """Plain pickle (numpy's own __setstate__ on allowed names) crashes on it; the reader refuses it."""
    path = _write(tmp_path, "segv.pickle", segfault_pickle())
    code = f"import pickle; pickle.load(open({str(path)!r}, 'rb'))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)))
    if r.returncode >= 0:
        pytest.skip(f"this numpy ({np.__version__}) does not crash on the payload (exit {r.returncode})")
    assert r.returncode == -signal.SIGSEGV


def _numpy1_names(data: bytes) -> bytes:
    """``data`` with numpy 2's ``numpy._core`` names spelled as numpy 1.x writes them (``numpy.core``)."""
    if data[2:3] == P.FRAME:  # protocol 4/5: unframe, so the shorter strings need no frame sizes
        ops = list(pickletools.genops(data))
        ends = [pos for _, _, pos in ops[1:]] + [len(data)]
        data = b"".join(data[pos:end] for (op, _, pos), end in zip(ops, ends) if op.name != "FRAME")
        for old in (b"numpy._core.multiarray", b"numpy._core.numeric"):
            data = data.replace(bytes([P.SHORT_BINUNICODE[0], len(old)]) + old,
                                bytes([P.SHORT_BINUNICODE[0], len(old) - 1]) + old.replace(b"._core", b".core"))
        return data
    return data.replace(b"numpy._core.", b"numpy.core.")


def _records() -> dict:
    recs = {"a0": lidc_record("s1", value=0.25), "a1": lidc_record("s2", raters=3, value=1.0)}
    recs["a1"]["image"] = np.asfortranarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16))
    recs["a1"]["masks"][0] = recs["a1"]["masks"][0].astype(">u2")  # big-endian: explicit byte order
    recs["a0"]["masks"] = np.stack(recs["a0"]["masks"])  # a (A, H, W) array is a list of masks too
    return recs


@pytest.mark.parametrize("numpy1", [False, True], ids=["numpy._core", "numpy.core"])
def test_protocols_2_4_5_give_the_same_arrays(tmp_path, numpy1):
    recs = _records()
    loaded, raws = {}, {}
    for protocol in (2, 4, 5):
        raw = pickle.dumps(recs, protocol=protocol)
        raw = _numpy1_names(raw) if numpy1 else raw
        expected_names = {2: b"_codecs\nencode", 4: b"_reconstruct", 5: b"_frombuffer"}[protocol]
        assert expected_names in raw and (b"numpy.core." in raw) == numpy1 and (b"numpy._core." in raw) != numpy1
        path = _write(tmp_path, f"p{protocol}.pickle", raw)
        raws[protocol] = safe_load_pickle(path)
        loaded[protocol] = load_lidc(path, 8, use_cache=False)
    for protocol, out in raws.items():
        for key, rec in recs.items():
            got = out[key]
            assert got["series_uid"] == rec["series_uid"]
            assert got["image"].dtype == rec["image"].dtype and np.array_equal(got["image"], rec["image"]), protocol
            for m, n in zip(got["masks"], rec["masks"]):
                assert m.dtype == n.dtype and np.array_equal(m, n), protocol
    first = loaded[2]
    for d in loaded.values():
        for k in ("images", "masks", "rater_counts", "patients", "slice_numbers"):
            assert np.array_equal(getattr(d, k), getattr(first, k)), k
    assert first.rater_counts.tolist() == [4, 3] and first.images[0].max() == 64  # round(255 * 0.25)


def test_scalars_and_odd_arrays_round_trip(tmp_path):
    obj = {"f": np.float32(2.5), "i": np.int64(-7), "c": np.arange(3, dtype=np.complex64), "b": np.array([True, False]),
           "e": np.zeros((0, 3)), "t": [np.arange(4, dtype="<i8"), (1, 2.0, "x", b"y", None)]}
    for protocol in (0, 2, 3, 4, 5):
        out = safe_load_pickle(_write(tmp_path, f"o{protocol}.pickle", pickle.dumps(obj, protocol=protocol)))
        assert type(out["f"]) is np.float32 and out["f"] == 2.5 and out["i"] == -7
        for k in ("c", "b", "e"):
            assert out[k].dtype == obj[k].dtype and np.array_equal(out[k], obj[k]), (protocol, k)
        assert np.array_equal(out["t"][0], obj["t"][0]) and out["t"][1] == obj["t"][1]


def test_out_of_band_buffers_are_refused(tmp_path):
    buffers = []
    raw = pickle.dumps({"k": lidc_record("s")}, protocol=5, buffer_callback=buffers.append)
    assert buffers
    with pytest.raises(DataError, match="out-of-band"):
        safe_load_pickle(_write(tmp_path, "oob.pickle", raw))


def test_memo_sharing_is_cheap(tmp_path):
    """Records rebuilding their arrays from one memoised 512x512 image and mask: one array is made of them,
    converted once (an unpickler that copies each, as numpy's setstate does, takes 2 MB a record)."""
    path = _write(tmp_path, "bomb.pickle", memo_bomb(2_000))
    assert path.stat().st_size < 2**21
    t0 = time.perf_counter()
    d = load_lidc(path, 16, use_cache=False)
    assert time.perf_counter() - t0 < 20
    assert d.images.shape == (2_000, 1, 16, 16) and d.masks.shape == (2_000, 4, 16, 16)
    assert (d.images == 128).all() and (d.masks == d.masks[0]).all() and d.masks[0, 0].sum() == 64  # a quarter


def test_too_many_records_and_raters_is_refused_before_allocating(tmp_path, monkeypatch):
    path = _write(tmp_path, "raters.pickle", many_raters_pickle(600, 10_000))
    with pytest.raises(DataError) as e:
        load_lidc(path, 16, use_cache=False)
    msg = str(e.value)
    assert f"{path}: 600 records of up to 10,000 raters" in msg and f"{MAX_SLOTS:,} images and masks" in msg, msg
    monkeypatch.setenv("PYROSEG_LIDC_MAX_GIB", "0.0001")  # 107 kB: three records of 4 raters need 3.8 kB at 16x16
    assert len(load_lidc(_three(tmp_path), 16, use_cache=False)) == 3
    with pytest.raises(DataError, match=r"3 records of up to 4 raters would take 0.000229 GiB at 128x128 \(15 images and masks\); the caps are 0.0001 GiB"):
        load_lidc(_three(tmp_path), 128, use_cache=False)  # 246 kB at 128


def test_a_file_of_many_small_objects_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(lidc, "OPS_ALLOWANCE", 1_000)
    path = _write(tmp_path, "lists.pickle", _asm(P.EMPTY_LIST + (P.EMPTY_LIST + P.APPEND) * 5_000))
    with pytest.raises(DataError, match=r"more than 1,\d{3} pickle operations for a 10,00\d-byte file"):
        safe_load_pickle(path)


# --------------------------------------------------------------------------- the command line, in a fresh process

LIMIT = 2 << 30  # address space of the child: 2 GiB


def _inspect(path: Path, cwd: Path, *args: str) -> tuple[int, str, float, float]:
    """``pyroseg inspect path`` run in ``cwd`` under a 2 GiB address-space limit and a 60 s timeout:
    exit status, standard error, seconds, peak RSS in GiB."""

    def limits():
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYROSEG_CACHE_DIR": str(path.parent / "cache")}
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen([sys.executable, "-m", "pyroseg", "inspect", str(path), *args], cwd=cwd, env=env,
                             stdout=subprocess.DEVNULL, stderr=err, preexec_fn=limits)
        timer = threading.Timer(60, p.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(p.pid, 0)
        finally:
            timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode(errors="replace")
    return p.returncode, text, time.monotonic() - t0, usage.ru_maxrss / 2**20


def _check_cli(tmp_path: Path, data: bytes, words: str, *args: str) -> None:
    path = _write(tmp_path, "data_lidc.pickle", data)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    code, err, seconds, gib = _inspect(path, cwd, *args)
    assert seconds < 60 and gib < 2, (seconds, gib)
    assert not list(cwd.iterdir()), "the command created a file"
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert code in (1, 2) and len(errors) == 1 and "Traceback" not in err, (code, err)
    assert str(path) in errors[0] and words in errors[0], errors[0]


@pytest.mark.slow  # a fresh interpreter importing torch: 3-6 s; the fast suite runs it in-process (test_bad_inputs.py)
def test_cli_refuses_the_segfault_pickle(tmp_path):
    _check_cli(tmp_path, segfault_pickle(), REFUSED["segfault"][1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["object array", "short data", "huge bytes"])
def test_cli_refuses_crafted_pickle(tmp_path, name):
    build, words = REFUSED[name]
    _check_cli(tmp_path, build(), words)


@pytest.mark.slow
def test_cli_refuses_too_many_raters(tmp_path):
    _check_cli(tmp_path, many_raters_pickle(600, 10_000), "600 records of up to 10,000 raters", "--image-size", "16")


@pytest.mark.slow
def test_cli_memo_bomb_loads_in_bounded_memory(tmp_path):
    """20,000 records of 512x512 (40 GB if every array copied its bytes) from a 3.5 MB file, at 16x16."""
    path = _write(tmp_path, "data_lidc.pickle", memo_bomb(20_000))
    assert path.stat().st_size < 4 * 2**20
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    code, err, seconds, gib = _inspect(path, cwd, "--image-size", "16")
    assert code == 0, err
    assert seconds < 60 and gib < 2 and not list(cwd.iterdir()), (seconds, gib)


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
