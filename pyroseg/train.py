"""Training: stochastic variational inference with Pyro's ELBO, one loop for every model.

The objective of every model is the negative ELBO of its ``model``/``guide``
pair, per image::

    loss = E_q[-recon_scale * log p(y | x, z)] + beta * KL(q(z | ...) || p(z | ...))

computed by :class:`pyroseg.objective.SiteELBO`, Pyro's
:class:`~pyro.infer.TraceMeanField_ELBO` (analytic KL per latent site, given the
sites sampled before it; valid here because every guide samples its latents in
the model's order) or :class:`~pyro.infer.Trace_ELBO` (Monte Carlo KL) written
out site by site, so that a free-bits floor can act on each site's KL and the
terms of the same forward pass come back with the loss. ``beta`` enters
through ``poutine.scale`` on the latent sites inside the models, ``recon_scale``
through ``poutine.scale`` on the likelihood: with ``--objective geco`` it is the
Lagrange multiplier of :mod:`pyroseg.geco`, so one loop serves the ELBO, the
annealed ELBO and GECO.

One SVI step is what :meth:`pyro.infer.SVI.step` does (loss, backward,
optimizer step), written out so that three things can sit between backward and
step: a check that loss and gradients are finite (a non-finite step is skipped
and counted), gradient-norm clipping over *all* parameters (``pyro.optim``
clips per tensor), and data-parallel gradient averaging (the loss is an
``nn.Module`` that :class:`~torch.nn.parallel.DistributedDataParallel` can
wrap). The optimizer is a plain :class:`torch.optim.Adam` over the model's
parameters, so the tensors being optimised are always the ones the networks
use (a stale Pyro param store cannot silently swallow updates) and its state
is an ordinary ``state_dict`` for checkpoints. ``tests/test_train.py`` checks
that a step equals ``pyro.infer.SVI`` + ``pyro.optim.Adam`` numerically.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from pyroseg import distributed
from pyroseg.augment import SPECS, augment_batch, step_generator
from pyroseg.checkpoint import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state
from pyroseg.collapse import collapse_report, latent_units
from pyroseg.config import CONFIG_VERSION, FitConfig, load_config_json, versions
from pyroseg.data import SegData, SegDataset, collate_batch, load_source, split_patients
from pyroseg.data.device import on_device
from pyroseg.devices import resolve_device
from pyroseg.errors import CheckpointError, TrainingError, UsageError
from pyroseg.geco import GECO, geco_from_config, refuse_without_kl
from pyroseg.metrics import segmentation_report
from pyroseg.models import SegModel, build_model, model_import_path
from pyroseg.nets import compile_networks
from pyroseg.objective import SiteELBO
from pyroseg.predict import predict_dataset
from pyroseg.runs import (
    BEST,
    CHECKPOINT,
    CONFIG,
    METRICS,
    SPLIT,
    check_checkpoint,
    clear_run_files,
    load_weights,
    prepare_run_dir,
    write_json,
    write_metrics_csv,
)
from pyroseg.schedules import beta_at, lr_at

__all__ = [
    "ELBOLoss", "Trainer", "StepOutcome", "EpochSampler", "FitCallbacks", "FitRun", "Progress", "fit", "make_loader",
    "resolve_device", "make_elbo", "select_metric",
]

log = logging.getLogger(__name__)


def make_elbo(kind: str, *, free_bits: float = 0.0) -> SiteELBO:
    """The objective of :mod:`pyroseg.objective`: ``"meanfield"``: analytic KL per site
    (as :class:`~pyro.infer.TraceMeanField_ELBO`); ``"trace"``: Monte Carlo KL (as
    :class:`~pyro.infer.Trace_ELBO`); ``free_bits``: a floor in nats on each latent
    site's batch-mean KL (0: off)."""
    if kind not in ("meanfield", "trace"):
        raise UsageError(f"--elbo {kind!r}: expected meanfield or trace")
    return SiteELBO(analytic_kl=kind == "meanfield", free_bits=free_bits)


class ELBOLoss(nn.Module):
    """The training objective as a module: ``forward(image, mask, beta, recon_scale)``
    returns the mean negative ELBO per image (a scalar tensor).

    A module so that DistributedDataParallel can wrap it; per image (not per
    batch) so that averaging gradients over ranks gives the gradient of the
    global batch. After each call ``last_terms`` holds the batch means of the
    unscaled terms of that same pass (``recon``, ``kl_<site>``: detached 0-dim
    tensors; see :class:`~pyroseg.objective.SiteELBO`).
    """

    def __init__(self, model: SegModel, elbo: SiteELBO):
        super().__init__()
        self.seg = model
        self.elbo = elbo
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, image: torch.Tensor, mask: torch.Tensor, beta: float = 1.0, recon_scale: float = 1.0) -> torch.Tensor:
        loss, terms = self.elbo.differentiable_loss_and_terms(
            self.seg.model, self.seg.guide, image, mask, beta=beta, recon_scale=recon_scale
        )
        self.last_terms = {k: v.mean() for k, v in terms.items()}
        return loss / image.shape[0]


