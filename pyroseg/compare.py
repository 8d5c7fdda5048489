"""Train every model under one protocol, several seeds each, and tabulate them honestly: ``pyroseg compare``.

Same data, same patient split, same epochs, batch size and learning rate for
every model; each model is trained once per seed (``seeds``: ``seed``,
``seed + 1``, ...) and each run is scored on the test patients with
:func:`pyroseg.evaluate.evaluate_run`. By default the data and the split stay
those of ``base.seed`` (:attr:`~pyroseg.config.FitConfig.data_seed`), so the
seeds vary only the weights' initialisation, the ``z`` noise and the batch
order; ``vary_split`` redraws the split (and synthetic data) with each seed.

Layout of ``out``::

    out/<model>/seed<k>/        an ordinary run folder (pyroseg fit), plus
                 evaluation.json  its test report (with per-patient scores)
    out/comparison.json         every number, every run's path, the command, versions
    out/comparison.md           the tables (made from comparison.json alone: render_markdown)
    out/comparison.csv          one row per (model, metric): the summary and the difference
    out/comparison.png          each metric per model: seeds, mean and 95 % interval
    out/comparison_reliability.png   every model's reliability curve (first seed)

An interrupted compare is picked up by running it again: finished runs (and
their evaluations) are kept, a run with a checkpoint but fewer epochs resumes
through ``fit(resume=True)``, a run that died before its first checkpoint is
started again.

Statistics (:mod:`pyroseg.stats`): per metric and model, the mean, standard
deviation and 95 % Student-t interval over seeds; per model and metric, the
difference from ``baseline`` estimated twice, **paired by seed** (t-interval of
the per-seed differences: the spread of training runs) and **paired by test
patient** (bootstrap over patients, slices pooled over seeds: the spread of
test sets). A difference is called a ``tie`` when either interval contains 0;
see docs/guide/comparing.md for why both.

The table ends with the data's references, scored by the same metrics on the
same test slices (:func:`pyroseg.evaluate.evaluate_run_references`): on
``synthetic-ambiguous`` data ``oracle`` (the true annotator distribution, what
a perfect model gets) and ``oracle (one mask)`` (the true marginal
thresholded at 0.5, what a perfect deterministic model gets); on data with
several raters (QUBIQ, LIDC) ``raters (leave one out)`` (each rater scored
against the others: the human level) and ``majority vote`` (the best a
deterministic model can do).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pyroseg.checkpoint import atomic_write_text
from pyroseg.config import FitConfig, load_config_json, versions
from pyroseg.errors import UsageError
from pyroseg.evaluate import (
    BINNED_METRICS,
    MAJORITY,
    ORACLE,
    ORACLE_ONE_MASK,
    RATERS_LOO,
    evaluate_run,
    evaluate_run_references,
)
from pyroseg.geco import refuse_without_kl
from pyroseg.models import MODELS, resolve_model
from pyroseg.runs import read_metrics_csv
from pyroseg.stats import (
    LEVEL,
    N_BOOT,
    binned_ece,
    paired_bootstrap,
    paired_bootstrap_stat,
    paired_t,
    t_interval,
    verdict,
)
from pyroseg.train import FitCallbacks, fit

__all__ = [
    "compare_models",
    "comparison_markdown",
    "render_markdown",
    "render_summary",
    "render_results",
    "summarise",
    "collapsed_sites",
    "run_state",
    "COLUMNS",
    "METRICS",
    "EVALUATION",
]

log = logging.getLogger(__name__)

#: (key, header) of the wide table of means, in order.
COLUMNS = [
    ("model", "model"),
    ("bce", "BCE"),
    ("dice_all", "Dice (all slices)"),
    ("dice_tumour", "Dice (tumour slices)"),
    ("dice_volume", "Dice (per patient 3-D)"),
    ("iou_tumour", "IoU (tumour)"),
    ("false_positive_slices", "FP slices"),
    ("ged", "GED"),
    ("ged_unbiased", "GED (unbiased)"),
    ("hm_iou", "HM-IoU"),
    ("sample_diversity", "diversity"),
    ("ece", "ECE"),
    ("ece_lesion", "ECE (lesion region)"),
    ("qubiq", "QUBIQ score"),
    ("dice_raters", "Dice (each rater)"),
    ("dice_majority", "Dice (majority)"),
    ("elbo", "-ELBO / image"),
    ("nll", "NLL / image"),  # models without an ELBO: unet, mc_dropout, ssn (its M-sample estimate), ensembles
    ("collapsed_sites", "collapsed sites"),
    ("num_params", "params"),
    ("sec_per_epoch", "s / epoch"),
]

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
_NO_DIFFERENCE = ("sec_per_epoch",)  # machine load, not the model: summarised, never ranked

#: Added to a verdict that rests on the seed interval alone: the runs' reports have no
#: per-patient scores for the metric (reports from before every metric had them), or
#: fewer than 2 test patients.
NOT_BY_PATIENT = " (not tested by patient)"

#: Rows that are references, not models: summarised, never compared with the baseline.
REFERENCES = (ORACLE, ORACLE_ONE_MASK, RATERS_LOO, MAJORITY)

#: A run's cached test report, beside its weights.
EVALUATION = "evaluation.json"

#: A latent site whose mean KL on the test patients is below this many nats per
#: image carries (almost) no information: posterior collapse.
COLLAPSE_NATS = 0.1
#: ... and one whose posterior means do not move with the input (0 active units)
#: and whose replacement by its prior mean changes the prediction by less than this
#: (1 - Dice between the two predictions) is switched off, whatever its KL.
COLLAPSE_EFFECT = 0.01

# config fields that do not change what a run computes (a reused run may differ in them)
_NOT_PROTOCOL = ("out", "epochs", "device", "cache_dir")


def collapsed_sites(report: dict[str, Any]) -> str:
    """The latent sites of ``report`` (an :func:`~pyroseg.evaluate.evaluate_run` report)
    that carry nothing: KL below :data:`COLLAPSE_NATS`, or 0 active units and an effect
    below :data:`COLLAPSE_EFFECT` (a site can keep a few nats of KL in an offset that no
    input moves; see README, "Seeing collapse"). ``"-"``: none; ``"n/a"``: no latent."""
    sites = [k[3:] for k in report if k.startswith("kl_")]
    if not sites:
        return "n/a"

    def dead(s: str) -> bool:
        if report[f"kl_{s}"] < COLLAPSE_NATS:
            return True
        au, effect = report.get(f"au_{s}"), report.get(f"effect_{s}")
        return au is not None and effect is not None and au == 0 and effect < COLLAPSE_EFFECT

    return ",".join(s for s in sites if dead(s)) or "-"


def model_list(models: Sequence[str] | None, base: FitConfig) -> list[str]:
    """The models a comparison trains: ``models``, or every built-in model (less those
    ``base.objective`` cannot train: with GECO, the models without a KL term). Unknown
    names, and a named model the objective cannot train, are a one-line :class:`UsageError`."""
    names = list(models or MODELS)
    unknown = [m for m in names if not _known(m)]
    if unknown:
        raise UsageError(f"--models {','.join(unknown)}: unknown; expected some of {', '.join(MODELS)}, "
                         "import paths package.module:Class or entry points")
    if base.objective == "geco":
        if models:
            for m in names:
                refuse_without_kl(resolve_model(m))
        else:
            names = [m for m in names if not resolve_model(m).guide_is_prior]
    return names


def compare_models(
    base: FitConfig,
    out: str | Path,
    *,
    models: Sequence[str] | None = None,
    seeds: int = 1,
    vary_split: bool = False,
    baseline: str = "unet",
    num_samples: int = 16,
    overwrite: bool = False,
    callbacks: FitCallbacks | None = None,
    on_model: Callable[[str, int, int], None] | None = None,
    command: str | None = None,
    pictures: bool = True,
) -> dict[str, Any]:
    """Train ``models`` (default: every model of the registry) ``seeds`` times with
    ``base`` (its ``model``, ``seed``, ``data_seed`` and ``out`` are replaced),
    evaluate each run on the test split and write the tables (see module docs).

    ``baseline``: the model every other is compared with (must be in ``models``).
    ``command``: the command line, recorded in ``comparison.json``.
    ``on_model(label, i, n)`` is called before each run. ``pictures=False``: the
    runs skip their PNGs (``fit(pictures=False)``). Returns the
    ``comparison.json`` document.
    """
    models = model_list(models, base)
    if len(set(models)) != len(models):
        raise UsageError(f"--models {','.join(models)}: a model is named twice")
    if baseline not in models:
        raise UsageError(f"--baseline {baseline}: not among --models {','.join(models)}")
    if seeds < 1:
        raise UsageError(f"--seeds {seeds}: expected at least 1")
    if num_samples < 1:
        raise UsageError(f"--num-samples {num_samples}: expected at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = replace(base)
    base.validate()  # resolves beta_warmup once, for every model alike
    seed_list = [base.seed + i for i in range(seeds)]
    doc: dict[str, Any] = {
        "command": command,
        "config": base.to_dict(),
        "models": models,
        "seeds": seed_list,
        "vary_split": vary_split,
        "baseline": baseline,
        "num_samples": num_samples,
        "level": LEVEL,
        "n_boot": N_BOOT,
        "versions": versions(),
        "runs": [],
    }
    plan = [(s, m) for s in seed_list for m in models]  # seed-major: a stopped compare has whole seeds
    for i, (s, name) in enumerate(plan):
        if on_model:
            on_model(f"{name} seed {s}", i, len(plan))
        cfg = replace(base, model=name, seed=s, data_seed=s if vary_split else base.seed_of_data(),
                      out=str(out / _folder(name) / f"seed{s}"))
        _train(cfg, callbacks, overwrite, pictures)
        doc["runs"].append(_evaluation(Path(cfg.out), cfg, num_samples, fresh=overwrite))
        _write(out, summarise(doc), figure=False)  # the tables so far: a stopped compare still has them
    # the data's references on the same test slices (oracle rows on synthetic-ambiguous, one rater against
    # the others and the majority vote on QUBIQ, LIDC), per seed: with --vary-split the slices differ
    for s in seed_list:
        for row in evaluate_run_references(out / _folder(models[0]) / f"seed{s}", num_samples=num_samples, sample_seed=s):
            doc["runs"].append({**row, "seed": s})
    doc = summarise(doc)
    _write(out, doc)
    _reliability(out, [r for r in doc["runs"] if r["seed"] == seed_list[0]], num_samples)
    return doc


def _train(cfg: FitConfig, callbacks: FitCallbacks | None, overwrite: bool, pictures: bool) -> None:
    """Train the run ``cfg.out`` unless it is finished; resume it when it has a checkpoint."""
    run = Path(cfg.out)
    state = run_state(run, cfg.epochs)
    if state in ("finished", "partial") and not overwrite:
        saved = FitConfig.from_dict(load_config_json(run / "config.json")["fit"])
        diff = sorted(k for k, v in cfg.to_dict().items() if _protocol(k, cfg) and saved.to_dict().get(k) != v)
        if diff:
            raise UsageError(f"--out: {run} holds a run with other settings ({', '.join(diff)}); "
                             "use another --out, or --overwrite to retrain it")
    if state == "finished" and not overwrite:
        log.info("%s: finished run kept", run)
    elif state == "partial" and not overwrite:
        log.info("%s: resuming from its checkpoint", run)
        fit(replace(cfg), callbacks=callbacks, resume=True, pictures=pictures)
    else:
        fit(replace(cfg), callbacks=callbacks, overwrite=overwrite or run.exists(), pictures=pictures)


def _protocol(field: str, cfg: FitConfig) -> bool:
    """Whether a config field changes what a run computes (GECO's fields do not, under the ELBO)."""
    return field not in _NOT_PROTOCOL and not (cfg.objective != "geco" and field.startswith("geco_"))


def run_state(run: str | Path, epochs: int) -> str:
    """Whether the run folder ``run`` has trained ``epochs`` epochs: ``finished``, ``partial``
    (a checkpoint, fewer epochs), or ``absent`` (nothing to resume)."""
    run = Path(run)
    if not (run / "checkpoint.pt").exists() or not (run / "config.json").exists():
        return "absent"
    try:
        done = len(read_metrics_csv(run / "metrics.csv"))
    except Exception:
        done = 0
    return "finished" if done >= epochs else "partial"


def _evaluation(run: Path, cfg: FitConfig, num_samples: int, *, fresh: bool) -> dict[str, Any]:
    """The run's test report: ``run/evaluation.json`` when it matches (same samples,
    seed and epochs), otherwise evaluated now and written there."""
    history = read_metrics_csv(run / "metrics.csv")
    cached = run / EVALUATION
    if cached.is_file() and not fresh:
        try:
            report = json.loads(cached.read_text())
            if (report.get("num_samples_asked") == num_samples and report.get("seed") == cfg.seed
                    and report.get("epochs_trained") == len(history)):
                return report
        except (OSError, ValueError):
            pass
    report = evaluate_run(run, num_samples=num_samples, device=cfg.device, seed=cfg.seed, per_patient=True)
    report["num_samples_asked"] = num_samples
    report["sec_per_epoch"] = sum(r["train_time_s"] for r in history) / len(history)
    report["collapsed_sites"] = collapsed_sites(report)
    report["run"] = str(run)
    atomic_write_text(cached, json.dumps(report, indent=2) + "\n")
    return report


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
            if metric in _NO_DIFFERENCE:
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


def _reliability(out: Path, rows: list[dict], num_samples: int) -> None:
    """Every row's reliability curve in one diagram; a failure here never loses the tables."""
    try:
        from pyroseg.plots import reliability_diagram

        curves = {f"{r['model']} (ECE {r['ece']:.4f})": r["reliability"] for r in rows if "reliability" in r}
        if curves:
            first = rows[0]
            reliability_diagram(curves, out / "comparison_reliability.png",
                                title=f"{first['data']}, test patients, mean of {num_samples} samples")
    except Exception as e:
        log.warning("could not draw %s: %s", out / "comparison_reliability.png", e)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if 0 < abs(v) < 0.01:  # small values (ECE) keep a significant digit
            return f"{v:.4f}"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    if isinstance(v, int) and not isinstance(v, bool) and v > 10000:
        return f"{v:,}"
    return str(v)


def comparison_markdown(rows: list[dict[str, Any]], *, title: str = "",
                        columns: Sequence[tuple[str, str]] = tuple(COLUMNS)) -> str:
    """The wide Markdown table (``columns``, default :data:`COLUMNS`) of one report per row."""
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(h for _, h in columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k, "")) for k, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def _mean_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model for :func:`comparison_markdown`: means over seeds, ``mean ± sd``
    where there are 2 or more seeds; per-seed strings (collapsed sites) joined by ``/``."""
    stats = {(r["model"], r["metric"]): r for r in doc["summary"]}
    rows = []
    for name in dict.fromkeys(r["model"] for r in doc["runs"]):
        runs = [r for r in doc["runs"] if r["model"] == name]
        row: dict[str, Any] = {"model": name}
        for key, _ in COLUMNS[1:]:
            st = stats.get((name, key))
            if st is not None:
                row[key] = st["mean"] if st["n"] < 2 else f"{_cell(st['mean'])} ± {_cell(st['sd'])}"
            elif key in runs[0]:
                vals = list(dict.fromkeys(str(_cell(r.get(key, ""))) for r in runs))
                row[key] = runs[0][key] if len(vals) == 1 else "/".join(str(r.get(key, "")) for r in runs)
        rows.append(row)
    return rows


def _interval(d: dict) -> str:
    return "-" if math.isnan(d["lo"]) else f"[{_cell(d['lo'])}, {_cell(d['hi'])}]"


def _title(doc: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The first model's report, and the tables' title: data, size, test set, budget, seeds."""
    first = next(r for r in doc["runs"] if r["model"] not in REFERENCES)
    cfg, seeds = doc["config"], doc["seeds"]
    n = len(seeds)
    return first, (
        f"{first['data']}, {first['image_size']}x{first['image_size']}, test patients "
        f"({first['n_patients']} patients, {first['n_slices']} slices), {cfg['epochs']} epochs, "
        f"{n} seed{'s' if n > 1 else ''} ({', '.join(map(str, seeds))}), "
        f"point prediction = mean of {doc['num_samples']} samples"
    )


