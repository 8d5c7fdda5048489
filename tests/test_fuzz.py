"""Fuzzing every data reader, and checkpoints, with mutations of valid files (hypothesis).

Readers: LGG TIFF (``load_lgg``), QUBIQ NIfTI (``load_qubiq``), the LIDC pickle
(``load_lidc``) and checkpoints (``load_checkpoint``). Each test builds small valid
files, mutates them (truncation, bit flips, overwritten byte runs, NIfTI header
fields: dims up to 32767, zero-size and too many dims, datatypes, vox_offset,
scaling, affines; arrays of the wrong shape, type, number of dims, NaN/Inf
pixels, rater affines unlike the image's) and checks one property:

    the reader loads (and what it returns is well-formed: uint8 images and 0/1
    masks of the asked size, counts that fit) or raises its one error class
    (``DataError``; ``CheckpointError`` for checkpoints) with a one-line message
    that names the file or its folder; never another exception, a crash, a hang,
    or a large allocation.

Every load runs in a worker subprocess (one per module, restarted after a
crash) under ``RLIMIT_AS`` = 2 GiB with a time limit per case: a ``MemoryError``
anywhere behind the error, a peak RSS that grows by more than
:data:`RSS_GROWTH_MB` during one case, a crash of the worker or a case over
:data:`CASE_TIMEOUT_S` fails the test. Deterministic (``derandomize=True``) and
nothing is written into the repository (``database=None``; hypothesis's other files go to a temporary folder).

Default run: :data:`DEFAULT_EXAMPLES` cases per test; ``-m slow``: :data:`SLOW_EXAMPLES`.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import pickle
import select
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from PIL import Image
from rater_files import AFFINE, lidc_record, square_mask

from pyroseg.checkpoint import save_checkpoint

#: Cases per fuzz test in the default suite, and under ``-m slow``.
DEFAULT_EXAMPLES = 150
SLOW_EXAMPLES = 1000
#: Address-space limit of the worker (bytes), the most its peak RSS may grow in one case, and the time per case.
ADDRESS_LIMIT = 2 * 1024**3
RSS_GROWTH_MB = 256
CASE_TIMEOUT_S = 30
SIZE = 16  # the image size every reader is asked for

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- the worker subprocess

_WORKER = r"""
import json, resource, sys, traceback
limit, growth_mb, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import numpy as np
import nibabel  # noqa: F401 - imported once here, not inside the first case
from pyroseg.checkpoint import FORMAT_VERSION, load_checkpoint
from pyroseg.data.lgg import load_lgg
from pyroseg.data.lidc import load_lidc
from pyroseg.data.qubiq import load_qubiq
from pyroseg.errors import CheckpointError, DataError

def check_segdata(d, channels=None, raters=None):
    n = len(d.images)
    assert n >= 1, "loaded no items"
    assert d.images.dtype == np.uint8 and d.masks.dtype == np.uint8, (d.images.dtype, d.masks.dtype)
    assert d.images.ndim == 4 and d.images.shape[2:] == (size, size), d.images.shape
    assert d.masks.ndim == 4 and d.masks.shape[0] == n and d.masks.shape[2:] == (size, size), d.masks.shape
    assert channels is None or d.images.shape[1] == channels, d.images.shape
    assert raters is None or d.masks.shape[1] == raters, d.masks.shape
    assert d.images.shape[1] >= 1 and d.masks.shape[1] >= 1
    assert set(np.unique(d.masks).tolist()) <= {0, 1}, np.unique(d.masks)
    assert d.rater_counts.shape == (n,) and d.rater_counts.min() >= 1 and d.rater_counts.max() <= d.masks.shape[1]
    assert len(d.patients) == len(d.slice_numbers) == n
    return f"{n} items, images {d.images.shape}, masks {d.masks.shape}"

def run(req):
    kind, path = req["kind"], req["path"]
    if kind == "lgg":
        return check_segdata(load_lgg(path, size, use_cache=False), channels=3, raters=1)
    if kind == "qubiq":
        return check_segdata(load_qubiq(path, size, use_cache=False))
    if kind == "lidc":
        return check_segdata(load_lidc(path, size, use_cache=False), channels=1)
    if kind == "checkpoint":
        state = load_checkpoint(path)
        assert isinstance(state, dict), type(state)
        v = state["format_version"]
        assert isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= FORMAT_VERSION, v
        return f"checkpoint with keys {sorted(map(str, state))}"
    raise AssertionError(kind)

