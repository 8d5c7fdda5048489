"""``compare_models``: one protocol for every model, one table."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from pyroseg.cli.main import cli

from pyroseg.compare import COLUMNS, compare_models, render_results, summarise
from pyroseg.config import FitConfig
from pyroseg.errors import UsageError
from pyroseg.runs import read_metrics_csv
from pyroseg.train import FitCallbacks


def _base(**kw):
    d = dict(data="synthetic", image_size=32, epochs=1, batch_size=16, synthetic_patients=6, synthetic_slices=8,
             val_samples=2, widths=(8, 16, 32, 64))
    d.update(kw)
    return FitConfig(**d)


def test_compare_trains_each_model_with_one_protocol(tmp_path):
    doc = compare_models(_base(), tmp_path, models=["unet", "vae"], num_samples=2)
    rows = doc["runs"]
    assert [r["model"] for r in rows] == ["unet", "vae"]
    md = (tmp_path / "comparison.md").read_text()
    for _, header in COLUMNS:
        assert header in md
    assert md.count("\n| unet |") == 1 and md.count("\n| vae |") == 1
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["config"]["epochs"] == 1 and len(saved["runs"]) == 2 and saved["seeds"] == [0]
    assert saved["runs"][1]["run"] == str(tmp_path / "vae" / "seed0")
    # identical protocol: the same split file for both models
    assert (tmp_path / "unet" / "seed0" / "split.json").read_text() == (tmp_path / "vae" / "seed0" / "split.json").read_text()
    cu = json.loads((tmp_path / "unet" / "seed0" / "config.json").read_text())["fit"]
    cv = json.loads((tmp_path / "vae" / "seed0" / "config.json").read_text())["fit"]
    assert {k: v for k, v in cu.items() if k not in ("model", "out")} == {k: v for k, v in cv.items() if k not in ("model", "out")}
    assert "elbo" in rows[1] and "elbo" not in rows[0]
    assert rows[0]["collapsed_sites"] == "n/a"
    # per-patient scores add up to the table's means
    pp = rows[0]["per_patient"]["dice_all"]
    assert sum(s for s, _ in pp.values()) / sum(c for _, c in pp.values()) == pytest.approx(rows[0]["dice_all"])
    assert sum(c for _, c in pp.values()) == rows[0]["n_slices"]
    # one seed: no spread, so no t-interval; the patient bootstrap still judges the difference
    st = {(s["model"], s["metric"]): s for s in saved["summary"]}
    assert st[("vae", "dice_all")]["n"] == 1 and st[("vae", "dice_all")]["lo"] != st[("vae", "dice_all")]["lo"]  # NaN
    d = {(x["model"], x["metric"]): x for x in saved["differences"]}[("vae", "dice_all")]
    assert d["diff"] == pytest.approx(rows[1]["dice_all"] - rows[0]["dice_all"]) and d["patients"]["n"] == rows[0]["n_patients"]
    # every ranked metric has its patient interval (none rests on the seeds alone)
    for x in saved["differences"]:
        assert x["patients"]["n"] == rows[0]["n_patients"], x["metric"]
    assert {"qubiq", "dice_raters", "dice_majority", "ece", "ece_lesion"} <= {x["metric"] for x in saved["differences"]}
    csv_text = (tmp_path / "comparison.csv").read_text()
    assert csv_text.startswith("model,metric,n_seeds,mean,sd,ci_lo,ci_hi") and "\nvae,dice_all,1," in csv_text
    text = (tmp_path / "comparison.json").read_text()
    assert len(text.splitlines()) == len(saved) + 2 + sum(len(saved[k]) + 1 for k in ("runs", "summary", "differences"))
    assert len(text) < 0.6 * len(json.dumps(saved, indent=2))  # one line per run, not indented
    header, vae = csv_text.splitlines()[0].split(","), next(r for r in csv_text.splitlines() if r.startswith("vae,dice_all,"))
    assert header[-2:] == ["converged", "runs"] and vae.split(",")[-2:] == [str(saved["converged"]["vae"][0]), "1"]
    assert (tmp_path / "comparison.png").stat().st_size > 5000


def test_compare_reuses_finished_runs(tmp_path):
    compare_models(_base(), tmp_path, models=["unet"], num_samples=1)
    before = (tmp_path / "unet" / "seed0" / "checkpoint.pt").stat().st_mtime_ns
    compare_models(_base(), tmp_path, models=["unet"], num_samples=1)
    assert (tmp_path / "unet" / "seed0" / "checkpoint.pt").stat().st_mtime_ns == before
    with pytest.raises(UsageError, match="other settings .*lr"):  # a run of another protocol is never reused
        compare_models(_base(lr=0.01), tmp_path, models=["unet"], num_samples=1)


def test_compare_reevaluates_a_report_of_another_point_prediction(tmp_path):
    """A cached evaluation.json is reused only when it scored the model's own point prediction
    (SSN: its logits' mean); a report of the samples' mean (as written before) is redone."""
    compare_models(_base(), tmp_path, models=["ssn"], baseline="ssn", num_samples=2)
    path = tmp_path / "ssn" / "seed0" / "evaluation.json"
    report = json.loads(path.read_text())
    assert report["point"] == "mean-z"
    compare_models(_base(), tmp_path, models=["ssn"], baseline="ssn", num_samples=2)
    assert json.loads(path.read_text()) == report  # reused as it is
    report["point"], report["dice_all"] = "mean", -1.0
    path.write_text(json.dumps(report))
    doc = compare_models(_base(), tmp_path, models=["ssn"], baseline="ssn", num_samples=2)
    again = json.loads(path.read_text())
    assert again["point"] == "mean-z" and again["dice_all"] >= 0 and doc["runs"][0]["dice_all"] == again["dice_all"]
    assert "point prediction = mean of 2 samples; ssn: the mask at its latents' mean" in render_results(tmp_path)


def test_compare_rejects_bad_options(tmp_path):
    with pytest.raises(UsageError, match="unknown"):
        compare_models(_base(), tmp_path, models=["unet", "gan"])
    with pytest.raises(UsageError, match="--baseline vae: not among"):
        compare_models(_base(), tmp_path, models=["unet"], baseline="vae")
    with pytest.raises(UsageError, match="--seeds 0"):
        compare_models(_base(), tmp_path, models=["unet"], seeds=0)
    with pytest.raises(UsageError, match="--caveat vae:...: vae is not among --models unet"):
        compare_models(_base(), tmp_path, models=["unet"], caveats={"vae": "x"})
    bad = CliRunner().invoke(cli, ["compare", "--models", "unet", "--caveat", "unet", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "Error: --caveat 'unet': expected MODEL:TEXT" in bad.output


def test_compare_cli(tmp_path):
    res = CliRunner().invoke(cli, ["compare", "--data", "synthetic", "--image-size", "32", "--epochs", "1",
                                   "--models", "unet", "--num-samples", "1", "--out", str(tmp_path), "-q"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "comparison.md").is_file()
    # the renderer regenerates comparison.md from comparison.json alone
    rendered = CliRunner().invoke(cli, ["compare", "--render", str(tmp_path)])
    assert rendered.exit_code == 0, rendered.output
    assert rendered.output == (tmp_path / "comparison.md").read_text()
    assert "Command: `pyroseg " in rendered.output
    bad = CliRunner().invoke(cli, ["compare", "--render", str(tmp_path / "nowhere")])
    assert bad.exit_code != 0 and "Error: --render" in bad.output and "no comparison.json" in bad.output
    bad = CliRunner().invoke(cli, ["compare", "--models", "unet"])
    assert bad.exit_code != 0 and "Error: --out: required" in bad.output


class _StopAt(FitCallbacks):
    """Interrupts the whole compare at its ``n``-th training step (counted over runs)."""

    def __init__(self, n):
        self.n, self.steps = n, 0

    def on_step(self, loss):
        self.steps += 1
        if self.steps == self.n:
            raise KeyboardInterrupt


def _tables(doc):
    """The numbers of the tables, without the timing (which no two runs share), as JSON (NaN == NaN)."""
    return json.dumps([[r for r in doc["summary"] if r["metric"] != "sec_per_epoch"], doc["differences"]], sort_keys=True)


def test_seeds_resume_and_render_round_trip(tmp_path):
    """Two models x 2 seeds x 2 epochs; an interrupted compare, run again, gives the same tables."""
    kw = dict(models=["unet", "vae"], seeds=2, num_samples=2, pictures=False)
    # 3 test patients to resample; the per-epoch diagnostics are not what is tested here
    base = _base(epochs=2, synthetic_patients=10, synthetic_slices=4, test_fraction=0.3, collapse_diagnostics=False)
    whole = compare_models(base, tmp_path / "whole", **kw)
    per_epoch = read_metrics_csv(tmp_path / "whole" / "unet" / "seed0" / "metrics.csv")[0]["step"]
    # stop in the 2nd epoch of the 3rd run (unet, seed 1) ...
    with pytest.raises(KeyboardInterrupt):
        compare_models(base, tmp_path / "cut", callbacks=_StopAt(int(4 * per_epoch + per_epoch + 1)), **kw)
    cut = tmp_path / "cut"
    assert len(json.loads((cut / "comparison.json").read_text())["runs"]) == 2  # whole seeds are tabulated as they finish
    assert (cut / "unet" / "seed1" / "checkpoint.pt").is_file() and not (cut / "vae" / "seed1").exists()
    kept = (cut / "vae" / "seed0" / "checkpoint.pt").stat().st_mtime_ns
    resumed = compare_models(base, cut, **kw)
    assert (cut / "vae" / "seed0" / "checkpoint.pt").stat().st_mtime_ns == kept  # a finished run is kept
    assert _tables(resumed) == _tables(whole)
    d = {(x["model"], x["metric"]): x for x in whole["differences"]}[("vae", "dice_all")]
    assert d["patients"]["n"] == 3 and d["seeds"]["n"] == 2
    # seeds vary the weights, not the data: one split for every run
    splits = {(cut / m / f"seed{s}" / "split.json").read_text() for m in ("unet", "vae") for s in (0, 1)}
    assert len(splits) == 1
    st = {(s["model"], s["metric"]): s for s in whole["summary"]}
    assert st[("vae", "dice_all")]["n"] == 2 and st[("vae", "dice_all")]["lo"] <= st[("vae", "dice_all")]["mean"]
    # the renderer round-trips: comparison.md is render_results(comparison.json)
    assert render_results(cut) == (cut / "comparison.md").read_text()
    assert "95 % t-interval (seeds)" in render_results(cut)


def test_vary_split_redraws_the_split_per_seed(tmp_path):
    doc = compare_models(_base(collapse_diagnostics=False), tmp_path, models=["unet"], seeds=2, vary_split=True,
                         num_samples=1, pictures=False)
    seeds = [json.loads((tmp_path / "unet" / f"seed{s}" / "split.json").read_text())["seed"] for s in (0, 1)]
    assert seeds == [0, 1] and doc["vary_split"]


def _fake_run(model, seed, dice_all, per_patient):
    return {"model": model, "seed": seed, "dice_all": dice_all, "ged": 1 - dice_all,
            "per_patient": {"dice_all": per_patient, "ged": {p: [c - s, c] for p, (s, c) in per_patient.items()}}}


def test_summarise_by_hand():
    """Hand-computed: the paired differences 0.2, 0.05, 0.2 over 3 seeds have a t-interval containing 0: a tie."""
    pp = {"a": [1.0, 2], "b": [0.5, 1], "c": [0.4, 1]}
    runs = [_fake_run("unet", s, v, pp) for s, v in zip((0, 1, 2), (0.6, 0.65, 0.7), strict=True)]
    runs += [_fake_run("vae", s, v, {"a": [1.5, 2], "b": [0.8, 1], "c": [0.68, 1]})
             for s, v in zip((0, 1, 2), (0.8, 0.7, 0.9), strict=True)]
    doc = summarise({"runs": runs, "seeds": [0, 1, 2], "baseline": "unet", "level": 0.95, "n_boot": 500})
    st = {(s["model"], s["metric"]): s for s in doc["summary"]}
    assert st[("unet", "dice_all")]["mean"] == pytest.approx(0.65) and st[("unet", "dice_all")]["sd"] == pytest.approx(0.05)
    d = {(x["model"], x["metric"]): x for x in doc["differences"]}
    dice_d = d[("vae", "dice_all")]
    assert dice_d["diff"] == pytest.approx(0.15)
    assert dice_d["seeds"]["lo"] == pytest.approx(-0.0651326, abs=1e-6) and dice_d["seeds"]["hi"] == pytest.approx(0.3651326, abs=1e-6)
    # patients pooled over 3 seeds: vae (4.5 + 2.4 + 2.04) / 12 - unet (3 + 1.5 + 1.2) / 12; every patient
    # gains 0.25-0.3, so the patient interval (t on 2 degrees of freedom, jackknife) excludes 0
    assert dice_d["patients"]["diff"] == pytest.approx((8.94 - 5.7) / 12) and dice_d["patients"]["lo"] > 0
    assert dice_d["verdict"] == "tie"  # the seeds' interval contains 0
    assert d[("vae", "ged")]["verdict"] == "tie" and d[("vae", "ged")]["diff"] == pytest.approx(-0.15)
    # a consistent gain over seeds and patients: GED lower is "better"
    for r in runs:
        if r["model"] == "vae":
            r["ged"] = 1 - 0.65 - 0.1 - 0.01 * r["seed"]
    doc = summarise(doc)
    assert {(x["model"], x["metric"]): x for x in doc["differences"]}[("vae", "ged")]["verdict"] == "better"
    # one seed: only the patient interval (every patient gains 0.25-0.3), and the verdict says so
    one = summarise({**doc, "runs": [r for r in runs if r["seed"] == 0], "seeds": [0]})
    d = {(x["model"], x["metric"]): x for x in one["differences"]}[("vae", "dice_all")]
    assert d["seeds"]["n"] == 1 and d["patients"]["lo"] > 0 and d["verdict"] == "better (1 seed)"


def test_a_verdict_without_patient_scores_says_so():
    """A metric whose reports have no per-patient scores gets its verdict from the seed interval
    alone, and the verdict says it was not tested by patient; the ECE's patient interval is
    computed from patients' reliability bins."""
    pp = {"a": [1.0, 2], "b": [0.5, 1], "c": [0.4, 1]}
    runs = [_fake_run("unet", s, v, pp) | {"qubiq": 0.5 + 0.01 * s} for s, v in enumerate((0.6, 0.65, 0.7))]
    runs += [_fake_run("vae", s, v, pp) | {"qubiq": 0.7 + 0.01 * s} for s, v in enumerate((0.6, 0.65, 0.7))]
    doc = summarise({"runs": runs, "seeds": [0, 1, 2], "baseline": "unet", "level": 0.95, "n_boot": 500})
    d = {(x["model"], x["metric"]): x for x in doc["differences"]}
    assert d[("vae", "qubiq")]["patients"]["n"] == 0 and d[("vae", "qubiq")]["verdict"] == "better (not tested by patient)"
    # per-patient reliability bins (2 bins: counts, sums of probabilities, sums of targets): vae is calibrated
    bins_u = {"a": [10, 0, 5, 0, 0, 0], "b": [0, 10, 0, 9, 0, 3], "c": [5, 5, 1, 4, 0, 2]}
    bins_v = {"a": [10, 0, 0.5, 0, 0.5, 0], "b": [0, 10, 0, 9, 0, 9], "c": [5, 5, 1, 4, 1, 4]}
    for r in runs:
        calibrated = r["model"] == "vae"
        r["ece"] = (0.02 if calibrated else 0.4) + 0.001 * r["seed"]
        r["per_patient"]["ece"] = bins_v if calibrated else bins_u
    d = {(x["model"], x["metric"]): x for x in summarise(doc)["differences"]}[("vae", "ece")]
    assert d["patients"]["n"] == 3 and d["patients"]["hi"] < 0 and d["verdict"] == "better"
    assert d["patients"]["diff"] == pytest.approx(0 - (abs(6 - 0) + abs(13 - 5)) / 30)  # pooled: counts 15, 15


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
    rows = compare_models(_base(data="synthetic-ambiguous"), tmp_path, models=["unet"], num_samples=3)["runs"]
    _check_ambiguous_rows(rows, ["unet"], tmp_path)
    doc = json.loads((tmp_path / "comparison.json").read_text())
    assert doc["runs"][-2]["model"] == "oracle" and doc["runs"][-2]["num_samples"] == 3


@pytest.mark.slow
def test_every_model_trains_and_is_judged_on_ambiguous_data(tmp_path):
    """Training draws one annotator per image per step; every model gets through fit and the
    distribution metrics on 4-annotator data."""
    from pyroseg.models import MODELS

    rows = compare_models(_base(data="synthetic-ambiguous"), tmp_path, models=list(MODELS), num_samples=4)["runs"]
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


def test_render_summary_keeps_the_asked_columns_and_names_only_supported_differences():
    """The README's short table: means (± sd) of the asked metrics and, per model, only the
    differences both intervals support; a tie says so, and an unknown column is refused."""
    from pyroseg.compare import render_markdown, render_summary

    meta = {"data": "synthetic-ambiguous", "image_size": 32, "n_patients": 3, "n_slices": 12}
    pp = {"a": [1.0, 2], "b": [0.5, 1], "c": [0.4, 1]}
    runs = [{**_fake_run("unet", s, v, pp), **meta} for s, v in zip((0, 1, 2), (0.6, 0.65, 0.7), strict=True)]
    runs += [{**_fake_run("vae", s, v, {"a": [1.5, 2], "b": [0.8, 1], "c": [0.68, 1]}), **meta}
             for s, v in zip((0, 1, 2), (0.8, 0.7, 0.9), strict=True)]
    for r in runs:
        if r["model"] == "vae":
            r["ged"] = 1 - 0.65 - 0.1 - 0.01 * r["seed"]  # better than unet on every seed and patient
    doc = summarise({"runs": runs, "seeds": [0, 1, 2], "baseline": "unet", "level": 0.95, "n_boot": 500,
                     "config": {"epochs": 3}, "num_samples": 4})
    md = render_summary(doc, ["dice_all", "ged"])
    lines = md.splitlines()
    assert lines[2] == "| model | converged | Dice (all slices) | GED | vs `unet` |"  # converged: "?" (not recorded here)
    unet = next(line for line in lines if line.startswith("| unet"))
    vae = next(line for line in lines if line.startswith("| vae"))
    assert "0.650 ± 0.050" in unet and unet.endswith("| reference |")
    assert vae.endswith("| ged better |")  # dice_all's seed interval contains 0: a tie, not listed
    assert "HM-IoU" not in md
    with pytest.raises(UsageError, match="--columns nope"):
        render_summary(doc, ["nope"])
    # a reader's caveat marks the model's row in both tables and is quoted under them
    doc["converged"] = {"unet": [3, 3], "vae": [3, 3]}
    doc["caveats"] = {"vae": "stopped on an oscillation"}
    doc.update(config=FitConfig(epochs=3).to_dict(), versions={}, vary_split=False)
    for text in (render_summary(doc, ["ged"]), render_markdown(doc)):
        rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
        assert "| 3/3 †" in rows["| vae"] and "†" not in rows["| unet"]
        assert "† `vae`: stopped on an oscillation" in text.splitlines()


def test_titles_name_the_data_set_not_the_path_of_the_machine_that_made_them():
    from pyroseg.comparison_report import data_name, shown_command

    assert data_name("/work/shared/data/qubiq-brain-growth/brain-growth") == "QUBIQ brain-growth"
    assert data_name("/data/qubiq/brain-tumor/Training", {"task": 2}) == "QUBIQ brain-tumor task 2"
    assert data_name("/data/kidney") == "QUBIQ kidney"
    assert data_name("/data/lidc/data_lidc.pickle") == "LIDC-IDRI crops"
    assert data_name("C:/datasets/LIDC-crops") == "LIDC-IDRI crops"
    assert data_name("/home/me/lgg-mri-segmentation/kaggle_3m") == "LGG (kaggle_3m)"
    assert data_name("synthetic-ambiguous") == "synthetic-ambiguous" and data_name("synthetic") == "synthetic"
    assert data_name("/somewhere/my-scans/") == "my-scans"
    doc = {"command": "pyroseg compare --data /work/shared/data/q/brain-growth --epochs 2 --out cmp",
           "config": {"data": "/work/shared/data/q/brain-growth"}}
    assert shown_command(doc) == "pyroseg compare --data /path/to/brain-growth --epochs 2 --out cmp"
    doc = {"command": "pyroseg compare --data synthetic --out cmp", "config": {"data": "synthetic"}}
    assert shown_command(doc) == doc["command"]


def test_stored_results_render_without_machine_paths_and_match_their_files():
    """docs/results/*/comparison.md and .csv are what this version writes from comparison.json
    (which keeps the recorded paths: it is the record); nothing rendered shows a machine's path."""
    from pathlib import Path

    from pyroseg.compare import render_markdown
    from pyroseg.comparison_report import comparison_csv

    results = sorted((Path(__file__).resolve().parents[1] / "docs" / "results").glob("*/comparison.json"))
    assert results
    for path in results:
        doc = json.loads(path.read_text())
        md = render_markdown(doc)
        spec = doc["config"]["data"]
        assert not spec.startswith("/") or spec not in md, path
        assert "/work/" not in md, path
        assert (path.parent / "comparison.md").read_text() == md, path
        assert (path.parent / "comparison.csv").read_text() == comparison_csv(doc), path


def test_the_figure_is_drawn_by_plots_from_the_document(tmp_path):
    from pyroseg.plots import comparison_figure

    doc = {"seeds": [0, 1], "level": 0.95, "summary": [
        {"model": m, "metric": "dice_all", "n": 2, "mean": v, "sd": 0.1, "lo": v - 0.1, "hi": v + 0.1, "values": [v - 0.05, v + 0.05]}
        for m, v in (("unet", 0.5), ("vae", 0.6))]}
    png = comparison_figure(doc, tmp_path / "c.png", metrics=["dice_all", "ged"])
    assert png == tmp_path / "c.png" and png.stat().st_size > 3000


def test_folds_test_every_patient_once_and_pool_patients_over_folds(tmp_path):
    """--folds 3: every patient is a test case in exactly one fold; the patient interval pools them all."""
    base = _base(synthetic_patients=6, synthetic_slices=4, collapse_diagnostics=False)
    doc = compare_models(base, tmp_path, models=["unet", "vae"], folds=3, num_samples=1, pictures=False)
    tested = []
    for k in range(3):
        split = json.loads((tmp_path / "unet" / "seed0" / f"fold{k}" / "split.json").read_text())
        assert split == json.loads((tmp_path / "vae" / "seed0" / f"fold{k}" / "split.json").read_text())
        assert not set(split["test"]) & (set(split["train"]) | set(split["val"]))
        tested += split["test"]
    assert len(tested) == 6 and len(set(tested)) == 6
    runs = [r for r in doc["runs"] if r["model"] == "unet"]
    assert [r["fold"] for r in runs] == [0, 1, 2] and runs[1]["run"] == str(tmp_path / "unet" / "seed0" / "fold1")
    assert sum(r["n_patients"] for r in runs) == 6
    d = {(x["model"], x["metric"]): x for x in doc["differences"]}[("vae", "dice_all")]
    assert d["patients"]["n"] == 6  # pooled over the folds: every patient
    assert d["seeds"]["n"] == 1  # one seed: its value is the mean over its folds
    assert d["diff"] == pytest.approx(sum(r["dice_all"] for r in doc["runs"] if r["model"] == "vae") / 3
                                      - sum(r["dice_all"] for r in runs) / 3)
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["folds"] == 3 and saved["config"]["folds"] == 3 and saved["converged"]["unet"][1] == 3
    md = (tmp_path / "comparison.md").read_text()
    assert "3-fold cross-validation by patient (6 patients" in md and "| converged |" in md
    assert (tmp_path / "comparison_curves.png").stat().st_size > 3000


def test_one_fold_keeps_the_single_split(tmp_path):
    from pyroseg.data.split import split_patients

    compare_models(_base(collapse_diagnostics=False), tmp_path, models=["unet"], num_samples=1, pictures=False)
    split = json.loads((tmp_path / "unet" / "seed0" / "split.json").read_text())
    ids = sorted(split["train"] + split["val"] + split["test"])
    assert {k: split[k] for k in ("train", "val", "test")} == split_patients(ids, val_fraction=0.15, test_fraction=0.15, seed=0)
    doc = json.loads((tmp_path / "comparison.json").read_text())
    assert doc["folds"] == 1 and doc["runs"][0]["fold"] == 0 and not (tmp_path / "unet" / "seed0" / "fold0").exists()


def _fake_history(run, *, curve=None, stop=None, scores=None, select_by="val_dice_tumour"):
    from pyroseg.runs import write_metrics_csv

    run.mkdir(parents=True, exist_ok=True)
    if curve is not None:
        (run / "training.json").write_text(json.dumps({
            "steps": int(curve[-1][0]), "epochs": len(curve), "stop_reason": stop, "select_by": select_by,
            "mode": "max", "val_every": None, "curve": curve, "best": {"step": 0, "score": 0.0}}))
    if scores is not None:
        write_metrics_csv(run / "metrics.csv", [{"epoch": i + 1, "step": 10 * (i + 1), select_by: s} for i, s in enumerate(scores)])


def test_converged_from_training_json_or_metrics_csv(tmp_path):
    from pyroseg.compare import run_convergence
    from pyroseg.comparison_stats import converged

    cfg = _base()
    rising = [[10 * (i + 1), 0.1 * i] for i in range(8)]
    _fake_history(tmp_path / "plateau", curve=rising, stop="plateau")  # stopped on a plateau: converged, whatever the curve
    _fake_history(tmp_path / "rising", curve=rising, stop="budget")
    flat = [[10 * (i + 1), s] for i, s in enumerate((0.1, 0.4, 0.6, 0.7, 0.75, 0.78, 0.781, 0.783))]
    _fake_history(tmp_path / "flat", curve=flat, stop="budget")
    _fake_history(tmp_path / "csv_rising", scores=[0.1 * i for i in range(8)])
    _fake_history(tmp_path / "csv_flat", scores=[0.1, 0.4, 0.6, 0.7, 0.75, 0.78, 0.781, 0.783])
    got = {name: run_convergence(tmp_path / name, cfg) for name in ("plateau", "rising", "flat", "csv_rising", "csv_flat")}
    assert {k: v["converged"] for k, v in got.items()} == {
        "plateau": True, "rising": False, "flat": True, "csv_rising": False, "csv_flat": True}
    assert got["csv_flat"]["curve"][-1] == [80.0, 0.783] and got["csv_flat"]["select_by"] == "val_dice_tumour"
    assert got["plateau"]["stop_reason"] == "plateau" and got["csv_flat"]["stop_reason"] is None
    # a loss falls: "min"; a gain of 0.004 is under the absolute tolerance, 0.02 of 0.5 is over the relative one
    assert converged([[1, 1.0], [2, 0.5], [3, 0.5], [4, 0.496]], "min") is True
    assert converged([[1, 1.0], [2, 0.5], [3, 0.5], [4, 0.48]], "min") is False
    assert converged([[1, 0.5]], "max") is False  # one validation: cannot tell
    # the tables count them per model, mark the unconverged one, and old documents say "?"
    from pyroseg.compare import render_summary

    meta = {"data": "synthetic", "image_size": 32, "n_patients": 2, "n_slices": 8}
    pp = {"a": [1.0, 2], "b": [0.5, 1]}
    runs = [{**_fake_run(m, s, 0.5, pp), **meta, "converged": m == "unet" or s == 0} for m in ("unet", "vae") for s in (0, 1)]
    doc = summarise({"runs": runs, "seeds": [0, 1], "baseline": "unet", "level": 0.95, "n_boot": 100,
                     "config": {"epochs": 3}, "num_samples": 4})
    assert doc["converged"] == {"unet": [2, 2], "vae": [1, 2]}
    md = render_summary(doc, ["dice_all"])
    assert "| unet | 2/2 |" in md and "| vae | 1/2 * |" in md and "not converged in every run" in md
    old = summarise({**doc, "runs": [{k: v for k, v in r.items() if k != "converged"} for r in runs]})
    md = render_summary(old, ["dice_all"])
    assert "converged" not in old and "| unet | ? |" in md and "not converged in every run" not in md


def test_protocol_options_are_recorded_and_a_rerun_with_others_refuses(tmp_path):
    args = ["compare", "--data", "synthetic", "--image-size", "32", "--epochs", "1", "--models", "vae", "--baseline", "vae",
            "--num-samples", "1", "--out", str(tmp_path), "-q", "--augment", "flip",
            "--lr-schedule", "cosine"]
    res = CliRunner().invoke(cli, args + ["--model-arg", "vae:latent_dim=3"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "comparison.json").read_text())
    assert doc["config"]["augment"] == "flip" and doc["config"]["lr_schedule"] == "cosine"
    assert doc["model_args"] == {"vae": {"latent_dim": 3}}
    fit = json.loads((tmp_path / "vae" / "seed0" / "config.json").read_text())["fit"]
    assert fit["augment"] == "flip" and fit["model_args"] == {"latent_dim": 3}
    again = CliRunner().invoke(cli, [*args[:-4], "--augment", "none", "--lr-schedule", "cosine", "--model-arg", "vae:latent_dim=3"])
    assert again.exit_code != 0 and "other settings (augment)" in again.output
    again = CliRunner().invoke(cli, [*args, "--model-arg", "vae:latent_dim=4"])
    assert again.exit_code != 0 and "other settings (model_args)" in again.output
    bad = CliRunner().invoke(cli, [*args, "--model-arg", "unet:latent_dim=3"])
    assert bad.exit_code != 0 and "--model-arg unet" in bad.output
    bad = CliRunner().invoke(cli, [*args, "--model-arg", "latent_dim=3"])
    assert bad.exit_code != 0 and "MODEL:KEY=VALUE" in bad.output


def test_compare_passes_on_the_fit_options_of_the_protocol():
    """The protocol options of compare are fit's (generated from the same FitConfig fields)."""
    from pyroseg.cli.compare import PROTOCOL, compare_cmd
    from pyroseg.cli.fit import fit_cmd

    fit = {p.name: p for p in fit_cmd.params}
    compare = {p.name: p for p in compare_cmd.params}
    assert {"augment", "raters", "lr_schedule", "lr_warmup", "beta", "objective", "geco_kappa", "free_bits", "select_by",
            "patience"} <= set(PROTOCOL)
    for name in PROTOCOL:
        a, b = fit[name], compare[name]
        assert (a.opts, a.default, type(a.type), a.help) == (b.opts, b.default, type(b.type), b.help), name
    assert "model_arg" in compare and "folds" in compare and "fold" not in compare


def test_run_state_reads_what_a_run_trained_from_its_training_record(tmp_path):
    """A run is finished when it stopped on a plateau or trained its budget (steps when
    --max-steps is given, else epochs), read from training.json; otherwise it is resumed."""
    from pyroseg.compare import run_state

    run = tmp_path / "r"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    (run / "config.json").write_text(json.dumps({"fit": {"val_every": 5}}))
    (run / "metrics.csv").write_text("epoch,step,train_time_s\n" + "".join(f"{i / 2},{5 * i},1\n" for i in range(1, 9)))
    assert run_state(run, epochs=3) == "partial"  # 8 rows of --val-every 5 are not 8 epochs
    (run / "training.json").write_text(json.dumps({"steps": 40, "epochs": 4.0, "stop_reason": "budget"}))
    assert run_state(run, epochs=3) == "finished" and run_state(run, epochs=5) == "partial"
    assert run_state(run, epochs=3, max_steps=40) == "finished" and run_state(run, epochs=3, max_steps=80) == "partial"
    (run / "training.json").write_text(json.dumps({"steps": 10, "epochs": 1.0, "stop_reason": "plateau"}))
    assert run_state(run, epochs=50, max_steps=1000) == "finished"
    assert run_state(tmp_path / "none", epochs=1) == "absent"
