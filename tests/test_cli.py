"""The command line end to end on tiny synthetic data. Its error contract (a bad
option exits 2, a failure while running exits 1, each with one line ``Error: ...``
naming the option or file and no traceback unless --debug) is tested in
tests/test_bad_inputs.py."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from pyroseg.cli.main import cli

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
        assert rep["units_z"] == 6 and 0 <= rep["au_z"] <= 6 and 0 <= rep["effect_z"] <= 1  # collapse diagnostics
        assert f"active units (Cov_x E_q[z_u] > 0.01): z {rep['au_z']}/6" in res.stdout
        assert 0 <= rep["dice_all_posterior"] <= 1  # its guide is given the mask
    else:
        assert "dice_all_posterior" not in rep
        assert "elbo" not in rep and math.isfinite(rep["nll"]) and rep["num_samples"] == 1
    # the printed table shows the same numbers as the JSON
    assert f"{rep['dice_all']:.4f}" in res.stdout and f"{rep['bce']:.4f}" in res.stdout
    assert f"wrote {report_path}" in res.stdout


def test_evaluate_point_prediction(runs, tmp_path):
    """--point majority / mean-z change the point metrics, not the samples' (same seed); a bad one is a usage error."""
    reps = {}
    for point in ("mean", "majority", "mean-z"):
        path = tmp_path / f"{point}.json"
        res = _ok(invoke("evaluate", str(runs["prob_unet"]), "--point", point, "--json", str(path), "--num-samples", "4",
                         "--device", "cpu"))
        assert f"point prediction: {point}" in res.stdout
        reps[point] = json.loads(path.read_text())
        assert reps[point]["point"] == point
    for point in ("majority", "mean-z"):
        assert reps[point]["ged"] == reps["mean"]["ged"]  # the same samples
        assert reps[point]["bce"] != reps["mean"]["bce"]  # another probability map
    path = tmp_path / "auto.json"  # the default: the model's own point prediction, the mean for prob_unet
    res = _ok(invoke("evaluate", str(runs["prob_unet"]), "--json", str(path), "--num-samples", "4", "--device", "cpu"))
    assert "point prediction: mean" in res.stdout
    assert json.loads(path.read_text())["dice_all"] == reps["mean"]["dice_all"]
    res = invoke("evaluate", str(runs["prob_unet"]), "--point", "median")
    assert res.exit_code == 2 and "'median' is not one of 'auto', 'mean', 'majority', 'mean-z'" in res.output


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


def test_plot_latents(runs, tmp_path):
    png = tmp_path / "latents.png"
    res = _ok(invoke("plot", str(runs["prob_unet"]), "--latents", "--num-samples", "2", "--images", "1", "--out", str(png)))
    assert f"wrote {png}" in res.stdout
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[1] > 100
    res = invoke("plot", str(runs["unet"]), "--latents", "--out", str(png))
    assert res.exit_code == 2 and "Traceback" not in res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--latents" in errors[0] and "unet" in errors[0], res.stderr


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
# The bad options, bad data, damaged runs and full disks of every command are one
# table in tests/test_bad_inputs.py (with --debug, and the docs' Troubleshooting table, docs/guide/troubleshooting.md).


# ------------------------------------------------------------------ a CLI that answers at once


def test_importing_the_cli_imports_no_heavy_library():
    """`pyroseg --help`, --version and option errors must not wait for torch, Pyro or matplotlib:
    importing the command line imports none of them (each command imports what it needs)."""
    code = "import sys, pyroseg.cli.main; print(sorted(m for m in ('torch', 'pyro', 'matplotlib', 'numpy', 'tqdm') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_eval_splits_and_checkpoints_of_the_cli_are_the_librarys():
    from pyroseg.cli.common import CHECKPOINTS, EVAL_SPLITS

    from pyroseg.runs import CHECKPOINTS as LIB_CHECKPOINTS
    from pyroseg.runs import EVAL_SPLITS as LIB_SPLITS

    assert EVAL_SPLITS == LIB_SPLITS
    assert CHECKPOINTS == LIB_CHECKPOINTS


