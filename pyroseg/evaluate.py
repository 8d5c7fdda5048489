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

On ``synthetic-ambiguous`` data, :func:`evaluate_oracle` scores the true
annotator distribution with the same metrics on the same slices: what a
perfect model gets.
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
from pyroseg.metrics import ECE_BINS, DistributionAccumulator, ReliabilityAccumulator, segmentation_report
from pyroseg.predict import Predictions, predict_dataset
from pyroseg.runs import EVAL_SPLITS, load_run, read_run_files, select_split

__all__ = [
    "evaluate_run",
    "evaluate_oracle",
    "evaluate_run_oracle",
    "score_predictions",
    "has_oracle",
    "reliability_png_for",
    "select_split",
    "EVAL_SPLITS",
    "ORACLE",
    "ORACLE_ONE_MASK",
    "LESION_REGION_MIN_PROB",
]

log = logging.getLogger(__name__)

#: The ``model`` name of :func:`evaluate_oracle`'s report, and of its one-mask variant.
ORACLE = "oracle"
ORACLE_ONE_MASK = "oracle (one mask)"

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

    ``oracle``: also score the true distribution (:func:`evaluate_oracle`, with
    ``num_samples`` samples drawn with ``oracle_seed``) on the same slices, as
    ``report["oracle"]``, and the best deterministic model, as
    ``report["oracle (one mask)"]``; only for ``synthetic-ambiguous`` data.
    ``reliability_png``: draw the reliability diagram there (the oracle's
    curve beside the model's when there is one). ``seed``: seeds torch, numpy
    and random (``pyro.set_rng_seed``) just before sampling, so the same call
    gives the same numbers; ``None`` leaves the generators as they are.

    For generative models, per latent site the collapse diagnostics of
    :func:`pyroseg.collapse.collapse_report` (``au_*`` active units of
    ``units_*``, ``dice_change_*``, ``effect_*``; point predictions there are
    means of ``collapse_samples`` samples, 0: skip them).
    """
    if num_samples < 1:
        raise UsageError(f"--num-samples {num_samples}: expected at least 1")
    dev = resolve_device(device)
    run = load_run(run_dir, device=dev)
    cfg = run.config
    which = split or ("all" if data else "test")
    if which not in EVAL_SPLITS:
        raise UsageError(f"--split {which!r}: expected one of {', '.join(EVAL_SPLITS)}")
    spec = data or cfg.data
    dataset = load_source(
        spec,
        cfg.image_size,
        seed=cfg.seed,
        synthetic_patients=cfg.synthetic_patients,
        synthetic_slices=cfg.synthetic_slices,
        cache_dir=cache_dir or cfg.cache_dir,
        progress=progress,
    )
    if oracle and not has_oracle(dataset):
        raise UsageError(f"--oracle: the true distribution is known only for synthetic-ambiguous data, not {spec}")
    subset = select_split(dataset, run.split, which, source=spec)
    if seed is not None:
        pyro.set_rng_seed(seed)
    pred = predict_dataset(run.model, subset, num_samples=num_samples, batch_size=batch_size, device=dev, distribution=True)
    report = score_predictions(pred, subset)
    if run.model.has_latent:
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
            "model": run.model.name,
            "run": str(Path(run_dir)),
            "data": str(spec),
            "split": which,
            "num_samples": num_samples if run.model.has_latent else 1,
            "z_from": run.model.sample_from,
            "epochs_trained": run.epochs_done,
            "image_size": cfg.image_size,
            "num_params": run.model.num_params,
            "seed": seed,
        }
    )
    if oracle:
        patients = None if which == "all" else subset.patient_ids
        report[ORACLE] = evaluate_oracle(dataset, patients, num_samples=num_samples, sample_seed=oracle_seed)
        report[ORACLE_ONE_MASK] = evaluate_oracle(dataset, patients, one_mask=True)
    if reliability_png is not None:
        from pyroseg.plots import reliability_diagram  # matplotlib only when a picture is drawn

        curves = {f"{run.model.name} (ECE {report['ece']:.4f})": report["reliability"]}
        if oracle:
            curves[f"oracle (ECE {report[ORACLE]['ece']:.4f})"] = report[ORACLE]["reliability"]
        reliability_diagram(curves, reliability_png,
                            title=f"{run.model.name} on {spec} [{which}]: per-pixel mean of {report['num_samples']} sample(s)")
        report["reliability_png"] = str(reliability_png)
    return report


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
    run_dir = Path(run_dir)
    doc, run_split = read_run_files(run_dir)
    cfg = FitConfig.from_dict(doc["fit"])
    dataset = load_source(cfg.data, cfg.image_size, seed=cfg.seed, synthetic_patients=cfg.synthetic_patients,
                          synthetic_slices=cfg.synthetic_slices, cache_dir=cfg.cache_dir)
    if split not in EVAL_SPLITS:
        raise UsageError(f"--split {split!r}: expected one of {', '.join(EVAL_SPLITS)}")
    patients = None if split == "all" else select_split(dataset, run_split, split, source=cfg.data).patient_ids
    report = evaluate_oracle(dataset, patients, num_samples=num_samples, sample_seed=sample_seed, one_mask=one_mask)
    report.update({"run": str(run_dir), "split": split})
    return report


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
    target = torch.from_numpy(data.masks).float().mean(1)  # (N, H, W): fraction of annotators
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
    return report


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
