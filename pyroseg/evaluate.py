"""Score a trained run on held-out patients.

The point prediction of a generative model is the mean of ``num_samples``
mask probabilities (test-time ``z`` from the model's own test-time source:
``q(z|x)`` for the VAE family, the prior net for the Probabilistic U-Nets),
thresholded at 0.5. Nothing is augmented.

The same ``num_samples`` samples, each thresholded at 0.5, are the model's
*distribution* of masks: they are scored against every annotator of a slice
by the generalised energy distance, the Hungarian-matched IoU and their
diversity (:mod:`pyroseg.metrics`); the mean probability by its calibration
(ECE, reliability curve) against the fraction of annotators who mark each
pixel. A model without a latent (the U-Net) draws one sample: all its samples
are that one mask.

Against every rater (each slice its own ``rater_counts[i]`` raters): the
QUBIQ score of the mean probability (:func:`~pyroseg.metrics.qubiq_score`),
the Dice of the point prediction against each rater (``dice_raters``, their
mean; ``dice_per_rater``) and against the majority-vote mask
(``dice_majority``). ``dice_all`` and the other LGG figures stay against the
first annotator.

References, scored by the same metrics on the same slices
(:mod:`pyroseg.references`: :func:`reference_names`, :func:`evaluate_reference`): on
``synthetic-ambiguous`` data the true annotator distribution and its best
single mask (:func:`evaluate_oracle`); on other multi-rater data (QUBIQ,
LIDC) **one rater against the others** (each rater in turn is the
"prediction", its one mask the sample, scored against the remaining raters:
the human level) and **the majority-vote mask** as a deterministic
prediction (the best one mask can do, judged against the raters it came from).

This module loads a run and its data (:func:`evaluate_run`), samples and scores
it (the metrics are :mod:`pyroseg.scoring`'s) and draws its reliability diagram; the
references and the scoring functions are re-exported from here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyro

from pyroseg.collapse import collapse_report
from pyroseg.data.core import SegData
from pyroseg.devices import resolve_device
from pyroseg.errors import UsageError
from pyroseg.models.base import SegModel
from pyroseg.predict import POINT_PREDICTIONS, predict_dataset, resolve_point
from pyroseg.references import (
    MAJORITY,
    ORACLE,
    ORACLE_ONE_MASK,
    RATERS_LOO,
    evaluate_oracle,
    evaluate_reference,
    evaluate_run_oracle,
    evaluate_run_references,
    has_oracle,
    reference_names,
)
from pyroseg.runs import EVAL_SPLITS, LoadedRun, at_least_one, check_split, load_run, select_split
from pyroseg.scoring import BINNED_METRICS, LESION_REGION_MIN_PROB, PATIENT_METRICS, patient_scores, score_predictions
from pyroseg.tta import TestTimeAugmentation

__all__ = [
    "evaluate_run",
    "evaluate_oracle",
    "evaluate_run_oracle",
    "score_predictions",
    "patient_scores",
    "PATIENT_METRICS",
    "BINNED_METRICS",
    "has_oracle",
    "reliability_png_for",
    "select_split",
    "EVAL_SPLITS",
    "ORACLE",
    "ORACLE_ONE_MASK",
    "RATERS_LOO",
    "MAJORITY",
    "reference_names",
    "evaluate_reference",
    "evaluate_run_references",
    "LESION_REGION_MIN_PROB",
]

log = logging.getLogger(__name__)


def evaluate_run(
    run_dir: str | Path,
    *,
    data: str | None = None,
    split: str | None = None,
    num_samples: int = 16,
    batch_size: int = 64,
    device: str = "auto",
    cache_dir: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    oracle: bool = False,
    oracle_seed: int = 0,
    reliability_png: str | Path | None = None,
    seed: int | None = 0,
    collapse_samples: int = 8,
    checkpoint: str | None = None,
    tta: bool = False,
    per_patient: bool = False,
    point: str = "auto",
) -> dict[str, Any]:
    """Evaluate the run in ``run_dir``.

    ``data``: another dataset in the same layout (resized to the run's image
    size); by default the run's own data. ``split``: ``test`` (default for the
    run's own data), ``val``, ``train`` or ``all`` (default with ``data``).
    Returns the report dict of :func:`score_predictions` (Dice and the rest
    against the first annotator; GED, matched IoU, diversity and ECE against
    all of them), plus ``elbo`` (mean negative ELBO per image, beta = 1), its
    ``recon`` and per-site ``kl_*`` terms for generative models (``nll`` for
    the U-Net).

    ``oracle``: also score the references of the data (:func:`reference_names`)
    on the same slices, each as ``report[name]`` (names in
    ``report["references"]``): on ``synthetic-ambiguous`` data the true
    distribution (:func:`evaluate_oracle`, ``num_samples`` samples drawn with
    ``oracle_seed``) as ``report["oracle"]`` and the best deterministic model
    as ``report["oracle (one mask)"]``; on other multi-rater data one rater
    against the others and the majority-vote mask. One-annotator data has none.
    ``reliability_png``: draw the reliability diagram there (the references'
    curves beside the model's when there are some). ``seed``: seeds torch, numpy
    and random (``pyro.set_rng_seed``) just before sampling, so the same call
    gives the same numbers; ``None`` leaves the generators as they are.

    For generative models, per latent site the collapse diagnostics of
    :func:`pyroseg.collapse.collapse_report` (``au_*`` active units of
    ``units_*``, ``dice_change_*``, ``effect_*``; point predictions there are
    means of ``collapse_samples`` samples, 0: skip them).

    ``checkpoint``: ``"best"``, ``"last"`` or ``None`` (best.pt when the run has
    one; :func:`pyroseg.runs.pick_checkpoint`); ``report["checkpoint"]`` names
    the file used, and ``epochs_trained`` is its epoch.
    ``tta``: the samples are drawn over the four flips of each image
    (:class:`~pyroseg.tta.TestTimeAugmentation`), so a deterministic model gets four.
    ``per_patient``: also ``report["per_patient"]``, the :func:`patient_scores` of
    the predictions (what a paired bootstrap over patients needs).
    ``point``: the point prediction whose Dice, IoU, BCE, calibration and QUBIQ score are
    reported (:data:`pyroseg.predict.POINT_PREDICTIONS`): ``auto`` (default: the model's own,
    :attr:`~pyroseg.models.base.SegModel.point_prediction`), ``mean`` (the mean of the
    samples), ``majority`` (at least half of the thresholded samples) or ``mean-z`` (every
    latent at its test-time mean, :meth:`~pyroseg.models.base.SegModel.predict_at_mean`).
    The samples, and so GED, matched IoU and diversity, do not depend on it.
    """
    at_least_one("--num-samples", num_samples)
    if point not in POINT_PREDICTIONS:
        raise UsageError(f"--point {point}: expected one of {', '.join(POINT_PREDICTIONS)}")
    dev = resolve_device(device)
    run = load_run(run_dir, device=dev, checkpoint=checkpoint)
    which = check_split(split or ("all" if data else "test"))
    spec = data or run.config.data
    dataset, subset = _load_data(run, spec, which, cache_dir=cache_dir, progress=progress, oracle=oracle)
    if seed is not None:
        pyro.set_rng_seed(seed)
    sampler = TestTimeAugmentation(run.model) if tta else run.model
    point = resolve_point(run.model, point)
    if point == "mean-z" and run.model.has_latent and type(run.model).predict_at_mean is SegModel.predict_at_mean:
        raise UsageError(f"--point mean-z: {run.model.name} does not say where its latents' mean is "
                         "(it defines no predict_at_mean); use --point mean or majority")
    report = _score(run.model, sampler, subset, num_samples=num_samples, batch_size=batch_size, device=dev,
                    per_patient=per_patient, collapse_samples=collapse_samples, point=point)
    report["point"] = point
    report.update(_about(run, sampler, run_dir=run_dir, spec=spec, which=which, num_samples=num_samples, tta=tta,
                         seed=seed))
    if oracle:
        patients = None if which == "all" else subset.patient_ids
        report["references"] = list(reference_names(dataset))
        for name in report["references"]:
            report[name] = evaluate_reference(dataset, name, patients, num_samples=num_samples, sample_seed=oracle_seed)
    if reliability_png is not None:
        _draw_reliability(report, reliability_png, title=f"{sampler.name} on {spec} [{which}]: "
                                                         f"per-pixel mean of {report['num_samples']} sample(s)")
    return report


def _load_data(run: LoadedRun, spec: str, which: str, *, cache_dir: str | None,
               progress: Callable[[int, int], None] | None, oracle: bool) -> tuple[SegData, SegData]:
    """The whole data set ``spec`` at the run's image size, and its slices of the ``which`` patients.

    :raises UsageError: ``oracle`` asked of data that has no references."""
    dataset = run.load_data("all", data=spec, cache_dir=cache_dir, progress=progress)
    if oracle and not reference_names(dataset):
        raise UsageError(f"--oracle: references need several annotators per slice (synthetic-ambiguous, QUBIQ, LIDC); "
                         f"{spec} has {dataset.num_annotators}")
    return dataset, run.select(dataset, which, source=spec)


def _score(model: SegModel, sampler: SegModel, subset: SegData, *, num_samples: int, batch_size: int, device, per_patient: bool,
           collapse_samples: int, point: str = "mean") -> dict[str, Any]:
    """Sample ``subset`` with ``sampler`` (``model``, or its test-time augmentation) and score it: :func:`score_predictions`, its
    ``per_patient`` split, the ELBO's terms (``nll`` for a model without one) and the
    collapse diagnostics (see :func:`evaluate_run`)."""
    pred = predict_dataset(sampler, subset, num_samples=num_samples, batch_size=batch_size, device=device,
                           distribution=True, point=point, posterior_dice=True)
    report = score_predictions(pred, subset)
    has_elbo = bool(model.latent_sites) and not model.guide_is_prior  # else the loss is an NLL
    if per_patient:
        report["per_patient"] = patient_scores(pred, subset, loss="elbo" if has_elbo else "nll")
    if not has_elbo:
        report["nll"] = float(np.mean(pred.terms["loss"]))
        return report
    report["elbo"] = float(np.mean(pred.terms["loss"]))
    report["recon"] = float(np.mean(pred.terms["recon"]))
    for k, v in pred.terms.items():
        if k.startswith("kl_"):
            report[k] = float(np.mean(v))
    if "dice_posterior" in pred.terms:  # the latents told the answer (pyroseg.predict.elbo_terms)
        tumour = subset.masks[:, 0].reshape(len(subset), -1).any(1)
        report["dice_all_posterior"] = float(np.mean(pred.terms["dice_posterior"]))
        report["dice_tumour_posterior"] = float(np.mean(pred.terms["dice_posterior"][tumour])) if tumour.any() else float("nan")
    if collapse_samples > 0:
        report.update(collapse_report(model, subset, num_samples=collapse_samples, batch_size=batch_size, device=device))
    return report


def _about(run: LoadedRun, sampler: SegModel, *, run_dir: str | Path, spec: str, which: str, num_samples: int,
           tta: bool, seed: int | None) -> dict[str, Any]:
    """What a report was made of: model, run, data, split, samples, weights, seed."""
    return {
        "model": sampler.name,
        "run": str(Path(run_dir)),
        "data": str(spec),
        "split": which,
        "num_samples": sampler.num_draws(num_samples),
        "z_from": sampler.sample_from,
        "tta": tta,
        "epochs_trained": run.epochs_done,
        "checkpoint": run.checkpoint_used,
        "image_size": run.config.image_size,
        "num_params": run.model.num_params,
        "seed": seed,
    }


def _draw_reliability(report: dict[str, Any], png: str | Path, *, title: str) -> None:
    """The reliability diagram of ``report`` (and of its references) in ``png``; notes it in the report."""
    from pyroseg.plots import reliability_diagram  # matplotlib only when a picture is drawn

    curves = {f"{report['model']} (ECE {report['ece']:.4f})": report["reliability"]}
    for name in report.get("references", []):
        curves[f"{name} (ECE {report[name]['ece']:.4f})"] = report[name]["reliability"]
    reliability_diagram(curves, png, title=title)
    report["reliability_png"] = str(png)


def reliability_png_for(json_path: str | Path) -> Path:
    """Where the reliability diagram of a JSON report goes: ``<stem>_reliability.png`` beside it."""
    p = Path(json_path)
    return p.with_name(p.stem + "_reliability.png")
