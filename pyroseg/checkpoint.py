"""Atomic writes and safe reads of checkpoints and small files.

* Every write goes to a temporary file in the same folder, is flushed and
  fsynced, then renamed over the target (``os.replace`` is atomic on POSIX),
  and the folder is fsynced: a kill at any instant leaves the old file or the
  new one, never a torn one. A failed write (disk full) removes its temporary
  file and leaves the previous file intact.
* Checkpoints are read with ``torch.load(..., weights_only=True)``: only
  tensors and plain containers are accepted, so opening a checkpoint can never
  run code.
* A kill between writing the temporary file and the rename leaves that file
  behind (``.checkpoint.pt.<random>.tmp``): nothing ever reads such a file, and
  :func:`pyroseg.runs.prepare_run_dir` removes those of a run folder.

Test hook: ``PYROSEG_TEST_PAUSE_WRITE="NAME:N:PHASE:SIGNAL"`` (read once, at
import) makes the ``N``-th atomic write, in this process, of a file called
``NAME`` stop at ``PHASE``, create the file ``SIGNAL`` and sleep, so that a test
can SIGKILL the process at that exact instant. Phases: ``partial`` (the
temporary file holds half of the new bytes, as if the kill came mid-write),
``before_rename`` (the temporary file is complete and fsynced, the target still
the old file) and ``after_rename``. Unset, it costs four ``is None`` tests per
write. See ``tests/test_kill_resume.py``.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyroseg.errors import CheckpointError

__all__ = [
    "FORMAT_VERSION",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "save_checkpoint",
    "load_checkpoint",
    "get_rng_state",
    "set_rng_state",
]

#: Version of the checkpoint layout; a newer one is refused, not misread.
FORMAT_VERSION = 1


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _parse_pause(spec: str | None) -> tuple[str, int, str, str] | None:
    if not spec:
        return None
    try:
        name, n, phase, signal = spec.split(":", 3)
        if phase not in ("partial", "before_rename", "after_rename"):
            raise ValueError(phase)
        return name, int(n), phase, signal
    except ValueError:
        raise ValueError(f"PYROSEG_TEST_PAUSE_WRITE={spec!r}: expected NAME:N:PHASE:SIGNAL_FILE") from None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Files are created ``0o666 & ~umask``, like ``open()`` would (``mkstemp`` makes them 0600).
_FILE_MODE = 0o666 & ~_umask()

_PAUSE = _parse_pause(os.environ.get("PYROSEG_TEST_PAUSE_WRITE"))
_pause_count = 0


def _pause(path: Path, phase: str, f: io.BufferedWriter | None = None) -> None:
    """The test hook of the module docs: called only when ``_PAUSE`` is set."""
    name, n, at, signal = _PAUSE
    if path.name != name or phase != at or _pause_count != n:
        return
    if f is not None:  # "partial": keep only the first half of what was written
        f.flush()
        f.truncate(f.tell() // 2)
        f.flush()
        os.fsync(f.fileno())
    Path(signal).write_text(f"{os.getpid()} {path} {phase}\n")
    deadline = time.monotonic() + 600  # never hang forever if nobody kills us
    while time.monotonic() < deadline:
        time.sleep(0.05)


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` through ``write(fileobj)`` atomically (temp file, fsync, rename).

    An ``OSError`` (disk full, read-only folder) propagates with ``filename``
    set to ``path``, after the temporary file is removed.
    """
    global _pause_count
    path = Path(path)
    if _PAUSE is not None and path.name == _PAUSE[0]:
        _pause_count += 1
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, _FILE_MODE)
            write(f)
            if _PAUSE is not None:
                _pause(path, "partial", f)
            f.flush()
            os.fsync(f.fileno())
        if _PAUSE is not None:
            _pause(path, "before_rename")
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(e, OSError) and not e.filename:
            e.filename = str(path)
        raise
    _fsync_dir(path.parent)
    if _PAUSE is not None:
        _pause(path, "after_rename")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Save ``state`` (tensors and plain containers only) atomically, stamped with
    ``format_version``. Raises :class:`CheckpointError` naming the file when the
    write fails (e.g. disk full); the previous checkpoint is then untouched."""
    state = {"format_version": FORMAT_VERSION, **state}
    buf = io.BytesIO()
    torch.save(state, buf)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        raise CheckpointError(f"{path}: could not write checkpoint ({e.strerror or e}); the previous one is intact") from None


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, safely.

    Refuses, with a one-line :class:`CheckpointError`: a missing file, a
    truncated or corrupted one (whatever torch raises on it: the fuzz tests in
    ``tests/test_fuzz.py`` flip, cut and overwrite its bytes), one that needs
    arbitrary code to unpickle, and one written in a newer format (or with a
    format version no pyroseg writes).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint here")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's text opens with advice to retry with weights_only=False: never echo that, only the reason
        tail = str(e).split("WeightsUnpickler error:", 1)[-1]
        boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
        reasons = [s.strip() for s in tail.splitlines() if s.strip() and not s.strip().startswith(boiler)]
        # and never torch's advice to allowlist the offending global either
        first = reasons[0].split(" Please use", 1)[0].strip() if reasons else type(e).__name__
        raise CheckpointError(
            f"{path}: refused: holds something other than tensors and plain containers (corrupted, "
            f"or objects that could run code when loaded): {first}"
        ) from None
    except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways (RuntimeError, EOFError, IndexError, ...)
        lines = str(e).strip().splitlines()
        why = f"{type(e).__name__}: {lines[0].split('. ')[0][:120]}" if lines else type(e).__name__
        raise CheckpointError(f"{path}: truncated or corrupted checkpoint ({why})") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path}: not a pyroseg checkpoint")
    ver = state["format_version"]
    if isinstance(ver, int) and (isinstance(ver, bool) or ver < 1):
        raise CheckpointError(f"{path}: checkpoint format {ver!r}; pyroseg writes 1 to {FORMAT_VERSION}: a damaged checkpoint?")
    if not isinstance(ver, int) or ver > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {ver!r}; this pyroseg reads up to {FORMAT_VERSION}; upgrade pyroseg")
    return state


def get_rng_state() -> dict[str, Any]:
    """Every random state that training draws from, as tensors and plain lists."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned (its tensors may have been
    loaded onto a GPU by ``map_location``: RNG states must be CPU byte tensors)."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
