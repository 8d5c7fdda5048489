"""Split by patient, never by slice.

Slices of one patient are strongly correlated; putting them in both training
and test data (as the seed report did) measures memory, not generalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pyroseg.errors import UsageError

__all__ = ["split_patients", "fold_split", "split_for", "SPLITS"]

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


def fold_split(
    patients: Sequence[str], *, folds: int, fold: int, val_fraction: float = 0.15, seed: int = 0
) -> dict[str, list[str]]:
    """Fold ``fold`` of a ``folds``-fold cross-validation by patient.

    The patients are shuffled with ``seed`` and dealt into ``folds`` parts of sizes
    differing by at most one (part ``k``: the shuffled patients ``k``, ``k + folds``, ...);
    fold ``k`` tests on part ``k``, so over the folds every patient is a test case exactly
    once. Validation is drawn from the rest (the training part) by patient:
    ``round(n * val_fraction)`` patients (at least one when positive), ``n`` being
    all the patients, as in :func:`split_patients` (so every fold validates on as many
    patients as a single split would); train gets the rest and must not be empty.
    Each list is sorted.
    """
    pats = sorted(dict.fromkeys(patients))
    n = len(pats)
    if not (isinstance(folds, int) and folds >= 2):
        raise UsageError(f"--folds {folds}: a cross-validation needs at least 2 folds")
    if not (isinstance(fold, int) and 0 <= fold < folds):
        raise UsageError(f"fold {fold}: expected 0 .. {folds - 1} with --folds {folds}")
    if folds > n:
        raise UsageError(f"--folds {folds}: only {n} patient(s); each fold needs a test patient")
    shuffled = [pats[i] for i in np.random.default_rng(seed).permutation(n)]
    test = shuffled[fold::folds]
    rest = [p for p in shuffled if p not in set(test)]
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    if len(rest) - n_val < 1:
        raise UsageError(
            f"{n} patient(s) cannot be split into {folds} folds with val fraction {val_fraction}: "
            f"fold {fold} keeps {len(rest)} for training and validation, needs at least {n_val + 1}"
        )
    # validation: the first of the training part in an order drawn from the seed and the fold
    order = np.random.default_rng([seed, fold]).permutation(len(rest))
    val = [rest[i] for i in order[:n_val]]
    return {"train": sorted(set(rest) - set(val)), "val": sorted(val), "test": sorted(test)}


def split_for(patients: Sequence[str], cfg: Any) -> dict[str, list[str]]:
    """The split of a run of :class:`~pyroseg.config.FitConfig` ``cfg``: :func:`split_patients`
    (``val_fraction``, ``test_fraction``), or with ``cfg.folds`` > 1 fold ``cfg.fold`` of
    :func:`fold_split` (``test_fraction`` unused: each fold tests on its part); seeded by the
    data seed either way."""
    folds = getattr(cfg, "folds", 1) or 1
    if folds > 1:
        return fold_split(patients, folds=folds, fold=getattr(cfg, "fold", 0), val_fraction=cfg.val_fraction,
                          seed=cfg.seed_of_data())
    return split_patients(patients, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed_of_data())
