"""``pyroseg ensemble``: join trained runs into one run folder (a deep ensemble)."""

from __future__ import annotations

import click
from pyroseg.cli.common import CONTEXT, handle_errors


@click.command("ensemble", context_settings=CONTEXT)
@click.argument("runs", nargs=-1, type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the joined run.")
@click.option("--overwrite", is_flag=True, help="Replace the run already in --out.")
@handle_errors
def ensemble_cmd(runs, out, overwrite):
    """Join RUNS (trained on the same data and split, e.g. with different --init-seed) into a deep
    ensemble in --out, which evaluate, sample and plot open as any run; its samples are the members'
    predictions."""
    from pyroseg.ensemble import join_runs

    doc = join_runs(list(runs), out, overwrite=overwrite)
    members = doc["model"]["hparams"]["members"]
    click.echo(f"wrote {out}: ensemble of {len(members)} ({', '.join(m['name'] for m in members)}), "
               f"{doc['model']['num_params']:,} parameters")
