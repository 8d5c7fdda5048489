"""Split by patient, never by slice.

Slices of one patient are strongly correlated; putting them in both training
and test data (as the seed report did) measures memory, not generalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pyroseg.errors import UsageError

__all__ = ["split_patients", "SPLITS"]

SPLITS = ("train", "val", "test")


def split_patients(
    patients: Sequence[str], *, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> dict[str, list[str]]:
    """Shuffle the patients with ``seed`` and cut them into train/val/test.

    Sizes are ``round(n * fraction)`` for val and test, with at least one
    patient each when the fraction is positive and there are enough patients;
    train gets the rest and must not be empty. Each list is sorted, so the
    split reads the same whatever order the patients came in.
    """
    pats = sorted(dict.fromkeys(patients))
    n = len(pats)
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise UsageError(
            f"{n} patient(s) cannot be split into train/val/test with fractions {val_fraction}/{test_fraction}: "
            f"need at least {n_val + n_test + 1}"
        )
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [pats[i] for i in order]
    return {
        "train": sorted(shuffled[n_val + n_test :]),
        "val": sorted(shuffled[:n_val]),
        "test": sorted(shuffled[n_val : n_val + n_test]),
    }
