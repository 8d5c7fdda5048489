"""Coverage of the paired-by-patient intervals of :mod:`pyroseg.stats`, by simulation.

``python -m benchmarks.interval_coverage [--reps 2000] [--boot 999]`` prints, per
scenario, method and number of test patients ``P`` (5, 10, 30), the share of
simulated test sets whose nominal 95 % interval contains the true difference.

Estimand: what the point estimate ``diff`` of ``compare`` estimates, the difference of
the two models' **slice-weighted** means over the population of patients,
``E[sum_a] / E[count_a] - E[sum_b] / E[count_b]`` (a patient's sum and count: its
scored slices). It differs from the mean of per-patient means when a patient's
score depends on its number of slices (scenario ``lgg``). The ECE's estimand is the
population ECE, ``sum_k |E[prob_k] - E[target_k]| / E[count]`` over reliability bins.

Scenarios (per-slice scores in [0, 1], the two models correlated within a patient):

* ``uniform``: 1-20 slices per patient; logit score = patient effect (shared by both
  models, sd 1) + the patient's model difference (sd 0.3) + slice noise (shared 0.8,
  own 0.4); difference +0.3 on the logit scale.
* ``lgg``: LGG-like: 1-60 slices per patient (log-normal, skewed), patients with
  more slices score higher, and a slice fails (Dice 0) with a patient-dependent
  probability, more often for model B: skewed, zero-inflated, bounded scores.
* ``volume``: one score per patient (3-D Dice, or QUBIQ's one image per case):
  skewed Beta-like scores with failures.
* ``ece``: per patient ~10^3-10^4 pixels in 10 reliability bins; the models are
  miscalibrated by different amounts, with a per-patient shift shared by both.

Methods: ``percentile`` (:func:`~pyroseg.stats.paired_bootstrap`, the current one),
``bca`` (bias-corrected and accelerated bootstrap, the same resamples),
``t_delta`` (:func:`~pyroseg.stats.paired_patient_interval`: cluster-robust
delta-method standard error, t with P - 1 degrees of freedom) and ``t_jack``
(:func:`~pyroseg.stats.paired_jackknife_stat`: jackknife standard error, t with P - 1).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import special as _sp
from scipy import stats as _st

from pyroseg.stats import binned_ece, jackknife_diff_se, ratio_diff_se, ratio_of_sums

__all__ = ["SCENARIOS", "simulate", "truth", "coverage", "main"]

SCENARIOS = ("uniform", "lgg", "volume", "ece")
PATIENTS = (5, 10, 30)
_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(40)  # E[f(N(0, 1))] = sum w f(x) / sqrt(2 pi)
_GH_W = _GH_W / _GH_W.sum()
_ECE_BINS = 10


def _patients(rng: np.random.Generator, shape: tuple[int, ...], scenario: str) -> dict[str, np.ndarray]:
    """Per-patient parameters ``(*shape)`` of ``scenario``."""
    if scenario == "uniform":
        c = rng.integers(1, 21, size=shape).astype(float)
        u = rng.normal(0.0, 1.0, shape)
        zero = np.zeros(shape)
        return {"c": c, "u": u, "w": rng.normal(0.0, 0.3, shape), "fa": zero, "fb": zero,
                "mu": 0.8, "d": 0.3, "se": 0.8, "sf": 0.4}
    if scenario == "lgg":
        c = np.clip(np.round(np.exp(rng.normal(2.2, 0.8, shape))), 1, 60)
        u = rng.normal(0.0, 1.0, shape) + 0.5 * (np.log(c) - 2.2)  # bigger tumours: more slices, easier
        return {"c": c, "u": u, "w": rng.normal(0.0, 0.4, shape),
                "fa": _sp.expit(-2.5 - 1.2 * u), "fb": _sp.expit(-2.0 - 1.2 * u),
                "mu": 1.2, "d": 0.2, "se": 1.0, "sf": 0.5}
    if scenario == "volume":
        u = rng.normal(0.0, 1.2, shape)
        return {"c": np.ones(shape), "u": u, "w": rng.normal(0.0, 0.5, shape),
                "fa": _sp.expit(-2.5 - u), "fb": _sp.expit(-2.2 - u), "mu": 1.5, "d": 0.2, "se": 0.0, "sf": 0.0}
    raise ValueError(scenario)


def _slice_mean(x: np.ndarray, sd: float) -> np.ndarray:
    """``E[expit(x + N(0, sd^2))]`` by Gauss-Hermite quadrature."""
    return (_sp.expit(x[..., None] + sd * _GH_X) * _GH_W).sum(-1)


def _ece_patients(rng: np.random.Generator, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    k = _ECE_BINS
    n = np.round(np.exp(rng.normal(7.5, 0.8, shape)))  # pixels per patient
    base = rng.dirichlet(np.full(k, 0.8), size=shape)  # (*shape, K) how the pixels spread over the bins
    wa = 0.7 * base + 0.3 * rng.dirichlet(np.full(k, 0.8), size=shape)
    wb = 0.7 * base + 0.3 * rng.dirichlet(np.full(k, 0.8), size=shape)
    centre = (np.arange(k) + 0.5) / k
    shift = rng.normal(0.0, 0.06, shape)[..., None]  # a patient harder or easier for both
    qa = np.clip(centre - 0.6 * centre * (1 - centre) + shift, 0, 1)  # A overconfident
    qb = np.clip(centre - 0.3 * centre * (1 - centre) + shift + rng.normal(0.0, 0.03, shape)[..., None], 0, 1)
    return {"n": n, "wa": wa, "wb": wb, "qa": qa, "qb": qb, "centre": centre}


def truth(scenario: str, n: int = 2_000_000, seed: int = 12345) -> float:
    """The population difference (the estimand), by quadrature over the slice noise and
    Monte Carlo over ``n`` patients (error ~1e-4, far below the intervals' widths)."""
    rng = np.random.default_rng(seed)
    if scenario == "ece":
        e = _ece_patients(rng, (n,))
        out = []
        for w, q in ((e["wa"], e["qa"]), (e["wb"], e["qb"])):
            cnt = (e["n"][:, None] * w).mean(0)
            out.append(np.abs(cnt * e["centre"] - (e["n"][:, None] * w * q).mean(0)).sum() / e["n"].mean())
        return float(out[0] - out[1])
    t = _patients(rng, (n,), scenario)
    sd = float(np.hypot(t["se"], t["sf"]))
    x = t["mu"] + t["u"]
    ga = (1 - t["fa"]) * _slice_mean(x + t["d"] / 2 + t["w"], sd)
    gb = (1 - t["fb"]) * _slice_mean(x - t["d"] / 2 - t["w"], sd)
    return float((t["c"] * (ga - gb)).mean() / t["c"].mean())


def simulate(rng: np.random.Generator, reps: int, p: int, scenario: str) -> tuple[np.ndarray, np.ndarray]:
    """``reps`` simulated test sets of ``p`` patients: per-patient statistics ``(reps, p, K)``
    of models A and B (``[sum, count]``, K = 2; ``ece``: reliability bins, K = 30)."""
    if scenario == "ece":
        e = _ece_patients(rng, (reps, p))
        out = []
        for w, q in ((e["wa"], e["qa"]), (e["wb"], e["qb"])):
            cnt = rng.multinomial(e["n"].astype(np.int64), w).astype(float)  # (reps, p, K)
            prob = cnt * (e["centre"] + rng.uniform(-0.05, 0.05, cnt.shape))
            tgt = rng.binomial(cnt.astype(np.int64), q).astype(float)
            out.append(np.concatenate([cnt, prob, tgt], -1))
        return out[0], out[1]
    t = _patients(rng, (reps, p), scenario)
    m = int(t["c"].max())
    mask = np.arange(m) < t["c"][..., None]  # (reps, p, m): the patient's slices
    shared = t["mu"] + t["u"][..., None] + t["se"] * rng.standard_normal(mask.shape)
    da = (t["d"] / 2 + t["w"])[..., None]
    sa = _sp.expit(shared + da + t["sf"] * rng.standard_normal(mask.shape))
    sb = _sp.expit(shared - da + t["sf"] * rng.standard_normal(mask.shape))
    sa = sa * (rng.random(mask.shape) >= t["fa"][..., None])  # failed slices score 0
    sb = sb * (rng.random(mask.shape) >= t["fb"][..., None])
    a = np.stack([(sa * mask).sum(-1), t["c"]], -1)
    b = np.stack([(sb * mask).sum(-1), t["c"]], -1)
    return a, b


def _bootstrap(a: np.ndarray, b: np.ndarray, statistic, n_boot: int, rng: np.random.Generator,
               level: float) -> dict[str, np.ndarray]:
    """Percentile and BCa bounds ``(reps, 2)`` from the same ``n_boot`` patient resamples."""
    reps, p, _ = a.shape
    lo_q, hi_q = (1 - level) / 2, (1 + level) / 2
    pct, bca = np.empty((reps, 2)), np.empty((reps, 2))
    diff, _ = jackknife_diff_se(a, b, statistic)
    ta, tb = a.sum(-2), b.sum(-2)
    loo = statistic(ta[..., None, :] - a) - statistic(tb[..., None, :] - b)  # (reps, p)
    dev = loo.mean(-1, keepdims=True) - loo
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = (dev**3).sum(-1) / (6 * ((dev**2).sum(-1)) ** 1.5)
    acc = np.nan_to_num(acc)
    chunk = max(1, 4_000_000 // (n_boot * p))
    zq = _st.norm.ppf([lo_q, hi_q])
    for s in range(0, reps, chunk):
        e = min(reps, s + chunk)
        idx = rng.integers(0, p, size=(e - s, n_boot, p))
        rows = np.arange(s, e)[:, None, None]
        boot = statistic(a[rows, idx].sum(-2)) - statistic(b[rows, idx].sum(-2))  # (chunk, n_boot)
        pct[s:e] = np.quantile(boot, [lo_q, hi_q], axis=-1).T
        below = (boot < diff[s:e, None]).mean(-1) + 0.5 * (boot == diff[s:e, None]).mean(-1)
        z0 = _st.norm.ppf(np.clip(below, 0.5 / n_boot, 1 - 0.5 / n_boot))[:, None]
        a_ = acc[s:e, None]
        adj = _st.norm.cdf(z0 + (z0 + zq) / (1 - a_ * (z0 + zq)))  # (chunk, 2)
        srt = np.sort(boot, -1)
        pos = np.clip(np.round(adj * (n_boot - 1)).astype(int), 0, n_boot - 1)
        bca[s:e] = np.take_along_axis(srt, pos, -1)
    return {"percentile": pct, "bca": bca}


def coverage(scenario: str, p: int, reps: int, *, n_boot: int = 0, level: float = 0.95, seed: int = 0,
             true: float | None = None) -> dict[str, float]:
    """Share of ``reps`` simulated test sets of ``p`` patients whose interval contains the
    true difference, per method (bootstrap methods only with ``n_boot`` > 0)."""
    rng = np.random.default_rng([seed, p, SCENARIOS.index(scenario)])
    true = truth(scenario) if true is None else true
    a, b = simulate(rng, reps, p, scenario)
    statistic = binned_ece if scenario == "ece" else ratio_of_sums
    tq = float(_st.t.ppf((1 + level) / 2, p - 1))
    bounds = {}
    if scenario != "ece":
        diff, se = ratio_diff_se(a[..., 0], a[..., 1], b[..., 0], b[..., 1])
        bounds["t_delta"] = np.stack([diff - tq * se, diff + tq * se], -1)
    diff, se = jackknife_diff_se(a, b, statistic)
    bounds["t_jack"] = np.stack([diff - tq * se, diff + tq * se], -1)
    if n_boot:
        bounds.update(_bootstrap(a, b, statistic, n_boot, rng, level))
    return {k: float(np.mean((v[:, 0] <= true) & (true <= v[:, 1]))) for k, v in bounds.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--boot", type=int, default=999)
    ap.add_argument("--scenarios", nargs="*", default=list(SCENARIOS))
    args = ap.parse_args(argv)
    print(f"coverage of nominal 95 % intervals, {args.reps} simulated test sets per cell "
          f"(binomial s.e. ~{100 * np.sqrt(0.95 * 0.05 / args.reps):.1f} points), {args.boot} resamples")
    for sc in args.scenarios:
        t0 = time.perf_counter()
        true = truth(sc)
        rows = {p: coverage(sc, p, args.reps, n_boot=args.boot, true=true) for p in PATIENTS}
        methods = list(rows[PATIENTS[0]])
        print(f"\n{sc} (true difference {true:+.4f}; {time.perf_counter() - t0:.0f} s)")
        print(f"{'method':<12}" + "".join(f"{'P=' + str(p):>8}" for p in PATIENTS))
        for m in methods:
            print(f"{m:<12}" + "".join(f"{100 * rows[p][m]:>7.1f}%" for p in PATIENTS))


if __name__ == "__main__":
    main()
