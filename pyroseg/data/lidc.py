"""Reading the LIDC-IDRI crops (``data_lidc.pickle``) into a :class:`SegData`, safely.

Format (the PyTorch Probabilistic U-Net's file, which PHiSeg, SSN and others
also read)::

    {key: {"image": float32 (H, W) in [0, 1],
           "masks": [A x uint8 (H, W) of 0/1],
           "series_uid": "1.3.6.1.4.1.14519..."}}       # the CT series: the patient

``--data`` is such a file, or a folder of them (every ``*.pickle`` / ``*.pkl``
in it, by name). Opening a pickle must never run code, so it is read by
:class:`NumpyOnlyUnpickler`, which resolves only numpy's array reconstruction
(the ``numpy.core`` names that numpy 1.x writes, which the published file
has, and the ``numpy._core`` names of numpy 2.x); any other global is refused
with one line naming the file and the global, before anything is called.

Each file is read in one pass from disk (no second copy of its bytes); the
output arrays are allocated once for its record count, and each record is
converted into them and then dropped from the decoded dict, so the decoded and
the converted forms of the data never both exist in full (converted at
128x128, the 15,096 crops of 4 raters take 1.2 GB). The arrays
are cached as the LGG reader's are (:func:`pyroseg.data.raters.cached`), keyed
by the files' sizes and modification times.

Items: one per record, in the file's order; patient = ``series_uid``; slice
number = the record's position among its series' records. Raters: the
record's masks, any number (a record with fewer than the most is padded, see
``SegData.rater_counts``). Intensities: floats in [0, 1] times 255 (the crops
are already normalised); other images by :func:`pyroseg.data.raters.scale_intensity`.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pyroseg.data.core import SegData
from pyroseg.data.lgg import check_image_size
from pyroseg.data.raters import INTENSITY_RULES, ItemStack, cached, file_stamp, scale_intensity
from pyroseg.errors import DataError

__all__ = ["NumpyOnlyUnpickler", "safe_load_pickle", "lidc_files", "load_lidc", "is_lidc", "PICKLE_SUFFIXES"]

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pickle", ".pkl")
_FIELDS = ("image", "masks", "series_uid")


def _allowed() -> dict[tuple[str, str], object]:
    """The globals a data pickle may name: numpy's array (and scalar) reconstruction, under both spellings."""
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's own _reconstruct, whatever its module
    scalar = np.float32(0).__reduce__()[0]
    out: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "_reconstruct")] = reconstruct
        out[(mod, "scalar")] = scalar
    return out


_ALLOWED = _allowed()


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`_ALLOWED` (numpy array reconstruction).

    Any other global (``os.system``, ``builtins.eval``, a class) raises
    :class:`DataError` naming ``source`` and the global, so no code the pickle
    names is ever looked up, let alone called. Persistent ids are refused too.
    """

    def __init__(self, file, *, source: str | os.PathLike):
        super().__init__(file)
        self.source = str(source)

    def find_class(self, module: str, name: str):
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise DataError(
                f"{self.source}: refused to load the global {module}.{name}: a data pickle may only hold numpy "
                "arrays (numpy.core/_core.multiarray._reconstruct, numpy.ndarray, numpy.dtype)"
            )
        return obj

    def persistent_load(self, pid):
        raise DataError(f"{self.source}: refused a persistent id in the pickle: a data pickle may only hold numpy arrays")


def safe_load_pickle(path: str | os.PathLike):
    """Unpickle ``path`` with :class:`NumpyOnlyUnpickler`; any failure is a one-line :class:`DataError`."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return NumpyOnlyUnpickler(fh, source=path).load()
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except (EOFError, pickle.UnpicklingError) as e:
        raise DataError(f"cannot read {path}: truncated or not a pickle ({e or type(e).__name__})") from None
    except Exception as e:  # noqa: BLE001 - a malformed stream fails in many ways (ValueError, TypeError, ...)
        raise DataError(f"cannot read {path}: malformed pickle ({type(e).__name__}: {e})") from None


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


def _check_record(path: Path, key, rec) -> tuple[np.ndarray, np.ndarray, str]:
    """``image (H, W, 1)``, ``masks (A, H, W)`` uint8 0/1 and the series of one record, checked."""
    where = f"{path}: record {key!r}"
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
    if isinstance(masks, np.ndarray) and masks.ndim == 3:
        masks = list(masks)
    if not isinstance(masks, (list, tuple)) or not masks:
        raise DataError(f"{where}: no rater: 'masks' must be a non-empty list of (H, W) masks")
    for r, m in enumerate(masks):
        if not isinstance(m, np.ndarray) or m.ndim != 2:
            raise DataError(f"{where}: 'masks'[{r}] is not a 2-D array")
        if m.shape != masks[0].shape:
            raise DataError(f"{where}: 'masks'[{r}] is {m.shape[0]}x{m.shape[1]} but 'masks'[0] is "
                            f"{masks[0].shape[0]}x{masks[0].shape[1]}: every mask of a record must have one size")
    if masks[0].shape != image.shape:
        raise DataError(f"{where}: masks are {masks[0].shape[0]}x{masks[0].shape[1]} but 'image' is "
                        f"{image.shape[0]}x{image.shape[1]}: expected the same size")
    stacked = np.stack(masks)
    bad = (stacked != 0) & (stacked != 1)
    if bad.any():
        raise DataError(f"{where}: 'masks' hold values {sorted({float(v) for v in np.unique(stacked[bad])[:5]})}: expected only 0 and 1")
    return image[:, :, None], stacked.astype(np.uint8), str(rec["series_uid"])


def _read_file(path: Path, size: int, seen: dict[str, int], rules: set[str],
               progress: Callable[[int, int], None] | None) -> dict[str, np.ndarray]:
    """The arrays of one pickle: allocated once for its records, each record converted then dropped."""
    records = safe_load_pickle(path)
    if not isinstance(records, dict):
        raise DataError(f"{path}: holds a {type(records).__name__}: expected a dict {{key: {{'image', 'masks', 'series_uid'}}}}")
    total = len(records)
    most = max((len(r["masks"]) for r in records.values() if isinstance(r, dict) and isinstance(r.get("masks"), (list, tuple, np.ndarray))), default=1)
    stack = ItemStack(size, capacity=total, raters=max(most, 1), channels=1)
    for k, key in enumerate(list(records)):
        rec = records.pop(key)  # drop the decoded record once converted: one copy at a time
        image, masks, series = _check_record(path, key, rec)
        try:
            image, rule = scale_intensity(image)
        except ValueError as e:
            raise DataError(f"{path}: record {key!r}: 'image' {e}") from None
        rules.add(rule)
        number = seen.get(series, 0)
        seen[series] = number + 1
        stack.add(image, masks, series, number)
        if progress is not None:
            progress(k + 1, total)
    return stack.arrays()


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
    :raises DataError: for a refused global, a truncated or malformed pickle, a
        record without ``image``/``masks``/``series_uid``, masks of different
        sizes in one record, masks not 0/1, or a record with no mask; the
        message names the file and the record's key.
    """
    size = check_image_size(image_size)
    files = lidc_files(path)
    root = Path(path).expanduser()
    root = root if root.is_dir() else root.parent

    def build() -> dict[str, np.ndarray]:
        seen, rules, parts = {}, set(), []
        for f in files:
            log.info("reading %s (only numpy arrays are admitted)", f)
            parts.append(_read_file(f, size, seen, rules, progress))
        arrays = ItemStack.concatenate(parts)
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
