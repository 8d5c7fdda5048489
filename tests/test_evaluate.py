"""Evaluation of mask distributions: the plumbing from predictions to GED / HM-IoU / ECE,
the oracle that samples the true annotator distribution, and ``evaluate_run`` on
multi-annotator data."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch

from pyroseg.config import FitConfig
from pyroseg.data.core import SegDataset
from pyroseg.data.synthetic import make_synthetic, make_synthetic_ambiguous, oracle_probabilities
from pyroseg.errors import UsageError
from pyroseg.evaluate import (
    ORACLE,
    evaluate_oracle,
    evaluate_run,
    evaluate_run_oracle,
    reliability_png_for,
    score_predictions,
)
from pyroseg.metrics import ged, hm_iou, sample_diversity
from pyroseg.models import build_model
from pyroseg.predict import Predictions, predict_dataset
from pyroseg.train import fit

SIZE, PATIENTS, SLICES = 32, 4, 6


@pytest.fixture(scope="module")
def amb():
    return make_synthetic_ambiguous(SIZE, n_patients=PATIENTS, slices_per_patient=SLICES, seed=1)


def test_annotations_scored_as_samples_are_perfect(amb):
    """Samples = the annotators themselves and mean = their pixel frequency: GED 0, HM-IoU 1, ECE 0."""
    masks = torch.from_numpy(amb.masks)  # (N, A, H, W)
    from pyroseg.metrics import DistributionAccumulator

    acc = DistributionAccumulator()
    acc.update(masks, masks)
    pred = Predictions(mean=amb.masks.mean(1).astype(np.float32), samples=None, terms={}, distribution=acc.per_image())
    rep = score_predictions(pred, amb)
    assert rep["ged"] == pytest.approx(0.0, abs=1e-6)
    assert rep["hm_iou"] == pytest.approx(1.0)
    assert rep["ece"] == pytest.approx(0.0, abs=1e-9)
    assert rep["n_annotators"] == 4 and rep["n_slices"] == PATIENTS * SLICES
    # the annotators disagree, so their diversity is that of the samples, and positive
    assert rep["sample_diversity"] == pytest.approx(rep["annotator_diversity"]) and rep["sample_diversity"] > 0.05
    curve = rep["reliability"]
    assert sum(curve["count"]) == amb.masks[:, 0].size and len(curve["edges"]) == 11


def test_oracle_scores_the_true_distribution(amb):
    rep = evaluate_oracle(amb, num_samples=16)
    assert rep["model"] == ORACLE and rep["num_samples"] == 16 and rep["n_slices"] == PATIENTS * SLICES
    # fresh draws from the annotators' own distribution: diverse, close to them, and calibrated
    assert 0 <= rep["ged"] < 0.3 and rep["hm_iou"] > 0.6
    assert rep["sample_diversity"] > 0.05
    assert abs(rep["ged_unbiased"]) < 0.1  # unbiased: 0 in expectation
    assert rep["ece"] < 0.01
    # biased estimator = unbiased + (1/S) E d(S,S') + (1/A) E d(Y,Y'), slice by slice, hence on average
    expected = rep["ged_unbiased"] + rep["sample_diversity"] / 16 + rep["annotator_diversity"] / 4
    assert rep["ged"] == pytest.approx(expected, abs=1e-5)
    # its mean probability is the exact marginal: Dice of that against annotator 1 is what the report shows
    probs = oracle_probabilities(SIZE, n_patients=PATIENTS, slices_per_patient=SLICES, seed=1)
    from pyroseg.metrics import segmentation_report

    ref = segmentation_report(torch.from_numpy(probs), torch.from_numpy(amb.masks[:, 0]), amb.patients)
    assert rep["dice_all"] == pytest.approx(ref["dice_all"])
    # reproducible from its seed; another seed draws other masks
    assert evaluate_oracle(amb, num_samples=16)["ged"] == rep["ged"]
    assert evaluate_oracle(amb, num_samples=16, sample_seed=1)["ged"] != rep["ged"]


def test_oracle_on_some_patients_is_the_oracle_of_their_slices(amb):
    two = amb.patient_ids[1:3]
    rep = evaluate_oracle(amb, two, num_samples=4)
    assert rep["n_patients"] == 2 and rep["n_slices"] == 2 * SLICES


def test_oracle_needs_ambiguous_data():
    plain = make_synthetic(SIZE, n_patients=2, slices_per_patient=2)
    with pytest.raises(UsageError, match="synthetic-ambiguous"):
        evaluate_oracle(plain)
    amb = make_synthetic_ambiguous(SIZE, n_patients=2, slices_per_patient=2)
    with pytest.raises(UsageError, match="--num-samples"):
        evaluate_oracle(amb, num_samples=0)


def test_predict_dataset_scores_the_distribution_it_samples(amb):
    """The per-image values equal the metric functions applied to the kept samples."""
    torch.manual_seed(0)
    model = build_model("prob_unet", image_size=SIZE, widths=(8, 16, 32, 64))
    torch.manual_seed(1)
    pred = predict_dataset(model, amb, num_samples=5, batch_size=7, keep_samples=True, distribution=True, with_terms=False)
    samples = torch.from_numpy(pred.samples)  # (N, 5, H, W)
    masks = torch.from_numpy(amb.masks)
    assert samples.shape == (len(amb), 5, SIZE, SIZE)
    np.testing.assert_allclose(pred.distribution["ged"], ged(samples, masks).numpy(), atol=1e-6)
    np.testing.assert_allclose(pred.distribution["ged_unbiased"], ged(samples, masks, unbiased=True).numpy(), atol=1e-6)
    np.testing.assert_allclose(pred.distribution["hm_iou"], hm_iou(samples, masks).numpy(), atol=1e-6)
    np.testing.assert_allclose(pred.distribution["sample_diversity"], sample_diversity(samples).numpy(), atol=1e-6)
    # the default path computes none of it
    assert predict_dataset(model, amb, num_samples=2, with_terms=False).distribution == {}


def test_point_predictions_majority_and_mean_z(amb):
    """``point="majority"``: the share of the kept thresholded samples per pixel; ``"mean-z"``:
    the model's :meth:`predict_at_mean`, not the mean of the samples; anything else: an error."""
    torch.manual_seed(0)
    model = build_model("prob_unet", image_size=SIZE, widths=(8, 16, 32, 64)).eval()
    with torch.no_grad():  # a prior wide enough that the samples differ
        for p in model.prior_net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    torch.manual_seed(1)
    vote = predict_dataset(model, amb, num_samples=5, batch_size=7, keep_samples=True, with_terms=False,
                           point="majority")
    np.testing.assert_allclose(vote.mean, vote.samples.astype(np.float32).mean(1), atol=1e-6)
    mean_z = predict_dataset(model, amb, num_samples=5, batch_size=7, with_terms=False, point="mean-z")
    ds = SegDataset(amb)
    expected = model.predict_at_mean(ds.__getitems__(list(range(len(ds))))["image"])[:, 0].numpy()
    np.testing.assert_allclose(mean_z.mean, expected, atol=1e-5)
    torch.manual_seed(1)
    mean = predict_dataset(model, amb, num_samples=5, batch_size=7, with_terms=False)
    assert np.abs(mean.mean - mean_z.mean).max() > 1e-3
    with pytest.raises(ValueError, match="point: expected one of auto, mean, majority, mean-z"):
        predict_dataset(model, amb, num_samples=2, with_terms=False, point="median")


