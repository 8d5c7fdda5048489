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
