"""Scoring predictions against every annotator: the metrics of a report, and their split by patient.

:func:`score_predictions` turns the predictions of a model (or of a reference) on a set
of slices into the report's metrics: the point prediction against the first
annotator (:func:`~pyroseg.metrics.segmentation_report`), the distribution of the
thresholded samples against every annotator (GED, matched IoU, diversity), the
calibration of the mean probability (ECE, reliability curve) against the fraction of
annotators marking each pixel, and the scores against every rater (QUBIQ score, Dice
against each rater and against the majority vote). :func:`patient_scores` splits each
ranked metric by patient, so that a paired bootstrap over patients can resample them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pyroseg.data.core import SegData
from pyroseg.metrics import (
    ECE_BINS,
    ReliabilityAccumulator,
    binary_cross_entropy,
    dice,
    dice_per_rater,
    iou,
    majority_vote,
    qubiq_score,
    rater_mean,
    segmentation_report,
    volume_dice,
)
from pyroseg.predict import Predictions

__all__ = ["score_predictions", "patient_scores", "PATIENT_METRICS", "BINNED_METRICS", "LESION_REGION_MIN_PROB"]

#: ``ece_lesion`` counts the pixels that some annotator marks or whose mean
#: probability is at least this: where a lesion is in question at all.
LESION_REGION_MIN_PROB = 0.05


def score_predictions(pred: Predictions, data: SegData, *, n_bins: int = ECE_BINS) -> dict[str, Any]:
    """The metrics of a set of predictions on ``data`` (the slices they were made for).

    ``pred.mean``: ``(N, H, W)`` mean probability; ``pred.distribution``: per-image
    values of :class:`~pyroseg.metrics.DistributionAccumulator` (may be empty).
    Returns :func:`~pyroseg.metrics.segmentation_report` of the mean against the
    first annotator, the means over slices of ``ged``, ``ged_unbiased``,
    ``hm_iou``, ``sample_diversity`` and ``annotator_diversity`` (all slices,
    empty ones included: an empty sample on an empty annotation is distance 0),
    and ``ece`` with its ``reliability`` curve: every pixel of every slice, in
    ``n_bins`` equal-width bins of the mean probability, against the fraction
    of annotators who mark the pixel; ``n_annotators``.

    Background that everyone agrees on fills the lowest bin with nearly every
    pixel and drives ``ece`` towards 0 for any model that says "no lesion"
    there, so ``ece_lesion`` is the same ECE over the pixels where a lesion is
    in question: marked by some annotator, or given a mean probability of at
    least :data:`LESION_REGION_MIN_PROB` (so false alarms count too).
    """
    report = segmentation_report(torch.from_numpy(pred.mean), torch.from_numpy(data.masks[:, 0]), data.patients)
    for k, v in pred.distribution.items():
        report[k] = float(np.mean(v)) if len(v) else float("nan")
    prob = torch.from_numpy(pred.mean)  # (N, H, W)
    masks, counts = torch.from_numpy(data.masks), torch.from_numpy(data.rater_counts)  # (N, A, H, W), (N,)
    target = rater_mean(masks, counts)  # (N, H, W): fraction of each slice's own raters
    report.update(_against_raters(prob, masks, counts))
    acc = ReliabilityAccumulator(n_bins)
    acc.update(prob, target)
    report["ece"] = acc.ece()
    region = (target > 0) | (prob >= LESION_REGION_MIN_PROB)  # (N, H, W)
    lesion = ReliabilityAccumulator(n_bins)
    lesion.update(prob[region], target[region])
    report["ece_lesion"] = lesion.ece()
    report["lesion_region_pixels"] = float(region.float().mean()) if region.numel() else float("nan")
    report["reliability"] = acc.curve()
    report["n_annotators"] = data.num_annotators
    report["raters_per_slice"] = [int(counts.min()), int(counts.max())] if len(counts) else [0, 0]
    return report


def _against_raters(prob: torch.Tensor, masks: torch.Tensor, counts: torch.Tensor) -> dict[str, Any]:
    """``qubiq`` (mean QUBIQ score of ``prob`` ``(N, H, W)``), ``dice_raters`` (Dice of
    ``prob >= 0.5`` against each rater, averaged over each slice's raters, then
    over slices), ``dice_per_rater`` (``(A,)`` list: rater ``a`` over the slices
    that have one), ``dice_majority`` (against the majority-vote mask)."""
    if not len(prob):
        return {"qubiq": float("nan"), "dice_raters": float("nan"), "dice_majority": float("nan"), "dice_per_rater": []}
    per_slice = _against_raters_per_slice(prob, masks, counts)
    per = dice_per_rater(prob >= 0.5, masks, counts).double()  # (N, A), NaN in padded slots
    return {
        "qubiq": float(per_slice["qubiq"].mean()),
        "dice_raters": float(per_slice["dice_raters"].mean()),
        "dice_per_rater": [float(v) for v in per.nanmean(0)],
        "dice_majority": float(per_slice["dice_majority"].mean()),
    }


#: The metrics of :func:`patient_scores`: every metric of :func:`evaluate_run` that
#: ``compare`` ranks. Means over slices (or, ``dice_volume``, over patients) are split
#: into ``[sum, count]`` per patient; the ECEs into their reliability-bin counts
#: (:data:`BINNED_METRICS`).
PATIENT_METRICS = ("dice_all", "dice_tumour", "dice_volume", "iou_tumour", "bce", "false_positive_slices",
                   "ged", "ged_unbiased", "hm_iou", "sample_diversity", "qubiq", "dice_raters", "dice_majority",
                   "ece", "ece_lesion", "elbo", "nll")
#: Per-patient entries that are ``[count * K, sum_prob * K, sum_target * K]`` of ``K``
#: reliability bins (:func:`pyroseg.stats.binned_ece`), not ``[sum, count]``.
BINNED_METRICS = ("ece", "ece_lesion")


def patient_scores(pred: Predictions, data: SegData, *, threshold: float = 0.5, loss: str | None = None,
                   n_bins: int = ECE_BINS) -> dict[str, dict[str, list[float]]]:
    """Each :data:`PATIENT_METRICS` entry split by patient: ``{metric: {patient: [sum, count]}}``
    (:data:`BINNED_METRICS`: ``{patient: reliability-bin counts}``).

    ``sum`` is the metric summed over the patient's slices that the metric
    averages over (every slice; for ``dice_tumour``/``iou_tumour`` those with a
    non-empty first annotation; for ``false_positive_slices`` the empty ones),
    ``count`` how many slices those are; for ``dice_volume`` the patient's 3-D
    Dice and 1. So ``sum(sums) / sum(counts)`` over all patients is exactly the
    metric of :func:`score_predictions`, and over a resample of patients that
    metric on those patients (:func:`pyroseg.stats.paired_bootstrap`).
    The ECEs (``ece`` over every pixel, ``ece_lesion`` over the lesion region, as
    :func:`score_predictions`) are not means over slices: each patient gets the counts of
    its pixels' reliability bins, which add up over patients to the report's ECE
    (:func:`pyroseg.stats.binned_ece`). ``loss``: the name the report gives ``pred.terms["loss"]``,
    ``"elbo"`` (a model with an ELBO) or ``"nll"`` (the others); by default ``"elbo"`` when
    the terms have a KL, else ``"nll"``; none when there are no terms. Distribution metrics
    only when ``pred.distribution`` has them.
    """
    prob = torch.from_numpy(pred.mean)  # (N, H, W)
    target = torch.from_numpy(data.masks[:, 0]).bool()  # (N, H, W): first annotator
    binary = prob >= threshold
    tumour = target.flatten(1).any(1)  # (N,)
    every = np.ones(len(prob), bool)
    per_slice: dict[str, tuple[np.ndarray, np.ndarray]] = {  # metric -> (value (N,), counted (N,) bool)
        "dice_all": (dice(binary, target).numpy(), every),
        "dice_tumour": (dice(binary, target).numpy(), tumour.numpy()),
        "iou_tumour": (iou(binary, target).numpy(), tumour.numpy()),
        "bce": (binary_cross_entropy(prob, target).numpy(), every),
        "false_positive_slices": (binary.flatten(1).any(1).float().numpy(), (~tumour).numpy()),
    }
    for k in ("ged", "ged_unbiased", "hm_iou", "sample_diversity"):
        if len(pred.distribution.get(k, ())):
            per_slice[k] = (np.asarray(pred.distribution[k], float), every)
    if len(prob):
        for k, v in _against_raters_per_slice(prob, torch.from_numpy(data.masks), torch.from_numpy(data.rater_counts)).items():
            per_slice[k] = (v, every)
    if "loss" in pred.terms:
        name = loss or ("elbo" if any(k.startswith("kl_") for k in pred.terms) else "nll")
        per_slice[name] = (np.asarray(pred.terms["loss"], float), every)
    patients = np.asarray(data.patients)
    out: dict[str, dict[str, list[float]]] = {}
    for k, (value, counted) in per_slice.items():
        out[k] = {}
        for p in dict.fromkeys(data.patients):
            sel = (patients == p) & counted
            out[k][str(p)] = [float(value[sel].astype(float).sum()), int(sel.sum())]
    vol = volume_dice(binary, target, data.patients)
    out["dice_volume"] = {str(p): [float(v), 1] for p, v in vol.items()}
    out.update(_patient_reliability(prob, data, n_bins))
    return out


def _against_raters_per_slice(prob: torch.Tensor, masks: torch.Tensor, counts: torch.Tensor) -> dict[str, np.ndarray]:
    """The per-slice values whose means are :func:`_against_raters`' ``qubiq``, ``dice_raters``
    and ``dice_majority``, ``(N,)`` each."""
    pred = prob >= 0.5
    return {
        "qubiq": qubiq_score(prob, masks, counts).double().numpy(),
        "dice_raters": dice_per_rater(pred, masks, counts).double().nanmean(1).numpy(),
        "dice_majority": dice(pred, majority_vote(masks, counts)).double().numpy(),
    }


def _patient_reliability(prob: torch.Tensor, data: SegData, n_bins: int) -> dict[str, dict[str, list[float]]]:
    """``{ece: {patient: bins}, ece_lesion: {patient: bins}}``: each patient's reliability-bin
    counts (count, sum of probabilities, sum of targets; ``3 * n_bins`` numbers)."""
    masks, counts = torch.from_numpy(data.masks), torch.from_numpy(data.rater_counts)
    patients = np.asarray(data.patients)
    out: dict[str, dict[str, list[float]]] = {k: {} for k in BINNED_METRICS}
    for p in dict.fromkeys(data.patients):
        sel = torch.from_numpy(patients == p)
        pr, target = prob[sel], rater_mean(masks[sel], counts[sel])
        region = (target > 0) | (pr >= LESION_REGION_MIN_PROB)
        for k, (a, b) in {"ece": (pr, target), "ece_lesion": (pr[region], target[region])}.items():
            acc = ReliabilityAccumulator(n_bins)
            acc.update(a, b)
            out[k][str(p)] = [float(v) for v in torch.cat([acc.count, acc.sum_prob, acc.sum_target])]
    return out
