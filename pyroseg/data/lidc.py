"""Reading the LIDC-IDRI crops (``data_lidc.pickle``) into a :class:`SegData`, safely.

Format (the PyTorch Probabilistic U-Net's file, which PHiSeg, SSN and others
also read)::

    {key: {"image": float32 (H, W) in [0, 1],
           "masks": [A x uint8 (H, W) of 0/1],
           "series_uid": "1.3.6.1.4.1.14519..."}}       # the CT series: the patient

``--data`` is such a file, or a folder of them (every ``*.pickle`` / ``*.pkl``
in it, by name).

Decoding: nothing in the file is ever handed to code it names
-------------------------------------------------------------
A pickle is a program, and an allow-list of globals is not enough: numpy's own
``dtype.__setstate__`` and ``ndarray.__setstate__``, driven with hostile state
from allowed names alone, build a dtype with an object field over raw bytes
and crash the process when the array is freed. So the file is read by
:class:`NumpyOnlyUnpickler`, built on the pure-Python ``pickle._Unpickler``
with its own handling of the opcodes that call or mutate things:

* ``find_class`` answers the numpy names (``numpy.core``/``numpy._core``
  ``multiarray._reconstruct``, ``multiarray.scalar``, ``numeric._frombuffer``,
  ``numpy.ndarray``, ``numpy.dtype``) and the two builtins protocol 2 uses for
  bytes (``_codecs.encode``, ``__builtin__.bytes``) with *stand-ins of this
  module*, never numpy's functions; any other global is refused, with one line
  naming the file and the global, before anything is looked up or called.
* ``REDUCE`` calls only those stand-ins, ``BUILD`` applies only to the
  placeholders ``_reconstruct`` and ``dtype`` return: a dtype's state must be
  ``(3, byte order, None, None, None, -1, -1, 0)`` (no sub-array, names,
  fields or flags) for a ``b``, ``i``, ``u``, ``f`` or ``c`` type; an array's
  state ``(1, shape, dtype, fortran, bytes)``. The reader then makes the array
  itself, ``np.frombuffer(bytes, dtype).reshape(shape)``, after checking that
  ``shape`` is a tuple of non-negative ints and that ``prod(shape) x itemsize``
  is exactly the number of bytes present. Protocol 5 (``_frombuffer``, bytes
  in-band as ``BYTEARRAY8``), protocol 4 and protocol 2 (bytes as
  ``_codecs.encode(str, 'latin1')``; Python 2 files' ``str`` too) all load;
  ``numpy.ndarray(...)`` called directly (which allocates what it is asked
  for), object arrays, out-of-band buffers, persistent ids, extension codes,
  ``INST``/``OBJ``/``NEWOBJ``, sets and dict keys other than strings and
  integers are refused with one line. Arrays are read-only views of the bytes
  read from the file (not copies), and one array is made per distinct bytes
  object and layout, however often the pickle's memo repeats it.

Memory and time are bounded by the file and the converted output
-----------------------------------------------------------------
* The file is read from disk through a reader that refuses any length the
  pickle declares beyond the bytes left in the file, before allocating it, so
  every array is backed by bytes actually present.
* A file may run at most :data:`OPS_ALLOWANCE` + one per 16 bytes of it pickle
  operations (each makes at most a small object): a few-megabyte file cannot
  build gigabytes of small objects. The full 1.3 GB ``data_lidc.pickle`` needs
  about 2.3 million (150 a record, as the 71-record subset).
* Records are converted one at a time into output arrays allocated once
  (:class:`~pyroseg.data.raters.ItemStack`), each decoded record dropped once
  converted; before allocating, ``records x (1 + most raters) x image_size^2``
  bytes must fit :data:`MAX_CONVERTED_GIB` (environment variable
  ``PYROSEG_LIDC_MAX_GIB`` overrides it) and ``records x (1 + most raters)``
  must be at most :data:`MAX_SLOTS`; otherwise one line names the file, the
  counts and the cap. An array shared by many records (the memo again) is
  checked and resized once. ``MemoryError`` becomes a one-line
  :class:`DataError` naming the file.

Converted at 128x128, the 15,096 crops of 4 raters take 1.2 GB. The arrays are
cached as the LGG reader's are (:func:`pyroseg.data.raters.cached`), keyed by
the files' sizes and modification times.

Items: one per record, in the file's order; patient = ``series_uid`` (a string;
bytes and integers are turned into one, anything else is refused); slice
number = the record's position among its series' records. Raters: the
record's masks, any number (a record with fewer than the most is padded, see
``SegData.rater_counts``). Intensities: floats in [0, 1] times 255 (the crops
are already normalised); other images by :func:`pyroseg.data.raters.scale_intensity`.
A crop must be roughly square (padding it to a square may take at most 8 times
its pixels, or 256x256).
"""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
import re
import reprlib
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pyroseg.data.core import SegData
from pyroseg.data.lgg import check_image_size
from pyroseg.data.raters import INTENSITY_RULES, ItemStack, cached, file_stamp, pad_square, scale_intensity
from pyroseg.data.resize import resize_image, resize_mask
from pyroseg.errors import DataError

