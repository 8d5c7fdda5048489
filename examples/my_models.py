"""A model/guide pair written outside pyroseg, trained and evaluated by its CLI.

The worked example of the documentation ("Writing your own model"), run by
tests/test_external_model.py. Train it without editing pyroseg::

    cd examples && pyroseg fit --model my_models:LatentShiftUNet --data synthetic-ambiguous --out ../runs/shift
    pyroseg evaluate runs/shift     # from anywhere the module can be imported

The model: a U-Net whose last feature maps are shifted, everywhere alike, by a
vector computed from a global latent ``z``; ``z`` has a standard normal prior,
and the guide infers it from the image *and* the mask (as the Probabilistic
U-Net's posterior net does), so ``z`` can only carry what the mask adds to the
image: for data with several annotators, which of them drew it.

    model:  z ~ N(0, I)                                  (B, D)
            y ~ Bernoulli(head(relu(u(x) + W z)))       u(x): (B, F, H, W); W z: (B, F) broadcast over pixels
    guide:  z ~ N(mu(x, y), sigma(x, y))
    -ELBO = E_q[-log p(y | x, z)] + beta * KL(q(z | x, y) || N(0, I))
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from pyroseg.models import SegModel
from pyroseg.models.base import beta_scale, mask_likelihood
from pyroseg.models.prob_unet import GaussianEncoder
from pyroseg.nets import POSTERIOR_INIT_SCALE, UNet, init_mask_logits


class LatentShiftUNet(SegModel):
    """A U-Net with a global latent shift of its last features (see the module docs)."""

    name = "latent_shift_unet"  # how metrics, reports and tables name it
    latent_sites = ("z",)  # every latent pyro.sample site, in sampling order: one KL column each
    # Where test-time z comes from. pyroseg knows two kinds: "p(z|x)", the model's prior (the guide is then
    # a posterior that sees the mask, as in the Probabilistic U-Nets), and "q(z|x)", the guide given the image
    # alone (the VAE family). Our prior p(z) = N(0, I) simply ignores x.
    sample_from = "p(z|x)"
    test_time_z = "prior"  # where test-time z comes from: the prior net

    def __init__(self, *, latent_dim: int = 4, **kw):
        super().__init__(**kw)  # image_size, in_channels, widths: the shared backbone's
        self.latent_dim = int(latent_dim)
        self.unet = UNet(self.in_channels, self.widths, out_ch=0)  # features only: (B, widths[0], H, W)
        self.shift = nn.Linear(self.latent_dim, self.widths[0])
        self.head = init_mask_logits(nn.Conv2d(self.widths[0], 1, 1))  # starts at a 2 % lesion share
        self.posterior_net = GaussianEncoder(self.in_channels + 1, self.widths, self.latent_dim,
                                             init_scale=POSTERIOR_INIT_SCALE)

    def hparams(self):
        """What rebuilds this model (written to config.json): the backbone's and ours."""
        return {**super().hparams(), "latent_dim": self.latent_dim}

    def _logits(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``u: (B, F, H, W)``, ``z: (S, B, D)`` -> logits ``(S, B, 1, H, W)``."""
        s, b = z.shape[:2]
        h = F.relu(u.unsqueeze(0) + self.shift(z)[..., None, None])  # (S, B, F, H, W)
        return self.head(h.flatten(0, 1)).view(s, b, 1, *u.shape[-2:])

    def model(self, image, mask=None, *, beta=1.0, recon_scale=1.0):
        self._register("unet", "shift", "head")  # pyro.module for each network the model uses
        u = self.unet.features(image)
        b = image.shape[0]
        with self._plate(image):  # pyro.plate("batch", B)
            with beta_scale(beta):  # KL annealing: poutine.scale on the latent site
                prior = dist.Normal(u.new_zeros(b, self.latent_dim), u.new_ones(b, self.latent_dim))
                z = pyro.sample("z", prior.to_event(1))  # (B, D)
            return mask_likelihood(self._logits(u, z.unsqueeze(0)).squeeze(0), mask, recon_scale)  # site "mask"

    def guide(self, image, mask=None, *, beta=1.0, recon_scale=1.0):
        if mask is None:
            raise ValueError("the guide q(z | x, y) needs the mask; to predict, use sample()")
        self._register("posterior_net")
        with self._plate(image), beta_scale(beta):
            loc, scale = self.posterior_net(torch.cat([image, mask], dim=1))  # (B, D) each
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def sample(self, image, num_samples=1):
        """Mask probabilities ``(S, B, 1, H, W)``: the U-Net once, the head per sample."""
        u = self.unet.features(image)
        z = torch.randn(num_samples, image.shape[0], self.latent_dim, device=image.device, dtype=u.dtype)
        return torch.sigmoid(self._logits(u, z))
