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
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

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
from pyroseg.comparison_stats import METRICS, NOT_BY_PATIENT, REFERENCES, summarise
from pyroseg.config import FitConfig, load_config_json, versions
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
    at_least_one("--seeds", seeds)
    at_least_one("--num-samples", num_samples)
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
        write_comparison(out, summarise(doc), figure=False)  # the tables so far: a stopped compare still has them
    # the data's references on the same test slices (oracle rows on synthetic-ambiguous, one rater against
    # the others and the majority vote on QUBIQ, LIDC), per seed: with --vary-split the slices differ
    for s in seed_list:
        for row in evaluate_run_references(out / _folder(models[0]) / f"seed{s}", num_samples=num_samples, sample_seed=s):
            doc["runs"].append({**row, "seed": s})
    doc = summarise(doc)
    write_comparison(out, doc)
    draw_reliability(out, [r for r in doc["runs"] if r["seed"] == seed_list[0]], num_samples)
    return doc


def _train(cfg: FitConfig, callbacks: FitCallbacks | None, overwrite: bool, pictures: bool) -> None:
    """Train the run ``cfg.out`` unless it is finished; resume it when it has a checkpoint."""
    run = Path(cfg.out)
    state = run_state(run, cfg.epochs)
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


def run_state(run: str | Path, epochs: int) -> str:
    """Whether the run folder ``run`` has trained ``epochs`` epochs: ``finished``, ``partial``
    (a checkpoint, fewer epochs), or ``absent`` (nothing to resume)."""
    run = Path(run)
    if not (run / CHECKPOINT).exists() or not (run / CONFIG).exists():
        return "absent"
    try:
        done = len(read_metrics_csv(run / RUN_METRICS))
    except Exception:
        done = 0
    return "finished" if done >= epochs else "partial"


def _evaluation(run: Path, cfg: FitConfig, num_samples: int, *, fresh: bool) -> dict[str, Any]:
    """The run's test report: ``run/evaluation.json`` when it matches (same samples,
    seed and epochs), otherwise evaluated now and written there."""
    history = read_metrics_csv(run / RUN_METRICS)
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
