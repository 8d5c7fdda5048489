"""Kill ``pyroseg fit`` for real (SIGKILL, a separate process) and resume it.

Every scenario trains the same tiny run (prob_unet, which draws ``z`` and so
uses the RNG at every step, CPU, seed 0, 3 epochs of 8 steps) and kills it at
a chosen instant:

* inside a checkpoint write, deterministically, through the test hook of
  :mod:`pyroseg.checkpoint` (``PYROSEG_TEST_PAUSE_WRITE``): the process stops
  inside its N-th write of ``checkpoint.pt`` and signals; the test kills it
  while it waits there. ``partial``: the temporary file holds half the bytes;
  ``before_rename``: it is complete but not yet renamed over the checkpoint;
* at random instants while it trains (mid-epoch, twice in a row).

After each kill: ``checkpoint.pt`` is whole (it loads) and is the previous
checkpoint, the torn or unrenamed temporary file is left beside it, and the
work lost (the process's position minus the checkpoint's) is at most one epoch.
The training recipe's state (``--augment standard``: draws fixed by seed and
step; ``--lr-schedule cosine --lr-warmup``: a function of the step; best.pt
and its score in the checkpoint) is killed and resumed the same way
(:func:`test_recipe_killed_in_a_write_then_resumed`), best.pt compared too.

Then ``pyroseg fit --resume`` finishes the run, and: it removed the temporary
file, ``metrics.csv`` has each epoch once, and the final weights, training
losses and validation metrics EQUAL those of an uninterrupted run, bit for bit.
That holds because a checkpoint restores everything the remaining steps draw
from: weights, Adam state, position (epoch, batch; the shuffle is a function of
seed and epoch), the partial epoch's loss sums and every RNG state; and the
data loader has its own generator, so starting it mid-epoch does not consume
the global RNG (it did before, and a mid-epoch resume then differed by 1e-2).
"""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pyroseg.checkpoint import load_checkpoint
from pyroseg.errors import CheckpointError
from pyroseg.runs import stray_temp_files

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3
STEPS_PER_EPOCH = 8  # 4 train patients x 8 slices, batch 4
EVERY = 3  # --checkpoint-every: checkpoints after steps 3, 6, 8 (epoch end), 9, 12, 15, 16, ...
FIT = [
    "--model", "prob_unet", "--image-size", "32", "--synthetic-patients", "6", "--synthetic-slices", "8",
    "--widths", "8,16,32,64", "--epochs", str(EPOCHS), "--batch-size", "4", "--val-samples", "2",
    "--beta-warmup", "1", "--seed", "0", "--device", "cpu", "--quiet",
]  # fmt: skip
TIMEOUT = 600  # seconds for one process; a shared CPU can be slow


