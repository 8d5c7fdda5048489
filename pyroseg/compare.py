"""Train every model under one protocol, several seeds each, and tabulate them honestly: ``pyroseg compare``.

Same data, same patient split, same epochs, batch size and learning rate for
every model; each model is trained once per seed (``seeds``: ``seed``,
``seed + 1``, ...) and each run is scored on the test patients with
:func:`pyroseg.evaluate.evaluate_run`. By default the data and the split stay
those of ``base.seed`` (:attr:`~pyroseg.config.FitConfig.data_seed`), so the
seeds vary only the weights' initialisation, the ``z`` noise and the batch
order; ``vary_split`` redraws the split (and synthetic data) with each seed.

With ``folds`` K > 1 the comparison is a K-fold cross-validation by patient
(:func:`pyroseg.data.split.fold_split`): the patients are dealt into K parts
(from the data seed), fold ``k`` tests on part ``k`` and trains on the rest (its
validation patients drawn from the rest: ``val_fraction`` of all the patients),
so every patient is a test case exactly once per seed. Per-patient scores are
pooled over the folds (and seeds); a seed's value of a metric is the mean over
its folds.

Each run is marked *converged* or not (:func:`pyroseg.comparison_stats.converged`:
it stopped on a plateau, or its validation score gained less than
:data:`~pyroseg.comparison_stats.CONVERGED_REL` (relative) or
:data:`~pyroseg.comparison_stats.CONVERGED_ABS` (absolute) over the last quarter
of training), from its ``training.json``, else its ``metrics.csv``; the tables
count the converged runs per model, and ``comparison_curves.png`` draws every
run's validation curve.

Layout of ``out``::

    out/<model>/seed<k>/        an ordinary run folder (pyroseg fit), plus
                 evaluation.json  its test report (with per-patient scores)
    out/<model>/seed<k>/fold<f>/  the same, one per fold, with folds > 1
    out/comparison.json         every number, every run's path, the command, versions
    out/comparison.md           the tables (made from comparison.json alone: render_markdown)
    out/comparison.csv          one row per (model, metric): the summary and the difference
    out/comparison.png          each metric per model: seeds, mean and 95 % interval
    out/comparison_reliability.png   every model's reliability curve (first seed, first fold)
    out/comparison_curves.png   each model's validation curves (every seed and fold)

An interrupted compare is picked up by running it again: finished runs (and
their evaluations) are kept, a run with a checkpoint but fewer epochs resumes
through ``fit(resume=True)``, a run that died before its first checkpoint is
started again.

Statistics (:mod:`pyroseg.stats`): per metric and model, the mean, standard
deviation and 95 % Student-t interval over seeds; per model and metric, the
difference from ``baseline`` estimated twice, **paired by seed** (t-interval of
the per-seed differences: the spread of training runs) and **paired by test
patient** (a Student-t interval with a jackknife-over-patients standard error,
slices pooled over seeds: the spread of test sets). A difference is called a ``tie`` when either interval contains 0;
see docs/guide/comparing.md for why both.

The table ends with the data's references, scored by the same metrics on the
same test slices (:func:`pyroseg.evaluate.evaluate_run_references`): on
``synthetic-ambiguous`` data ``oracle`` (the true annotator distribution, what
a perfect model gets) and ``oracle (one mask)`` (the true marginal
thresholded at 0.5, what a perfect deterministic model gets); on data with
several raters (QUBIQ, LIDC) ``raters (leave one out)`` (each rater scored
against the others: the human level) and ``majority vote`` (the best a
deterministic model can do).

Where the code is: this module trains and evaluates (:func:`compare_models`);
:mod:`pyroseg.comparison_stats` computes the intervals and verdicts
(:func:`summarise`); :mod:`pyroseg.comparison_report` writes the tables
(:func:`render_markdown`, :func:`render_results`); :func:`pyroseg.plots.comparison_figure`
draws the figure; :func:`pyroseg.collapse.collapsed_sites` names the collapsed sites.
Their public names are re-exported here.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pyroseg import runs as _runs
from pyroseg.checkpoint import atomic_write_text
from pyroseg.collapse import COLLAPSE_EFFECT, COLLAPSE_NATS, collapsed_sites
from pyroseg.comparison_report import (
    COLUMNS,
    comparison_markdown,
    draw_reliability,
    render_markdown,
    render_results,
    render_summary,
    write_comparison,
)
from pyroseg.comparison_stats import METRICS, NOT_BY_PATIENT, REFERENCES, converged, summarise
from pyroseg.config import SELECT_MODES, FitConfig, load_config_json, versions
from pyroseg.errors import UsageError
from pyroseg.evaluate import evaluate_run, evaluate_run_references
from pyroseg.geco import refuse_without_kl
from pyroseg.models import MODELS, resolve_model
from pyroseg.runs import CHECKPOINT, CONFIG, at_least_one, read_metrics_csv
from pyroseg.runs import METRICS as RUN_METRICS
from pyroseg.stats import LEVEL, N_BOOT
from pyroseg.train import FitCallbacks, fit

__all__ = [
    "compare_models",
    "comparison_markdown",
    "render_markdown",
    "render_summary",
    "render_results",
    "summarise",
    "collapsed_sites",
    "model_list",
    "run_state",
    "run_folder",
    "run_convergence",
    "read_training",
    "COLUMNS",
    "METRICS",
    "NOT_BY_PATIENT",
    "REFERENCES",
    "COLLAPSE_NATS",
    "COLLAPSE_EFFECT",
    "EVALUATION",
]

log = logging.getLogger(__name__)

#: A run's cached test report, beside its weights.
EVALUATION = "evaluation.json"
#: What fit writes at the end of a run: steps, stop reason, validation curve (pyroseg.runs.TRAINING).
TRAINING = getattr(_runs, "TRAINING", "training.json")

# config fields that do not change what a run computes (a reused run may differ in them)
_NOT_PROTOCOL = ("out", "epochs", "device", "cache_dir")


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
    folds: int = 1,
    model_args: dict[str, dict[str, Any]] | None = None,
    vary_split: bool = False,
    baseline: str = "unet",
    num_samples: int = 16,
    overwrite: bool = False,
    callbacks: FitCallbacks | None = None,
    on_model: Callable[[str, int, int], None] | None = None,
    command: str | None = None,
    pictures: bool = True,
    caveats: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train ``models`` (default: every model of the registry) ``seeds`` times with
    ``base`` (its ``model``, ``seed``, ``data_seed`` and ``out`` are replaced),
    evaluate each run on the test split and write the tables (see module docs).

    ``folds``: with K > 1, a K-fold cross-validation by patient, each fold trained and
    evaluated per model and seed (runs in ``out/<model>/seed<s>/fold<k>``).
    ``model_args``: per model, hyper-parameters added to ``base.model_args``
    (``--model-arg MODEL:KEY=VALUE``).
    ``baseline``: the model every other is compared with (must be in ``models``).
    ``command``: the command line, recorded in ``comparison.json``.
    ``caveats``: per model, a reader's warning recorded in ``comparison.json`` and marked on
    its row in every table (``--caveat MODEL:TEXT``).
    ``on_model(label, i, n)`` is called before each run. ``pictures=False``: the
    runs skip their PNGs (``fit(pictures=False)``). Returns the
    ``comparison.json`` document.
    """
    models = model_list(models, base)
    if len(set(models)) != len(models):
        raise UsageError(f"--models {','.join(models)}: a model is named twice")
    if baseline not in models:
        raise UsageError(f"--baseline {baseline}: not among --models {','.join(models)}")
    at_least_one("--seeds", seeds)
    at_least_one("--folds", folds)
    at_least_one("--num-samples", num_samples)
    model_args = {m: dict(a) for m, a in (model_args or {}).items() if a}
    stray = [m for m in model_args if m not in models]
    if stray:
        raise UsageError(f"--model-arg {stray[0]}:...: {stray[0]} is not among --models {','.join(models)}")
    caveats = dict(caveats or {})
    stray = [m for m in caveats if m not in models]
    if stray:
        raise UsageError(f"--caveat {stray[0]}:...: {stray[0]} is not among --models {','.join(models)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = replace(base, folds=folds, fold=0)
    base.validate()  # resolves the derived defaults once, for every model alike
    seed_list = [base.seed + i for i in range(seeds)]
    doc: dict[str, Any] = {
        "command": command,
        "config": base.to_dict(),
        "model_args": model_args,
        "models": models,
        "seeds": seed_list,
        "folds": folds,
        "vary_split": vary_split,
        "baseline": baseline,
        "num_samples": num_samples,
        "level": LEVEL,
        "n_boot": N_BOOT,
        "versions": versions(),
        "caveats": caveats,
        "runs": [],
    }
    # seed-major, then fold: a stopped compare has whole seeds (and, within one, whole folds)
    plan = [(s, k, m) for s in seed_list for k in range(folds) for m in models]
    for i, (s, k, name) in enumerate(plan):
        if on_model:
            on_model(f"{name} seed {s}" + (f" fold {k}" if folds > 1 else ""), i, len(plan))
        cfg = replace(base, model=name, seed=s, data_seed=s if vary_split else base.seed_of_data(), fold=k,
                      model_args={**base.model_args, **model_args.get(name, {})},
                      out=str(run_folder(out, _folder(name), s, k, folds)))
        _train(cfg, callbacks, overwrite, pictures)
        report = _evaluation(Path(cfg.out), cfg, num_samples, fresh=overwrite)
        doc["runs"].append({**report, "fold": k, **run_convergence(Path(cfg.out), cfg, report.get("n_annotators", 1))})
        write_comparison(out, summarise(doc), figure=False)  # the tables so far: a stopped compare still has them
    # the data's references on the same test slices (oracle rows on synthetic-ambiguous, one rater against
    # the others and the majority vote on QUBIQ, LIDC), per seed and fold: with --vary-split or folds the slices differ
    for s in seed_list:
        for k in range(folds):
            run = run_folder(out, _folder(models[0]), s, k, folds)
            for row in evaluate_run_references(run, num_samples=num_samples, sample_seed=s):
                doc["runs"].append({**row, "seed": s, "fold": k})
    doc = summarise(doc)
    write_comparison(out, doc)
    draw_reliability(out, [r for r in doc["runs"] if r["seed"] == seed_list[0] and r.get("fold", 0) == 0], num_samples)
    draw_curves(out, doc)
    return doc


def run_folder(out: str | Path, model: str, seed: int, fold: int, folds: int) -> Path:
    """The run folder of ``model``, ``seed`` and ``fold`` in a comparison's ``out``:
    ``out/<model>/seed<s>``, or ``out/<model>/seed<s>/fold<k>`` with ``folds`` > 1."""
    run = Path(out) / model / f"seed{seed}"
    return run / f"fold{fold}" if folds > 1 else run


def read_training(run: str | Path) -> dict[str, Any] | None:
    """The run's ``training.json`` (steps, stop reason, validation curve), or None when it has none
    (a run of a pyroseg before it, or one that has not finished) or it is unreadable."""
    try:
        doc = json.loads((Path(run) / TRAINING).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def run_convergence(run: str | Path, cfg: FitConfig, n_annotators: int = 1) -> dict[str, Any]:
    """Whether the run converged (:func:`~pyroseg.comparison_stats.converged`), and what it was judged
    on: ``converged``, ``stop_reason`` (None without a ``training.json``), ``select_by``, ``mode`` and
    the validation ``curve`` (``[[step, score], ...]``): ``training.json``'s, else the ``metrics.csv``
    column of the selection score (``val_<...>``)."""
    training = read_training(run) or {}
    select_by, mode, curve = training.get("select_by"), training.get("mode"), training.get("curve")
    if select_by not in SELECT_MODES:
        select_by = cfg.select_by if cfg.select_by != "auto" else ("val_ged" if n_annotators > 1 else "val_dice_tumour")
    if mode not in ("min", "max"):
        mode = SELECT_MODES.get(select_by, "max")
    if not isinstance(curve, list):
        try:
            rows = read_metrics_csv(Path(run) / RUN_METRICS)
        except Exception:
            rows = []
        curve = [[r.get("step", i + 1), r[select_by]] for i, r in enumerate(rows) if _finite(r.get(select_by))]
    curve = [[float(x), float(y)] for x, y in curve if _finite(x) and _finite(y)]
    stop = training.get("stop_reason")
    total = training.get("steps") if _finite(training.get("steps")) else None
    return {"converged": converged(curve, mode, stop_reason=stop, steps=total), "stop_reason": stop,
            "select_by": select_by, "mode": mode, "curve": curve}


def draw_curves(out: Path, doc: dict[str, Any]) -> None:
    """``comparison_curves.png``: each model's validation curves; a failure here never loses the tables."""
    png = out / "comparison_curves.png"
    try:
        from pyroseg.plots import comparison_curves

        comparison_curves(doc, png)
    except Exception as e:
        log.warning("could not draw %s: %s", png, e)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _train(cfg: FitConfig, callbacks: FitCallbacks | None, overwrite: bool, pictures: bool) -> None:
    """Train the run ``cfg.out`` unless it is finished; resume it when it has a checkpoint."""
    run = Path(cfg.out)
    state = run_state(run, cfg.epochs, cfg.max_steps)
    if state in ("finished", "partial") and not overwrite:
        saved = FitConfig.from_dict(load_config_json(run / CONFIG)["fit"])
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


def run_state(run: str | Path, epochs: int, max_steps: int | None = None) -> str:
    """Whether the run folder ``run`` has trained its budget (``max_steps`` steps when given,
    else ``epochs`` epochs) or stopped on a plateau: ``finished``; ``partial`` (a checkpoint,
    less trained: resume it); or ``absent`` (nothing to resume)."""
    run = Path(run)
    if not (run / CHECKPOINT).exists() or not (run / CONFIG).exists():
        return "absent"
    record = read_training(run)
    if record is not None:  # training.json: what the run trained and why it stopped
        if record.get("stop_reason") == "plateau":
            return "finished"
        done = record.get("steps", 0) >= max_steps if max_steps is not None else record.get("epochs", 0) >= epochs
        return "finished" if done else "partial"
    try:  # not finished yet, or a run from before training.json: one metrics row per epoch unless --val-every
        per_epoch = json.loads((run / CONFIG).read_text())["fit"].get("val_every") is None
        done = len(read_metrics_csv(run / RUN_METRICS))
    except Exception:
        per_epoch, done = False, 0
    return "finished" if max_steps is None and per_epoch and done >= epochs else "partial"


def _evaluation(run: Path, cfg: FitConfig, num_samples: int, *, fresh: bool) -> dict[str, Any]:
    """The run's test report: ``run/evaluation.json`` when it matches (same samples,
    seed, epochs and point prediction: the model's own), otherwise evaluated now and written there."""
    history = read_metrics_csv(run / RUN_METRICS)
    cached = run / EVALUATION
    if cached.is_file() and not fresh:
        try:
            report = json.loads(cached.read_text())
            rows = report.get("history_rows", report.get("epochs_trained"))  # older caches: one row per epoch
            point = resolve_model(cfg.model).point_prediction
            if (report.get("num_samples_asked") == num_samples and report.get("seed") == cfg.seed and rows == len(history)
                    and report.get("point", "mean") == point):  # older caches: the mean of the samples
                return report
        except (OSError, ValueError):
            pass
    report = evaluate_run(run, num_samples=num_samples, device=cfg.device, seed=cfg.seed, per_patient=True)
    report["num_samples_asked"] = num_samples
    report["history_rows"] = len(history)
    epochs = float(history[-1]["epoch"]) if history else 0.0  # epochs trained (fractional after a step budget)
    report["sec_per_epoch"] = sum(r["train_time_s"] for r in history) / epochs if epochs > 0 else float("nan")
    report["collapsed_sites"] = collapsed_sites(report)
    report["run"] = str(run)
    atomic_write_text(cached, json.dumps(report, indent=2) + "\n")
    return report


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
