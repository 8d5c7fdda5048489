"""The references of a data set, scored like a model on the same slices.

On ``synthetic-ambiguous`` data the true annotator distribution and its best single
mask (:func:`evaluate_oracle`); on other multi-rater data (QUBIQ, LIDC) **one rater
against the others** (each rater in turn is the "prediction", its one mask the sample,
scored against the remaining raters: the human level) and **the majority-vote mask**
as a deterministic prediction (the best one mask can do, judged against the raters it
came from). :func:`reference_names` says which a data set has; every report is made by
:func:`~pyroseg.scoring.score_predictions`, as a model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyroseg.data.core import SegData
from pyroseg.data.synthetic import oracle_masks_for, oracle_probabilities
from pyroseg.errors import UsageError
from pyroseg.metrics import DistributionAccumulator, majority_vote
from pyroseg.predict import Predictions
from pyroseg.runs import at_least_one, check_split, read_run
from pyroseg.scoring import score_predictions

__all__ = [
    "ORACLE",
    "ORACLE_ONE_MASK",
    "RATERS_LOO",
    "MAJORITY",
    "has_oracle",
    "reference_names",
    "evaluate_reference",
    "evaluate_oracle",
    "evaluate_run_oracle",
    "evaluate_run_references",
]

#: The ``model`` name of :func:`evaluate_oracle`'s report, and of its one-mask variant.
ORACLE = "oracle"
ORACLE_ONE_MASK = "oracle (one mask)"
#: The ``model`` names of the references on real multi-rater data.
RATERS_LOO = "raters (leave one out)"
MAJORITY = "majority vote"


def has_oracle(data: SegData) -> bool:
    """Whether ``data`` is a whole ``synthetic-ambiguous`` data set, whose true distribution is known."""
    return data.meta.get("generator") == "make_synthetic_ambiguous"


def evaluate_oracle(
    data: SegData,
    patients: Sequence[str] | None = None,
    *,
    num_samples: int = 16,
    sample_seed: int = 0,
    batch_size: int = 64,
    one_mask: bool = False,
) -> dict[str, Any]:
    """Score the true annotator distribution of ``data`` like a model, on the slices of ``patients``.

    ``data``: a whole data set made by
    :func:`~pyroseg.data.synthetic.make_synthetic_ambiguous` (e.g. ``load_source
    ("synthetic-ambiguous", ...)``); ``patients``: the patients to score (e.g.
    the test split; ``None``: all). The oracle's samples are ``num_samples``
    fresh masks per slice from the true distribution
    (:func:`~pyroseg.data.synthetic.oracle_masks_for`, seeded by
    ``sample_seed``), independent of the data set's own annotators; its mean
    probability is the exact per-pixel marginal
    (:func:`~pyroseg.data.synthetic.oracle_probabilities`), so its ECE is the
    floor set by having only ``A`` annotators. Returns the report of
    :func:`score_predictions` with ``model = "oracle"``.

    ``one_mask``: instead, the best a deterministic model can be: the exact
    marginal as its probability (what a U-Net trained by cross-entropy tends
    to) and that marginal thresholded at 0.5 as its one sample
    (``model = "oracle (one mask)"``, ``num_samples = 1``).

    :raises UsageError: ``data`` is not synthetic-ambiguous data, or
        ``num_samples`` < 1.
    """
    at_least_one("--num-samples", num_samples)
    if not has_oracle(data):
        raise UsageError(f"no oracle for data {data.source!r}: the true distribution is known only for synthetic-ambiguous data")
    meta = data.meta
    probs = oracle_probabilities(
        meta["image_size"],
        n_patients=meta["n_patients"],
        slices_per_patient=meta["slices_per_patient"],
        seed=meta["seed"],
        lesion_fraction=meta["lesion_fraction"],
        faint_prob=meta["faint_prob"],
        faint_fraction=meta["faint_fraction"],
    )  # (N, H, W)
    if patients is None:
        patients = data.patient_ids
    keep = data.patient_mask(patients)  # (N,)
    subset = data.subset(patients)
    if one_mask:
        samples = (probs[keep] >= 0.5)[:, None].astype(np.uint8)  # (n, 1, H, W)
    else:
        samples = oracle_masks_for(data, num_samples, sample_seed)[keep]  # (n, S, H, W) uint8
    acc = DistributionAccumulator()
    for i in range(0, len(subset), batch_size):
        acc.update(torch.from_numpy(samples[i : i + batch_size]), torch.from_numpy(subset.masks[i : i + batch_size]))
    pred = Predictions(mean=probs[keep], samples=None, terms={}, distribution=acc.per_image())
    report = score_predictions(pred, subset)
    report.update({"model": ORACLE_ONE_MASK if one_mask else ORACLE, "data": data.source,
                   "num_samples": 1 if one_mask else num_samples, "image_size": data.image_size,
                   "z_from": "true marginal >= 0.5" if one_mask else "true distribution",
                   "oracle_seed": None if one_mask else sample_seed})
    return report


def reference_names(data: SegData) -> tuple[str, ...]:
    """The references that can be scored on ``data``: ``(oracle, oracle (one mask))``
    on whole ``synthetic-ambiguous`` data, ``(raters (leave one out), majority vote)``
    on other data with several annotators, ``()`` otherwise."""
    if has_oracle(data):
        return (ORACLE, ORACLE_ONE_MASK)
    if data.num_annotators > 1:
        return (RATERS_LOO, MAJORITY)
    return ()


def evaluate_reference(data: SegData, name: str, patients: Sequence[str] | None = None, *, num_samples: int = 16,
                       sample_seed: int = 0, batch_size: int = 64) -> dict[str, Any]:
    """Score the reference ``name`` (one of :func:`reference_names`) on the slices of
    ``patients`` (None: all) with :func:`score_predictions`, like a model.

    * ``oracle`` / ``oracle (one mask)``: :func:`evaluate_oracle`;
    * ``majority vote``: the prediction is the majority mask (at least half of
      the slice's raters; its mean probability is that hard mask, its one
      sample the mask), judged against all the raters;
    * ``raters (leave one out)``: every (slice, rater) pair of a slice with at
      least two raters is one row: the held-out rater's mask is the prediction
      (mean and single sample), the slice's other raters the annotators. The
      figures are means over the pairs (over slices when every slice has the
      same number of raters, as averaging over raters first would give).
      ``n_slices`` counts the slices, ``n_pairs`` the rows.
    """
    if name in (ORACLE, ORACLE_ONE_MASK):
        return evaluate_oracle(data, patients, num_samples=num_samples, sample_seed=sample_seed,
                               batch_size=batch_size, one_mask=name == ORACLE_ONE_MASK)
    if name not in (RATERS_LOO, MAJORITY):
        raise UsageError(f"unknown reference {name!r}: expected one of {ORACLE}, {ORACLE_ONE_MASK}, {RATERS_LOO}, {MAJORITY}")
    subset = data if patients is None else data.subset(patients)
    if name == MAJORITY:
        vote = majority_vote(torch.from_numpy(subset.masks), torch.from_numpy(subset.rater_counts)).numpy()  # (N, H, W)
        rows, samples = subset, vote[:, None].astype(np.uint8)  # (N, 1, H, W)
        mean = vote.astype(np.float32)
    else:
        rows, samples = _leave_one_out(subset)
        mean = samples[:, 0].astype(np.float32)
    acc = DistributionAccumulator()
    for i in range(0, len(rows), batch_size):
        acc.update(torch.from_numpy(samples[i : i + batch_size]), torch.from_numpy(rows.masks[i : i + batch_size]),
                   torch.from_numpy(rows.rater_counts[i : i + batch_size]))
    report = score_predictions(Predictions(mean=mean, samples=None, terms={}, distribution=acc.per_image()), rows)
    report.update({"model": name, "data": data.source, "num_samples": 1, "image_size": data.image_size,
                   "z_from": "a held-out rater" if name == RATERS_LOO else "raters' majority (>= half)"})
    if name == RATERS_LOO:
        report.update({"n_pairs": len(rows), "n_slices": int((subset.rater_counts >= 2).sum())})
    return report


def _leave_one_out(data: SegData) -> tuple[SegData, np.ndarray]:
    """One row per (slice, rater) of the slices with >= 2 raters: the other raters as
    the row's annotations ``(M, A - 1, H, W)`` (padded, with their counts) and the
    held-out rater as its one sample ``(M, 1, H, W)``."""
    a = data.num_annotators
    items, held = [], []
    for i, n in enumerate(data.rater_counts.tolist()):
        if n >= 2:
            for r in range(n):
                items.append(i)
                held.append(r)
    idx, held = np.array(items, dtype=np.int64), np.array(held, dtype=np.int64)
    others = np.zeros((len(idx), max(a - 1, 1), *data.masks.shape[2:]), dtype=np.uint8)
    for k in range(a - 1):  # slot k of the others: rater k, or k + 1 at and after the held-out one
        src = np.where(k < held, k, k + 1)
        others[:, k] = data.masks[idx, np.minimum(src, a - 1)]
    rows = SegData(images=data.images[idx], masks=others, patients=data.patients[idx],
                   slice_numbers=data.slice_numbers[idx], source=data.source, meta=dict(data.meta),
                   rater_counts=data.rater_counts[idx] - 1)
    return rows, data.masks[idx, held][:, None]


def _run_data(run_dir: str | Path, split: str) -> tuple[SegData, list[str] | None]:
    """The data of the run in ``run_dir`` (its ``config.json``) and the patients of its
    ``split`` (its ``split.json``; None for ``all``); the weights are not read."""
    check_split(split)
    run = read_run(run_dir)
    dataset = run.load_data("all")
    return dataset, None if split == "all" else run.select(dataset, split).patient_ids


def evaluate_run_oracle(
    run_dir: str | Path,
    *,
    split: str = "test",
    num_samples: int = 16,
    sample_seed: int = 0,
    one_mask: bool = False,
) -> dict[str, Any]:
    """:func:`evaluate_oracle` on the data and the ``split`` patients of the run in
    ``run_dir`` (its ``config.json`` and ``split.json``; the weights are not read)."""
    dataset, patients = _run_data(run_dir, split)
    report = evaluate_oracle(dataset, patients, num_samples=num_samples, sample_seed=sample_seed, one_mask=one_mask)
    report.update({"run": str(run_dir), "split": split})
    return report


def evaluate_run_references(run_dir: str | Path, *, split: str = "test", num_samples: int = 16,
                            sample_seed: int = 0) -> list[dict[str, Any]]:
    """Every reference of the run's data (:func:`reference_names`) on its ``split``
    patients, as :func:`evaluate_reference` reports (``[]`` for one-annotator data);
    the weights are not read."""
    dataset, patients = _run_data(run_dir, split)
    reports = []
    for name in reference_names(dataset):
        report = evaluate_reference(dataset, name, patients, num_samples=num_samples, sample_seed=sample_seed)
        report.update({"run": str(run_dir), "split": split})
        reports.append(report)
    return reports