def test_point_auto_is_the_models_own(amb):
    """``point="auto"`` (the default): SSN's logits' mean, as its reference predicts; the
    mean of the samples for the other models (here the Probabilistic U-Net)."""
    for name, own in (("ssn", "mean-z"), ("prob_unet", "mean")):
        torch.manual_seed(0)
        model = build_model(name, image_size=SIZE, widths=(8, 16, 32, 64)).eval()
        assert model.point_prediction == own
        torch.manual_seed(1)
        auto = predict_dataset(model, amb, num_samples=3, batch_size=7, with_terms=False)
        torch.manual_seed(1)
        explicit = predict_dataset(model, amb, num_samples=3, batch_size=7, with_terms=False, point=own)
        torch.manual_seed(1)
        other = predict_dataset(model, amb, num_samples=3, batch_size=7, with_terms=False,
                                point="mean" if own == "mean-z" else "mean-z")
        np.testing.assert_array_equal(auto.mean, explicit.mean)
        assert np.abs(auto.mean - other.mean).max() > 1e-3, name


def test_posterior_dice_is_the_guides_draw_replayed(amb):
    """``elbo_terms(posterior_dice=True)``: the Dice of the mask site's mean under the guide's
    draw (given the mask), the same draw as a trace of the guide replayed through the model."""
    from pyro import poutine

    from pyroseg.metrics import dice
    from pyroseg.predict import elbo_terms

    torch.manual_seed(0)
    model = build_model("prob_unet", image_size=SIZE, widths=(8, 16, 32, 64)).eval()
    batch = SegDataset(amb).__getitems__(list(range(8)))
    image, mask = batch["image"], batch["mask"]
    pyro.set_rng_seed(3)
    got = elbo_terms(model, image, mask, posterior_dice=True)["dice_posterior"]
    pyro.set_rng_seed(3)
    guide_trace = poutine.trace(model.guide).get_trace(image, mask)
    probs = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(image, mask).nodes["mask"]["fn"].mean
    torch.testing.assert_close(got, dice(probs >= 0.5, mask >= 0.5))
    assert got.shape == (8,) and "dice_posterior" not in elbo_terms(model, image, mask)
    # only when asked: the validation rows (metrics.csv) keep their columns
    assert "dice_posterior" not in predict_dataset(model, amb, num_samples=2).terms
    assert "dice_posterior" in predict_dataset(model, amb, num_samples=2, posterior_dice=True).terms