def chain(e):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__

def rss_kb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    expected = CheckpointError if req["kind"] == "checkpoint" else DataError
    before = rss_kb()
    try:
        out = {"outcome": "loaded", "detail": run(req)}
    except expected as e:
        msg = str(e)
        memory = [c for c in chain(e) if isinstance(c, MemoryError)]
        if memory:
            out = {"outcome": "bad", "detail": f"MemoryError behind {type(e).__name__}: {msg}"}
        elif "\n" in msg or not msg:
            out = {"outcome": "bad", "detail": f"not a one-line message: {msg!r}"}
        elif not any(w in msg for w in req["where"]):
            out = {"outcome": "bad", "detail": f"the message names none of {req['where']}: {msg}"}
        else:
            out = {"outcome": "refused", "detail": msg}
    except BaseException as e:  # noqa: BLE001 - exactly what the property forbids
        tb = traceback.format_exception(type(e), e, e.__traceback__)
        out = {"outcome": "bad", "detail": f"{type(e).__name__}: {e}"[:2000] + "\n" + "".join(tb[-6:])[-3000:]}
    grown = (rss_kb() - before) // 1024
    if grown > growth_mb:
        out = {"outcome": "bad", "detail": f"peak RSS grew by {grown} MB in one case ({out['detail'][:300]})"}
    print(json.dumps(out), flush=True)
"""


class Worker:
    """The loads run here: a subprocess under ``RLIMIT_AS``, answering one JSON line per case."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.proc: subprocess.Popen | None = None
        self.outcomes: dict[str, int] = {}

    def start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        self.stderr = open(self.folder / "worker-stderr.txt", "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(ADDRESS_LIMIT), str(RSS_GROWTH_MB), str(SIZE)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, cwd=self.folder, env=env,
        )
        ready = self._reply(120)
        assert ready == {"ready": True}, f"the fuzz worker did not start: {ready}"

    def _reply(self, timeout: float) -> dict:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            return {"outcome": "bad", "detail": f"no answer within {timeout} s (a hang?)"}
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            tail = (self.folder / "worker-stderr.txt").read_text(errors="replace")[-2000:]
            self.close()
            return {"outcome": "bad", "detail": f"the worker died (exit status {rc}): {tail}"}
        return json.loads(line)

    def load(self, kind: str, path: Path, where: list[str]) -> dict:
        if self.proc is None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"kind": kind, "path": str(path), "where": where}) + "\n").encode())
        self.proc.stdin.flush()
        out = self._reply(CASE_TIMEOUT_S)
        self.outcomes[f"{kind} {out['outcome']}"] = self.outcomes.get(f"{kind} {out['outcome']}", 0) + 1
        return out

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                if f is not None:
                    f.close()
            self.stderr.close()
            self.proc = None


@pytest.fixture(scope="module", autouse=True)
def _hypothesis_home(tmp_path_factory):
    """Hypothesis keeps a cache of the source's constants even without a database: here, not in ``.hypothesis/``."""
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis-home"))
    yield
    set_hypothesis_home_dir(None)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = Worker(tmp_path_factory.mktemp("fuzz-worker"))
    yield w
    print(f"\nfuzz outcomes: {dict(sorted(w.outcomes.items()))}")
    w.close()


_counter = itertools.count()


class Case:
    """A fresh folder for one example, removed after it."""

    def __init__(self, base: Path):
        self.path = base / f"case{next(_counter)}"

    def __enter__(self) -> Path:
        self.path.mkdir(parents=True)
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def expect_ok(out: dict) -> None:
    assert out["outcome"] in ("loaded", "refused"), out["detail"]


