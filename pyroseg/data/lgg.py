"""Reading the LGG segmentation data set (the kaggle_3m layout) into a :class:`SegData`.

Layout (see the data README)::

    kaggle_3m/<patient>/<patient>_<slice>.tif        RGB image, square, any size
    kaggle_3m/<patient>/<patient>_<slice>_mask.tif   L (or 1) mask, values 0 or 255

:func:`scan_lgg` lists and pairs the files without decoding them;
:func:`load_lgg` decodes, validates and resizes every slice and keeps the result
in an ``.npz`` cache keyed by the files' names, sizes and modification times, so
a second load reads one file and opens no TIFF.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pyroseg.data.core import SegData
from pyroseg.data.resize import resize_image, resize_mask
from pyroseg.errors import DataError, UsageError

__all__ = ["SliceFiles", "scan_lgg", "load_lgg", "read_image", "read_mask", "read_npz", "default_cache_dir", "cache_key",
           "CACHE_FORMAT_VERSION", "write_cache", "check_image_size"]

logger = logging.getLogger(__name__)

#: Bump when the cached arrays change meaning (resize rule, dtype, keys).
CACHE_FORMAT_VERSION = 1

_TIF_SUFFIXES = (".tif", ".tiff")
_MASK_MODES = ("L", "1")
_CACHE_KEYS = ("images", "masks", "patients", "slice_numbers", "original_sizes", "image_size")

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class SliceFiles:
    """The two files of one slice: ``image_path`` (RGB) and ``mask_path`` (0/255)."""

    patient: str
    slice_number: int
    image_path: Path
    mask_path: Path


# --------------------------------------------------------------------------- scanning


def _resolve_root(root: str | os.PathLike) -> Path:
    """The folder that holds the patient folders: ``root`` or ``root/kaggle_3m``."""
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"LGG data folder {path} does not exist")
    if not path.is_dir():
        raise DataError(f"LGG data path {path} is not a directory: expected the kaggle_3m folder")
    inner = path / "kaggle_3m"
    if path.name != "kaggle_3m" and inner.is_dir():
        logger.info("using %s (found inside %s)", inner, path)
        return inner
    return path


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _list_dir(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder`` sorted by name; an unreadable folder is a :class:`DataError`."""
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"cannot list folder {folder}: {e.strerror or e}") from None


def _patient_dirs(root: Path) -> list[Path]:
    """Every visible sub-folder of ``root``, sorted by name (files such as data.csv are ignored)."""
    dirs = [Path(e.path) for e in _list_dir(root) if e.is_dir() and not _is_hidden(e.name)]
    if not dirs:
        raise DataError(
            f"no patient folders in {root}: expected the kaggle_3m folder, holding one folder per patient "
            f"with <patient>_<slice>.tif and <patient>_<slice>_mask.tif files"
        )
    return dirs


def _scan_patient(folder: Path) -> list[SliceFiles]:
    """Pair the images and masks of one patient folder, sorted by slice number."""
    name = folder.name
    pattern = re.compile(rf"{re.escape(name)}_(\d+)(_mask)?\.tif")
    images: dict[int, Path] = {}
    masks: dict[int, Path] = {}
    for entry in _list_dir(folder):
        if _is_hidden(entry.name) or not entry.is_file() or not entry.name.lower().endswith(_TIF_SUFFIXES):
            continue
        m = pattern.fullmatch(entry.name)
        if m is None:
            raise DataError(
                f"unexpected file name {entry.path}: expected {name}_<slice>.tif or {name}_<slice>_mask.tif"
            )
        number = int(m.group(1))
        table = masks if m.group(2) else images
        if number in table:
            raise DataError(f"{entry.path} and {table[number]} both have slice number {number}")
        table[number] = Path(entry.path)
    if not images and not masks:
        raise DataError(
            f"patient folder {folder} has no slices: expected {name}_<slice>.tif and {name}_<slice>_mask.tif"
        )
    for number in sorted(images.keys() - masks.keys()):
        raise DataError(f"image {images[number]} has no mask: expected {folder / f'{name}_{number}_mask.tif'}")
    for number in sorted(masks.keys() - images.keys()):
        raise DataError(f"mask {masks[number]} has no image: expected {folder / f'{name}_{number}.tif'}")
    return [SliceFiles(name, n, images[n], masks[n]) for n in sorted(images)]


