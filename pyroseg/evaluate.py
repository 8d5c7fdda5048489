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
(:func:`reference_names`, :func:`evaluate_reference`): on
``synthetic-ambiguous`` data the true annotator distribution and its best
single mask (:func:`evaluate_oracle`); on other multi-rater data (QUBIQ,
LIDC) **one rater against the others** (each rater in turn is the
"prediction", its one mask the sample, scored against the remaining raters:
the human level) and **the majority-vote mask** as a deterministic
prediction (the best one mask can do, judged against the raters it came from).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

from pyroseg.collapse import collapse_report
from pyroseg.config import FitConfig
from pyroseg.data import load_source
from pyroseg.data.core import SegData
from pyroseg.data.synthetic import oracle_masks_for, oracle_probabilities
from pyroseg.devices import resolve_device
from pyroseg.errors import UsageError
from pyroseg.metrics import (
    ECE_BINS,
    DistributionAccumulator,
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
from pyroseg.predict import Predictions, predict_dataset
from pyroseg.runs import EVAL_SPLITS, load_run, read_run_files, select_split
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

#: The ``model`` name of :func:`evaluate_oracle`'s report, and of its one-mask variant.
ORACLE = "oracle"
ORACLE_ONE_MASK = "oracle (one mask)"
#: The ``model`` names of the references on real multi-rater data.
RATERS_LOO = "raters (leave one out)"
MAJORITY = "majority vote"

#: ``ece_lesion`` counts the pixels that some annotator marks or whose mean
#: probability is at least this: where a lesion is in question at all.
LESION_REGION_MIN_PROB = 0.05


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
    """
    if num_samples < 1:
        raise UsageError(f"--num-samples {num_samples}: expected at least 1")
    dev = resolve_device(device)
    run = load_run(run_dir, device=dev, checkpoint=checkpoint)
    cfg = run.config
    which = split or ("all" if data else "test")
    if which not in EVAL_SPLITS:
        raise UsageError(f"--split {which!r}: expected one of {', '.join(EVAL_SPLITS)}")
    spec = data or cfg.data
    dataset = load_source(spec, cfg.image_size, **{**cfg.source_options(), "cache_dir": cache_dir or cfg.cache_dir},
                          progress=progress)
    if oracle and not reference_names(dataset):
        raise UsageError(f"--oracle: references need several annotators per slice (synthetic-ambiguous, QUBIQ, LIDC); "
                         f"{spec} has {dataset.num_annotators}")
    subset = select_split(dataset, run.split, which, source=spec)
    if seed is not None:
        pyro.set_rng_seed(seed)
    sampler = TestTimeAugmentation(run.model) if tta else run.model
    pred = predict_dataset(sampler, subset, num_samples=num_samples, batch_size=batch_size, device=dev, distribution=True)
    report = score_predictions(pred, subset)
    has_elbo = bool(run.model.latent_sites) and not run.model.guide_is_prior  # else the loss is an NLL
    if per_patient:
        report["per_patient"] = patient_scores(pred, subset, loss="elbo" if has_elbo else "nll")
    if has_elbo:
        report["elbo"] = float(np.mean(pred.terms["loss"]))
        report["recon"] = float(np.mean(pred.terms["recon"]))
        for k, v in pred.terms.items():
            if k.startswith("kl_"):
                report[k] = float(np.mean(v))
        if collapse_samples > 0:
            report.update(collapse_report(run.model, subset, num_samples=collapse_samples, batch_size=batch_size, device=dev))
    else:
        report["nll"] = float(np.mean(pred.terms["loss"]))
    report.update(
        {
            "model": sampler.name,
            "run": str(Path(run_dir)),
            "data": str(spec),
            "split": which,
            "num_samples": sampler.num_draws(num_samples),
            "z_from": sampler.sample_from,
            "tta": tta,
            "epochs_trained": run.epochs_done,
            "checkpoint": run.checkpoint_used,
            "image_size": cfg.image_size,
            "num_params": run.model.num_params,
            "seed": seed,
        }
    )
    if oracle:
        patients = None if which == "all" else subset.patient_ids
        report["references"] = list(reference_names(dataset))
        for name in report["references"]:
            report[name] = evaluate_reference(dataset, name, patients, num_samples=num_samples, sample_seed=oracle_seed)
    if reliability_png is not None:
        from pyroseg.plots import reliability_diagram  # matplotlib only when a picture is drawn

        curves = {f"{sampler.name} (ECE {report['ece']:.4f})": report["reliability"]}
        for name in report.get("references", []):
            curves[f"{name} (ECE {report[name]['ece']:.4f})"] = report[name]["reliability"]
        reliability_diagram(curves, reliability_png,
                            title=f"{sampler.name} on {spec} [{which}]: per-pixel mean of {report['num_samples']} sample(s)")
        report["reliability_png"] = str(reliability_png)
    return report



def _run_data(run_dir: str | Path, split: str) -> tuple[SegData, list[str] | None]:
    """The data of the run in ``run_dir`` (its ``config.json``) and the patients of its
    ``split`` (its ``split.json``; None for ``all``); the weights are not read."""
    doc, run_split = read_run_files(Path(run_dir))
    cfg = FitConfig.from_dict(doc["fit"])
    dataset = load_source(cfg.data, cfg.image_size, **cfg.source_options())
    if split not in EVAL_SPLITS:
        raise UsageError(f"--split {split!r}: expected one of {', '.join(EVAL_SPLITS)}")
    patients = None if split == "all" else select_split(dataset, run_split, split, source=cfg.data).patient_ids
    return dataset, patients

def evaluate_run_oracle(
    run_dir: str | Path,
    *,
    split: str = "test",
    num_samples: int = 16,
    sample_seed: int = 0,
    one_mask: bool = False,
) -> dict[str, Any]:
    """:func:`evaluate_oracle` on the data and the ``split`` patients of the run in
    ``run_dir`` (its ``config.json`` and ``split.json``; the weights are not read)."""
    dataset, patients = _run_data(run_dir, split)
    report = evaluate_oracle(dataset, patients, num_samples=num_samples, sample_seed=sample_seed, one_mask=one_mask)
    report.update({"run": str(run_dir), "split": split})
    return report


def evaluate_run_references(run_dir: str | Path, *, split: str = "test", num_samples: int = 16,
                            sample_seed: int = 0) -> list[dict[str, Any]]:
    """Every reference of the run's data (:func:`reference_names`) on its ``split``
    patients, as :func:`evaluate_reference` reports (``[]`` for one-annotator data);
    the weights are not read."""
    dataset, patients = _run_data(run_dir, split)
    reports = []
    for name in reference_names(dataset):
        report = evaluate_reference(dataset, name, patients, num_samples=num_samples, sample_seed=sample_seed)
        report.update({"run": str(run_dir), "split": split})
        reports.append(report)
    return reports


def reliability_png_for(json_path: str | Path) -> Path:
    """Where the reliability diagram of a JSON report goes: ``<stem>_reliability.png`` beside it."""
    p = Path(json_path)
    return p.with_name(p.stem + "_reliability.png")


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


def reference_names(data: SegData) -> tuple[str, ...]:
    """The references that can be scored on ``data``: ``(oracle, oracle (one mask))``
    on whole ``synthetic-ambiguous`` data, ``(raters (leave one out), majority vote)``
    on other data with several annotators, ``()`` otherwise."""
    if has_oracle(data):
        return (ORACLE, ORACLE_ONE_MASK)
    if data.num_annotators > 1:
        return (RATERS_LOO, MAJORITY)
    return ()


def evaluate_reference(data: SegData, name: str, patients: Sequence[str] | None = None, *, num_samples: int = 16,
                       sample_seed: int = 0, batch_size: int = 64) -> dict[str, Any]:
    """Score the reference ``name`` (one of :func:`reference_names`) on the slices of
    ``patients`` (None: all) with :func:`score_predictions`, like a model.

    * ``oracle`` / ``oracle (one mask)``: :func:`evaluate_oracle`;
    * ``majority vote``: the prediction is the majority mask (at least half of
      the slice's raters; its mean probability is that hard mask, its one
      sample the mask), judged against all the raters;
    * ``raters (leave one out)``: every (slice, rater) pair of a slice with at
      least two raters is one row: the held-out rater's mask is the prediction
      (mean and single sample), the slice's other raters the annotators. The
      figures are means over the pairs (over slices when every slice has the
      same number of raters, as averaging over raters first would give).
      ``n_slices`` counts the slices, ``n_pairs`` the rows.
    """
    if name in (ORACLE, ORACLE_ONE_MASK):
        return evaluate_oracle(data, patients, num_samples=num_samples, sample_seed=sample_seed,
                               batch_size=batch_size, one_mask=name == ORACLE_ONE_MASK)
    if name not in (RATERS_LOO, MAJORITY):
        raise UsageError(f"unknown reference {name!r}: expected one of {ORACLE}, {ORACLE_ONE_MASK}, {RATERS_LOO}, {MAJORITY}")
    subset = data if patients is None else data.subset(patients)
    if name == MAJORITY:
        vote = majority_vote(torch.from_numpy(subset.masks), torch.from_numpy(subset.rater_counts)).numpy()  # (N, H, W)
        rows, samples = subset, vote[:, None].astype(np.uint8)  # (N, 1, H, W)
        mean = vote.astype(np.float32)
    else:
        rows, samples = _leave_one_out(subset)
        mean = samples[:, 0].astype(np.float32)
    acc = DistributionAccumulator()
    for i in range(0, len(rows), batch_size):
        acc.update(torch.from_numpy(samples[i : i + batch_size]), torch.from_numpy(rows.masks[i : i + batch_size]),
                   torch.from_numpy(rows.rater_counts[i : i + batch_size]))
    report = score_predictions(Predictions(mean=mean, samples=None, terms={}, distribution=acc.per_image()), rows)
    report.update({"model": name, "data": data.source, "num_samples": 1, "image_size": data.image_size,
                   "z_from": "a held-out rater" if name == RATERS_LOO else "raters' majority (>= half)"})
    if name == RATERS_LOO:
        report.update({"n_pairs": len(rows), "n_slices": int((subset.rater_counts >= 2).sum())})
    return report


def _leave_one_out(data: SegData) -> tuple[SegData, np.ndarray]:
    """One row per (slice, rater) of the slices with >= 2 raters: the other raters as
    the row's annotations ``(M, A - 1, H, W)`` (padded, with their counts) and the
    held-out rater as its one sample ``(M, 1, H, W)``."""
    a = data.num_annotators
    items, held = [], []
    for i, n in enumerate(data.rater_counts.tolist()):
        if n >= 2:
            for r in range(n):
                items.append(i)
                held.append(r)
    idx, held = np.array(items, dtype=np.int64), np.array(held, dtype=np.int64)
    others = np.zeros((len(idx), max(a - 1, 1), *data.masks.shape[2:]), dtype=np.uint8)
    for k in range(a - 1):  # slot k of the others: rater k, or k + 1 at and after the held-out one
        src = np.where(k < held, k, k + 1)
        others[:, k] = data.masks[idx, np.minimum(src, a - 1)]
    rows = SegData(images=data.images[idx], masks=others, patients=data.patients[idx],
                   slice_numbers=data.slice_numbers[idx], source=data.source, meta=dict(data.meta),
                   rater_counts=data.rater_counts[idx] - 1)
    return rows, data.masks[idx, held][:, None]
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


def has_oracle(data: SegData) -> bool:
    """Whether ``data`` is a whole ``synthetic-ambiguous`` data set, whose true distribution is known."""
    return data.meta.get("generator") == "make_synthetic_ambiguous"


def evaluate_oracle(
    data: SegData,
    patients: Sequence[str] | None = None,
    *,
    num_samples: int = 16,
    sample_seed: int = 0,
    batch_size: int = 64,
    one_mask: bool = False,
) -> dict[str, Any]:
    """Score the true annotator distribution of ``data`` like a model, on the slices of ``patients``.

    ``data``: a whole data set made by
    :func:`~pyroseg.data.synthetic.make_synthetic_ambiguous` (e.g. ``load_source
    ("synthetic-ambiguous", ...)``); ``patients``: the patients to score (e.g.
    the test split; ``None``: all). The oracle's samples are ``num_samples``
    fresh masks per slice from the true distribution
    (:func:`~pyroseg.data.synthetic.oracle_masks_for`, seeded by
    ``sample_seed``), independent of the data set's own annotators; its mean
    probability is the exact per-pixel marginal
    (:func:`~pyroseg.data.synthetic.oracle_probabilities`), so its ECE is the
    floor set by having only ``A`` annotators. Returns the report of
    :func:`score_predictions` with ``model = "oracle"``.

    ``one_mask``: instead, the best a deterministic model can be: the exact
    marginal as its probability (what a U-Net trained by cross-entropy tends
    to) and that marginal thresholded at 0.5 as its one sample
    (``model = "oracle (one mask)"``, ``num_samples = 1``).

    :raises UsageError: ``data`` is not synthetic-ambiguous data, or
        ``num_samples`` < 1.
    """
    if num_samples < 1:
        raise UsageError(f"--num-samples {num_samples}: expected at least 1")
    if not has_oracle(data):
        raise UsageError(f"no oracle for data {data.source!r}: the true distribution is known only for synthetic-ambiguous data")
    meta = data.meta
    probs = oracle_probabilities(
        meta["image_size"],
        n_patients=meta["n_patients"],
        slices_per_patient=meta["slices_per_patient"],
        seed=meta["seed"],
        lesion_fraction=meta["lesion_fraction"],
        faint_prob=meta["faint_prob"],
        faint_fraction=meta["faint_fraction"],
    )  # (N, H, W)
    if patients is None:
        patients = data.patient_ids
    keep = data.patient_mask(patients)  # (N,)
    subset = data.subset(patients)
    if one_mask:
        samples = (probs[keep] >= 0.5)[:, None].astype(np.uint8)  # (n, 1, H, W)
    else:
        samples = oracle_masks_for(data, num_samples, sample_seed)[keep]  # (n, S, H, W) uint8
    acc = DistributionAccumulator()
    for i in range(0, len(subset), batch_size):
        acc.update(torch.from_numpy(samples[i : i + batch_size]), torch.from_numpy(subset.masks[i : i + batch_size]))
    pred = Predictions(mean=probs[keep], samples=None, terms={}, distribution=acc.per_image())
    report = score_predictions(pred, subset)
    report.update({"model": ORACLE_ONE_MASK if one_mask else ORACLE, "data": data.source,
                   "num_samples": 1 if one_mask else num_samples, "image_size": data.image_size,
                   "z_from": "true marginal >= 0.5" if one_mask else "true distribution",
                   "oracle_seed": None if one_mask else sample_seed})
    return report
