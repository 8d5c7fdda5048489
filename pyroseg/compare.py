"""Train every model under one protocol and tabulate them: ``pyroseg compare``.

Same data, same patient split, same epochs, batch size, learning rate and
seed for every model; each is scored on the test patients with
:func:`pyroseg.evaluate.evaluate_run`. The table goes to ``comparison.md`` and
``comparison.json`` in the output folder, and each model's run folder sits
beside them, so every number can be traced to its config and weights.
``comparison_reliability.png`` holds every model's reliability curve.

On ``synthetic-ambiguous`` data the table ends with an ``oracle`` row: the
true annotator distribution scored by the same metrics on the same test
slices (:func:`pyroseg.evaluate.evaluate_oracle`), what a perfect model gets;
and ``oracle (one mask)``: the true marginal thresholded at 0.5, what a
perfect deterministic model (an ideal U-Net) gets. On other multi-rater data
(QUBIQ, LIDC) the rows are ``raters (leave one out)`` (the human level) and
``majority vote`` (:func:`pyroseg.evaluate.evaluate_reference`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pyroseg.checkpoint import atomic_write_text
from pyroseg.config import FitConfig, versions
from pyroseg.errors import UsageError
from pyroseg.evaluate import ORACLE, RATERS_LOO, evaluate_run, evaluate_run_references
from pyroseg.models import MODELS, resolve_model
from pyroseg.runs import read_metrics_csv
from pyroseg.train import FitCallbacks, fit

__all__ = ["compare_models", "comparison_markdown", "collapsed_sites", "COLUMNS"]

log = logging.getLogger(__name__)

#: (key, header) of the table, in order.
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

#: A latent site whose mean KL on the test patients is below this many nats per
#: image carries (almost) no information: posterior collapse.
COLLAPSE_NATS = 0.1
#: ... and one whose posterior means do not move with the input (0 active units)
#: and whose replacement by its prior mean changes the prediction by less than this
#: (1 - Dice between the two predictions) is switched off, whatever its KL.
COLLAPSE_EFFECT = 0.01


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


def compare_models(
    base: FitConfig,
    out: str | Path,
    *,
    models: Sequence[str] | None = None,
    num_samples: int = 16,
    overwrite: bool = False,
    callbacks: FitCallbacks | None = None,
    on_model: Callable[[str, int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``models`` (default: all) with ``base`` (its ``model`` and ``out``
    are replaced), evaluate each on the test split and write the tables.

    A model whose run folder already holds a finished run (same epochs) is
    evaluated, not retrained, so an interrupted comparison can be rerun.
    """
    models = list(models or MODELS)
    unknown = [m for m in models if not _known(m)]
    if unknown:
        raise UsageError(f"--models {','.join(unknown)}: unknown; expected some of {', '.join(MODELS)}, "
                         "import paths package.module:Class or entry points")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = replace(base)
    base.validate()  # resolves beta_warmup once, for every model alike
    rows = []
    for i, name in enumerate(models):
        if on_model:
            on_model(name, i, len(models))
        cfg = replace(base, model=name, out=str(out / _folder(name)))
        run = Path(cfg.out)
        if _finished(run, cfg.epochs) and not overwrite:
            log.info("%s: finished run found in %s, evaluating it", name, run)
        else:
            fit(cfg, callbacks=callbacks, overwrite=overwrite or run.exists())
        report = evaluate_run(run, num_samples=num_samples, device=cfg.device, seed=base.seed)
        history = read_metrics_csv(run / "metrics.csv")
        report["sec_per_epoch"] = sum(r["train_time_s"] for r in history) / len(history)
        report["collapsed_sites"] = collapsed_sites(report)
        rows.append(report)
        _write(out, base, rows, num_samples)
    if rows:  # the data's references (oracle rows on synthetic-ambiguous, raters / majority on QUBIQ, LIDC)
        refs = evaluate_run_references(out / _folder(models[0]), num_samples=num_samples, sample_seed=base.seed)
        if refs:
            rows.extend(refs)
            _write(out, base, rows, num_samples)
    _reliability(out, rows, num_samples)
    return rows


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


def _finished(run: Path, epochs: int) -> bool:
    try:
        return len(read_metrics_csv(run / "metrics.csv")) >= epochs and (run / "checkpoint.pt").exists()
    except Exception:
        return False


def comparison_markdown(rows: list[dict[str, Any]], *, title: str = "") -> str:
    """The Markdown table of :func:`compare_models`' rows."""

    def cell(v):
        if isinstance(v, float):
            if 0 < abs(v) < 0.01:  # small values (ECE) keep a significant digit
                return f"{v:.4f}"
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        if isinstance(v, int) and v > 10000:
            return f"{v:,}"
        return str(v)

    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(h for _, h in COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(k, "")) for k, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _write(out: Path, base: FitConfig, rows: list[dict], num_samples: int) -> None:
    first = rows[0]
    title = (
        f"{first['data']}, {first['image_size']}x{first['image_size']}, test patients "
        f"({first['n_patients']} patients, {first['n_slices']} slices), {base.epochs} epochs, "
        f"point prediction = mean of {num_samples} samples"
    )
    md = comparison_markdown(rows, title=title)
    md += (
        f"\nProtocol: split by patient (seed {base.seed}, val {base.val_fraction}, test {base.test_fraction}), "
        "no augmentation of test data; test-time z from q(z|x) (vae, skip_vae, hvae) or the prior net "
        "(prob_unet, hprob_unet). "
        f"'collapsed sites': latent sites whose mean test KL is below {COLLAPSE_NATS} nats / image, or with 0 "
        f"active units whose replacement by the prior mean changes the prediction by less than {COLLAPSE_EFFECT} "
        "(1 - Dice). "
        f"GED (d = 1 - IoU; all pairs, the published estimator; 'unbiased': distinct pairs only), HM-IoU "
        f"(Hungarian-matched IoU) and diversity (mean 1 - IoU between distinct samples) score the "
        f"{num_samples} thresholded samples per slice against all {first.get('n_annotators', 1)} annotator(s), "
        "averaged over every test slice; ECE: 10 equal-width bins of the per-pixel mean probability, every pixel, "
        "against the fraction of annotators marking it; 'lesion region': only the pixels some annotator marks or "
        "given a mean probability >= 0.05."
        + (" 'oracle': samples of the true annotator distribution; 'oracle (one mask)': the best deterministic "
           "model, the true per-pixel marginal (its probability) thresholded at 0.5 (its one sample)."
           if any(r["model"] == ORACLE for r in rows) else "")
        + (" QUBIQ score: raters' mean and the mean prediction thresholded at 0.1..0.9, Dice averaged; "
           "'raters (leave one out)': each rater scored against the others (the human level); 'majority vote': "
           "the mask at least half of the raters mark, as a deterministic prediction."
           if any(r["model"] == RATERS_LOO for r in rows) else "")
        + "\n"
    )
    atomic_write_text(out / "comparison.md", md)
    doc = {"config": base.to_dict(), "num_samples": num_samples, "versions": versions(), "rows": rows}
    atomic_write_text(out / "comparison.json", json.dumps(doc, indent=2) + "\n")


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
