"""Seeing posterior collapse: active units, and what each latent site does to the prediction.

Three numbers per latent site (the first, its mean KL, comes from
:func:`pyroseg.predict.elbo_terms`):

* **active units** (Burda et al. 2015): a unit ``u`` is active when its
  posterior mean moves with the input, ``Cov_x(E_q[z_u | x]) > 0.01``. The
  posterior is the guide ``q`` (``q(z | x)`` for the VAE family, ``q(z | x, y)``
  with the true mask for the Probabilistic U-Nets). A **unit** is one scalar
  coordinate of the site: one of the ``D`` entries of a vector latent, one
  (channel, row, column) entry of a spatial latent (``hprob_unet``'s ``z_1`` at
  64x64 has ``2 x 32 x 32 = 2048``). For a site below others (``z_2`` given
  ``z_3``), ``E_q[z_2 | x]`` is taken with the sites above it at *their*
  posterior means (a plug-in, deterministic; averaging over their draws instead
  would add sampling noise to the covariance).
* **effect of the site**: the point prediction (mean of ``S`` test-time
  samples, thresholded at 0.5) with every site drawn from the model's test-time
  source, against the same with *this* site replaced by its prior mean, with
  *common random numbers*: both predictions draw every other site from the same
  random stream (:class:`FixSites` with ``draw=True`` still draws the fixed
  site, and throws the draw away), so the effect is 0 when the site changes
  nothing. (Before, the two predictions drew independently, and their sampling
  noise alone gave every site an effect of 0.03-0.07 on the 32x32
  synthetic-ambiguous set's small lesions, collapsed sites included.) For a
  conditional prior, its mean given the sites drawn above it (``p(z_2 | z_3)``),
  the sites below it then drawn given it. Reported as the change of mean Dice
  against the truth (``dice_change_<site>``, negative = the site helped) and as
  ``effect_<site>`` = mean over slices of ``1 - Dice(prediction, prediction with
  the site at its prior mean)``: 0 when the site changes nothing.

A collapsed site shows a KL near 0, no active units and no effect. A site can
also carry information the decoder ignores (active units, no effect), or
matter only through its prior (a conditional prior's mean varies with the
image in ``prob_unet``/``hprob_unet`` even when the posterior adds nothing).

Test-time ``z``: from the guide ``q(z | x)`` for ``vae``, ``skip_vae``,
``hvae``; from the prior net ``p(z | x)`` for ``prob_unet``, ``hprob_unet``
(``SegModel.test_time_z``). Everything here runs the models' own Pyro
``model``/``guide`` under effect handlers (``poutine.trace``, ``replay`` and
:class:`FixSites`), so it works for any pyroseg model.

References: Burda, Grosse & Salakhutdinov, "Importance Weighted
Autoencoders", ICLR 2016 (active units).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from pyro import poutine
from torch.utils.data import DataLoader

from pyroseg.data.core import SegData, SegDataset, collate_batch
from pyroseg.devices import resolve_device
from pyroseg.errors import UsageError
from pyroseg.latents import FixSites, guide_mask, predict_probs, rng_state, set_rng_state
from pyroseg.metrics import dice
from pyroseg.models.base import SegModel
from pyroseg.runs import at_least_one, load_run

__all__ = [
    "ACTIVE_THRESHOLD",
    "FixSites",
    "posterior_means",
    "active_units",
    "latent_units",
    "predict_probs",
    "collapse_report",
    "diagnostic_indices",
    "plot_latent_scales",
    "collapsed_sites",
    "COLLAPSE_NATS",
    "COLLAPSE_EFFECT",
]

#: Burda et al.'s threshold on ``Cov_x(E_q[z_u])``.
ACTIVE_THRESHOLD = 0.01

#: A latent site whose mean KL on the test patients is below this many nats per
#: image carries (almost) no information: posterior collapse.
COLLAPSE_NATS = 0.1
#: ... and one whose posterior means do not move with the input (0 active units)
#: and whose replacement by its prior mean changes the prediction by less than this
#: (1 - Dice between the two predictions) is switched off, whatever its KL.
COLLAPSE_EFFECT = 0.01


@torch.no_grad()
def posterior_means(model: SegModel, image: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``E_q[z_site | x(, y)]`` per latent site, flattened to ``(B, units)``, with
    the sites above each at their posterior means (see module docs)."""
    trace = poutine.trace(FixSites(model.latent_sites)(model.guide)).get_trace(image, guide_mask(model, mask))
    return {s: trace.nodes[s]["value"].reshape(image.shape[0], -1) for s in model.latent_sites}


@torch.no_grad()
def latent_units(model: SegModel) -> dict[str, int]:
    """Units (scalar coordinates) per image of each latent site, e.g. ``{"z_3": 128, ...}``.

    Runs the model once on a blank image, on a forked RNG: calling it must not
    shift the random stream of the run it describes (a resumed run must equal
    an uninterrupted one)."""
    p = next(model.parameters())
    image = torch.zeros(1, model.in_channels, model.image_size, model.image_size, device=p.device, dtype=p.dtype)
    devices = [p.device] if p.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        trace = poutine.trace(model.model).get_trace(image, None)
    return {s: int(trace.nodes[s]["value"][0].numel()) for s in model.latent_sites}


def active_units(means: torch.Tensor, threshold: float = ACTIVE_THRESHOLD) -> tuple[int, torch.Tensor]:
    """``means: (N, U)`` posterior means over ``N`` inputs -> (number of units with
    ``Var_x > threshold``, the per-unit variances ``(U,)``). Unbiased variance
    (``N - 1``); fewer than 2 inputs give 0 active units."""
    if means.shape[0] < 2:
        return 0, torch.zeros(means.shape[1])
    var = means.double().var(dim=0, unbiased=True)
    return int((var > threshold).sum()), var.float()


