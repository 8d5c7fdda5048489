"""Training: :func:`fit` runs one :class:`FitRun` through named phases; what
happens at fixed points of the epoch loop is done by *handlers*, one per concern.

The pieces it puts together live in :mod:`pyroseg.training` and are imported
from here: one SVI step with Pyro's ELBO, the non-finite guard, gradient
clipping and data-parallel averaging (:class:`Trainer`, :class:`ELBOLoss`,
:class:`StepOutcome`: :mod:`pyroseg.training.step`); what is optimised, the
plain ELBO or GECO, as one object the loop calls (:mod:`pyroseg.training.objectives`,
the only place of the loop that knows GECO); where training stands
(:class:`Progress`, :class:`EpochSampler`: :mod:`pyroseg.training.state`).

**Phases**, the methods of :class:`FitRun` that :meth:`FitRun.run` calls in
this order. ``FitRun.__init__`` sets every attribute of the run (``None``
until the phase named beside it fills it in); a phase fills in its own and
only reads the others'::

    __init__       the config (the saved one on resume), the process group (torchrun), the run folder
    check_model    the model built on the meta device (no weights, no random draws): a bad
                   --model-arg, or GECO for a model without a KL, fails before the data is read
    load_data      source, patient split; every rank must hold the same data
    build_model    the model, once, with the data's channels: seeded weights, channels-last
    build_trainer  Trainer (optimizer, guards, DDP wrapper), sampler + loader, the objective,
                   the augmentation, the handlers
    restore/start  the checkpoint's state, or a fresh config.json and split.json
    train          epochs until --epochs or a handler stops it: train_epoch (batches, augmentation,
                   learning rate, beta, one Trainer.step each), end_epoch (the epoch's row:
                   train loss, objective, validation, times)
    finish         the handlers' on_finish, leave the process group

**Handlers**, called in this order at every hook (:meth:`FitRun.build_handlers`)::

    BestCheckpoint      best.pt when --select-by improves; --patience: stop when it has not
    PeriodicCheckpoint  checkpoint.pt at every epoch end and every ``checkpoint_every`` steps
    MetricsCSV          metrics.csv at every epoch end and at the finish (rank 0 only)
    Pictures            curves.png, val_samples.png, latent_scales.png at the finish (rank 0, pictures=True)
    CallbackHandler     the caller's FitCallbacks (the CLI's progress bars and TensorBoard)

A handler is a :class:`Handler` subclass overriding any of its hooks, each given
the :class:`FitRun` (read its attributes: ``run.progress``, ``run.model``,
``run.config``, ``run.out``, ``run.ctx``, ...)::

    on_epoch_start(run)            before the epoch's first (remaining) step
    on_step_end(run, outcome)      after each step (outcome: a StepOutcome, still on the device)
    on_epoch_end(run, row)         after the epoch's row is in run.progress.history
    should_stop(run) -> bool       asked before each epoch; True ends training early
    on_early_stop(run)             once, when a handler stopped training
    on_finish(run)                 after the last epoch (also when none was left to train)

*To add a handler*: write the subclass (in this module, or your own), then
append it in :meth:`FitRun.build_handlers` where its order matters; register
it only ``if ctx.is_main`` when it only writes files, and on every rank when
it takes part in a collective (``run.ctx.gather``) or changes state every rank
must share. A handler must not draw random numbers nor change the model,
the optimizer or ``run.progress`` outside what it owns, or a resumed run no
longer repeats an unbroken one. Save anything it needs after a resume in the
checkpoint payload (:func:`checkpoint_payload`, the one place it is built).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from torch.utils.data import DataLoader

from pyroseg import distributed
from pyroseg.augment import SPECS, augment_batch, step_generator
from pyroseg.checkpoint import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state
from pyroseg.collapse import collapse_report, latent_units
from pyroseg.config import CONFIG_VERSION, SELECT_MODES, FitConfig, load_config_json, versions
from pyroseg.data import SegData, SegDataset, collate_batch, load_source, split_patients
from pyroseg.data.device import on_device
from pyroseg.devices import resolve_device
from pyroseg.errors import CheckpointError, UsageError
from pyroseg.metrics import segmentation_report
from pyroseg.models import SegModel, build_model, model_import_path
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
from pyroseg.training.objectives import Objective, check_model, make_objective
from pyroseg.training.state import EpochSampler, LossMeter, Progress, fresh_partial
from pyroseg.training.step import ELBOLoss, StepOutcome, Trainer, make_elbo

__all__ = [
    "ELBOLoss", "Trainer", "StepOutcome", "EpochSampler", "FitCallbacks", "FitRun", "Handler", "Progress", "fit",
    "make_loader", "resolve_device", "make_elbo", "select_metric", "SELECT_MODES", "checkpoint_payload",
]

log = logging.getLogger(__name__)


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
    Returns the run folder. The phases and handlers: see the module docs.
    """
    return FitRun(config, callbacks, resume=resume, overwrite=overwrite, checkpoint_every=checkpoint_every,
                  pictures=pictures).run()


