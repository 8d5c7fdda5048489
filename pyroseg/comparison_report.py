"""The tables of a comparison, made from its ``comparison.json`` document alone.

``comparison.md`` (:func:`render_markdown`: the wide table of means, then per metric
the intervals and the paired differences from the baseline, then the protocol),
the short table the README shows (:func:`render_summary`), ``comparison.csv``
(:func:`comparison_csv`: one row per model and metric) and :func:`render_results`,
what ``pyroseg compare --render DIR`` prints. Everything here reads the document
only, so any table in the docs can be regenerated from its results file, on any
machine: titles name the data set (:func:`data_name`), not the path it was read from.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Any

from pyroseg.checkpoint import atomic_write_text
from pyroseg.collapse import COLLAPSE_EFFECT, COLLAPSE_NATS
from pyroseg.comparison_stats import CONVERGED_ABS, CONVERGED_REL, CONVERGED_TAIL, METRICS, NO_DIFFERENCE, REFERENCES
from pyroseg.data.synthetic import SOURCES as SYNTHETIC_SOURCES
from pyroseg.errors import UsageError
from pyroseg.references import ORACLE, RATERS_LOO

__all__ = [
    "COLUMNS",
    "cell",
    "comparison_markdown",
    "comparison_csv",
    "comparison_json",
    "data_name",
    "draw_reliability",
    "render_markdown",
    "render_results",
    "render_summary",
    "shown_command",
    "write_comparison",
]

log = logging.getLogger(__name__)

#: (key, header) of the wide table of means, in order.
COLUMNS = [
    ("model", "model"),
    ("converged", "converged"),  # converged runs / runs (seeds x folds); see converged_cell
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

#: The task folders of the QUBIQ challenge (the last folder of a QUBIQ ``--data``).
QUBIQ_TASKS = ("brain-growth", "brain-tumor", "kidney", "prostate", "pancreas", "pancreatic-lesion")
_PICKLES = (".pickle", ".pkl")


def _budget(cfg: dict[str, Any]) -> str:
    """The training budget of the runs, as the title says it: ``20 epochs``, or (``--max-steps``)
    ``at most 3000 steps`` with the validation and patience that may stop them earlier."""
    if cfg.get("max_steps") is None:
        return f"{cfg['epochs']} epochs"
    out = f"at most {cfg['max_steps']} steps"
    if cfg.get("patience"):
        every = f"{cfg['val_every']} steps" if cfg.get("val_every") else "epoch"
        out += f" (stopping after {cfg['patience']} validations without gain, one every {every})"
    return out


def data_name(spec: str, config: dict[str, Any] | None = None) -> str:
    """The name of the data set ``spec`` (a ``--data`` value) for a title, from the spec
    alone: the results may have been made on another machine, whose paths mean nothing
    here. ``synthetic-ambiguous`` and the other built-in sources by their name; a pickle
    or a path with ``lidc`` in it: ``LIDC-IDRI crops``; a QUBIQ task folder (a path with
    ``qubiq`` in it, or named after a QUBIQ task): ``QUBIQ brain-growth`` (and the
    ``task`` of ``config``, a FitConfig dict, when it names one); a path with ``kaggle_3m``
    or ``lgg`` in it: ``LGG (kaggle_3m)``; anything else by its last folder's name."""
    spec = str(spec)
    if spec in SYNTHETIC_SOURCES:
        return spec
    parts = [p for p in PurePath(spec).parts if p.strip("/\\")]
    if parts and parts[-1] in ("Training", "Validation"):  # a QUBIQ task's half
        parts = parts[:-1]
    if not parts:
        return spec
    lower, last = [p.lower() for p in parts], parts[-1]
    if lower[-1].endswith(_PICKLES) or any("lidc" in p for p in lower):
        return "LIDC-IDRI crops"
    if lower[-1] in QUBIQ_TASKS or any("qubiq" in p for p in lower):
        task = (config or {}).get("task")
        return f"QUBIQ {last}" + (f" task {task}" if task is not None else "")
    if any("kaggle_3m" in p or "lgg" in p for p in lower):
        return "LGG (kaggle_3m)"
    return last