def render_summary(doc: dict[str, Any], columns: Sequence[str]) -> str:
    """A short table of ``comparison.json``: the means (± sd over seeds) of ``columns``
    (keys of :data:`COLUMNS`) per model, and per model the metrics where it differs from
    the baseline beyond both intervals (every other difference is a tie). What the
    README shows; ``pyroseg compare --render DIR --columns a,b`` regenerates it."""
    known = dict(COLUMNS)
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise UsageError(f"--columns {','.join(unknown)}: unknown; expected some of {', '.join(k for k, _ in COLUMNS[1:])}")
    _, title = _title(doc)
    cols = [("model", "model"), *((c, known[c]) for c in columns if c != "model"), ("verdict", f"vs `{doc['baseline']}`")]
    calls: dict[str, list[str]] = {}
    for d in doc["differences"]:
        if d["metric"] in columns and d["verdict"] not in ("tie", "n/a"):
            calls.setdefault(d["model"], []).append(f"{d['metric']} {d['verdict']}")
    rows = []
    for row in _mean_rows(doc):
        name = row["model"]
        row["verdict"] = ("reference" if name == doc["baseline"] else "-" if name in REFERENCES
                          else "; ".join(calls.get(name, [])) or "tie on all")
        rows.append(row)
    return comparison_markdown(rows, title=title, columns=cols)


