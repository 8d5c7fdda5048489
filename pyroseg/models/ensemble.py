"""Deep ensembles (Lakshminarayanan et al. 2017): K trained runs as one model.

    model:  k ~ Uniform{1..K}, y ~ p_k(y | x)   the uniform mixture of the members
    samples: the members' predictions, in turn (one each for deterministic members)

Not in the ``MODELS`` registry (``fit`` cannot train it); :func:`pyroseg.ensemble.join_runs`
(``pyroseg ensemble RUN ... --out DIR``) writes a run folder whose ``config.json`` names
``"ensemble"`` with the members' names and hyper-parameters, and whose ``checkpoint.pt``
holds all their weights, so ``evaluate``, ``sample`` and ``plot`` open it as any run.

The ``"mask"`` site is the mixture ``(1/K) sum_k Bernoulli(p_k)``, with ``p_k`` one
sample of member ``k`` (its prediction, for a deterministic member): its negative
log-probability, reported by ``evaluate`` as ``nll``, is the ensemble's predictive
likelihood. There is no latent site and nothing to infer: the guide is empty.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyroseg.errors import UsageError
from pyroseg.models.base import SegModel
from pyroseg.models.registry import build_model

__all__ = ["EnsembleModel"]


class EnsembleModel(SegModel):
    name = "ensemble"
    latent_sites = ()
    sample_from = "members"
    stochastic = True

    def __init__(self, *, members: list[dict], **kw):
        super().__init__(**kw)
        if not isinstance(members, list) or len(members) < 2:
            raise UsageError(f"ensemble: expected at least 2 members, got {members!r}")
        self.member_docs = [{"name": m["name"], "hparams": dict(m["hparams"])} for m in members]
        self.members = nn.ModuleList(build_model(m["name"], **m["hparams"]) for m in self.member_docs)
        for m in self.members:
            if m.image_size != self.image_size or m.in_channels != self.in_channels:
                raise UsageError("ensemble: every member must take the same image size and channels")

    def hparams(self):
        return {**super().hparams(), "members": self.member_docs}

    @property
    def all_deterministic(self) -> bool:
        return not any(m.has_latent for m in self.members)

    def num_draws(self, num_samples: int) -> int:
        """``K`` (one prediction per member) when no member is stochastic, else
        ``K * ceil(num_samples / K)``: every member gives as many samples, so the
        mean of the samples weighs the members alike."""
        k = len(self.members)
        return k if self.all_deterministic else k * math.ceil(num_samples / k)

    def model(self, image, mask=None, *, beta=1.0, recon_scale=1.0):
        probs = torch.stack([m.sample(image, 1)[0] for m in self.members], dim=1)  # (B, K, 1, H, W)
        components = dist.Bernoulli(probs=probs.clamp(1e-6, 1 - 1e-6)).to_event(3)  # batch (B, K)
        mixture = dist.MixtureSameFamily(dist.Categorical(logits=probs.new_zeros(probs.shape[:2])), components)
        with self._plate(image), poutine.scale(scale=recon_scale):
            return pyro.sample("mask", mixture, obs=mask)

    def guide(self, image, mask=None, *, beta=1.0, recon_scale=1.0):
        """Nothing to infer."""

    @torch.inference_mode()
    def predict_at_mean(self, image):
        """The mean of the members' mean-z predictions (each member weighs alike)."""
        return torch.stack([m.predict_at_mean(image) for m in self.members]).mean(0)

    def sample(self, image, num_samples=1):
        """``(num_samples, B, 1, H, W)``: member ``i % K`` gives sample ``i``."""
        k = len(self.members)
        per = math.ceil(num_samples / k)
        draws = [m.sample(image, per if m.has_latent else 1).expand(per, -1, -1, -1, -1) for m in self.members]
        out = torch.stack(draws, dim=1).flatten(0, 1)  # (per * K, B, 1, H, W), members interleaved
        return out[:num_samples]
