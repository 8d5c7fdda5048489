"""Data: the LGG kaggle_3m reader, the multi-rater readers (QUBIQ NIfTI, LIDC
pickle), built-in synthetic sources, the patient split.

``load_source(spec, image_size)`` is the one entry point the training and
evaluation code uses; :func:`source_kind` says which reader a ``spec`` goes to:
``"synthetic"`` / ``"synthetic-ambiguous"`` by name; a ``.pickle`` / ``.pkl`` file
or a folder holding one: LIDC (:mod:`pyroseg.data.lidc`); a QUBIQ task folder
(with ``Training``/``Validation``), one of those, or a folder of case folders
with ``image.nii.gz``: QUBIQ (:mod:`pyroseg.data.qubiq`); anything else: the LGG
layout (:mod:`pyroseg.data.lgg`), as before.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pyroseg.data.core import SegData, SegDataset, collate_batch
from pyroseg.data.lgg import load_lgg, scan_lgg
from pyroseg.data.lidc import is_lidc, load_lidc
from pyroseg.data.qubiq import is_qubiq, load_qubiq
from pyroseg.data.split import SPLITS, split_for, split_patients
from pyroseg.data.synthetic import SOURCES as SYNTHETIC_SOURCES
from pyroseg.errors import UsageError

__all__ = [
    "SegData",
    "SegDataset",
    "collate_batch",
    "load_lgg",
    "load_lidc",
    "load_qubiq",
    "source_kind",
    "scan_lgg",
    "split_patients",
    "split_for",
    "SPLITS",
    "SYNTHETIC_SOURCES",
    "load_source",
    "is_synthetic",
]


def is_synthetic(spec: str) -> bool:
    return spec in SYNTHETIC_SOURCES


def source_kind(spec: str) -> str:
    """``"synthetic"``, ``"lidc"``, ``"qubiq"`` or ``"lgg"``: the reader ``spec`` goes to (see the module docs)."""
    if is_synthetic(spec):
        return "synthetic"
    path = Path(spec).expanduser()
    if is_lidc(path):
        return "lidc"
    if is_qubiq(path):
        return "qubiq"
    return "lgg"


def load_source(
    spec: str,
    image_size: int,
    *,
    seed: int = 0,
    synthetic_patients: int = 20,
    synthetic_slices: int = 16,
    cache_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    task: str | None = None,
    slice_axis: int = -1,
) -> SegData:
    """Load ``spec`` at ``image_size``: a synthetic source by name (generated
    from ``seed``), or a LIDC pickle, QUBIQ folder or LGG-layout folder (decoded
    once, then cached). ``task`` and ``slice_axis`` are QUBIQ's options;
    ``task`` given for another source is a usage error."""
    kind = source_kind(spec)
    if task is not None and kind != "qubiq":
        raise UsageError(f"--task {task}: only QUBIQ data has tasks; {spec} is {kind} data")
    if kind == "synthetic":
        make = SYNTHETIC_SOURCES[spec]
        return make(image_size, n_patients=synthetic_patients, slices_per_patient=synthetic_slices, seed=seed)
    if kind == "lidc":
        return load_lidc(spec, image_size, cache_dir=cache_dir, progress=progress)
    if kind == "qubiq":
        return load_qubiq(spec, image_size, task=task, slice_axis=slice_axis, cache_dir=cache_dir, progress=progress)
    return load_lgg(spec, image_size, cache_dir=cache_dir, progress=progress)