def diagnostic_indices(n: int, max_slices: int | None) -> np.ndarray:
    """The slices :func:`collapse_report` looks at: all ``n`` (``max_slices`` None or 0,
    or ``n <= max_slices``), else ``max_slices`` evenly spaced ones, the first and the
    last included. Fixed by ``n`` alone, so every epoch of a run sees the same slices
    and its curves move with the model, not with the draw."""
    if not max_slices or n <= max_slices:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_slices).round().astype(np.int64))


@torch.no_grad()
def collapse_report(
    model: SegModel,
    data: SegData,
    *,
    num_samples: int = 8,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    threshold: float = ACTIVE_THRESHOLD,
    max_slices: int | None = None,
) -> dict[str, float]:
    """Active units and the effect of each latent site over ``data`` (first annotator).

    Returns ``{"au_<site>": active units, "units_<site>": total units,
    "dice_change_<site>": ..., "effect_<site>": ...}`` (see module docs);
    empty for a model without latents or empty data. ``max_slices``: only that
    many evenly spaced slices of ``data`` (:func:`diagnostic_indices`; None: all).

    Cost per batch of ``B`` slices: the guide once (posterior means), the
    model's own :meth:`~pyroseg.models.base.SegModel.sample` for the full
    prediction, and per site one pass of the model on the ``S x B`` repeated
    images (the effect). Training runs it on a fixed subset
    (``FitConfig.collapse_slices``): on all validation slices it cost more than
    the training epoch of ``hprob_unet`` (docs/guide/comparing.md).
    """
    if not model.latent_sites or model.guide_is_prior or len(data) == 0:
        return {}
    was_training = model.training
    model.eval()
    sites = list(model.latent_sites)
    means: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    full_dice, changed_dice, agreement = [], {s: [] for s in sites}, {s: [] for s in sites}
    indices = diagnostic_indices(len(data), max_slices)
    loader = DataLoader(SegDataset(data, indices), batch_size=batch_size, shuffle=False, collate_fn=collate_batch)
    try:
        for batch in loader:
            image, mask = batch["image"].to(device), batch["mask"].to(device)
            for s, m in posterior_means(model, image, mask).items():
                means[s].append(m.cpu())
            # common random numbers: every prediction of this batch starts from the same RNG state
            state = rng_state(image.device)
            full = predict_probs(model, image, num_samples=num_samples).mean(0)[:, 0] >= 0.5  # (B, H, W)
            truth = mask[:, 0] > 0.5
            full_dice.append(dice(full, truth).cpu())
            for s in sites:
                set_rng_state(image.device, state)
                pred = predict_probs(model, image, num_samples=num_samples, prior_mean=s).mean(0)[:, 0] >= 0.5
                changed_dice[s].append(dice(pred, truth).cpu())
                agreement[s].append(dice(pred, full).cpu())
    finally:
        model.train(was_training)
    report: dict[str, float] = {}
    base = torch.cat(full_dice).mean()
    for s in sites:
        n_active, _ = active_units(torch.cat(means[s]), threshold)
        report[f"au_{s}"] = n_active
        report[f"units_{s}"] = int(means[s][0].shape[1])
        report[f"dice_change_{s}"] = float(torch.cat(changed_dice[s]).mean() - base)
        report[f"effect_{s}"] = float(1 - torch.cat(agreement[s]).mean())
    return report


def collapsed_sites(report: dict[str, Any]) -> str:
    """The latent sites of ``report`` (an :func:`~pyroseg.evaluate.evaluate_run` report)
    that carry nothing: KL below :data:`COLLAPSE_NATS`, or 0 active units and an effect
    below :data:`COLLAPSE_EFFECT` (a site can keep a few nats of KL in an offset that no
    input moves; see README, "Seeing collapse"). ``"-"``: none; ``"n/a"``: no latent."""
    sites = [k[3:] for k in report if k.startswith("kl_")]
    if not sites:
        return "n/a"

    def dead(s: str) -> bool:
        if report[f"kl_{s}"] < COLLAPSE_NATS:
            return True
        au, effect = report.get(f"au_{s}"), report.get(f"effect_{s}")
        return au is not None and effect is not None and au == 0 and effect < COLLAPSE_EFFECT

    return ",".join(s for s in sites if dead(s)) or "-"


def plot_latent_scales(
    run_dir: str | Path,
    png: str | Path | None = None,
    *,
    split: str = "val",
    n_images: int = 3,
    num_samples: int = 6,
    device: str = "auto",
    cache_dir: str | None = None,
) -> Path:
    """Draw :func:`pyroseg.plots.latent_scales_grid` for a run folder, on slices
    of its ``split`` patients; ``png`` defaults to ``RUN_DIR/latent_scales.png``.
    Returns the path written."""
    from pyroseg import plots  # matplotlib only when a picture is drawn

    at_least_one("--images", n_images)
    at_least_one("--num-samples", num_samples)

    dev = resolve_device(device)
    run = load_run(run_dir, device=dev)
    if not run.model.latent_sites or run.model.guide_is_prior:
        raise UsageError(f"--latents: model {run.model.name!r} of {run_dir} has no latent sites to show")
    subset = run.load_data(split, cache_dir=cache_dir)
    png = Path(png) if png else Path(run_dir) / "latent_scales.png"
    return plots.latent_scales_grid(run.model, subset, png, device=dev, n_images=n_images, num_samples=num_samples)
