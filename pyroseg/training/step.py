"""One SVI step: the objective as a module, the optimizer and the guards around the step.

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
through ``poutine.scale`` on the likelihood (with ``--objective geco`` the
Lagrange multiplier of :mod:`pyroseg.geco`, see :mod:`pyroseg.training.objectives`).

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

Everything here is re-exported by :mod:`pyroseg.train`, the import path to use.
"""

from __future__ import annotations

import logging

import pyro
import torch
from torch import nn

from pyroseg.config import ELBOS
from pyroseg.errors import TrainingError, UsageError
from pyroseg.models import SegModel
from pyroseg.nets import compile_networks
from pyroseg.objective import SiteELBO

__all__ = ["ELBOLoss", "StepOutcome", "Trainer", "make_elbo"]

#: the training log's name since before this module existed (what users and tests filter on)
log = logging.getLogger("pyroseg.train")


def make_elbo(kind: str, *, free_bits: float = 0.0) -> SiteELBO:
    """The objective of :mod:`pyroseg.objective`: ``"meanfield"``: analytic KL per site
    (as :class:`~pyro.infer.TraceMeanField_ELBO`); ``"trace"``: Monte Carlo KL (as
    :class:`~pyro.infer.Trace_ELBO`); ``free_bits``: a floor in nats on each latent
    site's batch-mean KL (0: off)."""
    if kind not in ELBOS:
        raise UsageError(f"--elbo {kind!r}: expected {' or '.join(ELBOS)}")
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
