"""PHiSeg (Baumgartner et al. 2019): a hierarchy of spatial latents over resolutions,
with a likelihood at every latent level during training.

Sites are named as in ``hprob_unet``: ``z_1`` is the finest latent level, ``z_L``
the coarsest, sampled first (``latent_sites = ("z_L", ..., "z_1")``). Level ``l``
sits at resolution ``H / 2^(l - 1 + d)`` (``d = resolution_levels - latent_levels``),
``zdim`` channels per position.

    prior net      on x:       p(z_l | z_{l+1}, x)        (z_L: p(z_L | x))
    posterior net  on [x, y]:  q(z_l | z_{l+1}, x, y)
    likelihood net on z's:     s_l = g_l(z_l, ..., z_L)   one logit map per level,
                                                           resized (nearest) to H x W

    model:  z_L ~ p(z_L | x), ..., z_1 ~ p(z_1 | z_2, x)         sites "z_L" ... "z_1"
            y   ~ Bernoulli(logits = s_1 + ... + s_L)             site  "mask"
            y   ~ Bernoulli(logits = s_l + ... + s_L), l = 2..L   sites "mask_l" (training only)
    guide:  z_L ~ q(z_L | x, y), ..., z_1 ~ q(z_1 | z_2, x, y)

Each net is a U-Net-like encoder (``resolution_levels`` levels, average pooling, a
:class:`~pyroseg.nets.ConvBlock` per level, channels ``n0 * (1, 2, 4, 6, 6, ...)``
as the reference) whose features at the latent levels feed the top-down chain: at
level ``l < L`` the drawn ``z_{l+1}`` is upsampled (bilinear), passed through a
conv block of ``zdim * n0`` channels, joined to the encoder's features there, and a
conv block and a 1x1 Gaussian head give ``(loc, scale)`` of ``z_l``. The likelihood
net sees only the z's (as in the paper's graphical model, ``y`` depends on ``x``
through them): each ``z_l`` gets a conv block and ``d`` upsample-and-convolve steps,
the levels are joined coarse to fine (upsample the coarser result, concatenate,
conv block) and a 1x1 convolution per level gives ``s_l``.

**The loss** (the reference code's ``residual_multinoulli_loss`` and
``hierarchical_KL_div_loss`` with ``exponential_weighting = True``), per image::

    loss = recon_scale * [ NLL(y | s_1 + ... + s_L)
                           + level_loss_weight * sum_{l=2..L} NLL(y | s_l + ... + s_L) ]
           + beta * sum_l 4^(l-1) * KL(q(z_l | z_{l+1}, x, y) || p(z_l | z_{l+1}, x))

each NLL a sum over the H x W pixels of the full-resolution mask (the reference
resizes every level's logits to the image, not the mask to the level). The Pyro
way: the extra likelihoods are observed sites ``"mask_l"`` under
``poutine.scale(level_loss_weight * recon_scale)``, and the KL weights are
``poutine.scale(beta * 4^(l-1))`` around ``z_l`` in model and guide, so Pyro's
ELBOs and :class:`~pyroseg.objective.SiteELBO` compute exactly this sum.
``SiteELBO`` reports the unscaled ``"recon"`` of the ``"mask"`` site, one
``"recon_mask_l"`` per extra level and one unscaled ``"kl_z_l"`` per latent; the
evaluation terms (:func:`pyroseg.predict.elbo_terms`) are the plain negative ELBO of
the full-resolution model (``"mask"`` and unweighted KLs). The ``"mask_l"`` sites are
only in the model when a mask is observed: without one (generation) the model is
``z ~ prior, y ~ Bernoulli(s_1 + ... + s_L)``. ``level_loss_weight=0`` and
``exponential_weighting=false`` make the objective the plain ELBO.

At test time every ``z_l`` comes from the prior net; ``sample`` encodes the image
once and runs the top-down chain and the likelihood net per sample.

**Scaled to our images.** The reference (LIDC, 128 x 128) has 7 resolution levels
(128 ... 2) and 5 latent levels (32 ... 2), ``n0 = 32``, ``zdim0 = 2``. We keep its
rules, coarsest level 2 x 2 and the finest latent at 1/4 of the image
(``d = 2``): ``resolution_levels = log2(image_size)`` and ``latent_levels =
resolution_levels - 2`` by default (128: 7 and 5, the reference; 64: 6 and 4, latents
at 16, 8, 4, 2; 32: 5 and 3). ``n0`` defaults to 16, the first width of the shared
backbone, so that phiseg's size stays within that of the other models (about 1.3 M
parameters at 64 x 64; the reference's n0 = 32 is ``--model-arg n0=32``).
Other differences from the reference: a :class:`~pyroseg.nets.ConvBlock` (two 3x3
convolutions with GroupNorm) where it has three (or two) convolutions with batch
norm; the Gaussian heads are the shared 1x1 :class:`~pyroseg.nets.DiagGaussianHead`
(soft-bounded log-scale, prior heads starting at N(0, 1), posterior heads at a random
mean and scale 1, as ``hprob_unet``'s, so that the first step's KL stays small against
the reconstruction: at scale 0.1 it was 1.5x it at 64 x 64) where it has a 3x3 mean
and a softplus scale at the top level and 1x1 elsewhere; one Bernoulli logit map
where it has two-class softmax logits; the mask enters the posterior as ``y - 0.5``
(one channel, its one-hot minus 0.5 in the reference); and the unused upsampling
chains of its ``z_ups_mat`` are left out.

References: Baumgartner et al., "PHiSeg: Capturing Uncertainty in Medical Image
Segmentation", MICCAI 2019; code: github.com/baumgach/PHiSeg-code
(``phiseg/model_zoo/{priors,posteriors,likelihoods}.py``, ``phiseg_7_5.py``).
"""

