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
    train          steps until a handler stops it (Budget: --epochs or --max-steps, --max-minutes;
                   BestCheckpoint: --patience), its reason in run.stop_reason: train_epoch (batches,
                   augmentation, learning rate, beta, one Trainer.step each), step_end at every
                   step boundary (the row when due: train loss, objective, validation, times; at
                   each epoch's end, or with --val-every every N steps; the epoch's end; ask_stop)
    finish         the handlers' on_finish, leave the process group

**Handlers**, called in this order at every hook (:meth:`FitRun.build_handlers`)::

    Budget              stop: "budget" at --max-steps (else --epochs), "time" after --max-minutes
    BestCheckpoint      best.pt when --select-by improves; --patience: stop ("plateau") when it has
                        not for that many validations
    PeriodicCheckpoint  checkpoint.pt after every row, every ``checkpoint_every`` steps, and at a
                        stop between two of them
    MetricsCSV          metrics.csv after every row and at the finish (rank 0 only)
    TrainingRecord      training.json at the finish: steps, stop reason, validation curve (rank 0 only)
    Pictures            curves.png, val_samples.png, latent_scales.png at the finish (rank 0, pictures=True)
    CallbackHandler     the caller's FitCallbacks (the CLI's progress bars and TensorBoard)

A handler is a :class:`Handler` subclass overriding any of its hooks, each given
the :class:`FitRun` (read its attributes: ``run.progress``, ``run.model``,
``run.config``, ``run.out``, ``run.ctx``, ...)::

    on_epoch_start(run)            before the epoch's first (remaining) step
    on_step_end(run, outcome)      after each step (outcome: a StepOutcome, still on the device)
    on_epoch_end(run, row)         after a row (a validation) is in run.progress.history: at each
                                   epoch's end, or with --val-every every N steps (mid-epoch too)
    should_stop(run) -> str|None   asked before the first step and after every step (after its
                                   row); a reason ("budget", "time", "plateau"; True: the class
                                   name) ends training, the first handler's is run.stop_reason
    on_early_stop(run)             once, when training stopped for a reason other than budget or time
    on_finish(run)                 after the last step (also when none was left to train)

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
from pyroseg.data import SegData, SegDataset, collate_batch, load_source, split_for
from pyroseg.data.core import rater_pairs
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
    TRAINING,
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
            config = replace(saved, epochs=max(config.epochs, saved.epochs) if config.epochs else saved.epochs, out=str(out),
                             **{k: getattr(config, k) for k in _BUDGET_FIELDS if getattr(config, k) is not None})
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
        self.meter: LossMeter | None = None  # train_epoch: the loss since the last row, and when its clock last read
        self.clock = 0.0
        self.start_step = 0  # train: the step this call started from, and why training stopped
        self.stop_reason: str | None = None

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
        split = split_for(self.data.patient_ids, cfg)
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
        cfg = self.config
        handlers: list[Handler] = [Budget(cfg.epochs, cfg.max_steps, cfg.max_minutes),
                                   BestCheckpoint(self.select_by, self.select_mode, cfg.patience),
                                   PeriodicCheckpoint(self.checkpoint_every)]
        if self.ctx.is_main:  # they only write files
            handlers += [MetricsCSV(), TrainingRecord()]
            if self.pictures:
                handlers.append(Pictures())
        handlers.append(CallbackHandler(self.callbacks))
        return handlers

    # -- restore / start ----------------------------------------------------------------------------
    def restore(self) -> None:
        """Continue from ``checkpoint.pt``, or start again without one (:func:`_restore`)."""
        _restore(self)

    def start(self) -> None:
        """A new run: clear what ``--overwrite`` replaces, write config.json and split.json."""
        cfg, ctx, out = self.config, self.ctx, self.out
        if self.overwrite and ctx.is_main:  # only now: a bad --data or --model-arg must not cost the previous run
            clear_run_files(out)
            (out / TRAINING).unlink(missing_ok=True)
        self.doc = _config_doc(self)
        ctx.seed(cfg.train_seed)  # after the model is built: each rank its own z noise
        if ctx.is_main:
            write_json(out / SPLIT, {"seed": cfg.seed_of_data(), "val_fraction": cfg.val_fraction,
                                     "test_fraction": cfg.test_fraction, **self.split})
            write_json(out / CONFIG, self.doc)

    # -- train: the step loop -----------------------------------------------------------------------
    def train(self) -> None:
        """Epochs of steps until a handler says stop, asked before the first step and at every
        step boundary (:meth:`ask_stop`); ``on_early_stop`` when it was not the budget or the time."""
        self.model.train()
        self.start_step = self.progress.global_step
        self.stop_reason = self.ask_stop()
        while self.stop_reason is None:
            self.train_epoch()
        if self.stop_reason not in ("budget", "time"):
            for h in self.handlers:
                h.on_early_stop(self)

    def ask_stop(self) -> str | None:
        """The first handler's reason to stop ("budget", "time", "plateau"; for ``True``: its class name)."""
        for h in self.handlers:
            said = h.should_stop(self)
            if said:
                return said if isinstance(said, str) else type(h).__name__
        return None

    def train_epoch(self) -> None:
        """The current epoch's remaining steps (all, or those after a mid-epoch checkpoint), each
        followed by its step boundary (:meth:`step_end`); left early when a handler stops training."""
        p = self.progress
        self.sampler.set_position(p.epoch, skip=p.batch_in_epoch * self.local_batch)
        for h in self.handlers:
            h.on_epoch_start(self)
        self.meter = LossMeter(p.partial, self.device)  # the loss since the last row, summed on the device
        self.clock = time.perf_counter()
        batches = iter(self.loader)
        while self.stop_reason is None and p.batch_in_epoch < self.steps_per_epoch:
            t_data = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            image, mask = _batch_on_device(self, batch)
            p.partial["data_time"] += time.perf_counter() - t_data
            outcome = _train_step(self, image, mask)
            p.batch_in_epoch += 1
            p.global_step += 1
            for h in self.handlers:
                h.on_step_end(self, outcome)
            self.step_end()

    def step_end(self) -> None:
        """A step boundary: the row when one is due (:meth:`row_due`: a validation), the epoch's
        end, the handlers' ``on_epoch_end`` after a row (best.pt, checkpoint.pt, metrics.csv), then
        whether to stop. A checkpoint is only ever taken after a due row, so a resume never skips one."""
        p = self.progress
        epoch_end = p.batch_in_epoch == self.steps_per_epoch
        row = None
        if epoch_end or self.row_due():
            self.trainer.check()
            self.update_partial()
        if self.row_due():
            row = _epoch_row(self)
            p.history.append(row)
            p.partial = fresh_partial()
            self.meter = LossMeter(p.partial, self.device)
        if epoch_end:
            p.epoch += 1
            p.batch_in_epoch = 0
        if row is not None:
            self.ctx.check_consistent(lambda: _rank_state(self.model, self.trainer, p.global_step, self.objective),
                                      what=f"after epoch {p.epoch}" if epoch_end else f"after step {p.global_step}")
            for h in self.handlers:
                h.on_epoch_end(self, row)
            self.clock = time.perf_counter()  # validating and checkpointing are not training time
        self.stop_reason = self.ask_stop()

    def row_due(self) -> bool:
        """Whether the step just taken ends a row (validates): the epoch's last, or every --val-every-th."""
        p, every = self.progress, self.config.val_every
        return p.batch_in_epoch == self.steps_per_epoch if every is None else p.global_step % every == 0

    def horizon(self) -> float:
        """The length in epochs (the lr schedule's, the progress bars'): --epochs, or --max-steps'."""
        cfg = self.config
        return cfg.epochs if cfg.max_steps is None else cfg.max_steps / self.steps_per_epoch

    def update_partial(self) -> None:
        """Bring ``progress.partial`` up to now: the epoch's loss sum and training seconds
        (before a checkpoint saves it, and at the epoch's end)."""
        self.meter.fold(self.progress.partial)
        now = time.perf_counter()
        self.progress.partial["train_time"] += now - self.clock
        self.clock = now

    # -- finish -------------------------------------------------------------------------------------
    def finish(self) -> None:
        """The handlers' ``on_finish`` (metrics.csv, pictures), then leave the process group."""
        for h in self.handlers:
            h.on_finish(self)
        self.trainer.loss_fn = self.trainer.elbo_loss  # drop the DDP wrapper before leaving the process group
        self.ctx.close()


