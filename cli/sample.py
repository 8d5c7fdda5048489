"""``pyroseg sample``: draw masks for images on disk."""

from __future__ import annotations

import click

from cli.common import CONTEXT, LoadBar, handle_errors
from pyroseg.sampling import sample_images


@click.command("sample", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--input", "inputs", required=True, type=click.Path(), help="An image, or a folder of images.")
@click.option("--num-samples", type=int, default=16, show_default=True, help="Masks to draw per image.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the PNGs.")
@click.option("--device", default="auto", show_default=True)
@handle_errors
def sample_cmd(run_dir, inputs, num_samples, out, device):
    """Write every sampled mask, the mean probability, the uncertainty (std) and a grid per image."""
    bar = LoadBar("sampling")
    records = sample_images(run_dir, inputs, out, num_samples=num_samples, device=device, progress=bar)
    bar.close()
    for r in records:
        extra = f" (Dice of the mean vs truth {r['dice_mean']:.3f})" if "dice_mean" in r else ""
        click.echo(f"{r['input']}: {r['num_samples']} samples{extra}")
    click.echo(f"wrote {sum(len(r['files']) for r in records)} files to {out} (see *_grid.png)")
