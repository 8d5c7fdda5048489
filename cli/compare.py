"""``pyroseg compare``: train every model under one protocol, over seeds, and tabulate them with intervals."""

from __future__ import annotations

import shlex
import sys

import click
from pyroseg.cli.common import CONTEXT, handle_errors
from pyroseg.cli.fit import BarCallbacks
from pyroseg.cli.options import config_options, read_options

from pyroseg.config import FitConfig, read_option
from pyroseg.config import config_options as fit_options
from pyroseg.errors import UsageError

#: The options of ``fit`` that ``compare`` shares (the protocol every model is trained under).
SHARED = ("data", "image_size", "epochs", "batch_size", "lr", "seed", "device", "beta_warmup", "cache_dir")
#: The ``fit`` options that change results and that ``compare`` passes on to every run (and records in
#: comparison.json's config): those of them this pyroseg's FitConfig has (the step budgets are newer).
PROTOCOL = tuple(name for name in (
    "augment", "raters", "lr_schedule", "lr_warmup", "beta", "objective", "geco_constraint", "geco_top_k", "geco_deterministic_top_k",
    "geco_update", "geco_kappa", "geco_alpha", "geco_rate", "geco_warmup", "geco_max_step", "free_bits", "select_by",
    "patience", "max_steps", "val_every", "max_minutes") if name in fit_options())


def parse_model_args(items) -> dict[str, dict]:
    """``--model-arg MODEL:KEY=VALUE`` (repeatable) as ``{model: {key: value}}`` (values read as by ``fit --model-arg``)."""
    out: dict[str, dict] = {}
    for item in items or ():
        model, sep, kv = item.partition(":")
        if not sep or not model.strip():
            raise UsageError(f"--model-arg {item!r}: expected MODEL:KEY=VALUE, e.g. vae:latent_dim=16")
        out.setdefault(model.strip(), {}).update(read_option("model_args", (kv,)))
    return out


def parse_caveats(items) -> dict[str, str]:
    """``--caveat MODEL:TEXT`` (repeatable) as ``{model: text}``."""
    out: dict[str, str] = {}
    for item in items or ():
        model, sep, text = item.partition(":")
        if not sep or not model.strip() or not text.strip():
            raise UsageError(f"--caveat {item!r}: expected MODEL:TEXT, e.g. 'ssn:stopped on an oscillation'")
        out[model.strip()] = text.strip()
    return out


@click.command("compare", context_settings=CONTEXT)
@config_options(*SHARED, *PROTOCOL, help={"seed": "First seed; the data and split seed."})
@click.option("--model-arg", "model_arg", multiple=True, metavar="MODEL:KEY=VALUE",
              help="A hyper-parameter of one model, e.g. vae:latent_dim=16 (repeatable).")
@click.option("--caveat", "caveat", multiple=True, metavar="MODEL:TEXT",
              help="A reader's warning on one model's row, e.g. 'ssn:stopped on an oscillation, not a plateau' "
                   "(repeatable): recorded in comparison.json and marked in every table made from it.")
@click.option("--seeds", type=int, default=1, show_default=True,
              help="Train each model this many times (seeds --seed, --seed+1, ...); 3 or more for a claim.")
@click.option("--folds", type=int, default=1, show_default=True,
              help="Cross-validate by patient: deal the patients into this many parts, train once per part testing on "
                   "it (every patient tested once per seed); 1: one train/val/test split.")
@click.option("--vary-split", is_flag=True, help="Redraw the patient split (and synthetic data) with each seed.")
@click.option("--baseline", default="unet", show_default=True, help="The model every other is compared with.")
@click.option("--models", default=None,
              help="Comma-separated models to compare: built-in names (`pyroseg models` lists them), import paths "
                   "package.module:Class or entry points [default: every built-in model].")
@click.option("--num-samples", type=int, default=16, show_default=True, help="Samples per image at evaluation.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Folder for the runs and the tables.")
@click.option("--overwrite", is_flag=True, help="Retrain models whose runs already exist in --out.")
@click.option("--render", "render_dir", type=click.Path(file_okay=False), default=None,
              help="Only print the Markdown tables of RESULTS_DIR/comparison.json (no training).")
@click.option("--columns", default=None,
              help="With --render: only a short table of these metrics (comma-separated keys, e.g. "
                   "dice_tumour,ged,hm_iou) and each model's verdicts against --baseline.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@handle_errors
def compare_cmd(model_arg, caveat, seeds, folds, vary_split, baseline, models, num_samples, out, overwrite, render_dir, columns, quiet,
                **options):
    """Train the models with identical data, split and epochs, --seeds times each; write comparison.md/.csv/.json/.png.

    Run it again with the same options to pick up an interrupted comparison.
    """
    from pyroseg.compare import compare_models, render_results

    if render_dir is not None:
        cols = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
        click.echo(render_results(render_dir, cols), nl=False)
        return
    if out is None:
        raise UsageError("--out: required (a folder for the runs and the tables), or --render RESULTS_DIR")
    base = FitConfig(**read_options(options))

    def announce(label, i, n):
        click.echo(f"[{i + 1}/{n}] {label}", err=True)

    names = [m.strip() for m in models.split(",") if m.strip()] if models else None
    compare_models(base, out, models=names, seeds=seeds, folds=folds, model_args=parse_model_args(model_arg),
                   vary_split=vary_split, baseline=baseline,
                   num_samples=num_samples, overwrite=overwrite, callbacks=BarCallbacks(quiet), on_model=announce,
                   caveats=parse_caveats(caveat),
                   command="pyroseg " + shlex.join(sys.argv[1:]))
    click.echo(open(f"{out}/comparison.md").read())
    click.echo(f"wrote {out}/comparison.md, .csv, .json, comparison.png and comparison_curves.png")