def _restore(run: FitRun) -> None:
    """Continue from ``checkpoint.pt``: weights, optimizer, position, history, RNG
    states, the objective's state. A run killed before its first checkpoint starts again."""
    out, ctx, doc = run.out, run.ctx, run.doc
    if (out / CHECKPOINT).exists():
        ckpt = load_checkpoint(out / CHECKPOINT, map_location=run.device)
        # another model, size or run: refused, naming what differs (a budget may change, as --epochs may)
        check_checkpoint(ckpt, _budgets_of(ckpt, doc), source=out / CHECKPOINT)
        load_weights(run.model, ckpt, source=out / CHECKPOINT)
        try:
            run.trainer.load_state_dict(ckpt["trainer"])
            run.progress.load_state_dict(ckpt)
            _restore_rng(ckpt, ctx, run.config.train_seed, run.progress.global_step)
            run.objective.restore(ckpt)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{out / CHECKPOINT}: incomplete training state ({type(e).__name__}: {e})") from None
        p = run.progress
        doc.setdefault("resumed", []).append({"at_epoch": p.epoch, "at_batch": p.batch_in_epoch, "time": _now(),
                                              **({"world_size": ctx.world_size} if ctx.enabled else {})})
        log.info("resuming %s at epoch %d, batch %d", out, p.epoch, p.batch_in_epoch)
    else:  # killed before its first checkpoint: start again, with the saved config
        log.warning("%s has no checkpoint yet (stopped during its first epoch): starting it from the beginning", out)
        doc.setdefault("resumed", []).append({"at_epoch": 0, "at_batch": 0, "time": _now()})
        ctx.seed(run.config.train_seed)  # as for a new run: each rank its own z noise
    if ctx.is_main:
        write_json(out / CONFIG, doc)


