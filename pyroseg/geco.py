"""GECO: the ELBO as a constrained optimisation (Rezende & Viola 2018).

Instead of trading reconstruction against KL with a fixed weight, GECO asks for
a *reconstruction target* and minimises the KL subject to it, through the
Lagrangian ``L = sum_sites KL + lambda * C`` with the constraint ``C <= 0``.

Two constraints (``--geco-constraint``):

``topk`` (default; DeepMind's Hierarchical Probabilistic U-Net code,
    ``geco_utils.ce_loss`` and ``HierarchicalProbUNet.loss``): the
    reconstruction is the cross-entropy of a **stochastic top-k** of the
    pixels, ``k = floor(top_k * B * H * W)`` of the batch (``--geco-top-k 0.02``):
    pixels drawn without replacement with probabilities proportional to their
    current cross-entropy (the Gumbel top-k trick on ``log(ce / sum ce)``; with
    ``--geco-deterministic-top-k`` the ``k`` largest). The constraint is in
    **nats per image**: ``C = ma(mean_b sum_{selected} ce) - kappa * N``, ``N`` the
    mean number of selected pixels per image, ``kappa = 0.05`` nats per selected
    pixel. A deterministic model cannot meet it where raters disagree (their
    pixels have a cross-entropy of ``log 2`` or so and are the ones selected),
    so the multiplier keeps the latents in use there.
``mean`` (pyroseg's earlier variant): the mean per-pixel
    cross-entropy of the whole image, ``C = ma(mean_b sum_pixels ce / (H W)) - kappa``,
    nats per pixel, ``kappa`` given or :func:`auto_kappa`. On LGG a U-Net without
    latents already meets ``auto_kappa``'s target, so lambda falls and the
    optimum is a collapsed posterior.

How pyroseg does it, step by step:

* **the top-k is a mask on the likelihood sites** (:class:`TopKLikelihood`, a
  Pyro messenger active around each training step): it replaces each observed
  site's ``Bernoulli(logits).to_event(3)`` by
  ``Bernoulli(logits).mask(selected).to_event(3)``, so the ELBO's likelihood terms
  *are* the top-k cross-entropies, with no change to the models. Every site the
  multiplier scales is restricted and measured: PHiSeg's per-level ``"mask_l"``
  likelihoods too, each with its own top-k, weighted in ``C`` as in the loss
  (``level_loss_weight``), so ``lambda`` and the constraint cover the same terms.
  Validation and evaluation see the whole image. A model without a KL term (SSN,
  whose guide is its prior) is refused: there is nothing for ``lambda`` to trade.
* **the multiplier enters as ``recon_scale``**: every model wraps its
  likelihood site in ``poutine.scale(scale=recon_scale)``, so the SVI step with
  ``recon_scale = lambda`` minimises ``beta * KL + lambda * sum ce`` per image,
  whose gradient is that of the Lagrangian: ``lambda * kappa * N`` is a constant,
  and the moving average passes the current batch's gradient through
  (``C + stop_grad(C_ma - C)``, Sonnet's ``MovingAverage`` with
  ``differentiable=True``). So ``lambda`` multiplies a **sum** of cross-entropies
  over pixels, in both constraints, exactly as DeepMind's
  ``lagmul * (ma(rec_loss_sum) - kappa * N) + kl_sum``; ``lambda = 1`` is the
  plain ELBO (on the selected pixels, with ``topk``).
* **moving average**: ``C_ma <- alpha C_ma + (1 - alpha) C`` (the first step sets
  ``C_ma = C``), ``alpha = 0.99``.
* **multiplier update** (``--geco-update``):

  ``softplus`` (default; DeepMind via Sonnet's ``get_lagrange_multiplier``):
      ``lambda = softplus(w)^2``, ``w`` starting where ``lambda = 1``, moved by
      gradient *ascent* on ``lambda * C_ma`` with the gradient scaled by
      ``rate = 1e-2``, by the optimiser that trains the networks. DeepMind's
      code hands ``w`` to the model's optimiser; ours is Adam, so ``w`` gets its
      own Adam at the run's ``--lr`` (Adam's betas and eps), which is what one
      Adam over all parameters would do to it. Adam's step does not depend on
      the gradient's scale, so ``rate`` then matters only against Adam's eps:
      ``w`` moves by about ``lr`` per step while ``C_ma`` keeps its sign.
  ``multiplicative`` (pyroseg's earlier variant, Rezende & Viola's
      Algorithm 1): ``lambda <- lambda * exp(clip(rate * C_ma, +-max_step))``
      (``--geco-rate 1``, ``--geco-max-step 0.01``), clipped to
      ``[lambda_min, lambda_max]``.
* **warm-up** (``--geco-warmup``): for the first ``warmup_steps`` steps
  ``lambda`` stays at ``lambda_init`` while ``C_ma`` settles. DeepMind has none
  (the default with ``softplus``); with ``multiplicative`` the default is a
  tenth of the epochs.

The state (``lambda``, ``w`` and its Adam moments, ``C_ma``, steps) is saved in
checkpoints and restored on resume (:meth:`GECO.state_dict`).

References: Rezende & Viola, "Taming VAEs", arXiv:1810.00597, 2018;
Kohl et al., "A Hierarchical Probabilistic U-Net", arXiv:1905.13077, 2019, and
deepmind-research/hierarchical_probabilistic_unet (``geco_utils.py``, ``model.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from pyro.poutine.messenger import Messenger

from pyroseg.errors import UsageError

__all__ = [
    "GECO", "TopKLikelihood", "topk_pixels", "moving_average", "multiplier_step", "softplus_squared",
    "inverse_softplus_squared", "auto_kappa", "geco_from_config", "AUTO_KAPPA_FRACTION", "CONSTRAINTS", "UPDATES",
    "TOPK_KAPPA", "refuse_without_kl",
]

#: ``--geco-constraint`` choices; the first is the default.
CONSTRAINTS = ("topk", "mean")
#: ``--geco-update`` choices; the first is the default.
UPDATES = ("softplus", "multiplicative")
#: DeepMind's ``kappa`` for the top-k constraint: nats per selected pixel.
TOPK_KAPPA = 0.05

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


def softplus_squared(w: float) -> float:
    """Sonnet's Lagrange-multiplier parameterisation, ``softplus(w) ** 2``."""
    return _softplus(w) ** 2


