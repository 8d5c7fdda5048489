"""Stochastic Segmentation Networks (Monteiro et al. 2020), for one foreground class.

    model:  eta_m ~ LowRankMVN(mu(x), W(x) W(x)^T + diag(d(x)))  m = 1..M, iid   site "eta"
            y ~ (1/M) sum_m Bernoulli(logits = eta_m)            site "mask"
    guide:  eta_m ~ the same distribution (the guide *is* the prior)

    loss = -log (1/M) sum_m prod_pixels Bernoulli(y | logits = eta_m)   (the paper's Eq. 5)

with the reference code's antithetic draws in the loss: ``eta_{M/2+m} = 2 mu - eta_m`` (half
the draws mirrored about the mean; ``antithetic=False``: ``M`` independent draws).

``eta`` is the logit map of all ``H * W`` pixels, one multivariate normal per image:
``mu`` (1 channel), the covariance factor ``W`` (``rank`` channels, so ``W`` is
``(H*W, rank)``) and the diagonal ``d = exp(.) + epsilon`` are 1x1 convolutions on the
shared U-Net's last features (the reference code's heads; defaults ``rank = 10``,
``epsilon = 1e-5``, ``M = 20`` samples in the loss, drawn as ``M/2`` antithetic pairs as the
reference's ``fixed_re_parametrization_trick`` does: a lower-variance estimate of the same
integral, and the draws' mean is exactly ``mu``).

**How the loss comes out of the shared training step.** :class:`~pyroseg.objective.SiteELBO`
(and any Pyro ELBO) scores ``recon = -log p(mask)`` at the observed site plus ``KL(guide ||
model)`` at each latent site. Here the ``"eta"`` site holds all ``M`` draws at once (event
shape ``(M, H*W)``, batch ``(B,)``; the mask's event stays ``(1, H, W)``), and the ``"mask"``
site is the uniform mixture of the ``M`` Bernoulli maps given those draws
(``MixtureSameFamily``), whose log-probability is exactly
``logsumexp_m log p(y | eta_m) - log M``: the paper's Monte Carlo estimate, gradient
included (``eta`` is reparameterised, so the gradient reaches ``mu``, ``W`` and ``d``
through the draws, as in the reference ``rsample``). The guide draws ``eta`` from the same
distribution the model then scores, so the KL term is 0 by construction (with antithetic
draws the site's ``log_prob`` is still the ``M`` iid normals': it enters only as ``log q - log p``
of one distribution, which cancels): the guide marks
its site ``infer={"guide_is_prior": True}`` and ``SiteELBO`` returns 0 for it exactly
(no rounding noise from an analytic KL over ``M * H * W`` dimensions); Pyro's own
``Trace_ELBO`` gets ``log q - log p = 0``. This is an importance-weighted bound with the
prior as its proposal (``M`` particles), written as one Pyro model/guide pair, so ``fit``,
``evaluate`` and ``compare`` run it unchanged. To run the network once per step, the guide
leaves the distribution it built for the model call that follows with the same image
tensor (``_handoff``); the model alone (``mask=None``, or under ``poutine.trace``) builds
its own.

With ``mask=None`` (generation) ``M = 1``: the mixture of one draw is the model's
predictive ``eta ~ p(eta | x), y ~ Bernoulli(eta)``.

**Sampling** (``sample``): one pass of the network, then ``S`` draws of ``eta`` from the
low-rank normal (``O(S * H*W * rank)``): cheap.

**The point prediction** (what Dice and the other one-mask scores judge) is the mask of the
logits' mean, ``sigmoid(mu)`` (``point_prediction = "mean-z"``), as the reference's inference
predicts from ``logit_mean``; ``evaluate --point mean`` scores the mean of ``S`` draws instead,
which is noisy where the logit variance is large (LGG, 3 folds: tumour-slice Dice 0.48 from 16
draws against 0.58 from ``mu``).

Where we differ from the reference: it predicts two-class softmax logits (a low-rank normal
over ``2 * H * W`` logits); for one foreground class we model the Bernoulli logit directly.
The difference of two jointly normal logit maps with a rank-10 factor and a diagonal is
again a normal with a rank-10 factor and a diagonal, so the family of mask distributions is
the same, with half the outputs. The reference falls back to independent normals (``W = 0``) for a batch whose covariance
torch cannot factorise: although ``d >= epsilon > 0`` makes the covariance positive definite in
exact arithmetic, the capacitance ``I + W^T D^-1 W`` loses its ``I`` in float32 when ``d`` is near
``epsilon`` under a large ``W`` (measured: a QUBIQ run crashed there after ~1,000 steps). We do
the same for the images concerned only, and log it once (:func:`low_rank_normal`).

References: Monteiro et al., "Stochastic Segmentation Networks: Modelling Spatially
Correlated Aleatoric Uncertainty", NeurIPS 2020; code:
github.com/biomedia-mira/stochastic_segmentation_networks.
"""

from __future__ import annotations

