"""The statistics of a comparison: intervals over seeds and paired differences from the baseline.

:func:`summarise` computes them from the runs' reports of a ``comparison.json``
document (:mod:`pyroseg.compare`): per metric and model, the mean, standard
deviation and 95 % Student-t interval over seeds; per model and metric, the
difference from the baseline estimated twice, **paired by seed** (t-interval of
the per-seed differences: the spread of training runs) and **paired by test
patient** (bootstrap over patients, slices pooled over seeds: the spread of test
sets). A difference is called a ``tie`` when either interval contains 0; see
docs/guide/comparing.md for why both. The numbers come from :mod:`pyroseg.stats`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pyroseg.references import MAJORITY, ORACLE, ORACLE_ONE_MASK, RATERS_LOO
from pyroseg.scoring import BINNED_METRICS
from pyroseg.stats import binned_ece, paired_bootstrap, paired_bootstrap_stat, paired_t, t_interval, verdict

__all__ = ["summarise", "METRICS", "NO_DIFFERENCE", "NOT_BY_PATIENT", "REFERENCES"]

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
    by = {(r["model"], r["seed"]): r for r in runs}
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
            by_patient = _patient_bootstrap([by[(name, s)] for s in paired], [by[(baseline, s)] for s in paired],
                                            metric, doc["level"], doc["n_boot"])
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
    return doc


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def _patient_bootstrap(runs_a: list[dict], runs_b: list[dict], metric: str, level: float, n_boot: int) -> dict:
    """:func:`~pyroseg.stats.paired_bootstrap` over the test patients, each patient's
    slices pooled over the seeds (``per_patient`` of the runs' reports)."""
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
        return paired_bootstrap_stat(np.stack([pa[p] for p in patients]), np.stack([pb[p] for p in patients]),
                                     binned_ece, n_boot=n_boot, level=level, seed=0)
    return paired_bootstrap([pa[p][0] for p in patients], [pa[p][1] for p in patients],
                            [pb[p][0] for p in patients], [pb[p][1] for p in patients],
                            n_boot=n_boot, level=level, seed=0)