def _softplus(w: float) -> float:
    return max(w, 0.0) + math.log1p(math.exp(-abs(w)))


def inverse_softplus_squared(lam: float) -> float:
    """The ``w`` with ``softplus(w) ** 2 == lam`` (``lam > 0``)."""
    r = math.sqrt(lam)
    return r + math.log(-math.expm1(-r))


def topk_pixels(ce: torch.Tensor, fraction: float, *, deterministic: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """DeepMind's top-k pixel mask (``geco_utils.ce_loss``), over the whole batch.

    ``ce``: per-pixel cross-entropy, any shape ``(B, ...)``. Returns a bool mask of
    the same shape with ``k = max(1, floor(fraction * ce.numel()))`` pixels set:
    the ``k`` largest ``ce`` (``deterministic``), or ``k`` drawn without
    replacement with probabilities ``ce / sum(ce)`` (Gumbel top-k: the largest
    ``log(ce / sum ce) + Gumbel``). No gradient flows through the choice.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")
    flat = ce.detach().reshape(-1)
    k = max(1, int(math.floor(flat.numel() * fraction)))
    score = torch.log(flat / flat.sum())
    if not deterministic:
        u = torch.rand(flat.shape, dtype=flat.dtype, device=flat.device, generator=generator)
        score = score - torch.log(-torch.log(u + 1e-20) + 1e-20)
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.topk(score, k).indices] = True
    return keep.view_as(ce)


class TopKLikelihood(Messenger):
    """A Pyro messenger that restricts every observed site (the likelihoods GECO's
    multiplier scales: ``"mask"``, and PHiSeg's per-level ``"mask_l"``) to a top-k of its
    pixels: ``Independent(Bernoulli)`` becomes ``Bernoulli.mask(selected).to_event(...)``,
    whose log-probability sums only the selected pixels (see :func:`topk_pixels`; each
    site selects from its own cross-entropy). ``fraction=None`` leaves the sites alone.

    It also measures what the constraint needs from the same pass, over the same terms
    the multiplier scales: with ``w_s`` a site's weight relative to ``recon_scale`` (its
    Pyro scale divided by ``recon_scale``: 1 for ``"mask"``, PHiSeg's
    ``level_loss_weight`` for ``"mask_l"``), after each step

    * ``recon`` (a detached 0-dim tensor): ``sum_s w_s * mean_b sum_{counted} ce_s``, the
      batch mean of the weighted cross-entropy of the counted pixels, nats per image;
    * ``pixels_per_image``: ``sum_s w_s * (pixels counted per image at s)``.

    So ``lambda`` and ``C = recon - kappa * pixels`` cover the same terms. A site that is not
    a per-pixel Bernoulli (a mixture) is scored whole with ``fraction=None`` and refused
    (:class:`~pyroseg.errors.UsageError`) with a top-k.
    """

    def __init__(self, fraction: float | None, *, deterministic: bool = False, recon_scale: float = 1.0):
        super().__init__()
        self.fraction = fraction
        self.deterministic = deterministic
        self.recon_scale = float(recon_scale)
        self.pixels_per_image: float | None = None
        self.recon: torch.Tensor | None = None
        self._sums: list = [0.0, 0.0, 0]  # weighted recon, weighted pixels, passes (of "mask")

    def _pyro_sample(self, msg):
        if not msg["is_observed"]:
            return
        fn, value = msg["fn"], msg["value"]
        weight = float(msg["scale"]) / self.recon_scale if self.recon_scale > 0 else 1.0
        batch = value.shape[0]
        if isinstance(fn, torch.distributions.Independent) and isinstance(fn.base_dist, torch.distributions.Bernoulli):
            base, event_dims = fn.base_dist, fn.reinterpreted_batch_ndims  # Bernoulli (B, 1, H, W), 3
            with torch.no_grad():
                ce = -base.log_prob(value)  # (B, 1, H, W), nats per pixel
            if self.fraction is None:
                counted, pixels = ce.sum(), float(value[0].numel())
            else:
                keep = topk_pixels(ce, self.fraction, deterministic=self.deterministic)
                msg["fn"] = base.mask(keep).to_event(event_dims)
                counted, pixels = (ce * keep).sum(), float(keep.sum()) / batch
        elif self.fraction is None:
            with torch.no_grad():
                counted, pixels = -fn.log_prob(value).sum(), float(value[0].numel())
        else:
            raise UsageError(f"--geco-constraint topk: the likelihood site {msg['name']!r} is a {type(fn).__name__}, "
                             "not a per-pixel Bernoulli; use --geco-constraint mean")
        self._sums[0] = self._sums[0] + weight * counted.detach() / batch
        self._sums[1] += weight * pixels
        if msg["name"] == "mask":
            self._sums[2] += 1

    def __exit__(self, *args):
        passes = max(self._sums[2], 1)  # several particles: their mean, as the ELBO's terms
        if self._sums[2]:
            self.recon = self._sums[0] / passes
            self.pixels_per_image = self._sums[1] / passes
        self._sums = [0.0, 0.0, 0]
        return super().__exit__(*args)


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
    ``update(recon, pixels)`` takes the step's reconstruction error: ``recon`` the
    batch mean of each image's summed cross-entropy over the pixels counted
    (all of them with ``constraint="mean"``, the top-k with ``"topk"``), and
    ``pixels`` the number counted per image. The constraint is then
    ``recon / pixels - kappa`` (``"mean"``, nats per pixel) or
    ``recon - kappa * pixels`` (``"topk"``, nats per image).
    ``likelihood()`` is the messenger to wrap around each training step.

    The dataclass defaults are pyroseg's earlier rule (``mean``,
    ``multiplicative``, ``rate=1``), so that ``update(recon_per_pixel)`` keeps its
    meaning; :func:`geco_from_config` builds the published one by default.
    """

    kappa: float
    alpha: float = 0.99
    rate: float = 1.0
    warmup_steps: int = 0
    max_step: float = 0.01
    lambda_init: float = 1.0
    lambda_min: float = 1e-3
    lambda_max: float = 1e3
    constraint: str = "mean"  # "topk" or "mean"
    top_k: float = 0.02  # share of the batch's pixels in the top-k constraint
    deterministic_top_k: bool = False
    update_rule: str = "multiplicative"  # "softplus" (DeepMind) or "multiplicative"
    lr: float = 1e-3  # Adam's step size on w (softplus rule)
    # state
    lam: float | None = None
    c_ma: float | None = None
    steps: int = 0
    w: float | None = None  # softplus rule: lambda = softplus(w) ** 2
    adam_m: float = 0.0
    adam_v: float = 0.0

    def __post_init__(self):
        if not self.kappa > 0:
            raise ValueError(f"kappa must be > 0, got {self.kappa}")
        if not 0 <= self.alpha < 1:
            raise ValueError(f"alpha must be in [0, 1), got {self.alpha}")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if not self.max_step > 0:
            raise ValueError(f"max_step must be > 0, got {self.max_step}")
        if self.constraint not in CONSTRAINTS:
            raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {self.constraint!r}")
        if self.update_rule not in UPDATES:
            raise ValueError(f"update_rule must be one of {UPDATES}, got {self.update_rule!r}")
        if not 0 < self.top_k <= 1:
            raise ValueError(f"top_k must be in (0, 1], got {self.top_k}")
        if self.lam is None:
            self.lam = float(self.lambda_init)
        if self.w is None:
            self.w = inverse_softplus_squared(self.lam)

    @property
    def recon_scale(self) -> float:
        return float(self.lam)

    def likelihood(self) -> TopKLikelihood:
        """The messenger for one training step: the top-k mask on every likelihood site
        (``constraint="topk"``), or a pass-through; either way it measures the step's
        ``recon`` and ``pixels_per_image`` over the terms ``lambda`` scales."""
        return TopKLikelihood(self.top_k if self.constraint == "topk" else None, deterministic=self.deterministic_top_k,
                              recon_scale=self.recon_scale)

    def constraint_value(self, recon: float, pixels: float = 1.0) -> float:
        """``C`` of one step before the moving average (see the class docs)."""
        if self.constraint == "topk":
            return float(recon) - self.kappa * float(pixels)
        return float(recon) / float(pixels) - self.kappa

    def update(self, recon: float, pixels: float = 1.0) -> float:
        """One step: fold ``C`` into the moving average, then (after the
        warm-up) move lambda. Returns the new lambda."""
        c = self.constraint_value(recon, pixels)
        if not math.isfinite(c):
            return self.lam  # a non-finite step is skipped by the trainer; skip it here too
        self.c_ma = moving_average(self.c_ma, c, self.alpha)
        self.steps += 1
        if self.steps > self.warmup_steps:
            if self.update_rule == "softplus":
                self._softplus_step()
            else:
                self.lam = multiplier_step(
                    self.lam, self.c_ma, rate=self.rate, max_step=self.max_step,
                    lambda_min=self.lambda_min, lambda_max=self.lambda_max,
                )
        return self.lam

    def _softplus_step(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        """One Adam step on ``w`` for the loss ``-rate * softplus(w)^2 * C_ma``
        (Sonnet's gradient scaling by ``-rate``: ascent on ``lambda * C_ma``)."""
        sig = 1.0 / (1.0 + math.exp(-self.w))
        grad = -self.rate * self.c_ma * 2.0 * _softplus(self.w) * sig  # d loss / d w
        t = self.steps - self.warmup_steps
        self.adam_m = beta1 * self.adam_m + (1 - beta1) * grad
        self.adam_v = beta2 * self.adam_v + (1 - beta2) * grad * grad
        m_hat = self.adam_m / (1 - beta1**t)
        v_hat = self.adam_v / (1 - beta2**t)
        self.w -= self.lr * m_hat / (math.sqrt(v_hat) + eps)
        self.lam = softplus_squared(self.w)

    def log_row(self) -> dict[str, float]:
        """What ``metrics.csv`` gets each epoch."""
        return {
            "geco_lambda": float(self.lam),
            "geco_c_ma": float("nan") if self.c_ma is None else float(self.c_ma),
            "geco_kappa": float(self.kappa),
        }

    def state_dict(self) -> dict:
        """Plain numbers only (the checkpoint is loaded with ``weights_only=True``)."""
        return {"lam": float(self.lam), "c_ma": self.c_ma, "steps": int(self.steps), "kappa": float(self.kappa),
                "w": float(self.w), "adam_m": float(self.adam_m), "adam_v": float(self.adam_v)}

    def load_state_dict(self, state: dict) -> None:
        self.lam = float(state["lam"])
        self.c_ma = None if state.get("c_ma") is None else float(state["c_ma"])
        self.steps = int(state["steps"])
        self.kappa = float(state.get("kappa", self.kappa))
        self.w = float(state["w"]) if "w" in state else inverse_softplus_squared(self.lam)
        self.adam_m = float(state.get("adam_m", 0.0))
        self.adam_v = float(state.get("adam_v", 0.0))


def refuse_without_kl(model) -> None:
    """GECO minimises the KL subject to the reconstruction constraint; a model whose guide
    is its prior (SSN: ``KL = 0`` by construction) has nothing for the multiplier to trade,
    so ``--objective geco`` would only rescale its likelihood. ``model``: a model or its
    class. Raises one :class:`~pyroseg.errors.UsageError` line naming the model."""
    if getattr(model, "guide_is_prior", False):
        raise UsageError(f"--objective geco: {model.name} has no KL term for GECO's multiplier to trade against "
                         "(its guide is its prior: KL = 0 by construction); train it with --objective elbo")


def geco_from_config(config, train_masks: np.ndarray, steps_per_epoch: int) -> GECO:
    """The :class:`GECO` of a :class:`~pyroseg.config.FitConfig` with ``objective="geco"``
    (after ``validate()``): ``kappa`` given, or 0.05 per selected pixel (``topk``)
    or :func:`auto_kappa` of the training masks (``mean``); the warm-up converted
    from epochs to steps."""
    if config.geco_kappa is not None:
        kappa = config.geco_kappa
    else:
        kappa = TOPK_KAPPA if config.geco_constraint == "topk" else auto_kappa(train_masks)
    return GECO(
        kappa=kappa,
        alpha=config.geco_alpha,
        rate=config.geco_rate,
        warmup_steps=int(round(config.geco_warmup * steps_per_epoch)),
        max_step=config.geco_max_step,
        constraint=config.geco_constraint,
        top_k=config.geco_top_k,
        deterministic_top_k=config.geco_deterministic_top_k,
        update_rule=config.geco_update,
        lr=config.lr,
    )