def scan_lgg(root: str | os.PathLike) -> list[SliceFiles]:
    """List and pair every slice of an LGG folder, without decoding anything.

    :param root: the ``kaggle_3m`` folder, or a folder that contains ``kaggle_3m/``.
    :returns: one :class:`SliceFiles` per slice, patients sorted by folder name and
        slices by slice number as integers (slice 10 comes after slice 2). The
        patient id is the patient folder's name.
    :raises DataError: when the folder is missing or not a directory, holds no
        patient folder, a patient folder holds no slice, an image lacks its mask
        or a mask its image, or a ``.tif`` file's name does not follow
        ``<folder>_<slice>.tif`` / ``<folder>_<slice>_mask.tif``. Files that are
        not ``.tif`` (notes, thumbnails) and hidden entries are ignored.
    """
    data_root = _resolve_root(root)
    files: list[SliceFiles] = []
    for folder in _patient_dirs(data_root):
        files.extend(_scan_patient(folder))
    return files


# --------------------------------------------------------------------------- caching


def default_cache_dir() -> Path:
    """``$PYROSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/pyroseg``, else ``~/.cache/pyroseg``."""
    explicit = os.environ.get("PYROSEG_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "pyroseg"


def _tif_paths(files: Iterable[SliceFiles]) -> Iterable[Path]:
    for f in files:
        yield f.image_path
        yield f.mask_path


def cache_key(files: list[SliceFiles], data_root: Path, image_size: int) -> str:
    """sha256 (hex) over the cache format version, ``image_size`` and, for every
    TIFF, its path relative to ``data_root``, its size and its ``mtime_ns``.

    Only ``stat`` is called: no file is opened. Moving the whole folder keeps the key.
    """
    h = hashlib.sha256()
    h.update(f"pyroseg-lgg v{CACHE_FORMAT_VERSION} size={image_size}\n".encode())
    for path in _tif_paths(files):
        try:
            st = path.stat()
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror or e}") from None
        rel = path.relative_to(data_root).as_posix()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"lgg-{key[:16]}.npz"


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an ``np.savez`` file, like ``dict(np.load(path))`` but faster.

    ``np.load`` reads each zip member into a bytes object and copies that into the
    array; the members ``np.savez`` writes are stored uncompressed, so here each
    array's bytes are read from the file straight into the array (measured 2x
    faster on the 128x128 cache, 190 MB). A compressed member, or one whose
    ``.npy`` header this does not handle, goes through numpy's own reader.
    Object arrays are refused, as ``np.load(allow_pickle=False)`` refuses them.
    """
    fmt = np.lib.format
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        for info in zf.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            arr = None
            if info.compress_type == zipfile.ZIP_STORED:
                fh.seek(info.header_offset)
                header = fh.read(30)  # the zip local file header; name and extra lengths at 26
                if len(header) == 30 and header[:4] == b"PK\x03\x04":
                    name_len, extra_len = struct.unpack("<HH", header[26:30])
                    fh.seek(info.header_offset + 30 + name_len + extra_len)
                    version = fmt.read_magic(fh)
                    if version in ((1, 0), (2, 0)):
                        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                        shape, fortran, dtype = read_header(fh)
                        if dtype.hasobject:
                            raise ValueError(f"{path}: {name} holds Python objects; refusing to unpickle them")
                        arr = np.empty(shape, dtype=dtype, order="F" if fortran else "C")
                        flat = arr.reshape(-1, order="A").view(np.uint8)
                        if fh.readinto(memoryview(flat)) != arr.nbytes:
                            raise ValueError(f"{path}: {name} is truncated")
            if arr is None:
                with zf.open(info) as member:
                    arr = fmt.read_array(member, allow_pickle=False)
            out[name] = arr
    return out


def _read_cache(path: Path, n: int, image_size: int) -> dict | None:
    """The arrays of a cache file, or None when it is missing, unreadable or inconsistent."""
    if not path.is_file():
        return None
    try:
        stored = read_npz(path)
        arrays = {k: stored[k] for k in _CACHE_KEYS}
        s = image_size
        ok = (
            arrays["images"].shape == (n, 3, s, s)
            and arrays["masks"].shape == (n, 1, s, s)
            and arrays["images"].dtype == np.uint8
            and arrays["masks"].dtype == np.uint8
            and arrays["patients"].shape == (n,)
            and arrays["slice_numbers"].shape == (n,)
            and int(arrays["image_size"]) == s
        )
        if not ok:
            raise ValueError("arrays have unexpected shapes or types")
        return arrays
    except Exception as e:  # noqa: BLE001 - any unreadable cache is rebuilt, never fatal
        logger.warning("ignoring unreadable cache file %s (%s: %s); rebuilding it", path, type(e).__name__, e)
        return None


def _write_cache(path: Path, arrays: dict) -> None:
    """Write ``arrays`` to ``path`` atomically (temp file + ``os.replace``); warn on failure."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".npz.tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
        tmp = None
        logger.info("cached the decoded data in %s", path)
    except OSError as e:
        logger.warning("cannot write the data cache %s (%s); continuing without a cache", path, e.strerror or e)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# --------------------------------------------------------------------------- decoding