__all__ = ["NumpyOnlyUnpickler", "safe_load_pickle", "lidc_files", "load_lidc", "is_lidc", "PICKLE_SUFFIXES",
           "MAX_CONVERTED_GIB", "MAX_SLOTS", "OPS_ALLOWANCE"]

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pickle", ".pkl")
_FIELDS = ("image", "masks", "series_uid")

#: The most the converted arrays of one file may take, in GiB: records x (1 + most raters) x image_size^2
#: bytes (uint8). The environment variable ``PYROSEG_LIDC_MAX_GIB`` overrides it.
MAX_CONVERTED_GIB = 4.0
#: The most images and masks (records x (1 + most raters)) one file may hold: a million records of four raters.
MAX_SLOTS = 5_000_000
#: Pickle operations a file may run, plus one per 16 bytes of the file (each makes at most a small object).
OPS_ALLOWANCE = 4_000_000

_MAX_NDIM = 32
_ITEMSIZES = {"b": (1,), "i": (1, 2, 4, 8), "u": (1, 2, 4, 8), "f": (2, 4, 8), "c": (8, 16)}
_DTYPE_SPEC = re.compile(r"[<>|=]?([biufc])([0-9]{1,2})")
_MULTIARRAY = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMERIC = ("numpy.core.numeric", "numpy._core.numeric")
_REFUSED_OPCODES = {
    pickle.INST: "INST (makes an instance of a class)", pickle.OBJ: "OBJ (makes an instance of a class)",
    pickle.NEWOBJ: "NEWOBJ (makes an instance of a class)", pickle.NEWOBJ_EX: "NEWOBJ_EX (makes an instance of a class)",
    pickle.EMPTY_SET: "EMPTY_SET (a set)", pickle.ADDITEMS: "ADDITEMS (a set)", pickle.FROZENSET: "FROZENSET (a set)",
}


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60


def _short(x, limit: int = 60) -> str:
    """``repr(x)``, bounded in depth, items and characters (error messages stay one short line, whatever ``x`` is)."""
    try:
        text = _REPR.repr(x)
    except Exception:  # noqa: BLE001 - a repr must not fail the error it describes
        text = f"<{type(x).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(x, *values: int) -> bool:
    return type(x) is int and (not values or x in values)


class _BoundedFile:
    """A file that refuses to read past its end: a length the pickle declares is
    checked against the bytes left before anything is read or allocated."""

    def __init__(self, fh, size: int):
        self._fh = fh
        self.left = size

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self.left
        if n > self.left:
            raise pickle.UnpicklingError(f"pickle data was truncated (it declares {n:,} bytes, the file has {self.left:,} left)")
        data = self._fh.read(n)
        self.left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self._fh.readline()
        self.left -= len(line)
        return line

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)


