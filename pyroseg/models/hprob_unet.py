"""The Hierarchical Probabilistic U-Net (Kohl et al. 2019).

The generative story. A U-Net whose decoder draws a latent at each of its
``S`` coarsest scales, coarse to fine; each ``z_l`` is a Gaussian map with one
value per position and channel, conditioned on the image and on the scales
drawn above it:

    model:  for l = S, ..., 1:  z_l ~ p(z_l | x, z_{>l})      prior core on x
            y ~ Bernoulli(f(x, z_S, ..., z_1))                 stitching decoder
    guide:  for l = S, ..., 1:  z_l ~ q(z_l | x, y, z_{>l})   posterior core on [x, y]

    -ELBO = E_q[-log p(y | x, z)] + beta * sum_l KL(q(z_l | x, y, z_{>l}) || p(z_l | x, z_{>l}))

each KL analytic given the scales above it: one ``pyro.sample`` site and one KL
column per scale (``z_S`` coarsest, sampled first). The two "hierarchical
cores" have the same shape: a full U-Net encoder, then the coarse part of the
decoder; at a scale the core maps its features ``h`` to ``(loc, scale)`` with a
1x1 convolution, joins the drawn ``z_l`` to ``h``, upsamples (nearest), joins
the encoder's skip and applies the level's blocks. The likelihood is computed
along the *prior* core with the posterior's ``z``'s, and a "stitching" decoder
(the remaining levels and a 1x1 head) gives the logits, as in the paper. At test
time every ``z_l`` comes from the prior core; ``sample`` runs the prior encoder
once per image and the decoder once per sample.

Layouts (``--model-arg layout=...``; any field can be overridden by its own
``--model-arg``):

``reference`` (default): DeepMind's hierarchy scaled to the image size. The
    encoder goes down to 1x1 (``log2(image_size) + 1`` levels: at 64x64, 64, 32,
    16, 8, 4, 2, 1), its widths the backbone's ``widths`` continued with the
    last one (16, 32, 64, 128, 128, 128, 128); every level has
    ``blocks_per_level = 3`` pre-activated residual blocks of
    ``convs_per_block = 3`` 3x3 convolutions, bottlenecked to half the width,
    average-pool down, nearest up, no normalisation (``unet_utils.res_block``).
    ``latent_scales = 4`` scales of ``latent_channels = 1`` at the coarsest
    resolutions, 1x1 (a global latent), 2x2, 4x4, 8x8: 85 latent units whatever
    the image size (DeepMind: ``latent_dims=(1, 1, 1, 1)``, 8 levels at 128x128,
    the same four resolutions).
``v1``: pyroseg's earlier layout, kept for comparison: the shared
    four-level backbone (16-32-64-128, two conv + GroupNorm + ReLU per level,
    max-pool down), ``latent_scales = 3`` scales of ``latent_channels = 2`` at its
    three coarsest resolutions (8x8, 16x16, 32x32 at 64x64: 2,688 units), one
    block per level. Its ``z_1`` sits one block from the logits.

Where ``reference`` still differs from DeepMind's code: channel widths come from
the shared backbone (16 doubling to 128, then 128; theirs 24 doubling to 192);
the Gaussian heads and the logits layer keep pyroseg's initialisation (below, and
:func:`~pyroseg.nets.init_mask_logits`); no L2 weight decay (theirs 1e-5); one Bernoulli logit instead of a two-class softmax (the
same likelihood); log-scales softly bounded (:func:`pyroseg.nets.bounded_log_scale`).

Initialisation (``posterior_init_scale``): every head starts with a random
mean; prior heads at scale 1, posterior heads at ``posterior_init_scale``
(default 1, as DeepMind, whose heads all start near log-scale 0). With 0.1 (the
earlier default, still used by the other models' global latents) every
unit starts with a KL of ``log 10 - 0.495 = 1.8`` nats, which over ``v1``'s 2,688
units was 5,000 nats against a reconstruction of 870 at step 0, and the KL's
gradient then erased the latents before the decoder could learn to use them.

References: Kohl et al., "A Hierarchical Probabilistic U-Net for Modeling
Multi-Scale Ambiguities", arXiv:1905.13077, 2019; the authors' code,
deepmind-research/hierarchical_probabilistic_unet (``model.py``, ``unet_utils.py``).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from pyroseg.errors import UsageError
from pyroseg.models.base import SegModel, beta_scale, mask_likelihood
from pyroseg.nets import ConvBlock, DiagGaussianHead, Encoder, init_mask_logits, pyramid

__all__ = ["HProbUNetModel", "HierarchicalCore", "LAYOUTS", "PreActResBlock", "ResEncoder"]

#: The named configurations; ``--model-arg`` overrides any field.
LAYOUTS: dict[str, dict] = {
    "reference": {"latent_scales": 4, "latent_channels": 1, "blocks_per_level": 3, "convs_per_block": 3},
    "v1": {"latent_scales": 3, "latent_channels": 2, "blocks_per_level": 1, "convs_per_block": 2},
}


class PreActResBlock(nn.Module):
    """DeepMind's ``res_block``: ``skip(x) + proj(conv(relu(... conv(relu(x)))))``,
    with DeepMind's initialisation (orthogonal weights, gain 1; biases N(0, 0.001)).
    Without normalisation, PyTorch's default initialisation shrinks the signal at every
    block: on 8 images at 32x32 the model reached Dice 0.70 after 200 steps with it,
    1.00 after 160 with this one (measured).

    ``convs`` 3x3 convolutions on ``relu(x)`` with ReLUs between them, at
    ``down`` channels; a 1x1 projection of the skip when ``in_ch != out_ch`` and of
    the residual when ``down != out_ch``. ``(B, in_ch, H, W) -> (B, out_ch, H, W)``.
    """

    def __init__(self, in_ch: int, out_ch: int, *, down: int | None = None, convs: int = 3):
        super().__init__()
        down = down or out_ch
        layers: list[nn.Module] = []
        for c in range(convs):
            layers += [nn.ReLU(), nn.Conv2d(in_ch if c == 0 else down, down, 3, padding=1)]
        self.residual = nn.Sequential(*layers)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.proj = nn.Conv2d(down, out_ch, 1) if down != out_ch else nn.Identity()
        for m in self.modules():  # DeepMind's initialisers: orthogonal weights, bias N(0, 0.001)
            if isinstance(m, nn.Conv2d):
                nn.init.orthogonal_(m.weight)
                nn.init.normal_(m.bias, std=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.proj(self.residual(x))


def res_stack(in_ch: int, out_ch: int, blocks: int, convs: int) -> nn.Sequential:
    """``blocks`` :class:`PreActResBlock` s, the first from ``in_ch``; intermediate
    width ``out_ch // 2`` as DeepMind's default ``down_channels_per_block``."""
    down = max(1, out_ch // 2)
    return nn.Sequential(*(PreActResBlock(in_ch if b == 0 else out_ch, out_ch, down=down, convs=convs) for b in range(blocks)))


class ResEncoder(nn.Module):
    """The ``reference`` encoder: at each level a stack of residual blocks, then a
    2x2 average pool. ``forward(x)`` -> the features of every level, finest first,
    ``[(B, w0, H, W), (B, w1, H/2, W/2), ..., (B, w[-1], H/2^(L-1), W/2^(L-1))]``."""

    def __init__(self, in_ch: int, widths, blocks: int, convs: int):
        super().__init__()
        chans = (in_ch, *widths)
        self.levels = nn.ModuleList(res_stack(chans[i], chans[i + 1], blocks, convs) for i in range(len(widths)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return pyramid(x, self.levels, F.avg_pool2d)


class HierarchicalCore(nn.Module):
    """Encoder plus the latent part of the decoder (DeepMind's ``_HierarchicalCore``).

    ``encode(x)`` returns the encoder features (finest first).
    ``walk(feats, sample)`` goes from the bottleneck up through the ``latent_scales``
    latent scales, calling ``sample(name, loc, scale) -> z`` at each
    (``loc, scale: (B, c, h, w)``), and returns the features after the last
    scale, ``(B, widths[L-1-S], h', w')``. ``residual``: the ``reference`` blocks
    (:class:`ResEncoder`, :func:`res_stack`), else ``v1``'s :class:`ConvBlock` s.
    """

    def __init__(self, in_ch: int, widths, *, latent_scales: int, latent_channels: int, residual: bool,
                 blocks_per_level: int = 1, convs_per_block: int = 2, init_scale: float | None = None):
        super().__init__()
        levels = len(widths)
        self.widths = tuple(widths)
        self.latent_scales = latent_scales
        self.residual = residual
        self.encoder = ResEncoder(in_ch, widths, blocks_per_level, convs_per_block) if residual else Encoder(in_ch, widths)
        self.heads = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for k in range(latent_scales):
            lvl = levels - 1 - k  # resolution level of this scale
            self.heads.append(DiagGaussianHead(widths[lvl], latent_channels, spatial=True, init_scale=init_scale))
            in_ch_block = widths[lvl] + latent_channels + widths[lvl - 1]
            self.blocks.append(res_stack(in_ch_block, widths[lvl - 1], blocks_per_level, convs_per_block)
                               if residual else ConvBlock(in_ch_block, widths[lvl - 1]))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder(x)

    def walk(self, feats: list[torch.Tensor], sample) -> torch.Tensor:
        levels = len(self.widths)
        h = feats[-1]
        for k in range(self.latent_scales):
            lvl = levels - 1 - k
            loc, scale = self.heads[k](h)
            z = sample(f"z_{self.latent_scales - k}", loc, scale)  # z_S first (coarsest)
            h = F.interpolate(torch.cat([h, z], dim=1), scale_factor=2.0, mode="nearest")
            h = self.blocks[k](torch.cat([h, feats[lvl - 1]], dim=1))
        return h

    def walk_samples(self, feats: list[torch.Tensor], num_samples: int) -> torch.Tensor:
        """:meth:`walk` for ``num_samples`` draws of every ``z_l`` from the heads, computing
        once per image what does not depend on ``z`` (``v1`` blocks only).

        ``feats``: the encoder's list for ``B`` images. Returns ``(S * B, w, h', w')``,
        sample-major, equal (to float rounding) to ``walk`` on the features repeated
        ``S`` times with ``Normal(loc, scale).rsample()`` at every scale; the draws are
        the same numbers in the same order.

        The first convolution of each block is linear in its input ``[up(h), up(z), skip]``
        (no bias), so its ``skip`` part, and at the coarsest scale (where ``h`` is the
        encoder's bottleneck, the same for every sample) its ``h`` part too, run once
        per image and are broadcast over the samples. GroupNorm and ReLU make the
        rest of each block depend on ``z``: that part runs per sample. The
        ``reference`` blocks start with a ReLU, so nothing of them is linear.
        """
        assert not self.residual, "walk_samples needs v1's ConvBlocks"
        levels = len(self.widths)
        s = num_samples
        h, shared_h = feats[-1], True  # (B, w, h, w): the same for every sample until z_S joins
        for k in range(self.latent_scales):
            lvl = levels - 1 - k
            loc, scale = self.heads[k](h)
            if shared_h:  # h is the bottleneck: draw S z's per image, share h
                z = dist.Normal(loc, scale).rsample((s,)).flatten(0, 1)  # (S*B, c, h, w)
                h = _block_once_and_each(self.blocks[k], h, feats[lvl - 1], z, s)
            else:
                z = dist.Normal(loc, scale).rsample()  # (S*B, c, h, w)
                h = _block_once_and_each(self.blocks[k], None, feats[lvl - 1], torch.cat([h, z], dim=1), s)
            shared_h = False
        return h


def _phase_taps(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Fold the 3 taps of a 3x3 kernel along ``dim`` (of size 3) into 2 per output phase:
    phase 0 (even outputs) sees source pixels (i-1, i) through taps (0, 1+2), phase 1
    (odd outputs) sees (i, i+1) through taps (0+1, 2). Returns the phases stacked
    first, ``(2, ...)`` with ``dim`` now of size 2."""
    t0, t1, t2 = w.unbind(dim)
    return torch.stack([torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)])


def conv3x3_of_up2(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(up2(x), weight, padding=1)`` without upsampling ``x``.

    ``x: (N, C, h, w)``, ``weight: (O, C, 3, 3)`` -> ``(N, O, 2h, 2w)``. Each output
    pixel of a 3x3 convolution over a nearest-upsampled input sees only 2x2 source
    pixels, so the four output phases are 2x2 convolutions of ``x`` with summed
    taps: 4/9 of the multiply-adds and no upsampled copy of the input. Equal to the
    plain form to float rounding (the taps are summed first).
    """
    n, c, h, w = x.shape
    o = weight.shape[0]
    k = _phase_taps(weight, 2)  # (2, O, C, 2, 3): row phase a
    k = _phase_taps(k, 4).transpose(0, 1)  # (2, 2, O, C, 2, 2): row phase a, column phase b
    p = F.conv2d(F.pad(x, (1, 1, 1, 1)), k.reshape(4 * o, c, 2, 2))  # (N, 4*O, h+1, w+1)
    p = p.view(n, 2, 2, o, h + 1, w + 1)
    out = x.new_empty(n, o, h, 2, w, 2)
    for a in range(2):
        for b in range(2):
            out[:, :, :, a, :, b] = p[:, a, b, :, a : a + h, b : b + w]
    return out.view(n, o, 2 * h, 2 * w)


def _block_once_and_each(block: ConvBlock, up_once, skip: torch.Tensor, up_each: torch.Tensor, num_samples: int):
    """``block(cat([up2(h), up2(z), skip]))`` for ``num_samples`` samples of ``B`` images.

    ``up_once``: ``(B, c1, h, w)`` or None, the part of the low-resolution input that
    is the same for every sample (the bottleneck at the coarsest scale);
    ``up_each``: ``(S * B, c2, h, w)``, the part that differs; ``skip``: ``(B, c3, 2h, 2w)``,
    the encoder's features, the same for every sample. The block's input channels
    are ``[up_once, up_each, skip]`` in that order. The first convolution is linear
    and bias-free, so its shared parts run once per image and are broadcast over
    the samples; upsampled parts go through :func:`conv3x3_of_up2`.
    Returns ``(S * B, out, 2h, 2w)``, sample-major.
    """
    conv = block[0]
    assert isinstance(conv, nn.Conv2d) and conv.bias is None and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
    w = conv.weight
    c1 = 0 if up_once is None else up_once.shape[1]
    c2 = up_each.shape[1]
    assert c1 + c2 + skip.shape[1] == w.shape[1], f"{c1}+{c2}+{skip.shape[1]} channels for a convolution of {w.shape[1]}"
    shared = F.conv2d(skip, w[:, c1 + c2 :], padding=1)  # (B, out, 2h, 2w), once
    if up_once is not None:
        shared = shared + conv3x3_of_up2(up_once, w[:, :c1])
    each = conv3x3_of_up2(up_each, w[:, c1 : c1 + c2])  # (S*B, out, 2h, 2w)
    y = (each.unflatten(0, (num_samples, -1)) + shared).flatten(0, 1)
    for layer in list(block)[1:]:  # GroupNorm, ReLU, conv, GroupNorm, ReLU
        y = layer(y)
    return y


class Stitch(nn.Module):
    """The rest of the decoder after the last latent scale, then a 1x1 head
    (DeepMind's ``_StitchingDecoder``). ``forward(h, feats)`` -> logits ``(B, 1, H, W)``."""

    def __init__(self, widths, *, latent_scales: int, residual: bool, blocks_per_level: int = 1, convs_per_block: int = 2):
        super().__init__()
        levels = len(widths)
        first = levels - 1 - latent_scales  # level reached after the last scale
        self.first = first

        def block(lvl):
            in_ch = widths[lvl] + widths[lvl - 1]
            return res_stack(in_ch, widths[lvl - 1], blocks_per_level, convs_per_block) if residual else ConvBlock(in_ch, widths[lvl - 1])

        self.blocks = nn.ModuleList(block(lvl) for lvl in range(first, 0, -1))
        self.out = init_mask_logits(nn.Conv2d(widths[0], 1, 1))

    def forward(self, h: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            lvl = self.first - i
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = block(torch.cat([h, feats[lvl - 1]], dim=1))
        return self.out(h)


def _check_hparams(layout, levels, latent_scales, latent_channels, blocks_per_level, convs_per_block, posterior_init_scale):
    """One-line UsageErrors naming the ``--model-arg``."""
    if latent_scales < 1 or latent_scales > levels - 1:
        raise UsageError(f"--model-arg latent_scales={latent_scales}: expected 1 to {levels - 1} "
                         f"(the {layout!r} layout has {levels} levels at this image size)")
    for name, v in (("latent_channels", latent_channels), ("blocks_per_level", blocks_per_level),
                    ("convs_per_block", convs_per_block)):
        if v < 1:
            raise UsageError(f"--model-arg {name}={v}: expected at least 1")
    if layout == "v1" and (blocks_per_level, convs_per_block) != (1, 2):
        raise UsageError("--model-arg blocks_per_level/convs_per_block: layout v1 has one block of two convolutions per level")
    if not 0 < posterior_init_scale < math.exp(2.0):
        raise UsageError(f"--model-arg posterior_init_scale={posterior_init_scale}: expected a standard deviation in (0, 7.39)")


class HProbUNetModel(SegModel):
    name = "hprob_unet"
    latent_sites = ("z_4", "z_3", "z_2", "z_1")  # the default layout's; an instance sets its own
    sample_from = "p(z|x)"
    test_time_z = "prior"

    def __init__(self, *, layout: str = "reference", latent_scales: int | None = None, latent_channels: int | None = None,
                 blocks_per_level: int | None = None, convs_per_block: int | None = None,
                 posterior_init_scale: float = 1.0, **kw):
        super().__init__(**kw)
        if layout not in LAYOUTS:
            raise UsageError(f"--model-arg layout={layout}: expected one of {', '.join(LAYOUTS)}")
        preset = LAYOUTS[layout]
        self.layout = layout
        self.latent_scales = int(preset["latent_scales"] if latent_scales is None else latent_scales)
        self.latent_channels = int(preset["latent_channels"] if latent_channels is None else latent_channels)
        self.blocks_per_level = int(preset["blocks_per_level"] if blocks_per_level is None else blocks_per_level)
        self.convs_per_block = int(preset["convs_per_block"] if convs_per_block is None else convs_per_block)
        self.posterior_init_scale = float(posterior_init_scale)
        residual = layout == "reference"
        if residual:  # down to 1x1: the backbone's widths continued with the last one
            levels = int(math.log2(self.image_size)) + 1
            core_widths = tuple(self.widths[:levels]) + (self.widths[-1],) * max(0, levels - len(self.widths))
        else:
            core_widths = self.widths
        _check_hparams(layout, len(core_widths), self.latent_scales, self.latent_channels, self.blocks_per_level,
                       self.convs_per_block, self.posterior_init_scale)
        self.core_widths = core_widths
        self.latent_sites = tuple(f"z_{self.latent_scales - k}" for k in range(self.latent_scales))
        arch = dict(latent_scales=self.latent_scales, residual=residual, blocks_per_level=self.blocks_per_level,
                    convs_per_block=self.convs_per_block)
        self.prior_core = HierarchicalCore(self.in_channels, core_widths, latent_channels=self.latent_channels, **arch)
        self.posterior_core = HierarchicalCore(self.in_channels + 1, core_widths, latent_channels=self.latent_channels,
                                               init_scale=self.posterior_init_scale, **arch)
        self.stitch = Stitch(core_widths, **arch)

    def hparams(self):
        return {**super().hparams(), "layout": self.layout, "latent_scales": self.latent_scales,
                "latent_channels": self.latent_channels, "blocks_per_level": self.blocks_per_level,
                "convs_per_block": self.convs_per_block, "posterior_init_scale": self.posterior_init_scale}

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
        """The prior encoder once per image. ``v1`` on CPU: per sample only what
        depends on ``z`` (see :meth:`HierarchicalCore.walk_samples`), equal, to float
        rounding and with the same draws, to :meth:`sample_reference`. Otherwise
        (the ``reference`` layout's blocks start with a ReLU; on a GPU, where both are
        bound by kernel launches, the shared path measured 0.66x-0.76x as fast on an
        H200) :meth:`sample_reference`."""
        if image.device.type != "cpu" or self.prior_core.residual:
            return self.sample_reference(image, num_samples)
        feats = self.prior_core.encode(image)  # once per image
        h = self.prior_core.walk_samples(feats, num_samples)  # (S*B, w, h', w')
        rep = [f.repeat(num_samples, 1, 1, 1) for f in feats[: self.stitch.first]]  # only the levels the stitch uses
        logits = self.stitch(h, rep)
        return torch.sigmoid(logits).view(num_samples, image.shape[0], *logits.shape[1:])

    def sample_reference(self, image, num_samples=1):
        """The plain way: the prior encoder once per image, the decoder part on the
        features repeated ``num_samples`` times (tests check :meth:`sample` against it)."""
        feats = self.prior_core.encode(image)  # once per image
        rep = [f.repeat(num_samples, 1, 1, 1) for f in feats]  # (S*B, ...), sample-major
        h = self.prior_core.walk(rep, lambda name, loc, scale: dist.Normal(loc, scale).rsample())
        logits = self.stitch(h, rep)
        return torch.sigmoid(logits).view(num_samples, image.shape[0], *logits.shape[1:])

    @torch.inference_mode()
    def predict_at_mean(self, image):
        feats = self.prior_core.encode(image)
        h = self.prior_core.walk(feats, lambda name, loc, scale: loc)  # each z_l at its prior mean given the coarser
        return torch.sigmoid(self.stitch(h, feats))