def test_unet_samples_are_one_mask(amb):
    model = build_model("unet", image_size=SIZE, widths=(8, 16, 32, 64))
    pred = predict_dataset(model, amb, num_samples=16, distribution=True, with_terms=False)
    assert (pred.distribution["sample_diversity"] == 0).all()
    # GED of one mask = GED of that mask repeated: the within-sample term is 0 either way
    assert np.isfinite(pred.distribution["ged"]).all()


@pytest.fixture(scope="module")
def amb_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("amb") / "prob_unet"
    cfg = FitConfig(model="prob_unet", data="synthetic-ambiguous", out=str(out), image_size=SIZE, epochs=1,
                    batch_size=16, synthetic_patients=6, synthetic_slices=4, val_samples=2, widths=(8, 16, 32, 64),
                    device="cpu")
    return fit(cfg, pictures=False)


def test_evaluate_run_with_oracle_and_reliability_diagram(amb_run, tmp_path):
    png = reliability_png_for(tmp_path / "report.json")
    assert png == tmp_path / "report_reliability.png"
    rep = evaluate_run(amb_run, num_samples=3, device="cpu", oracle=True, reliability_png=png)
    for k in ("ged", "ged_unbiased", "hm_iou", "sample_diversity", "ece"):
        assert math.isfinite(rep[k]), k
    assert rep["n_annotators"] == 4 and rep["num_samples"] == 3
    orc = rep[ORACLE]
    assert orc["n_slices"] == rep["n_slices"] and orc["num_samples"] == 3
    assert orc["ged"] < rep["ged"]  # one epoch of training does not beat the truth
    assert png.is_file() and png.stat().st_size > 5000
    # the same oracle, straight from the run folder
    assert evaluate_run_oracle(amb_run, num_samples=3)["ged"] == orc["ged"]
    # sampling is seeded: the same call gives the same numbers, another seed other samples
    again = evaluate_run(amb_run, num_samples=3, device="cpu")
    assert again["ged"] == rep["ged"] and again["sample_diversity"] == rep["sample_diversity"]
    other = evaluate_run(amb_run, num_samples=3, device="cpu", seed=1)
    assert other["seed"] == 1 and other["elbo"] != rep["elbo"]  # z drawn anew (samples may all be empty yet)
    assert again["elbo"] == rep["elbo"]


def test_evaluate_run_oracle_needs_ambiguous_data(amb_run):
    with pytest.raises(UsageError, match="--oracle"):
        evaluate_run(amb_run, data="synthetic", num_samples=1, device="cpu", oracle=True)


