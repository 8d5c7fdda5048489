"""The Probabilistic U-Net (Kohl et al. 2018).

    model:  z ~ p(z | x)                  prior net on the image
            y ~ Bernoulli(f_comb(u(x), z)) u: the U-Net's last features,
                                           z broadcast over the pixels and joined
                                           to them, then 1x1 convolutions
    guide:  z ~ q(z | x, y)               posterior net on image and mask

    -ELBO = E_q[-log p(y | x, z)] + beta * KL(q(z | x, y) || p(z | x))

At test time ``z`` comes from the prior net.

Options of ours, off by default (not in Kohl et al.): ``dropout=p`` puts dropout of rate
``p`` after the U-Net's central blocks, where the MC dropout baseline has it, as a
regulariser of the backbone during training (off at test: samples differ through ``z``
only); ``test_dropout=true`` keeps it on at test as well, so that each sample is one
``z`` and one dropout mask (a latent for the raters' disagreement, dropout for the
weights' uncertainty, as in Kendall & Gal 2017). ``sample`` then runs the U-Net once per
sample instead of once per image.

``sample`` (without ``test_dropout``) runs the U-Net and the
prior net once per image and only the 1x1 "f_comb" per sample; its first layer
is split as ``W [u; z] = W_u u + W_z z``, so ``W_u u`` is computed once too, and
its 1x1 convolutions run as matrix products over pixels (``forward_pixels_last``).

References: Kohl et al., "A Probabilistic U-Net for Segmentation of Ambiguous
Images", NeurIPS 2018.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from pyroseg.errors import UsageError
from pyroseg.models.base import SegModel, beta_scale, flag, mask_likelihood, positive_int, rate
from pyroseg.models.mc_dropout import AlwaysDropout, insert_dropout, set_dropout
from pyroseg.nets import POSTERIOR_INIT_SCALE, DiagGaussianHead, Encoder, UNet, init_mask_logits

__all__ = ["ProbUNetModel", "GaussianEncoder", "FComb"]


class GaussianEncoder(nn.Module):
    """Conv encoder, global mean pool, Gaussian head: ``(B, C, H, W) -> loc, scale (B, D)``."""

    def __init__(self, in_ch: int, widths, latent_dim: int, *, init_scale: float | None = None):
        super().__init__()
        self.encoder = Encoder(in_ch, widths)
        self.head = DiagGaussianHead(widths[-1], latent_dim, init_scale=init_scale)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.encoder(x)[-1].mean(dim=(-2, -1)))


class FComb(nn.Module):
    """Three 1x1 convolutions on ``[u; z]``, computed without tiling ``z``.

    ``forward(u, z)``: ``u: (B, F, H, W)``, ``z: (S, B, D)`` -> logits ``(S, B, 1, H, W)``.
    """

    def __init__(self, feat_ch: int, latent_dim: int, hidden: int = 16):
        super().__init__()
        self.u_in = nn.Conv2d(feat_ch, hidden, 1)
        self.z_in = nn.Linear(latent_dim, hidden, bias=False)
        self.mid = nn.Conv2d(hidden, hidden, 1)
        self.out = init_mask_logits(nn.Conv2d(hidden, 1, 1))

    def forward(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        s, b = z.shape[:2]
        a = self.u_in(u)  # (B, K, H, W), once
        h = F.relu(a.unsqueeze(0) + self.z_in(z)[..., None, None])  # (S, B, K, H, W)
        h = F.relu(self.mid(h.flatten(0, 1)))
        return self.out(h).view(s, b, 1, *u.shape[-2:])

    def forward_pixels_last(self, u: torch.Tensor, z: torch.Tensor, *, chunk_elems: int | None = None) -> torch.Tensor:
        """:meth:`forward` (same shapes, same values to float rounding), computed as
        matrix products over the pixels, a chunk of samples at a time. Used by ``sample``.

        The per-sample 1x1 convolutions become matrix products (``addmm``), which for
        16 channels run several times faster on CPU than the mkldnn convolutions.

        * On CPU (without autograd) the features are the rows, ``(K, samples * pixels)``:
          each layer is one ``(K, K) @ (K, c * B * H * W)`` product over a chunk of
          ``c`` samples, written into two buffers of about ``chunk_elems`` floats that
          are allocated once and reused. Default: ``2**19`` (2 MiB) per thread, at most
          4 threads' worth (measured on a 2-core EPYC, 64x64 and 128x128: 1 thread
          best at 2 MiB, 2 threads at 4 MiB; 1.2-3x faster than the pixels-last layout
          in 256 KiB chunks it replaces: fresh tensors per chunk paid page faults, one
          sample per chunk paid the per-call overhead, most at 2 threads).
        * On a GPU, or when autograd records (``out=`` does not support it), the pixels
          are the rows, ``(c * B * H * W, K) @ (K, K)``; on a GPU all samples go in one
          chunk: there the cost is one kernel launch per chunk (measured on an H200:
          100 samples in chunks of one took 3.9x one sample).
        """
        s, b = z.shape[:2]
        hh, ww = u.shape[-2:]
        k = self.mid.weight.shape[0]
        grad = torch.is_grad_enabled() and (u.requires_grad or z.requires_grad or self.mid.weight.requires_grad)
        if u.device.type == "cpu" and not grad:
            if chunk_elems is None:
                chunk_elems = 2**19 * min(torch.get_num_threads(), 4)
            return self._cpu_features_first(u, z, chunk_elems)
        a = self.u_in(u).permute(0, 2, 3, 1).reshape(b, hh * ww, k)  # (B, HW, K), once
        zk = self.z_in(z)[:, :, None, :]  # (S, B, 1, K)
        w_mid, w_out = self.mid.weight[:, :, 0, 0].t(), self.out.weight[:, :, 0, 0].t()  # (K, K), (K, 1)
        out = a.new_empty(s, b, hh * ww)
        if chunk_elems is None:
            chunk_elems = 2**16 if a.device.type == "cpu" else s * a.numel()  # GPU: one chunk
        step = max(1, chunk_elems // a.numel())
        for i in range(0, s, step):
            h = F.relu(a + zk[i : i + step]).flatten(0, 2)  # (c*B*HW, K)
            h = F.relu(torch.addmm(self.mid.bias, h, w_mid))
            out[i : i + step] = torch.addmm(self.out.bias, h, w_out).view(-1, b, hh * ww)
        return out.view(s, b, 1, hh, ww)

    def _cpu_features_first(self, u: torch.Tensor, z: torch.Tensor, chunk_elems: int) -> torch.Tensor:
        """The CPU path of :meth:`forward_pixels_last`: features as rows, reused buffers."""
        s, b = z.shape[:2]
        hh, ww = u.shape[-2:]
        k, p = self.mid.weight.shape[0], b * hh * ww
        a = self.u_in(u).reshape(b, k, hh * ww).transpose(0, 1).reshape(k, 1, b, hh * ww)  # (K, 1, B, HW), once
        zk = self.z_in(z).permute(2, 0, 1)[..., None]  # (K, S, B, 1)
        w_mid, w_out = self.mid.weight[:, :, 0, 0], self.out.weight[:, :, 0, 0]  # (K, K), (1, K)
        b_mid, b_out = self.mid.bias[:, None], self.out.bias[:, None]  # (K, 1), (1, 1)
        step = max(1, min(s, chunk_elems // (k * p)))
        buf = a.new_empty(2, k, step * p)  # layer 1 and layer 2 outputs of one chunk
        out = a.new_empty(s, p)
        for i in range(0, s, step):
            c = min(step, s - i)
            h1, h2 = buf[0, :, : c * p], buf[1, :, : c * p]  # (K, c*B*HW), row stride step*B*HW
            torch.add(a, zk[:, i : i + c], out=h1.view(k, c, b, hh * ww)).relu_()
            torch.addmm(b_mid, w_mid, h1, out=h2).relu_()
            torch.addmm(b_out, w_out, h2, out=out[i : i + c].view(1, c * p))
        return out.view(s, b, 1, hh, ww)


class ProbUNetModel(SegModel):
    name = "prob_unet"
    latent_sites = ("z",)
    sample_from = "p(z|x)"
    test_time_z = "prior"

    #: Images per chunk of ``sample``'s repeated batch when ``test_dropout`` is on.
    sample_chunk = 64

    def __init__(self, *, latent_dim: int = 6, comb_hidden: int = 16, dropout: float = 0.0,
                 test_dropout: bool = False, **kw):
        super().__init__(**kw)
        self.latent_dim = positive_int("latent_dim", latent_dim)
        self.comb_hidden = positive_int("comb_hidden", comb_hidden)
        self.dropout = rate("dropout", dropout)
        self.test_dropout = flag("test_dropout", test_dropout)
        if self.test_dropout and self.dropout == 0:
            raise UsageError(f"--model-arg test_dropout=true: expected dropout > 0 beside it, got dropout={self.dropout}")
        self.unet = UNet(self.in_channels, self.widths, out_ch=0)
        if self.dropout > 0:  # AlwaysDropout ignores eval(); nn.Dropout is off in eval()
            layer = AlwaysDropout if self.test_dropout else nn.Dropout
            insert_dropout(self.unet, lambda: layer(self.dropout))
        self.prior_net = GaussianEncoder(self.in_channels, self.widths, self.latent_dim)
        self.posterior_net = GaussianEncoder(
            self.in_channels + 1, self.widths, self.latent_dim, init_scale=POSTERIOR_INIT_SCALE
        )
        self.fcomb = FComb(self.widths[0], self.latent_dim, self.comb_hidden)

    def hparams(self):
        return {**super().hparams(), "latent_dim": self.latent_dim, "comb_hidden": self.comb_hidden,
                "dropout": self.dropout, "test_dropout": self.test_dropout}

    def model(self, image, mask=None, *, beta=1.0, recon_scale=1.0):
        self._register("unet", "prior_net", "fcomb")
        u = self.unet.features(image)  # (B, w0, H, W)
        with self._plate(image):
            with beta_scale(beta):
                z = pyro.sample("z", dist.Normal(*self.prior_net(image)).to_event(1))  # (B, D)
            logits = self.fcomb(u, z.unsqueeze(0)).squeeze(0)  # (B, 1, H, W)
            return mask_likelihood(logits, mask, recon_scale)

    def guide(self, image, mask=None, *, beta=1.0, recon_scale=1.0):
        if mask is None:
            raise ValueError("the prob_unet guide q(z | x, y) needs the mask; to predict, use sample()")
        self._register("posterior_net")
        with self._plate(image), beta_scale(beta):
            pyro.sample("z", dist.Normal(*self.posterior_net(torch.cat([image, mask], dim=1))).to_event(1))

    def sample(self, image, num_samples=1):
        loc, scale = self.prior_net(image)  # once per image
        z = dist.Normal(loc, scale).rsample((num_samples,))  # (S, B, D)
        if self.test_dropout:
            return self._sample_with_dropout(image, z)
        u = self.unet.features(image)  # once per image
        return self.fcomb.forward_pixels_last(u, z).sigmoid_()  # a fresh tensor: in place

    def _sample_with_dropout(self, image, z):
        """One U-Net pass (one dropout mask) per sample: ``z: (S, B, D)`` -> ``(S, B, 1, H, W)``."""
        s, b = z.shape[:2]
        reps = image.unsqueeze(0).expand(s, *image.shape).reshape(s * b, *image.shape[1:])  # (S*B, C, H, W)
        zs = z.reshape(1, s * b, -1)  # sample-major, as reps
        step = max(b, self.sample_chunk // b * b)
        outs = [self.fcomb.forward_pixels_last(self.unet.features(reps[i : i + step]), zs[:, i : i + step])
                for i in range(0, s * b, step)]
        return torch.cat(outs, dim=1).view(s, b, 1, *image.shape[-2:]).sigmoid_()

    @torch.inference_mode()
    def predict_at_mean(self, image):
        """z at the prior's mean and, with ``test_dropout``, the network without dropout."""
        z = self.prior_net(image)[0]  # the prior's mean, (B, D)
        try:
            set_dropout(self.unet, False)
            return self.fcomb(self.unet.features(image), z.unsqueeze(0)).squeeze(0).sigmoid()
        finally:
            set_dropout(self.unet, True)
