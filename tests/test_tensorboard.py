"""``fit --tensorboard``: per-epoch scalars and the run's pictures in TensorBoard event
files (pyroseg.tensorboard), and the option's error when the optional extra is missing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from pyroseg.cli.main import cli

from pyroseg.runs import read_metrics_csv
from pyroseg.tensorboard import scalar_tag

TINY = [
    "--image-size", "32", "--synthetic-patients", "6", "--synthetic-slices", "8", "--epochs", "2", "--batch-size", "16",
    "--widths", "8,16,32,64", "--val-samples", "2", "--device", "cpu", "--quiet",
]  # fmt: skip


def _events(log_dir: Path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="the tensorboard extra is not installed (pip install 'pyroseg[tensorboard]'); .ci/run installs it",
    )
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_writes_the_named_scalars_and_the_sample_grid(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install 'pyroseg[tensorboard]'); "
                                              ".ci/run installs it")
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, ["fit", "--model", "prob_unet", "--objective", "geco", "--out", str(run), "--tensorboard",
                                   "--no-collapse-diagnostics", *TINY])
    assert res.exit_code == 0, res.output
    acc = _events(run / "tensorboard")
    tags = set(acc.Tags()["scalars"])
    named = {"train/loss", "val/loss", "val/recon", "val/kl_z", "schedule/beta", "geco/lambda",
             "val/dice_all", "val/dice_tumour", "train/time_s", "val/time_s"}
    assert named <= tags, sorted(named - tags)
    rows = read_metrics_csv(run / "metrics.csv")
    for column in ("train_loss", "val_kl_z", "beta", "geco_lambda", "val_dice_all"):
        events = acc.Scalars(scalar_tag(column))
        assert [e.step for e in events] == [1, 2]  # the epoch is the step
        assert [e.value for e in events] == pytest.approx([r[column] for r in rows], rel=1e-5, abs=1e-6)
    assert "pictures/val_samples" in acc.Tags()["images"]
    image = acc.Images("pictures/val_samples")[-1]
    assert image.step == 2 and image.width > 100 and image.height > 100
    assert "tensorboard --logdir" in res.stdout


def test_log_dir_puts_the_events_elsewhere(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    logs = tmp_path / "logs"
    res = CliRunner().invoke(cli, ["fit", "--out", str(tmp_path / "run"), "--log-dir", str(logs), *TINY])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert "train/loss" in _events(logs).Tags()["scalars"]


def test_without_the_extra_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, ["fit", "--out", str(run), "--tensorboard", *TINY])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--tensorboard" in errors[0] and "pip install 'pyroseg[tensorboard]'" in errors[0]
    assert not run.exists()  # refused before anything was written


@pytest.mark.parametrize("column, tag", [("train_loss", "train/loss"), ("val_kl_z_1", "val/kl_z_1"), ("beta", "schedule/beta"),
                                         ("geco_lambda", "geco/lambda"), ("epoch", None), ("step", None)])
def test_scalar_tags(column, tag):
    assert scalar_tag(column) == tag
