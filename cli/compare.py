"""``pyroseg compare``: train every model under one protocol and tabulate them."""

from __future__ import annotations

import click

from cli.common import CONTEXT, handle_errors
from cli.fit import BarCallbacks
from pyroseg.config import FitConfig

_D = FitConfig()


@click.command("compare", context_settings=CONTEXT)
@click.option("--data", default=_D.data, show_default=True, help="'synthetic', 'synthetic-ambiguous' or an LGG folder.")
@click.option("--image-size", type=int, default=_D.image_size, show_default=True)
@click.option("--epochs", type=int, default=_D.epochs, show_default=True)
@click.option("--batch-size", type=int, default=_D.batch_size, show_default=True)
@click.option("--lr", type=float, default=_D.lr, show_default=True)
@click.option("--seed", type=int, default=_D.seed, show_default=True)
@click.option("--device", default=_D.device, show_default=True)
@click.option("--beta-warmup", type=float, default=None, help="KL warm-up epochs [default: a quarter of --epochs].")
@click.option("--models", default=None,
              help="Comma-separated models to compare: built-in names, import paths package.module:Class or entry "
                   "points [default: every built-in model].")
@click.option("--num-samples", type=int, default=16, show_default=True, help="Samples per image at evaluation.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the runs and the tables.")
@click.option("--overwrite", is_flag=True, help="Retrain models whose runs already exist in --out.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@handle_errors
def compare_cmd(data, image_size, epochs, batch_size, lr, seed, device, beta_warmup, models, num_samples, out,
                overwrite, cache_dir, quiet):
    """Train the models with identical data, split, epochs and seed; write comparison.md/.json."""
    from pyroseg.compare import compare_models

    base = FitConfig(data=data, image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                     device=device, beta_warmup=beta_warmup, cache_dir=cache_dir)

    def announce(name, i, n):
        click.echo(f"[{i + 1}/{n}] {name}", err=True)

    compare_models(base, out, models=[m.strip() for m in models.split(",") if m.strip()] if models else None, num_samples=num_samples,
                   overwrite=overwrite, callbacks=BarCallbacks(quiet), on_model=announce)
    click.echo(open(f"{out}/comparison.md").read())
    click.echo(f"wrote {out}/comparison.md and {out}/comparison.json")