class _StandIn:
    """What the reader hands a pickle for a global it may name: a function of this module, never numpy's."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn: Callable):
        self.name, self.fn = name, fn

    def __repr__(self) -> str:
        return f"<stand-in for {self.name}>"


class _Placeholder:
    """What a stand-in returns for an object the pickle then BUILDs (an array or a dtype); replaced by the real one."""

    __slots__ = ("spec", "memo_keys", "built")

    def __init__(self, spec: str | None = None):
        self.spec, self.memo_keys, self.built = spec, [], False

    def __repr__(self) -> str:
        return "an unfinished numpy dtype" if self.spec is not None else "an unfinished numpy array"


class _ArrayPlaceholder(_Placeholder):
    __slots__ = ()


class _DtypePlaceholder(_Placeholder):
    __slots__ = ()


class _Dispatch(dict):
    def __missing__(self, key: int):
        raise pickle.UnpicklingError(f"invalid load key, {bytes([key])!r}")


class _StandIns:
    """The stand-ins :class:`NumpyOnlyUnpickler` answers numpy's (and protocol 2's) names with:
    each checks its arguments and rebuilds the value itself from checked (shape, dtype, bytes)."""


    def _call_ndarray(self, *args):
        raise self._refuse("numpy.ndarray(...) called directly (it allocates whatever it is asked for; "
                           "a data pickle's arrays come from their bytes, by _reconstruct or _frombuffer)")

    def _call_bytes(self, *args):
        if args:
            raise self._refuse(f"bytes{_short(args)} (only bytes() is used, for b'')")
        return b""

    def _call_encode(self, text=None, encoding="utf-8", *rest):
        if type(text) is not str or encoding not in ("latin1", "latin-1") or rest:
            raise self._refuse(f"_codecs.encode with {_short(encoding)} (only str, 'latin1', as protocol 2 writes bytes)")
        return self._latin1(text)

    def _latin1(self, text: str) -> bytes:
        hit = self._encoded.get(id(text))
        if hit is None:  # once per str object, however often the memo repeats it
            hit = self._encoded[id(text)] = (text, text.encode("latin1"))
        return hit[1]

    def _call_dtype(self, spec=None, align=False, copy=True, *rest):
        m = _DTYPE_SPEC.fullmatch(spec) if type(spec) is str else None
        if m is None or int(m[2]) not in _ITEMSIZES[m[1]] or rest or not (_is_int(align, 0) or align is False) \
                or not (type(copy) is bool or _is_int(copy, 0, 1)):
            raise self._refuse(f"the numpy dtype {_short(spec)} (only bool, integer, float and complex numbers; "
                               "no objects, records, raw bytes or strings)")
        return _DtypePlaceholder(m[1] + m[2])

    def _build_dtype(self, spec: str, state) -> np.dtype:
        ok = (type(state) is tuple and len(state) == 8 and _is_int(state[0], 3) and state[1] in ("<", ">", "|", "=")
              and state[2] is None and state[3] is None and state[4] is None
              and _is_int(state[5], -1) and _is_int(state[6], -1) and _is_int(state[7], 0))
        if not ok:
            raise self._refuse(f"the state {_short(state)} of the numpy dtype {spec} (expected (3, byte order, None, None, "
                               "None, -1, -1, 0): no sub-array, fields or flags)")
        dt = np.dtype(spec)
        return dt.newbyteorder(state[1]) if state[1] in "<>" and dt.itemsize > 1 else dt

    def _check_dtype(self, dtype) -> np.dtype:
        if not (isinstance(dtype, np.dtype) and dtype.kind in _ITEMSIZES and dtype.itemsize in _ITEMSIZES[dtype.kind]
                and dtype.fields is None and dtype.subdtype is None and not dtype.hasobject):
            raise self._refuse(f"an array of {_short(dtype)} (expected a numpy dtype of numbers)")
        return dtype

    def _raw(self, raw):
        """The bytes of an array or scalar: bytes, bytearray, a read-only view of them, or a latin1 str (protocol 2)."""
        if type(raw) is str:
            return self._latin1(raw)
        if type(raw) in (bytes, bytearray):
            return raw
        if type(raw) is memoryview and type(raw.obj) in (bytes, bytearray) and raw.contiguous and raw.format == "B":
            return raw
        if type(raw) is list:
            raise self._refuse("an array of Python objects (object dtype)")
        raise self._refuse(f"array data given as a {type(raw).__name__} (expected bytes)")

    def _array(self, raw, dtype, shape, fortran: bool) -> np.ndarray:
        """``np.frombuffer(raw, dtype).reshape(shape)``, after checking that ``shape`` asks for exactly ``raw``'s bytes."""
        dtype = self._check_dtype(dtype)
        raw = self._raw(raw)
        if type(shape) is not tuple or len(shape) > _MAX_NDIM or not all(type(d) is int and 0 <= d <= sys.maxsize for d in shape):
            raise self._refuse(f"the array shape {_short(shape)} (expected a tuple of at most {_MAX_NDIM} non-negative ints)")
        nbytes = raw.nbytes if type(raw) is memoryview else len(raw)
        need = math.prod(shape) * dtype.itemsize
        if need != nbytes:
            raise self._refuse(f"an array of shape {_short(shape, 40)} {dtype} that needs {need:,} bytes where the pickle "
                               f"gives {nbytes:,} (corrupted or crafted)")
        key = (id(raw), shape, dtype.str, fortran)
        arr = self._arrays.get(key)
        if arr is None:  # one array per bytes object and layout, however often the memo repeats them
            flat = np.frombuffer(raw, dtype=dtype) if nbytes else np.zeros(0, dtype)
            arr = self._arrays[key] = flat.reshape(shape, order="F" if fortran else "C")
        return arr

    def _call_reconstruct(self, cls=None, shape=None, typecode=None, *rest):
        if cls is not self._ndarray or typecode not in (b"b", "b") or type(shape) is not tuple or rest:
            raise self._refuse(f"_reconstruct of {_short(cls)} (only numpy.ndarray, as numpy pickles arrays)")
        return _ArrayPlaceholder()

    def _build_array(self, state) -> np.ndarray:
        if type(state) is tuple and len(state) == 5 and _is_int(state[0], 1):
            state = state[1:]
        if type(state) is not tuple or len(state) != 4 or not (type(state[2]) is bool or _is_int(state[2], 0, 1)):
            raise self._refuse(f"the array state {_short(state)} (expected (1, shape, dtype, fortran, bytes))")
        shape, dtype, fortran, raw = state
        return self._array(raw, dtype, shape, bool(fortran))

    def _call_frombuffer(self, buf=None, dtype=None, shape=None, order=None, *rest):
        if order not in ("C", "F") or rest:
            raise self._refuse(f"_frombuffer with order {_short(order)} (expected 'C' or 'F')")
        return self._array(buf, dtype, shape, order == "F")

    def _call_scalar(self, dtype=None, data=None, *rest):
        dtype = self._check_dtype(dtype)
        raw = self._raw(data)
        if rest or (raw.nbytes if type(raw) is memoryview else len(raw)) != dtype.itemsize:
            raise self._refuse(f"a numpy {dtype} scalar of {_short(data, 30)} (expected {dtype.itemsize} bytes)")
        return np.frombuffer(raw, dtype=dtype)[0]