#: The most pixels a slice may have (8192 x 8192): checked from the TIFF header, before any pixel is decoded.
MAX_SLICE_PIXELS = 2**26


def _open_tif(path: Path, check: Callable[[Image.Image], None] | None = None) -> Image.Image:
    """Open and fully decode one TIFF; any decoding failure becomes a :class:`DataError`.

    ``check(img)`` runs on the opened but not yet decoded image (its mode and
    size come from the header), so a file that is refused is never decoded; a
    TIFF over :data:`MAX_SLICE_PIXELS` is refused the same way. Pillow's
    warnings about the file (corrupt EXIF and the like) go to the log at debug
    level, naming the file, instead of to stderr.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = None
        try:
            img = Image.open(path)
            w, h = img.size
            if w * h > MAX_SLICE_PIXELS:
                raise DataError(f"{path} is {w}x{h}: more than the {MAX_SLICE_PIXELS:,} pixels a slice may have "
                                "(a damaged header?)")
            if check is not None:
                check(img)
            img.load()
        except DataError:
            if img is not None:
                img.close()
            raise
        except Exception as e:  # noqa: BLE001 - a damaged TIFF fails in many ways (OSError, struct.error, KeyError, ...)
            if img is not None:
                img.close()
            why = " ".join(str(e).split())[:200] or type(e).__name__
            raise DataError(f"cannot read {path}: unreadable or truncated TIFF ({why})") from None
    for w in caught:
        logger.debug("%s: %s", path, w.message)
    return img


def _check_image(path: Path, img: Image.Image) -> None:
    if img.mode != "RGB":
        raise DataError(f"image {path} has mode {img.mode}: expected 3-channel RGB")
    w, h = img.size
    if w != h:
        raise DataError(f"image {path} is {w}x{h}: expected a square image")


def read_image(path: Path) -> np.ndarray:
    """Decode an RGB square image to ``(H, W, 3)`` uint8."""
    with _open_tif(path, lambda img: _check_image(path, img)) as img:
        arr = np.asarray(img)
    if arr.shape != (img.size[1], img.size[0], 3) or arr.dtype != np.uint8:
        raise DataError(f"image {path} decodes to a {arr.dtype} array of {arr.shape}: expected {img.size[1]}x{img.size[0]}x3 uint8")
    return arr


def read_mask(path: Path, image_shape: tuple[int, int]) -> np.ndarray:
    """Decode a 0/255 mask to ``(H, W)`` uint8 0/1, checking its size against its image's."""

    def check(img: Image.Image) -> None:
        if img.mode not in _MASK_MODES:
            raise DataError(f"mask {path} has mode {img.mode}: expected a single-channel mask (mode L or 1)")
        w, h = img.size
        if (h, w) != image_shape:
            raise DataError(
                f"mask {path} is {w}x{h} but its image is {image_shape[1]}x{image_shape[0]}: expected the same size"
            )

    with _open_tif(path, check) as img:
        raw = np.asarray(img)
    if raw.shape != tuple(image_shape):
        raise DataError(f"mask {path} decodes to an array of {raw.shape}: expected {image_shape[0]}x{image_shape[1]}")
    if raw.dtype == bool:
        return raw.astype(np.uint8)
    bad = (raw != 0) & (raw != 255)
    if bad.any():
        values = np.unique(raw[bad])
        shown = ", ".join(str(int(v)) for v in values[:5])
        more = f" (and {len(values) - 5} more)" if len(values) > 5 else ""
        raise DataError(f"mask {path} has values {shown}{more}: expected only 0 and 255")
    return (raw == 255).astype(np.uint8)