class StepOutcome:
    """What one step did, kept on the device until someone asks.

    ``loss`` (the mean negative ELBO per image, of the global batch under DDP),
    ``grad_norm`` (before clipping) and ``applied`` (loss and gradients were
    finite, so the update was taken) are read back from the device when they are
    read, which waits for the step to finish: the training loop reads none of
    them per step (it uses ``loss_tensor`` and ``applied_tensor``, 0-dim tensors
    on the model's device). ``terms``: batch means of the step's unscaled
    ``recon`` and ``kl_<site>`` (0-dim tensors; empty for a step that failed
    before a loss existed)."""

    __slots__ = ("loss_tensor", "grad_norm_tensor", "applied_tensor", "terms")

    def __init__(self, loss: torch.Tensor, grad_norm: torch.Tensor, applied: torch.Tensor, terms: dict | None = None):
        self.loss_tensor = loss
        self.grad_norm_tensor = grad_norm
        self.applied_tensor = applied
        self.terms = terms if terms is not None else {}

    @property
    def loss(self) -> float:
        return float(self.loss_tensor)

    @property
    def grad_norm(self) -> float:
        return float(self.grad_norm_tensor)

    @property
    def applied(self) -> bool:
        return bool(self.applied_tensor)

    def __repr__(self) -> str:
        return f"StepOutcome(loss={self.loss}, grad_norm={self.grad_norm}, applied={self.applied})"