from __future__ import annotations

import math
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import nn

from pyroseg.errors import UsageError
from pyroseg.models.base import SegModel, beta_scale, flag, mask_likelihood, positive_int
from pyroseg.nets import ConvBlock, DiagGaussianHead, init_mask_logits, pyramid

__all__ = ["PHiSegModel", "PHiSegCore", "PHiSegLikelihood", "accumulate", "channels_for"]


def channels_for(n0: int, levels: int) -> list[int]:
    """The reference's channels per resolution level: ``n0 * (1, 2, 4, 6, 6, ...)``."""
    return [n0 * m for m in (1, 2, 4)][:levels] + [6 * n0] * max(0, levels - 3)


def _up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class _UpConv(nn.Sequential):
    """Bilinear 2x upsampling, then a 3x3 convolution, GroupNorm and ReLU."""

    def __init__(self, in_ch: int, out_ch: int):
        block = ConvBlock(in_ch, out_ch)
        super().__init__(nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False), *list(block)[:3])


class PHiSegCore(nn.Module):
    """Encoder plus the top-down chain of latent levels (the prior or the posterior net).

    ``encode(x)``: the features at the latent levels, finest first, ``[(B, c_r, h_r, w_r)]``
    for ``r = d ... R-1`` (``d = R - L``). ``walk(feats, sample)`` goes from the coarsest
    level down, calling ``sample(name, loc, scale) -> z`` (``loc, scale: (B, zdim, h, w)``),
    and returns the z's, finest first.
    """

    def __init__(self, in_ch: int, n0: int, resolution_levels: int, latent_levels: int, zdim: int,
                 *, init_scale: float | None = None):
        super().__init__()
        ch = channels_for(n0, resolution_levels)
        self.latent_levels = latent_levels
        self.diff = resolution_levels - latent_levels
        chans = [in_ch] + ch
        self.encoder = nn.ModuleList(ConvBlock(chans[r], chans[r + 1]) for r in range(resolution_levels))
        # index i = 0 (finest) ... L-1 (coarsest), as the reference; site z_{i+1}
        self.z_up = nn.ModuleList()
        self.z_input = nn.ModuleList()
        self.heads = nn.ModuleList()
        for i in range(latent_levels):
            feat = ch[i + self.diff]
            if i == latent_levels - 1:
                self.z_up.append(nn.Identity())
                self.z_input.append(nn.Identity())
                self.heads.append(DiagGaussianHead(feat, zdim, spatial=True, init_scale=init_scale))
            else:
                self.z_up.append(ConvBlock(zdim, zdim * n0))
                self.z_input.append(ConvBlock(feat + zdim * n0, ch[i]))
                self.heads.append(DiagGaussianHead(ch[i], zdim, spatial=True, init_scale=init_scale))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return pyramid(x, self.encoder, F.avg_pool2d)[self.diff:]

    def walk(self, feats: list[torch.Tensor], sample) -> list[torch.Tensor]:
        zs: list[torch.Tensor | None] = [None] * self.latent_levels
        for i in reversed(range(self.latent_levels)):
            if i == self.latent_levels - 1:
                h = feats[i]
            else:
                up = self.z_up[i](_up2(zs[i + 1]))
                h = self.z_input[i](torch.cat([feats[i], up], dim=1))
            loc, scale = self.heads[i](h)
            zs[i] = sample(f"z_{i + 1}", loc, scale)
        return zs


