"""What every pyroseg model is: a Pyro ``model``/``guide`` pair over (image, mask).

Conventions shared by every model (see :mod:`pyroseg.models` for the registry):

* ``image``: float ``(B, C, H, W)`` in [0, 1]; ``mask``: float ``(B, 1, H, W)``
  in {0, 1}, or ``None`` to let the model draw the mask;
* ``model(image, mask=None, *, beta=1.0, recon_scale=1.0)`` and
  ``guide(image, mask=None, *, beta=1.0, recon_scale=1.0)`` take the same
  arguments; one outer ``pyro.plate("batch", B)``; every latent is a named
  ``pyro.sample`` site (``"z"``, ``"z_1"``, ...) whose event dims are declared with
  ``.to_event``; the mask likelihood is the site ``"mask"``,
  ``Bernoulli(logits=...).to_event(3)`` over ``(1, H, W)``;
* ``beta`` scales every latent site in model *and* guide through
  ``poutine.scale`` (KL annealing), ``recon_scale`` scales the ``"mask"`` site
  (the GECO Lagrange multiplier; 1 for the plain ELBO). The training objective is
  then ``recon_scale * E_q[-log p(y | z, x)] + beta * KL(q || p)`` per image;
* ``sample(image, num_samples)`` returns mask probabilities ``(S, B, 1, H, W)``,
  computing once whatever does not depend on ``z``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyroseg.nets import check_image_size, num_params

__all__ = ["SegModel", "mask_likelihood", "beta_scale"]


def beta_scale(beta: float):
    """The KL-annealing handler around latent sites: ``poutine.scale(scale=beta)``.

    Pyro's scale must be positive, so ``beta = 0`` (the first step of a linear
    warm-up) is ``poutine.mask(mask=False)`` instead, which drops the sites'
    terms from the ELBO exactly; the latents are still sampled.
    """
    if beta > 0:
        return poutine.scale(scale=beta)
    if beta == 0:
        return poutine.mask(mask=False)
    raise ValueError(f"beta must be >= 0, got {beta}")


def mask_likelihood(logits: torch.Tensor, mask: torch.Tensor | None, recon_scale: float = 1.0) -> torch.Tensor:
    """The ``"mask"`` site: independent Bernoulli pixels, ``logits: (B, 1, H, W)``.

    Must be called inside the batch plate. ``recon_scale`` multiplies its
    log-likelihood (GECO's lambda; 1 for the ELBO).
    """
    assert logits.dim() == 4 and logits.shape[1] == 1, f"logits must be (B, 1, H, W), got {tuple(logits.shape)}"
    with poutine.scale(scale=recon_scale):
        return pyro.sample("mask", dist.Bernoulli(logits=logits).to_event(3), obs=mask)


class SegModel(nn.Module):
    """Base class. Subclasses set ``name`` and ``latent_sites`` and define
    ``model``, ``guide`` and ``sample``.

    ``latent_sites`` lists the names of the latent ``pyro.sample`` sites, in
    the order they are sampled (coarsest / top first); the training loop logs
    one KL per site, so posterior collapse of any one of them is visible.
    """

    name: ClassVar[str] = ""
    latent_sites: ClassVar[tuple[str, ...]] = ()
    #: Where test-time ``z`` comes from, for the docs and the evaluate report.
    sample_from: ClassVar[str] = "none"
    #: Levels of the shared encoder; the image size must allow them.
    levels_needed: ClassVar[int] = 4

    def __init__(self, *, image_size: int = 64, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        check_image_size(image_size, len(widths))
        self.image_size = int(image_size)
        self.in_channels = int(in_channels)
        self.widths = tuple(int(w) for w in widths)

    # -- what rebuilds the model -------------------------------------------------------
    def hparams(self) -> dict[str, Any]:
        """Everything needed to rebuild this model with ``build_model(name, **hparams)``."""
        return {"image_size": self.image_size, "in_channels": self.in_channels, "widths": list(self.widths)}

    @property
    def num_params(self) -> int:
        return num_params(self)

    @property
    def has_latent(self) -> bool:
        return bool(self.latent_sites)

    # -- the Pyro pair -----------------------------------------------------------------
    def model(self, image: torch.Tensor, mask: torch.Tensor | None = None, *, beta: float = 1.0, recon_scale: float = 1.0):
        raise NotImplementedError

    def guide(self, image: torch.Tensor, mask: torch.Tensor | None = None, *, beta: float = 1.0, recon_scale: float = 1.0):
        raise NotImplementedError

    # -- prediction --------------------------------------------------------------------
    def sample(self, image: torch.Tensor, num_samples: int = 1) -> torch.Tensor:
        """Mask probabilities ``(num_samples, B, 1, H, W)`` for ``image: (B, C, H, W)``."""
        raise NotImplementedError

    @torch.inference_mode()
    def predict(self, image: torch.Tensor, num_samples: int = 16) -> torch.Tensor:
        """Mean mask probability over ``num_samples`` samples, ``(B, 1, H, W)``
        (under ``torch.inference_mode``: the result cannot enter autograd)."""
        n = num_samples if self.has_latent else 1
        return self.sample(image, n).mean(0)

    def extra_repr(self) -> str:
        return f"latent_sites={self.latent_sites}, params={self.num_params:,}"

    def _register(self, *names: str) -> None:
        """``pyro.module`` each named sub-network, under its attribute name."""
        for n in names:
            pyro.module(n, getattr(self, n))

    @staticmethod
    def _plate(image: torch.Tensor):
        return pyro.plate("batch", image.shape[0], dim=-1)
