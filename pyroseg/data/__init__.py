"""Data: the LGG kaggle_3m reader, built-in synthetic sources, the patient split.

``load_source(spec, image_size)`` is the one entry point the training and
evaluation code uses: ``spec`` is ``"synthetic"``, ``"synthetic-ambiguous"`` or a
folder in the LGG layout.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pyroseg.data.core import SegData, SegDataset, collate_batch
from pyroseg.data.lgg import load_lgg, scan_lgg
from pyroseg.data.split import SPLITS, split_patients
from pyroseg.data.synthetic import SOURCES as SYNTHETIC_SOURCES

__all__ = [
    "SegData",
    "SegDataset",
    "collate_batch",
    "load_lgg",
    "scan_lgg",
    "split_patients",
    "SPLITS",
    "SYNTHETIC_SOURCES",
    "load_source",
    "is_synthetic",
]


def is_synthetic(spec: str) -> bool:
    return spec in SYNTHETIC_SOURCES


def load_source(
    spec: str,
    image_size: int,
    *,
    seed: int = 0,
    synthetic_patients: int = 20,
    synthetic_slices: int = 16,
    cache_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SegData:
    """Load ``spec`` at ``image_size``: a synthetic source by name (generated
    from ``seed``) or an LGG-layout folder (decoded once, then cached)."""
    if is_synthetic(spec):
        make = SYNTHETIC_SOURCES[spec]
        return make(image_size, n_patients=synthetic_patients, slices_per_patient=synthetic_slices, seed=seed)
    return load_lgg(spec, image_size, cache_dir=cache_dir, progress=progress)
