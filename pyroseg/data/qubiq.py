"""Reading QUBIQ challenge data (NIfTI, several raters per case) into a :class:`SegData`.

Layout (QUBIQ's own)::

    <task folder>/Training/caseNN/image.nii.gz            the image (2-D, 2-D with channels, or 3-D)
    <task folder>/Training/caseNN/task01_seg01.nii.gz     rater 1 of task 1, 0/1, the image's spatial shape
    ...                          task01_segMM.nii.gz      rater M (any number, may differ between cases)
    <task folder>/Validation/caseNN/...                   the same

``--data`` is the task folder (its ``Training`` and ``Validation`` cases
together), one of those two folders, or any folder of case folders.

* **Task**: ``--task task01`` (or ``1``) picks the task; when the cases hold one
  task it is chosen, with several and no ``--task`` the error lists them.
* **Raters**: every ``<task>_segMM`` file of a case, in MM order; a case with
  fewer raters than the most is padded (``SegData.rater_counts``).
* **Shapes**: an image of ``(H, W)`` is one grayscale item; ``(H, W, C)`` with
  ``(H, W)`` raters is one item of ``C`` channels (QUBIQ brain-tumor's 4 MRI
  sequences); ``(X, Y, Z)`` with raters of the same shape is a volume, sliced
  along ``slice_axis`` (default the last) into 2-D items of one patient
  (``(X, Y, Z, C)`` likewise, with channels). Size-1 axes after the first two
  are dropped first. Any size: non-square items are centred on a zero square,
  then resized as the LGG reader resizes (:mod:`pyroseg.data.resize`).
* **Intensities**: :func:`pyroseg.data.raters.scale_intensity` (QUBIQ's uint8
  as stored; other types by percentiles per volume and channel), recorded in
  ``meta["intensity"]``.
* **Patients**: the case folder's name (``Validation/caseNN`` when a
  ``Training`` case has the same name).

The decoded arrays are cached as the LGG reader's are, keyed by every file's
size and modification time, the task and the slice axis.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyroseg.data.core import SegData
from pyroseg.data.lgg import check_image_size
from pyroseg.data.raters import INTENSITY_RULES, ItemStack, cached, check_item_size, file_stamp, scale_intensity
from pyroseg.errors import DataError, UsageError

__all__ = ["QubiqCase", "is_qubiq", "scan_qubiq", "load_qubiq", "read_nifti", "nifti_items", "SPLIT_FOLDERS", "IMAGE_NAME",
           "MAX_NIFTI_VOXELS", "AFFINE_ATOL"]

log = logging.getLogger(__name__)

SPLIT_FOLDERS = ("Training", "Validation")
IMAGE_NAME = "image.nii.gz"
_IMAGE_NAMES = ("image.nii.gz", "image.nii")
_SEG = re.compile(r"(task\d+)_seg(\d+)\.nii(\.gz)?", re.IGNORECASE)


@dataclass(frozen=True)
class QubiqCase:
    """One case: its id (the patient), image file and rater files of the chosen task, in rater order."""

    name: str
    folder: Path
    image: Path
    raters: tuple[Path, ...]


def _visible_dirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX")
    except OSError as e:
        raise DataError(f"cannot list folder {folder}: {e.strerror or e}") from None


def _looks_like_case(folder: Path) -> bool:
    try:
        return any(p.name in _IMAGE_NAMES or _SEG.fullmatch(p.name) for p in folder.iterdir())
    except OSError:
        return False


def _case_folders(root: Path) -> list[tuple[str, Path]]:
    """``(split folder or "", case folder)`` of every case under ``root``; [] when ``root`` is not a QUBIQ layout."""
    splits = [root / s for s in SPLIT_FOLDERS if (root / s).is_dir()]
    if splits:
        return [(s.name, c) for s in splits for c in _visible_dirs(s)]
    cases = _visible_dirs(root)
    if any(_looks_like_case(c) for c in cases):
        return [("", c) for c in cases]
    return []


def is_qubiq(path: Path) -> bool:
    """A task folder with ``Training``/``Validation``, or a folder of case folders (one with ``image.nii.gz``)."""
    return path.is_dir() and bool(_case_folders(path))


def _task_name(task: str) -> str:
    t = str(task).strip().lower()
    if t.isdigit():
        return f"task{int(t):02d}"
    m = re.fullmatch(r"task(\d+)", t)
    if m is None:
        raise UsageError(f"--task {task!r}: expected a QUBIQ task name such as task01 (or its number)")
    return f"task{int(m.group(1)):02d}"


def scan_qubiq(root: str | os.PathLike, task: str | None = None) -> tuple[list[QubiqCase], str]:
    """List every case of a QUBIQ folder and its raters for one task, opening no file.

    :returns: the cases (sorted by split folder, then name) and the task chosen.
    :raises DataError: no case folders; a case without ``image.nii.gz``; a case
        with no rater file for the task.
    :raises UsageError: ``--task`` names a task no case has, or the cases hold
        several tasks and none was given (the message lists them).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"QUBIQ data folder {root} does not exist or is not a folder")
    folders = _case_folders(root)
    if not folders:
        raise DataError(f"no case folders in {root}: expected {root}/Training/caseNN/{IMAGE_NAME} and taskNN_segMM.nii.gz")
    names = [c.name for _, c in folders]
    listing: list[tuple[str, Path, Path, dict[str, dict[int, Path]]]] = []
    for split, folder in folders:
        files = sorted(p for p in folder.iterdir() if p.is_file())
        image = next((p for p in files if p.name in _IMAGE_NAMES), None)
        if image is None:
            raise DataError(f"case folder {folder} has no {IMAGE_NAME}: every QUBIQ case holds its image as {IMAGE_NAME}")
        tasks: dict[str, dict[int, Path]] = {}
        for p in files:
            m = _SEG.fullmatch(p.name)
            if m:
                tasks.setdefault(_task_name(m.group(1)), {})[int(m.group(2))] = p
        name = f"{split}/{folder.name}" if split and names.count(folder.name) > 1 else folder.name
        listing.append((name, folder, image, tasks))
    present = sorted({t for *_, tasks in listing for t in tasks})
    if task is None:
        if len(present) > 1:
            raise UsageError(f"--task: the cases in {root} hold several tasks ({', '.join(present)}); choose one with --task")
        if not present:
            raise DataError(f"no rater files in {root}: expected taskNN_segMM.nii.gz beside each {IMAGE_NAME}")
        chosen = present[0]
    else:
        chosen = _task_name(task)
        if chosen not in present:
            raise UsageError(f"--task {task}: not present in {root}; the cases hold {', '.join(present) or 'no task'}")
    cases = []
    for name, folder, image, tasks in listing:
        raters = tasks.get(chosen)
        if not raters:
            raise DataError(f"case folder {folder} has no rater for {chosen}: expected {chosen}_seg01.nii.gz ...")
        cases.append(QubiqCase(name, folder, image, tuple(raters[k] for k in sorted(raters))))
    return cases, chosen


