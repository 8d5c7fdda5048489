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
from pyroseg.checkpoint import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state
from pyroseg.collapse import collapse_report, latent_units
from pyroseg.config import CONFIG_VERSION, FitConfig, load_config_json, versions
from pyroseg.data import SegData, SegDataset, collate_batch, load_source, split_patients
from pyroseg.devices import resolve_device
from pyroseg.errors import CheckpointError, TrainingError, UsageError
from pyroseg.geco import GECO, geco_from_config
from pyroseg.metrics import segmentation_report
from pyroseg.models import SegModel, build_model
from pyroseg.nets import compile_networks
from pyroseg.objective import SiteELBO
from pyroseg.predict import predict_dataset
from pyroseg.runs import (
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
from pyroseg.schedules import beta_at

__all__ = [
    "ELBOLoss", "Trainer", "StepOutcome", "EpochSampler", "FitCallbacks", "FitRun", "Progress", "fit", "make_loader",
    "resolve_device", "make_elbo",
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


@dataclass
class StepOutcome:
    """``terms``: batch means of the step's unscaled ``recon`` and ``kl_<site>``
    (0-dim tensors; empty for a step that failed before a loss existed)."""

    loss: float
    grad_norm: float
    applied: bool
    terms: dict = field(default_factory=dict)


class Trainer:
    """One SVI step at a time, with the guards described in the module docs."""

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
        fused_adam: bool = False,
        compile: bool = False,
    ):
        """``validate``: Pyro/torch argument checks during training steps (off by
        default: they cost time every step and the guard catches what they would).
        ``free_bits``: the floor of :func:`pyroseg.objective.free_bits` (0: off).
        ``fused_adam``: one fused Adam kernel for all parameters instead of a loop
        over them. Off by default: its optimizer step is 3-10x faster on CPU, but
        that is about 1 % of a training step, and its updates differ from
        ``pyro.optim.Adam``'s by up to ~3e-6 where gradients are near Adam's eps
        (measured; see the benchmark's options item). ``compile``: ``torch.compile``
        the model's networks in place (:func:`pyroseg.nets.compile_networks`).
        Experimental and off: on CPU it compiled for 2 minutes and then stepped
        0.84x as fast as eager (benchmarks/, options item)."""
        self.model = model
        self.validate = validate
        self.elbo_loss = ELBOLoss(model, make_elbo(elbo, free_bits=free_bits))
        #: what a step calls: ``elbo_loss`` itself, or a wrapper of it (DDP, autocast)
        self.loss_fn: nn.Module = self.elbo_loss
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True if fused_adam else None)
        if compile:
            compile_networks(model)
        self.clip_norm = clip_norm
        self.max_nonfinite = max_nonfinite
        self.nonfinite_streak = 0
        self.nonfinite_total = 0
        #: Data-parallel hook: the mean over ranks of a tensor (``None``: one
        #: process). Set by ``fit`` with ``loss_fn`` wrapped in DDP; the loss
        #: reported and the non-finite decision then use the global batch's
        #: loss, so every rank skips the same steps. Any other training state
        #: (GECO) must update from values passed through it.
        self.reduce = None

    def step(self, image: torch.Tensor, mask: torch.Tensor, *, beta: float = 1.0, recon_scale: float = 1.0) -> StepOutcome:
        """Loss, backward, (guard, clip), optimizer step. A non-finite loss or
        gradient skips the update; ``max_nonfinite`` of them in a row raise
        :class:`TrainingError`."""
        self.optimizer.zero_grad(set_to_none=True)
        try:
            with pyro.validation_enabled(self.validate):
                loss = self.loss_fn(image, mask, beta, recon_scale)
        except ValueError as e:
            # with validation on, a NaN/inf parameter fails a distribution's
            # constraint check before any loss exists: the same event as a NaN loss
            if "invalid values" not in str(e):
                raise
            return self._skip(float("nan"), float("nan"))
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.clip_norm if self.clip_norm is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        value = float(loss.detach() if self.reduce is None else self.reduce(loss.detach()))
        if not (math.isfinite(value) and math.isfinite(grad_norm)):
            return self._skip(value, grad_norm)
        self.optimizer.step()
        self.nonfinite_streak = 0
        return StepOutcome(value, grad_norm, applied=True, terms=self.elbo_loss.last_terms)

    def _skip(self, value: float, grad_norm: float) -> StepOutcome:
        """Count a non-finite step without applying it; stop after too many in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_streak += 1
        self.nonfinite_total += 1
        log.warning("non-finite loss or gradient (loss=%s, grad norm=%s): step skipped (%d in a row)",
                    value, grad_norm, self.nonfinite_streak)
        if self.nonfinite_streak >= self.max_nonfinite:
            raise TrainingError(
                f"{self.nonfinite_streak} non-finite steps in a row (loss={value}, --max-nonfinite {self.max_nonfinite}): "
                "training stopped; the last good checkpoint is intact. Try a lower --lr or --clip-norm."
            )
        return StepOutcome(value, grad_norm, applied=False)

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "nonfinite_streak": self.nonfinite_streak,
            "nonfinite_total": self.nonfinite_total,
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
        self.nonfinite_total = int(state.get("nonfinite_total", 0))


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

    def on_step(self, loss: float) -> None: ...

    def on_epoch_end(self, row: dict) -> None: ...


def _validate(model: SegModel, data: SegData, cfg: FitConfig, device: torch.device) -> dict[str, float]:
    """Validation ELBO terms (beta = 1), Dice of the mean of ``val_samples`` samples,
    and the collapse diagnostics of every latent site (:mod:`pyroseg.collapse`)."""
    if len(data) == 0:
        return {}
    pred = predict_dataset(model, data, num_samples=cfg.val_samples, batch_size=max(cfg.batch_size, 32), device=device)
    row = {f"val_{k if k != 'loss' else 'loss'}": float(np.mean(v)) for k, v in pred.terms.items()}
    rep = segmentation_report(torch.from_numpy(pred.mean), torch.from_numpy(data.masks[:, 0]), data.patients)
    row["val_dice_all"] = rep["dice_all"]
    row["val_dice_tumour"] = rep["dice_tumour"]
    if cfg.collapse_diagnostics:
        diag = collapse_report(model, data, num_samples=cfg.val_samples, batch_size=max(cfg.batch_size, 32), device=device)
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
        build_trainer  optimizer (+ DDP), sampler and loader, GECO
        restore/start  the checkpoint's state, or a fresh config.json and split.json
        train          the epoch loop: steps, validation, checkpoints, metrics.csv
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
    return {"loss_sum": 0.0, "count": 0, "train_time": 0.0}


@dataclass
class Progress:
    """Where training stands: with the weights, the optimizer and the RNG states,
    all a checkpoint restores for the remaining steps to be those of an unbroken
    run. ``partial``: the current epoch's sums so far (loss over images, their
    count, training seconds)."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    partial: dict[str, float] = field(default_factory=_fresh_partial)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "global_step": self.global_step,
                "history": self.history, "partial": self.partial}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.epoch, self.batch_in_epoch, self.global_step = int(ckpt["epoch"]), int(ckpt["batch_in_epoch"]), int(ckpt["global_step"])
        self.history = list(ckpt["history"])
        self.partial = dict(ckpt.get("partial", _fresh_partial()))


