"""Errors that reach the user as one clear line.

Every error the library raises on purpose derives from :class:`PyrosegError` and
carries the exit status the command line should use: ``2`` for a bad option or
argument (a *usage* error), ``1`` for a failure while running (bad data, a
corrupted checkpoint, a full disk).
"""

from __future__ import annotations

__all__ = ["PyrosegError", "UsageError", "DataError", "CheckpointError", "TrainingError"]


class PyrosegError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(PyrosegError):
    """An option or argument the user gave is not acceptable (exit status 2)."""

    exit_code = 2


class DataError(PyrosegError):
    """A data file or folder is missing, unreadable or not what was expected."""


class CheckpointError(PyrosegError):
    """A run folder, checkpoint or config cannot be used."""


class TrainingError(PyrosegError):
    """Training cannot go on (for example, too many non-finite steps in a row)."""
