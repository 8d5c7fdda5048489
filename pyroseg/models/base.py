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

import numbers
from typing import Any, ClassVar, Literal

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyroseg.errors import UsageError
from pyroseg.nets import check_image_size, num_params

__all__ = ["SegModel", "TestTimeZ", "mask_likelihood", "beta_scale", "positive_int", "positive_ints", "rate", "positive_float", "flag"]


# -- hyper-parameter checks (``--model-arg``), shared by every model --------------------
# Each returns the value converted, or raises one UsageError line naming the option,
# the value given and what was expected (not a PyTorch traceback from deep inside a layer).


#: Backbone settings that have their own ``fit`` option rather than a ``--model-arg``.
_OWN_OPTIONS = {"widths", "image_size", "in_channels"}


def _bad(name: str, value: Any, expected: str) -> UsageError:
    where = f"--{name.replace('_', '-')} {value!r}" if name in _OWN_OPTIONS else f"--model-arg {name}={value!r}"
    return UsageError(f"{where}: expected {expected}")


def positive_int(name: str, value: Any) -> int:
    """A hyper-parameter that must be an integer >= 1 (``latent_dim``, ``rank``, ...)."""
    if isinstance(value, str):
        ok = value.strip().isdigit()
    else:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer()
    if not ok or int(value) < 1:
        raise _bad(name, value, "a positive integer")
    return int(value)


def positive_ints(name: str, value: Any, length: int | None = None) -> tuple[int, ...]:
    """A list of integers >= 1 (``widths``, ``latent_dims``), of ``length`` entries when given."""
    what = f"a list of {length} positive integers" if length else "a list of positive integers"
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise _bad(name, value, what)
    items = list(value)
    if not items or (length is not None and len(items) != length):
        raise _bad(name, items, what)
    try:
        return tuple(positive_int(name, v) for v in items)
    except UsageError:
        raise _bad(name, items, what) from None


def _number(name: str, value: Any, expected: str) -> float:
    if isinstance(value, bool):
        raise _bad(name, value, expected)
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise _bad(name, value, expected) from None
    if x != x or x in (float("inf"), float("-inf")):
        raise _bad(name, value, expected)
    return x


def rate(name: str, value: Any) -> float:
    """A probability in ``[0, 1)`` (a dropout rate)."""
    x = _number(name, value, "a rate in [0, 1)")
    if not 0.0 <= x < 1.0:
        raise _bad(name, value, "a rate in [0, 1)")
    return x


def positive_float(name: str, value: Any) -> float:
    """A finite number > 0 (an epsilon, a scale)."""
    x = _number(name, value, "a number > 0")
    if x <= 0:
        raise _bad(name, value, "a number > 0")
    return x


def flag(name: str, value: Any) -> bool:
    """A yes/no hyper-parameter: a bool, ``"true"``/``"false"`` (any case) or 0/1."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _bad(name, value, "true or false")


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


#: Where a model's test-time ``z`` comes from (:attr:`SegModel.test_time_z`).
TestTimeZ = Literal["prior", "guide", "none"]


class SegModel(nn.Module):
    """Base class. Subclasses set ``name`` and ``latent_sites`` and define
    ``model``, ``guide`` and ``sample``.

    ``latent_sites`` lists the names of the latent ``pyro.sample`` sites, in
    the order they are sampled (coarsest / top first); the training loop logs
    one KL per site, so posterior collapse of any one of them is visible.
    """

    name: ClassVar[str] = ""
    latent_sites: ClassVar[tuple[str, ...]] = ()
    #: Where test-time ``z`` comes from, in words: for the docs and the evaluate report only.
    sample_from: ClassVar[str] = "none"
    #: Where test-time ``z`` comes from, for code: ``"prior"``: the model's own conditional
    #: prior ``p(z | x)``, its guide being the posterior ``q(z | x, y)`` that needs the mask
    #: (the Probabilistic U-Nets); ``"guide"``: the guide, run on the image alone (``q(z | x)``
    #: of the VAE family; ``ssn``, whose guide is its prior); ``"none"``: no latent site.
    test_time_z: ClassVar[TestTimeZ] = "none"
    #: Levels of the shared encoder; the image size must allow them.
    levels_needed: ClassVar[int] = 4

    #: The test-time ``z`` is drawn by the guide, which *is* the prior (``ssn``): the
    #: KL is 0 by construction, so evaluate reports the likelihood and no collapse diagnostics.
    guide_is_prior: ClassVar[bool] = False
    #: The samples differ without a latent site (dropout masks, ensemble members).
    stochastic: ClassVar[bool] = False
    #: The point prediction its authors score (Dice and the rest) when none is asked for
    #: (``point="auto"``, :data:`pyroseg.predict.POINT_PREDICTIONS`): ``"mean"``, the mean of
    #: the samples, unless the published method predicts otherwise (``ssn``: its logits' mean,
    #: ``"mean-z"``).
    point_prediction: ClassVar[str] = "mean"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "test_time_z" not in cls.__dict__ and "sample_from" in cls.__dict__:
            # a model written before test_time_z existed says where z comes from in words only
            cls.test_time_z = "prior" if cls.sample_from == "p(z|x)" else "guide" if cls.latent_sites else "none"

    def __init__(self, *, image_size: int = 64, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        self.widths = positive_ints("widths", widths)
        self.in_channels = positive_int("in_channels", in_channels)
        check_image_size(positive_int("image_size", image_size), len(self.widths))
        self.image_size = int(image_size)

    # -- what rebuilds the model -------------------------------------------------------
    def hparams(self) -> dict[str, Any]:
        """Everything needed to rebuild this model with ``build_model(name, **hparams)``."""
        return {"image_size": self.image_size, "in_channels": self.in_channels, "widths": list(self.widths)}

    @property
    def num_params(self) -> int:
        return num_params(self)

    @property
    def has_latent(self) -> bool:
        """Whether its samples differ: a latent site, or another source of randomness
        (:attr:`stochastic`). How many samples prediction draws depends on it."""
        return bool(self.latent_sites) or self.stochastic

    def num_draws(self, num_samples: int) -> int:
        """How many samples prediction draws when ``num_samples`` are asked for:
        all of them for a model whose samples differ, else 1 (they are all one)."""
        return num_samples if self.has_latent else 1

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
        return self.sample(image, self.num_draws(num_samples)).mean(0)

    @torch.inference_mode()
    def predict_at_mean(self, image: torch.Tensor) -> torch.Tensor:
        """Mask probability ``(B, 1, H, W)`` with every latent at the mean of its test-time
        distribution (the prior's for the Probabilistic U-Nets and PHiSeg, ``q(z|x)``'s
        for the VAE family; for SSN the logits' mean; for MC dropout the network without
        dropout): the "mean z" point prediction. A model with no latent: its one sample."""
        if self.has_latent:
            raise NotImplementedError(f"{self.name}: no mean-z prediction (predict_at_mean)")
        return self.sample(image, 1)[0]

    def extra_repr(self) -> str:
        return f"latent_sites={self.latent_sites}, params={self.num_params:,}"

    def _register(self, *names: str) -> None:
        """``pyro.module`` each named sub-network, under its attribute name."""
        for n in names:
            pyro.module(n, getattr(self, n))

    @staticmethod
    def _plate(image: torch.Tensor):
        return pyro.plate("batch", image.shape[0], dim=-1)