import logging

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyroseg.errors import UsageError
from pyroseg.models.base import SegModel, beta_scale, flag, positive_float, positive_int
from pyroseg.nets import UNet, init_mask_logits

__all__ = ["SSNModel", "low_rank_normal"]

log = logging.getLogger(__name__)


class SSNModel(SegModel):
    name = "ssn"
    latent_sites = ("eta",)
    sample_from = "p(eta|x)"
    test_time_z = "guide"
    guide_is_prior = True
    # the reference scores the mask of its logits' mean (argmax of ``logit_mean``), not a mean of draws
    point_prediction = "mean-z"

    def __init__(self, *, rank: int = 10, num_mc_samples: int = 20, epsilon: float = 1e-5, antithetic: bool = True, **kw):
        super().__init__(**kw)
        self.rank = positive_int("rank", rank)
        self.num_mc_samples = positive_int("num_mc_samples", num_mc_samples)
        self.epsilon = positive_float("epsilon", epsilon)
        self.antithetic = flag("antithetic", antithetic)
        if self.antithetic and self.num_mc_samples % 2:
            raise UsageError(f"--model-arg num_mc_samples={num_mc_samples!r}: expected an even number with antithetic "
                             "draws (pairs mirrored about the mean); or --model-arg antithetic=false")
        self.unet = UNet(self.in_channels, self.widths, out_ch=0)
        w0 = self.widths[0]
        self.mean_head = init_mask_logits(nn.Conv2d(w0, 1, 1))
        self.log_cov_diag_head = nn.Conv2d(w0, 1, 1)
        self.cov_factor_head = nn.Conv2d(w0, self.rank, 1)
        self._handoff: tuple | None = None
        self._warned = False  # the fallback to independent normals is logged once

    def hparams(self):
        return {**super().hparams(), "rank": self.rank, "num_mc_samples": self.num_mc_samples, "epsilon": self.epsilon,
                "antithetic": self.antithetic}

    # -- the distribution of the logits ------------------------------------------------
    def logit_distribution(self, image: torch.Tensor) -> dist.LowRankMultivariateNormal:
        """``p(eta | x)`` over the ``H*W`` pixel logits: batch ``(B,)``, event ``(H*W,)``;
        ``loc (B, HW)``, ``cov_factor (B, HW, rank)``, ``cov_diag (B, HW)``."""
        self._register("unet", "mean_head", "log_cov_diag_head", "cov_factor_head")
        u = self.unet.features(image)  # (B, w0, H, W)
        b = u.shape[0]
        loc = self.mean_head(u).reshape(b, -1)
        cov_diag = self.log_cov_diag_head(u).reshape(b, -1).exp() + self.epsilon
        cov_factor = self.cov_factor_head(u).reshape(b, self.rank, -1).transpose(1, 2)  # (B, HW, rank)
        p, fallbacks = low_rank_normal(loc, cov_factor, cov_diag)
        if fallbacks and not self._warned:
            self._warned = True
            log.warning("ssn: the covariance of %d image(s) of a batch of %d is not invertible in floating point; "
                        "independent normals for them (as the reference does; reported once)", fallbacks, b)
        return p

    def _eta_fn(self, image: torch.Tensor, mask: torch.Tensor | None) -> dist.Distribution:
        """The ``"eta"`` site's distribution: ``M`` draws per image, batch ``(B,)``, event
        ``(M, H*W)`` (``M = num_mc_samples`` with a mask, in antithetic pairs unless
        ``antithetic=False``; 1 draw without a mask)."""
        if mask is None:
            return _iid(self.logit_distribution(image), 1)
        return _iid(self.logit_distribution(image), self.num_mc_samples, antithetic=self.antithetic)

    def _mask_fn(self, eta: torch.Tensor, hw: tuple[int, int]) -> dist.Distribution:
        """Uniform mixture of the ``M`` Bernoulli maps ``eta: (B, M, H*W)``: batch ``(B,)``,
        event ``(1, H, W)``; ``log_prob = logsumexp_m log p(y | eta_m) - log M``."""
        b, m = eta.shape[:2]
        components = dist.Bernoulli(logits=eta.reshape(b, m, 1, *hw)).to_event(3)  # batch (B, M)
        return dist.MixtureSameFamily(dist.Categorical(logits=eta.new_zeros(b, m)), components)

    # -- the Pyro pair -----------------------------------------------------------------
    def model(self, image, mask=None, *, beta=1.0, recon_scale=1.0):
        handoff, self._handoff = self._handoff, None
        if handoff is not None and handoff[0] is image and handoff[1] == torch.is_grad_enabled():
            fn = handoff[2]  # built by the guide of this step: one network pass per step
        else:
            fn = self._eta_fn(image, mask)
        with self._plate(image):
            with beta_scale(beta):
                eta = pyro.sample("eta", fn)  # (B, M, HW)
            with poutine.scale(scale=recon_scale):
                return pyro.sample("mask", self._mask_fn(eta, image.shape[-2:]), obs=mask)

    def guide(self, image, mask=None, *, beta=1.0, recon_scale=1.0):
        fn = self._eta_fn(image, mask)
        self._handoff = (image, torch.is_grad_enabled(), fn)
        with self._plate(image), beta_scale(beta):
            pyro.sample("eta", fn, infer={"guide_is_prior": True})

    @torch.inference_mode()
    def predict(self, image: torch.Tensor, num_samples: int = 16) -> torch.Tensor:
        """The mean mask probability ``E[sigmoid(eta)]`` per pixel, ``(B, 1, H, W)``, by the
        probit approximation ``sigmoid(mu / sqrt(1 + pi * var / 8))`` with ``var`` the
        pixel's logit variance (``|W_i|^2 + d_i``), instead of the mean of ``num_samples``
        draws (ignored). Its 0.5 threshold is exactly ``mu >= 0``; the mean of a few draws
        is noisy where the logit variance is large, as SSN's log-mean-exp loss lets it be
        (measured on the overfitting test: Dice 0.61 from 8 draws, 1.00 from ``mu``)."""
        p = self.logit_distribution(image)
        var = p.cov_factor.pow(2).sum(-1) + p.cov_diag  # (B, HW)
        return torch.sigmoid(p.loc / torch.sqrt(1 + torch.pi * var / 8)).view(image.shape[0], 1, *image.shape[-2:])

    def sample(self, image, num_samples=1):
        p = self.logit_distribution(image)  # one network pass
        eta = p.rsample((num_samples,))  # (S, B, HW)
        return torch.sigmoid(eta).view(num_samples, image.shape[0], 1, *image.shape[-2:])

    @torch.inference_mode()
    def predict_at_mean(self, image):
        return torch.sigmoid(self.logit_distribution(image).loc).view(image.shape[0], 1, *image.shape[-2:])  # eta = mu


