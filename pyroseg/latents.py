"""Drawing a model's latent sites through its Pyro program, some of them held at a mean.

The pieces that :mod:`pyroseg.collapse` (what each site does to the prediction) and
:func:`pyroseg.plots.latent_scales_grid` (what each site controls, in pictures) share:
:class:`FixSites`, an effect handler that sets sites to their mean or to given values,
and :func:`predict_probs`, mask probabilities from the model's test-time source
(:attr:`~pyroseg.models.base.SegModel.test_time_z`) with some sites fixed, under
common random numbers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger

from pyroseg.models.base import SegModel

__all__ = ["FixSites", "guide_mask", "predict_probs", "rng_state", "set_rng_state"]


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


def guide_mask(model: SegModel, mask: torch.Tensor | None) -> torch.Tensor | None:
    """What the guide is given as the mask: ``mask`` for a guide that is the posterior
    ``q(z | x, y)`` (models whose test-time ``z`` comes from the prior), ``None`` for one
    that sees the image only (the VAE family)."""
    return mask if model.test_time_z == "prior" else None


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
    if model.test_time_z == "prior":  # test-time z from the prior: run the model alone
        fix = fix | ({prior_mean} if prior_mean else set())
        trace = poutine.trace(FixSites(fix, draw=True)(model.model)).get_trace(rep, None)
    else:  # test-time z from q(z | x): guide, then the model replayed on its z
        guide = FixSites(fix, draw=True)(model.guide)
        state = rng_state(image.device)
        g = poutine.trace(guide).get_trace(rep, None)
        if prior_mean:
            # the prior of `prior_mean` given the guide's draws above it ...
            m = poutine.trace(poutine.replay(model.model, trace=g)).get_trace(rep, None)
            sites = list(model.latent_sites)
            above = sites[: sites.index(prior_mean)]
            keep = {s: g.nodes[s]["value"] for s in above}
            keep[prior_mean] = m.nodes[prior_mean]["fn"].mean
            # ... then the sites below drawn from q given it, from the random numbers the first pass used
            set_rng_state(image.device, state)
            g = poutine.trace(FixSites(fix, values=keep, draw=True)(model.guide)).get_trace(rep, None)
        trace = poutine.trace(poutine.replay(model.model, trace=g)).get_trace(rep, None)
    probs = trace.nodes["mask"]["fn"].base_dist.probs  # (S*B, 1, H, W)
    return probs.view(num_samples, b, *probs.shape[1:])


def rng_state(device: torch.device) -> tuple:
    """The CPU RNG state, and the device's where ``device`` is a GPU."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(device: torch.device, state: tuple) -> None:
    """Restore a :func:`rng_state`."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
