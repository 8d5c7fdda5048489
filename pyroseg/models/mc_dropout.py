"""MC dropout: a U-Net with dropout kept on at test time (Gal & Ghahramani 2016;
the "Dropout U-Net" baseline of Kohl et al. 2018, after Kendall et al.'s Bayesian SegNet).

    model:  y ~ Bernoulli(unet_w(x)),  w = the weights times a random dropout mask
    guide:  nothing (maximum likelihood, as the U-Net; dropout is the regulariser)

Dropout (element-wise, rate ``dropout``, default 0.5 as in Kendall et al. and Kohl et
al.) follows every encoder block but the first (the inner levels) and every decoder
block but the last, i.e. the "central" blocks of the Bayesian SegNet; the first
encoder block and the finest decoder block, which see the full-resolution image and
write the mask, have none. The dropout layers ignore ``train()``/``eval()``: every
forward pass, training or prediction, draws a fresh mask, so each sample of
``sample`` is one dropout mask (one draw of the weights from the approximate
posterior of Gal & Ghahramani). The masks are not Pyro sample sites; the model has no
latent site and no KL, and its loss is the mask's negative log-likelihood.

``sample(image, S)`` runs the network ``S`` times (the image repeated ``S`` times in
one batch, in chunks): unlike the latent models nothing can be shared between
samples but the first encoder block, which is computed once.

References: Gal & Ghahramani, "Dropout as a Bayesian Approximation", ICML 2016;
Kendall et al., "Bayesian SegNet", 2015; Kohl et al., NeurIPS 2018 (baselines).
"""

from __future__ import annotations

import pyro
import torch
import torch.nn.functional as F
from torch import nn

from pyroseg.models.base import SegModel, mask_likelihood, rate
from pyroseg.nets import UNet

__all__ = ["MCDropoutModel", "AlwaysDropout", "insert_dropout", "set_dropout"]


class AlwaysDropout(nn.Module):
    """Element-wise dropout that is on in ``eval()`` too (MC dropout)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)
        self.enabled = True  # off only inside MCDropoutModel.predict_at_mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, training=True) if self.p > 0 and self.enabled else x

    def extra_repr(self) -> str:
        return f"p={self.p}"


def insert_dropout(unet: UNet, layer) -> None:
    """Put ``layer()`` (a dropout module) after the "central" blocks of ``unet``, in place:
    every encoder block but the first and every decoder block but the finest (the
    Bayesian SegNet's placement; the blocks that read the image and write the mask have none)."""
    enc, dec = unet.encoder.blocks, unet.decoder.blocks
    for i in range(1, len(enc)):  # all encoder blocks but the first
        enc[i] = nn.Sequential(enc[i], layer())
    for i in range(len(dec) - 1):  # all decoder blocks but the finest
        dec[i] = nn.Sequential(dec[i], layer())


def set_dropout(module: nn.Module, enabled: bool) -> None:
    """Switch every :class:`AlwaysDropout` in ``module`` on or off."""
    for m in module.modules():
        if isinstance(m, AlwaysDropout):
            m.enabled = enabled


class MCDropoutModel(SegModel):
    name = "mc_dropout"
    latent_sites = ()
    sample_from = "dropout masks"
    stochastic = True

    #: Images per chunk of ``sample``'s repeated batch (S * B images in all).
    sample_chunk = 64

    def __init__(self, *, dropout: float = 0.5, **kw):
        super().__init__(**kw)
        self.dropout = rate("dropout", dropout)
        self.unet = UNet(self.in_channels, self.widths, out_ch=1)
        insert_dropout(self.unet, lambda: AlwaysDropout(self.dropout))

    def hparams(self):
        return {**super().hparams(), "dropout": self.dropout}

    def model(self, image, mask=None, *, beta=1.0, recon_scale=1.0):
        pyro.module("unet", self.unet)
        logits = self.unet(image)  # (B, 1, H, W), one dropout mask per image
        with self._plate(image):
            return mask_likelihood(logits, mask, recon_scale)

    def guide(self, image, mask=None, *, beta=1.0, recon_scale=1.0):
        """Nothing to infer: maximum likelihood with dropout."""

    def sample(self, image: torch.Tensor, num_samples: int = 1) -> torch.Tensor:
        b = image.shape[0]
        enc = self.unet.encoder.blocks
        first = enc[0](image)  # (B, w0, H, W): no dropout before it, so computed once
        reps = first.unsqueeze(0).expand(num_samples, *first.shape).reshape(num_samples * b, *first.shape[1:])
        outs = []
        step = max(b, self.sample_chunk // b * b)
        for i in range(0, num_samples * b, step):
            x = reps[i : i + step]
            feats = [x]
            for block in enc[1:]:
                x = block(F.max_pool2d(x, 2))
                feats.append(x)
            outs.append(torch.sigmoid(self.unet.head(self.unet.decoder(feats))))
        return torch.cat(outs).view(num_samples, b, 1, *image.shape[-2:])

    @torch.inference_mode()
    def predict_at_mean(self, image):
        """The network without dropout (the weights at their mean: the standard dropout
        network, whose inverted-dropout scaling makes it the expected activations' net)."""
        try:
            set_dropout(self.unet, False)
            return torch.sigmoid(self.unet(image))
        finally:
            set_dropout(self.unet, True)
