"""What the training loop optimises, as one object the loop calls: the plain (or
annealed) ELBO, or GECO (:mod:`pyroseg.geco`). The loop never asks which::

    with objective.step_context() as likelihood:          # GECO: its top-k likelihood
        outcome = trainer.step(image, mask, beta=beta, recon_scale=objective.recon_scale)
    objective.after_step(outcome, likelihood, trainer.reduce)   # GECO: move lambda

and per epoch ``log_row()`` (metrics.csv columns), in checkpoint.pt
``checkpoint_entries()`` / ``restore(ckpt)``, in config.json ``config_entries()``,
and ``rank_state()`` for the data-parallel consistency check. This module is
the one place of the training code that knows GECO exists; a new objective
is a new class with these methods and a line in :func:`make_objective`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from pyroseg.config import FitConfig
from pyroseg.geco import GECO, geco_from_config, refuse_without_kl
from pyroseg.training.step import StepOutcome

__all__ = ["ELBOObjective", "GECOObjective", "Objective", "check_model", "make_objective"]


class ELBOObjective:
    """The negative ELBO (``beta`` comes from the schedule, not from here): the
    likelihood at scale 1, nothing to update, nothing to save."""

    recon_scale = 1.0

    def step_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def after_step(self, outcome: StepOutcome, likelihood: Any, reduce=None) -> None:
        """Nothing: the ELBO has no state of its own (and reading ``outcome`` would wait for the device)."""

    def log_row(self) -> dict[str, float]:
        return {}

    def checkpoint_entries(self) -> dict[str, Any]:
        return {}

    def restore(self, ckpt: dict[str, Any]) -> None:
        pass

    def config_entries(self, config: FitConfig) -> dict[str, Any]:
        return {}

    def rank_state(self) -> dict[str, Any]:
        return {}


class GECOObjective:
    """GECO: the likelihood scaled by the multiplier ``lambda`` of :class:`~pyroseg.geco.GECO`,
    which moves after every applied step by the step's reconstruction error."""

    def __init__(self, geco: GECO):
        self.geco = geco

    @property
    def recon_scale(self) -> float:
        return self.geco.recon_scale

    def step_context(self):
        """GECO's likelihood messenger (its top-k mask); it measures the step's ``recon``."""
        return self.geco.likelihood()

    def after_step(self, outcome: StepOutcome, likelihood: Any, reduce=None) -> None:
        """Move lambda by ``C`` of the step, when the step was applied. ``reduce``: the
        trainer's mean over ranks (``None``: one process), so that ``C`` is the
        global batch's and GECO's state stays identical on every rank."""
        if outcome.applied:
            recon = likelihood.recon if reduce is None else reduce(likelihood.recon)
            self.geco.update(float(recon), likelihood.pixels_per_image)  # nats per image over the terms lambda scales

    def log_row(self) -> dict[str, float]:
        return self.geco.log_row()

    def checkpoint_entries(self) -> dict[str, Any]:
        return {"geco": self.geco.state_dict()}

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.geco.load_state_dict(ckpt["geco"])

    def config_entries(self, config: FitConfig) -> dict[str, Any]:
        return {"geco": {"kappa": self.geco.kappa, "kappa_from": "auto" if config.geco_kappa is None else "--geco-kappa",
                         "warmup_steps": self.geco.warmup_steps}}

    def rank_state(self) -> dict[str, Any]:
        return {"GECO's state": repr(sorted(self.geco.state_dict().items()))}

    def state_dict(self) -> dict:
        return self.geco.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.geco.load_state_dict(state)


Objective = ELBOObjective | GECOObjective


def check_model(config: FitConfig, model) -> None:
    """Refuse a model the objective cannot train (GECO: a model without a KL term)."""
    if config.objective == "geco":
        refuse_without_kl(model)


def make_objective(config: FitConfig, train_masks: np.ndarray, steps_per_epoch: int) -> Objective:
    """The objective of ``config.objective``. ``train_masks``: the training masks
    (GECO's automatic ``kappa``), ``steps_per_epoch``: its warm-up in steps."""
    if config.objective == "geco":
        return GECOObjective(geco_from_config(config, train_masks, steps_per_epoch))
    return ELBOObjective()
