"""Atomic writes, safe checkpoint loading, RNG state round trips."""

from __future__ import annotations

import errno
import os
import random
import warnings

import numpy as np
import pytest
import torch

from pyroseg import checkpoint as ck
from pyroseg.checkpoint import (
    FORMAT_VERSION,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from pyroseg.errors import CheckpointError

OLD = b"the previous, complete contents\n"


def _leftovers(folder):
    """Temporary files atomic_write may have left (it names them .<name>.*.tmp)."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _state(value: float = 1.0) -> dict:
    return {"weights": torch.full((64, 64), value), "epoch": 3, "history": [{"loss": 0.5}], "name": "unet"}


# ------------------------------------------------------------------ atomic writes


def test_atomic_write_replaces_the_file(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    atomic_write_bytes(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert _leftovers(tmp_path) == []


def test_writer_raising_midway_leaves_old_file_and_no_temp(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(OLD)

    def writer(f):
        f.write(b"half of the new con")
        raise RuntimeError("killed midway")

    with pytest.raises(RuntimeError, match="killed midway"):
        atomic_write(p, writer)
    assert p.read_bytes() == OLD
    assert _leftovers(tmp_path) == []
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.bin"]


def test_writer_raising_on_a_new_file_leaves_nothing(tmp_path):
    p = tmp_path / "new.bin"

    def writer(f):
        f.write(b"x")
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError):
        atomic_write(p, writer)
    assert not p.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["fsync", "write"])
def test_disk_full_is_a_checkpoint_error_and_old_checkpoint_survives(tmp_path, monkeypatch, where):
    p = tmp_path / "checkpoint.pt"
    save_checkpoint(p, _state(1.0))
    before = p.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "fsync":
        monkeypatch.setattr(ck.os, "fsync", full)
    else:  # the write itself fails partway
        real = ck.atomic_write

        def failing_atomic_write(path, write):
            def partial(f):
                f.write(b"partial")
                full()

            real(path, partial)

        monkeypatch.setattr(ck, "atomic_write", failing_atomic_write)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(p, _state(2.0))
    msg = str(info.value)
    assert str(p) in msg and "No space left" in msg and "\n" not in msg
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert _leftovers(tmp_path) == []
    loaded = load_checkpoint(p)
    assert torch.equal(loaded["weights"], torch.full((64, 64), 1.0))


# ------------------------------------------------------------------ loading


def test_round_trip_and_format_version(tmp_path):
    p = tmp_path / "c.pt"
    save_checkpoint(p, _state(3.0))
    loaded = load_checkpoint(p)
    assert loaded["format_version"] == FORMAT_VERSION
    assert torch.equal(loaded["weights"], torch.full((64, 64), 3.0))
    assert loaded["epoch"] == 3 and loaded["history"] == [{"loss": 0.5}] and loaded["name"] == "unet"


def test_refuses_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint here") as info:
        load_checkpoint(tmp_path / "nope.pt")
    assert "nope.pt" in str(info.value)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path)  # a folder is not a checkpoint


@pytest.mark.parametrize("cut", [0.5, 0.1, 0.0])
def test_refuses_truncated_file(tmp_path, cut):
    p = tmp_path / "c.pt"
    save_checkpoint(p, _state())
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(p)
    assert str(p) in str(info.value) and "\n" not in str(info.value)


def test_refuses_random_bytes(tmp_path):
    p = tmp_path / "c.pt"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(p)
    assert str(p) in str(info.value)


def test_refuses_newer_format_and_non_checkpoints(tmp_path):
    p = tmp_path / "c.pt"
    torch.save({"format_version": FORMAT_VERSION + 1, "weights": torch.zeros(2)}, p)
    with pytest.raises(CheckpointError, match="upgrade pyroseg"):
        load_checkpoint(p)
    torch.save({"format_version": "1"}, p)  # not an int
    with pytest.raises(CheckpointError, match="checkpoint format"):
        load_checkpoint(p)
    torch.save({"weights": torch.zeros(2)}, p)  # no format_version at all
    with pytest.raises(CheckpointError, match="not a pyroseg checkpoint"):
        load_checkpoint(p)
    torch.save([torch.zeros(2)], p)  # not a dict
    with pytest.raises(CheckpointError, match="not a pyroseg checkpoint"):
        load_checkpoint(p)


class _RunsCode:
    """Unpickling this runs ``os.system('touch MARKER')``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _WritesFile:
    """Unpickling this calls ``open(MARKER, 'w')``, creating the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("payload", [_RunsCode, _WritesFile])
@pytest.mark.parametrize("protocol", [2, 4])
def test_refuses_a_file_that_would_run_code_and_runs_none(tmp_path, payload, protocol):
    marker = tmp_path / "PWNED"
    p = tmp_path / "evil.pt"
    torch.save({"format_version": FORMAT_VERSION, "weights": torch.zeros(2), "x": payload(marker)}, p,
               pickle_protocol=protocol)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch notes protocol 4 is not its default
        load_checkpoint(p)
    msg = str(info.value)
    assert "refused" in msg and str(p) in msg and "\n" not in msg
    assert "weights_only" not in msg  # torch's advice to load unsafely is not passed on to the user
    assert not marker.exists(), "loading the checkpoint ran the payload"
    # the payload is real: an unsafe load does run it (so the check above could fail)
    loaded = torch.load(p, weights_only=False)
    assert marker.exists()
    if hasattr(loaded["x"], "close"):
        loaded["x"].close()


# ------------------------------------------------------------------ RNG state


def _draw():
    return (torch.rand(5).tolist(), torch.randn(3).tolist(), np.random.rand(5).tolist(), np.random.randn(3).tolist(),
            [random.random() for _ in range(5)], random.gauss(0, 1))


def test_rng_state_round_trip():
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    np.random.randn()  # leave a cached Gaussian in numpy's state
    random.gauss(0, 1)  # and in Python's
    state = get_rng_state()
    first = _draw()
    second = _draw()
    assert first != second
    set_rng_state(state)
    assert _draw() == first


def test_rng_state_survives_a_checkpoint(tmp_path):
    np.random.seed(5)
    state = get_rng_state()
    first = _draw()
    save_checkpoint(tmp_path / "c.pt", {"rng": state})  # weights_only must accept every part of it
    _draw()
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert _draw() == first
