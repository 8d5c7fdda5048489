"""The statistics of a comparison: intervals over seeds and paired differences from the baseline.

:func:`summarise` computes them from the runs' reports of a ``comparison.json``
document (:mod:`pyroseg.compare`): per metric and model, the mean, standard
deviation and 95 % Student-t interval over seeds; per model and metric, the
difference from the baseline estimated twice, **paired by seed** (t-interval of
the per-seed differences: the spread of training runs) and **paired by test
patient** (a Student-t interval with a jackknife-over-patients standard error,
slices pooled over seeds: the spread of test sets). A difference is called a ``tie`` when either interval contains 0; see
docs/guide/comparing.md for why both. The numbers come from :mod:`pyroseg.stats`.

With folds (a cross-validation by patient: runs with a ``fold``), a seed's value of a
metric is the mean over its folds, and the patient interval pools every fold's
patients (each patient is tested in one fold per seed). :func:`converged` judges one
run's validation curve; ``summarise`` counts the converged runs per model.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pyroseg.references import MAJORITY, ORACLE, ORACLE_ONE_MASK, RATERS_LOO
from pyroseg.scoring import BINNED_METRICS
from pyroseg.stats import binned_ece, paired_jackknife_stat, paired_patient_interval, paired_t, t_interval, verdict

__all__ = ["summarise", "converged", "METRICS", "NO_DIFFERENCE", "NOT_BY_PATIENT", "REFERENCES",
           "CONVERGED_REL", "CONVERGED_ABS", "CONVERGED_TAIL"]

#: A run is converged when it stopped on a plateau (``training.json``'s ``stop_reason``), or when the
#: best validation score of its last :data:`CONVERGED_TAIL` of training (by step) beats the best score
#: before it by less than :data:`CONVERGED_REL` of that score or by less than :data:`CONVERGED_ABS`.
CONVERGED_TAIL = 0.25
CONVERGED_REL = 0.01
CONVERGED_ABS = 0.005

#: The metrics given intervals and differences: key -> whether higher is better
#: (None: no better direction). ``sec_per_epoch`` gets a summary but no verdict.
METRICS: dict[str, bool | None] = {
    "dice_all": True,
    "dice_tumour": True,
    "dice_volume": True,
    "iou_tumour": True,
    "false_positive_slices": False,
    "bce": False,
    "ged": False,
    "ged_unbiased": False,
    "hm_iou": True,
    "sample_diversity": None,
    "ece": False,
    "ece_lesion": False,
    "qubiq": True,
    "dice_raters": True,
    "dice_majority": True,
    "elbo": False,
    "nll": False,
    "sec_per_epoch": False,
}
#: Summarised, never ranked: machine load, not the model.
NO_DIFFERENCE = ("sec_per_epoch",)

#: Added to a verdict that rests on the seed interval alone: the runs' reports have no
#: per-patient scores for the metric (reports from before every metric had them), or
#: fewer than 2 test patients.
NOT_BY_PATIENT = " (not tested by patient)"

#: Rows that are references, not models: summarised, never compared with the baseline.
REFERENCES = (ORACLE, ORACLE_ONE_MASK, RATERS_LOO, MAJORITY)


def summarise(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with ``summary`` (per model and metric: :func:`~pyroseg.stats.t_interval`
    over seeds) and ``differences`` (per model other than the baseline and metric:
    the paired difference by seed and by patient, and its verdict) recomputed from
    ``doc["runs"]``."""
    doc = dict(doc)
    runs, baseline = doc["runs"], doc["baseline"]
    names = list(dict.fromkeys(r["model"] for r in runs))
    folds: dict[tuple[str, int], list[dict]] = {}  # (model, seed) -> its runs, one per fold
    for r in runs:
        folds.setdefault((r["model"], r["seed"]), []).append(r)
    by = {key: _FoldMean(rs) for key, rs in folds.items()}
    seeds = doc["seeds"]
    summary, differences = [], []
    for name in names:
        for metric in METRICS:
            vals = [_num(by[(name, s)].get(metric)) for s in seeds if (name, s) in by]
            if not vals or all(math.isnan(v) for v in vals):
                continue
            summary.append({"model": name, "metric": metric, **t_interval(vals, doc["level"]), "values": vals})
    for name in names:
        if name == baseline or name in REFERENCES:
            continue
        for metric, higher in METRICS.items():
            if metric in NO_DIFFERENCE:
                continue
            paired = [s for s in seeds if (name, s) in by and (baseline, s) in by]
            a = [_num(by[(name, s)].get(metric)) for s in paired]
            b = [_num(by[(baseline, s)].get(metric)) for s in paired]
            if not paired or all(math.isnan(v) for v in a) or all(math.isnan(v) for v in b):
                continue
            by_seed = paired_t(a, b, doc["level"])
            runs_a, runs_b = _fold_pairs([folds[(name, s)] for s in paired], [folds[(baseline, s)] for s in paired])
            by_patient = _patient_interval(runs_a, runs_b, metric, doc["level"])
            call = verdict([(by_seed["lo"], by_seed["hi"]), (by_patient["lo"], by_patient["hi"])], higher)
            if call not in ("tie", "n/a") and by_seed["n"] < 2:  # one seed: training-run noise unknown
                call += " (1 seed)"
            elif call not in ("tie", "n/a") and math.isnan(by_patient["lo"]):  # no per-patient scores
                call += NOT_BY_PATIENT
            differences.append({
                "model": name, "metric": metric, "baseline": baseline,
                "diff": by_seed["mean"], "seeds": by_seed, "patients": by_patient, "verdict": call,
            })
    doc["summary"], doc["differences"] = summary, differences
    counted = {name: [r["converged"] for r in runs if r["model"] == name and "converged" in r]
               for name in names if name not in REFERENCES}
    if any(counted.values()):
        doc["converged"] = {name: [sum(bool(c) for c in cs), len(cs)] for name, cs in counted.items() if cs}
    else:
        doc.pop("converged", None)
    return doc