class FitRun:
    """One call of :func:`fit`: its state (set in ``__init__``) and its phases (see the module docs)."""

    def __init__(self, config: FitConfig, callbacks: FitCallbacks | None = None, *, resume: bool = False,
                 overwrite: bool = False, checkpoint_every: int | None = None, pictures: bool = True):
        """Resolve the config (on resume: the saved one, ``epochs`` may rise), join
        the process group (one process unless torchrun started us) and make sure
        the run folder can be written (rank 0 alone writes it)."""
        self.resume, self.overwrite, self.checkpoint_every, self.pictures = resume, overwrite, checkpoint_every, pictures
        #: config.json's document: the saved one on resume, written by restore / start
        self.doc: dict[str, Any] | None = None
        if resume:  # reads only, so every process of a data-parallel run does it
            out = prepare_run_dir(config.out, resume=resume, overwrite=overwrite)
            self.doc = load_config_json(out / CONFIG)
            saved = FitConfig.from_dict(self.doc["fit"])
            config = replace(saved, epochs=max(config.epochs, saved.epochs) if config.epochs else saved.epochs, out=str(out))
        self.config = config.validate()
        self.ctx = ctx = distributed.setup(resolve_device(config.device))
        self.device, self.local_batch = ctx.device, _local_batch(config.batch_size, ctx.world_size)
        if not resume:
            out = ctx.on_main(lambda: prepare_run_dir(config.out, resume=resume, overwrite=overwrite))
        self.out: Path = out
        self.callbacks: FitCallbacks = (callbacks or FitCallbacks()) if ctx.is_main else FitCallbacks()
        self.progress = Progress()
        self.default_channels: int | None = None  # check_model: the model's input channels when not given
        self.data: SegData | None = None  # load_data: all of it, its split by patient (ids), train and val
        self.split: dict[str, list] | None = None
        self.train_data = self.val_data = None
        self.model: SegModel | None = None  # build_model
        self.trainer: Trainer | None = None  # build_trainer: the step, the batches, the objective, ...
        self.sampler, self.loader, self.steps_per_epoch = None, None, 0
        self.objective: Objective | None = None
        self.augment, self.select_by, self.select_mode = None, "", ""
        self.handlers: list[Handler] = []
        self.meter: LossMeter | None = None  # train_epoch: the epoch's loss so far, and when its clock last read
        self.clock = 0.0

    def run(self) -> Path:
        """Every phase, in order; returns the run folder."""
        self.check_model()
        self.load_data()
        self.build_model()
        self.build_trainer()
        if self.resume:
            self.restore()
        else:
            self.start()
        self.train()
        self.finish()
        return self.out

    # -- the model: checked before the data, built once after it ------------------------------------
    def _new_model(self, **channels: int) -> SegModel:
        cfg = self.config
        model = build_model(cfg.model, image_size=cfg.image_size, widths=cfg.widths, **{**channels, **cfg.model_args})
        check_model(cfg, model)
        return model

    def check_model(self) -> None:
        """Build the model on the meta device (no weights, no random draws), so that a bad
        ``--model-arg`` fails at once, before the data is read, and learn its default channels."""
        try:
            with torch.device("meta"):
                probe = self._new_model()
        except UsageError:
            raise
        except Exception:  # a model that cannot be built without weights: built for real, its errors raised
            probe = self._new_model()
        self.default_channels = probe.in_channels

    def build_model(self) -> None:
        """The model, its weights drawn from ``config.seed``, its ``in_channels`` the data's
        unless ``--model-arg in_channels`` says otherwise (QUBIQ, LIDC: 1)."""
        cfg = self.config
        channels = int(self.data.images.shape[1])
        follow = channels != self.default_channels and "in_channels" not in cfg.model_args
        pyro.clear_param_store()  # a stale store would shadow freshly built networks
        pyro.set_rng_seed(cfg.train_seed)  # torch, numpy and random
        model = self._new_model(**({"in_channels": channels} if follow else {})).to(self.device)
        if cfg.channels_last:  # measured 1.2-1.27x faster training steps on CPU (benchmarks/, options item)
            model = model.to(memory_format=torch.channels_last)
        self.model = model

    # -- load_data ----------------------------------------------------------------------------------
    def load_data(self) -> None:
        """The data source, split by patient into train / val / test; every rank must hold the same."""
        cfg, ctx = self.config, self.ctx
        self.data = ctx.main_first(lambda: load_source(  # rank 0 first: it fills the cache the others read
            cfg.data, cfg.image_size, seed=cfg.seed_of_data(), synthetic_patients=cfg.synthetic_patients,
            synthetic_slices=cfg.synthetic_slices, cache_dir=cfg.cache_dir, progress=self.callbacks.on_load_progress,
            task=cfg.task, slice_axis=cfg.slice_axis,
        ))
        split = split_patients(self.data.patient_ids, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed_of_data())
        self.split = split
        self.train_data, self.val_data = self.data.subset(split["train"]), self.data.subset(split["val"])
        self.callbacks.on_data({**self.data.summary(), "train_slices": len(self.train_data), "val_slices": len(self.val_data),
                                "train_patients": len(split["train"]), "val_patients": len(split["val"]),
                                "test_patients": len(split["test"])})
        ctx.check_consistent(lambda: _data_fingerprint(self.train_data, self.val_data),
                             what="after loading --data", hint="every process must read the same data (shared storage, same files)")

    # -- build_trainer ------------------------------------------------------------------------------
    def build_trainer(self) -> None:
        """The optimizer and its guards (wrapped for data parallelism), the batches, the objective,
        the augmentation, the score that picks best.pt and the handlers."""
        cfg, ctx = self.config, self.ctx
        self.trainer = trainer = Trainer(self.model, lr=cfg.lr, elbo=cfg.elbo, clip_norm=cfg.clip_norm,
                                         max_nonfinite=cfg.max_nonfinite, free_bits=cfg.free_bits)
        if ctx.enabled:  # DDP averages gradients in backward; beta = 0 leaves a prior net unused
            trainer.loss_fn = ctx.wrap(trainer.loss_fn, find_unused_parameters=self.model.has_latent)
            trainer.reduce = ctx.mean
        self.sampler, self.loader = make_loader(self.train_data, cfg, self.local_batch, ctx)
        self.steps_per_epoch = math.ceil(self.sampler.num_samples / self.local_batch)
        real_masks = self.train_data.masks if self.train_data.uniform_raters else self.train_data.masks[self.train_data.rater_valid()]
        self.objective = make_objective(cfg, real_masks, self.steps_per_epoch)  # no padded rater slots
        self.augment = SPECS[cfg.augment]
        self.select_by, self.select_mode = select_metric(cfg.select_by, self.data.num_annotators)
        self.handlers = self.build_handlers()

    def build_handlers(self) -> list[Handler]:
        """The handlers, in the order every hook calls them (see the module docs)."""
        handlers: list[Handler] = [BestCheckpoint(self.select_by, self.select_mode, self.config.patience),
                                   PeriodicCheckpoint(self.checkpoint_every)]
        if self.ctx.is_main:  # they only write files
            handlers.append(MetricsCSV())
            if self.pictures:
                handlers.append(Pictures())
        handlers.append(CallbackHandler(self.callbacks))
        return handlers

    # -- restore / start ----------------------------------------------------------------------------
    def restore(self) -> None:
        """Continue from ``checkpoint.pt``: weights, optimizer, position, history, RNG
        states, the objective's state. A run killed before its first checkpoint starts again."""
        out, ctx, doc = self.out, self.ctx, self.doc
        if (out / CHECKPOINT).exists():
            ckpt = load_checkpoint(out / CHECKPOINT, map_location=self.device)
            check_checkpoint(ckpt, doc, source=out / CHECKPOINT)  # another model, size or run: refused, naming what differs
            load_weights(self.model, ckpt, source=out / CHECKPOINT)
            try:
                self.trainer.load_state_dict(ckpt["trainer"])
                self.progress.load_state_dict(ckpt)
                _restore_rng(ckpt, ctx, self.config.train_seed, self.progress.global_step)
                self.objective.restore(ckpt)
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

    def start(self) -> None:
        """A new run: clear what ``--overwrite`` replaces, write config.json and split.json."""
        cfg, ctx, out = self.config, self.ctx, self.out
        if self.overwrite and ctx.is_main:  # only now: a bad --data or --model-arg must not cost the previous run
            clear_run_files(out)
        self.doc = _config_doc(self)
        ctx.seed(cfg.train_seed)  # after the model is built: each rank its own z noise
        if ctx.is_main:
            write_json(out / SPLIT, {"seed": cfg.seed_of_data(), "val_fraction": cfg.val_fraction,
                                     "test_fraction": cfg.test_fraction, **self.split})
            write_json(out / CONFIG, self.doc)

    # -- train: the epoch loop ----------------------------------------------------------------------
    def train(self) -> None:
        """Epochs until ``config.epochs`` or until a handler says stop."""
        self.model.train()
        while self.progress.epoch < self.config.epochs and not any(h.should_stop(self) for h in self.handlers):
            self.train_epoch()
            self.end_epoch()
        if self.progress.epoch < self.config.epochs:
            for h in self.handlers:
                h.on_early_stop(self)

    def train_epoch(self) -> None:
        """The remaining steps of the current epoch (all of them, or those after a mid-epoch checkpoint)."""
        cfg, p, trainer, objective = self.config, self.progress, self.trainer, self.objective
        self.sampler.set_position(p.epoch, skip=p.batch_in_epoch * self.local_batch)
        for h in self.handlers:
            h.on_epoch_start(self)
        self.meter = LossMeter(p.partial, self.device)  # the epoch's loss, summed on the device
        self.clock = time.perf_counter()
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
            _set_lr(trainer.optimizer, cfg, progress)
            with objective.step_context() as likelihood:
                outcome = trainer.step(image, mask, beta=beta, recon_scale=objective.recon_scale)
            objective.after_step(outcome, likelihood, trainer.reduce)
            self.meter.add(outcome, image.shape[0] * self.ctx.world_size)  # the global batch's loss: every rank's images
            p.batch_in_epoch += 1
            p.global_step += 1
            for h in self.handlers:
                h.on_step_end(self, outcome)
        trainer.check()
        self.update_partial()

    def update_partial(self) -> None:
        """Bring ``progress.partial`` up to now: the epoch's loss sum and training seconds
        (before a checkpoint saves it, and at the epoch's end)."""
        self.meter.fold(self.progress.partial)
        now = time.perf_counter()
        self.progress.partial["train_time"] += now - self.clock
        self.clock = now

    def batch_on_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch's image ``(B, C, H, W)`` and mask ``(B, 1, H, W)`` on the device,
        augmented (:mod:`pyroseg.augment`) with draws fixed by (seed, step, rank)."""
        image = batch["image"].to(self.device, non_blocking=True)
        mask = batch["mask"].to(self.device, non_blocking=True)
        if self.config.augment != "none":
            g = step_generator(self.config.train_seed, self.progress.global_step, self.ctx.rank, self.device)
            image, mask = augment_batch(image, mask, self.augment, generator=g)
        return image, mask

    def end_epoch(self) -> None:
        """The epoch's row (:func:`_epoch_row`) into the history, the next epoch's
        position, then the handlers' ``on_epoch_end``."""
        p = self.progress
        row = _epoch_row(self)
        p.history.append(row)
        p.epoch += 1
        p.batch_in_epoch = 0
        p.partial = fresh_partial()
        self.ctx.check_consistent(lambda: _rank_state(self.model, self.trainer, p.global_step, self.objective),
                                  what=f"after epoch {p.epoch}")
        for h in self.handlers:
            h.on_epoch_end(self, row)

    # -- finish -------------------------------------------------------------------------------------
    def finish(self) -> None:
        """The handlers' ``on_finish`` (metrics.csv, pictures), then leave the process group."""
        for h in self.handlers:
            h.on_finish(self)
        self.trainer.loss_fn = self.trainer.elbo_loss  # drop the DDP wrapper before leaving the process group
        self.ctx.close()