def shown_command(doc: dict[str, Any]) -> str:
    """The recorded command, its absolute ``--data`` path shortened to ``/path/to/<last folder>``
    (the path of the machine that made the results)."""
    command, spec = doc["command"], str(doc.get("config", {}).get("data") or "")
    if spec and spec not in SYNTHETIC_SOURCES and PurePath(spec).is_absolute() and PurePath(spec).name:
        command = command.replace(spec, f"/path/to/{PurePath(spec).name}")
    return command


def draw_reliability(out: Path, rows: list[dict], num_samples: int) -> None:
    """Every row's reliability curve in one diagram; a failure here never loses the tables."""
    try:
        from pyroseg.plots import reliability_diagram

        curves = {f"{r['model']} (ECE {r['ece']:.4f})": r["reliability"] for r in rows if "reliability" in r}
        if curves:
            first = rows[0]
            reliability_diagram(curves, out / "comparison_reliability.png",
                                title=f"{data_name(first['data'], None)}, test patients, mean of {num_samples} samples")
    except Exception as e:
        log.warning("could not draw %s: %s", out / "comparison_reliability.png", e)


def cell(v: Any) -> str:
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
        lines.append("| " + " | ".join(cell(r.get(k, "")) for k, _ in columns) + " |")
    return "\n".join(lines) + "\n"


#: Marks a model not converged in every run (the ``converged`` cell), explained under the table.
UNCONVERGED = "*"
#: Marks a model with a reader's caveat (``--caveat``), quoted under the table.
CAVEAT = "†"


def converged_cell(doc: dict[str, Any], name: str) -> str:
    """The ``converged`` cell of model ``name``: ``k/n`` of its runs (seeds x folds), with a trailing
    :data:`UNCONVERGED` when ``k < n``; ``?`` for a document that did not record it (made before it
    was), ``-`` for a reference row."""
    if name in REFERENCES:
        return "-"
    counts = (doc.get("converged") or {}).get(name)
    if not counts:
        return "?"
    k, n = counts
    return f"{k}/{n}" + (f" {UNCONVERGED}" if k < n else "") + (f" {CAVEAT}" if name in (doc.get("caveats") or {}) else "")


def _footnote(doc: dict[str, Any]) -> str:
    """The lines under a table: the readers' caveats, and the mark of unconverged models (empty
    when there is neither)."""
    lines = "".join(f"{CAVEAT} `{name}`: {text}\n" for name, text in (doc.get("caveats") or {}).items())
    if not any(k < n for k, n in (doc.get("converged") or {}).values()):
        return lines
    return lines + (f"\\{UNCONVERGED} not converged in every run: in some run the validation score still gained at least "
                    f"{round(CONVERGED_REL * 100)} % and {CONVERGED_ABS} in the last {round(CONVERGED_TAIL * 100)} % of training, "
                    "or there were too few validations to tell (comparison_curves.png); train longer before ranking it.\n")


def _mean_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model for :func:`comparison_markdown`: means over seeds, ``mean ± sd``
    where there are 2 or more seeds; per-seed strings (collapsed sites) joined by ``/``."""
    stats = {(r["model"], r["metric"]): r for r in doc["summary"]}
    rows = []
    for name in dict.fromkeys(r["model"] for r in doc["runs"]):
        runs = [r for r in doc["runs"] if r["model"] == name]
        row: dict[str, Any] = {"model": name, "converged": converged_cell(doc, name)}
        for key, _ in COLUMNS[2:]:
            st = stats.get((name, key))
            if st is not None:
                row[key] = st["mean"] if st["n"] < 2 else f"{cell(st['mean'])} ± {cell(st['sd'])}"
            elif key in runs[0]:
                vals = list(dict.fromkeys(str(cell(r.get(key, ""))) for r in runs))
                row[key] = runs[0][key] if len(vals) == 1 else "/".join(str(r.get(key, "")) for r in runs)
        rows.append(row)
    return rows


def _interval(d: dict) -> str:
    return "-" if math.isnan(d["lo"]) else f"[{cell(d['lo'])}, {cell(d['hi'])}]"


def _title(doc: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The first model's report, and the tables' title: data set (:func:`data_name`), size,
    test set, budget, seeds."""
    first = next(r for r in doc["runs"] if r["model"] not in REFERENCES)
    cfg, seeds = doc["config"], doc["seeds"]
    n, folds = len(seeds), doc.get("folds", 1)
    if folds > 1:  # every fold's test patients of the first model's first seed: all the patients
        tested = [r for r in doc["runs"] if r["model"] == first["model"] and r["seed"] == first["seed"]]
        test = (f"{folds}-fold cross-validation by patient ({sum(r['n_patients'] for r in tested)} patients, "
                f"{sum(r['n_slices'] for r in tested)} slices, each tested once per seed)")
    else:
        test = f"test patients ({first['n_patients']} patients, {first['n_slices']} slices)"
    return first, (
        f"{data_name(first['data'], cfg)}, {first['image_size']}x{first['image_size']}, {test}, {_budget(cfg)}, "
        f"{n} seed{'s' if n > 1 else ''} ({', '.join(map(str, seeds))}), "
        f"point prediction = {_points(doc)}"
    )