class NumpyOnlyUnpickler(_StandIns, pickle._Unpickler):
    """Unpickles plain containers and numeric numpy arrays, and nothing else (see the module's docstring).

    Any other global (``os.system``, ``builtins.eval``, a class) raises
    :class:`DataError` naming ``source`` and the global, so no code the pickle
    names is ever looked up, let alone called; numpy's reconstruction is
    answered by stand-ins of this module, so no state from the file reaches
    numpy either. Persistent ids, extension codes and out-of-band buffers are
    refused too. ``file``: a binary file (or ``BytesIO``), read from its
    current position; ``size``: the bytes left in it (default: measured).
    """

    dispatch = _Dispatch(pickle._Unpickler.dispatch)

    def __init__(self, file, *, source: str | os.PathLike, size: int | None = None):
        if size is None:
            try:
                size = os.fstat(file.fileno()).st_size - file.tell()
            except (AttributeError, OSError, io.UnsupportedOperation):
                size = len(file.getbuffer()) - file.tell()
        super().__init__(_BoundedFile(file, size), encoding="latin1")  # latin1: Python 2 files' str bytes
        self.source = str(source)
        self.size = size
        self.max_ops = OPS_ALLOWANCE + size // 16
        self._arrays: dict[tuple, np.ndarray] = {}  # (id(bytes), shape, dtype, fortran) -> the one array made of them
        self._encoded: dict[int, tuple[str, bytes]] = {}  # id(str) -> (str, its latin1 bytes)
        self._ndarray = _StandIn("numpy.ndarray", self._call_ndarray)
        names = {("numpy", "ndarray"): self._ndarray, ("numpy", "dtype"): _StandIn("numpy.dtype", self._call_dtype),
                 ("_codecs", "encode"): _StandIn("_codecs.encode", self._call_encode)}
        empty = _StandIn("bytes", self._call_bytes)
        names[("__builtin__", "bytes")] = names[("builtins", "bytes")] = empty
        for mod in _MULTIARRAY:
            names[(mod, "_reconstruct")] = _StandIn(f"{mod}._reconstruct", self._call_reconstruct)
            names[(mod, "scalar")] = _StandIn(f"{mod}.scalar", self._call_scalar)
        for mod in _NUMERIC:
            names[(mod, "_frombuffer")] = _StandIn(f"{mod}._frombuffer", self._call_frombuffer)
        self._names = names

    # ------------------------------------------------------------------ refusals

    def _refuse(self, what: str) -> DataError:
        return DataError(f"{self.source}: refused {what}: a data pickle may only hold numpy arrays of numbers "
                         "in dicts, lists and tuples")

    def find_class(self, module: str, name: str):
        obj = self._names.get((module, name))
        if obj is None:
            raise DataError(
                f"{self.source}: refused to load the global {module}.{name}: a data pickle may only hold numpy "
                "arrays (numpy.core/_core.multiarray._reconstruct, numpy.ndarray, numpy.dtype)"
            )
        return obj

    def persistent_load(self, pid):
        raise DataError(f"{self.source}: refused a persistent id in the pickle: a data pickle may only hold numpy arrays")

    def get_extension(self, code):
        raise self._refuse(f"the extension code {_short(code)} (a registered global)")

    def load_next_buffer(self):
        raise DataError(f"{self.source}: refused: its arrays were pickled out-of-band (protocol 5 with a buffer_callback), "
                        "so their bytes are not in the file; write it with pickle.dump(obj, file, protocol=5) and no buffer_callback")

    dispatch[pickle.NEXT_BUFFER[0]] = load_next_buffer

    # ------------------------------------------------------------------ the loop: counted operations

    def load(self):
        """The pickle's object; at most :attr:`max_ops` operations."""
        self._unframer = pickle._Unframer(self._file_read, self._file_readline)
        self.read = self._unframer.read
        self.readinto = self._unframer.readinto
        self.readline = self._unframer.readline
        self.metastack = []
        self.stack = []
        self.append = self.stack.append
        self.proto = 0
        read, dispatch, left = self.read, self.dispatch, self.max_ops
        try:
            while True:
                key = read(1)
                if not key:
                    raise EOFError
                left -= 1
                if left < 0:
                    raise DataError(
                        f"{self.source}: refused: more than {self.max_ops:,} pickle operations for a {self.size:,}-byte file "
                        "(a data pickle is mostly its arrays' bytes; this one builds millions of small objects)")
                dispatch[key[0]](self)
        except pickle._Stop as stop:
            return stop.value
        finally:
            self._arrays.clear()
            self._encoded.clear()

    # ------------------------------------------------------------------ opcodes that call, mutate or allocate

    def load_reduce(self):
        stack = self.stack
        args = stack.pop()
        func = stack[-1]
        if type(func) is not _StandIn:
            raise self._refuse(f"a call of {_short(func)} (REDUCE)")
        if type(args) is not tuple:
            raise pickle.UnpicklingError("REDUCE arguments are not a tuple")
        stack[-1] = func.fn(*args)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_build(self):
        stack = self.stack
        state = stack.pop()
        inst = stack[-1]
        if type(inst) is _ArrayPlaceholder and not inst.built:
            obj = self._build_array(state)
        elif type(inst) is _DtypePlaceholder and not inst.built:
            obj = self._build_dtype(inst.spec, state)
        else:
            raise self._refuse(f"setting the state of {_short(inst) if isinstance(inst, _Placeholder) else 'a ' + type(inst).__name__} (BUILD)")
        inst.built = True
        stack[-1] = obj
        for k in inst.memo_keys:
            if self.memo.get(k) is inst:
                self.memo[k] = obj

    dispatch[pickle.BUILD[0]] = load_build

    def _put(self, i: int):
        obj = self.stack[-1]
        if isinstance(obj, _Placeholder):
            obj.memo_keys.append(i)
        self.memo[i] = obj

    def load_put(self):
        i = int(self.readline()[:-1])
        if i < 0:
            raise ValueError("negative PUT argument")
        self._put(i)

    def load_binput(self):
        self._put(self.read(1)[0])

    def load_long_binput(self):
        self._put(struct.unpack("<I", self.read(4))[0])

    def load_memoize(self):
        self._put(len(self.memo))

    dispatch[pickle.PUT[0]] = load_put
    dispatch[pickle.BINPUT[0]] = load_binput
    dispatch[pickle.LONG_BINPUT[0]] = load_long_binput
    dispatch[pickle.MEMOIZE[0]] = load_memoize

    def _set_items(self, d, items):
        if type(d) is not dict:
            raise self._refuse(f"setting items of a {type(d).__name__} (SETITEM)")
        if len(items) % 2:
            raise pickle.UnpicklingError("odd number of items for SETITEMS")
        for i in range(0, len(items), 2):
            k = items[i]
            # str and bytes hash randomly; ints below 2**60 have distinct hashes: no crafted collisions
            if not (type(k) is str or type(k) is bytes or (type(k) is int and -(2**60) < k < 2**60)):
                raise self._refuse(f"a dict key of type {type(k).__name__} (keys must be strings or integers)")
            d[k] = items[i + 1]

    def load_setitem(self):
        stack = self.stack
        value = stack.pop()
        key = stack.pop()
        self._set_items(stack[-1], (key, value))

    def load_setitems(self):
        items = self.pop_mark()
        self._set_items(self.stack[-1], items)

    def load_dict(self):
        items = self.pop_mark()
        d: dict = {}
        self._set_items(d, items)
        self.append(d)

    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.DICT[0]] = load_dict

    def load_append(self):
        stack = self.stack
        value = stack.pop()
        if type(stack[-1]) is not list:
            raise self._refuse(f"appending to a {type(stack[-1]).__name__} (APPEND)")
        stack[-1].append(value)

    def load_appends(self):
        items = self.pop_mark()
        if type(self.stack[-1]) is not list:
            raise self._refuse(f"appending to a {type(self.stack[-1]).__name__} (APPENDS)")
        self.stack[-1].extend(items)

    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends

    def load_bytearray8(self):
        (n,) = struct.unpack("<Q", self.read(8))
        self.append(bytearray(self.read(n)))  # read (bounded by the file) before allocating

    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8


