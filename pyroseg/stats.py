"""Statistics that separate models from noise: intervals over seeds, paired differences.

Pure functions on numbers (numpy arrays or lists); :mod:`pyroseg.compare` applies
them to its runs. Two sources of noise are handled separately:

* **training runs**: the same model trained with another seed (initialisation,
  ``z`` noise, batch order) scores differently. :func:`t_interval` gives the mean,
  standard deviation and Student-t interval of a metric over ``n`` seeds;
  :func:`paired_t` the same for the per-seed *difference* between two models
  trained on the same data, split and seed (paired by seed).
* **test patients**: a different draw of test patients would score differently.
  :func:`paired_bootstrap` resamples patients (all the slices of a patient
  together, the clusters of the data) and recomputes the difference of two
  slice-weighted means on the same resampled patients (paired by patient);
  :func:`paired_bootstrap_stat` the same for any statistic of counts that add up
  over patients (the ECE of reliability-bin counts). Their percentile intervals
  are too narrow with few patients (about 82 % coverage for a nominal 95 % at 5
  patients, 90 % at 10: benchmarks/interval_coverage.py);
  :func:`paired_patient_interval` and :func:`paired_jackknife_stat`
  (jackknife-over-patients standard error, Student t with ``P - 1`` degrees of
  freedom) hold it from 5 patients on (93.5-97 % for slice-weighted means) and
  are the ones to use.

:func:`verdict` calls a difference ``"tie"`` when any of its intervals contains 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as _st

__all__ = ["t_interval", "paired_t", "ratio_mean", "ratio_of_sums", "binned_ece", "paired_bootstrap",
           "paired_bootstrap_stat", "paired_patient_interval", "paired_jackknife_stat", "verdict", "LEVEL",
           "N_BOOT"]

#: Confidence level of every interval.
LEVEL = 0.95
#: Bootstrap resamples.
N_BOOT = 2000


def t_interval(values: Sequence[float], level: float = LEVEL) -> dict[str, float]:
    """Mean, sample standard deviation (``n - 1``) and the Student-t interval of the mean.

    ``values``: ``(n,)`` one number per seed; NaNs (a metric undefined for that
    run) are dropped first. Returns ``{"n", "mean", "sd", "lo", "hi"}``; ``sd``,
    ``lo`` and ``hi`` are NaN when fewer than 2 values remain (one seed says
    nothing about the spread), ``mean`` is NaN when none does.
    ``lo, hi = mean -+ t_{(1 + level) / 2, n - 1} * sd / sqrt(n)``.
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    n = int(x.size)
    nan = float("nan")
    if n == 0:
        return {"n": 0, "mean": nan, "sd": nan, "lo": nan, "hi": nan}
    mean = float(x.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "sd": nan, "lo": nan, "hi": nan}
    sd = float(x.std(ddof=1))
    half = float(_st.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def paired_t(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> dict[str, float]:
    """:func:`t_interval` of the paired differences ``a[i] - b[i]`` (``i``: the seed).

    ``a``, ``b``: ``(n,)`` the two models' scores, seed by seed; a pair with a NaN
    is dropped. Pairing removes what the two runs of a seed share (data, split,
    batch order), so the interval is narrower than that of two independent means
    when the models move together.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values must match: {a.shape} vs {b.shape}")
    return t_interval(a - b, level)


def ratio_mean(sums: np.ndarray, counts: np.ndarray) -> float:
    """``sum(sums) / sum(counts)``: a slice-weighted mean from per-patient sums and
    slice counts (NaN when there are no slices)."""
    total = float(np.sum(counts))
    return float(np.sum(sums)) / total if total > 0 else float("nan")


def binned_ece(bins: np.ndarray) -> np.ndarray:
    """Expected calibration error from reliability counts ``bins`` ``(..., 3 * K)``: per bin
    the pixel count, the sum of predicted probabilities, the sum of targets (K bins each, in
    that order). ``sum_k |sum_prob_k - sum_target_k| / sum_k count_k`` over the last axis,
    NaN with no pixels; the ``ece`` of :class:`~pyroseg.metrics.ReliabilityAccumulator`."""
    bins = np.asarray(bins, dtype=float)
    k = bins.shape[-1] // 3
    count, prob, target = bins[..., :k], bins[..., k : 2 * k], bins[..., 2 * k :]
    total = count.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, np.abs(prob - target).sum(-1) / total, np.nan)


def ratio_of_sums(stats: np.ndarray) -> np.ndarray:
    """``sum / count`` from ``stats`` ``(..., 2)`` (NaN where the count is 0): the
    statistic of :func:`paired_bootstrap`."""
    stats = np.asarray(stats, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(stats[..., 1] > 0, stats[..., 0] / stats[..., 1], np.nan)


def paired_bootstrap_stat(
    stats_a: np.ndarray,
    stats_b: np.ndarray,
    statistic,
    *,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
) -> dict[str, float]:
    """Patient bootstrap of the difference of a statistic of additive per-patient counts.

    ``stats_a``, ``stats_b``: ``(P, K)``, row ``p`` the same patient for both models:
    numbers that add up over patients (``[sum, count]`` of a slice-weighted mean; the
    reliability-bin counts of an ECE). ``statistic`` maps summed rows ``(..., K)`` to
    the metric (``(...)``). Each resample draws ``P`` patients with replacement and
    computes ``statistic(sum A) - statistic(sum B)`` on them; the interval is the
    percentile interval of ``n_boot`` resamples. Returns ``{"n": P, "diff", "lo", "hi"}``
    (``diff`` on all patients); fewer than 2 patients give NaN bounds.
    """
    a, b = np.asarray(stats_a, dtype=float), np.asarray(stats_b, dtype=float)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"per-patient statistics must be (P, K) alike; got {a.shape}, {b.shape}")
    p = int(a.shape[0])
    nan = float("nan")
    if p == 0:
        return {"n": 0, "diff": nan, "lo": nan, "hi": nan}
    diff = float(statistic(a.sum(0)) - statistic(b.sum(0)))
    if p < 2:
        return {"n": p, "diff": diff, "lo": nan, "hi": nan}
    idx = np.random.default_rng(seed).integers(0, p, size=(n_boot, p))  # (n_boot, P)
    boot = statistic(a[idx].sum(1)) - statistic(b[idx].sum(1))  # (n_boot,)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return {"n": p, "diff": diff, "lo": float(lo), "hi": float(hi)}


def paired_bootstrap(
    sums_a: Sequence[float],
    counts_a: Sequence[float],
    sums_b: Sequence[float],
    counts_b: Sequence[float],
    *,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
) -> dict[str, float]:
    """Patient bootstrap of the difference of two slice-weighted means.

    Index ``p`` is a patient, the same one for both models: ``sums_a[p]`` is model
    A's metric summed over that patient's scored slices (pooled over seeds) and
    ``counts_a[p]`` how many slices that is (for a per-patient metric such as
    3-D Dice: the value and 1). Each resample draws ``P`` patients with
    replacement and computes ``ratio_mean(A) - ratio_mean(B)`` on them; the
    interval is the percentile interval of ``n_boot`` resamples. Returns
    ``{"n": P, "diff", "lo", "hi"}``; ``diff`` is the difference on all patients
    (exactly the difference of the two tables' means). Patients with no slices
    for either model are dropped; fewer than 2 patients give NaN bounds.
    """
    sa, ca, sb, cb = (np.asarray(v, dtype=float) for v in (sums_a, counts_a, sums_b, counts_b))
    if not (sa.shape == ca.shape == sb.shape == cb.shape) or sa.ndim != 1:
        raise ValueError(f"per-patient arrays must be (P,) alike; got {sa.shape}, {ca.shape}, {sb.shape}, {cb.shape}")
    keep = (ca > 0) & (cb > 0) & ~np.isnan(sa) & ~np.isnan(sb)
    a, b = np.stack([sa[keep], ca[keep]], 1), np.stack([sb[keep], cb[keep]], 1)  # (P, 2)
    return paired_bootstrap_stat(a, b, ratio_of_sums, n_boot=n_boot, level=level, seed=seed)


def _t_bounds(diff, se, p: int, level: float) -> tuple[float, float]:
    half = float(_st.t.ppf((1 + level) / 2, p - 1)) * se
    return float(diff - half), float(diff + half)


def paired_patient_interval(
    sums_a: Sequence[float],
    counts_a: Sequence[float],
    sums_b: Sequence[float],
    counts_b: Sequence[float],
    *,
    level: float = LEVEL,
    method: str = "jackknife",
) -> dict[str, float]:
    """Interval of the difference of two slice-weighted means, paired by patient: a
    standard error over patients and Student t with ``P - 1`` degrees of freedom.

    Same arguments, point estimate and return value as :func:`paired_bootstrap`
    (``{"n": P, "diff", "lo", "hi"}``; ``diff = ratio_mean(A) - ratio_mean(B)``;
    patients with no slices for either model, or a NaN sum, are dropped; fewer than
    2 patients left give NaN bounds), but no resampling and no seed. The estimand is
    the one ``diff`` estimates: the difference of the two models' slice-weighted means
    over the population of patients, ``E[sum_a] / E[count_a] - E[sum_b] / E[count_b]``.
    ``lo, hi = diff -+ t_{(1 + level) / 2, P - 1} * se`` with ``se``:

    * ``method="jackknife"`` (default): :func:`paired_jackknife_stat` of
      ``[sum, count]`` with :func:`ratio_of_sums`, the leave-one-patient-out spread;
    * ``method="delta"``: the cluster-robust (linearised) standard error of a
      difference of ratios of sums, ``z_p = (sa_p - r_a ca_p) / mean(ca) -
      (sb_p - r_b cb_p) / mean(cb)``, ``se = sqrt(sum z_p^2 / (P (P - 1)))``.

    Both equal :func:`paired_t` of the per-patient differences when every patient has
    the same count. Coverage of a nominal 95 % (benchmarks/interval_coverage.py, LGG-like
    1-60 slices per patient, skewed zero-inflated Dice): jackknife 93.5 / 93.7 / 94.0 %
    at 5 / 10 / 30 patients, delta 91.7 / 92.4 / 93.2 %, the percentile bootstrap
    of :func:`paired_bootstrap` about 80 / 87 / 91 %.
    """
    sa, ca, sb, cb = (np.asarray(v, dtype=float) for v in (sums_a, counts_a, sums_b, counts_b))
    if not (sa.shape == ca.shape == sb.shape == cb.shape) or sa.ndim != 1:
        raise ValueError(f"per-patient arrays must be (P,) alike; got {sa.shape}, {ca.shape}, {sb.shape}, {cb.shape}")
    if method not in ("jackknife", "delta"):
        raise ValueError(f"method must be 'jackknife' or 'delta', not {method!r}")
    keep = (ca > 0) & (cb > 0) & ~np.isnan(sa) & ~np.isnan(sb)
    sa, ca, sb, cb = sa[keep], ca[keep], sb[keep], cb[keep]
    if method == "jackknife":
        return paired_jackknife_stat(np.stack([sa, ca], 1), np.stack([sb, cb], 1), ratio_of_sums, level=level)
    p = int(sa.size)
    nan = float("nan")
    if p == 0:
        return {"n": 0, "diff": nan, "lo": nan, "hi": nan}
    diff, se = ratio_diff_se(sa, ca, sb, cb)
    if p < 2:
        return {"n": p, "diff": float(diff), "lo": nan, "hi": nan}
    lo, hi = _t_bounds(float(diff), float(se), p, level)
    return {"n": p, "diff": float(diff), "lo": lo, "hi": hi}


def ratio_diff_se(sa: np.ndarray, ca: np.ndarray, sb: np.ndarray, cb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(diff, se)`` of :func:`paired_patient_interval` over the last axis ``(..., P)``
    (every count positive; ``P >= 2``), vectorised for simulations."""
    ra, rb = sa.sum(-1) / ca.sum(-1), sb.sum(-1) / cb.sum(-1)  # (...)
    z = (sa - ra[..., None] * ca) / ca.mean(-1, keepdims=True) - (sb - rb[..., None] * cb) / cb.mean(-1, keepdims=True)
    p = sa.shape[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt((z**2).sum(-1) / (p * (p - 1)))
    return ra - rb, se


def jackknife_diff_se(a: np.ndarray, b: np.ndarray, statistic) -> tuple[np.ndarray, np.ndarray]:
    """``(diff, se)`` of :func:`paired_jackknife_stat` for ``a``, ``b`` ``(..., P, K)``,
    vectorised for simulations (NaN ``se`` when a leave-one-out statistic is NaN)."""
    ta, tb = a.sum(-2), b.sum(-2)  # (..., K)
    diff = statistic(ta) - statistic(tb)
    loo = statistic(ta[..., None, :] - a) - statistic(tb[..., None, :] - b)  # (..., P)
    p = a.shape[-2]
    se = np.sqrt((p - 1) / p * ((loo - loo.mean(-1, keepdims=True)) ** 2).sum(-1))
    return diff, se


def paired_jackknife_stat(
    stats_a: np.ndarray,
    stats_b: np.ndarray,
    statistic,
    *,
    level: float = LEVEL,
) -> dict[str, float]:
    """Interval of the difference of a statistic of additive per-patient counts, paired
    by patient: jackknife-over-patients standard error, Student t with ``P - 1`` degrees of freedom.

    Same arguments (less the bootstrap's) and return value as
    :func:`paired_bootstrap_stat` (``{"n": P, "diff", "lo", "hi"}``, ``diff`` on all
    patients; rows all 0 for both models, or with a NaN, are dropped; fewer than 2
    patients give NaN bounds). ``theta_(p)`` is the
    difference with patient ``p`` left out (``statistic(sum A - a_p) -
    statistic(sum B - b_p)``); ``se = sqrt((P - 1) / P * sum_p (theta_(p) -
    mean theta_(.))^2)`` and ``lo, hi = diff -+ t_{(1 + level) / 2, P - 1} * se``.
    NaN bounds when a leave-one-out statistic is undefined (the other patients have
    no pixels). Coverage of a nominal 95 % (benchmarks/interval_coverage.py): 93.5-97 %
    for slice-weighted means (:func:`paired_patient_interval`) at 5, 10 and 30
    patients; for the difference of two binned ECEs about 92-93 / 93 / 94 % (the
    percentile bootstrap: 76-80 / 85-88 / 91-93 %): the shortfall is the ECE's own
    small-sample bias (``|sum prob - sum target|`` over few patients), not the
    standard error.
    """
    a, b = np.asarray(stats_a, dtype=float), np.asarray(stats_b, dtype=float)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"per-patient statistics must be (P, K) alike; got {a.shape}, {b.shape}")
    keep = ~(np.isnan(a).any(1) | np.isnan(b).any(1)) & ((a != 0).any(1) | (b != 0).any(1))
    a, b = a[keep], b[keep]  # a patient with nothing for either model says nothing
    p = int(a.shape[0])
    nan = float("nan")
    if p == 0:
        return {"n": 0, "diff": nan, "lo": nan, "hi": nan}
    diff, se = jackknife_diff_se(a, b, statistic)
    if p < 2 or not math.isfinite(float(se)):
        return {"n": p, "diff": float(diff), "lo": nan, "hi": nan}
    lo, hi = _t_bounds(float(diff), float(se), p, level)
    return {"n": p, "diff": float(diff), "lo": lo, "hi": hi}


def verdict(intervals: Sequence[tuple[float, float]], higher_is_better: bool | None) -> str:
    """``"tie"`` when any interval ``(lo, hi)`` contains 0 (NaN bounds, an interval
    that cannot be computed, are skipped; none left: ``"n/a"``); otherwise
    ``"better"`` / ``"worse"`` (``higher_is_better`` known) or ``"higher"`` /
    ``"lower"`` (a metric with no better direction, e.g. diversity)."""
    usable = [(lo, hi) for lo, hi in intervals if not (math.isnan(lo) or math.isnan(hi))]
    if not usable:
        return "n/a"
    if any(lo <= 0 <= hi for lo, hi in usable):
        return "tie"
    up = usable[0][0] > 0
    if any((lo > 0) != up for lo, _ in usable):  # intervals on both sides of 0: no claim
        return "tie"
    if higher_is_better is None:
        return "higher" if up else "lower"
    return "better" if up == higher_is_better else "worse"
