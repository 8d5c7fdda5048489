"""Splitting by patient: disjoint, complete, deterministic, sized as documented."""

from __future__ import annotations

import pytest

from pyroseg.data.split import SPLITS, split_patients
from pyroseg.errors import UsageError

N = 80
PATIENTS = [f"TCGA_{i:03d}" for i in range(N)]


def test_disjoint_and_covers_everyone():
    s = split_patients(PATIENTS)
    assert set(s) == set(SPLITS)
    train, val, test = (set(s[k]) for k in SPLITS)
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(PATIENTS)
    assert len(s["train"]) + len(s["val"]) + len(s["test"]) == N


def test_sizes_for_80_patients():
    s = split_patients(PATIENTS, val_fraction=0.15, test_fraction=0.15)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (56, 12, 12)
    s = split_patients(PATIENTS, val_fraction=0.1, test_fraction=0.2)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (56, 8, 16)


def test_each_list_is_sorted():
    s = split_patients(PATIENTS, seed=3)
    for k in SPLITS:
        assert s[k] == sorted(s[k])


def test_deterministic_per_seed_whatever_the_input_order_or_repeats():
    a = split_patients(PATIENTS, seed=7)
    assert split_patients(PATIENTS, seed=7) == a
    assert split_patients(list(reversed(PATIENTS)), seed=7) == a
    per_slice = [p for p in PATIENTS for _ in range(3)]  # one id per slice
    assert split_patients(per_slice, seed=7) == a


def test_different_seeds_differ():
    tests = {tuple(split_patients(PATIENTS, seed=s)["test"]) for s in range(5)}
    assert len(tests) == 5
    # and the held-out patients are not just the first or last ones in sorted order
    assert split_patients(PATIENTS, seed=0)["test"] not in (PATIENTS[:12], PATIENTS[-12:])


def test_small_cohorts_get_at_least_one_each():
    s = split_patients([f"p{i}" for i in range(3)])  # round(0.45) = 0 -> still 1
    assert [len(s[k]) for k in SPLITS] == [1, 1, 1]


@pytest.mark.parametrize("n", [0, 1, 2])
def test_too_few_patients_is_a_usage_error(n):
    with pytest.raises(UsageError, match=f"{n} patient"):
        split_patients([f"p{i}" for i in range(n)])


def test_too_large_fractions_is_a_usage_error():
    with pytest.raises(UsageError, match="cannot be split"):
        split_patients(PATIENTS, val_fraction=0.5, test_fraction=0.5)


def test_zero_val_fraction_gives_empty_val():
    s = split_patients(PATIENTS, val_fraction=0.0, test_fraction=0.15)
    assert s["val"] == []
    assert (len(s["train"]), len(s["test"])) == (68, 12)
    s = split_patients(["p0", "p1"], val_fraction=0.0, test_fraction=0.0)
    assert s == {"train": ["p0", "p1"], "val": [], "test": []}


def test_folds_test_every_patient_exactly_once():
    from pyroseg.data.split import fold_split

    folds = [fold_split(PATIENTS, folds=5, fold=k, val_fraction=0.15, seed=3) for k in range(5)]
    tested = [p for f in folds for p in f["test"]]
    assert sorted(tested) == sorted(PATIENTS)  # each exactly once
    for f in folds:
        train, val, test = (set(f[k]) for k in SPLITS)
        assert not (train & val) and not (train & test) and not (val & test)
        assert train | val | test == set(PATIENTS)
        assert len(test) == N // 5 and len(val) == round(N * 0.15)
        assert all(f[k] == sorted(f[k]) for k in SPLITS)
    assert folds[2] == fold_split(list(reversed(PATIENTS)), folds=5, fold=2, val_fraction=0.15, seed=3)  # deterministic
    assert fold_split(PATIENTS, folds=5, fold=2, seed=4)["test"] != folds[2]["test"]  # from the seed
    with pytest.raises(UsageError, match="--folds 9"):
        fold_split(PATIENTS[:8], folds=9, fold=0)
    with pytest.raises(UsageError, match="fold 5"):
        fold_split(PATIENTS, folds=5, fold=5)


def test_split_for_one_fold_is_the_single_split():
    from pyroseg.config import FitConfig
    from pyroseg.data.split import fold_split, split_for

    cfg = FitConfig(seed=7, val_fraction=0.1, test_fraction=0.2)
    assert split_for(PATIENTS, cfg) == split_patients(PATIENTS, val_fraction=0.1, test_fraction=0.2, seed=7)
    cfg = FitConfig(seed=7, data_seed=2, val_fraction=0.1, folds=4, fold=1)
    assert split_for(PATIENTS, cfg) == fold_split(PATIENTS, folds=4, fold=1, val_fraction=0.1, seed=2)
    with pytest.raises(UsageError, match="--fold 4"):
        FitConfig(folds=4, fold=4).validate()
