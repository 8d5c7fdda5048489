"""The deterministic baseline: a U-Net trained by maximum likelihood through SVI.

The model has no latent variable, so the guide is empty and the ELBO is the
mask log-likelihood: ``-ELBO = sum_pixels BCE(sigmoid(unet(x)), y)``. Training it
through the same SVI loop as the generative models keeps comparisons fair.
"""

from __future__ import annotations

import pyro
import torch

from pyroseg.models.base import SegModel, mask_likelihood
from pyroseg.nets import UNet

__all__ = ["UNetModel"]


class UNetModel(SegModel):
    """``p(y | x) = prod_pixels Bernoulli(sigmoid(unet(x)))``; no latent."""

    name = "unet"
    latent_sites = ()

    def __init__(self, **kw):
        super().__init__(**kw)
        self.unet = UNet(self.in_channels, self.widths, out_ch=1)

    def model(self, image, mask=None, *, beta=1.0, recon_scale=1.0):
        pyro.module("unet", self.unet)
        logits = self.unet(image)  # (B, 1, H, W)
        with self._plate(image):
            return mask_likelihood(logits, mask, recon_scale)

    def guide(self, image, mask=None, *, beta=1.0, recon_scale=1.0):
        """Nothing to infer: maximum likelihood."""

    def sample(self, image: torch.Tensor, num_samples: int = 1) -> torch.Tensor:
        prob = torch.sigmoid(self.unet(image))  # (B, 1, H, W)
        return prob.unsqueeze(0).expand(num_samples, *prob.shape)
