"""The Hierarchical Probabilistic U-Net (Kohl et al. 2019), three spatial latent scales.

Two "hierarchical cores" of the same shape, each a U-Net encoder followed by
the coarse part of a decoder with a latent at each of its first three scales:

    prior core      on x:      p(z_l | z_{>l}, x)
    posterior core  on [x, y]: q(z_l | x, y, z_{>l})

Scales (``z_3`` coarsest, sampled first) sit at the encoder's three coarsest
resolutions, 8x8, 16x16 and 32x32 at 64x64 input (1/8, 1/4, 1/2 of the image),
each with ``latent_channels`` channels per position. At a scale the core maps its
features ``h`` to ``(loc, scale)`` with a 1x1 convolution, joins the drawn ``z_l``
to ``h``, upsamples, joins the encoder's skip and applies a conv block; after the
last scale a "stitching" decoder (here the remaining levels, if any, and a 1x1
head) gives the logits.

    -ELBO = E_q[-log p(y | x, z)] + beta * sum_l KL(q(z_l | x, y, z_{>l}) || p(z_l | x, z_{>l}))

each KL analytic given the scales above it, one ``pyro.sample`` site and one KL
column per scale. The likelihood is computed along the *prior* core with the
posterior's z's, as in the paper. At test time every ``z_l`` comes from the
prior core; ``sample`` runs the prior encoder once per image and the decoder
part once per sample.

The seed report placed the scales at 4x4/8x8/16x16 with a five-level net; we
keep the shared four-level encoder (16-32-64-128) so that every model has the
same backbone, and put the scales at its three coarsest resolutions.

References: Kohl et al., "A Hierarchical Probabilistic U-Net for Modeling
Multi-Scale Ambiguities", arXiv:1905.13077, 2019.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from pyroseg.models.base import SegModel, beta_scale, mask_likelihood
from pyroseg.nets import POSTERIOR_INIT_SCALE, init_mask_logits, ConvBlock, DiagGaussianHead, Encoder

__all__ = ["HProbUNetModel", "HierarchicalCore"]

NUM_SCALES = 3


class HierarchicalCore(nn.Module):
    """Encoder plus the latent part of the decoder.

    ``encode(x)`` returns the encoder features (finest first).
    ``walk(feats, sample)`` goes from the bottleneck up through the latent scales,
    calling ``sample(name, loc, scale) -> z`` at each (``loc, scale: (B, c, h, w)``),
    and returns the features after the last scale, ``(B, w, h', w')``.
    """

    def __init__(self, in_ch: int, widths, latent_channels: int, *, init_scale: float | None = None):
        super().__init__()
        levels = len(widths)
        if levels < NUM_SCALES + 1:
            raise ValueError(f"hprob_unet needs at least {NUM_SCALES + 1} encoder levels, got {levels}")
        self.widths = tuple(widths)
        self.encoder = Encoder(in_ch, widths)
        self.heads = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for k in range(NUM_SCALES):
            lvl = levels - 1 - k  # resolution level of this scale
            self.heads.append(DiagGaussianHead(widths[lvl], latent_channels, spatial=True, init_scale=init_scale))
            self.blocks.append(ConvBlock(widths[lvl] + latent_channels + widths[lvl - 1], widths[lvl - 1]))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder(x)

    def walk(self, feats: list[torch.Tensor], sample) -> torch.Tensor:
        levels = len(self.widths)
        h = feats[-1]
        for k in range(NUM_SCALES):
            lvl = levels - 1 - k
            loc, scale = self.heads[k](h)
            z = sample(f"z_{NUM_SCALES - k}", loc, scale)  # z_3 first (coarsest)
            h = F.interpolate(torch.cat([h, z], dim=1), scale_factor=2.0, mode="nearest")
            h = self.blocks[k](torch.cat([h, feats[lvl - 1]], dim=1))
        return h


class Stitch(nn.Module):
    """The rest of the decoder after the last latent scale, then a 1x1 head.

    ``forward(h, feats)`` -> logits ``(B, 1, H, W)``.
    """

    def __init__(self, widths):
        super().__init__()
        levels = len(widths)
        first = levels - 1 - NUM_SCALES  # level reached after the last scale
        self.first = first
        self.blocks = nn.ModuleList(ConvBlock(widths[lvl] + widths[lvl - 1], widths[lvl - 1]) for lvl in range(first, 0, -1))
        self.out = init_mask_logits(nn.Conv2d(widths[0], 1, 1))

    def forward(self, h: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            lvl = self.first - i
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = block(torch.cat([h, feats[lvl - 1]], dim=1))
        return self.out(h)


class HProbUNetModel(SegModel):
    name = "hprob_unet"
    latent_sites = tuple(f"z_{NUM_SCALES - k}" for k in range(NUM_SCALES))  # ("z_3", "z_2", "z_1")
    sample_from = "p(z|x)"

    def __init__(self, *, latent_channels: int = 2, **kw):
        super().__init__(**kw)
        self.latent_channels = int(latent_channels)
        self.prior_core = HierarchicalCore(self.in_channels, self.widths, self.latent_channels)
        self.posterior_core = HierarchicalCore(
            self.in_channels + 1, self.widths, self.latent_channels, init_scale=POSTERIOR_INIT_SCALE
        )
        self.stitch = Stitch(self.widths)

    def hparams(self):
        return {**super().hparams(), "latent_channels": self.latent_channels}

    def model(self, image, mask=None, *, beta=1.0, recon_scale=1.0):
        self._register("prior_core", "stitch")
        feats = self.prior_core.encode(image)
        with self._plate(image):
            with beta_scale(beta):
                h = self.prior_core.walk(
                    feats, lambda name, loc, scale: pyro.sample(name, dist.Normal(loc, scale).to_event(3))
                )
            return mask_likelihood(self.stitch(h, feats), mask, recon_scale)

    def guide(self, image, mask=None, *, beta=1.0, recon_scale=1.0):
        if mask is None:
            raise ValueError("the hprob_unet guide q(z | x, y) needs the mask; to predict, use sample()")
        self._register("posterior_core")
        feats = self.posterior_core.encode(torch.cat([image, mask], dim=1))
        with self._plate(image), beta_scale(beta):
            self.posterior_core.walk(feats, lambda name, loc, scale: pyro.sample(name, dist.Normal(loc, scale).to_event(3)))

    def sample(self, image, num_samples=1):
        feats = self.prior_core.encode(image)  # once per image
        rep = [f.repeat(num_samples, 1, 1, 1) for f in feats]  # (S*B, ...), sample-major
        h = self.prior_core.walk(rep, lambda name, loc, scale: dist.Normal(loc, scale).rsample())
        logits = self.stitch(h, rep)
        return torch.sigmoid(logits).view(num_samples, image.shape[0], *logits.shape[1:])