def test_models_command_lists_every_built_in_model():
    from pyroseg.models import MODELS

    res = _ok(invoke("models"))
    names = [line.split()[0] for line in res.stdout.splitlines()[2:] if line.strip()]
    assert names == list(MODELS)


# ------------------------------------------------------------------ logs that read well in a file


def test_fit_log_in_a_file_has_one_line_per_epoch(tmp_path):
    """Standard error to a file (a cluster job, nohup, CI): no progress bars, no carriage
    returns; one line when the data is loaded and one per epoch, with the epoch's figures."""
    log_file = tmp_path / "fit.log"
    args = [a for a in TINY if a != "--quiet"]
    args[args.index("--epochs") + 1] = "3"
    args[args.index("--batch-size") + 1] = "8"  # 32 training slices: 4 batches an epoch
    args.append("--no-collapse-diagnostics")  # (time)
    with open(log_file, "w") as err:
        proc = subprocess.run([sys.executable, "-m", "pyroseg", "fit", "--model", "prob_unet", "--out",
                               str(tmp_path / "run"), *args], stdout=subprocess.PIPE, stderr=err, text=True,
                              timeout=600, cwd=Path(__file__).resolve().parents[1])
    text = log_file.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text and "batch/s" not in text and "it/s" not in text, text
    lines = text.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"], text
    for line in epochs:  # the bar's figures: loss, validation -ELBO, KL of z, Dice; and the epoch's time
        assert all(w in line for w in ("loss ", "val -ELBO ", "kl_z ", "val dice ", " s)")), line
    assert sum(line.startswith("data: ") for line in lines) == 1
    assert len(lines) == 4, text  # nothing else (warnings would show here too)
    # the figures are the ones metrics.csv has
    first = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header, row = first[0].split(","), first[1].split(",")
    assert f"loss {float(row[header.index('train_loss')]):.1f}" in epochs[0]


# ------------------------------------------------------------------ training a run again from its config.json


def _weights(run: Path) -> dict:
    import torch

    return torch.load(run / "checkpoint.pt", weights_only=True)["model_state"]


def test_fit_again_from_config_gives_identical_weights(runs, tmp_path):
    """`fit --config RUN/config.json` trains the same configuration again: on CPU the same
    weights, bit for bit; its config.json says where it came from."""
    import torch

    first = runs["prob_unet"]
    again = tmp_path / "again"
    res = _ok(invoke("fit", "--config", str(first / "config.json"), "--out", str(again), "--quiet"))
    assert res.stderr == ""  # --quiet: no progress output, bars or lines
    a, b = _weights(first), _weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    old, new = (json.loads((r / "config.json").read_text())["fit"] for r in (first, again))
    assert new["source_config"] == str((first / "config.json").resolve())
    assert {k: v for k, v in new.items() if k not in ("out", "source_config")} == \
        {k: v for k, v in old.items() if k not in ("out", "source_config")}


def test_fit_again_from_config_with_options_overriding_the_files(runs, tmp_path):
    import torch

    copy = tmp_path / "x"
    shutil.copytree(runs["unet"], copy)
    _ok(invoke("fit", "--config", str(copy), "--seed", "1", "--epochs", "2", "--quiet"))  # a run folder works too
    again = tmp_path / "x-rerun"  # the default --out
    doc = json.loads((again / "config.json").read_text())
    assert doc["fit"]["seed"] == 1 and doc["fit"]["epochs"] == 2  # from the command line
    assert doc["fit"]["image_size"] == SIZE and doc["fit"]["widths"] == [8, 16, 32, 64]  # from the file
    assert doc["fit"]["source_config"] == str((copy / "config.json").resolve())
    assert len((again / "metrics.csv").read_text().splitlines()) == 3
    a, b = _weights(runs["unet"]), _weights(again)
    assert not all(torch.equal(a[k], b[k]) for k in a)  # another seed: other weights
    res = invoke("fit", "--config", str(copy / "config.json"), "--resume", str(copy))
    assert res.exit_code == 2 and "--config with --resume" in res.stderr