def test_ece_all_pixels_and_in_the_lesion_region_hand_counted():
    """One 4x4 slice, 2 annotators: both mark (0, 0), one marks (0, 1). The model gives (0, 0) 0.95,
    (0, 1) 0.55, a false alarm of 0.25 at (3, 3) and 0.01 elsewhere."""
    from pyroseg.data.core import SegData

    masks = np.zeros((1, 2, 4, 4), np.uint8)
    masks[0, :, 0, 0] = 1
    masks[0, 0, 0, 1] = 1
    mean = np.full((1, 4, 4), 0.01, np.float32)
    mean[0, 0, 0], mean[0, 0, 1], mean[0, 3, 3] = 0.95, 0.55, 0.25
    data = SegData(np.zeros((1, 3, 4, 4), np.uint8), masks, np.array(["p"]), np.array([0]))
    rep = score_predictions(Predictions(mean=mean, samples=None, terms={}), data)
    # all pixels: 13 x |0.01 - 0| + |0.25 - 0| + |0.55 - 0.5| + |0.95 - 1|, over 16
    assert rep["ece"] == pytest.approx((13 * 0.01 + 0.25 + 0.05 + 0.05) / 16, rel=1e-5)
    # lesion region: the two marked pixels and the false alarm (p >= 0.05)
    assert rep["lesion_region_pixels"] == pytest.approx(3 / 16)
    assert rep["ece_lesion"] == pytest.approx((0.25 + 0.05 + 0.05) / 3, rel=1e-5)
    assert rep["reliability"]["count"] == [13, 0, 1, 0, 0, 1, 0, 0, 0, 1]


def test_oracle_one_mask_is_the_thresholded_marginal(amb):
    rep = evaluate_oracle(amb, one_mask=True)
    assert rep["model"] == "oracle (one mask)" and rep["num_samples"] == 1 and rep["sample_diversity"] == 0
    probs = oracle_probabilities(SIZE, n_patients=PATIENTS, slices_per_patient=SLICES, seed=1)
    one = torch.from_numpy(probs >= 0.5)[:, None]  # (N, 1, H, W)
    masks = torch.from_numpy(amb.masks)
    assert rep["ged"] == pytest.approx(float(ged(one, masks).mean()), abs=1e-6)
    assert rep["hm_iou"] == pytest.approx(float(hm_iou(one, masks).mean()), abs=1e-6)
    # the same mean probability as the oracle's, so the same calibration
    assert rep["ece"] == evaluate_oracle(amb, num_samples=2)["ece"]


def test_multi_annotator_runs_select_best_by_validation_ged(amb_run):
    best = torch.load(amb_run / "best.pt", weights_only=True)["best"]
    assert best["metric"] == "val_ged" and best["epoch"] == 1 and math.isfinite(best["value"])


def test_evaluate_uses_best_pt_by_default_and_says_so(tmp_path):
    """A run whose best.pt holds epoch 1 and checkpoint.pt epoch 2: evaluate scores
    best.pt unless told --checkpoint last, and names the file it used."""
    from click.testing import CliRunner
    from pyroseg.cli.main import cli

    from pyroseg.checkpoint import save_checkpoint

    cfg = FitConfig(model="unet", out=str(tmp_path / "run"), image_size=SIZE, epochs=1, batch_size=16, synthetic_patients=6,
                    synthetic_slices=8, widths=(8, 16, 32, 64), val_samples=1, device="cpu", select_by="val_loss")
    run = fit(cfg, pictures=False)
    first = torch.load(run / "checkpoint.pt", weights_only=True)
    fit(FitConfig(out=str(run), epochs=2), resume=True, pictures=False)
    save_checkpoint(run / "best.pt", {"model_name": "unet", "hparams": first["hparams"], "model_state": first["model_state"],
                                      "epoch": 1, "best": {"metric": "val_loss", "value": 1.0, "epoch": 1},
                                      "config": first["config"]})
    best = evaluate_run(run, num_samples=1, device="cpu", collapse_samples=0)
    last = evaluate_run(run, num_samples=1, device="cpu", collapse_samples=0, checkpoint="last")
    assert best["checkpoint"] == "best.pt (best by val_loss 1, epoch 1)" and best["epochs_trained"] == 1
    assert last["checkpoint"] == "checkpoint.pt (last, epoch 2)" and last["epochs_trained"] == 2
    assert best["nll"] != last["nll"]  # other weights, other scores
    res = CliRunner().invoke(cli, ["evaluate", str(run), "--device", "cpu", "--num-samples", "1", "--collapse-samples", "0"])
    assert res.exit_code == 0, res.output
    assert "weights: best.pt (best by val_loss 1, epoch 1)" in res.output
    (run / "best.pt").unlink()
    assert evaluate_run(run, num_samples=1, device="cpu", collapse_samples=0)["checkpoint"] == (
        "checkpoint.pt (last, epoch 2); the run has no best.pt")
    res = CliRunner().invoke(cli, ["evaluate", str(run), "--device", "cpu", "--checkpoint", "best"])
    assert res.exit_code == 2 and "Error: --checkpoint best:" in res.output and "no best.pt" in res.output