# --------------------------------------------------------------------------- decoding


#: The most voxels one NIfTI file may declare (512^3); a header that declares more is refused before any read.
MAX_NIFTI_VOXELS = 2**27
#: Deflate compresses at most about 1032:1, so a ``.nii.gz`` of ``n`` bytes holds at most this many times ``n``.
_GZIP_MAX_RATIO = 1100
#: How far (in each of the 4x4 affine's entries: mm, or mm per voxel) a rater's affine may be from its image's.
AFFINE_ATOL = 1e-3


def _one_line(e: BaseException) -> str:
    """``Type: message`` of an exception, on one line and not too long."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _check_header(path: Path, img) -> None:
    """Refuse, before reading any voxel, a header whose data cannot be in the file or is not numbers.

    The declared voxel count and type must fit :data:`MAX_NIFTI_VOXELS`, and
    what they take must fit the file (for a ``.gz``, its size times the most
    deflate can compress), so a damaged or hostile header never makes the
    reader allocate more than the file could hold.
    """
    header = img.header
    shape = tuple(int(n) for n in header.get_data_shape())
    dtype = header.get_data_dtype()
    dims = "x".join(map(str, shape))
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise DataError(f"{path} holds {dtype} voxels: expected integers or floats (a scalar image)")
    if not shape or min(shape) < 1:
        raise DataError(f"{path} declares a {dims or '0-D'} array: expected every axis at least 1 long (a damaged header?)")
    voxels = 1
    for n in shape:
        voxels *= n  # Python ints: a product of 7 axes of 32767 does not overflow
    if voxels > MAX_NIFTI_VOXELS:
        raise DataError(f"{path} declares {dims} voxels ({voxels:,}): more than the {MAX_NIFTI_VOXELS:,} a NIfTI may hold "
                        "here (a damaged header?)")
    need = int(header.get_data_offset()) + voxels * dtype.itemsize
    size = path.stat().st_size
    gz = path.name.lower().endswith(".gz")
    room = size * _GZIP_MAX_RATIO if gz else size
    if need > room:
        raise DataError(f"{path} declares {dims} {dtype} voxels ({need:,} bytes with its header) but the file "
                        f"({size:,} bytes{', gzipped' if gz else ''}) cannot hold them: truncated, or a damaged header")


def read_nifti(path: Path):
    """``(array, nibabel image)`` of a NIfTI file; size-1 axes after the first two dropped.

    The header is checked before any voxel is read (:func:`_check_header`);
    a file that fails, or fails to decode, is a one-line :class:`DataError`.
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as e:  # noqa: BLE001 - nibabel raises many types for a bad header
        raise DataError(f"cannot read {path}: not a readable NIfTI file ({_one_line(e)})") from None
    try:
        _check_header(path, img)
    except (ValueError, TypeError, OverflowError, OSError) as e:  # a header nibabel parses but cannot describe
        raise DataError(f"cannot read {path}: not a readable NIfTI header ({_one_line(e)})") from None
    try:
        arr = np.asanyarray(img.dataobj)
    except Exception as e:  # noqa: BLE001 - nibabel raises many types for a bad file
        raise DataError(f"cannot read {path}: not a readable NIfTI file ({_one_line(e)})") from None
    keep = [i for i, n in enumerate(arr.shape) if i < 2 or n != 1]
    return arr.reshape([arr.shape[i] for i in keep]), img


