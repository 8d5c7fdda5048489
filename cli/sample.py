"""``pyroseg sample``: draw masks for images on disk, or for slices of the run's own data."""

from __future__ import annotations

import click
from pyroseg.cli.common import CHECKPOINTS, CONTEXT, EVAL_SPLITS, LoadBar, handle_errors

from pyroseg.errors import UsageError


@click.command("sample", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--input", "inputs", default=None, type=click.Path(), help="An image, or a folder of images.")
@click.option("--split", type=click.Choice(EVAL_SPLITS), default=None,
              help="Instead of --input: slices of the run's own data from these patients, with every annotator's mask.")
@click.option("--num-images", type=int, default=4, show_default=True, help="With --split: how many slices (lesion slices first).")
@click.option("--num-samples", type=int, default=16, show_default=True, help="Masks to draw per image.")
@click.option("--tta", is_flag=True, help="Draw the samples over the four flips of each image (test-time augmentation).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the PNGs.")
@click.option("--device", default="auto", show_default=True)
@click.option("--checkpoint", type=click.Choice(CHECKPOINTS), default=None,
              help="Weights to sample from: best (best.pt) or last (checkpoint.pt) [default: best when the run has one].")
@handle_errors
def sample_cmd(run_dir, inputs, split, num_images, num_samples, tta, out, device, checkpoint):
    """Write every sampled mask, the mean probability, the uncertainty (std) and a grid per image."""
    from pyroseg.sampling import sample_images, sample_split

    if (inputs is None) == (split is None):
        raise UsageError("--input or --split: give exactly one (images on disk, or slices of the run's own data)")
    if split is not None:
        records = sample_split(run_dir, split, out, num_images=num_images, num_samples=num_samples, device=device, checkpoint=checkpoint, tta=tta)
    else:
        bar = LoadBar("sampling", unit="image")
        records = sample_images(run_dir, inputs, out, num_samples=num_samples, device=device, progress=bar, checkpoint=checkpoint, tta=tta)
        bar.close()
    for r in records:
        extra = f" (Dice of the mean vs truth {r['dice_mean']:.3f})" if "dice_mean" in r else ""
        if "ged" in r:
            extra += f" GED {r['ged']:.3f}, HM-IoU {r['hm_iou']:.3f}"
        click.echo(f"{r['input']}: {r['num_samples']} samples{extra}")
    if records:
        click.echo(f"weights: {records[0]['checkpoint']}")
    click.echo(f"wrote {sum(len(r['files']) for r in records)} files to {out} (see *_grid.png)")