# --------------------------------------------------------------------------- real raters: the references

from pyroseg.data.core import SegData  # noqa: E402
from pyroseg.evaluate import MAJORITY, ORACLE_ONE_MASK, RATERS_LOO, evaluate_reference, reference_names  # noqa: E402


def _raters(counts=(2, 2)) -> SegData:
    """Two slices of two patients, 4x4: rater 0 marks the top 2 rows, rater 1 the top row (IoU 0.5);
    a third slot is padding."""
    masks = np.zeros((2, 3, 4, 4), np.uint8)
    masks[:, 0, :2] = 1
    masks[:, 1, :1] = 1
    return SegData(np.zeros((2, 1, 4, 4), np.uint8), masks, np.array(["a", "b"]), np.zeros(2, int),
                   rater_counts=np.array(counts))


def test_reference_names_by_data():
    amb = make_synthetic_ambiguous(SIZE, n_patients=2, slices_per_patient=2, seed=0)
    assert reference_names(amb) == (ORACLE, ORACLE_ONE_MASK)
    assert reference_names(_raters()) == (RATERS_LOO, MAJORITY)
    assert reference_names(make_synthetic(SIZE, n_patients=2, slices_per_patient=2)) == ()


def test_leave_one_out_by_hand():
    """Each rater against the other: one mask against one, d = 1 - IoU = 0.5, so GED = 2 x 0.5 = 1,
    HM-IoU 0.5; Dice of 2 rows vs 1 row = 2/3; the padded slot is never a rater."""
    r = evaluate_reference(_raters(), RATERS_LOO)
    assert r["n_pairs"] == 4 and r["n_slices"] == 2 and r["model"] == RATERS_LOO
    assert r["ged"] == pytest.approx(1.0) and r["hm_iou"] == pytest.approx(0.5)
    assert r["dice_raters"] == pytest.approx(2 / 3) and r["dice_majority"] == pytest.approx(2 / 3)
    assert r["qubiq"] == pytest.approx(2 / 3)  # one other rater: its mean is its mask
    assert r["raters_per_slice"] == [1, 1]


def test_majority_vote_by_hand():
    """The majority of 2 raters (a tie counts) is rater 0's 2 rows: Dice 1 with it and the majority,
    2/3 with rater 1; GED = 2 E d(S, Y) - 0 - E d(Y, Y') = 2 (0 + 0.5) / 2 - (0 + 0.5 + 0.5 + 0) / 4 = 0.25."""
    r = evaluate_reference(_raters(), MAJORITY)
    assert r["dice_majority"] == 1.0 and r["dice_raters"] == pytest.approx((1 + 2 / 3) / 2)
    assert r["dice_per_rater"][:2] == pytest.approx([1.0, 2 / 3]) and math.isnan(r["dice_per_rater"][2])
    assert r["ged"] == pytest.approx(0.25) and r["hm_iou"] == pytest.approx(0.75)
    # rater mean: row 0 = 1, row 1 = 0.5; the majority says 1 on both rows: the 4 px of row 1 are off
    # by 0.5, out of 16 px: ECE 0.125
    assert r["ece"] == pytest.approx(0.125)


def test_one_rater_slices_have_no_leave_one_out_pair():
    r = evaluate_reference(_raters((1, 2)), RATERS_LOO, ["a", "b"])
    assert r["n_pairs"] == 2 and r["n_slices"] == 1