class PHiSegLikelihood(nn.Module):
    """The likelihood net: the z's (finest first) -> one logit map per level, finest
    first, each ``(N, 1, H, W)`` (resized, nearest, from ``H / 2^i``)."""

    def __init__(self, n0: int, resolution_levels: int, latent_levels: int, zdim: int):
        super().__init__()
        ch = channels_for(n0, resolution_levels)
        self.latent_levels = latent_levels
        d = resolution_levels - latent_levels
        self.post_z = nn.ModuleList(
            nn.Sequential(ConvBlock(zdim, ch[i]), *[_UpConv(ch[i], ch[i]) for _ in range(d)]) for i in range(latent_levels)
        )
        out_ch = [ch[i + d] for i in range(latent_levels - 1)] + [ch[latent_levels - 1]]  # channels of post_c[i]
        self.ups = nn.ModuleList(_UpConv(out_ch[i + 1], ch[i]) for i in range(latent_levels - 1))
        self.post_c = nn.ModuleList(ConvBlock(2 * ch[i], out_ch[i]) for i in range(latent_levels - 1))
        self.outs = nn.ModuleList(nn.Conv2d(out_ch[i], 1, 1) for i in range(latent_levels))
        for i, conv in enumerate(self.outs):  # the coarsest map starts at the prior share; the others add 0
            if i == latent_levels - 1:
                init_mask_logits(conv)
            else:
                nn.init.zeros_(conv.bias)

    def forward(self, zs: list[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
        n = self.latent_levels
        post_z = [self.post_z[i](zs[i]) for i in range(n)]
        c = post_z[n - 1]
        out: list[torch.Tensor | None] = [None] * n
        out[n - 1] = self.outs[n - 1](c)
        for i in reversed(range(n - 1)):
            c = self.post_c[i](torch.cat([post_z[i], self.ups[i](c)], dim=1))
            out[i] = self.outs[i](c)
        return [F.interpolate(s, size=size, mode="nearest") for s in out]


def accumulate(levels: list[torch.Tensor]) -> list[torch.Tensor]:
    """The residual logits, finest first: ``acc[i] = s_{i+1} + ... + s_L`` (the reference's ``s_accum``)."""
    acc = list(levels)
    for i in reversed(range(len(levels) - 1)):
        acc[i] = acc[i + 1] + levels[i]
    return acc


def _nonnegative(name: str, value: Any) -> float:
    try:
        x = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        x = float("nan")
    if not (x >= 0 and math.isfinite(x)):
        raise UsageError(f"--model-arg {name}={value!r}: expected a number >= 0")
    return x


class _LatentSites:
    """``latent_sites``: how many depends on the instance (``latent_levels``, from the image
    size by default). On an instance, ``("z_L", ..., "z_1")``, coarsest first (the order they
    are sampled); on the class (``pyroseg models``), the pattern ``("z_L", "...", "z_1")``."""

    def __get__(self, obj, objtype=None) -> tuple[str, ...]:
        if obj is None:
            return ("z_L", "...", "z_1")
        return tuple(f"z_{lvl}" for lvl in range(obj.latent_levels, 0, -1))


class PHiSegModel(SegModel):
    name = "phiseg"
    sample_from = "p(z|x)"
    test_time_z = "prior"
    levels_needed = 1

    def __init__(self, *, latent_levels: int | None = None, resolution_levels: int | None = None, zdim: int = 2,
                 n0: int = 12, level_loss_weight: float = 1.0, exponential_weighting: bool = True, **kw):
        super().__init__(**kw)
        max_levels = int(math.log2(self.image_size))  # the coarsest level 2 x 2, as the reference's 128 -> 2
        if resolution_levels is None:
            resolution_levels = max_levels
        self.resolution_levels = positive_int("resolution_levels", resolution_levels)
        if self.resolution_levels > max_levels:
            raise UsageError(f"--model-arg resolution_levels={resolution_levels!r}: expected at most {max_levels} "
                             f"at --image-size {self.image_size} (the coarsest level 2x2)")
        if latent_levels is None:
            latent_levels = max(1, self.resolution_levels - 2)
        self.latent_levels = positive_int("latent_levels", latent_levels)
        if self.latent_levels > self.resolution_levels:
            raise UsageError(f"--model-arg latent_levels={latent_levels!r}: expected at most resolution_levels "
                             f"({self.resolution_levels})")
        self.zdim = positive_int("zdim", zdim)
        self.n0 = positive_int("n0", n0)
        self.level_loss_weight = _nonnegative("level_loss_weight", level_loss_weight)
        self.exponential_weighting = flag("exponential_weighting", exponential_weighting)
        args = (self.n0, self.resolution_levels, self.latent_levels, self.zdim)
        self.prior_net = PHiSegCore(self.in_channels, *args)
        self.posterior_net = PHiSegCore(self.in_channels + 1, *args, init_scale=1.0)  # step-0 KL small (see docs)
        self.likelihood_net = PHiSegLikelihood(*args)

    latent_sites = _LatentSites()

    def kl_weight(self, site: str) -> float:
        """The weight of a latent site's KL in the training loss: ``4^(l-1)`` for ``z_l``
        with ``exponential_weighting`` (the reference), else 1."""
        lvl = int(site.rsplit("_", 1)[1])
        return float(4 ** (lvl - 1)) if self.exponential_weighting else 1.0

    def hparams(self):
        return {**super().hparams(), "latent_levels": self.latent_levels, "resolution_levels": self.resolution_levels,
                "zdim": self.zdim, "n0": self.n0, "level_loss_weight": self.level_loss_weight,
                "exponential_weighting": self.exponential_weighting}

    def _site(self, beta: float):
        def sample(name, loc, scale):
            with beta_scale(beta * self.kl_weight(name)):
                return pyro.sample(name, dist.Normal(loc, scale).to_event(3))
        return sample

    def model(self, image, mask=None, *, beta=1.0, recon_scale=1.0):
        self._register("prior_net", "likelihood_net")
        feats = self.prior_net.encode(image)
        with self._plate(image):
            zs = self.prior_net.walk(feats, self._site(beta))
            levels = self.likelihood_net(zs, image.shape[-2:])  # finest first, each (B, 1, H, W)
            acc = accumulate(levels)
            if mask is not None and self.level_loss_weight > 0:
                with poutine.scale(scale=self.level_loss_weight * recon_scale):
                    for i in range(1, len(acc)):
                        pyro.sample(f"mask_{i + 1}", dist.Bernoulli(logits=acc[i]).to_event(3), obs=mask)
            return mask_likelihood(acc[0], mask, recon_scale)

    def guide(self, image, mask=None, *, beta=1.0, recon_scale=1.0):
        if mask is None:
            raise ValueError("the phiseg guide q(z | x, y) needs the mask; to predict, use sample()")
        self._register("posterior_net")
        feats = self.posterior_net.encode(torch.cat([image, mask - 0.5], dim=1))
        with self._plate(image):
            self.posterior_net.walk(feats, self._site(beta))

    def sample(self, image, num_samples=1):
        feats = self.prior_net.encode(image)  # once per image
        rep = [f.repeat(num_samples, 1, 1, 1) for f in feats]  # (S*B, ...), sample-major
        zs = self.prior_net.walk(rep, lambda name, loc, scale: dist.Normal(loc, scale).rsample())
        logits = accumulate(self.likelihood_net(zs, image.shape[-2:]))[0]  # (S*B, 1, H, W)
        return torch.sigmoid(logits).view(num_samples, image.shape[0], *logits.shape[1:])

    @torch.inference_mode()
    def predict_at_mean(self, image):
        zs = self.prior_net.walk(self.prior_net.encode(image), lambda name, loc, scale: loc)  # prior means, coarse to fine
        return torch.sigmoid(accumulate(self.likelihood_net(zs, image.shape[-2:]))[0])