class Trainer:
    """One SVI step at a time, with the guards described in the module docs.

    **The non-finite guard takes no host decision per step.** Whether a step's
    loss and gradient norm are finite is a boolean tensor on the model's device;
    the update is masked by it on the device, and the counters of non-finite
    steps (total, current run, longest run since the last check) are device
    tensors too. With fused Adam (the default on a GPU) the mask is Adam's own
    ``found_inf`` input, the one :class:`torch.amp.GradScaler` uses: the fused
    kernel leaves weights, moments and step count untouched when it is set. With
    the loop Adam (the default on CPU, where it matches ``pyro.optim.Adam`` to
    1e-6) the update is taken or not on the host, which on a CPU costs nothing.
    :meth:`check` reads the counters back (one wait for the device), logs the
    skipped steps and raises :class:`TrainingError` if ``max_nonfinite`` were in
    a row; it runs every ``check_every`` steps (default: every step on CPU, every
    50 on a GPU) and whenever the counters are read (``fit`` reads them before
    every checkpoint and at every epoch end). So on a GPU training stops at most
    ``check_every - 1`` steps after the run of non-finite steps reached the
    limit, and never writes a checkpoint after it.
    """

    def __init__(
        self,
        model: SegModel,
        *,
        lr: float = 1e-3,
        elbo: str = "meanfield",
        clip_norm: float | None = None,
        max_nonfinite: int = 20,
        validate: bool = False,
        free_bits: float = 0.0,
        fused_adam: bool | None = None,
        compile: bool = False,
        check_every: int | None = None,
    ):
        """``validate``: Pyro/torch argument checks during training steps (off by
        default: they cost time every step and the guard catches what they would).
        ``free_bits``: the floor of :func:`pyroseg.objective.free_bits` (0: off).
        ``fused_adam``: one fused Adam kernel for all parameters instead of a loop
        over them; ``None`` (default): fused on a GPU, the loop on CPU. On CPU the
        fused optimizer step is 3-10x faster, but that is about 1 % of a training
        step, and its updates differ from ``pyro.optim.Adam``'s by up to ~3e-6
        where gradients are near Adam's eps (measured; see the benchmark's options
        item); on a GPU it is what lets the non-finite guard skip an update
        without a host sync. ``compile``: ``torch.compile``
        the model's networks in place (:func:`pyroseg.nets.compile_networks`).
        Experimental and off: on CPU it compiled for 2 minutes and then stepped
        0.84x as fast as eager (benchmarks/, options item). ``check_every``: read
        the non-finite counters back every that many steps (``None``: 1 on CPU,
        50 on a GPU; see the class docs)."""
        self.model = model
        self.validate = validate
        self.elbo_loss = ELBOLoss(model, make_elbo(elbo, free_bits=free_bits))
        #: what a step calls: ``elbo_loss`` itself, or a wrapper of it (DDP, autocast)
        self.loss_fn: nn.Module = self.elbo_loss
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        on_gpu = device.type != "cpu"
        if fused_adam is None:
            fused_adam = on_gpu
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True if fused_adam else None)
        self.fused = bool(fused_adam)
        if compile:
            compile_networks(model)
        self.clip_norm = clip_norm
        self.max_nonfinite = max_nonfinite
        if check_every is not None and check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.check_every = check_every if check_every is not None else (50 if on_gpu else 1)
        self.device = device
        # device-side counters (int64, 0-dim): see check()
        self._streak = torch.zeros((), dtype=torch.long, device=device)
        self._total = torch.zeros((), dtype=torch.long, device=device)
        self._worst = torch.zeros((), dtype=torch.long, device=device)  # longest run since the last check
        self._checked_total = 0  # host copy of _total at the last check
        self._since_check = 0
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # the last step's loss and grad norm (for the log)
        #: Data-parallel hook: the mean over ranks of a tensor (``None``: one
        #: process). Set by ``fit`` with ``loss_fn`` wrapped in DDP; the loss
        #: reported and the non-finite decision then use the global batch's
        #: loss, so every rank skips the same steps. Any other training state
        #: (GECO) must update from values passed through it.
        self.reduce = None

    def step(self, image: torch.Tensor, mask: torch.Tensor, *, beta: float = 1.0, recon_scale: float = 1.0) -> StepOutcome:
        """Loss, backward, (guard, clip), optimizer step, with no host sync of its
        own unless a check is due (see the class docs). A non-finite loss or
        gradient skips the update; ``max_nonfinite`` of them in a row raise
        :class:`TrainingError` (at the next check)."""
        self.optimizer.zero_grad(set_to_none=True)
        try:
            with pyro.validation_enabled(self.validate):
                loss = self.loss_fn(image, mask, beta, recon_scale)
        except ValueError as e:
            # with validation on, a NaN/inf parameter fails a distribution's
            # constraint check before any loss exists: the same event as a NaN loss
            if "invalid values" not in str(e):
                raise
            device = image.device
            nan = torch.full((), float("nan"), device=device)
            return self._finish(nan, nan, torch.zeros((), dtype=torch.bool, device=device), {})
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        if not grads:
            grad_norm = torch.zeros((), device=loss.device)
        elif self.clip_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip_norm)
        else:  # the norm only: clip_grad_norm_ with max_norm = inf multiplies every gradient by 1
            grad_norm = torch.nn.utils.get_total_norm(grads)
        value = loss.detach() if self.reduce is None else self.reduce(loss.detach())
        finite = torch.isfinite(value) & torch.isfinite(grad_norm)
        if self.fused:  # the fused kernel skips weights, moments and step count where found_inf is 1
            self.optimizer.found_inf = (~finite).to(torch.float32)
            self.optimizer.step()
            del self.optimizer.found_inf  # a later step() of this optimizer must not see a stale one
        elif bool(finite):  # the loop Adam has no found_inf: a host decision (free on CPU, a sync on a GPU)
            self.optimizer.step()
        return self._finish(value, grad_norm, finite, self.elbo_loss.last_terms)

    def _finish(self, value: torch.Tensor, grad_norm: torch.Tensor, finite: torch.Tensor, terms: dict) -> StepOutcome:
        """Count the step on the device; check the counters when due."""
        if finite.device != self._streak.device:  # the model was moved after the trainer was made
            self.device = finite.device
            self._streak, self._total, self._worst = (t.to(finite.device) for t in (self._streak, self._total, self._worst))
        bad = (~finite).to(torch.long)
        self._streak.add_(1).mul_(bad)  # +1 on a non-finite step, 0 on a good one
        self._total.add_(bad)
        torch.maximum(self._worst, self._streak, out=self._worst)
        self._last = (value, grad_norm)
        self._since_check += 1
        if self._since_check >= self.check_every:
            self.check()
        return StepOutcome(value, grad_norm, finite, terms)

    def check(self) -> None:
        """Read the non-finite counters back (one wait for the device), log the
        steps skipped since the last check and raise :class:`TrainingError` if
        ``max_nonfinite`` or more were in a row."""
        self._since_check = 0
        streak, total, worst = (int(v) for v in torch.stack([self._streak, self._total, self._worst]).tolist())
        new = total - self._checked_total
        self._checked_total = total
        self._worst.copy_(self._streak)
        if new:
            if self.check_every == 1 and self._last is not None:
                value, grad_norm = (float(v) for v in self._last)
                log.warning("non-finite loss or gradient (loss=%s, grad norm=%s): step skipped (%d in a row)",
                            value, grad_norm, streak)
            else:
                log.warning("non-finite loss or gradient in %d of the steps since the last check: skipped "
                            "(%d in a row now, at most %d in a row)", new, streak, worst)
        if worst >= self.max_nonfinite:
            value = float(self._last[0]) if self._last is not None else float("nan")
            raise TrainingError(
                f"{worst} non-finite steps in a row (loss={value}, --max-nonfinite {self.max_nonfinite}): "
                "training stopped; the last good checkpoint is intact. Try a lower --lr or --clip-norm."
            )

    def _align_optimizer(self) -> None:
        """After loading a state saved by a trainer with the other Adam (a CPU
        checkpoint resumed on a GPU, or back): this trainer's kind, and Adam's step
        counters where that kind keeps them (fused: on the parameters' device;
        loop: on the CPU)."""
        for group in self.optimizer.param_groups:
            group["fused"] = True if self.fused else None
            if self.fused:
                group["foreach"] = None
            for p in group["params"]:
                st = self.optimizer.state.get(p)
                if st and "step" in st:
                    st["step"] = st["step"].to(dtype=torch.float32, device=p.device if self.fused else "cpu")

    @property
    def nonfinite_streak(self) -> int:
        """Non-finite steps in a row up to now (reads the device counter)."""
        return int(self._streak)

    @property
    def nonfinite_total(self) -> int:
        """Non-finite steps so far (reads the device counter)."""
        return int(self._total)

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "nonfinite_streak": self.nonfinite_streak,
            "nonfinite_total": self.nonfinite_total,
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self._align_optimizer()
        streak, total = int(state.get("nonfinite_streak", 0)), int(state.get("nonfinite_total", 0))
        self._streak.fill_(streak)
        self._total.fill_(total)
        self._worst.fill_(streak)
        self._checked_total = total


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