def _set_lr(optimizer: torch.optim.Optimizer, cfg: FitConfig, progress: float) -> None:
    """The learning rate of :func:`pyroseg.schedules.lr_at` at ``progress`` epochs."""
    lr = lr_at(progress, lr=cfg.lr, schedule=cfg.lr_schedule, warmup=cfg.lr_warmup, epochs=cfg.epochs)
    for group in optimizer.param_groups:
        group["lr"] = lr


def _epoch_row(run: FitRun) -> dict[str, Any]:
    """The row of the epoch just trained (metrics.csv, TensorBoard): train loss, beta,
    learning rate, the objective's columns, validation (rank 0's, on every rank), times."""
    cfg, p, ctx = run.config, run.progress, run.ctx
    t1 = time.perf_counter()
    row: dict[str, Any] = {
        "epoch": p.epoch + 1,
        "step": p.global_step,
        "beta": beta_at(p.epoch + 1, beta=cfg.beta, warmup=cfg.beta_warmup, cycle=cfg.beta_cycle),
        "train_loss": p.partial["loss_sum"] / max(p.partial["count"], 1) if p.partial["count"] else float("nan"),
        "lr": run.trainer.optimizer.param_groups[0]["lr"],  # of the epoch's last step
        **run.objective.log_row(),
    }
    row.update(ctx.on_main(lambda: _validate(run.model, run.val_data, cfg, run.device)))
    run.model.train()
    row["nonfinite_steps"] = run.trainer.nonfinite_total
    row["train_time_s"] = p.partial["train_time"]
    row["data_time_s"] = p.partial["data_time"]  # of train_time_s: loading, moving and augmenting batches
    row["val_time_s"] = time.perf_counter() - t1
    return row


