"""``pyroseg`` commands. Each parses its options and calls one library function.

Errors the library raises on purpose (:class:`pyroseg.errors.PyrosegError`)
are shown as one line, ``Error: ...``, with exit status 2 for a bad option and
1 for a failure while running; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import logging

import click
from pyroseg.cli.common import CONTEXT

# No torch, Pyro or matplotlib here nor at the top of any cli module: help,
# --version and option errors answer at once; each command imports what it needs.


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="pyroseg")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(debug: bool, verbose: int) -> None:
    """Generative (probabilistic) segmentation of MRI slices with Pyro.

    Train with `pyroseg fit`, score with `pyroseg evaluate`, draw masks with
    `pyroseg sample`. The default data is a built-in synthetic set, so every
    command runs with no download.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


from pyroseg.cli.compare import compare_cmd  # noqa: E402
from pyroseg.cli.data import inspect_cmd  # noqa: E402
from pyroseg.cli.ensemble import ensemble_cmd  # noqa: E402
from pyroseg.cli.evaluate import evaluate_cmd  # noqa: E402
from pyroseg.cli.fit import fit_cmd  # noqa: E402
from pyroseg.cli.models import models_cmd  # noqa: E402
from pyroseg.cli.plot import plot_cmd  # noqa: E402
from pyroseg.cli.sample import sample_cmd  # noqa: E402

for _cmd in (fit_cmd, evaluate_cmd, sample_cmd, compare_cmd, inspect_cmd, plot_cmd, ensemble_cmd, models_cmd):
    cli.add_command(_cmd)


def main() -> None:
    cli(prog_name="pyroseg")


if __name__ == "__main__":
    main()
