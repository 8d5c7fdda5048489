"""``pyroseg inspect``: what a data source holds, before training on it."""

from __future__ import annotations

import click
from pyroseg.cli.common import CONTEXT, LoadBar, handle_errors


@click.command("inspect", context_settings=CONTEXT)
@click.argument("data", default="synthetic")
@click.option("--image-size", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of a synthetic source.")
@click.option("--preview", type=click.Path(dir_okay=False), default=None, help="Write a PNG of a few slices with their masks.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None)
@click.option("--task", default=None, help="QUBIQ: the task (task01, ...) when the cases hold several.")
@click.option("--slice-axis", type=int, default=-1, show_default=True, help="QUBIQ: the axis 3-D volumes are sliced along.")
@handle_errors
def inspect_cmd(data, image_size, seed, preview, cache_dir, task, slice_axis):
    """Load DATA ('synthetic', 'synthetic-ambiguous', an LGG or QUBIQ folder, a LIDC pickle), check it,
    print its counts (and, with several raters, how many per case and how much they agree)."""
    from pyroseg.data import load_source
    from pyroseg.nets import check_image_size

    check_image_size(image_size, 1, min_bottleneck=8)
    bar = LoadBar("decoding data")
    d = load_source(data, image_size, seed=seed, cache_dir=cache_dir, progress=bar, task=task, slice_axis=slice_axis)
    bar.close()
    for k, v in d.summary().items():
        click.echo(f"{k:>22}: {v}")
    per_patient = {}
    for p in d.patients.tolist():
        per_patient[p] = per_patient.get(p, 0) + 1
    counts = sorted(per_patient.values())
    click.echo(f"{'slices per patient':>22}: min {counts[0]}, median {counts[len(counts) // 2]}, max {counts[-1]}")
    if d.num_annotators > 1:
        from pyroseg.data.raters import disagreement_scales, rater_agreement

        stats = rater_agreement(d)
        per_case = ", ".join(f"{n} raters: {k} case(s)" for n, k in stats["raters_per_case"].items())
        click.echo(f"{'raters per case':>22}: {per_case}")
        click.echo(f"{'mean pairwise IoU':>22}: {stats['pairwise_iou']:.3f} over all slices, "
                   f"{stats['pairwise_iou_marked']:.3f} over the {stats['marked_slices']} slices some rater marks")
        click.echo(f"{'lesion px per rater':>22}: " + ", ".join(f"{v:.4f}" for v in stats["lesion_fraction_per_rater"]))
        where = disagreement_scales(d)
        if where["slices"]:
            click.echo(f"{'where they disagree':>22}: one level of the raters' mean explains {where['global_level']:.2f} of a "
                       f"rater's departure from the majority (1: nested, global; 0: local); cells with disagreement, "
                       f"median: {where['cells_8']:.0f} of 8x8, {where['cells_4']:.0f} of 4x4, {where['cells_2']:.0f} of 2x2")
    if preview:
        import numpy as np

        from pyroseg.plots import sample_grid

        has = np.flatnonzero(d.masks[:, 0].reshape(len(d), -1).any(1))
        pick = list(has[:: max(1, len(has) // 6)][:6]) if len(has) else list(range(min(6, len(d))))
        rows = [{"image": d.images[i] / 255.0, "samples": d.masks[i, : d.rater_counts[i]].astype(float),
                 "truth": d.masks[i, : d.rater_counts[i]],
                 "name": f"{d.patients[i]} #{d.slice_numbers[i]}"} for i in pick]
        # every rater as a ground truth; their mean and std as the "mean prob." and "uncertainty" columns
        sample_grid(rows, preview, max_samples=0, title=f"{data} at {image_size}x{image_size}")
        click.echo(f"wrote {preview}")
