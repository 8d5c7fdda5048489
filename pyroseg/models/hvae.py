"""Hierarchical VAE: three vector latents sampled top-down.

    model:  z_3 ~ N(0, I)
            z_2 ~ p(z_2 | z_3)            = N(mu_p2(s_3), sigma_p2(s_3))
            z_1 ~ p(z_1 | z_2, z_3)       = N(mu_p1(s_2), sigma_p1(s_2))
            y   ~ p(y | z_1, z_2, z_3)    = Bernoulli(decoder(s_1))
    guide:  z_3 ~ q(z_3 | x)
            z_2 ~ q(z_2 | x, z_3)
            z_1 ~ q(z_1 | x, z_2, z_3)

where ``s_l = ResBlock(s_{l+1} + W_l z_l)`` is the top-down state shared by model and
guide (as in the Ladder VAE / NVAE): each latent layer is its own ``pyro.sample``
site (``"z_3"``, ``"z_2"``, ``"z_1"``; ``z_3`` the top, smallest, sampled first).
The guide sees the image only: as for :mod:`pyroseg.models.vae`, the objective is a
variational information bottleneck and test-time ``z`` comes from the guide.

The KL of each layer is analytic given the layers above it, and is logged per
site so that a collapsed layer (KL at 0) is visible.

References: Sønderby et al., "Ladder Variational Autoencoders", NeurIPS 2016;
Vahdat & Kautz, "NVAE", NeurIPS 2020.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyroseg.models.base import SegModel, beta_scale, mask_likelihood, positive_int, positive_ints
from pyroseg.models.vae import FlatDecoderStem, FlatEncoderHead
from pyroseg.nets import POSTERIOR_INIT_SCALE, Decoder, DiagGaussianHead, Encoder, ResBlock, init_mask_logits

__all__ = ["HVAEModel"]


class HVAEModel(SegModel):
    name = "hvae"
    latent_sites = ("z_3", "z_2", "z_1")
    sample_from = "q(z|x)"
    test_time_z = "guide"

    def __init__(self, *, latent_dims: tuple[int, int, int] = (16, 32, 64), hidden: int = 256, **kw):
        """``latent_dims``: sizes of ``(z_3, z_2, z_1)``, top first."""
        super().__init__(**kw)
        self.latent_dims = positive_ints("latent_dims", latent_dims, length=3)
        self.hidden = positive_int("hidden", hidden)
        d3, d2, d1 = self.latent_dims
        hd = self.hidden
        spatial = self.image_size // 2 ** (len(self.widths) - 1)
        # bottom-up (guide only)
        self.encoder = Encoder(self.in_channels, self.widths)
        self.enc_head = FlatEncoderHead(self.widths[-1], spatial, hd)
        self.q_3 = DiagGaussianHead(hd, d3, init_scale=POSTERIOR_INIT_SCALE)
        self.q_2 = DiagGaussianHead(2 * hd, d2, init_scale=POSTERIOR_INIT_SCALE)
        self.q_1 = DiagGaussianHead(2 * hd, d1, init_scale=POSTERIOR_INIT_SCALE)
        # top-down path (model and guide)
        self.top_down = nn.ModuleDict(
            {
                "in_3": nn.Linear(d3, hd),
                "res_3": ResBlock(hd),
                "in_2": nn.Linear(d2, hd),
                "res_2": ResBlock(hd),
                "in_1": nn.Linear(d1, hd),
                "res_1": ResBlock(hd),
            }
        )
        # priors (model only)
        self.p_2 = DiagGaussianHead(hd, d2)
        self.p_1 = DiagGaussianHead(hd, d1)
        # likelihood (model only)
        self.stem = FlatDecoderStem(hd, self.widths[-1], spatial)
        self.decoder = Decoder(self.widths, skips=False)
        self.out = init_mask_logits(nn.Conv2d(self.widths[0], 1, 1))

    def hparams(self):
        return {**super().hparams(), "latent_dims": list(self.latent_dims), "hidden": self.hidden}

    def _down(self, s: torch.Tensor | None, z: torch.Tensor, level: int) -> torch.Tensor:
        """Top-down state after ``z_level``: ``s_l = ResBlock(s_{l+1} + W_l z_l)``, ``(B, hidden)``."""
        td = self.top_down
        h = td[f"in_{level}"](z)
        return td[f"res_{level}"](h if s is None else s + h)

    def mask_logits(self, s1: torch.Tensor) -> torch.Tensor:
        """``p(y | z)`` from the last top-down state ``(B, hidden)``: logits ``(B, 1, H, W)``."""
        return self.out(self.decoder([self.stem(s1)]))

    def model(self, image, mask=None, *, beta=1.0, recon_scale=1.0):
        self._register("top_down", "p_2", "p_1", "stem", "decoder", "out")
        b = image.shape[0]
        d3 = self.latent_dims[0]
        with self._plate(image):
            with beta_scale(beta):
                z3 = pyro.sample("z_3", dist.Normal(image.new_zeros(b, d3), image.new_ones(b, d3)).to_event(1))
                s = self._down(None, z3, 3)
                z2 = pyro.sample("z_2", dist.Normal(*self.p_2(s)).to_event(1))
                s = self._down(s, z2, 2)
                z1 = pyro.sample("z_1", dist.Normal(*self.p_1(s)).to_event(1))
                s = self._down(s, z1, 1)
            return mask_likelihood(self.mask_logits(s), mask, recon_scale)

    def guide(self, image, mask=None, *, beta=1.0, recon_scale=1.0):
        self._register("encoder", "enc_head", "q_3", "q_2", "q_1", "top_down")
        h = self.enc_head(self.encoder(image)[-1])  # (B, hidden)
        with self._plate(image), beta_scale(beta):
            self._posterior_chain(h, sample=lambda name, loc, scale: pyro.sample(name, dist.Normal(loc, scale).to_event(1)))

    def _posterior_chain(self, h: torch.Tensor, sample) -> torch.Tensor:
        """Run ``q(z_3|x) q(z_2|x,z_3) q(z_1|x,z_2,z_3)`` with ``sample(name, loc, scale) -> z``;
        returns the last top-down state ``(B, hidden)``."""
        z3 = sample("z_3", *self.q_3(h))
        s = self._down(None, z3, 3)
        z2 = sample("z_2", *self.q_2(torch.cat([h, s], dim=-1)))
        s = self._down(s, z2, 2)
        z1 = sample("z_1", *self.q_1(torch.cat([h, s], dim=-1)))
        return self._down(s, z1, 1)

    def sample(self, image, num_samples=1):
        h = self.enc_head(self.encoder(image)[-1])  # computed once, (B, hidden)
        h = h.repeat(num_samples, 1)  # (S*B, hidden), sample-major
        s1 = self._posterior_chain(h, sample=lambda name, loc, scale: dist.Normal(loc, scale).rsample())
        logits = self.mask_logits(s1)
        return torch.sigmoid(logits).view(num_samples, image.shape[0], *logits.shape[1:])

    @torch.inference_mode()
    def predict_at_mean(self, image):
        h = self.enc_head(self.encoder(image)[-1])  # (B, hidden)
        return torch.sigmoid(self.mask_logits(self._posterior_chain(h, sample=lambda name, loc, scale: loc)))