def render_markdown(doc: dict[str, Any]) -> str:
    """``comparison.md`` made from a ``comparison.json`` document alone (so any table
    in the docs can be regenerated from its results file: ``pyroseg compare --render``)."""
    first, title = _title(doc)
    cfg = doc["config"]
    seeds = doc["seeds"]
    n = len(seeds)
    pct = f"{round(doc['level'] * 100)} %"
    md = comparison_markdown(_mean_rows(doc), title=title)
    md += f"\nMeans over seeds{' ± standard deviation' if n > 1 else ''}.\n"
    md += (f"\n#### Per metric: {pct} intervals and the paired difference from `{doc['baseline']}`\n\n"
           f"| metric | model | mean | sd | {pct} t-interval (seeds) | difference | {pct} paired t (seeds) | "
           f"{pct} paired bootstrap (patients) | verdict |\n|---|---|---|---|---|---|---|---|---|\n")
    diffs = {(d["model"], d["metric"]): d for d in doc["differences"]}
    for metric in METRICS:
        for st in (s for s in doc["summary"] if s["metric"] == metric):
            d = diffs.get((st["model"], metric))
            tail = ("| - | - | - | reference |" if st["model"] == doc["baseline"] and metric not in _NO_DIFFERENCE
                    else "| - | - | - | |" if d is None
                    else f"| {_cell(d['diff'])} | {_interval(d['seeds'])} | {_interval(d['patients'])} | {d['verdict']} |")
            md += f"| {metric} | {st['model']} | {_cell(st['mean'])} | {_cell(st['sd'])} | {_interval(st)} {tail}\n"
    md += (
        f"\nProtocol: split by patient (data seed {cfg['data_seed'] if cfg.get('data_seed') is not None else cfg['seed']}"
        f"{', redrawn with each seed' if doc['vary_split'] else ', the same for every seed'}; "
        f"val {cfg['val_fraction']}, test {cfg['test_fraction']}), no augmentation of test data; "
        "test-time z from q(z|x) (VAE family) or the prior net (Probabilistic U-Nets). "
        f"Intervals: {pct} Student-t over the {n} seeds (none with one seed). Differences from "
        f"`{doc['baseline']}`: paired by seed (t-interval of the per-seed differences: training-run noise) and "
        f"paired by test patient ({doc['n_boot']} bootstrap resamples of the patients, each patient's slices pooled "
        "over the seeds: test-set noise). 'tie': either interval contains 0; 'better'/'worse' only when "
        "both exclude it (diversity has no better direction: 'higher'/'lower'); '(1 seed)': only the patient "
        "interval exists, training-run noise is not in it; '(not tested by patient)': only the seed interval "
        "exists (reports without per-patient scores for that metric). "
        f"'collapsed sites': latent sites whose mean test KL is below {COLLAPSE_NATS} nats / image, or with 0 "
        f"active units whose replacement by the prior mean changes the prediction by less than {COLLAPSE_EFFECT} "
        "(1 - Dice). GED (d = 1 - IoU; all pairs; 'unbiased': distinct pairs only), HM-IoU and diversity score the "
        f"{doc['num_samples']} thresholded samples per slice against all {first.get('n_annotators', 1)} "
        "annotator(s); ECE: 10 equal-width bins of the per-pixel mean probability against the fraction of "
        "annotators marking the pixel ('lesion region': pixels some annotator marks or given a mean probability "
        ">= 0.05)."
        + (" 'oracle': samples of the true annotator distribution; 'oracle (one mask)': the true per-pixel "
           "marginal thresholded at 0.5, the best deterministic model."
           if any(r["model"] == ORACLE for r in doc["runs"]) else "")
        + (" QUBIQ score: raters' mean and the mean prediction thresholded at 0.1..0.9, Dice averaged; "
           "'raters (leave one out)': each rater scored against the others (the human level); 'majority vote': "
           "the mask at least half of the raters mark, as a deterministic prediction."
           if any(r["model"] == RATERS_LOO for r in doc["runs"]) else "")
        + "\n"
    )
    if doc.get("command"):
        md += f"\nCommand: `{doc['command']}`. "
    else:
        md += "\n"
    v = doc["versions"]
    md += (f"Versions: pyroseg {v.get('pyroseg')}, torch {v.get('torch')}, pyro {v.get('pyro')}. "
           "Regenerate this table: `pyroseg compare --render RESULTS_DIR`.\n")
    return md


