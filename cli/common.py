"""What every command shares: error handling, progress bars, tables.

Nothing here (nor at the top of any ``cli`` module) imports torch, Pyro or
matplotlib: ``pyroseg --help``, ``--version`` and option errors answer at once,
and each command imports what it needs when it runs.

Progress: on a terminal, tqdm bars (per batch, per decoded slice); when
standard error is not a terminal (a file, a pipe, a cluster job's log), no bars
and one plain line per epoch (or per finished loading) with the same figures.
"""

from __future__ import annotations

import functools
import math
import sys
import time

import click

from pyroseg.errors import PyrosegError

__all__ = ["CONTEXT", "CHECKPOINTS", "EVAL_SPLITS", "handle_errors", "LoadBar", "format_table", "stderr_is_terminal"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

#: ``pyroseg.runs.EVAL_SPLITS``, repeated here so that ``--help`` need not
#: import the library (tests/test_cli.py checks that the two agree).
EVAL_SPLITS = ("test", "val", "train", "all")
#: ``pyroseg.runs.CHECKPOINTS``, likewise (tests/test_cli.py checks the copies agree).
CHECKPOINTS = ("best", "last")


def stderr_is_terminal() -> bool:
    """Whether progress bars make sense: standard error is an interactive terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def _fail(msg: str, code: int, *, mirrored: bool = False) -> None:
    """Print ``Error: msg`` and exit. Under torchrun the line names the rank, and an
    error that rank 0 raised and shared with the others (``mirrored``) is
    printed by rank 0 alone."""
    from pyroseg.distributed import env_rank, launched_by_torchrun

    rank, world = env_rank()
    if launched_by_torchrun():
        if mirrored and rank != 0:
            sys.exit(code)
        msg = f"[rank {rank}/{world}] {msg}"
    click.echo(f"Error: {msg}", err=True)
    sys.exit(code)


def handle_errors(fn):
    """Turn library errors into one line and an exit status; tracebacks only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except PyrosegError as e:
            if debug:
                raise
            _fail(str(e), e.exit_code, mirrored=getattr(e, "mirrored", False))
        except KeyboardInterrupt:
            _fail("interrupted; the last checkpoint (end of the last finished epoch) is intact", 130)
        except MemoryError:
            if debug:
                raise
            _fail("out of memory; try a smaller --batch-size or --image-size", 1)
        except OSError as e:
            if debug:
                raise
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            _fail(f"{e.strerror or e}{where}", 1)

    return wrapper


class LoadBar:
    """A ``progress(done, total)`` callable that draws a tqdm bar (for data loading);
    when standard error is not a terminal (``bar=False``), one line at the end instead."""

    def __init__(self, desc: str, *, unit: str = "slice", bar: bool | None = None):
        self.desc = desc
        self.unit = unit
        self.bar = None
        self.draw = stderr_is_terminal() if bar is None else bar
        self.t0: float | None = None

    def __call__(self, done: int, total: int) -> None:
        if not self.draw:
            if self.t0 is None:
                if done >= total:  # a cache hit reports (total, total) once: nothing to say
                    return
                self.t0 = time.perf_counter()
            if done >= total:
                click.echo(f"{self.desc}: {total} {self.unit}s in {time.perf_counter() - self.t0:.1f} s", err=True)
                self.t0 = None
            return
        if self.bar is None:
            if done >= total:  # a cache hit reports (total, total) once: no bar
                return
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, leave=False, file=sys.stderr)
        self.bar.n = done
        self.bar.refresh()
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain-text table, one row per dict."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])