class FitCallbacks:
    """Hooks the CLI uses for progress bars; the library itself never prints."""

    def on_load_progress(self, done: int, total: int) -> None: ...

    def on_data(self, summary: dict) -> None: ...

    def on_epoch_start(self, epoch: int, epochs: int, num_batches: int) -> None: ...

    def on_step(self, loss: torch.Tensor) -> None: ...  # 0-dim, on the device: reading it waits for the step

    def on_epoch_end(self, row: dict) -> None: ...

    def on_early_stop(self, epoch: int, best: dict) -> None: ...


def _validate(model: SegModel, data: SegData, cfg: FitConfig, device: torch.device) -> dict[str, float]:
    """Validation ELBO terms (beta = 1), Dice of the mean of ``val_samples`` samples,
    on data with several annotators the GED of ``max(val_samples, 2)`` samples against
    them all, and the collapse diagnostics of every latent site (:mod:`pyroseg.collapse`)."""
    if len(data) == 0:
        return {}
    pred = predict_dataset(model, data, num_samples=cfg.val_samples, batch_size=max(cfg.batch_size, 32), device=device)
    row = {f"val_{k if k != 'loss' else 'loss'}": float(np.mean(v)) for k, v in pred.terms.items()}
    rep = segmentation_report(torch.from_numpy(pred.mean), torch.from_numpy(data.masks[:, 0]), data.patients)
    row["val_dice_all"] = rep["dice_all"]
    row["val_dice_tumour"] = rep["dice_tumour"]
    if data.num_annotators > 1:  # samples against every annotator: what --select-by auto picks on such data
        dist = predict_dataset(model, data, num_samples=max(cfg.val_samples, 2), batch_size=max(cfg.batch_size, 32),
                               device=device, with_terms=False, distribution=True).distribution
        row["val_ged"] = float(np.mean(dist["ged"]))
    if cfg.collapse_diagnostics:
        diag = collapse_report(model, data, num_samples=cfg.val_samples, batch_size=max(cfg.batch_size, 32), device=device,
                               max_slices=cfg.collapse_slices or None)  # a fixed subset: on all slices it outweighed training
        row.update({f"val_{k}": v for k, v in diag.items() if not k.startswith("units_")})
    return row


def _model_doc(model: SegModel) -> dict:
    return {
        "name": model.name,
        "hparams": model.hparams(),
        "num_params": model.num_params,
        "latent_sites": list(model.latent_sites),
        "latent_units": latent_units(model),
        "sample_from": model.sample_from,
        # a model from outside pyroseg: where evaluate / sample / --resume import it from
        **({"import_path": path} if (path := model_import_path(model)) else {}),
    }


def fit(
    config: FitConfig,
    *,
    callbacks: FitCallbacks | None = None,
    resume: bool = False,
    overwrite: bool = False,
    checkpoint_every: int | None = None,
    pictures: bool = True,
) -> Path:
    """Train ``config.model`` on ``config.data`` and write the run folder ``config.out``.

    With ``resume=True`` the run in ``config.out`` continues from its checkpoint
    (its saved config is used; only ``epochs`` may be raised). ``checkpoint_every``
    also checkpoints every that many steps; ``pictures=False`` skips the PNGs.
    Returns the run folder.

    The phases, in order (each a method of :class:`FitRun`, the one place of its concern)::

        prepare        config (the saved one on resume), process group, run folder
        build_model    seeded weights, channels-last
        load_data      source, patient split, cross-rank data check
        build_trainer  optimizer (+ DDP), sampler and loader, GECO, augmentation, best.pt's score
        restore/start  the checkpoint's state, or a fresh config.json and split.json
        train          the epoch loop: batches (augmented), learning rate, steps, validation,
                       best.pt, checkpoints, metrics.csv, early stop
        finish         metrics.csv, pictures, leave the process group
    """
    run = FitRun.prepare(config, callbacks, resume=resume, overwrite=overwrite)
    run.build_model()
    run.load_data()
    run.build_trainer()
    if resume:
        run.restore()
    else:
        run.start(overwrite=overwrite)
    run.train(checkpoint_every=checkpoint_every)
    run.finish(pictures=pictures)
    return run.out


def _fresh_partial() -> dict[str, float]:
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
    partial: dict[str, float] = field(default_factory=_fresh_partial)
    best: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "global_step": self.global_step,
                "history": self.history, "partial": self.partial, "best": self.best}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.epoch, self.batch_in_epoch, self.global_step = int(ckpt["epoch"]), int(ckpt["batch_in_epoch"]), int(ckpt["global_step"])
        self.history = list(ckpt["history"])
        self.partial = {**_fresh_partial(), **ckpt.get("partial", {})}
        self.best = ckpt.get("best")


def make_loader(train_data: SegData, config: FitConfig, local_batch: int, ctx: distributed.DistContext) -> tuple[EpochSampler, DataLoader]:
    """The training batches: a random annotator per slice, shuffled by (seed, epoch),
    sharded over ranks. Returns the sampler (to position it) and the loader."""
    dataset = SegDataset(train_data, random_annotator=True)
    sampler = EpochSampler(dataset, seed=config.train_seed, num_replicas=ctx.world_size, rank=ctx.rank)
    # its own generator: starting an iterator draws a seed from it, and drawing from the global RNG
    # instead would make a mid-epoch resume (a new iterator) shift every later draw
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, collate_fn=collate_batch,
                        generator=torch.Generator().manual_seed(config.train_seed), pin_memory=ctx.device.type == "cuda")
    loader = on_device(loader, ctx.device, config.data_on_device)  # --data-on-device: the same batches, made on the device
    return sampler, loader