def fuzz(n: int):
    """The settings of every fuzz test: ``n`` examples, deterministic, no database, no deadline (the worker times cases)."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


# --------------------------------------------------------------------------- byte mutations


def byte_mutations(n: int):
    """Truncation, bit flips, an overwritten run of bytes, or an inserted one, of an ``n``-byte file."""
    return st.one_of(
        st.tuples(st.just("truncate"), st.integers(0, n - 1)),
        st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 7)), min_size=1, max_size=8)),
        st.tuples(st.just("overwrite"), st.integers(0, n - 1), st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("insert"), st.integers(0, n), st.binary(min_size=1, max_size=16)),
    )


def mutate(data: bytes, m) -> bytes:
    kind = m[0]
    if kind == "truncate":
        return data[: m[1]]
    if kind == "flip":
        out = bytearray(data)
        for offset, bit in m[1]:
            out[offset] ^= 1 << bit
        return bytes(out)
    if kind == "overwrite":
        return data[: m[1]] + m[2] + data[m[1] + len(m[2]) :]
    return data[: m[1]] + m[2] + data[m[1] :]


# --------------------------------------------------------------------------- LGG TIFF


def _tif_bytes(array: np.ndarray, mode: str | None = None, compression: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)
    img.save(buf, format="TIFF", **({"compression": compression} if compression else {}))
    return buf.getvalue()


def _lgg_valid() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = (square_mask(SIZE, 3, 9) * 255).astype(np.uint8)
    return {"P_1.tif": _tif_bytes(image), "P_1_mask.tif": _tif_bytes(mask),
            "P_2.tif": _tif_bytes(image, compression="tiff_lzw"), "P_2_mask.tif": _tif_bytes(mask, compression="tiff_adobe_deflate")}


LGG = _lgg_valid()


def _write_lgg(folder: Path, files: dict[str, bytes]) -> Path:
    root = folder / "kaggle_3m"
    (root / "P").mkdir(parents=True)
    for name, data in files.items():
        (root / "P" / name).write_bytes(data)
    return root


def _lgg_bytes(worker, base: Path, n: int) -> None:
    @fuzz(n)
    @given(name=st.sampled_from(sorted(LGG)), m=st.data())
    def check(name, m):
        data = LGG[name]
        with Case(base) as folder:
            files = {**LGG, name: mutate(data, m.draw(byte_mutations(len(data))))}
            expect_ok(worker.load("lgg", _write_lgg(folder, files), ["P_"]))

    check()


#: Pillow modes and a maker of an array for each; NaN and Inf come in through mode F.
_MODES = {
    "RGB": lambda h, w, v: np.full((h, w, 3), v % 256, np.uint8),
    "RGBA": lambda h, w, v: np.full((h, w, 4), v % 256, np.uint8),
    "L": lambda h, w, v: np.full((h, w), v % 256, np.uint8),
    "I;16": lambda h, w, v: np.full((h, w), v % 65536, np.uint16),
    "I": lambda h, w, v: np.full((h, w), np.clip(v, -(2**31), 2**31 - 1), np.int32),
    "F": lambda h, w, v: np.full((h, w), v, np.float32),
    "1": lambda h, w, v: np.full((h, w), bool(v % 2)),
}
_PIXELS = st.one_of(st.sampled_from([0, 1, 255, 128, 65535, -1]), st.integers(-(2**31), 2**31 - 1),
                    st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.5, 1e30]))


def _lgg_arrays(worker, base: Path, n: int) -> None:
    side = st.integers(1, 40)

    @fuzz(n)
    @given(image_mode=st.sampled_from(sorted(_MODES)), mask_mode=st.sampled_from(sorted(_MODES)), ih=side, iw=side, mh=side, mw=side,
           iv=_PIXELS, mv=_PIXELS, compression=st.sampled_from([None, "tiff_lzw", "tiff_adobe_deflate", "packbits"]))
    def check(image_mode, mask_mode, ih, iw, mh, mw, iv, mv, compression):
        def make(mode, h, w, v):
            if isinstance(v, float) and mode != "F":
                v = 0 if not np.isfinite(v) else int(np.clip(v, -(2**31), 2**31 - 1))
            arr = _MODES[mode](h, w, v)
            return _tif_bytes(arr, compression=compression)

        with Case(base) as folder:
            files = {"P_1.tif": make(image_mode, ih, iw, iv), "P_1_mask.tif": make(mask_mode, mh, mw, mv)}
            expect_ok(worker.load("lgg", _write_lgg(folder, files), ["P_1"]))

    check()


def test_lgg_tiff_byte_mutations(worker, tmp_path):
    _lgg_bytes(worker, tmp_path, DEFAULT_EXAMPLES)


def test_lgg_tiff_modes_sizes_and_values(worker, tmp_path):
    _lgg_arrays(worker, tmp_path, DEFAULT_EXAMPLES)


@pytest.mark.slow
def test_lgg_tiff_slow(worker, tmp_path):
    _lgg_bytes(worker, tmp_path, SLOW_EXAMPLES)
    _lgg_arrays(worker, tmp_path, SLOW_EXAMPLES)


# --------------------------------------------------------------------------- QUBIQ NIfTI


def _nifti_bytes(array: np.ndarray, affine: np.ndarray = AFFINE) -> bytes:
    """The uncompressed ``.nii`` bytes of ``array``."""
    array = np.asarray(array)
    return nib.Nifti1Image(array, affine, dtype=array.dtype).to_bytes()


def _qubiq_valid() -> dict[str, bytes]:
    image = np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE)
    return {"image.nii": _nifti_bytes(image), "task01_seg01.nii": _nifti_bytes(square_mask(SIZE, 2, 6)),
            "task01_seg02.nii": _nifti_bytes(square_mask(SIZE, 2, 8))}


QUBIQ = _qubiq_valid()


def _write_qubiq(folder: Path, files: dict[str, bytes], gz: dict[str, bool]) -> Path:
    """``folder/case01/<name>[.gz]``: gzipped unless ``gz[name]`` is False."""
    case = folder / "case01"
    case.mkdir(parents=True)
    for name, data in files.items():
        if gz.get(name, True):
            (case / f"{name}.gz").write_bytes(gzip.compress(data, compresslevel=1, mtime=0))
        else:
            (case / name).write_bytes(data)
    return folder


# NIfTI-1 header fields: offset, struct format, values worth trying (besides any value of the type)
_INT16 = st.integers(-(2**15), 2**15 - 1)
_FLOATS = st.one_of(st.sampled_from([0.0, -1.0, 1.0, 2.0, 1e-30, 1e30, float("nan"), float("inf"), float("-inf")]),
                    st.floats(width=32))
_DIMS = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 7, 8, -1, 2**15 - 1, 2**14, 4096]), _INT16)
_HEADER = {
    "sizeof_hdr": (0, "<i", st.one_of(st.just(348), st.just(540), st.integers(-(2**31), 2**31 - 1))),
    **{f"dim[{k}]": (40 + 2 * k, "<h", _DIMS) for k in range(8)},
    "datatype": (70, "<h", st.one_of(st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792,
                                                      2048, 2304]), _INT16)),
    "bitpix": (72, "<h", st.one_of(st.sampled_from([0, 1, 8, 16, 32, 64, 128]), _INT16)),
    **{f"pixdim[{k}]": (76 + 4 * k, "<f", _FLOATS) for k in range(4)},
    "vox_offset": (108, "<f", st.one_of(st.sampled_from([0.0, 352.0, 348.0, 353.0, 1e9, 2.0**40]), _FLOATS)),
    "scl_slope": (112, "<f", _FLOATS),
    "scl_inter": (116, "<f", _FLOATS),
    "qform_code": (252, "<h", st.one_of(st.integers(0, 5), _INT16)),
    "sform_code": (254, "<h", st.one_of(st.integers(0, 5), _INT16)),
    **{f"quatern/qoffset[{k}]": (256 + 4 * k, "<f", _FLOATS) for k in range(6)},
    **{f"srow[{k}]": (280 + 4 * k, "<f", _FLOATS) for k in range(12)},
    "magic": (344, "4s", st.sampled_from([b"n+1\0", b"ni1\0", b"n+2\0", b"\0\0\0\0"])),
}


def _set_fields(data: bytes, fields: list[tuple[str, object]]) -> bytes:
    out = bytearray(data)
    for name, value in fields:
        offset, fmt, _ = _HEADER[name]
        struct.pack_into(fmt, out, offset, value)
    return bytes(out)


_header_fields = st.lists(st.sampled_from(sorted(_HEADER)).flatmap(lambda k: st.tuples(st.just(k), _HEADER[k][2])), min_size=1, max_size=4)


def _qubiq_bytes(worker, base: Path, n: int) -> None:
    @fuzz(n)
    @given(name=st.sampled_from(sorted(QUBIQ)), gz=st.booleans(), how=st.sampled_from(["bytes", "gz-bytes", "header"]), m=st.data())
    def check(name, gz, how, m):
        data = QUBIQ[name]
        with Case(base) as folder:
            files, zipped = dict(QUBIQ), {name: gz}
            if how == "bytes":  # the .nii bytes, gzipped or not
                files[name] = mutate(data, m.draw(byte_mutations(len(data))))
            elif how == "header":  # header fields set to chosen values (dims, types, offsets, scaling, affine)
                files[name] = _set_fields(data, m.draw(_header_fields))
            else:  # the .nii.gz bytes themselves
                packed = gzip.compress(data, compresslevel=1, mtime=0)
                (folder / "case01").mkdir()
                for other, d in files.items():
                    if other != name:
                        (folder / "case01" / f"{other}.gz").write_bytes(gzip.compress(d, mtime=0))
                (folder / "case01" / f"{name}.gz").write_bytes(mutate(packed, m.draw(byte_mutations(len(packed)))))
                expect_ok(worker.load("qubiq", folder, ["case01"]))
                return
            expect_ok(worker.load("qubiq", _write_qubiq(folder, files, zipped), ["case01"]))

    check()


_DTYPES = st.sampled_from(["uint8", "int8", "int16", "uint16", "int32", "int64", "float32", "float64", "complex64"])


def _qubiq_arrays(worker, base: Path, n: int) -> None:
    shape = st.lists(st.sampled_from([0, 1, 2, 3, 5, 8]), min_size=1, max_size=5)

    @fuzz(n)
    @given(ishape=shape, rel=st.sampled_from(["same", "spatial", "other"]), rshape=shape, idtype=_DTYPES, rdtype=_DTYPES, iv=_PIXELS, rv=st.one_of(st.sampled_from([0, 1]), _PIXELS),
           raters=st.integers(1, 3), affine_delta=st.one_of(st.just(0.0), st.sampled_from([1e-6, 1e-4, 1e-2, 0.5, 10.0, -2.0])),
           affine_at=st.tuples(st.integers(0, 2), st.integers(0, 3)), shift_which=st.integers(0, 3))
    def check(ishape, rel, rshape, idtype, rdtype, iv, rv, raters, affine_delta, affine_at, shift_which):
        if rel != "other":  # raters of the image's shape, or of its shape less the last axis (channels)
            rshape = ishape if rel == "same" or len(ishape) < 2 else ishape[:-1]

        def make(shape, dtype, v):
            with np.errstate(all="ignore"):
                if np.dtype(dtype).kind in "iub" and isinstance(v, float):
                    v = 0 if not np.isfinite(v) else 1
                arr = np.full(shape, v).astype(dtype) if np.dtype(dtype).kind != "b" else np.full(shape, bool(v))
            if arr.size:
                arr.reshape(-1)[0] = 0  # not constant
            return arr

        with Case(base) as folder:
            image = make(ishape, idtype, iv)
            files = {"image.nii": _nifti_bytes(image)}
            for r in range(1, raters + 1):
                affine = AFFINE.copy()
                if r == shift_which:
                    affine[affine_at] += affine_delta
                    # a singular affine (a zero voxel size) cannot even be written by nibabel: not a file to read
                    assume(abs(np.linalg.det(affine[:3, :3])) > 1e-9)
                files[f"task01_seg{r:02d}.nii"] = _nifti_bytes(make(rshape, rdtype, rv), affine)
            expect_ok(worker.load("qubiq", _write_qubiq(folder, files, {}), ["case01"]))

    check()


def test_qubiq_nifti_byte_and_header_mutations(worker, tmp_path):
    _qubiq_bytes(worker, tmp_path, DEFAULT_EXAMPLES)


def test_qubiq_nifti_shapes_types_values_and_affines(worker, tmp_path):
    _qubiq_arrays(worker, tmp_path, DEFAULT_EXAMPLES)


@pytest.mark.slow
def test_qubiq_nifti_slow(worker, tmp_path):
    _qubiq_bytes(worker, tmp_path, SLOW_EXAMPLES)
    _qubiq_arrays(worker, tmp_path, SLOW_EXAMPLES)


@pytest.mark.parametrize("dims", [(3, 2**15 - 1, 2**15 - 1, 2**15 - 1), (3, 2**15 - 1, 2**15 - 1, 1), (4, 4096, 4096, 64, 7),
                                  (2, 2**15 - 1, 2**15 - 1), (7, 2**15 - 1, 2**15 - 1, 2**15 - 1, 2**15 - 1, 2**15 - 1, 2**15 - 1, 2**15 - 1)])
@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("which", ["image.nii", "task01_seg01.nii"])
def test_huge_declared_nifti_dims_are_refused_before_reading(worker, tmp_path, dims, gz, which):
    """A tiny NIfTI whose header declares up to 32767^7 voxels: refused, nothing allocated (the worker's limits)."""
    fields = [(f"dim[{k}]", v) for k, v in enumerate(dims)] + [(f"dim[{k}]", 1) for k in range(len(dims), 8)]
    files = {**QUBIQ, which: _set_fields(QUBIQ[which], fields)}
    out = worker.load("qubiq", _write_qubiq(tmp_path, files, {which: gz}), ["case01"])
    assert out["outcome"] == "refused", out["detail"]
    assert "declares" in out["detail"] and which in out["detail"], out["detail"]


def test_rater_affine_unlike_the_images_is_refused(worker, tmp_path):
    files = dict(QUBIQ)
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.01
    files["task01_seg02.nii"] = _nifti_bytes(square_mask(SIZE, 2, 8), shifted)
    out = worker.load("qubiq", _write_qubiq(tmp_path / "a", files, {}), ["case01"])
    assert out["outcome"] == "refused", out["detail"]
    assert "image.nii.gz" in out["detail"] and "task01_seg02.nii.gz" in out["detail"] and "affine" in out["detail"], out["detail"]
    shifted[0, 3] = AFFINE[0, 3] + 1e-5  # within the tolerance: the same placement
    files["task01_seg02.nii"] = _nifti_bytes(square_mask(SIZE, 2, 8), shifted)
    assert worker.load("qubiq", _write_qubiq(tmp_path / "b", files, {}), ["case01"])["outcome"] == "loaded"


# --------------------------------------------------------------------------- LIDC pickle


def _lidc_valid(protocol: int) -> bytes:
    return pickle.dumps({"k1": lidc_record("s1"), "k2": lidc_record("s2", raters=2, value=0.25)}, protocol=protocol)


LIDC = {p: _lidc_valid(p) for p in (2, 3, 4, 5)}  # 2 and 5 store arrays through other numpy globals than 3 and 4


def _lidc_bytes(worker, base: Path, n: int) -> None:
    @fuzz(n)
    @given(protocol=st.sampled_from(sorted(LIDC)), m=st.data())
    def check(protocol, m):
        data = LIDC[protocol]
        with Case(base) as folder:
            path = folder / "data_lidc.pickle"
            path.write_bytes(mutate(data, m.draw(byte_mutations(len(data)))))
            expect_ok(worker.load("lidc", path, [str(path)]))

    check()


def _lidc_records(worker, base: Path, n: int) -> None:
    shape = st.lists(st.sampled_from([0, 1, 2, 3, 8, 16, 100_000]), min_size=0, max_size=4)

    @fuzz(n)
    @given(ishape=shape, idtype=_DTYPES, iv=_PIXELS, mshape=st.one_of(st.none(), shape), mdtype=st.one_of(_DTYPES, st.just("bool")), mv=st.sampled_from([0, 1, 2, 255, float("nan")]),
           raters=st.integers(0, 3), series=st.sampled_from(["s1", 7, None, b"x"]), top=st.sampled_from(["dict", "list", "empty"]))
    def check(ishape, idtype, iv, mshape, mdtype, mv, raters, series, top):
        if int(np.prod(ishape, dtype=np.int64)) > 200_000 or (mshape and int(np.prod(mshape, dtype=np.int64)) > 200_000):
            ishape, mshape = [1, 100_000], [1, 100_000]  # one long thin crop: small on disk, a huge square if padded

        def make(shape, dtype, v):
            with np.errstate(all="ignore"):
                if np.dtype(dtype).kind in "iub" and isinstance(v, float):
                    v = 0 if not np.isfinite(v) else 1
                return np.full(shape, v).astype(dtype)

        image = make(ishape, idtype, iv)
        masks = [make(ishape if mshape is None else mshape, mdtype, mv) for _ in range(raters)]
        records = {"k1": lidc_record("s0"), "k2": {"image": image, "masks": masks, "series_uid": series}}
        payload = {"dict": records, "list": list(records.values()), "empty": {}}[top]
        with Case(base) as folder:
            path = folder / "data_lidc.pickle"
            path.write_bytes(pickle.dumps(payload, protocol=4))
            expect_ok(worker.load("lidc", path, [str(path)]))

    check()


def test_lidc_pickle_byte_mutations(worker, tmp_path):
    _lidc_bytes(worker, tmp_path, DEFAULT_EXAMPLES)


def test_lidc_pickle_records(worker, tmp_path):
    _lidc_records(worker, tmp_path, DEFAULT_EXAMPLES)


@pytest.mark.slow
def test_lidc_pickle_slow(worker, tmp_path):
    _lidc_bytes(worker, tmp_path, SLOW_EXAMPLES)
    _lidc_records(worker, tmp_path, SLOW_EXAMPLES)


# --------------------------------------------------------------------------- checkpoints


def _checkpoint_valid(folder: Path) -> bytes:
    path = folder / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.zeros(3)},
                           "epoch": 3, "history": [{"loss": 0.5}], "name": "unet"})
    return path.read_bytes()