def checkpoint_payload(run: FitRun, *, full: bool, rng_by_rank: list | None = None) -> dict[str, Any]:
    """What ``best.pt`` holds (``full=False``: the weights, the epoch they are from and
    their score) or ``checkpoint.pt`` (``full=True``: all a resume needs: optimizer and
    guard counters, :class:`Progress`, RNG states, the objective's state; with
    ``rng_by_rank``, every rank's RNG state, under data parallelism). Built here only."""
    model, p, ctx = run.model, run.progress, run.ctx
    head = {"world_size": ctx.world_size, "rng_by_rank": rng_by_rank} if full and ctx.enabled else {}
    weights = {"model_name": model.name, "hparams": model.hparams(), "model_state": model.state_dict()}
    if full:
        state = {"trainer": run.trainer.state_dict(), **p.state_dict(), "rng": get_rng_state()}
    else:
        state = {"epoch": int(p.best["epoch"]), "best": p.best}
    tail = run.objective.checkpoint_entries() if full else {}
    return {**head, **weights, **state, "config": run.config.to_dict(), **tail}


class Handler:
    """A concern of the run at fixed points of the loop; override the hooks it needs
    (see the module docs for when each is called and how to add one)."""

    def on_epoch_start(self, run: FitRun) -> None: ...

    def on_step_end(self, run: FitRun, outcome: StepOutcome) -> None: ...

    def on_epoch_end(self, run: FitRun, row: dict[str, Any]) -> None: ...

    def should_stop(self, run: FitRun) -> bool:
        return False

    def on_early_stop(self, run: FitRun) -> None: ...

    def on_finish(self, run: FitRun) -> None: ...


