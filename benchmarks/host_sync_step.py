"""pyroseg's earlier training step, which waits for the host: the benchmarks' "before".

:class:`HostSyncTrainer` is :class:`pyroseg.train.Trainer` with the loop Adam and
the step of commit d8a998a: the gradient norm and the loss read back to the host
(``float(...)``: two waits for a GPU per step), the non-finite decision taken on
the host, the counters host integers. Same networks, loss and Adam as the
Trainer, so "before / after" figures measure only what keeping the step on the
device (no host reads, the non-finite guard on the device) changed in the step
(the fit loop's own per-step reads are not part of it).
"""

from __future__ import annotations

import math

import pyro
import torch

from pyroseg.errors import TrainingError
from pyroseg.train import StepOutcome, Trainer

__all__ = ["HostSyncTrainer"]


class HostSyncTrainer(Trainer):
    def __init__(self, model, **kw):
        kw["fused_adam"] = False
        super().__init__(model, **kw)
        self.host_streak = 0

    def step(self, image, mask, *, beta=1.0, recon_scale=1.0) -> StepOutcome:
        self.optimizer.zero_grad(set_to_none=True)
        with pyro.validation_enabled(self.validate):
            loss = self.loss_fn(image, mask, beta, recon_scale)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.clip_norm if self.clip_norm is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        value = float(loss.detach() if self.reduce is None else self.reduce(loss.detach()))
        applied = math.isfinite(value) and math.isfinite(grad_norm)
        if applied:
            self.optimizer.step()
            self.host_streak = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.host_streak += 1
            if self.host_streak >= self.max_nonfinite:
                raise TrainingError(f"{self.host_streak} non-finite steps in a row")
        return StepOutcome(torch.tensor(value), torch.tensor(grad_norm), torch.tensor(applied), self.elbo_loss.last_terms)