def make_loader(train_data: SegData, config: FitConfig, local_batch: int, ctx: distributed.DistContext) -> tuple[EpochSampler, DataLoader]:
    """The training batches: a random annotator per slice, shuffled by (seed, epoch),
    sharded over ranks. Returns the sampler (to position it) and the loader."""
    dataset = SegDataset(train_data, random_annotator=True)
    sampler = EpochSampler(dataset, seed=config.seed, num_replicas=ctx.world_size, rank=ctx.rank)
    # its own generator: starting an iterator draws a seed from it, and drawing from the global RNG
    # instead would make a mid-epoch resume (a new iterator) shift every later draw
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, collate_fn=collate_batch,
                        generator=torch.Generator().manual_seed(config.seed))
    return sampler, loader


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
    def build_model(self) -> None:
        """The model, its weights drawn from ``config.seed`` (before the data is read: a
        bad ``--model-arg`` fails at once)."""
        cfg = self.config
        pyro.clear_param_store()  # a stale store would shadow freshly built networks
        pyro.set_rng_seed(cfg.seed)  # torch, numpy and random
        model = build_model(cfg.model, image_size=cfg.image_size, widths=cfg.widths, **cfg.model_args).to(self.device)
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
            seed=cfg.seed,
            synthetic_patients=cfg.synthetic_patients,
            synthetic_slices=cfg.synthetic_slices,
            cache_dir=cfg.cache_dir,
            progress=self.cb.on_load_progress,
        ))
        split = split_patients(self.data.patient_ids, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed)
        self.split = split
        self.train_data, self.val_data = self.data.subset(split["train"]), self.data.subset(split["val"])
        self.cb.on_data({**self.data.summary(), "train_slices": len(self.train_data), "val_slices": len(self.val_data),
                         "train_patients": len(split["train"]), "val_patients": len(split["val"]), "test_patients": len(split["test"])})
        ctx.check_consistent(lambda: _data_fingerprint(self.train_data, self.val_data),
                             what="after loading --data", hint="every process must read the same data (shared storage, same files)")

    # -- build_trainer ------------------------------------------------------------------------------
    def build_trainer(self) -> None:
        """The optimizer and its guards (wrapped for data parallelism), the batches, and GECO."""
        cfg, ctx = self.config, self.ctx
        self.trainer = trainer = Trainer(self.model, lr=cfg.lr, elbo=cfg.elbo, clip_norm=cfg.clip_norm,
                                         max_nonfinite=cfg.max_nonfinite, free_bits=cfg.free_bits)
        if ctx.enabled:  # DDP averages gradients in backward; beta = 0 leaves a prior net unused
            trainer.loss_fn = ctx.wrap(trainer.loss_fn, find_unused_parameters=self.model.has_latent)
            trainer.reduce = ctx.mean
        self.sampler, self.loader = make_loader(self.train_data, cfg, self.local_batch, ctx)
        self.steps_per_epoch = math.ceil(self.sampler.num_samples / self.local_batch)
        self.geco: GECO | None = (geco_from_config(cfg, self.train_data.masks, self.steps_per_epoch)
                                  if cfg.objective == "geco" else None)

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
                _restore_rng(ckpt, ctx, self.config.seed, self.progress.global_step)
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
            ctx.seed(self.config.seed)  # as for a new run: each rank its own z noise
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
        ctx.seed(cfg.seed)  # after the model is built: each rank its own z noise
        if ctx.is_main:
            write_json(out / SPLIT, {"seed": cfg.seed, "val_fraction": cfg.val_fraction,
                                     "test_fraction": cfg.test_fraction, **self.split})
            write_json(out / CONFIG, doc)

    # -- train: the epoch loop ----------------------------------------------------------------------
    def train(self, *, checkpoint_every: int | None = None) -> None:
        """Epochs until ``config.epochs``: steps (checkpointing every
        ``checkpoint_every`` steps within an epoch), then :meth:`end_epoch`."""
        self.model.train()
        while self.progress.epoch < self.config.epochs:
            self.train_epoch(checkpoint_every)
            self.end_epoch()

    def train_epoch(self, checkpoint_every: int | None) -> None:
        """The remaining steps of the current epoch (all of them, or those after a mid-epoch checkpoint)."""
        cfg, p, trainer, geco = self.config, self.progress, self.trainer, self.geco
        self.sampler.set_position(p.epoch, skip=p.batch_in_epoch * self.local_batch)
        self.cb.on_epoch_start(p.epoch, cfg.epochs, self.steps_per_epoch - p.batch_in_epoch)
        t0 = time.perf_counter()
        for batch in self.loader:
            beta = beta_at(p.epoch + p.batch_in_epoch / self.steps_per_epoch, beta=cfg.beta, warmup=cfg.beta_warmup, cycle=cfg.beta_cycle)
            image = batch["image"].to(self.device, non_blocking=True)
            mask = batch["mask"].to(self.device, non_blocking=True)
            likelihood = geco.likelihood() if geco is not None else contextlib.nullcontext()  # GECO's top-k mask
            with likelihood:
                outcome = trainer.step(image, mask, beta=beta, recon_scale=geco.recon_scale if geco else 1.0)
            if geco is not None and outcome.applied:  # C of the global batch: identical on every rank
                recon = outcome.terms["recon"] if trainer.reduce is None else trainer.reduce(outcome.terms["recon"])
                geco.update(float(recon), likelihood.pixels_per_image)  # nats per image over the pixels counted
            if outcome.applied:  # the loss is the global batch's: count every rank's images
                p.partial["loss_sum"] += outcome.loss * (image.shape[0] * self.ctx.world_size)
                p.partial["count"] += image.shape[0] * self.ctx.world_size
            p.batch_in_epoch += 1
            p.global_step += 1
            self.cb.on_step(outcome.loss)
            if checkpoint_every and p.global_step % checkpoint_every == 0 and p.batch_in_epoch < self.steps_per_epoch:
                p.partial["train_time"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                self.checkpoint()
        self.epoch_train_time = p.partial["train_time"] + time.perf_counter() - t0

    def end_epoch(self) -> None:
        """The epoch's row (train loss, beta, GECO, validation), then a checkpoint and metrics.csv."""
        cfg, p, ctx = self.config, self.progress, self.ctx
        t1 = time.perf_counter()
        row: dict[str, Any] = {
            "epoch": p.epoch + 1,
            "step": p.global_step,
            "beta": beta_at(p.epoch + 1, beta=cfg.beta, warmup=cfg.beta_warmup, cycle=cfg.beta_cycle),
            "train_loss": p.partial["loss_sum"] / max(p.partial["count"], 1) if p.partial["count"] else float("nan"),
        }
        if self.geco is not None:
            row.update(self.geco.log_row())
        row.update(ctx.on_main(lambda: _validate(self.model, self.val_data, cfg, self.device)))  # rank 0's, on every rank
        self.model.train()
        row["nonfinite_steps"] = self.trainer.nonfinite_total
        row["train_time_s"] = self.epoch_train_time
        row["val_time_s"] = time.perf_counter() - t1
        p.history.append(row)
        p.epoch += 1
        p.batch_in_epoch = 0
        p.partial = _fresh_partial()
        ctx.check_consistent(lambda: _rank_state(self.model, self.trainer, p.global_step, self.geco), what=f"after epoch {p.epoch}")
        self.checkpoint()
        if ctx.is_main:
            write_metrics_csv(self.out / METRICS, p.history)
        self.cb.on_epoch_end(row)

    def checkpoint(self) -> None:
        """Write ``checkpoint.pt`` (rank 0; every rank hands in its RNG state)."""
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