def _csv(doc: dict[str, Any]) -> str:
    """One row per (model, metric): the summary over seeds and the difference from the baseline."""
    diffs = {(d["model"], d["metric"]): d for d in doc["differences"]}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "metric", "n_seeds", "mean", "sd", "ci_lo", "ci_hi", "values", "baseline", "diff",
                "diff_seeds_lo", "diff_seeds_hi", "diff_patients_n", "diff_patients_lo", "diff_patients_hi", "verdict"])
    for st in doc["summary"]:
        d = diffs.get((st["model"], st["metric"]))
        extra = ([doc["baseline"], d["diff"], d["seeds"]["lo"], d["seeds"]["hi"], d["patients"]["n"],
                  d["patients"]["lo"], d["patients"]["hi"], d["verdict"]] if d else [""] * 8)
        w.writerow([st["model"], st["metric"], st["n"], st["mean"], st["sd"], st["lo"], st["hi"],
                    " ".join(repr(v) for v in st["values"]), *extra])
    return buf.getvalue()


def _figure(out: Path, doc: dict[str, Any]) -> None:
    """``comparison.png``: per metric, each model's seeds (dots), mean and interval; never loses the tables."""
    png = out / "comparison.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from pyroseg.checkpoint import atomic_write

        metrics = [m for m in METRICS if any(s["metric"] == m for s in doc["summary"])]
        cols = 4
        rows = max(1, math.ceil(len(metrics) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
        for ax, metric in zip(axes.flat, metrics, strict=False):
            sts = [s for s in doc["summary"] if s["metric"] == metric]
            for i, st in enumerate(sts):
                ax.plot([i] * len(st["values"]), st["values"], ".", color="0.6", ms=4)
                if st["n"] >= 2:
                    ax.errorbar([i], [st["mean"]], yerr=[[st["mean"] - st["lo"]], [st["hi"] - st["mean"]]],
                                fmt="o", color="C0", capsize=3)
                else:
                    ax.plot([i], [st["mean"]], "o", color="C0")
            ax.set_xticks(range(len(sts)), [s["model"] for s in sts], rotation=45, ha="right", fontsize=7)
            ax.set_title(metric, fontsize=9)
        for ax in list(axes.flat)[len(metrics):]:
            ax.axis("off")
        fig.suptitle(f"{len(doc['seeds'])} seed(s): dots per seed, mean and {round(doc['level'] * 100)} % t-interval",
                     fontsize=10)
        fig.subplots_adjust(left=0.05, right=0.98, top=0.9, bottom=0.1, hspace=0.9, wspace=0.3)  # tight_layout: 1/3 of a tiny compare
        atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=90))
        plt.close(fig)
    except Exception as e:
        log.warning("could not draw %s: %s", png, e)


