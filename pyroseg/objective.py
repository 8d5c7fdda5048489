"""The training objective, written out site by site: the ELBO with free bits.

Per batch of ``B`` images, with ``s`` the scale Pyro attaches to a site (``beta``
on the latent sites, ``recon_scale`` = GECO's lambda on the likelihood)::

    -ELBO = recon_scale * sum_b -log p(y_b | x_b, z_b)
            + sum_sites beta * sum_b FB_site(KL(q(z_site | ...) || p(z_site | ...))_b)

where the KL of each latent site is analytic given the sites sampled before it
(``analytic_kl=True``, as :class:`~pyro.infer.TraceMeanField_ELBO`) or the
one-sample Monte Carlo estimate ``log q(z) - log p(z)`` (``analytic_kl=False``,
as :class:`~pyro.infer.Trace_ELBO` for reparameterised latents), and
``FB_site`` is the identity unless free bits are on (:func:`free_bits`).

With ``free_bits = 0`` the value and the gradient are those of Pyro's own
``TraceMeanField_ELBO`` / ``Trace_ELBO`` (``tests/test_objective.py`` checks it);
written out here so that (1) the free-bits floor can act on each latent site's
KL and (2) the per-image terms of the *same* forward pass come back with the
loss: GECO's constraint needs the batch's reconstruction error, and a second
forward pass to get it would cost as much as the step itself.

References: Kingma et al., "Improved Variational Inference with Inverse
Autoregressive Flow", NeurIPS 2016 (free bits, Appendix C.8).
"""

from __future__ import annotations

import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.trace_elbo import Trace_ELBO
from pyro.infer.util import check_fully_reparametrized, is_validation_enabled
from torch.distributions import kl_divergence

__all__ = ["SiteELBO", "free_bits", "site_kl"]


def free_bits(kl: torch.Tensor, floor: float) -> torch.Tensor:
    """The free-bits floor on one latent site's KL (Kingma et al. 2016).

    ``kl``: ``(B,)``, the KL of one latent site (a whole latent *group*: summed
    over its dimensions and, for spatial latents, its positions) for each image
    of the batch. The floor applies to the **batch mean**, as in the paper's
    ``sum_j max(lambda, E_x[KL_j])``: while ``mean_b kl_b <= floor`` the site
    contributes the constant ``floor`` per image and **no gradient** (the
    optimiser is free to use those nats); above the floor it is ``kl``
    unchanged, gradient included. ``floor <= 0`` is the identity.
    Returns ``(B,)``; its sum is ``B * max(floor, mean_b kl_b)``.
    """
    if floor <= 0:
        return kl
    below = kl.detach().mean() <= floor
    return torch.where(below, torch.full_like(kl, floor).detach(), kl)


def site_kl(model_site: dict, guide_site: dict, *, analytic: bool = True) -> torch.Tensor:
    """KL of one latent site per image, ``(B,)``, unscaled, from the site's node in the
    model trace and in the guide trace.

    ``analytic``: ``KL(q || p)`` in closed form where torch has it, else (and with
    ``analytic=False``) the one-sample estimate ``log q(z) - log p(z)`` at the guide's draw.
    A guide site marked ``infer={"guide_is_prior": True}`` draws from the model's
    own distribution (same network, same input; ``ssn``): its KL is 0 by
    construction, returned exactly (no rounding noise, no gradient).
    """
    if guide_site["infer"].get("guide_is_prior"):
        return guide_site["value"].new_zeros(model_site["fn"].batch_shape)
    if analytic:
        try:
            return kl_divergence(guide_site["fn"], model_site["fn"])
        except NotImplementedError:
            pass
    value = guide_site["value"]
    return guide_site["fn"].log_prob(value) - model_site["fn"].log_prob(value)


class SiteELBO(TraceMeanField_ELBO):
    """The negative ELBO of a pyroseg model/guide pair, one term per site.

    ``differentiable_loss_and_terms(model, guide, *args, **kwargs)`` returns
    the loss (a scalar to backpropagate, summed over the batch) and the
    unscaled per-image terms of that same pass, detached: ``"recon"``
    (``-log p(y | x, z)`` of the ``"mask"`` site, nats per image, ``(B,)``),
    ``"recon_<site>"`` for any other observed site (phiseg's per-level
    ``"mask_l"``; every observed site enters the loss with its scale) and
    ``"kl_<site>"`` (the KL of each latent site before the free-bits floor, ``(B,)``).
    ``differentiable_loss`` returns only the loss, so this is a drop-in
    ``pyro.infer.ELBO`` (``SVI`` can use it too).
    """

    def __init__(self, *, analytic_kl: bool = True, free_bits: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if free_bits < 0:
            raise ValueError(f"free_bits must be >= 0, got {free_bits}")
        self.analytic_kl = bool(analytic_kl)
        self.free_bits = float(free_bits)

    def _get_trace(self, model, guide, args, kwargs):
        if self.analytic_kl:  # checks the mean-field order under validation
            return super()._get_trace(model, guide, args, kwargs)
        return Trace_ELBO._get_trace(self, model, guide, args, kwargs)

    # -- the terms of one particle -------------------------------------------------------
    def _site_kl(self, model_site: dict, guide_site: dict) -> torch.Tensor:
        """KL of one latent site per image, ``(B,)``, unscaled: :func:`site_kl`."""
        return site_kl(model_site, guide_site, analytic=self.analytic_kl)

    def _particle(self, model_trace, guide_trace) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, terms)`` of one (model, guide) trace pair; see the module docs."""
        loss = 0.0
        terms: dict[str, torch.Tensor] = {}
        recon = None
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                nll = -site["fn"].log_prob(site["value"])  # (B,) nats per image
                loss = loss + scale_and_mask(nll, site["scale"], site["mask"]).sum()
                if name == "mask" or "mask" not in model_trace.nodes:
                    recon = nll if recon is None else recon + nll
                else:  # an extra likelihood beside "mask" (phiseg's per-level "mask_l"): its own term
                    terms[f"recon_{name}"] = nll
                continue
            guide_site = guide_trace.nodes[name]
            if is_validation_enabled():
                check_fully_reparametrized(guide_site)
            kl = self._site_kl(site, guide_site)  # (B,)
            floored = free_bits(kl, self.free_bits)
            loss = loss + scale_and_mask(floored, guide_site["scale"], guide_site["mask"]).sum()
            terms[f"kl_{name}"] = kl
        if recon is not None:
            terms = {"recon": recon, **terms}
        return loss, terms

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        loss, _ = self._particle(model_trace, guide_trace)
        return loss.detach(), loss

    # -- public ------------------------------------------------------------------------
    def differentiable_loss_and_terms(self, model, guide, *args, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss (scalar, summed over the batch, averaged over particles) and
        the detached per-image terms ``{"recon": (B,), "kl_<site>": (B,)}`` of the
        same forward pass."""
        loss = 0.0
        terms: dict[str, torch.Tensor] = {}
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            particle, particle_terms = self._particle(model_trace, guide_trace)
            loss = loss + particle / self.num_particles
            for k, v in particle_terms.items():
                terms[k] = terms.get(k, 0.0) + v.detach() / self.num_particles
        return loss, terms

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        return self.differentiable_loss_and_terms(model, guide, *args, **kwargs)[0]

    def loss(self, model, guide, *args, **kwargs) -> float:
        return float(self.differentiable_loss(model, guide, *args, **kwargs).detach())
