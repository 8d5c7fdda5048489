"""The command line end to end on tiny synthetic data, and its error contract:
a bad option exits 2, a failure while running exits 1, each with one line
``Error: ...`` naming the option or file and no traceback (unless --debug)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli.main import cli
from pyroseg.errors import UsageError

SIZE = 32  # training size of the runs
PATIENTS, SLICES = 6, 8  # synthetic cohort: split 4 train / 1 val / 1 test
INPUT_SIZE = 64  # size of the images handed to `sample` (resized to SIZE)
NUM_SAMPLES = 3
TINY = [
    "--image-size", str(SIZE), "--synthetic-patients", str(PATIENTS), "--synthetic-slices", str(SLICES),
    "--epochs", "1", "--batch-size", "16", "--widths", "8,16,32,64", "--val-samples", "2", "--device", "cpu",
    "--quiet",
]
REPORT_KEYS = {"dice_all", "dice_tumour", "dice_volume", "iou_tumour", "bce", "false_positive_slices", "n_patients",
               "n_slices"}


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def _ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One tiny trained run per model, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for model in ("unet", "prob_unet"):
        run = root / model
        _ok(invoke("fit", "--model", model, "--out", str(run), *TINY))
        out[model] = run
    return out


# ------------------------------------------------------------------ the happy path


@pytest.mark.parametrize("model", ["unet", "prob_unet"])
def test_fit_writes_a_complete_run(runs, model):
    run = runs[model]
    for name in ("config.json", "split.json", "metrics.csv", "checkpoint.pt", "curves.png", "val_samples.png"):
        assert (run / name).is_file(), name
    doc = json.loads((run / "config.json").read_text())
    assert doc["model"]["name"] == model
    assert doc["fit"]["image_size"] == SIZE and doc["fit"]["epochs"] == 1 and doc["fit"]["widths"] == [8, 16, 32, 64]
    split = json.loads((run / "split.json").read_text())
    assert [len(split[k]) for k in ("train", "val", "test")] == [4, 1, 1]
    lines = (run / "metrics.csv").read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("1,")  # header + epoch 1


@pytest.mark.parametrize("model", ["unet", "prob_unet"])
def test_evaluate_json_report(runs, model, tmp_path):
    report_path = tmp_path / "report.json"
    res = _ok(invoke("evaluate", str(runs[model]), "--json", str(report_path), "--num-samples", "2", "--device", "cpu"))
    rep = json.loads(report_path.read_text())
    assert REPORT_KEYS <= set(rep)
    assert rep["model"] == model and rep["split"] == "test" and rep["image_size"] == SIZE
    assert rep["n_patients"] == 1 and rep["n_slices"] == SLICES  # the one test patient
    for k in ("dice_all", "dice_tumour", "dice_volume", "iou_tumour", "false_positive_slices", "empty_slices"):
        assert 0.0 <= rep[k] <= 1.0 or math.isnan(rep[k]), k
    assert rep["bce"] > 0
    if model == "prob_unet":
        assert math.isfinite(rep["elbo"]) and rep["elbo"] > 0
        assert rep["elbo"] == pytest.approx(rep["recon"] + rep["kl_z"], rel=1e-4)
        assert rep["num_samples"] == 2
    else:
        assert "elbo" not in rep and math.isfinite(rep["nll"]) and rep["num_samples"] == 1
    # the printed table shows the same numbers as the JSON
    assert f"{rep['dice_all']:.4f}" in res.stdout and f"{rep['bce']:.4f}" in res.stdout
    assert f"wrote {report_path}" in res.stdout


def test_evaluate_val_split(runs, tmp_path):
    run = runs["unet"]
    split = json.loads((run / "split.json").read_text())
    report_path = tmp_path / "val.json"
    _ok(invoke("evaluate", str(run), "--split", "val", "--json", str(report_path), "--device", "cpu"))
    rep = json.loads(report_path.read_text())
    assert rep["split"] == "val" and rep["n_patients"] == len(split["val"]) == 1
    assert rep["n_slices"] == SLICES * len(split["val"])
    all_path = tmp_path / "all.json"
    _ok(invoke("evaluate", str(run), "--split", "all", "--json", str(all_path), "--device", "cpu"))
    assert json.loads(all_path.read_text())["n_patients"] == PATIENTS


def _write_lgg_inputs(folder: Path) -> list[str]:
    """Two slices in the kaggle_3m layout (RGB .tif + L 0/255 _mask.tif), INPUT_SIZE square."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    stems = []
    for k in (1, 2):
        stem = f"TCGA_XX_0000_20000101_{k}"
        Image.fromarray(rng.integers(0, 256, (INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8), "RGB").save(folder / f"{stem}.tif")
        mask = np.zeros((INPUT_SIZE, INPUT_SIZE), np.uint8)
        mask[20:40, 24:44] = 255
        Image.fromarray(mask, "L").save(folder / f"{stem}_mask.tif")
        stems.append(stem)
    return stems


def test_sample_writes_every_file_at_the_run_size(runs, tmp_path):
    stems = _write_lgg_inputs(tmp_path / "in")
    out = tmp_path / "samples"
    res = _ok(invoke("sample", str(runs["prob_unet"]), "--input", str(tmp_path / "in"), "--num-samples",
                     str(NUM_SAMPLES), "--out", str(out), "--device", "cpu"))
    expected = set()
    for stem in stems:
        expected |= {f"{stem}_sample_{s:03d}.png" for s in range(1, NUM_SAMPLES + 1)}
        expected |= {f"{stem}_{x}" for x in ("mean.png", "uncertainty.png", "grid.png", "samples.npz")}
    assert {p.name for p in out.iterdir()} == expected  # masks were not taken as inputs
    for stem in stems:
        with np.load(out / f"{stem}_samples.npz") as z:
            probs, mean, std = z["probs"], z["mean"], z["std"]
        assert probs.shape == (NUM_SAMPLES, SIZE, SIZE) and mean.shape == std.shape == (SIZE, SIZE)
        np.testing.assert_allclose(mean, probs.astype(np.float32).mean(0), atol=2e-3)
        for s in range(1, NUM_SAMPLES + 1):
            with Image.open(out / f"{stem}_sample_{s:03d}.png") as im:
                assert im.size == (SIZE, SIZE) and im.mode == "L"
                px = np.asarray(im)
            assert set(np.unique(px)) <= {0, 255}
            np.testing.assert_array_equal(px, (probs[s - 1].astype(np.float32) >= 0.5) * 255)
        for name in ("mean", "uncertainty"):
            with Image.open(out / f"{stem}_{name}.png") as im:
                assert im.size == (SIZE, SIZE)
                if name == "mean":
                    np.testing.assert_allclose(np.asarray(im), np.round(mean * 255), atol=1)
        with Image.open(out / f"{stem}_grid.png") as im:
            assert im.format == "PNG" and im.size[0] > SIZE
    assert res.stdout.count("Dice of the mean vs truth") == 2  # the _mask files were read as ground truth
    assert f"wrote {len(expected)} files" in res.stdout


def test_evaluate_judges_the_distribution_against_every_annotator(runs, tmp_path):
    """On 4-annotator data: GED / HM-IoU / diversity / ECE for the run and the oracle, and the
    reliability diagram beside the JSON."""
    report_path = tmp_path / "amb.json"
    res = _ok(invoke("evaluate", str(runs["unet"]), "--data", "synthetic-ambiguous", "--oracle", "--json",
                     str(report_path), "--num-samples", "4", "--device", "cpu"))
    rep = json.loads(report_path.read_text())
    assert rep["n_annotators"] == 4 and rep["split"] == "all" and rep["n_slices"] == PATIENTS * SLICES
    assert rep["sample_diversity"] == 0.0  # the U-Net's samples are one mask
    assert 0 <= rep["hm_iou"] <= 1 and rep["ged"] >= 0 and 0 <= rep["ece"] <= 1
    assert rep["oracle"]["sample_diversity"] > 0 and rep["oracle"]["num_samples"] == 4
    assert rep["oracle"]["hm_iou"] > rep["hm_iou"]
    assert rep["oracle (one mask)"]["sample_diversity"] == 0 and "oracle (one mask)" in res.stdout
    png = tmp_path / "amb_reliability.png"
    assert rep["reliability_png"] == str(png)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300
    for k in ("ged", "hm_iou", "sample_diversity", "ece"):
        assert f"{rep[k]:.4f}" in res.stdout and f"{rep['oracle'][k]:.4f}" in res.stdout
    assert f"wrote {report_path} and {png}" in res.stdout


def test_sample_slices_of_the_runs_own_data(runs, tmp_path):
    out = tmp_path / "split_samples"
    res = _ok(invoke("sample", str(runs["prob_unet"]), "--split", "test", "--num-images", "2", "--num-samples", "3",
                     "--out", str(out), "--device", "cpu"))
    grids = sorted(p for p in out.glob("*_grid.png") if p.name != "test_grid.png")
    assert len(grids) == 2 and len(list(out.glob("*_sample_*.png"))) == 2 * 3
    split = json.loads((runs["prob_unet"] / "split.json").read_text())
    assert all(g.name.startswith(split["test"][0] + "_") for g in grids)
    assert (out / "test_grid.png").is_file()  # every slice in one picture
    assert res.stdout.count("GED") == 2 and "wrote 15 files" in res.stdout


def test_plot(runs, tmp_path):
    png = tmp_path / "curves.png"
    res = _ok(invoke("plot", str(runs["prob_unet"]), "--out", str(png)))
    assert f"wrote {png}" in res.stdout
    with Image.open(png) as im:
        assert im.format == "PNG" and min(im.size) > 100


def test_inspect_synthetic_with_preview(tmp_path):
    png = tmp_path / "preview.png"
    res = _ok(invoke("inspect", "synthetic", "--image-size", str(SIZE), "--preview", str(png)))
    fields = dict(line.strip().split(": ", 1) for line in res.stdout.splitlines() if ": " in line)
    assert fields["n_patients"] == "20" and fields["n_slices"] == "320" and fields["image_size"] == str(SIZE)
    assert fields["slices per patient"] == "min 16, median 16, max 16"
    with Image.open(png) as im:
        assert im.format == "PNG"


def test_console_script_entry_point():
    """The installed `pyroseg` script (not just the click object) starts and lists its commands."""
    exe = Path(sys.executable).with_name("pyroseg")
    exe = str(exe) if exe.exists() else shutil.which("pyroseg")
    assert exe, "the pyroseg console script is not installed"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: pyroseg" in proc.stdout
    for command in ("fit", "evaluate", "sample", "inspect", "plot"):
        assert f"  {command} " in proc.stdout


# ------------------------------------------------------------------ errors


def _one_line_error(result, code: int, *names: str) -> str:
    """Exit ``code``, exactly one ``Error: ...`` line naming every one of ``names``, no traceback."""
    assert result.exit_code == code, f"exit {result.exit_code}, expected {code}\n{result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # nothing escaped uncaught
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize(
    "args, code, names",
    [
        (["--model", "nope"], 2, ["--model", "nope"]),
        (["--epochs", "0"], 2, ["--epochs"]),
        (["--image-size", "48"], 2, ["--image-size", "48", "power of two"]),
        (["--image-size", "8"], 2, ["--image-size", "8", "too small"]),
        (["--batch-size", "0"], 2, ["--batch-size"]),
        (["--model-arg", "nonsense"], 2, ["--model-arg", "nonsense"]),
        (["--model-arg", "no_such_knob=3"], 2, ["--model-arg", "no_such_knob"]),
        (["--widths", "8,x"], 2, ["--widths"]),
        (["--data", "/nonexistent/lgg"], 1, ["/nonexistent/lgg"]),  # a data error (DataError), not an option error
    ],
)
def test_fit_errors(tmp_path, args, code, names):
    out = tmp_path / "run"
    res = invoke("fit", "--out", str(out), *TINY, *args)
    _one_line_error(res, code, *names)
    assert not (out / "checkpoint.pt").exists() and not (out / "config.json").exists()


def test_fit_device_cuda_without_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available here")
    res = invoke("fit", "--out", str(tmp_path / "run"), *TINY[:-3], "--device", "cuda", "--quiet")
    _one_line_error(res, 2, "--device cuda")


def test_fit_refuses_an_existing_run_and_leaves_it_untouched(runs):
    run = runs["unet"]
    before = {name: (run / name).read_bytes() for name in ("checkpoint.pt", "config.json", "metrics.csv")}
    res = invoke("fit", "--model", "unet", "--out", str(run), *TINY)
    _one_line_error(res, 2, "--out", str(run), "--resume", "--overwrite")
    for name, data in before.items():
        assert (run / name).read_bytes() == data, name


def test_resume_without_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(invoke("fit", "--resume", str(tmp_path / "empty")), 2, "--resume", "checkpoint.pt")


def test_evaluate_errors(runs, tmp_path):
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("hello")
    _one_line_error(invoke("evaluate", str(not_a_run)), 1, "config.json")
    _one_line_error(invoke("evaluate", str(tmp_path / "missing")), 2, "missing")
    _one_line_error(invoke("evaluate", str(runs["unet"]), "--num-samples", "0"), 2, "--num-samples")
    _one_line_error(invoke("evaluate", str(runs["unet"]), "--batch-size", "0"), 2, "--batch-size")
    _one_line_error(invoke("evaluate", str(runs["unet"]), "--split", "nope"), 2, "--split")


def test_evaluate_distribution_errors(runs, tmp_path):
    _one_line_error(invoke("evaluate", str(runs["unet"]), "--oracle", "--device", "cpu"), 2, "--oracle")
    _one_line_error(invoke("evaluate", str(runs["unet"]), "--json", str(tmp_path / "no" / "r.json")), 2, "--json")


def test_sample_needs_input_or_split(runs, tmp_path):
    _one_line_error(invoke("sample", str(runs["unet"]), "--out", str(tmp_path / "o")), 2, "--input", "--split")
    _one_line_error(invoke("sample", str(runs["unet"]), "--split", "test", "--input", str(tmp_path), "--out",
                           str(tmp_path / "o")), 2, "--input", "--split")
    _one_line_error(invoke("sample", str(runs["unet"]), "--split", "test", "--num-images", "0", "--out",
                           str(tmp_path / "o")), 2, "--num-images")


def test_evaluate_refuses_a_corrupted_checkpoint(runs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(runs["unet"], broken)
    data = (broken / "checkpoint.pt").read_bytes()
    (broken / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    _one_line_error(invoke("evaluate", str(broken), "--device", "cpu"), 1, "checkpoint.pt")


def test_sample_errors(runs, tmp_path):
    _one_line_error(invoke("sample", str(runs["unet"]), "--input", str(tmp_path / "missing.png"), "--out",
                           str(tmp_path / "o")), 2, "--input", "missing.png")
    (tmp_path / "notes.txt").write_text("x")
    _one_line_error(invoke("sample", str(runs["unet"]), "--input", str(tmp_path / "notes.txt"), "--out",
                           str(tmp_path / "o")), 2, "--input")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_plot_on_a_folder_that_is_not_a_run(tmp_path):
    _one_line_error(invoke("plot", str(tmp_path)), 1, "metrics.csv")


def test_debug_shows_the_traceback(tmp_path):
    """With --debug the library error propagates (click prints its traceback) instead of one line."""
    args = ["fit", "--out", str(tmp_path / "run"), *TINY, "--epochs", "0"]
    plain = invoke(*args)
    _one_line_error(plain, 2, "--epochs")
    debug = invoke("--debug", *args)
    assert isinstance(debug.exception, UsageError) and "--epochs" in str(debug.exception)
    assert debug.exit_code != 0 and debug.exc_info is not None
    assert "Error: --epochs" not in debug.stderr  # not swallowed into the one-line form
