"""Skip-VAE: the VAE plus encoder->decoder skips and ``z`` fed to every decoder layer.

    q(z | x)            encoder of the image (shared with the skips)
    p(z) = N(0, I)
    p(y | z, x)         decoder that starts from z, joins the encoder's skip
                        features at every level but the bottleneck, and gets
                        z (broadcast over the pixels) at every layer

The guide sees only the image, so, as for :mod:`pyroseg.models.vae`, the
objective is the variational information bottleneck and test-time ``z`` comes
from ``q(z | x)``. Feeding ``z`` to every layer is the remedy of Dieng et al.
against posterior collapse; with skips carrying the image, the decoder can
still ignore ``z``: watch the ``kl_z`` column of the metrics CSV.

References: Dieng, Kim, Rush & Blei, "Avoiding Latent Variable Collapse with
Generative Skip Models", AISTATS 2019.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyroseg.models.base import SegModel, beta_scale, mask_likelihood, positive_int
from pyroseg.models.vae import FlatDecoderStem, FlatEncoderHead
from pyroseg.nets import POSTERIOR_INIT_SCALE, Decoder, DiagGaussianHead, Encoder, init_mask_logits

__all__ = ["SkipVAEModel"]


class SkipVAEModel(SegModel):
    name = "skip_vae"
    latent_sites = ("z",)
    sample_from = "q(z|x)"
    test_time_z = "guide"

    def __init__(self, *, latent_dim: int = 24, hidden: int = 256, **kw):
        super().__init__(**kw)
        self.latent_dim = positive_int("latent_dim", latent_dim)
        self.hidden = positive_int("hidden", hidden)
        spatial = self.image_size // 2 ** (len(self.widths) - 1)
        self.encoder = Encoder(self.in_channels, self.widths)  # used by the guide (q) and the model (skips)
        self.enc_head = FlatEncoderHead(self.widths[-1], spatial, self.hidden)
        self.q_z = DiagGaussianHead(self.hidden, self.latent_dim, init_scale=POSTERIOR_INIT_SCALE)
        self.stem = FlatDecoderStem(self.latent_dim, self.widths[-1], spatial)
        self.decoder = Decoder(self.widths, skips=True, extra_ch=self.latent_dim)
        self.out = init_mask_logits(nn.Conv2d(self.widths[0] + self.latent_dim, 1, 1))

    def hparams(self):
        return {**super().hparams(), "latent_dim": self.latent_dim, "hidden": self.hidden}

    def z_posterior(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``q(z | x)`` from the encoder features; loc, scale ``(B, latent_dim)``."""
        return self.q_z(self.enc_head(feats[-1]))

    def mask_logits(self, feats: list[torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """``p(y | z, x)``: logits ``(B, 1, H, W)``; ``feats`` the encoder's list, ``z: (B, D)``.

        The bottleneck entry of ``feats`` is replaced by the stem of ``z``.
        """
        zmap = z[:, :, None, None]

        def z_at(level, h):  # z broadcast to the resolution of h: (B, D, h, w)
            return zmap.expand(-1, -1, *h.shape[-2:])

        h = self.decoder([*feats[:-1], self.stem(z)], extra=z_at)  # (B, w0, H, W)
        return self.out(torch.cat([h, z_at(0, h)], dim=1))

    def model(self, image, mask=None, *, beta=1.0, recon_scale=1.0):
        self._register("encoder", "stem", "decoder", "out")
        b = image.shape[0]
        feats = self.encoder(image)
        with self._plate(image):
            with beta_scale(beta):
                z = pyro.sample(
                    "z", dist.Normal(image.new_zeros(b, self.latent_dim), image.new_ones(b, self.latent_dim)).to_event(1)
                )
            return mask_likelihood(self.mask_logits(feats, z), mask, recon_scale)

    def guide(self, image, mask=None, *, beta=1.0, recon_scale=1.0):
        self._register("encoder", "enc_head", "q_z")
        with self._plate(image):
            loc, scale = self.z_posterior(self.encoder(image))
            with beta_scale(beta):
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def sample(self, image, num_samples=1):
        feats = self.encoder(image)  # computed once
        loc, scale = self.z_posterior(feats)
        z = dist.Normal(loc, scale).rsample((num_samples,)).flatten(0, 1)  # (S*B, D)
        rep = [f.repeat(num_samples, 1, 1, 1) for f in feats]  # sample-major, matches z's flatten
        logits = self.mask_logits(rep, z)
        return torch.sigmoid(logits).view(num_samples, image.shape[0], *logits.shape[1:])

    @torch.inference_mode()
    def predict_at_mean(self, image):
        feats = self.encoder(image)
        return torch.sigmoid(self.mask_logits(feats, self.z_posterior(feats)[0]))  # z = E_q[z | x]