def _write(out: Path, doc: dict[str, Any], *, figure: bool = True) -> None:
    atomic_write_text(out / "comparison.json", json.dumps(doc, indent=2) + "\n")
    atomic_write_text(out / "comparison.md", render_markdown(doc))
    atomic_write_text(out / "comparison.csv", _csv(doc))
    if figure:
        _figure(out, doc)


def render_results(results_dir: str | Path, columns: Sequence[str] | None = None) -> str:
    """The Markdown of ``results_dir/comparison.json`` (:func:`render_markdown`, or
    :func:`render_summary` of ``columns``).

    :raises UsageError: no readable ``comparison.json`` there.
    """
    path = Path(results_dir) / "comparison.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--render {results_dir}: no comparison.json there (written by pyroseg compare --out)") from None
    except ValueError as e:
        raise UsageError(f"--render {path}: not a JSON document ({e})") from None
    if not isinstance(doc, dict) or "runs" not in doc or "summary" not in doc:
        raise UsageError(f"--render {path}: not a comparison.json of this pyroseg version (no runs/summary)")
    return render_markdown(doc) if columns is None else render_summary(doc, columns)


def _known(ref: str) -> bool:
    """Whether ``ref`` names a model: built in, an import path or an entry point."""
    try:
        resolve_model(ref)
    except UsageError:
        return False
    return True


def _folder(ref: str) -> str:
    """The run folder of a model inside ``--out``: its ``--model`` name, or for an
    import path its class's ``name``."""
    return ref if ref in MODELS else resolve_model(ref).name
