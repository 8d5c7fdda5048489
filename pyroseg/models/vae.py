"""The VAE segmenter: ``q(z | x)``, ``p(z) = N(0, I)``, ``p(y | z)``.

The guide encodes the *image* only, as in the seed report. The objective is
then not the ELBO of a generative model of images but the variational
information bottleneck (Alemi et al. 2017):

    -L = E_{q(z|x)}[-log p(y | z)] + beta * KL(q(z | x) || N(0, I))

so ``z`` must carry everything about the mask that the decoder needs, and at
test time ``z`` comes from ``q(z | x)``, never from ``N(0, I)`` (a mask drawn from
the prior knows nothing of the image; the report scored that, and its Dice of
0.65 is the score of predicting "no tumour" everywhere).

References: Kingma & Welling, "Auto-Encoding Variational Bayes", 2014;
Alemi et al., "Deep Variational Information Bottleneck", 2017.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyroseg.models.base import SegModel, beta_scale, mask_likelihood, positive_int
from pyroseg.nets import POSTERIOR_INIT_SCALE, Decoder, DiagGaussianHead, Encoder, init_mask_logits

__all__ = ["VAEModel", "FlatEncoderHead", "FlatDecoderStem"]

#: Channels the bottleneck is squeezed to before it is flattened into a vector,
#: so the vector latents cost a few thousand weights, not millions.
SQUEEZE = 16


class FlatEncoderHead(nn.Module):
    """Bottleneck ``(B, W, h, w)`` -> feature vector ``(B, hidden)``.

    A 1x1 convolution to ``SQUEEZE`` channels keeps *where* things are (a
    global pooling would lose the lesion's position), then a linear layer.
    """

    def __init__(self, width: int, spatial: int, hidden: int):
        super().__init__()
        self.squeeze = nn.Conv2d(width, SQUEEZE, 1)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(SQUEEZE * spatial * spatial, hidden), nn.SiLU())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.squeeze(h))


class FlatDecoderStem(nn.Module):
    """Vector ``(B, D)`` -> bottleneck-shaped features ``(B, W, h, w)``."""

    def __init__(self, in_dim: int, width: int, spatial: int):
        super().__init__()
        self.spatial = spatial
        self.fc = nn.Sequential(nn.Linear(in_dim, SQUEEZE * spatial * spatial), nn.SiLU())
        self.expand = nn.Conv2d(SQUEEZE, width, 1)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        h = self.fc(v).view(v.shape[0], SQUEEZE, self.spatial, self.spatial)
        return self.expand(h)


class VAEModel(SegModel):
    """Plain VAE: ``z`` a vector of ``latent_dim``; decoder without skips.

    Test-time ``z ~ q(z | x)`` (variational information bottleneck, see module docs).
    """

    name = "vae"
    latent_sites = ("z",)
    sample_from = "q(z|x)"
    test_time_z = "guide"

    def __init__(self, *, latent_dim: int = 24, hidden: int = 256, **kw):
        super().__init__(**kw)
        self.latent_dim = positive_int("latent_dim", latent_dim)
        self.hidden = positive_int("hidden", hidden)
        spatial = self.image_size // 2 ** (len(self.widths) - 1)
        # guide side: q(z | x)
        self.encoder = Encoder(self.in_channels, self.widths)
        self.enc_head = FlatEncoderHead(self.widths[-1], spatial, self.hidden)
        self.q_z = DiagGaussianHead(self.hidden, self.latent_dim, init_scale=POSTERIOR_INIT_SCALE)
        # model side: p(y | z)
        self.stem = FlatDecoderStem(self.latent_dim, self.widths[-1], spatial)
        self.decoder = Decoder(self.widths, skips=False)
        self.out = init_mask_logits(nn.Conv2d(self.widths[0], 1, 1))

    def hparams(self):
        return {**super().hparams(), "latent_dim": self.latent_dim, "hidden": self.hidden}

    # the three distributions, each from one method
    def z_posterior(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q(z | x)``: loc and scale, each ``(B, latent_dim)``."""
        return self.q_z(self.enc_head(self.encoder(image)[-1]))

    def mask_logits(self, z: torch.Tensor) -> torch.Tensor:
        """``p(y | z)``: logits ``(B, 1, H, W)`` for ``z: (B, latent_dim)``."""
        return self.out(self.decoder([self.stem(z)]))

    def model(self, image, mask=None, *, beta=1.0, recon_scale=1.0):
        self._register("stem", "decoder", "out")
        b = image.shape[0]
        with self._plate(image):
            with beta_scale(beta):
                z = pyro.sample(
                    "z", dist.Normal(image.new_zeros(b, self.latent_dim), image.new_ones(b, self.latent_dim)).to_event(1)
                )
            return mask_likelihood(self.mask_logits(z), mask, recon_scale)

    def guide(self, image, mask=None, *, beta=1.0, recon_scale=1.0):
        self._register("encoder", "enc_head", "q_z")
        with self._plate(image):
            loc, scale = self.z_posterior(image)
            with beta_scale(beta):
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def sample(self, image, num_samples=1):
        loc, scale = self.z_posterior(image)  # (B, D) each, computed once
        z = dist.Normal(loc, scale).rsample((num_samples,))  # (S, B, D)
        logits = self.mask_logits(z.flatten(0, 1))  # (S*B, 1, H, W)
        return torch.sigmoid(logits).view(num_samples, *image.shape[:1], *logits.shape[1:])

    @torch.inference_mode()
    def predict_at_mean(self, image):
        return torch.sigmoid(self.mask_logits(self.z_posterior(image)[0]))  # z = E_q[z | x]: (B, D)
