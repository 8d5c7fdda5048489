"""Score a trained run on held-out patients.

The point prediction of a generative model is the mean of ``num_samples``
mask probabilities (test-time ``z`` from the model's own test-time source:
``q(z|x)`` for the VAE family, the prior net for the Probabilistic U-Nets),
thresholded at 0.5. Nothing is augmented.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pyroseg.collapse import collapse_report
from pyroseg.data import load_source
from pyroseg.data.core import SegData
from pyroseg.errors import UsageError
from pyroseg.metrics import segmentation_report
from pyroseg.predict import predict_dataset
from pyroseg.runs import load_run
from pyroseg.train import resolve_device

__all__ = ["evaluate_run", "select_split", "EVAL_SPLITS"]

log = logging.getLogger(__name__)

EVAL_SPLITS = ("test", "val", "train", "all")


def select_split(data: SegData, split: dict, which: str, *, source: str) -> SegData:
    """The slices of ``data`` whose patients are in ``split[which]`` (``"all"``: every slice)."""
    if which == "all":
        return data
    if which not in split:
        raise UsageError(f"--split {which!r}: expected one of {', '.join(EVAL_SPLITS)}")
    present = [p for p in split[which] if p in set(data.patient_ids)]
    if not present:
        raise UsageError(
            f"--split {which}: none of the run's {len(split[which])} {which} patients are in {source}; "
            "use --split all to evaluate on every patient there"
        )
    return data.subset(present)


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
    collapse_samples: int = 8,
) -> dict[str, Any]:
    """Evaluate the run in ``run_dir``.

    ``data``: another dataset in the same layout (resized to the run's image
    size); by default the run's own data. ``split``: ``test`` (default for the
    run's own data), ``val``, ``train`` or ``all`` (default with ``data``).
    Returns the report dict (see :func:`pyroseg.metrics.segmentation_report`),
    plus ``elbo`` (mean negative ELBO per image, beta = 1), its ``recon`` and
    per-site ``kl_*`` terms for generative models, and per latent site the
    collapse diagnostics of :func:`pyroseg.collapse.collapse_report`
    (``au_*`` active units of ``units_*``, ``dice_change_*``, ``effect_*``;
    point predictions there are means of ``collapse_samples`` samples, 0: skip).
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
    subset = select_split(dataset, run.split, which, source=spec)
    pred = predict_dataset(run.model, subset, num_samples=num_samples, batch_size=batch_size, device=dev)
    report = segmentation_report(torch.from_numpy(pred.mean), torch.from_numpy(subset.masks[:, 0]), subset.patients)
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
        }
    )
    return report