def _batch_on_device(run: FitRun, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch's image ``(B, C, H, W)`` and mask ``(B, 1, H, W)`` on the device,
    augmented (:mod:`pyroseg.augment`) with draws fixed by (seed, step, rank). With
    ``--raters all`` every (image, rater) pair: ``(P, C, H, W)`` and ``(P, 1, H, W)``,
    ``P`` the batch's real raters (an image and its raters augmented alike)."""
    every = run.config.raters == "all"
    image = batch["image"].to(run.device, non_blocking=True)
    mask = batch["masks" if every else "mask"].to(run.device, non_blocking=True)  # (B, A | 1, H, W)
    if run.config.augment != "none":
        g = step_generator(run.config.train_seed, run.progress.global_step, run.ctx.rank, run.device)
        image, mask = augment_batch(image, mask, run.augment, generator=g)
    if every:
        image, mask = rater_pairs(image, mask, batch["rater_count"].to(run.device, non_blocking=True))
    return image, mask


def _train_step(run: FitRun, image: torch.Tensor, mask: torch.Tensor) -> StepOutcome:
    """One step at the run's position: beta and the learning rate of its schedules, the
    objective around :meth:`Trainer.step`, its loss into ``run.meter``."""
    cfg, p, trainer, objective = run.config, run.progress, run.trainer, run.objective
    progress = p.epoch + p.batch_in_epoch / run.steps_per_epoch
    beta = beta_at(progress, beta=cfg.beta, warmup=cfg.beta_warmup_epochs(run.horizon()), cycle=cfg.beta_cycle)
    _set_lr(trainer.optimizer, cfg, progress, run.horizon())
    with objective.step_context() as likelihood:
        outcome = trainer.step(image, mask, beta=beta, recon_scale=objective.recon_scale)
    objective.after_step(outcome, likelihood, trainer.reduce)
    run.meter.add(outcome, image.shape[0] * run.ctx.world_size)  # the global batch's loss: every rank's images
    return outcome


def _set_lr(optimizer: torch.optim.Optimizer, cfg: FitConfig, progress: float, horizon: float) -> None:
    """The learning rate of :func:`pyroseg.schedules.lr_at` at ``progress`` epochs of ``horizon``."""
    lr = lr_at(progress, lr=cfg.lr, schedule=cfg.lr_schedule, warmup=cfg.lr_warmup, epochs=horizon)
    for group in optimizer.param_groups:
        group["lr"] = lr


def _epoch_row(run: FitRun) -> dict[str, Any]:
    """The row of the steps since the last one (metrics.csv, TensorBoard): where (``epoch``: the
    epochs trained, an integer at an epoch's end, else fractional; ``step``), train loss, beta,
    learning rate, the objective's columns, validation (rank 0's, on every rank), times."""
    cfg, p, ctx = run.config, run.progress, run.ctx
    t1 = time.perf_counter()
    at_end = p.batch_in_epoch == run.steps_per_epoch
    epoch = p.epoch + 1 if at_end else round(p.epoch + p.batch_in_epoch / run.steps_per_epoch, 6)
    row: dict[str, Any] = {
        "epoch": epoch,
        "step": p.global_step,
        "beta": beta_at(epoch, beta=cfg.beta, warmup=cfg.beta_warmup_epochs(run.horizon()), cycle=cfg.beta_cycle),
        "train_loss": p.partial["loss_sum"] / max(p.partial["count"], 1) if p.partial["count"] else float("nan"),
        "lr": run.trainer.optimizer.param_groups[0]["lr"],  # of the row's last step
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

    def should_stop(self, run: FitRun) -> str | bool | None:
        return None

    def on_early_stop(self, run: FitRun) -> None: ...

    def on_finish(self, run: FitRun) -> None: ...


class Budget(Handler):
    """How long training goes on: ``--max-steps`` optimiser steps when given (``--epochs`` is
    then no stop), else ``--epochs`` (both "budget"), and ``--max-minutes`` of wall-clock
    time from this call's first step ("time"; rank 0's clock decides for every rank)."""

    def __init__(self, epochs: int, max_steps: int | None, max_minutes: float | None):
        self.epochs, self.max_steps, self.max_minutes = epochs, max_steps, max_minutes
        self.started: float | None = None

    def on_epoch_start(self, run: FitRun) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def should_stop(self, run: FitRun) -> str | None:
        p = run.progress
        if (p.global_step >= self.max_steps) if self.max_steps is not None else p.epoch >= self.epochs:
            return "budget"
        if self.max_minutes is not None and self.started is not None:
            late = time.perf_counter() - self.started >= 60 * self.max_minutes
            if run.ctx.broadcast(late):
                return "time"
        return None


class BestCheckpoint(Handler):
    """``best.pt`` (rank 0) whenever a row's ``select_by`` beats the best so far
    (``mode``: ``"max"`` or ``"min"``), recorded in ``run.progress.best``, and
    ``--patience``: stop when that many validations (rows) passed since the best one.
    Every rank holds rank 0's validation row, so every rank agrees on the best."""

    def __init__(self, select_by: str, mode: str, patience: int | None):
        self.select_by, self.mode, self.patience = select_by, mode, patience

    def on_epoch_end(self, run: FitRun, row: dict[str, Any]) -> None:
        # before PeriodicCheckpoint records it: a kill between the two redoes both alike
        value = row.get(self.select_by)
        if value is None or not math.isfinite(value):
            return
        best = run.progress.best
        if best is not None and not self.improves(value, row.get("val_loss"), best):
            return
        run.progress.best = {"metric": self.select_by, "value": float(value), "epoch": row["epoch"]}
        if row.get("val_loss") is not None and math.isfinite(row["val_loss"]):
            run.progress.best["val_loss"] = float(row["val_loss"])
        if run.ctx.is_main:
            save_checkpoint(run.out / BEST, checkpoint_payload(run, full=False))

    def improves(self, value: float, val_loss: float | None, best: dict[str, Any]) -> bool:
        """A better score, or the same score exactly with a lower validation loss: a model
        whose thresholded masks are all still empty scores the same at every validation while
        its objective falls, and it is still learning, not on a plateau."""
        if value != best["value"]:
            return value > best["value"] if self.mode == "max" else value < best["value"]
        return (val_loss is not None and math.isfinite(val_loss) and "val_loss" in best
                and val_loss < best["val_loss"])

    def should_stop(self, run: FitRun) -> str | None:
        """"plateau": ``--patience`` validations since the best one (or since the start, before
        any score; every epoch without --val-every) and since the KL warm-up ended (a run whose
        KL weight is still rising has not plateaued: its objective is still changing): a
        function of the saved history, so a resumed run stops where an unbroken one did."""
        if self.patience is None:
            return None
        p, cfg = run.progress, run.config
        warmup = cfg.beta_warmup_epochs(run.horizon()) if cfg.beta_cycle == 0 and run.model.has_latent else 0.0
        last_warm = max((i for i, r in enumerate(p.history) if r["epoch"] < warmup), default=-1)
        since = len(p.history) - 1 - max(_best_index(p.history, p.best), last_warm)
        return "plateau" if since >= self.patience else None

    def on_early_stop(self, run: FitRun) -> None:
        if run.stop_reason != "plateau":
            return
        best = run.progress.best or {}
        log.info("stopped at step %d: %s has not improved for %d validations (best %s at epoch %s)",
                 run.progress.global_step, self.select_by, self.patience, best.get("value"), best.get("epoch"))


class PeriodicCheckpoint(Handler):
    """``checkpoint.pt`` (rank 0 writes; every rank hands in its RNG state) after every row
    (each epoch's end; with --val-every, each validation), with ``every``, every that many
    steps in between, and at the finish when training stopped after the last one (--max-steps,
    --max-minutes, --patience mid-epoch). Never at a step whose row is due but not yet made."""

    def __init__(self, every: int | None = None):
        self.every = every
        self.written_at: int | None = None  # the step of this call's last checkpoint

    def on_step_end(self, run: FitRun, outcome: StepOutcome) -> None:
        p = run.progress
        if self.every and p.global_step % self.every == 0 and p.batch_in_epoch < run.steps_per_epoch and not run.row_due():
            run.update_partial()
            self.write(run)

    def on_epoch_end(self, run: FitRun, row: dict[str, Any]) -> None:
        self.write(run)

    def on_finish(self, run: FitRun) -> None:
        step = run.progress.global_step
        if step != run.start_step and step != self.written_at:  # stopped between two checkpoints
            run.update_partial()
            self.write(run)

    def write(self, run: FitRun) -> None:
        run.trainer.check()  # never a checkpoint after --max-nonfinite in a row
        ctx = run.ctx
        rng_by_rank = ctx.gather(get_rng_state()) if ctx.enabled else None  # every rank takes part
        if ctx.is_main:
            save_checkpoint(run.out / CHECKPOINT, checkpoint_payload(run, full=True, rng_by_rank=rng_by_rank))
        self.written_at = run.progress.global_step


class MetricsCSV(Handler):
    """``metrics.csv``: the history so far, rewritten at every epoch end and at the
    finish (also when no epoch was left to train). Rank 0 only."""

    def on_epoch_end(self, run: FitRun, row: dict[str, Any]) -> None:
        write_metrics_csv(run.out / METRICS, run.progress.history)

    def on_finish(self, run: FitRun) -> None:
        write_metrics_csv(run.out / METRICS, run.progress.history)


class TrainingRecord(Handler):
    """``training.json`` at the finish (rank 0 only): :func:`training_record`."""

    def on_finish(self, run: FitRun) -> None:
        write_json(run.out / TRAINING, training_record(run))


def training_record(run: FitRun) -> dict[str, Any]:
    """The steps trained, why training stopped (``stop_reason``: "budget": --epochs or
    --max-steps, "plateau": --patience, "time": --max-minutes) and the curve of the
    --select-by score, ``[step, score]`` per validation row of the history (``None``
    where not finite), so that it continues over a resume."""
    p, key = run.progress, run.select_by
    curve = [[int(r["step"]), float(r[key]) if math.isfinite(r[key]) else None] for r in p.history if r.get(key) is not None]
    i = _best_index(p.history, p.best)
    return {"steps": p.global_step, "epochs": round(p.global_step / run.steps_per_epoch, 6), "stop_reason": run.stop_reason,
            "select_by": key, "mode": run.select_mode, "val_every": run.config.val_every,
            "beta_warmup_epochs": run.config.beta_warmup_epochs(run.horizon()), "curve": curve,
            "best": {"step": int(p.history[i]["step"]), "score": float(p.best["value"])} if i >= 0 else None}


def _best_index(history: list[dict[str, Any]], best: dict[str, Any] | None) -> int:
    """The index in ``history`` of the row ``best`` was taken from (the row of its epoch;
    else the first with its score), or -1 before any score."""
    if best is None:
        return -1
    at_epoch = [i for i, r in enumerate(history) if r.get("epoch") == best["epoch"] and r.get(best["metric"]) == best["value"]]
    if at_epoch:
        return at_epoch[-1]
    return next((i for i, r in enumerate(history) if r.get(best["metric"]) == best["value"]), -1)


#: The FitConfig fields a resume may change besides ``epochs``: how much longer to train.
_BUDGET_FIELDS = ("max_steps", "max_minutes")


def _budgets_of(ckpt: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` (config.json) with the checkpoint's budgets, so that comparing the two
    refuses another run but not a budget raised by an earlier resume."""
    saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    return {**doc, "fit": {**doc["fit"], **{k: saved[k] for k in _BUDGET_FIELDS if k in saved}}}


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
        self.callbacks.on_epoch_start(run.progress.epoch, math.ceil(run.horizon()), run.steps_per_epoch - run.progress.batch_in_epoch)

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
    """Validation ELBO terms (beta = 1), Dice of the model's point prediction (the mean of
    ``val_samples`` samples; ``ssn``: its logits' mean, :attr:`SegModel.point_prediction`),
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