def _affine(path: Path, img) -> np.ndarray:
    try:
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - a damaged qform/sform fails in nibabel's maths
        raise DataError(f"cannot read {path}: its header's affine cannot be computed ({_one_line(e)})") from None
    if affine.shape != (4, 4):
        raise DataError(f"cannot read {path}: its header gives no 4x4 affine")
    return affine


def _check_affines(image: Path, image_nii, raters: list[tuple[Path, object]]) -> None:
    """Every rater file must lie where its image lies: the same 4x4 affine, within :data:`AFFINE_ATOL`."""
    ref = _affine(image, image_nii)
    for path, nii in raters:
        aff = _affine(path, nii)
        if not np.allclose(aff, ref, rtol=0, atol=AFFINE_ATOL, equal_nan=True):
            worst = float(np.nanmax(np.abs(aff - ref))) if np.isfinite(aff - ref).any() else float("nan")
            raise DataError(f"rater file {path} has another affine than its image {image} (they differ by up to {worst:g}; "
                            f"expected the same within {AFFINE_ATOL:g}): the mask would not lie on the image")


def _read_mask(path: Path) -> tuple[np.ndarray, object]:
    arr, nii = read_nifti(path)
    bad = (arr != 0) & (arr != 1)
    if bad.any():
        values = np.unique(arr[bad])
        shown = ", ".join(f"{v:g}" for v in values[:5].astype(float))
        raise DataError(f"rater file {path} has values {shown}: expected only 0 and 1 (QUBIQ masks are 0/1)")
    return arr.astype(np.uint8), nii


def nifti_items(image: np.ndarray, mask_shape: tuple[int, ...], slice_axis: int, *, source: Path):
    """Split a NIfTI image array into 2-D items ``(H, W, C)``, with how the rater arrays split alike.

    ``mask_shape``: the raters' shape (after dropping size-1 axes). Returns
    ``(items, cut)``: ``items`` a list of ``(slice_number, image (H, W, C))``
    and ``cut(mask) -> list of (H, W)`` in the same order. See the module docs
    for the shapes accepted.
    """
    spatial = image.ndim
    if image.ndim == len(mask_shape) + 1 and image.shape[:-1] == tuple(mask_shape):
        spatial = image.ndim - 1  # channels last
    elif image.shape != tuple(mask_shape):
        raise DataError(f"{source}: image is {'x'.join(map(str, image.shape))} but its raters are "
                        f"{'x'.join(map(str, mask_shape))}: expected the same spatial shape")
    if spatial == 2:
        img = image if image.ndim == 3 else image[:, :, None]
        return [(0, img)], lambda m: [m]
    if spatial != 3:
        raise DataError(f"{source} is {spatial}-D ({'x'.join(map(str, image.shape))}): expected a 2-D image or a 3-D volume")
    if not -3 <= slice_axis <= 2:
        raise UsageError(f"--slice-axis {slice_axis}: a 3-D volume has axes 0, 1, 2 (or -1, -2, -3)")
    ax = slice_axis % 3
    vol = np.moveaxis(image, ax, 2)  # (H, W, D[, C])
    items = [(k, vol[:, :, k] if vol.ndim == 4 else vol[:, :, k, None]) for k in range(vol.shape[2])]
    return items, lambda m: [np.moveaxis(m, ax, 2)[:, :, k] for k in range(m.shape[ax])]