def converged(curve: list, mode: str, *, stop_reason: str | None = None, steps: float | None = None) -> bool:
    """Whether a run converged: it stopped on a plateau (``stop_reason == "plateau"``), or the best
    score of ``curve`` (``[[step, score], ...]``, validation, ``mode`` ``"max"`` or ``"min"``) over the
    last :data:`CONVERGED_TAIL` of training (steps after ``(1 - CONVERGED_TAIL) * steps``; ``steps``:
    the steps trained, default the curve's last step) improves on the best before by less than
    :data:`CONVERGED_REL` (relative) or :data:`CONVERGED_ABS` (absolute). A curve with no score in
    either part (too few validations to tell) is not converged."""
    if stop_reason == "plateau":
        return True
    pts = [(float(x), float(y)) for x, y in curve if math.isfinite(float(x)) and math.isfinite(float(y))]
    if len(pts) < 2:
        return False
    total = float(steps) if steps else max(x for x, _ in pts)
    cut = (1 - CONVERGED_TAIL) * total
    before = [y for x, y in pts if x <= cut]
    tail = [y for x, y in pts if x > cut]
    if not before or not tail:
        return False
    sign = 1.0 if mode == "max" else -1.0
    best_before = max(sign * y for y in before)
    gain = max(sign * y for y in tail) - best_before
    return gain < CONVERGED_ABS or gain < CONVERGED_REL * abs(best_before)


class _FoldMean(dict):
    """A seed's runs (one per fold) read as one report: a number is the mean over the folds
    (NaN where a fold lacks it); anything else is the first fold's."""

    def __init__(self, runs: list[dict]):
        super().__init__(runs[0])
        self._runs = runs

    def get(self, key: str, default: Any = None) -> Any:
        v = super().get(key, default)
        if len(self._runs) == 1 or not isinstance(v, (int, float)) or isinstance(v, bool):
            return v
        return float(np.mean([_num(r.get(key)) for r in self._runs]))


def _fold_pairs(a: list[list[dict]], b: list[list[dict]]) -> tuple[list[dict], list[dict]]:
    """The runs of the paired seeds' folds that both sides have, flattened in the same order
    (the patient interval pools the patients of all of them)."""
    runs_a, runs_b = [], []
    for fa, fb in zip(a, b, strict=True):
        other = {r.get("fold", 0): r for r in fb}
        for r in fa:
            if r.get("fold", 0) in other:
                runs_a.append(r)
                runs_b.append(other[r.get("fold", 0)])
    return runs_a, runs_b


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def _patient_interval(runs_a: list[dict], runs_b: list[dict], metric: str, level: float) -> dict:
    """The paired-by-patient interval over the test patients, each patient's slices pooled
    over the seeds and folds (``per_patient`` of the runs' reports): a Student-t interval
    with a jackknife-over-patients standard error (:func:`~pyroseg.stats.paired_patient_interval`;
    for the ECEs, of their reliability-bin counts, :func:`~pyroseg.stats.paired_jackknife_stat`).
    Measured coverage of its nominal 95 %: 93.5-94.5 % at 5, 10 and 30 patients
    (``tests/test_stats.py``), where the percentile bootstrap gave 82-94 %."""
    nan = float("nan")

    def pooled(runs) -> dict[str, np.ndarray]:
        acc: dict[str, np.ndarray] = {}
        for r in runs:
            for p, v in r.get("per_patient", {}).get(metric, {}).items():
                acc[p] = acc.get(p, 0.0) + np.asarray(v, dtype=float)  # [sum, count], or reliability bins
        return acc

    pa, pb = pooled(runs_a), pooled(runs_b)
    patients = sorted(set(pa) & set(pb))
    if not patients:
        return {"n": 0, "diff": nan, "lo": nan, "hi": nan}
    if metric in BINNED_METRICS:
        return paired_jackknife_stat(np.stack([pa[p] for p in patients]), np.stack([pb[p] for p in patients]),
                                     binned_ece, level=level)
    return paired_patient_interval([pa[p][0] for p in patients], [pa[p][1] for p in patients],
                                   [pb[p][0] for p in patients], [pb[p][1] for p in patients], level=level)