for _op, _what in _REFUSED_OPCODES.items():
    def _refused(self, _what=_what):
        raise self._refuse(f"the opcode {_what}")

    NumpyOnlyUnpickler.dispatch[_op[0]] = _refused
del _op, _what, _refused


def safe_load_pickle(path: str | os.PathLike):
    """Unpickle ``path`` with :class:`NumpyOnlyUnpickler`; any failure is a one-line :class:`DataError`.

    Arrays come back read-only (views of the bytes read from the file).
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return NumpyOnlyUnpickler(fh, source=path).load()
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"cannot read {path}: out of memory while decoding it") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except (EOFError, pickle.UnpicklingError) as e:
        raise DataError(f"cannot read {path}: truncated or not a pickle ({e or type(e).__name__})") from None
    except Exception as e:  # noqa: BLE001 - a malformed stream fails in many ways (ValueError, TypeError, ...)
        raise DataError(f"cannot read {path}: malformed pickle ({type(e).__name__}: {_short(str(e), 200)})") from None


def is_lidc(path: Path) -> bool:
    """A pickle file, or a folder that directly holds one."""
    if path.is_file():
        return path.suffix.lower() in PICKLE_SUFFIXES
    if path.is_dir():
        return any(p.suffix.lower() in PICKLE_SUFFIXES and p.is_file() for p in path.iterdir())
    return False


def lidc_files(path: str | os.PathLike) -> list[Path]:
    """The pickle itself, or every ``*.pickle`` / ``*.pkl`` in the folder, sorted by name."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"LIDC data {path} does not exist")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise DataError(f"no *.pickle files in {path}: expected data_lidc.pickle or a folder of such files")
    return files