class BestCheckpoint(Handler):
    """``best.pt`` (rank 0) whenever an epoch's ``select_by`` beats the best so far
    (``mode``: ``"max"`` or ``"min"``), recorded in ``run.progress.best``, and
    ``--patience``: stop when that many epochs passed since the best one. Every
    rank holds rank 0's validation row, so every rank agrees on the best."""

    def __init__(self, select_by: str, mode: str, patience: int | None):
        self.select_by, self.mode, self.patience = select_by, mode, patience

    def on_epoch_end(self, run: FitRun, row: dict[str, Any]) -> None:
        # before PeriodicCheckpoint records it: a kill between the two redoes both alike
        value = row.get(self.select_by)
        if value is None or not math.isfinite(value):
            return
        best = run.progress.best
        if best is not None and not (value > best["value"] if self.mode == "max" else value < best["value"]):
            return
        run.progress.best = {"metric": self.select_by, "value": float(value), "epoch": int(row["epoch"])}
        if run.ctx.is_main:
            save_checkpoint(run.out / BEST, checkpoint_payload(run, full=False))

    def should_stop(self, run: FitRun) -> bool:
        """``--patience`` epochs since the best one (or since the start, before any score):
        a function of the saved progress, so a resumed run stops where an unbroken one did."""
        p = run.progress
        return self.patience is not None and p.epoch - (p.best["epoch"] if p.best else 0) >= self.patience

    def on_early_stop(self, run: FitRun) -> None:
        best = run.progress.best or {}
        log.info("stopped after epoch %d: %s has not improved for %d epochs (best %s at epoch %s)", run.progress.epoch,
                 self.select_by, self.patience, best.get("value"), best.get("epoch"))


