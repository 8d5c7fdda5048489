"""Where training stands: the position a checkpoint restores, the epoch's running
loss, and the shuffle that can start mid-epoch. Re-exported by :mod:`pyroseg.train`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from pyroseg.training.step import StepOutcome

__all__ = ["EpochSampler", "LossMeter", "Progress", "fresh_partial"]


def fresh_partial() -> dict[str, float]:
    """An epoch's sums before its first step (see :class:`Progress`)."""
    return {"loss_sum": 0.0, "count": 0, "train_time": 0.0, "data_time": 0.0}


@dataclass
class Progress:
    """Where training stands: with the weights, the optimizer and the RNG states,
    all a checkpoint restores for the remaining steps to be those of an unbroken
    run. ``partial``: the current epoch's sums so far (loss over images, their
    count, training seconds, of which waiting for data). ``best``: the epoch of
    best.pt and its score (``{"metric", "value", "epoch"}``), ``None`` before
    the first scored epoch."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    partial: dict[str, float] = field(default_factory=fresh_partial)
    best: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "global_step": self.global_step,
                "history": self.history, "partial": self.partial, "best": self.best}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.epoch, self.batch_in_epoch, self.global_step = int(ckpt["epoch"]), int(ckpt["batch_in_epoch"]), int(ckpt["global_step"])
        self.history = list(ckpt["history"])
        self.partial = {**fresh_partial(), **ckpt.get("partial", {})}
        self.best = ckpt.get("best")


class LossMeter:
    """The epoch's ``loss x images`` sum and image count over the applied steps,
    kept on the device (float64, int64) so that a step reads nothing back;
    ``fold`` writes them into :attr:`Progress.partial` (host numbers) at a checkpoint
    or an epoch end. Started from ``partial``'s values and summed in the same
    order in float64, so the figures are those of a host sum, bit for bit."""

    def __init__(self, partial: dict, device: torch.device):
        self.sum = torch.tensor(float(partial["loss_sum"]), dtype=torch.float64, device=device)
        self.count = torch.tensor(int(partial["count"]), dtype=torch.long, device=device)

    def add(self, outcome: StepOutcome, images: int) -> None:
        applied = outcome.applied_tensor
        self.sum.add_(torch.where(applied, outcome.loss_tensor.double() * images, 0.0))
        self.count.add_(applied.long() * images)

    def fold(self, partial: dict) -> None:
        partial["loss_sum"], partial["count"] = float(self.sum), int(self.count)


class EpochSampler(DistributedSampler):
    """A shuffle that depends only on ``(seed, epoch)``, sharded over ranks, able
    to start mid-epoch (``skip`` batches' worth of indices) for an exact resume.

    With one rank it is a plain per-epoch reshuffle; with ``R`` ranks, rank ``r``
    takes every ``R``-th index, so the union of the ranks' ``i``-th batches is
    the single-process ``i``-th batch of ``R`` times the size.
    """

    def __init__(self, dataset, *, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.skip = 0

    def set_position(self, epoch: int, skip: int = 0) -> None:
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip :])

    def __len__(self) -> int:
        return super().__len__() - self.skip
