"""Training that survives, in-process (the SIGKILL tests are in test_kill_resume.py):
a mid-epoch resume and a resume before the first checkpoint equal an
uninterrupted run; stray temporary files are ignored and removed; an injected
NaN is skipped, counted, logged, and stops training with the last good
checkpoint intact."""

from __future__ import annotations

import copy
import csv
import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from pyroseg.cli.main import cli

import pyroseg.train as train
from pyroseg.checkpoint import load_checkpoint
from pyroseg.config import FitConfig
from pyroseg.runs import stray_temp_files
from pyroseg.train import FitCallbacks, fit

TINY = dict(data="synthetic", image_size=32, synthetic_patients=6, synthetic_slices=8, widths=(8, 16, 32, 64),
            val_samples=2, seed=0, device="cpu", batch_size=8)
STEPS_PER_EPOCH = 4  # 4 train patients x 8 slices / batch 8


class _Stop(Exception):
    pass


class _StopAt(FitCallbacks):
    """Raise after global step ``k`` (as a crash at that instant would, minus the kill)."""

    def __init__(self, k: int):
        self.k, self.n = k, 0

    def on_step(self, loss):
        self.n += 1
        if self.n == self.k:
            raise _Stop


def _weights(run: Path) -> dict:
    return load_checkpoint(run / "checkpoint.pt")


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("straight") / "run"
    fit(FitConfig(model="prob_unet", out=str(out), epochs=2, beta_warmup=1.0, **TINY), pictures=False)
    return _weights(out)


@pytest.mark.parametrize("stop_at, every, resumes_at", [(7, 3, 6), (2, None, None)], ids=["mid-epoch", "before-any-checkpoint"])
def test_resume_equals_an_uninterrupted_run(tmp_path, straight, stop_at, every, resumes_at):
    """prob_unet draws z every step, so this fails if any RNG draw shifts (it did: the
    data loader drew its seed from the global RNG when a resumed epoch restarted it)."""
    out = tmp_path / "run"
    cfg = FitConfig(model="prob_unet", out=str(out), epochs=2, beta_warmup=1.0, **TINY)
    with pytest.raises(_Stop):
        fit(cfg, pictures=False, checkpoint_every=every, callbacks=_StopAt(stop_at))
    if resumes_at is None:
        assert not (out / "checkpoint.pt").exists() and (out / "config.json").exists()
    else:
        ck = _weights(out)
        assert (ck["epoch"], ck["batch_in_epoch"], ck["global_step"]) == (1, resumes_at - STEPS_PER_EPOCH, resumes_at)
    fit(FitConfig(out=str(out), epochs=0), resume=True, pictures=False, checkpoint_every=every)
    final = _weights(out)
    for k, v in straight["model_state"].items():
        assert torch.equal(final["model_state"][k], v), k
    assert [r["epoch"] for r in final["history"]] == [1, 2]
    for mine, theirs in zip(final["history"], straight["history"]):
        assert mine["train_loss"] == theirs["train_loss"] and mine["val_loss"] == theirs["val_loss"]