def _decode(cases: list[QubiqCase], size: int, slice_axis: int, progress) -> dict[str, np.ndarray]:
    stack, rules = ItemStack(size), set()
    for i, case in enumerate(cases):
        read = [_read_mask(p) for p in case.raters]
        masks = [m for m, _ in read]
        for p, m in zip(case.raters[1:], masks[1:]):
            if m.shape != masks[0].shape:
                raise DataError(f"rater file {p} is {'x'.join(map(str, m.shape))} but {case.raters[0].name} is "
                                f"{'x'.join(map(str, masks[0].shape))}: every rater of a case must have one shape")
        image, image_nii = read_nifti(case.image)
        if image.ndim not in (2, 3, 4):
            raise DataError(f"{case.image} is {image.ndim}-D: expected a 2-D image or a 3-D volume")
        if masks[0].ndim not in (2, 3):
            raise DataError(f"rater file {case.raters[0]} is {masks[0].ndim}-D: expected 2-D or 3-D")
        channels_last = image.ndim == masks[0].ndim + 1
        try:
            image, rule = scale_intensity(image, channels_last=channels_last)
        except ValueError as e:
            raise DataError(f"{case.image}: {e}") from None
        rules.add(rule)
        items, cut = nifti_items(image, masks[0].shape, slice_axis, source=case.image)
        _check_affines(case.image, image_nii, [(p, nii) for p, (_, nii) in zip(case.raters, read)])
        if items:
            check_item_size(*items[0][1].shape, source=case.image)
        per_rater = [cut(m) for m in masks]  # (A, D) of (H, W)
        for k, (number, img) in enumerate(items):
            stack.add(img, np.stack([r[k] for r in per_rater]), case.name, number)
        if progress is not None:
            progress(i + 1, len(cases))
    try:
        arrays = stack.arrays()
    except ValueError as e:
        raise DataError(f"{cases[0].folder.parent}: {e}: every case must have the same channels") from None
    arrays["intensity"] = np.array("; ".join(INTENSITY_RULES[r] for r in sorted(rules)))
    return arrays


def load_qubiq(
    root: str | os.PathLike,
    image_size: int,
    *,
    task: str | None = None,
    slice_axis: int = -1,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> SegData:
    """Load a QUBIQ folder at ``image_size`` (see the module docs for the layout and rules).

    :returns: a :class:`SegData`: ``images`` ``(N, C, S, S)`` uint8 (``C`` from
        the data), ``masks`` ``(N, A, S, S)`` with ``rater_counts``, patients =
        cases, slice numbers = index along ``slice_axis`` (0 for 2-D cases);
        ``meta`` holds ``task``, ``slice_axis`` and ``intensity``.
    :raises DataError: as :func:`scan_qubiq`, and for a rater whose shape
        differs from its image's, a rater whose affine differs from its
        image's (beyond :data:`AFFINE_ATOL`; the message names both files), a
        mask not 0/1, a NIfTI that is not 2-D or 3-D, or a header refused
        before reading (:func:`read_nifti`); the message names the file.
    :raises UsageError: as :func:`scan_qubiq` (e.g. a ``--task`` not present).
    """
    size = check_image_size(image_size)
    root_path = Path(root).expanduser()
    cases, chosen = scan_qubiq(root_path, task)
    paths = [p for c in cases for p in (c.image, *c.raters)]
    try:
        stamps = file_stamp(paths, root_path)
    except OSError as e:
        raise DataError(f"cannot read {e.filename}: {e.strerror or e}") from None
    arrays, hit = cached("qubiq", [f"task={chosen} axis={slice_axis}", *stamps],
                         lambda: _decode(cases, size, slice_axis, progress),
                         image_size=size, cache_dir=cache_dir, use_cache=use_cache)
    if hit and progress is not None:
        progress(len(cases), len(cases))
    return SegData(
        images=arrays["images"],
        masks=arrays["masks"],
        patients=arrays["patients"],
        slice_numbers=arrays["slice_numbers"],
        rater_counts=arrays["rater_counts"],
        source=str(root_path),
        meta={"image_size": size, "original_sizes": [int(v) for v in arrays["original_sizes"]], "format": "qubiq-nifti",
              "task": chosen, "slice_axis": slice_axis, "intensity": str(arrays["intensity"])},
    )