def test_load_progress_without_a_terminal_is_one_line(capsys):
    from pyroseg.cli.common import LoadBar

    bar = LoadBar("decoding data", bar=False)
    for done in range(0, 501, 50):
        bar(done, 500)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("decoding data: 500 slices in ") and "\r" not in err
    LoadBar("decoding data", bar=False)(500, 500)  # a cache hit: nothing to say
    assert capsys.readouterr().err == ""


def test_every_option_a_config_error_names_is_an_option_of_fit_or_compare():
    """FitConfig's checks name the option to change; each must exist (before: '--num-workers',
    which fit never had, for a field that never reached the DataLoader)."""
    import inspect
    import re

    from pyroseg.cli.compare import compare_cmd
    from pyroseg.cli.fit import fit_cmd

    from pyroseg import config
    from pyroseg.config import FitConfig

    named = set(re.findall(r"--[a-z][a-z0-9-]+", inspect.getsource(config)))
    options = {o for cmd in (fit_cmd, compare_cmd) for p in cmd.params for o in p.opts}
    assert named - options == set()
    assert FitConfig.from_dict({"num_workers": 0, "epochs": 3}).epochs == 3  # an older run's config still reads


# ------------------------------------------------------------------ every fit option defined once, beside its FitConfig field


def _field_default(f):
    import dataclasses

    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def test_fit_options_are_generated_from_the_config_fields():
    """`fit --help` lists every FitConfig field that is an option (pyroseg.config.option), in
    field order, with the field's help; each option's default is the field's default."""
    import dataclasses

    from pyroseg.cli.fit import fit_cmd
    from pyroseg.cli.options import click_default

    from pyroseg.config import FitConfig, config_options, flag_of, read_option

    fields = {f.name: f for f in dataclasses.fields(FitConfig)}
    params = {p.name: p for p in fit_cmd.params}
    options = config_options()
    assert [p.name for p in fit_cmd.params if p.name in fields] == list(options)
    assert "source_config" not in params and "data_seed" not in params  # fields no option sets
    shown = "".join(_ok(invoke("fit", "--help")).stdout.split())  # whitespace aside: click wraps the lines
    for name, opt in options.items():
        param, default = params[name], _field_default(fields[name])
        assert flag_of(name) in param.opts and flag_of(name) in shown, name
        assert opt.help and "".join(opt.help.split()) in shown, name
        assert param.default == click_default(opt, default), name
        assert read_option(name, param.default) == default, name
        if opt.choices:
            assert tuple(param.type.choices) == opt.choices, name
        if isinstance(default, bool):
            assert param.is_flag and bool(param.secondary_opts) == default, name  # --no-X for what is on by default


def test_compare_shares_the_fit_options_it_sets():
    from pyroseg.cli.compare import SHARED, compare_cmd
    from pyroseg.cli.fit import fit_cmd

    fit = {p.name: p for p in fit_cmd.params}
    compare = {p.name: p for p in compare_cmd.params}
    for name in SHARED:
        a, b = fit[name], compare[name]
        assert (a.opts, a.default, type(a.type)) == (b.opts, b.default, type(b.type)), name
        assert a.help == b.help or name == "seed", name  # compare's --seed is the first of --seeds


def test_the_command_line_is_pyroseg_cli_and_no_top_level_cli(tmp_path):
    """Outside the repository, `import cli` finds nothing of ours; `pyroseg.cli.main` is the CLI."""
    code = ("import importlib.util, pyroseg.cli.main as m; "
            "print(importlib.util.find_spec('cli') is None, m.cli.name)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "cli"]