def _env(tmp_path: Path, pause: str | None = None) -> dict:
    env = dict(os.environ, PYROSEG_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env.pop("PYROSEG_TEST_PAUSE_WRITE", None)
    if pause:
        env["PYROSEG_TEST_PAUSE_WRITE"] = pause
    return env


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyroseg", *args]


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(*args), cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def _start(tmp_path: Path, *args: str, pause: str | None = None) -> subprocess.Popen:
    path = tmp_path / f"stderr-{time.monotonic_ns()}.txt"
    with open(path, "w") as log:  # the child keeps its own copy
        proc = subprocess.Popen(_cmd(*args), cwd=REPO, env=_env(tmp_path, pause), stdout=subprocess.DEVNULL, stderr=log)
    proc.stderr_path = path
    return proc


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _wait_for(proc: subprocess.Popen, condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if proc.poll() is not None:
            tail = proc.stderr_path.read_text()[-3000:]
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}: {proc.args}\n{tail}")
        if time.monotonic() > deadline:
            _kill(proc)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _kill_in_write(tmp_path: Path, run: Path, args: list[str], n: int, phase: str) -> Path:
    """Start ``fit``, let it stop inside its ``n``-th write of checkpoint.pt at
    ``phase``, SIGKILL it there; return the temporary file it was writing."""
    sig = tmp_path / f"paused-{n}-{phase}"
    proc = _start(tmp_path, *args, pause=f"checkpoint.pt:{n}:{phase}:{sig}")
    try:
        _wait_for(proc, sig.exists, f"write {n} of checkpoint.pt ({phase})")
    finally:
        _kill(proc)
    assert proc.returncode == -signal.SIGKILL
    temps = stray_temp_files(run)
    assert len(temps) == 1 and temps[0].name.startswith(".checkpoint.pt."), temps
    return temps[0]


def _position(ckpt: dict) -> int:
    assert ckpt["global_step"] == ckpt["epoch"] * STEPS_PER_EPOCH + ckpt["batch_in_epoch"]
    return ckpt["global_step"]


def _finish_and_compare(tmp_path: Path, run: Path, reference: dict, *extra: str) -> None:
    """Resume to the end; the run must equal the uninterrupted reference."""
    _run(tmp_path, "fit", "--resume", str(run), "--quiet", *extra)
    assert stray_temp_files(run) == [], "the resumed run left the killed write's temporary file"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    final = load_checkpoint(run / "checkpoint.pt")
    assert (final["epoch"], final["batch_in_epoch"]) == (EPOCHS, 0)
    for k, v in reference["model_state"].items():
        assert torch.equal(final["model_state"][k], v), f"{k} differs from the uninterrupted run"
    for k, v in reference["trainer"]["optimizer"]["state"].items():
        assert torch.equal(final["trainer"]["optimizer"]["state"][k]["exp_avg"], v["exp_avg"]), k
    assert [r["epoch"] for r in final["history"]] == list(range(1, EPOCHS + 1))
    for mine, theirs in zip(final["history"], reference["history"]):
        for key in mine:
            a, b = mine[key], theirs[key]
            if not key.endswith("_time_s") and not (a != a and b != b):  # NaN equals NaN here
                assert a == b, f"epoch {mine['epoch']}: {key} {a} != {b}"
    with open(run / "metrics.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == list(range(1, EPOCHS + 1))  # each epoch once


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run's final checkpoint."""
    tmp = tmp_path_factory.mktemp("reference")
    _run(tmp, "fit", *FIT, "--out", str(tmp / "run"))
    return load_checkpoint(tmp / "run" / "checkpoint.pt")


@pytest.mark.parametrize(
    "n, phase, every, killed_at, resumes_at",
    [
        # the first checkpoint (step 3), torn: there is no checkpoint yet; --resume starts the run again
        (1, "partial", EVERY, 3, None),
        # step 9 (mid-epoch 2), torn: the end of epoch 1 (step 8) is intact
        (4, "partial", EVERY, 9, 8),
        # step 12, written but not renamed: resumes mid-epoch, from step 9
        (5, "before_rename", EVERY, 12, 9),
        # no --checkpoint-every, the end of epoch 2 not renamed: the whole of epoch 2 is lost, the bound's edge
        (2, "before_rename", None, 16, 8),
    ],
)
def test_kill_during_a_checkpoint_write_then_resume(tmp_path, reference, n, phase, every, killed_at, resumes_at):
    run = tmp_path / "run"
    extra = ["--checkpoint-every", str(every)] if every else []
    tmp = _kill_in_write(tmp_path, run, ["fit", *FIT, "--out", str(run), *extra], n, phase)
    if phase == "partial":
        with pytest.raises(CheckpointError):  # what a non-atomic write would have left as the checkpoint
            load_checkpoint(tmp)
    else:
        assert _position(load_checkpoint(tmp)) == killed_at  # the complete new checkpoint that never landed
    if resumes_at is None:
        assert not (run / "checkpoint.pt").exists() and (run / "config.json").is_file()
        lost = killed_at
    else:
        lost = killed_at - _position(load_checkpoint(run / "checkpoint.pt"))  # it loads: not torn
        assert killed_at - lost == resumes_at
    assert 0 < lost <= STEPS_PER_EPOCH, f"{lost} steps lost"
    _finish_and_compare(tmp_path, run, reference, *extra)


def test_killed_at_random_instants_twice_then_resumed(tmp_path, reference):
    """Kills at random moments of training (after a checkpoint newer than the
    last one seen, so that each kill has something to resume); each time the
    checkpoint left is whole and no older than the last one seen before it."""
    run = tmp_path / "run"
    rng = random.Random(0)
    args = ["fit", *FIT, "--out", str(run), "--checkpoint-every", str(EVERY)]
    seen, kills = -1, 0
    for _ in range(2):
        proc = _start(tmp_path, *args)
        target = seen + 1

        def advanced() -> bool:
            nonlocal seen
            if not (run / "checkpoint.pt").exists():
                return False
            seen = max(seen, _position(load_checkpoint(run / "checkpoint.pt")))  # never torn, even mid-rename
            return seen >= target  # noqa: B023 (called within the iteration)

        try:
            _wait_for(proc, advanced, f"a checkpoint at step {target} or later")
            time.sleep(rng.uniform(0.05, 0.4))
        finally:
            _kill(proc)
        if proc.returncode == 0:  # a fast machine finished first: the kills before this one count
            break
        assert proc.returncode == -signal.SIGKILL
        kills += 1
        ckpt = load_checkpoint(run / "checkpoint.pt")  # whole
        assert _position(ckpt) >= seen
        seen = _position(ckpt)
        args = ["fit", "--resume", str(run), "--quiet", "--checkpoint-every", str(EVERY)]
    assert kills >= 1
    _finish_and_compare(tmp_path, run, reference, "--checkpoint-every", str(EVERY))


RECIPE = ["--augment", "standard", "--lr-schedule", "cosine", "--lr-warmup", "1", "--select-by", "val_loss"]


@pytest.fixture(scope="module")
def reference_recipe(tmp_path_factory) -> dict:
    """The uninterrupted run with the training recipe: final checkpoint and best.pt."""
    tmp = tmp_path_factory.mktemp("reference_recipe")
    _run(tmp, "fit", *FIT, *RECIPE, "--out", str(tmp / "run"))
    return {**load_checkpoint(tmp / "run" / "checkpoint.pt"), "best.pt": load_checkpoint(tmp / "run" / "best.pt")}


def test_recipe_killed_in_a_write_then_resumed(tmp_path, reference_recipe):
    """Killed before renaming its checkpoint at step 12 (mid-epoch 2, after best.pt of
    epoch 1), resumed from step 9: weights, Adam state, history, learning rate and
    best.pt equal the unbroken run's."""
    run = tmp_path / "run"
    extra = ["--checkpoint-every", str(EVERY)]
    _kill_in_write(tmp_path, run, ["fit", *FIT, *RECIPE, "--out", str(run), *extra], 5, "before_rename")
    assert _position(load_checkpoint(run / "checkpoint.pt")) == 9
    _finish_and_compare(tmp_path, run, reference_recipe, *extra)
    final, best = load_checkpoint(run / "checkpoint.pt"), load_checkpoint(run / "best.pt")
    assert final["best"] == reference_recipe["best"] == best["best"] == reference_recipe["best.pt"]["best"]
    assert final["trainer"]["optimizer"]["param_groups"][0]["lr"] == reference_recipe["trainer"]["optimizer"]["param_groups"][0]["lr"]
    for k, v in reference_recipe["best.pt"]["model_state"].items():
        assert torch.equal(best["model_state"][k], v), f"best.pt: {k} differs from the uninterrupted run"
