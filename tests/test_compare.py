"""``compare_models``: one protocol for every model, one table."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli.main import cli
from pyroseg.compare import COLUMNS, compare_models
from pyroseg.config import FitConfig
from pyroseg.errors import UsageError


def _base(**kw):
    d = dict(data="synthetic", image_size=32, epochs=1, batch_size=16, synthetic_patients=6, synthetic_slices=8,
             val_samples=2, widths=(8, 16, 32, 64))
    d.update(kw)
    return FitConfig(**d)


def test_compare_trains_each_model_with_one_protocol(tmp_path):
    rows = compare_models(_base(), tmp_path, models=["unet", "vae"], num_samples=2)
    assert [r["model"] for r in rows] == ["unet", "vae"]
    md = (tmp_path / "comparison.md").read_text()
    for _, header in COLUMNS:
        assert header in md
    assert md.count("\n| unet") == 1 and md.count("\n| vae") == 1
    doc = json.loads((tmp_path / "comparison.json").read_text())
    assert doc["config"]["epochs"] == 1 and len(doc["rows"]) == 2
    # identical protocol: the same split file for both models
    assert (tmp_path / "unet" / "split.json").read_text() == (tmp_path / "vae" / "split.json").read_text()
    cu = json.loads((tmp_path / "unet" / "config.json").read_text())["fit"]
    cv = json.loads((tmp_path / "vae" / "config.json").read_text())["fit"]
    assert {k: v for k, v in cu.items() if k not in ("model", "out")} == {k: v for k, v in cv.items() if k not in ("model", "out")}
    assert "elbo" in rows[1] and "elbo" not in rows[0]
    assert rows[0]["collapsed_sites"] == "n/a"


def test_compare_reuses_finished_runs(tmp_path):
    compare_models(_base(), tmp_path, models=["unet"], num_samples=1)
    before = (tmp_path / "unet" / "checkpoint.pt").stat().st_mtime_ns
    compare_models(_base(), tmp_path, models=["unet"], num_samples=1)
    assert (tmp_path / "unet" / "checkpoint.pt").stat().st_mtime_ns == before


def test_compare_rejects_unknown_models(tmp_path):
    with pytest.raises(UsageError, match="unknown"):
        compare_models(_base(), tmp_path, models=["unet", "gan"])


def test_compare_cli(tmp_path):
    res = CliRunner().invoke(cli, ["compare", "--data", "synthetic", "--image-size", "32", "--epochs", "1",
                                   "--models", "unet", "--num-samples", "1", "--out", str(tmp_path), "-q"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "comparison.md").is_file()


def _check_ambiguous_rows(rows, models, tmp_path):
    assert [r["model"] for r in rows] == [*models, "oracle", "oracle (one mask)"]
    md = (tmp_path / "comparison.md").read_text()
    for header in ("GED", "GED (unbiased)", "HM-IoU", "diversity", "ECE"):
        assert f"| {header} |" in md
    assert md.count("\n| oracle |") == 1 and md.count("\n| oracle (one mask) |") == 1 and "'oracle': samples of the true annotator distribution" in md
    for r in rows:
        assert r["n_annotators"] == 4
        for k in ("ged", "ged_unbiased", "hm_iou", "sample_diversity", "ece"):
            assert isinstance(r[k], float) and r[k] == r[k], (r["model"], k)  # finite, not NaN
    by = {r["model"]: r for r in rows}
    assert by["unet"]["sample_diversity"] == 0.0
    assert by["oracle"]["sample_diversity"] > 0 and by["oracle"]["n_slices"] == by["unet"]["n_slices"]
    one = by["oracle (one mask)"]
    assert one["sample_diversity"] == 0 and one["num_samples"] == 1 and one["ece"] == by["oracle"]["ece"]
    assert one["ged_unbiased"] > by["oracle"]["ged_unbiased"]  # one mask cannot be the distribution
    assert (tmp_path / "comparison_reliability.png").stat().st_size > 5000


def test_compare_on_ambiguous_data_adds_the_oracle(tmp_path):
    rows = compare_models(_base(data="synthetic-ambiguous"), tmp_path, models=["unet"], num_samples=3)
    _check_ambiguous_rows(rows, ["unet"], tmp_path)
    doc = json.loads((tmp_path / "comparison.json").read_text())
    assert doc["rows"][-2]["model"] == "oracle" and doc["rows"][-2]["num_samples"] == 3


@pytest.mark.slow
def test_every_model_trains_and_is_judged_on_ambiguous_data(tmp_path):
    """Training draws one annotator per image per step; every model gets through fit and the
    distribution metrics on 4-annotator data."""
    from pyroseg.models import MODELS

    rows = compare_models(_base(data="synthetic-ambiguous"), tmp_path, models=list(MODELS), num_samples=4)
    _check_ambiguous_rows(rows, list(MODELS), tmp_path)


def test_collapsed_sites_by_kl_or_by_units_and_effect():
    from pyroseg.compare import collapsed_sites

    assert collapsed_sites({"dice_all": 0.9}) == "n/a"
    alive = {"kl_z": 5.0, "au_z": 3, "effect_z": 0.2}
    assert collapsed_sites(alive) == "-"
    assert collapsed_sites({**alive, "kl_z": 0.05}) == "z"  # KL alone
    # nats in an offset that no input moves: 0 active units and no effect
    assert collapsed_sites({"kl_z": 5.0, "au_z": 0, "effect_z": 0.001}) == "z"
    assert collapsed_sites({"kl_z": 5.0, "au_z": 0, "effect_z": 0.05}) == "-"  # it still changes the prediction
    assert collapsed_sites({"kl_z": 5.0}) == "-"  # diagnostics skipped: KL is all there is
    three = {"kl_z_3": 0.01, "kl_z_2": 2.0, "au_z_2": 0, "effect_z_2": 0.0, "kl_z_1": 3.0, "au_z_1": 7, "effect_z_1": 0.1}
    assert collapsed_sites(three) == "z_3,z_2"
