"""Stochastic Segmentation Networks (Monteiro et al. 2020), for one foreground class.

    model:  eta_m ~ LowRankMVN(mu(x), W(x) W(x)^T + diag(d(x)))  m = 1..M, iid   site "eta"
            y ~ (1/M) sum_m Bernoulli(logits = eta_m)            site "mask"
    guide:  eta_m ~ the same distribution (the guide *is* the prior)

    loss = -log (1/M) sum_m prod_pixels Bernoulli(y | logits = eta_m)   (the paper's Eq. 5)

``eta`` is the logit map of all ``H * W`` pixels, one multivariate normal per image:
``mu`` (1 channel), the covariance factor ``W`` (``rank`` channels, so ``W`` is
``(H*W, rank)``) and the diagonal ``d = exp(.) + epsilon`` are 1x1 convolutions on the
shared U-Net's last features (the reference code's heads; defaults ``rank = 10``,
``epsilon = 1e-5``, ``M = 20`` samples in the loss).

**How the loss comes out of the shared training step.** :class:`~pyroseg.objective.SiteELBO`
(and any Pyro ELBO) scores ``recon = -log p(mask)`` at the observed site plus ``KL(guide ||
model)`` at each latent site. Here the ``"eta"`` site holds all ``M`` draws at once (event
shape ``(M, H*W)``, batch ``(B,)``; the mask's event stays ``(1, H, W)``), and the ``"mask"``
site is the uniform mixture of the ``M`` Bernoulli maps given those draws
(``MixtureSameFamily``), whose log-probability is exactly
``logsumexp_m log p(y | eta_m) - log M``: the paper's Monte Carlo estimate, gradient
included (``eta`` is reparameterised, so the gradient reaches ``mu``, ``W`` and ``d``
through the draws, as in the reference ``rsample``). The guide draws ``eta`` from the same
distribution the model then scores, so the KL term is 0 by construction: the guide marks
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

Where we differ from the reference: it predicts two-class softmax logits (a low-rank normal
over ``2 * H * W`` logits); for one foreground class we model the Bernoulli logit directly.
The difference of two jointly normal logit maps with a rank-10 factor and a diagonal is
again a normal with a rank-10 factor and a diagonal, so the family of mask distributions is
the same, with half the outputs. The reference also falls back to a diagonal normal when
the covariance is not positive definite; ``d >= epsilon > 0`` makes ours always so.

References: Monteiro et al., "Stochastic Segmentation Networks: Modelling Spatially
Correlated Aleatoric Uncertainty", NeurIPS 2020; code:
github.com/biomedia-mira/stochastic_segmentation_networks.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyroseg.models.base import SegModel, beta_scale, positive_float, positive_int
from pyroseg.nets import UNet, init_mask_logits

__all__ = ["SSNModel"]


class SSNModel(SegModel):
    name = "ssn"
    latent_sites = ("eta",)
    sample_from = "p(eta|x)"
    test_time_z = "guide"
    guide_is_prior = True

    def __init__(self, *, rank: int = 10, num_mc_samples: int = 20, epsilon: float = 1e-5, **kw):
        super().__init__(**kw)
        self.rank = positive_int("rank", rank)
        self.num_mc_samples = positive_int("num_mc_samples", num_mc_samples)
        self.epsilon = positive_float("epsilon", epsilon)
        self.unet = UNet(self.in_channels, self.widths, out_ch=0)
        w0 = self.widths[0]
        self.mean_head = init_mask_logits(nn.Conv2d(w0, 1, 1))
        self.log_cov_diag_head = nn.Conv2d(w0, 1, 1)
        self.cov_factor_head = nn.Conv2d(w0, self.rank, 1)
        self._handoff: tuple | None = None

    def hparams(self):
        return {**super().hparams(), "rank": self.rank, "num_mc_samples": self.num_mc_samples, "epsilon": self.epsilon}

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
        return dist.LowRankMultivariateNormal(loc, cov_factor, cov_diag)

    def _eta_fn(self, image: torch.Tensor, mask: torch.Tensor | None) -> dist.Distribution:
        """The ``"eta"`` site's distribution: ``M`` iid draws per image, batch ``(B,)``,
        event ``(M, H*W)`` (``M = num_mc_samples`` with a mask, 1 without)."""
        m = self.num_mc_samples if mask is not None else 1
        return _iid(self.logit_distribution(image), m)

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


def _iid(base: dist.LowRankMultivariateNormal, m: int) -> dist.Distribution:
    """``m`` iid copies of ``base`` (batch ``(B,)``, event ``(D,)``) as one distribution
    with batch ``(B,)`` and event ``(m, D)``."""
    b = base.batch_shape[0]
    expanded = dist.LowRankMultivariateNormal(
        base.loc.unsqueeze(1).expand(b, m, -1),
        base.cov_factor.unsqueeze(1).expand(b, m, -1, -1),
        base.cov_diag.unsqueeze(1).expand(b, m, -1),
    )
    return expanded.to_event(1)