def _points(doc: dict[str, Any]) -> str:
    """The point prediction the Dice and other one-mask columns score: the mean of the samples,
    and the models that score their own (``point`` of their reports: :attr:`SegModel.point_prediction`)."""
    own = {r["model"]: r["point"] for r in doc["runs"]
           if r["model"] not in REFERENCES and r.get("point", "mean") != "mean"}
    words = {"mean-z": "the mask at its latents' mean", "majority": "the majority of its samples"}
    return f"mean of {doc['num_samples']} samples" + "".join(
        f"; {m}: {words.get(p, p)}" for m, p in own.items())


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
    cols = [("model", "model"), ("converged", "converged"), *((c, known[c]) for c in columns if c not in ("model", "converged")),
            ("verdict", f"vs `{doc['baseline']}`")]
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
    foot = _footnote(doc)
    return comparison_markdown(rows, title=title, columns=cols) + (f"\n{foot}" if foot else "")


def render_markdown(doc: dict[str, Any]) -> str:
    """``comparison.md`` made from a ``comparison.json`` document alone (so any table
    in the docs can be regenerated from its results file: ``pyroseg compare --render``)."""
    first, title = _title(doc)
    seeds = doc["seeds"]
    n = len(seeds)
    pct = f"{round(doc['level'] * 100)} %"
    md = comparison_markdown(_mean_rows(doc), title=title)
    folds = doc.get("folds", 1)
    md += (f"\nMeans over seeds{' ± standard deviation' if n > 1 else ''}"
           f"{f' (a seed: the mean over its {folds} folds)' if folds > 1 else ''}.\n")
    foot = _footnote(doc)
    md += f"\n{foot}" if foot else ""
    md += (f"\n#### Per metric: {pct} intervals and the paired difference from `{doc['baseline']}`\n\n"
           f"| metric | model | mean | sd | {pct} t-interval (seeds) | difference | {pct} paired t (seeds) | "
           f"{pct} paired t, jackknife (patients) | verdict |\n|---|---|---|---|---|---|---|---|---|\n")
    diffs = {(d["model"], d["metric"]): d for d in doc["differences"]}
    for metric in METRICS:
        for st in (s for s in doc["summary"] if s["metric"] == metric):
            d = diffs.get((st["model"], metric))
            tail = ("| - | - | - | reference |" if st["model"] == doc["baseline"] and metric not in NO_DIFFERENCE
                    else "| - | - | - | |" if d is None
                    else f"| {cell(d['diff'])} | {_interval(d['seeds'])} | {_interval(d['patients'])} | {d['verdict']} |")
            md += f"| {metric} | {st['model']} | {cell(st['mean'])} | {cell(st['sd'])} | {_interval(st)} {tail}\n"
    md += _protocol(doc, first)
    if doc.get("command"):
        md += f"\nCommand: `{shown_command(doc)}`. "
    else:
        md += "\n"
    v = doc["versions"]
    md += (f"Versions: pyroseg {v.get('pyroseg')}, torch {v.get('torch')}, pyro {v.get('pyro')}. "
           "Regenerate this table: `pyroseg compare --render RESULTS_DIR`.\n")
    return md