def _decode_all(files: list[SliceFiles], image_size: int, progress: ProgressFn | None) -> dict:
    """Decode, validate and resize every slice; the arrays that go into the cache."""
    n, s = len(files), image_size
    images = np.empty((n, 3, s, s), dtype=np.uint8)
    masks = np.empty((n, 1, s, s), dtype=np.uint8)
    sizes: set[int] = set()
    for i, f in enumerate(files):
        img = read_image(f.image_path)
        mask = read_mask(f.mask_path, img.shape[:2])
        sizes.add(img.shape[0])
        images[i] = resize_image(img, s)
        masks[i, 0] = resize_mask(mask, s)
        if progress is not None:
            progress(i + 1, n)
    return {
        "images": images,
        "masks": masks,
        "patients": np.array([f.patient for f in files], dtype=str),
        "slice_numbers": np.array([f.slice_number for f in files], dtype=np.int64),
        "original_sizes": np.array(sorted(sizes), dtype=np.int64),
        "image_size": np.array(s, dtype=np.int64),
    }


def _check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise UsageError(f"image size must be a positive integer, got {image_size!r}")
    return int(image_size)


def load_lgg(
    root: str | os.PathLike,
    image_size: int,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: ProgressFn | None = None,
) -> SegData:
    """Load the LGG data set at ``image_size x image_size``.

    Every slice is decoded with Pillow and validated: the image must be a square
    3-channel RGB TIFF, the mask a single-channel (mode ``L`` or ``1``) TIFF of the
    same size holding only 0 and 255. Original sizes may differ between slices
    (each is resized on its own): images by area averaging, masks by majority vote
    (ties count as lesion), see :mod:`pyroseg.data.resize`.

    A mask value other than 0 and 255 is an error, not something to threshold:
    such values mean the mask went through a lossy conversion (JPEG, a resize with
    interpolation), and silently thresholding would hide that the labels are not
    the ones the annotator drew.

    :param root: the ``kaggle_3m`` folder, or a folder that contains it.
    :param image_size: side ``S`` of the images and masks returned.
    :param cache_dir: where to keep the decoded arrays; default
        :func:`default_cache_dir`. The cache file is
        ``<cache_dir>/lgg-<key16>.npz`` with the key from :func:`cache_key`, so any
        added, removed, resized or touched TIFF, or another ``image_size``, leads
        to a fresh decode. A cache hit opens no TIFF. An unreadable cache file is
        logged and rebuilt; an unwritable cache folder is logged and skipped.
    :param use_cache: False to neither read nor write the cache.
    :param progress: called as ``progress(done, total)`` after each decoded slice
        (once with ``(total, total)`` on a cache hit).
    :returns: a :class:`SegData` with ``images`` ``(N, 3, S, S)`` uint8, ``masks``
        ``(N, 1, S, S)`` uint8 0/1, ``patients`` (folder names) and
        ``slice_numbers`` in :func:`scan_lgg` order; ``source`` is the data folder
        and ``meta`` holds ``image_size`` and ``original_sizes`` (sorted distinct
        original sides).
    :raises UsageError: when ``image_size < 1``.
    :raises DataError: for a missing or malformed folder (see :func:`scan_lgg`) or
        any file that fails the checks above; the message names the file.
    """
    size = _check_image_size(image_size)
    data_root = _resolve_root(root)
    files = scan_lgg(data_root)
    cache_file: Path | None = None
    arrays: dict | None = None
    if use_cache:
        directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        cache_file = _cache_path(directory, cache_key(files, data_root, size))
        arrays = _read_cache(cache_file, len(files), size)
        if arrays is not None:
            logger.info("loaded %d slices from the cache %s", len(files), cache_file)
            if progress is not None:
                progress(len(files), len(files))
    if arrays is None:
        logger.info("decoding %d slices from %s at %dx%d", len(files), data_root, size, size)
        arrays = _decode_all(files, size, progress)
        if cache_file is not None:
            _write_cache(cache_file, arrays)
    return SegData(
        images=arrays["images"],
        masks=arrays["masks"],
        patients=arrays["patients"],
        slice_numbers=arrays["slice_numbers"],
        source=str(data_root),
        meta={"image_size": size, "original_sizes": [int(v) for v in arrays["original_sizes"]]},
    )


# --------------------------------------------------------------------------- shared with the other readers

#: The cache writer and the size check, used as they are by :mod:`pyroseg.data.qubiq`
#: and :mod:`pyroseg.data.lidc` (one cache folder, one atomic write, one message).
write_cache = _write_cache
check_image_size = _check_image_size