def _mask_keys(masks) -> list[tuple]:
    """The conversion-cache key of each mask: its object, or (for a 3-D array of masks) the array and the index."""
    if isinstance(masks, np.ndarray) and masks.ndim == 3:
        return [("m", id(masks), r) for r in range(len(masks))]
    return [("m", id(m), -1) for m in masks]


def _rater_count(masks) -> int:
    """How many masks a record's ``masks`` holds (0 when it is not a list or an (A, H, W) array)."""
    if isinstance(masks, (list, tuple)):
        return len(masks)
    return masks.shape[0] if isinstance(masks, np.ndarray) and masks.ndim == 3 else 0


def _check_record(path: Path, key, rec) -> tuple[np.ndarray, list[np.ndarray], list[tuple], str]:
    """``image (H, W)``, its masks, their cache keys and the series of one record, checked (values are checked
    when converted)."""
    where = f"{path}: record {_short(key)}"
    if not isinstance(rec, dict):
        raise DataError(f"{where} is a {type(rec).__name__}: expected a dict with {', '.join(_FIELDS)}")
    missing = [f for f in _FIELDS if f not in rec]
    if missing:
        raise DataError(f"{where} lacks {', '.join(repr(m) for m in missing)}: expected keys {', '.join(_FIELDS)}")
    image = rec["image"]
    if not isinstance(image, np.ndarray) or image.ndim != 2 or image.dtype.kind not in "uif":
        desc = f"a {image.ndim}-D {image.dtype} array" if isinstance(image, np.ndarray) else f"a {type(image).__name__}"
        raise DataError(f"{where}: 'image' is {desc}: expected a 2-D numeric array (H, W)")
    masks = rec["masks"]
    if not (isinstance(masks, (list, tuple)) or (isinstance(masks, np.ndarray) and masks.ndim == 3)) or not len(masks):
        raise DataError(f"{where}: no rater: 'masks' must be a non-empty list of (H, W) masks")
    keys = _mask_keys(masks)
    masks = list(masks)
    for r, m in enumerate(masks):
        if not isinstance(m, np.ndarray) or m.ndim != 2:
            raise DataError(f"{where}: 'masks'[{r}] is not a 2-D array")
        if m.shape != masks[0].shape:
            raise DataError(f"{where}: 'masks'[{r}] is {m.shape[0]}x{m.shape[1]} but 'masks'[0] is "
                            f"{masks[0].shape[0]}x{masks[0].shape[1]}: every mask of a record must have one size")
    h, w = image.shape
    if masks[0].shape != image.shape:
        raise DataError(f"{where}: masks are {masks[0].shape[0]}x{masks[0].shape[1]} but 'image' is {h}x{w}: expected the same size")
    side = max(h, w)
    if not h or not w or side * side > max(8 * h * w, 256 * 256):
        raise DataError(f"{where}: 'image' is {h}x{w}: expected a non-empty, roughly square crop (padding it to a square "
                        "may take at most 8 times its pixels, or 256x256)")
    series = rec["series_uid"]
    if type(series) is bytes:
        series = series.decode("latin1")
    elif isinstance(series, (int, np.integer)) and not isinstance(series, bool) and abs(int(series)) < 2**63:
        series = str(int(series))
    elif not isinstance(series, str):
        raise DataError(f"{where}: 'series_uid' is a {type(series).__name__}: expected a string (the CT series)")
    return image, masks, keys, str(series)