def comparison_csv(doc: dict[str, Any]) -> str:
    """One row per (model, metric): the summary over seeds, the difference from the baseline and
    the model's converged runs (``converged``/``runs``; empty where not recorded)."""
    diffs = {(d["model"], d["metric"]): d for d in doc["differences"]}
    conv = doc.get("converged", {})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "metric", "n_seeds", "mean", "sd", "ci_lo", "ci_hi", "values", "baseline", "diff",
                "diff_seeds_lo", "diff_seeds_hi", "diff_patients_n", "diff_patients_lo", "diff_patients_hi", "verdict",
                "converged", "runs"])
    for st in doc["summary"]:
        d = diffs.get((st["model"], st["metric"]))
        extra = ([doc["baseline"], d["diff"], d["seeds"]["lo"], d["seeds"]["hi"], d["patients"]["n"],
                  d["patients"]["lo"], d["patients"]["hi"], d["verdict"]] if d else [""] * 8)
        w.writerow([st["model"], st["metric"], st["n"], st["mean"], st["sd"], st["lo"], st["hi"],
                    " ".join(repr(v) for v in st["values"]), *extra, *conv.get(st["model"], ["", ""])])
    return buf.getvalue()


def _protocol(doc: dict[str, Any], first: dict[str, Any]) -> str:
    """The paragraph under the tables: split, intervals, verdicts and what each column means."""
    cfg, n, folds = doc["config"], len(doc["seeds"]), doc.get("folds", 1)
    pct = f"{round(doc['level'] * 100)} %"
    data_seed = cfg["data_seed"] if cfg.get("data_seed") is not None else cfg["seed"]
    redrawn = ", redrawn with each seed" if doc["vary_split"] else ", the same for every seed"
    split = (f"split by patient (data seed {data_seed}{redrawn}; val {cfg['val_fraction']}, test {cfg['test_fraction']})"
             if folds < 2 else
             f"{folds}-fold cross-validation by patient (data seed {data_seed}{redrawn}; each fold tests on one part "
             f"of the patients and trains on the others, validating on {cfg['val_fraction']} of all the patients "
             "drawn from them; every patient is tested once per seed)")
    converged = (f"'converged': the runs (seeds x folds) that stopped on a plateau or whose validation score "
                 f"gained less than {round(CONVERGED_REL * 100)} % (or {CONVERGED_ABS}) in the last "
                 f"{round(CONVERGED_TAIL * 100)} % of training ('?': not recorded). ")
    return (
        f"\nProtocol: {split}, no augmentation of test data; "
        "test-time z from q(z|x) (VAE family) or the prior net (Probabilistic U-Nets). "
        f"Intervals: {pct} Student-t over the {n} seeds (none with one seed). Differences from "
        f"`{doc['baseline']}`: paired by seed (t-interval of the per-seed differences: training-run noise) and "
        "paired by test patient (Student-t interval with a jackknife-over-patients standard error, each patient's slices pooled "
        f"over the seeds{' and folds' if folds > 1 else ''}: test-set noise). 'tie': either interval contains 0; 'better'/'worse' only when "
        "both exclude it (diversity has no better direction: 'higher'/'lower'); '(1 seed)': only the patient "
        "interval exists, training-run noise is not in it; '(not tested by patient)': only the seed interval "
        "exists (reports without per-patient scores for that metric). "
        + converged +
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


def comparison_json(doc: dict[str, Any]) -> str:
    """The text of ``comparison.json``: one line per field, and one per run, summary row and
    difference (a cross-validated comparison has hundreds of runs: indented, they tripled the file)."""
    def field(key: str, value: Any) -> str:
        if isinstance(value, list) and key in ("runs", "summary", "differences") and value:
            rows = ",\n".join("    " + json.dumps(v, separators=(",", ":")) for v in value)
            return f"  {json.dumps(key)}: [\n{rows}\n  ]"
        return f"  {json.dumps(key)}: {json.dumps(value)}"

    return "{\n" + ",\n".join(field(k, v) for k, v in doc.items()) + "\n}\n"


def write_comparison(out: Path, doc: dict[str, Any], *, figure: bool = True) -> None:
    """``comparison.json``, ``.md`` and ``.csv`` of ``doc`` in ``out``, and ``comparison.png``
    unless ``figure=False`` (a drawing that fails is a warning: it never loses the tables)."""
    atomic_write_text(out / "comparison.json", comparison_json(doc))
    atomic_write_text(out / "comparison.md", render_markdown(doc))
    atomic_write_text(out / "comparison.csv", comparison_csv(doc))
    if figure:
        png = out / "comparison.png"
        try:
            from pyroseg.plots import comparison_figure  # matplotlib only when a picture is drawn

            comparison_figure(doc, png, metrics=list(METRICS))
        except Exception as e:
            log.warning("could not draw %s: %s", png, e)


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
