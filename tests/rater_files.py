"""Small multi-rater files in each layout, written by the tests (QUBIQ NIfTI, LIDC pickle).

Not a test module: ``test_qubiq``, ``test_lidc`` and ``test_bad_inputs`` import it.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import nibabel as nib
import numpy as np

AFFINE = np.diag([0.5, 0.5, 2.0, 1.0])


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def square_mask(size: int, lo: int, hi: int) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[lo:hi, lo:hi] = 1
    return m


def write_case(folder: Path, image: np.ndarray, masks: list[np.ndarray], task: str = "task01") -> Path:
    """``folder/image.nii.gz`` and ``folder/<task>_segNN.nii.gz`` for each mask."""
    write_nifti(folder / "image.nii.gz", image)
    for r, m in enumerate(masks, 1):
        write_nifti(folder / f"{task}_seg{r:02d}.nii.gz", m)
    return folder


def write_qubiq(root: Path, size: int = 16) -> Path:
    """A task folder: Training/case01 (3 raters), case02 (3 raters), case03 (2 raters), Validation/case04 (3),
    case05 (3): 2-D uint8 images ``size x size`` whose pixels are ``10 * case number``; rater r of every
    case marks the square [2, 2 + 2 r + 2) (so rater masks differ and rater 1 is the smallest)."""
    for split, cases in (("Training", ((1, 3), (2, 3), (3, 2))), ("Validation", ((4, 3), (5, 3)))):
        for number, raters in cases:
            image = np.full((size, size), 10 * number, np.uint8)
            masks = [square_mask(size, 2, 2 + 2 * (r + 1)) for r in range(raters)]
            write_case(root / split / f"case{number:02d}", image, masks)
    return root


def lidc_record(series: str, size: int = 16, raters: int = 4, value: float = 0.5) -> dict:
    image = np.full((size, size), value, np.float32)
    return {"image": image, "masks": [square_mask(size, 2, 4 + 2 * r) for r in range(raters)], "series_uid": series}


def write_lidc(path: Path, records: dict, protocol: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(records, fh, protocol=protocol)
    return path


class MakesAFile:
    """Unpickling this calls ``open(target, "w")``: a pickle that would create a file when loaded."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def write_evil_lidc(path: Path, target: Path) -> Path:
    """A LIDC-shaped pickle whose first record's image would create ``target`` when loaded."""
    rec = lidc_record("s1")
    rec["image"] = MakesAFile(str(target))
    return write_lidc(path, {"k1": rec})
