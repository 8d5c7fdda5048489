"""``pyroseg plot``: draw a run's training curves."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import CONTEXT, handle_errors


@click.command("plot", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="PNG to write [default: RUN_DIR/curves.png].")
@handle_errors
def plot_cmd(run_dir, out):
    """Plot loss, reconstruction, KL per latent site, beta and validation Dice against epoch."""
    from pyroseg.plots import plot_curves

    png = plot_curves(Path(run_dir) / "metrics.csv", out or Path(run_dir) / "curves.png")
    click.echo(f"wrote {png}")