def low_rank_normal(loc: torch.Tensor, cov_factor: torch.Tensor, cov_diag: torch.Tensor
                    ) -> tuple[dist.LowRankMultivariateNormal, int]:
    """``LowRankMultivariateNormal(loc, cov_factor, cov_diag)``, batch ``(..., )``, event ``(D,)``,
    with the reference's fallback: an image whose capacitance ``I + W^T D^-1 W`` is not positive
    definite in floating point (``D`` near ``epsilon`` under a large ``W``: torch's Cholesky fails)
    gets ``W = 0``, i.e. independent normals with variance ``d``. The reference falls back for the
    whole batch; we do it for the images that need it only (the batch fallback, if torch still
    fails). Returns the distribution and how many batch elements fell back."""
    k = cov_factor.shape[-1]
    with torch.no_grad():
        cap = (cov_factor.mT / cov_diag.unsqueeze(-2)) @ cov_factor + torch.eye(k, dtype=loc.dtype, device=loc.device)
        ok = torch.linalg.cholesky_ex(cap).info == 0  # (...)
    fallbacks = int((~ok).sum())
    if fallbacks:
        cov_factor = cov_factor * ok[..., None, None].to(cov_factor.dtype)
    try:
        return dist.LowRankMultivariateNormal(loc, cov_factor, cov_diag), fallbacks
    except torch.linalg.LinAlgError:
        return dist.LowRankMultivariateNormal(loc, torch.zeros_like(cov_factor), cov_diag), int(ok.numel())


def _iid(base: dist.LowRankMultivariateNormal, m: int, *, antithetic: bool = False) -> dist.Distribution:
    """``m`` copies of ``base`` (batch ``(B,)``, event ``(D,)``) as one distribution with
    batch ``(B,)`` and event ``(m, D)``: iid, or with ``antithetic`` (``m`` even) ``m/2`` iid
    draws and their mirrors about the mean (:class:`AntitheticDraws`)."""
    b = base.batch_shape[0]
    args = (base.loc.unsqueeze(1).expand(b, m, -1), base.cov_factor.unsqueeze(1).expand(b, m, -1, -1),
            base.cov_diag.unsqueeze(1).expand(b, m, -1))
    try:  # base's factor carries low_rank_normal's fallback, so the copies nearly always factorise again...
        expanded = dist.LowRankMultivariateNormal(*args)
    except torch.linalg.LinAlgError:  # ...but a borderline one can fail in another batch layout: check each copy
        expanded = low_rank_normal(*args)[0]
    return AntitheticDraws(expanded, 1) if antithetic else expanded.to_event(1)


class AntitheticDraws(dist.Independent):
    """``m`` draws of a normal (base batch ``(..., m)``, event ``(D,)``) whose second half mirrors
    the first about the mean: ``x_{m/2+k} = 2 mu - x_k`` (the SSN reference's
    ``fixed_re_parametrization_trick``), still reparameterised. ``log_prob`` is the iid one: used
    here only where it cancels (guide = prior)."""

    def rsample(self, sample_shape=()):
        x = self.base_dist.rsample(torch.Size(sample_shape))  # (*sample_shape, ..., m, D)
        h = x.shape[-2] // 2
        mean = self.base_dist.mean[..., :h, :]
        return torch.cat([x[..., :h, :], 2 * mean - x[..., :h, :]], dim=-2)