class _Converter:
    """Checks and resizes the arrays of one file's records; an array that several records share (a pickle's
    memo makes that cheap to write) is done once, and forgotten after its last use."""

    def __init__(self, path: Path, size: int, records: dict):
        self.path, self.size = path, size
        uses: dict[tuple, int] = {}
        for rec in records.values():
            if not isinstance(rec, dict):
                continue
            image, masks = rec.get("image"), rec.get("masks")
            keys = [("i", id(image), -1)] if isinstance(image, np.ndarray) else []
            if isinstance(masks, (list, tuple)) or (isinstance(masks, np.ndarray) and masks.ndim == 3):
                keys += _mask_keys(masks)
            for k in keys:
                uses[k] = uses.get(k, 0) + 1
        self.uses = {k: n for k, n in uses.items() if n > 1}
        self.done: dict[tuple, tuple] = {}  # key -> (the array, kept alive while its key is in use; the result)

    def _once(self, key: tuple, array: np.ndarray, convert: Callable):
        n = self.uses.get(key)
        if n is None:
            return convert()
        hit = self.done.get(key)
        if hit is None:
            hit = self.done[key] = (array, convert())
        if n == 1:
            del self.uses[key], self.done[key]
        else:
            self.uses[key] = n - 1
        return hit[1]

    def image(self, where: str, image: np.ndarray) -> tuple[np.ndarray, str]:
        """``(1, S, S)`` uint8 and the intensity rule."""

        def convert():
            try:
                scaled, rule = scale_intensity(image[:, :, None])
            except ValueError as e:
                raise DataError(f"{where}: 'image' {e}") from None
            return resize_image(pad_square(scaled), self.size), rule

        return self._once(("i", id(image), -1), image, convert)

    def mask(self, where: str, key: tuple, mask: np.ndarray) -> np.ndarray:
        """``(S, S)`` uint8 0/1."""

        def convert():
            bad = (mask != 0) & (mask != 1)
            if bad.any():
                values = sorted({float(v) for v in np.unique(mask[bad])[:5]})
                raise DataError(f"{where}: 'masks' hold values {values}: expected only 0 and 1")
            return resize_mask(pad_square(mask.astype(np.uint8)), self.size)

        return self._once(key, mask, convert)


class _Stack(ItemStack):
    """An :class:`ItemStack` of fixed capacity that takes items already resized (by :class:`_Converter`)."""

    def put(self, image: np.ndarray, masks: list[np.ndarray], hw: tuple[int, int], patient: str, slice_number: int) -> None:
        i = len(self.counts)
        self.sizes.add(hw)
        self.fixed[0][i] = image
        for r, m in enumerate(masks):
            self.fixed[1][i, r] = m
        self.counts.append(len(masks))
        self.patients.append(patient)
        self.slice_numbers.append(int(slice_number))


def _max_converted_bytes() -> int:
    value = os.environ.get("PYROSEG_LIDC_MAX_GIB")
    if value is None:
        return int(MAX_CONVERTED_GIB * 2**30)
    try:
        gib = float(value)
        if not gib > 0 or math.isinf(gib):
            raise ValueError
    except ValueError:
        raise DataError(f"PYROSEG_LIDC_MAX_GIB={value!r}: expected a positive number of GiB") from None
    return int(gib * 2**30)


