"""``pyroseg plot``: draw a run's training curves, and what each latent site controls."""

from __future__ import annotations

from pathlib import Path

import click
from pyroseg.cli.common import CONTEXT, handle_errors


@click.command("plot", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="PNG to write [default: RUN_DIR/curves.png].")
@click.option("--latents", is_flag=True,
              help="Instead: samples with every latent site drawn, then with only one drawn and the others at "
                   "their mean [default --out: RUN_DIR/latent_scales.png].")
@click.option("--num-samples", type=int, default=6, show_default=True, help="With --latents: samples per row.")
@click.option("--images", "n_images", type=int, default=3, show_default=True, help="With --latents: validation slices shown.")
@click.option("--device", default="auto", show_default=True)
@handle_errors
def plot_cmd(run_dir, out, latents, num_samples, n_images, device):
    """Plot loss, reconstruction, KL and active units per latent site, beta, GECO lambda and validation Dice
    against epoch; with --latents, what each latent site controls."""
    if latents:
        from pyroseg.collapse import plot_latent_scales

        png = plot_latent_scales(run_dir, out, n_images=n_images, num_samples=num_samples, device=device)
    else:
        from pyroseg.plots import plot_curves

        png = plot_curves(Path(run_dir) / "metrics.csv", out or Path(run_dir) / "curves.png")
    click.echo(f"wrote {png}")