class PeriodicCheckpoint(Handler):
    """``checkpoint.pt`` (rank 0 writes; every rank hands in its RNG state) at every
    epoch end and, with ``every``, every that many steps within an epoch."""

    def __init__(self, every: int | None = None):
        self.every = every

    def on_step_end(self, run: FitRun, outcome: StepOutcome) -> None:
        p = run.progress
        if self.every and p.global_step % self.every == 0 and p.batch_in_epoch < run.steps_per_epoch:
            run.update_partial()
            self.write(run)

    def on_epoch_end(self, run: FitRun, row: dict[str, Any]) -> None:
        self.write(run)

    def write(self, run: FitRun) -> None:
        run.trainer.check()  # never a checkpoint after --max-nonfinite in a row
        ctx = run.ctx
        rng_by_rank = ctx.gather(get_rng_state()) if ctx.enabled else None  # every rank takes part
        if ctx.is_main:
            save_checkpoint(run.out / CHECKPOINT, checkpoint_payload(run, full=True, rng_by_rank=rng_by_rank))


class MetricsCSV(Handler):
    """``metrics.csv``: the history so far, rewritten at every epoch end and at the
    finish (also when no epoch was left to train). Rank 0 only."""

    def on_epoch_end(self, run: FitRun, row: dict[str, Any]) -> None:
        write_metrics_csv(run.out / METRICS, run.progress.history)

    def on_finish(self, run: FitRun) -> None:
        write_metrics_csv(run.out / METRICS, run.progress.history)


class Pictures(Handler):
    """Training curves and a grid of validation samples at the finish (rank 0 only);
    a failure here never loses the run: the weights and metrics are already safe."""

    def on_finish(self, run: FitRun) -> None:
        out, model, val_data, device = run.out, run.model, run.val_data, run.device
        try:
            from pyroseg import plots

            plots.plot_curves(out / METRICS, out / "curves.png")
            if len(val_data):
                plots.validation_grid(model, val_data, out / "val_samples.png", device=device)
                if len(model.latent_sites) > 1:
                    plots.latent_scales_grid(model, val_data, out / "latent_scales.png", device=device)
        except Exception as e:  # pictures are a convenience
            log.warning("could not draw pictures in %s: %s", out, e)


class CallbackHandler(Handler):
    """The caller's :class:`FitCallbacks` (progress bars, TensorBoard) at the loop's hooks.
    On ranks other than 0 they are a no-op ``FitCallbacks``."""

    def __init__(self, callbacks: FitCallbacks):
        self.callbacks = callbacks

    def on_epoch_start(self, run: FitRun) -> None:
        self.callbacks.on_epoch_start(run.progress.epoch, run.config.epochs, run.steps_per_epoch - run.progress.batch_in_epoch)

    def on_step_end(self, run: FitRun, outcome: StepOutcome) -> None:
        self.callbacks.on_step(outcome.loss_tensor)

    def on_epoch_end(self, run: FitRun, row: dict[str, Any]) -> None:
        self.callbacks.on_epoch_end(row)

    def on_early_stop(self, run: FitRun) -> None:
        self.callbacks.on_early_stop(run.progress.epoch, run.progress.best or {})


def _config_doc(run: FitRun) -> dict[str, Any]:
    """config.json of a new run: the options, the model, the data, where and with what it ran."""
    cfg, ctx = run.config, run.ctx
    doc = {
        "config_version": CONFIG_VERSION,
        "fit": cfg.to_dict(),
        "model": _model_doc(run.model),
        "data": run.data.summary(),
        "device": str(run.device),
        "versions": versions(),
        "command": sys.argv,
        "created": _now(),
    }
    if ctx.enabled:
        doc["distributed"] = {**ctx.describe(), "batch_per_process": run.local_batch}
    doc.update(run.objective.config_entries(cfg))
    return doc


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


#: The validation columns ``--select-by`` may name, and whether higher is better
#: (:data:`pyroseg.config.SELECT_MODES`, defined beside the option).


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


def _rank_state(model: SegModel, trainer: Trainer, global_step: int, objective: Objective | None = None) -> dict[str, Any]:
    """Training state that must be identical on every rank, checked after every
    epoch of a data-parallel run: weights, step, non-finite count and the
    objective's state (GECO's multiplier and moving average, updated from
    ``trainer.reduce``-d values)."""
    state = {"the weights' sha256": distributed.state_digest(model.state_dict()), "the step": global_step,
             "the non-finite step count": trainer.nonfinite_total}
    if objective is not None:
        state.update(objective.rank_state())
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


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
