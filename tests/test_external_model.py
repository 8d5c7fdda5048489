"""A model defined outside pyroseg (examples/my_models.py, the documentation's worked
example) plugs in by import path or entry point: trained by ``pyroseg fit``, opened by
``evaluate`` and ``sample`` through the import path its run records."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from pyroseg.cli.main import cli

from pyroseg.errors import UsageError
from pyroseg.models import MODELS, build_model, model_import_path, resolve_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
REF = "my_models:LatentShiftUNet"
TINY = [
    "--data", "synthetic-ambiguous", "--image-size", "32", "--synthetic-patients", "6", "--synthetic-slices", "8",
    "--epochs", "2", "--batch-size", "16", "--widths", "8,16,32,64", "--val-samples", "2", "--device", "cpu", "--quiet",
]  # fmt: skip


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


def _ok(res):
    assert res.exit_code == 0, f"exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    return res


@pytest.fixture()
def on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def test_the_example_is_a_proper_pyro_pair(on_path):
    model = build_model(REF, image_size=32, widths=(8, 16, 32, 64), latent_dim=3)
    assert model.name == "latent_shift_unet" and model.hparams()["latent_dim"] == 3
    image, mask = torch.rand(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.7).float()
    from pyro import poutine

    guide = poutine.trace(model.guide).get_trace(image, mask)
    tr = poutine.trace(poutine.replay(model.model, trace=guide)).get_trace(image, mask)
    assert tr.nodes["z"]["value"].shape == (2, 3) and tr.nodes["mask"]["is_observed"]
    assert torch.equal(tr.nodes["z"]["value"], guide.nodes["z"]["value"])
    with torch.no_grad():
        probs = model.sample(image, 5)
    assert probs.shape == (5, 2, 1, 32, 32) and 0 <= float(probs.min()) and float(probs.max()) <= 1
    assert model_import_path(model) == REF and model_import_path(MODELS["unet"]) is None


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny run of the example model, trained through `pyroseg fit --model my_models:LatentShiftUNet`."""
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(EXAMPLES))
    try:
        run = tmp_path_factory.mktemp("external") / "shift"
        _ok(invoke("fit", "--model", REF, "--out", str(run), *TINY))
    finally:
        mp.undo()
    return run


def test_fit_evaluate_and_sample_a_model_from_outside(on_path, trained, tmp_path):
    run = tmp_path / "shift"
    shutil.copytree(trained, run)
    doc = json.loads((run / "config.json").read_text())
    assert doc["fit"]["model"] == REF and doc["model"]["import_path"] == REF and doc["model"]["name"] == "latent_shift_unet"
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val_kl_z" in header  # the KL of its latent site is logged like any model's
    report_path = tmp_path / "report.json"
    res = _ok(invoke("evaluate", str(run), "--num-samples", "3", "--device", "cpu", "--json", str(report_path)))
    assert "latent_shift_unet on synthetic-ambiguous" in res.stdout
    rep = json.loads(report_path.read_text())
    assert rep["model"] == "latent_shift_unet" and rep["n_annotators"] == 4 and rep["kl_z"] > 0
    assert 0 <= rep["ged"] <= 2 and 0 <= rep["hm_iou"] <= 1
    # it defines no predict_at_mean: the mean-z point prediction is a one-line option error, the others work
    res = invoke("evaluate", str(run), "--num-samples", "3", "--device", "cpu", "--point", "mean-z")
    assert res.exit_code == 2 and "--point mean-z: latent_shift_unet does not say where its latents' mean is" in res.output
    _ok(invoke("evaluate", str(run), "--num-samples", "3", "--device", "cpu", "--point", "majority"))
    _ok(invoke("sample", str(run), "--split", "test", "--num-images", "1", "--num-samples", "2", "--out", str(tmp_path / "s")))
    assert list((tmp_path / "s").glob("*_grid.png"))
    _ok(invoke("fit", "--resume", str(run), "--epochs", "3", "--quiet"))  # --resume imports it again
    assert len((run / "metrics.csv").read_text().splitlines()) == 4


def test_entry_point(on_path, tmp_path, monkeypatch):
    """An installed package offers a model through the entry-point group pyroseg.models."""
    dist = tmp_path / "site" / "my_models_pkg-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-models-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[pyroseg.models]\nshift_unet = {REF}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    from my_models import LatentShiftUNet

    assert resolve_model("shift_unet") is LatentShiftUNet
    res = _ok(invoke("models"))
    assert "shift_unet" in res.stdout and REF in res.stdout
    res = invoke("fit", "--model", "no_such_model", "--out", str(tmp_path / "r"), *TINY)
    assert res.exit_code == 2 and "installed entry points (pyroseg.models): shift_unet" in res.stderr


@pytest.mark.parametrize("ref, words", [
    ("no_such_module:Model", ("'no_such_module:Model'", "no module named 'no_such_module'")),
    ("my_models:Missing", ("'my_models:Missing'", "has no 'Missing'")),
    ("my_models:F", ("'my_models:F'", "not a subclass of pyroseg.models.SegModel")),
    ("my_models:", ("'my_models:'", "expected an import path package.module:Class")),
])  # fmt: skip
def test_bad_import_paths_are_option_errors(on_path, tmp_path, ref, words):
    with pytest.raises(UsageError):
        resolve_model(ref)
    run = tmp_path / "r"
    res = invoke("fit", "--model", ref, "--out", str(run), *TINY)
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert res.exit_code == 2 and len(errors) == 1 and all(w in errors[0] for w in ("--model", *words)), res.stderr
    assert not run.exists()


def test_a_run_whose_module_is_gone_names_its_config(trained, monkeypatch):
    run = trained
    monkeypatch.setitem(sys.modules, "my_models", None)  # the module is gone: importing it fails
    res = invoke("evaluate", str(run), "--num-samples", "2", "--device", "cpu")
    assert res.exit_code == 1
    assert f"Error: {run}/config.json: cannot open its model '{REF}'" in res.stderr, res.stderr