def _checkpoint_bytes(worker, base: Path, n: int) -> None:
    data = _checkpoint_valid(base)
    tail = max(0, len(data) - 400)  # the zip's central directory and end records live in the last few hundred bytes

    @fuzz(n)
    @given(m=st.one_of(byte_mutations(len(data)), st.tuples(st.just("flip"), st.lists(
        st.tuples(st.integers(tail, len(data) - 1), st.integers(0, 7)), min_size=1, max_size=4))))
    def check(m):
        with Case(base) as folder:
            path = folder / "checkpoint.pt"
            path.write_bytes(mutate(data, m))
            expect_ok(worker.load("checkpoint", path, [str(path)]))

    check()


def test_checkpoint_byte_mutations(worker, tmp_path):
    _checkpoint_bytes(worker, tmp_path, DEFAULT_EXAMPLES)


@pytest.mark.slow
def test_checkpoint_slow(worker, tmp_path):
    _checkpoint_bytes(worker, tmp_path, SLOW_EXAMPLES)


def test_the_valid_files_load(worker, tmp_path):
    """The files every test mutates are valid: each reader loads them as they are."""
    assert worker.load("lgg", _write_lgg(tmp_path / "lgg", LGG), ["P_"])["outcome"] == "loaded"
    for gz in (True, False):
        out = worker.load("qubiq", _write_qubiq(tmp_path / f"q{gz}", QUBIQ, dict.fromkeys(QUBIQ, gz)), ["case01"])
        assert out["outcome"] == "loaded", out["detail"]
    for p, data in LIDC.items():
        (tmp_path / f"l{p}.pickle").write_bytes(data)
        out = worker.load("lidc", tmp_path / f"l{p}.pickle", ["l"])
        assert out["outcome"] == "loaded", (p, out["detail"])
    (tmp_path / "ck").mkdir()
    _checkpoint_valid(tmp_path / "ck")
    assert worker.load("checkpoint", tmp_path / "ck" / "checkpoint.pt", ["ck"])["outcome"] == "loaded"