def test_patient_scores_add_up_to_the_reports_means():
    """Per patient [sum, count]: pooled over all patients they give score_predictions' numbers
    exactly (what the paired bootstrap of pyroseg compare resamples)."""
    from pyroseg.evaluate import BINNED_METRICS, PATIENT_METRICS, patient_scores, score_predictions
    from pyroseg.stats import binned_ece

    data = make_synthetic_ambiguous(image_size=32, n_patients=3, slices_per_patient=4, seed=0)
    model = build_model("vae", image_size=32, widths=(8, 16, 32, 64))
    pred = predict_dataset(model, data, num_samples=3, distribution=True)
    report = score_predictions(pred, data)
    report["elbo"] = float(np.mean(pred.terms["loss"]))
    per = patient_scores(pred, data)
    assert set(per) == set(PATIENT_METRICS) - {"nll"}  # a latent model's loss is its ELBO
    for k, by_patient in per.items():
        assert set(by_patient) == set(data.patient_ids)
        if k in BINNED_METRICS:  # reliability-bin counts that add up to the report's ECE
            bins = np.sum(list(by_patient.values()), axis=0)
            assert float(binned_ece(bins)) == pytest.approx(report[k], rel=1e-6, abs=1e-9), k
            continue
        total = sum(c for _, c in by_patient.values())
        if total:
            assert sum(s for s, _ in by_patient.values()) / total == pytest.approx(report[k], rel=1e-6, abs=1e-6), k
    tumour = int((data.masks[:, 0].reshape(len(data), -1).max(1) > 0).sum())
    assert sum(c for _, c in per["dice_tumour"].values()) == tumour
    assert sum(c for _, c in per["dice_all"].values()) == len(data)
    assert all(c == 1 for _, c in per["dice_volume"].values())
    unet = predict_dataset(build_model("unet", image_size=32, widths=(8, 16, 32, 64)), data, num_samples=1)
    assert "elbo" not in patient_scores(unet, data) and "ged" not in patient_scores(unet, data)
    assert "nll" in patient_scores(unet, data)


def test_a_run_loads_its_own_data_for_a_split(amb_run):
    """``load_run(...).load_data(split)`` (and ``read_run``, without the weights) is the run's
    data at its image size, restricted to the split's patients; an unknown split is one line."""
    import json

    from pyroseg.data import load_source
    from pyroseg.runs import at_least_one, load_run, read_run

    run = load_run(amb_run)
    split = json.loads((amb_run / "split.json").read_text())
    for which in ("test", "val", "all"):
        data = run.load_data(which)
        assert data.image_size == SIZE
        if which != "all":
            assert data.patient_ids == [p for p in split[which] if p in data.patient_ids] and set(data.patient_ids) == set(split[which])
        same = read_run(amb_run).load_data(which)
        assert np.array_equal(same.images, data.images) and np.array_equal(same.masks, data.masks)
    whole = load_source("synthetic-ambiguous", SIZE, **run.config.source_options())
    assert np.array_equal(run.load_data("all").masks, whole.masks)
    with pytest.raises(UsageError, match="--split 'nope': expected one of test, val, train, all"):
        run.load_data("nope")
    with pytest.raises(UsageError, match="--num-samples 0: expected at least 1"):
        at_least_one("--num-samples", 0)
    with pytest.raises(UsageError, match="--num-samples 0: expected at least 1"):
        evaluate_run(amb_run, num_samples=0)


def test_references_and_scoring_are_re_exported_from_evaluate():
    from pyroseg import evaluate, references, scoring

    for name in ("ORACLE", "ORACLE_ONE_MASK", "RATERS_LOO", "MAJORITY", "evaluate_oracle", "evaluate_reference",
                 "reference_names", "has_oracle", "evaluate_run_oracle", "evaluate_run_references"):
        assert getattr(evaluate, name) is getattr(references, name), name
    for name in ("score_predictions", "patient_scores", "PATIENT_METRICS", "BINNED_METRICS", "LESION_REGION_MIN_PROB"):
        assert getattr(evaluate, name) is getattr(scoring, name), name
