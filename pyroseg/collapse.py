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
(``SegModel.sample_from``). Everything here runs the models' own Pyro
``model``/``guide`` under effect handlers (``poutine.trace``, ``replay`` and
:class:`FixSites`), so it works for any pyroseg model.

References: Burda, Grosse & Salakhutdinov, "Importance Weighted
Autoencoders", ICLR 2016 (active units).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from torch.utils.data import DataLoader

from pyroseg.data.core import SegData, SegDataset, collate_batch
from pyroseg.metrics import dice
from pyroseg.models.base import SegModel

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
]

#: Burda et al.'s threshold on ``Cov_x(E_q[z_u])``.
ACTIVE_THRESHOLD = 0.01


class FixSites(Messenger):
    """Set the latent sites named in ``sites`` to the mean of their distribution
    at that point of the program (given the values drawn above them), and those
    in ``values`` to the given tensors, instead of sampling them. Unlike
    ``poutine.condition`` the sites stay latent (a trace of them can be
    replayed). Observed sites and other latents are left alone.

    ``draw=True``: draw the site anyway and discard the draw, so that the sites
    after it get the same random numbers as in a run that samples it (common
    random numbers: two runs from the same RNG state differ only by the fixed
    sites)."""

    def __init__(self, sites: Iterable[str] = (), values: dict[str, torch.Tensor] | None = None, *, draw: bool = False):
        super().__init__()
        self.sites = set(sites)
        self.values = dict(values or {})
        self.draw = draw

    def _pyro_sample(self, msg):
        if msg["is_observed"] or msg["value"] is not None:
            return
        if self.draw and (msg["name"] in self.values or msg["name"] in self.sites):
            msg["fn"](*msg["args"], **msg["kwargs"])  # the draw the unfixed run makes, thrown away
        if msg["name"] in self.values:
            msg["value"] = self.values[msg["name"]]
        elif msg["name"] in self.sites:
            msg["value"] = msg["fn"].mean


def _guide_kwargs(model: SegModel, mask: torch.Tensor | None) -> tuple:
    """The guide's arguments: the VAE family's guide sees the image only."""
    return (mask,) if model.sample_from == "p(z|x)" else (None,)


@torch.no_grad()
def posterior_means(model: SegModel, image: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``E_q[z_site | x(, y)]`` per latent site, flattened to ``(B, units)``, with
    the sites above each at their posterior means (see module docs)."""
    (guide_mask,) = _guide_kwargs(model, mask)
    trace = poutine.trace(FixSites(model.latent_sites)(model.guide)).get_trace(image, guide_mask)
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


@torch.no_grad()
def predict_probs(model: SegModel, image: torch.Tensor, *, num_samples: int = 8, fix: Iterable[str] = (),
                  prior_mean: str | None = None) -> torch.Tensor:
    """Mask probabilities ``(S, B, 1, H, W)`` from the model's test-time source,
    through its Pyro ``model``/``guide``.

    ``fix``: sites set to the mean of their test-time distribution given the
    sites above (the prior net's for the Probabilistic U-Nets, ``q(z | x)``'s for
    the VAE family): drawing only the others shows what they control.
    ``prior_mean``: one site set to its *prior* mean given the sites drawn
    above it, the sites below drawn given it (see module docs).

    Common random numbers: from the same RNG state, two calls that differ only
    in ``fix``/``prior_mean`` draw every other site from the same random numbers
    (fixed sites are still drawn, and the draw thrown away).
    """
    b = image.shape[0]
    rep = image.repeat(num_samples, 1, 1, 1)  # (S*B, C, H, W), sample-major
    fix = set(fix)
    if model.sample_from == "p(z|x)":  # test-time z from the prior: run the model alone
        fix = fix | ({prior_mean} if prior_mean else set())
        trace = poutine.trace(FixSites(fix, draw=True)(model.model)).get_trace(rep, None)
    else:  # test-time z from q(z | x): guide, then the model replayed on its z
        guide = FixSites(fix, draw=True)(model.guide)
        state = _rng_state(image.device)
        g = poutine.trace(guide).get_trace(rep, None)
        if prior_mean:
            # the prior of `prior_mean` given the guide's draws above it ...
            m = poutine.trace(poutine.replay(model.model, trace=g)).get_trace(rep, None)
            sites = list(model.latent_sites)
            above = sites[: sites.index(prior_mean)]
            keep = {s: g.nodes[s]["value"] for s in above}
            keep[prior_mean] = m.nodes[prior_mean]["fn"].mean
            # ... then the sites below drawn from q given it, from the random numbers the first pass used
            _set_rng_state(image.device, state)
            g = poutine.trace(FixSites(fix, values=keep, draw=True)(model.guide)).get_trace(rep, None)
        trace = poutine.trace(poutine.replay(model.model, trace=g)).get_trace(rep, None)
    probs = trace.nodes["mask"]["fn"].base_dist.probs  # (S*B, 1, H, W)
    return probs.view(num_samples, b, *probs.shape[1:])


def _rng_state(device: torch.device) -> tuple:
    """The CPU RNG state, and the device's where ``device`` is a GPU."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


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
            state = _rng_state(image.device)
            full = predict_probs(model, image, num_samples=num_samples).mean(0)[:, 0] >= 0.5  # (B, H, W)
            truth = mask[:, 0] > 0.5
            full_dice.append(dice(full, truth).cpu())
            for s in sites:
                _set_rng_state(image.device, state)
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


def plot_latent_scales(
    run_dir,
    png=None,
    *,
    split: str = "val",
    n_images: int = 3,
    num_samples: int = 6,
    device: str = "auto",
    cache_dir: str | None = None,
):
    """Draw :func:`pyroseg.plots.latent_scales_grid` for a run folder, on slices
    of its ``split`` patients; ``png`` defaults to ``RUN_DIR/latent_scales.png``.
    Returns the path written."""
    from pathlib import Path

    from pyroseg import plots
    from pyroseg.data import load_source
    from pyroseg.devices import resolve_device
    from pyroseg.errors import UsageError
    from pyroseg.runs import load_run, select_split

    dev = resolve_device(device)
    run = load_run(run_dir, device=dev)
    if not run.model.latent_sites or run.model.guide_is_prior:
        raise UsageError(f"--latents: model {run.model.name!r} of {run_dir} has no latent sites to show")
    cfg = run.config
    data = load_source(cfg.data, cfg.image_size, **{**cfg.source_options(), "cache_dir": cache_dir or cfg.cache_dir})
    subset = select_split(data, run.split, split, source=cfg.data)
    png = Path(png) if png else Path(run_dir) / "latent_scales.png"
    return plots.latent_scales_grid(run.model, subset, png, device=dev, n_images=n_images, num_samples=num_samples)