#: The validation columns ``--select-by`` may name, and whether higher is better.
SELECT_MODES = {"val_dice_tumour": "max", "val_dice_all": "max", "val_loss": "min", "val_ged": "min"}


def select_metric(select_by: str, num_annotators: int) -> tuple[str, str]:
    """The validation column that picks best.pt and ``"max"`` or ``"min"``. ``auto``:
    tumour-slice Dice on data with one annotator; on data with several, the
    generalised energy distance of the samples to all of them (a Dice against
    the first annotator would reward ignoring the others)."""
    if select_by == "auto":
        select_by = "val_ged" if num_annotators > 1 else "val_dice_tumour"
    if select_by not in SELECT_MODES:
        raise UsageError(f"--select-by {select_by!r}: expected auto or one of {', '.join(SELECT_MODES)}")
    if select_by == "val_ged" and num_annotators < 2:
        raise UsageError("--select-by val_ged: needs data with several annotators; this data has one (use val_dice_tumour)")
    return select_by, SELECT_MODES[select_by]


class FitRun:
    """One call of :func:`fit`, phase by phase. Each attribute belongs to the
    phase that sets it; later phases only read it."""

    # -- prepare: the config, the process group, the run folder ------------------------------------
    @classmethod
    def prepare(cls, config: FitConfig, callbacks: FitCallbacks | None, *, resume: bool, overwrite: bool) -> FitRun:
        """Resolve the config (on resume: the saved one, ``epochs`` may rise), join
        the process group (one process unless torchrun started us) and make sure
        the run folder can be written (rank 0 alone writes it)."""
        run = cls()
        run.cb = callbacks or FitCallbacks()
        run.doc = None
        if resume:  # reads only, so every process of a data-parallel run does it
            run.out = prepare_run_dir(config.out, resume=resume, overwrite=overwrite)
            run.doc = load_config_json(run.out / CONFIG)
            saved = FitConfig.from_dict(run.doc["fit"])
            config = replace(saved, epochs=max(config.epochs, saved.epochs) if config.epochs else saved.epochs, out=str(run.out))
        run.config = config.validate()
        run.ctx = ctx = distributed.setup(resolve_device(config.device))
        run.device, run.local_batch = ctx.device, _local_batch(config.batch_size, ctx.world_size)
        if not resume:
            run.out = ctx.on_main(lambda: prepare_run_dir(config.out, resume=resume, overwrite=overwrite))
        if not ctx.is_main:
            run.cb = FitCallbacks()
        run.progress = Progress()
        return run

    # -- build_model --------------------------------------------------------------------------------
    def build_model(self, in_channels: int | None = None) -> None:
        """The model, its weights drawn from ``config.seed`` (before the data is read: a
        bad ``--model-arg`` fails at once). ``in_channels``: the data's channels
        (None: the models' default, 3); :meth:`load_data` rebuilds the model with
        them when the data has another count (QUBIQ, LIDC: 1)."""
        cfg = self.config
        pyro.clear_param_store()  # a stale store would shadow freshly built networks
        pyro.set_rng_seed(cfg.train_seed)  # torch, numpy and random
        channels = {} if in_channels is None else {"in_channels": in_channels}
        model = build_model(cfg.model, image_size=cfg.image_size, widths=cfg.widths, **{**channels, **cfg.model_args}).to(self.device)
        if cfg.objective == "geco":
            refuse_without_kl(model)
        if cfg.channels_last:  # measured 1.2-1.27x faster training steps on CPU (benchmarks/, options item)
            model = model.to(memory_format=torch.channels_last)
        self.model = model

    # -- load_data ----------------------------------------------------------------------------------
    def load_data(self) -> None:
        """The data source, split by patient into train / val / test; every rank must hold the same."""
        cfg, ctx = self.config, self.ctx
        self.data = ctx.main_first(lambda: load_source(  # rank 0 first: it fills the cache the others read
            cfg.data,
            cfg.image_size,
            seed=cfg.seed_of_data(),
            synthetic_patients=cfg.synthetic_patients,
            synthetic_slices=cfg.synthetic_slices,
            cache_dir=cfg.cache_dir,
            progress=self.cb.on_load_progress,
            task=cfg.task,
            slice_axis=cfg.slice_axis,
        ))
        channels = int(self.data.images.shape[1])
        if channels != self.model.in_channels and "in_channels" not in cfg.model_args:
            self.build_model(in_channels=channels)  # in_channels follows the data; same seed, same draws
        split = split_patients(self.data.patient_ids, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed_of_data())
        self.split = split
        self.train_data, self.val_data = self.data.subset(split["train"]), self.data.subset(split["val"])
        self.cb.on_data({**self.data.summary(), "train_slices": len(self.train_data), "val_slices": len(self.val_data),
                         "train_patients": len(split["train"]), "val_patients": len(split["val"]), "test_patients": len(split["test"])})
        ctx.check_consistent(lambda: _data_fingerprint(self.train_data, self.val_data),
                             what="after loading --data", hint="every process must read the same data (shared storage, same files)")

    # -- build_trainer ------------------------------------------------------------------------------
    def build_trainer(self) -> None:
        """The optimizer and its guards (wrapped for data parallelism), the batches, GECO,
        the augmentation and the score that picks best.pt."""
        cfg, ctx = self.config, self.ctx
        self.trainer = trainer = Trainer(self.model, lr=cfg.lr, elbo=cfg.elbo, clip_norm=cfg.clip_norm,
                                         max_nonfinite=cfg.max_nonfinite, free_bits=cfg.free_bits)
        if ctx.enabled:  # DDP averages gradients in backward; beta = 0 leaves a prior net unused
            trainer.loss_fn = ctx.wrap(trainer.loss_fn, find_unused_parameters=self.model.has_latent)
            trainer.reduce = ctx.mean
        self.sampler, self.loader = make_loader(self.train_data, cfg, self.local_batch, ctx)
        self.steps_per_epoch = math.ceil(self.sampler.num_samples / self.local_batch)
        real_masks = self.train_data.masks if self.train_data.uniform_raters else self.train_data.masks[self.train_data.rater_valid()]
        self.geco: GECO | None = (geco_from_config(cfg, real_masks, self.steps_per_epoch)  # no padded rater slots
                                  if cfg.objective == "geco" else None)
        self.augment = SPECS[cfg.augment]
        self.select_by, self.select_mode = select_metric(cfg.select_by, self.data.num_annotators)

    # -- restore / start ----------------------------------------------------------------------------
    def restore(self) -> None:
        """Continue from ``checkpoint.pt``: weights, optimizer, position, history, RNG
        states, GECO. A run killed before its first checkpoint starts again."""
        out, ctx, doc = self.out, self.ctx, self.doc
        if (out / CHECKPOINT).exists():
            ckpt = load_checkpoint(out / CHECKPOINT, map_location=self.device)
            check_checkpoint(ckpt, doc, source=out / CHECKPOINT)  # another model, size or run: refused, naming what differs
            load_weights(self.model, ckpt, source=out / CHECKPOINT)
            try:
                self.trainer.load_state_dict(ckpt["trainer"])
                self.progress.load_state_dict(ckpt)
                _restore_rng(ckpt, ctx, self.config.train_seed, self.progress.global_step)
                if self.geco is not None:
                    self.geco.load_state_dict(ckpt["geco"])
            except (KeyError, ValueError, TypeError, RuntimeError) as e:
                raise CheckpointError(f"{out / CHECKPOINT}: incomplete training state ({type(e).__name__}: {e})") from None
            p = self.progress
            doc.setdefault("resumed", []).append({"at_epoch": p.epoch, "at_batch": p.batch_in_epoch, "time": _now(),
                                                  **({"world_size": ctx.world_size} if ctx.enabled else {})})
            log.info("resuming %s at epoch %d, batch %d", out, p.epoch, p.batch_in_epoch)
        else:  # killed before its first checkpoint: start again, with the saved config
            log.warning("%s has no checkpoint yet (stopped during its first epoch): starting it from the beginning", out)
            doc.setdefault("resumed", []).append({"at_epoch": 0, "at_batch": 0, "time": _now()})
            ctx.seed(self.config.train_seed)  # as for a new run: each rank its own z noise
        if ctx.is_main:
            write_json(out / CONFIG, doc)

    def start(self, *, overwrite: bool) -> None:
        """A new run: clear what ``--overwrite`` replaces, write config.json and split.json."""
        cfg, ctx, out = self.config, self.ctx, self.out
        if overwrite and ctx.is_main:  # only now: a bad --data or --model-arg must not cost the previous run
            clear_run_files(out)
        doc = {
            "config_version": CONFIG_VERSION,
            "fit": cfg.to_dict(),
            "model": _model_doc(self.model),
            "data": self.data.summary(),
            "device": str(self.device),
            "versions": versions(),
            "command": sys.argv,
            "created": _now(),
        }
        if ctx.enabled:
            doc["distributed"] = {**ctx.describe(), "batch_per_process": self.local_batch}
        if self.geco is not None:
            doc["geco"] = {"kappa": self.geco.kappa, "kappa_from": "auto" if cfg.geco_kappa is None else "--geco-kappa",
                           "warmup_steps": self.geco.warmup_steps}
        self.doc = doc
        ctx.seed(cfg.train_seed)  # after the model is built: each rank its own z noise
        if ctx.is_main:
            write_json(out / SPLIT, {"seed": cfg.seed_of_data(), "val_fraction": cfg.val_fraction,
                                     "test_fraction": cfg.test_fraction, **self.split})
            write_json(out / CONFIG, doc)

    # -- train: the epoch loop ----------------------------------------------------------------------
    def train(self, *, checkpoint_every: int | None = None) -> None:
        """Epochs until ``config.epochs``: steps (checkpointing every
        ``checkpoint_every`` steps within an epoch), then :meth:`end_epoch`."""
        self.model.train()
        while self.progress.epoch < self.config.epochs and not self.out_of_patience():
            self.train_epoch(checkpoint_every)
            self.end_epoch()
        if self.progress.epoch < self.config.epochs:  # out of patience
            best = self.progress.best or {}
            log.info("stopped after epoch %d: %s has not improved for %d epochs (best %s at epoch %s)", self.progress.epoch,
                     self.select_by, self.config.patience, best.get("value"), best.get("epoch"))
            self.cb.on_early_stop(self.progress.epoch, best)

    def out_of_patience(self) -> bool:
        """``--patience`` epochs since the best one (or since the start, before any
        score): a function of the saved progress, so a resumed run stops where an unbroken one did."""
        patience, p = self.config.patience, self.progress
        return patience is not None and p.epoch - (p.best["epoch"] if p.best else 0) >= patience

    def train_epoch(self, checkpoint_every: int | None) -> None:
        """The remaining steps of the current epoch (all of them, or those after a mid-epoch checkpoint)."""
        cfg, p, trainer, geco = self.config, self.progress, self.trainer, self.geco
        self.sampler.set_position(p.epoch, skip=p.batch_in_epoch * self.local_batch)
        self.cb.on_epoch_start(p.epoch, cfg.epochs, self.steps_per_epoch - p.batch_in_epoch)
        meter = _LossMeter(p.partial, self.device)  # the epoch's loss, summed on the device
        t0 = time.perf_counter()
        batches = iter(self.loader)
        while True:
            t_data = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            image, mask = self.batch_on_device(batch)
            p.partial["data_time"] += time.perf_counter() - t_data
            progress = p.epoch + p.batch_in_epoch / self.steps_per_epoch
            beta = beta_at(progress, beta=cfg.beta, warmup=cfg.beta_warmup, cycle=cfg.beta_cycle)
            self.set_lr(progress)
            likelihood = geco.likelihood() if geco is not None else contextlib.nullcontext()  # GECO's top-k mask
            with likelihood:
                outcome = trainer.step(image, mask, beta=beta, recon_scale=geco.recon_scale if geco else 1.0)
            if geco is not None and outcome.applied:  # C of the global batch: identical on every rank
                recon = likelihood.recon if trainer.reduce is None else trainer.reduce(likelihood.recon)
                geco.update(float(recon), likelihood.pixels_per_image)  # nats per image over the terms lambda scales
            meter.add(outcome, image.shape[0] * self.ctx.world_size)  # the loss is the global batch's: every rank's images
            p.batch_in_epoch += 1
            p.global_step += 1
            self.cb.on_step(outcome.loss_tensor)
            if checkpoint_every and p.global_step % checkpoint_every == 0 and p.batch_in_epoch < self.steps_per_epoch:
                meter.fold(p.partial)
                p.partial["train_time"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                self.checkpoint()
        trainer.check()
        meter.fold(p.partial)
        self.epoch_train_time = p.partial["train_time"] + time.perf_counter() - t0

    def batch_on_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch's image ``(B, C, H, W)`` and mask ``(B, 1, H, W)`` on the device,
        augmented (:mod:`pyroseg.augment`) with draws fixed by (seed, step, rank)."""
        image = batch["image"].to(self.device, non_blocking=True)
        mask = batch["mask"].to(self.device, non_blocking=True)
        if self.config.augment != "none":
            g = step_generator(self.config.train_seed, self.progress.global_step, self.ctx.rank, self.device)
            image, mask = augment_batch(image, mask, self.augment, generator=g)
        return image, mask

    def set_lr(self, progress: float) -> None:
        """The learning rate of :func:`pyroseg.schedules.lr_at` at ``progress`` epochs."""
        cfg = self.config
        lr = lr_at(progress, lr=cfg.lr, schedule=cfg.lr_schedule, warmup=cfg.lr_warmup, epochs=cfg.epochs)
        for group in self.trainer.optimizer.param_groups:
            group["lr"] = lr

    def end_epoch(self) -> None:
        """The epoch's row (train loss, beta, GECO, validation), then a checkpoint and metrics.csv."""
        cfg, p, ctx = self.config, self.progress, self.ctx
        t1 = time.perf_counter()
        row: dict[str, Any] = {
            "epoch": p.epoch + 1,
            "step": p.global_step,
            "beta": beta_at(p.epoch + 1, beta=cfg.beta, warmup=cfg.beta_warmup, cycle=cfg.beta_cycle),
            "train_loss": p.partial["loss_sum"] / max(p.partial["count"], 1) if p.partial["count"] else float("nan"),
            "lr": self.trainer.optimizer.param_groups[0]["lr"],  # of the epoch's last step
        }
        if self.geco is not None:
            row.update(self.geco.log_row())
        row.update(ctx.on_main(lambda: _validate(self.model, self.val_data, cfg, self.device)))  # rank 0's, on every rank
        self.model.train()
        row["nonfinite_steps"] = self.trainer.nonfinite_total
        row["train_time_s"] = self.epoch_train_time
        row["data_time_s"] = p.partial["data_time"]  # of train_time_s: loading, moving and augmenting batches
        row["val_time_s"] = time.perf_counter() - t1
        p.history.append(row)
        p.epoch += 1
        p.batch_in_epoch = 0
        p.partial = _fresh_partial()
        ctx.check_consistent(lambda: _rank_state(self.model, self.trainer, p.global_step, self.geco), what=f"after epoch {p.epoch}")
        self.keep_best(row)  # before the checkpoint that records it: a kill between the two redoes both alike
        self.checkpoint()
        if ctx.is_main:
            write_metrics_csv(self.out / METRICS, p.history)
        self.cb.on_epoch_end(row)

    def keep_best(self, row: dict[str, Any]) -> None:
        """Write ``best.pt`` (rank 0) when this epoch's ``select_by`` beats the best so far.
        Every rank holds rank 0's validation row, so every rank agrees on the best."""
        value = row.get(self.select_by)
        if value is None or not math.isfinite(value):
            return
        best = self.progress.best
        if best is not None and not (value > best["value"] if self.select_mode == "max" else value < best["value"]):
            return
        self.progress.best = {"metric": self.select_by, "value": float(value), "epoch": int(row["epoch"])}
        if self.ctx.is_main:
            save_checkpoint(self.out / BEST, {
                "model_name": self.model.name,
                "hparams": self.model.hparams(),
                "model_state": self.model.state_dict(),
                "epoch": int(row["epoch"]),
                "best": self.progress.best,
                "config": self.config.to_dict(),
            })

    def checkpoint(self) -> None:
        """Write ``checkpoint.pt`` (rank 0; every rank hands in its RNG state)."""
        self.trainer.check()  # never a checkpoint after --max-nonfinite in a row
        ctx = self.ctx
        rng_by_rank = ctx.gather(get_rng_state()) if ctx.enabled else None  # every rank takes part
        if not ctx.is_main:
            return
        extra = {"world_size": ctx.world_size, "rng_by_rank": rng_by_rank} if ctx.enabled else {}
        save_checkpoint(
            self.out / CHECKPOINT,
            {
                **extra,
                "model_name": self.model.name,
                "hparams": self.model.hparams(),
                "model_state": self.model.state_dict(),
                "trainer": self.trainer.state_dict(),
                **self.progress.state_dict(),
                "rng": get_rng_state(),
                "config": self.config.to_dict(),
                **({"geco": self.geco.state_dict()} if self.geco is not None else {}),
            },
        )

    # -- finish -------------------------------------------------------------------------------------
    def finish(self, *, pictures: bool = True) -> None:
        """metrics.csv (also when no epoch was left to train), the pictures, and leave the process group."""
        if self.ctx.is_main:
            write_metrics_csv(self.out / METRICS, self.progress.history)
            if pictures:
                _pictures(self.out, self.model, self.val_data, self.device)
        self.trainer.loss_fn = self.trainer.elbo_loss  # drop the DDP wrapper before leaving the process group
        self.ctx.close()


class _LossMeter:
    """The epoch's ``loss x images`` sum and image count over the applied steps,
    kept on the device (float64, int64) so that a step reads nothing back;
    ``fold`` writes them into ``fit``'s ``partial`` (host numbers) at a checkpoint
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


def _local_batch(batch_size: int, world_size: int) -> int:
    """The batch of one process: ``--batch-size`` is the global batch (the one
    each gradient step averages over), split evenly over the processes."""
    if batch_size % world_size:
        lo = max(world_size, batch_size // world_size * world_size)
        raise UsageError(
            f"--batch-size {batch_size}: the global batch must split evenly over the {world_size} processes; "
            f"give a multiple of {world_size} (e.g. {lo} or {lo + world_size})"
        )
    return batch_size // world_size


def _data_fingerprint(train: SegData, val: SegData) -> dict[str, Any]:
    """What every rank must agree on about the data (compared across ranks only)."""
    h = hashlib.sha256()
    for arr in (train.images, train.masks, val.images, val.masks):
        h.update(np.ascontiguousarray(arr).tobytes())
    return {"the number of training slices": len(train), "the number of validation slices": len(val),
            "the data's sha256": h.hexdigest()}


def _rank_state(model: SegModel, trainer: Trainer, global_step: int, geco: GECO | None = None) -> dict[str, Any]:
    """Training state that must be identical on every rank, checked after every
    epoch of a data-parallel run: weights, step, non-finite count and GECO's
    multiplier and moving average (updated from ``trainer.reduce``-d values)."""
    state = {"the weights' sha256": distributed.state_digest(model.state_dict()), "the step": global_step,
             "the non-finite step count": trainer.nonfinite_total}
    if geco is not None:
        state["GECO's state"] = repr(sorted(geco.state_dict().items()))
    return state


def _restore_rng(ckpt: dict, ctx: distributed.DistContext, seed: int, global_step: int) -> None:
    """Random streams on resume: each rank its own saved state when the number of
    processes is unchanged; otherwise (N processes -> M) fresh per-rank streams
    from (seed, rank, step), so the z noise differs from an unbroken run."""
    by_rank = ckpt.get("rng_by_rank")
    if not ctx.enabled:
        set_rng_state(ckpt["rng"])  # a one-process run, or an N-process run resumed on one: rank 0's stream
    elif by_rank is not None and len(by_rank) == ctx.world_size:
        set_rng_state(by_rank[ctx.rank])
    else:
        saved = len(by_rank) if by_rank is not None else 1
        if ctx.is_main:
            log.warning("resuming a %d-process run on %d processes: new random streams per rank from the seed", saved, ctx.world_size)
        ctx.seed(seed, global_step)


def _pictures(out: Path, model: SegModel, val_data: SegData, device: torch.device) -> None:
    """Training curves and a grid of validation samples; a failure here never loses the run."""
    try:
        from pyroseg import plots

        plots.plot_curves(out / METRICS, out / "curves.png")
        if len(val_data):
            plots.validation_grid(model, val_data, out / "val_samples.png", device=device)
            if len(model.latent_sites) > 1:
                plots.latent_scales_grid(model, val_data, out / "latent_scales.png", device=device)
    except Exception as e:  # pictures are a convenience; the weights and metrics are already safe
        log.warning("could not draw pictures in %s: %s", out, e)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
