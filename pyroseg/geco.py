"""GECO: the ELBO as a constrained optimisation (Rezende & Viola 2018).

Instead of trading reconstruction against KL with a fixed weight, GECO asks for
a *reconstruction target* ``kappa`` and minimises the KL subject to it::

    min  sum_sites KL   subject to   C = E[-log p(y | x, z)] / (H W) <= kappa

through the Lagrangian ``L = sum KL + lambda * (C - kappa)``. The constraint is
per pixel (nats per pixel, averaged over the batch), as in the Hierarchical
Probabilistic U-Net's code, so that ``kappa`` does not depend on the image size.

How pyroseg does it, step by step (:meth:`GECO.update` after each SVI step):

* **the multiplier enters as ``recon_scale``**: every model wraps its
  likelihood site in ``poutine.scale(scale=recon_scale)``, so the SVI step
  with ``recon_scale = lambda`` minimises ``beta * KL + lambda * H W * C``,
  whose gradient is that of the Lagrangian (``lambda * kappa`` is a constant).
  ``lambda`` is measured **in units of the ELBO's reconstruction weight**:
  ``lambda = 1`` is the plain ELBO, ``lambda = 2`` weighs reconstruction twice.
  (The HPU-Net code multiplies the per-pixel *mean*, so its lambda is ours
  times ``H W``; the multiplicative update below is the same in either unit.)
* **moving average, pass-through**: ``C_ma <- alpha C_ma + (1 - alpha)(C - kappa)``
  (the first step sets ``C_ma = C - kappa``). The parameters get the gradient of
  the *current* batch's ``C`` (through ``recon_scale``), the multiplier sees the
  smoothed ``C_ma``: the pass-through estimator ``C + stop_grad(C_ma - C)``.
* **multiplier update**: ``lambda <- lambda * exp(rate * C_ma)`` (Rezende &
  Viola's Algorithm 1; not the softplus-parameterised gradient ascent of
  DeepMind's Sonnet code), i.e. ``log lambda`` moves by ``rate * C_ma`` per
  step: up while the reconstruction is worse than ``kappa``, down while better.
* **warm-up**: for the first ``warmup_steps`` steps ``lambda`` stays at
  ``lambda_init`` while ``C_ma`` settles: early reconstructions are bad only
  because the networks are new, and a multiplier that reacts to them grows
  large and leaves the KL high long after (the complaint of users of public
  GECO code).
* **bounded steps**: ``|Delta log lambda| <= max_step`` per step, and
  ``lambda`` stays in ``[lambda_min, lambda_max]``.

The state (``lambda``, ``C_ma``, steps) is saved in checkpoints and restored on
resume (:meth:`GECO.state_dict`).

References: Rezende & Viola, "Taming VAEs", arXiv:1810.00597, 2018;
Kohl et al., "A Hierarchical Probabilistic U-Net", arXiv:1905.13077, 2019.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["GECO", "moving_average", "multiplier_step", "auto_kappa", "geco_from_config", "AUTO_KAPPA_FRACTION"]

#: ``kappa = "auto"`` asks for this fraction of the per-pixel reconstruction
#: error of a model that knows nothing of the image (see :func:`auto_kappa`).
AUTO_KAPPA_FRACTION = 0.25


def moving_average(c_ma: float | None, c: float, alpha: float) -> float:
    """``alpha * c_ma + (1 - alpha) * c``; ``c`` itself when there is no average yet."""
    if c_ma is None:
        return float(c)
    return alpha * c_ma + (1.0 - alpha) * c


def multiplier_step(
    lam: float, c_ma: float, *, rate: float, max_step: float = math.inf, lambda_min: float = 0.0, lambda_max: float = math.inf
) -> float:
    """``lambda * exp(clip(rate * c_ma, -max_step, max_step))``, clipped to ``[lambda_min, lambda_max]``."""
    step = min(max(rate * c_ma, -max_step), max_step)
    return min(max(lam * math.exp(step), lambda_min), lambda_max)


def auto_kappa(masks: np.ndarray, fraction: float = AUTO_KAPPA_FRACTION) -> float:
    """A data-derived reconstruction target, nats per pixel.

    ``masks``: any array of 0/1 training masks. The per-pixel cross-entropy of
    a model that ignores the image and predicts the training set's foreground
    share ``p`` everywhere is the Bernoulli entropy ``H(p)``; ``kappa`` asks for
    ``fraction`` of it. On the LGG development copy at 64x64 (training patients)
    ``p`` is 1.4 %, ``H(p)`` 0.069 nats and ``kappa`` 0.017 (a trained U-Net reaches
    about 0.011 on validation); the HPU-Net's 0.05 would be nearly met by
    predicting nothing.
    """
    p = float(np.mean(masks, dtype=np.float64)) if np.size(masks) else 0.0
    p = min(max(p, 1e-6), 1 - 1e-6)
    entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    return fraction * entropy


@dataclass
class GECO:
    """The GECO multiplier and its moving average; see the module docs.

    ``recon_scale`` is what the next SVI step passes to the models;
    ``update(recon_per_pixel)`` takes the step's mean reconstruction error in
    nats per pixel (``-log p(y | x, z) / (H W)``, averaged over the batch).
    """

    kappa: float
    alpha: float = 0.99
    rate: float = 1.0
    warmup_steps: int = 0
    max_step: float = 0.01
    lambda_init: float = 1.0
    lambda_min: float = 1e-3
    lambda_max: float = 1e3
    # state
    lam: float | None = None
    c_ma: float | None = None
    steps: int = 0

    def __post_init__(self):
        if not self.kappa > 0:
            raise ValueError(f"kappa must be > 0, got {self.kappa}")
        if not 0 <= self.alpha < 1:
            raise ValueError(f"alpha must be in [0, 1), got {self.alpha}")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if not self.max_step > 0:
            raise ValueError(f"max_step must be > 0, got {self.max_step}")
        if self.lam is None:
            self.lam = float(self.lambda_init)

    @property
    def recon_scale(self) -> float:
        return float(self.lam)

    def update(self, recon_per_pixel: float) -> float:
        """One step: fold ``C - kappa`` into the moving average, then (after the
        warm-up) move lambda. Returns the new lambda."""
        c = float(recon_per_pixel) - self.kappa
        if not math.isfinite(c):
            return self.lam  # a non-finite step is skipped by the trainer; skip it here too
        self.c_ma = moving_average(self.c_ma, c, self.alpha)
        self.steps += 1
        if self.steps > self.warmup_steps:
            self.lam = multiplier_step(
                self.lam, self.c_ma, rate=self.rate, max_step=self.max_step,
                lambda_min=self.lambda_min, lambda_max=self.lambda_max,
            )
        return self.lam

    def log_row(self) -> dict[str, float]:
        """What ``metrics.csv`` gets each epoch."""
        return {
            "geco_lambda": float(self.lam),
            "geco_c_ma": float("nan") if self.c_ma is None else float(self.c_ma),
            "geco_kappa": float(self.kappa),
        }

    def state_dict(self) -> dict:
        """Plain numbers only (the checkpoint is loaded with ``weights_only=True``)."""
        return {"lam": float(self.lam), "c_ma": self.c_ma, "steps": int(self.steps), "kappa": float(self.kappa)}

    def load_state_dict(self, state: dict) -> None:
        self.lam = float(state["lam"])
        self.c_ma = None if state.get("c_ma") is None else float(state["c_ma"])
        self.steps = int(state["steps"])
        self.kappa = float(state.get("kappa", self.kappa))


def geco_from_config(config, train_masks: np.ndarray, steps_per_epoch: int) -> GECO:
    """The :class:`GECO` of a :class:`~pyroseg.config.FitConfig` with ``objective="geco"``:
    ``kappa`` given or :func:`auto_kappa` of the training masks; the warm-up
    converted from epochs to steps."""
    kappa = config.geco_kappa if config.geco_kappa is not None else auto_kappa(train_masks)
    return GECO(
        kappa=kappa,
        alpha=config.geco_alpha,
        rate=config.geco_rate,
        warmup_steps=int(round(config.geco_warmup * steps_per_epoch)),
        max_step=config.geco_max_step,
    )