def test_stray_temp_files_are_ignored_and_removed(tmp_path, caplog):
    out = fit(FitConfig(model="unet", out=str(tmp_path / "run"), epochs=1, **TINY), pictures=False)
    good = (out / "checkpoint.pt").read_bytes()
    torn = out / ".checkpoint.pt.k1ll3d.tmp"
    torn.write_bytes(good[: len(good) // 3])  # what a kill mid-write leaves
    (out / ".metrics.csv.abc.tmp").write_text("epoch\n1\n1\n")
    mine = [out / ".checkpoint.pt.keep", out / "notes.tmp", out / ".notes.txt.x.tmp"]  # not ours: left alone
    for p in mine:
        p.write_text("the user's")
    assert [p.name for p in stray_temp_files(out)] == [".checkpoint.pt.k1ll3d.tmp", ".metrics.csv.abc.tmp"]
    res = CliRunner().invoke(cli, ["evaluate", str(out), "--device", "cpu", "--num-samples", "1"])
    assert res.exit_code == 0, res.output  # reading a run ignores them
    with caplog.at_level(logging.WARNING, logger="pyroseg.runs"):
        fit(FitConfig(out=str(out), epochs=2), resume=True, pictures=False)
    assert stray_temp_files(out) == []
    assert sum("interrupted" in r.getMessage() for r in caplog.records) == 2
    assert all(p.read_text() == "the user's" for p in mine)
    assert _weights(out)["epoch"] == 2
    with open(out / "metrics.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_injected_nan_is_skipped_counted_logged_and_stops_with_the_checkpoint_intact(tmp_path, monkeypatch, caplog):
    """A NaN pixel in chosen training batches (the data path a real NaN would take):
    batches 2-3 (fewer in a row than --max-nonfinite), then 9 onwards. Each such
    step leaves weights and Adam state untouched and is logged; metrics.csv counts
    them; the third in a row stops training (exit 1, one line) with checkpoint.pt
    exactly the one written at the end of epoch 2; with clean data it resumes."""
    out = tmp_path / "run"
    poisoned = {2, 3} | set(range(9, 100))
    batches = {"n": 0}
    real_collate = train.collate_batch

    def collate(batch):
        batch = real_collate(batch)
        batches["n"] += 1
        if batches["n"] in poisoned:
            batch["image"] = batch["image"].clone()
            batch["image"][0, 0, 5, 5] = float("nan")
        return batch

    steps = []
    real_step = train.Trainer.step

    def step(self, image, mask, **kw):
        before = copy.deepcopy(self.model.state_dict())
        adam = copy.deepcopy(self.optimizer.state_dict()["state"])
        outcome = None
        try:
            outcome = real_step(self, image, mask, **kw)
            return outcome
        finally:  # also when the step raises
            after = self.optimizer.state_dict()["state"]
            same_adam = adam.keys() == after.keys() and all(
                torch.equal(adam[i][k], after[i][k]) for i in adam for k in adam[i])
            steps.append({
                "nan": bool(image.isnan().any()),
                "applied": None if outcome is None else outcome.applied,  # None: it raised
                "same": all(torch.equal(v, before[k]) for k, v in self.model.state_dict().items()),
                "same_adam": same_adam,
                "state": copy.deepcopy(self.model.state_dict()),
            })

    saved = []
    real_save = train.save_checkpoint

    def save(path, state):
        real_save(path, state)
        if Path(path).name == "checkpoint.pt":  # not best.pt, written through the same function
            saved.append(Path(path).read_bytes())

    monkeypatch.setattr(train, "collate_batch", collate)
    monkeypatch.setattr(train.Trainer, "step", step)
    monkeypatch.setattr(train, "save_checkpoint", save)
    args = ["fit", "--model", "unet", "--out", str(out), "--epochs", "3", "--max-nonfinite", "3", "--image-size", "32",
            "--synthetic-patients", "6", "--synthetic-slices", "8", "--batch-size", "8", "--widths", "8,16,32,64",
            "--val-samples", "1", "--device", "cpu", "--quiet"]
    with caplog.at_level(logging.WARNING, logger="pyroseg.train"):
        res = CliRunner().invoke(cli, args)

    # stopped: exit 1, one line naming the cause, the option and the checkpoint
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in res.output
    for words in ("3 non-finite steps in a row", "--max-nonfinite 3", "last good checkpoint is intact"):
        assert words in errors[0], errors[0]
    # steps 2, 3 and 9-11 were poisoned, skipped, and left weights and Adam alone; the others moved the weights
    assert [i + 1 for i, s in enumerate(steps) if s["nan"]] == [2, 3, 9, 10, 11]
    assert [s["applied"] for s in steps] == [not s["nan"] for s in steps[:-1]] + [None]  # the 11th raised
    for s in steps:
        assert s["same"] == s["same_adam"] == s["nan"]
    # logged, once per skipped step
    warned = [r for r in caplog.records if "non-finite loss or gradient" in r.getMessage()]
    assert len(warned) == 5
    # counted in metrics.csv (cumulative), which has epochs 1 and 2 only
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["nonfinite_steps"]) for r in rows] == [("1", "2"), ("2", "2")]
    # the last good checkpoint: byte for byte the end of epoch 2, loadable, the weights training stopped with
    assert len(saved) == 2 and (out / "checkpoint.pt").read_bytes() == saved[-1]
    ck = load_checkpoint(out / "checkpoint.pt")
    assert (ck["epoch"], ck["batch_in_epoch"], ck["trainer"]["nonfinite_total"]) == (2, 0, 2)
    for k, v in steps[-1]["state"].items():
        assert torch.equal(ck["model_state"][k], v), k
    for k, v in steps[7]["state"].items():  # after step 8, the last good one
        assert torch.equal(ck["model_state"][k], v), k

    # with the data fixed, the run resumes from that checkpoint and finishes
    monkeypatch.undo()
    res = CliRunner().invoke(cli, ["fit", "--resume", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    with open(out / "metrics.csv", newline="") as f:
        assert [(r["epoch"], r["nonfinite_steps"]) for r in csv.DictReader(f)] == [("1", "2"), ("2", "2"), ("3", "2")]
