"""``pyroseg models``: the models ``--model`` accepts, built in and installed."""

from __future__ import annotations

import click
from pyroseg.cli.common import CONTEXT, format_table, handle_errors


@click.command("models", context_settings=CONTEXT)
@handle_errors
def models_cmd():
    """List the built-in models and those that installed packages offer (entry points of the
    group pyroseg.models). Any other SegModel is given to --model as an import path package.module:Class."""
    from importlib.metadata import entry_points

    from pyroseg.models import ENTRY_POINT_GROUP, MODELS

    rows = [{"--model": name, "latent sites": ", ".join(cls.latent_sites) or "-", "test-time z": cls.sample_from,
             "class": f"{cls.__module__}:{cls.__qualname__}"} for name, cls in MODELS.items()]
    click.echo(format_table(rows))
    eps = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
    if eps:
        click.echo(f"\ninstalled ({ENTRY_POINT_GROUP} entry points):")
        click.echo(format_table([{"--model": ep.name, "class": ep.value} for ep in eps]))