def _check_budget(path: Path, records: int, raters: int, size: int) -> None:
    """Refuse, before allocating, a file whose converted arrays would exceed the caps."""
    slots = records * (1 + raters)
    need, cap = slots * size * size, _max_converted_bytes()
    if need > cap or slots > MAX_SLOTS:
        raise DataError(
            f"{path}: {records:,} records of up to {raters:,} raters would take {need / 2**30:.3g} GiB at {size}x{size} "
            f"({slots:,} images and masks); the caps are {cap / 2**30:.3g} GiB (PYROSEG_LIDC_MAX_GIB) and {MAX_SLOTS:,} "
            "images and masks per file: use a smaller --image-size or split the file")


def _read_file(path: Path, size: int, seen: dict[str, int], rules: set[str],
               progress: Callable[[int, int], None] | None) -> dict[str, np.ndarray]:
    """The arrays of one pickle: allocated once for its records, each record converted then dropped."""
    records = safe_load_pickle(path)
    if not isinstance(records, dict):
        raise DataError(f"{path}: holds a {type(records).__name__}: expected a dict {{key: {{'image', 'masks', 'series_uid'}}}}")
    total = len(records)
    most = max((_rater_count(r.get("masks")) for r in records.values() if isinstance(r, dict)), default=1)
    _check_budget(path, total, max(most, 1), size)
    try:
        stack = _Stack(size, capacity=total, raters=max(most, 1), channels=1)
        convert = _Converter(path, size, records)
        for k, key in enumerate(list(records)):
            rec = records.pop(key)  # drop the decoded record once converted: one copy at a time
            image, masks, keys, series = _check_record(path, key, rec)
            where = f"{path}: record {_short(key)}"
            img, rule = convert.image(where, image)
            msk = [convert.mask(where, mk, m) for mk, m in zip(keys, masks)]
            rules.add(rule)
            number = seen.get(series, 0)
            seen[series] = number + 1
            stack.put(img, msk, (int(image.shape[0]), int(image.shape[1])), series, number)
            if progress is not None:
                progress(k + 1, total)
        return stack.arrays()
    except MemoryError:
        raise DataError(f"{path}: out of memory converting {total:,} records of up to {most:,} raters at {size}x{size}: "
                        "use a smaller --image-size or split the file") from None


def load_lidc(
    path: str | os.PathLike,
    image_size: int,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> SegData:
    """Load LIDC crops (a ``data_lidc.pickle`` or a folder of them) at ``image_size``.

    :returns: a :class:`SegData` with ``images`` ``(N, 1, S, S)`` uint8,
        ``masks`` ``(N, A, S, S)`` (``A`` = the most raters of any record;
        ``rater_counts`` says how many are real), patients = ``series_uid``;
        ``meta["intensity"]`` names the scaling used.
    :raises DataError: for a refused global or opcode, a truncated or malformed
        pickle, a file over the caps (:data:`MAX_CONVERTED_GIB`,
        :data:`MAX_SLOTS`, :data:`OPS_ALLOWANCE`), a record without
        ``image``/``masks``/``series_uid``, masks of different sizes in one
        record, masks not 0/1, or a record with no mask; the message names the
        file (and the record's key).
    """
    size = check_image_size(image_size)
    files = lidc_files(path)
    root = Path(path).expanduser()
    root = root if root.is_dir() else root.parent

    def build() -> dict[str, np.ndarray]:
        seen, rules, parts = {}, set(), []
        for f in files:
            log.info("reading %s (only numpy arrays of numbers are admitted)", f)
            parts.append(_read_file(f, size, seen, rules, progress))
        try:
            arrays = ItemStack.concatenate(parts)
        except MemoryError:
            raise DataError(f"{path}: out of memory joining {len(files)} files at {size}x{size}: use a smaller --image-size") from None
        if not len(arrays["images"]):
            raise DataError(f"{path}: no records: expected {{key: {{'image', 'masks', 'series_uid'}}}}")
        arrays["intensity"] = np.array("; ".join(INTENSITY_RULES[r] for r in sorted(rules)))
        return arrays

    try:
        stamps = file_stamp(files, root)
    except OSError as e:
        raise DataError(f"cannot read {e.filename}: {e.strerror or e}") from None
    arrays, hit = cached("lidc", stamps, build, image_size=size, cache_dir=cache_dir, use_cache=use_cache)
    if hit and progress is not None:
        progress(len(arrays["images"]), len(arrays["images"]))
    return SegData(
        images=arrays["images"],
        masks=arrays["masks"],
        patients=arrays["patients"],
        slice_numbers=arrays["slice_numbers"],
        rater_counts=arrays["rater_counts"],
        source=str(Path(path).expanduser()),
        meta={"image_size": size, "original_sizes": [int(v) for v in arrays["original_sizes"]],
              "format": "lidc-pickle", "intensity": str(arrays["intensity"])},
    )
