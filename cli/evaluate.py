"""``pyroseg evaluate``: score a run on held-out patients."""

from __future__ import annotations

from pathlib import Path

import click
from pyroseg.cli.common import CHECKPOINTS, CONTEXT, EVAL_SPLITS, LoadBar, format_table, handle_errors

from pyroseg.config import POINTS
from pyroseg.errors import UsageError

_SHOWN = ["dice_all", "dice_tumour", "dice_volume", "iou_tumour", "bce", "false_positive_slices", "empty_slices", "elbo", "nll",
          "dice_tumour_posterior"]
_DISTRIBUTION = ["ged", "ged_unbiased", "hm_iou", "sample_diversity", "ece", "ece_lesion", "qubiq", "dice_raters", "dice_majority"]


@click.command("evaluate", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--data", default=None, help="Evaluate on this dataset instead (same layout; resized to the run's size).")
@click.option("--split", type=click.Choice(EVAL_SPLITS), default=None,
              help="Which patients [default: test; 'all' with --data].")
@click.option("--num-samples", type=int, default=16, show_default=True,
              help="Samples per image: averaged into the point prediction, and the set scored by GED / HM-IoU.")
@click.option("--collapse-samples", type=int, default=8, show_default=True,
              help="Samples per point prediction for the per-site collapse diagnostics (0: skip them).")
@click.option("--point", type=click.Choice(POINTS), default="auto", show_default=True,
              help="The point prediction scored by Dice, IoU, BCE, ECE and the QUBIQ score: auto (the model's own: "
                   "mean-z for ssn, whose published code predicts from its logits' mean; mean for the others), mean (of the samples' "
                   "probabilities, thresholded at 0.5), majority (pixels marked by at least half of the samples) or "
                   "mean-z (every latent at its test-time mean: the prior's, q(z|x)'s; MC dropout without dropout). "
                   "GED and the other distribution metrics score the samples either way.")
@click.option("--oracle", is_flag=True,
              help="Also score the references on the same slices: the true mask distribution and its best single "
                   "mask (synthetic-ambiguous), or one rater against the others and the majority-vote mask "
                   "(QUBIQ, LIDC: any data with several raters).")
@click.option("--tta", is_flag=True,
              help="Test-time augmentation: draw the samples over the four flips of each image "
                   "(a deterministic model then has four).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling, so a rerun gives the same numbers.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the report here, and the reliability diagram beside it (<stem>_reliability.png).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None)
@click.option("--checkpoint", type=click.Choice(CHECKPOINTS), default=None,
              help="Weights to score: best (best.pt, the best validation epoch) or last (checkpoint.pt) "
                   "[default: best when the run has a best.pt, else last].")
@handle_errors
def evaluate_cmd(run_dir, data, split, num_samples, collapse_samples, point, oracle, tta, seed, batch_size, device, json_path,
                 cache_dir, checkpoint):
    """Print Dice (per slice, tumour slices, per patient), IoU, BCE and the ELBO of RUN_DIR, how well its
    samples match the annotators (GED, Hungarian-matched IoU, sample diversity, calibration (ECE)), and
    per latent site whether it collapsed (KL, active units, effect)."""
    from pyroseg.evaluate import ORACLE, evaluate_run, reliability_png_for
    from pyroseg.runs import write_json

    if collapse_samples < 0:
        raise UsageError(f"--collapse-samples {collapse_samples}: expected >= 0")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: expected at least 1")
    if json_path and not Path(json_path).resolve().parent.is_dir():
        raise UsageError(f"--json {json_path}: its folder does not exist")
    bar = LoadBar("decoding data")
    report = evaluate_run(run_dir, data=data, split=split, num_samples=num_samples, batch_size=batch_size,
                          device=device, cache_dir=cache_dir, progress=bar, oracle=oracle, seed=seed, oracle_seed=seed,
                          reliability_png=reliability_png_for(json_path) if json_path else None,
                          collapse_samples=collapse_samples, checkpoint=checkpoint, tta=tta, point=point)
    bar.close()
    click.echo(f"{report['model']} on {report['data']} [{report['split']}]: {report['n_patients']} patients, "
               f"{report['n_slices']} slices, {report['n_annotators']} annotator(s), "
               f"{report['num_samples']} sample(s), z from {report['z_from']}, point prediction: {report['point']}")
    click.echo(f"weights: {report['checkpoint']}")
    click.echo(format_table([{k: report[k] for k in _SHOWN if k in report}]))
    kl = {k: v for k, v in report.items() if k.startswith("kl_")}
    if kl:
        click.echo("KL per latent site (nats / image): " + ", ".join(f"{k[3:]} {v:.3f}" for k, v in kl.items()))
    sites = [k[3:] for k in report if k.startswith("au_")]
    if sites:
        click.echo("active units (Cov_x E_q[z_u] > 0.01): " + ", ".join(f"{s} {report['au_' + s]}/{report['units_' + s]}" for s in sites))
        click.echo("site at its prior mean, change of dice_all / 1 - Dice(prediction, changed): " + ", ".join(
            f"{s} {report['dice_change_' + s]:+.3f} / {report['effect_' + s]:.3f}" for s in sites))
    rows = [{"": report["model"], **{k: report[k] for k in _DISTRIBUTION}}]
    for name in report.get("references", []):
        label = f"{name} ({report[name]['num_samples']} samples)" if name == ORACLE else name
        rows.append({"": label, **{k: report[name][k] for k in _DISTRIBUTION}})
    click.echo("Against all annotators (GED: lower is better; HM-IoU, QUBIQ score, Dice: higher):")
    click.echo(format_table(rows))
    if json_path:
        try:
            write_json(json_path, report)
        except OSError as e:
            raise UsageError(f"--json {json_path}: cannot write ({e.strerror or e})") from None
        click.echo(f"wrote {json_path} and {report['reliability_png']}")
