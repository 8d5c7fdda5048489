"""Data-parallel training on several processes, GPUs or machines, with PyTorch's own engine.

``torchrun --nproc_per_node N -m pyroseg fit ...`` starts ``N`` copies of
``pyroseg fit``; :func:`setup` sees torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), joins the
process group (``nccl`` on GPUs, ``gloo`` on CPUs) and returns a
:class:`DistContext` that :func:`pyroseg.train.fit` uses at a handful of
places. Without torchrun it returns a context that does nothing: no process
group, no wrapper, no extra operation, so a plain run is unchanged bit for bit.

How a Pyro model/guide pair trains data-parallel here:

* :class:`~pyroseg.train.ELBOLoss` (an ``nn.Module`` holding the model whose
  ``forward`` returns the mean negative ELBO per image) is wrapped in
  :class:`~torch.nn.parallel.DistributedDataParallel` (:meth:`DistContext.wrap`).
  DDP averages gradients over ranks during ``backward``; the loss is a mean
  over each rank's images and every rank has the same number of images, so the
  average is the gradient of the global batch.
* The networks are registered with ``pyro.module`` under the same names as in a
  single process; the optimizer is a torch optimizer over the model's own
  parameters (never the param store, which ``fit`` clears first), so what DDP
  all-reduces is what the optimizer steps.
* Every rank builds the model from the same seed (DDP also broadcasts rank 0's
  weights when it wraps), then :meth:`DistContext.seed` gives each rank its own
  random stream, so ranks draw different latent noise.

**Training state that must agree across ranks.** Gradients are all-reduced, so
the weights stay bit-identical on every rank. Any *other* state that evolves
during training (a GECO Lagrange multiplier and its moving average, a
loss-driven schedule, an early-stopping counter) must be computed only from
values that are identical on every rank: reduce the per-step statistics it
consumes with :meth:`DistContext.mean` (the trainer exposes it as
``Trainer.reduce``) before updating, and list the state in the epoch-end check
(:meth:`DistContext.check_consistent`), which stops the run, naming the ranks
and the value, if they ever differ. Schedules that are pure functions of the
step (``beta_at``) agree by construction; the validation row is computed on
rank 0 and broadcast (:meth:`DistContext.broadcast`), so every rank sees the
same metrics.

Failures: every collective has a timeout (``PYROSEG_DIST_TIMEOUT`` seconds,
default 1800): a rank that hangs makes the others fail after that long instead
of waiting forever. A rank that raises exits non-zero and torchrun stops the
others. Errors that arise on rank 0 alone (refused ``--out``, bad data) are
broadcast and re-raised on every rank (:meth:`DistContext.on_main`), so each
rank stops with the same one-line message.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from pyroseg import errors
from pyroseg.errors import PyrosegError, TrainingError, UsageError

__all__ = [
    "DistContext",
    "setup",
    "launched_by_torchrun",
    "collective_errors",
    "torchrun_command",
    "env_rank",
    "rank_seed",
    "state_digest",
    "TIMEOUT_ENV",
    "DEFAULT_TIMEOUT_S",
]

log = logging.getLogger(__name__)

#: Environment variable: seconds a collective may wait for the other ranks.
TIMEOUT_ENV = "PYROSEG_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

T = TypeVar("T")


def launched_by_torchrun() -> bool:
    """True when torchrun (``torch.distributed.run``) started this process."""
    return all(k in os.environ for k in _TORCHRUN_ENV)


def env_rank() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's environment; ``(0, 1)`` without it."""
    if not launched_by_torchrun():
        return 0, 1
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def rank_seed(seed: int, rank: int, *extra: int) -> int:
    """A 32-bit seed for ``rank``'s random stream, independent of other (seed, rank) pairs.

    ``np.random.SeedSequence`` mixes the entropy, so ``(seed=0, rank=1)`` and
    ``(seed=1, rank=0)`` give unrelated streams (``seed + rank`` would not).
    """
    return int(np.random.SeedSequence([int(seed), int(rank), *map(int, extra)]).generate_state(1)[0])


def state_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the exact bytes of ``tensors`` (in key order): equal iff bit-identical."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _Mirrored:
    """An error raised on rank 0, carried to the other ranks by :meth:`DistContext.on_main`."""

    def __init__(self, err: PyrosegError):
        self.kind = type(err).__name__
        self.message = str(err)


def _rebuild(m: _Mirrored) -> PyrosegError:
    cls = getattr(errors, m.kind, None)
    if not (isinstance(cls, type) and issubclass(cls, PyrosegError)):
        cls = PyrosegError
    err = cls(m.message)
    err.mirrored = True  # the CLI prints it on rank 0 only
    return err


@dataclass
class DistContext:
    """Where this process stands in a data-parallel job, and the collectives ``fit`` uses.

    With ``world_size == 1`` and no process group (``enabled`` false: not
    launched by torchrun) every method is the identity or a no-op.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """A process group exists (torchrun launched us), even with one process."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "backend": self.backend, "device": str(self.device)}

    # -- the model -----------------------------------------------------------------------
    def wrap(self, module: nn.Module, *, find_unused_parameters: bool = False) -> nn.Module:
        """``module`` in :class:`~torch.nn.parallel.DistributedDataParallel` (itself when not distributed).

        ``find_unused_parameters``: needed when some parameters may get no
        gradient in a step (a latent site masked out at ``beta = 0`` leaves its
        prior network out of the loss).
        """
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused_parameters)

    def seed(self, seed: int, *extra: int) -> None:
        """Give this rank its own torch/numpy/random stream (after the model is built)."""
        if self.enabled:
            import pyro

            pyro.set_rng_seed(rank_seed(seed, self.rank, *extra))

    # -- collectives ---------------------------------------------------------------------
    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over ranks (a new tensor; ``value`` itself when not distributed)."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.world_size

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (picklable objects; tensors should be on the CPU)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self._object_device())
        return box[0]

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def on_main(self, fn: Callable[[], T], *, share: bool = True) -> T | None:
        """Run ``fn`` on rank 0 only; its result (when ``share``; else ``None``
        on the other ranks) or its :class:`~pyroseg.errors.PyrosegError` reaches
        every rank.

        Without this, an error on rank 0 alone (``--out`` refused, an unreadable
        checkpoint) would leave the other ranks waiting in their next collective.
        """
        if not self.enabled:
            return fn()
        value: Any = None
        status: Any = None
        if self.is_main:
            try:
                value = fn()
            except PyrosegError as e:
                self.broadcast(("err", _Mirrored(e)))
                raise
            status = ("ok", value if share else None)
        status = self.broadcast(status)
        if status[0] == "err":
            raise _rebuild(status[1])
        return value if self.is_main else status[1]

    def main_first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on every rank, rank 0 first (it fills a cache the others then read).

        An error on rank 0 is raised on every rank; an error on another rank is its own.
        """
        if not self.enabled:
            return fn()
        out = self.on_main(fn, share=False)
        return out if self.is_main else fn()  # type: ignore[return-value]

    def check_consistent(self, values: Callable[[], dict[str, Any]], *, what: str, hint: str = "") -> None:
        """Stop with :class:`TrainingError` when ``values()`` differ between ranks.

        ``values`` returns a dict from a name to something comparable with
        ``==`` (a digest, a step count, a float of training state); it is called
        only in a data-parallel run. The message names the first differing value
        and every rank's value of it, then ``hint``.
        """
        if not self.enabled:
            return
        values = values()
        everyone = self.gather(values)
        for key in values:
            seen = [v.get(key) for v in everyone]
            if any(s != seen[0] for s in seen[1:]):
                shown = ", ".join(f"rank {r}: {_short(s)}" for r, s in enumerate(seen))
                raise TrainingError(f"the {self.world_size} processes disagree on {key} {what} ({shown}); "
                                    f"{hint or 'training stopped'}")
        if self.is_main:
            log.info("the %d processes agree %s: %s", self.world_size, what,
                     ", ".join(f"{k} {_short(v)}" for k, v in values.items()))

    def _object_device(self) -> torch.device | None:
        return self.device if self.backend == "nccl" else None

    def close(self) -> None:
        """Leave the process group if :func:`setup` made it.

        Drop the DDP wrappers of :meth:`wrap` first (e.g. ``trainer.loss_fn =
        trainer.elbo_loss``): a wrapper that outlives this call keeps the process
        group alive until the interpreter exits, and gloo's threads torn down
        that late abort the process ("terminate called without an active
        exception", seen in 1 of 5 two-rank test runs). The wrappers sit in
        reference cycles, hence the ``gc.collect()``.
        """
        if self.owns_group:
            import gc

            import torch.distributed as dist

            gc.collect()  # free dropped DDP wrappers (and their process-group references) now
            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


@contextlib.contextmanager
def collective_errors() -> Iterator[None]:
    """Under torchrun, turn a failed or timed-out collective into a one-line
    :class:`TrainingError` naming this rank (elsewhere: nothing).

    A rank that died closes its connections (gloo: "Connection closed by
    peer"), so the others fail at once; one that hangs makes the others' next
    collective time out after ``PYROSEG_DIST_TIMEOUT`` seconds.
    """
    if not launched_by_torchrun():
        yield
        return
    try:
        yield
    except PyrosegError:
        raise
    except RuntimeError as e:  # DistBackendError and gloo/nccl errors are RuntimeErrors
        text = str(e)
        first = next((s.strip() for s in text.splitlines() if s.strip()), type(e).__name__)
        first = re.sub(r"\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", first)  # gloo's source location
        lowered = text.lower()
        if "timed out" in lowered or "timeout" in lowered:
            why = (f"waited {_timeout_from_env():g} s for the other processes ({TIMEOUT_ENV}): one of them is stuck "
                   "or much slower")
        elif any(s in lowered for s in ("connection closed", "connection reset", "broken pipe", "peer", "nccl")):
            why = "lost the connection to another process: it probably failed first (see its message)"
        else:
            raise
        raise TrainingError(f"{why} [{first[:160]}]") from e


def _short(v: Any) -> str:
    s = str(v)
    return s[:12] if len(s) == 64 else s  # sha256 digests: the first 12 hex digits


def _timeout_from_env() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


def setup(device: torch.device) -> DistContext:
    """Join torchrun's process group, or return the single-process context.

    ``device``: the device ``--device`` resolved to. Under torchrun a CUDA
    device becomes ``cuda:LOCAL_RANK`` (one GPU per process) and the backend
    ``nccl``; on the CPU the backend is ``gloo``. A process group the caller
    already made is used as it is (and not destroyed by :meth:`DistContext.close`).
    """
    if not launched_by_torchrun():
        return DistContext(device=device)
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if device.index not in (None, local_rank):
            raise UsageError(f"--device {device}: under torchrun give --device cuda (or auto); "
                             f"each process takes cuda:LOCAL_RANK itself")
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local_rank}: this machine has {torch.cuda.device_count()} GPU(s); "
                             "start at most that many processes per machine (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UsageError(f"--device {device}: data-parallel training runs on cpu or cuda")
    owns = False
    if not dist.is_initialized():
        timeout = _dt.timedelta(seconds=_timeout_from_env())
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
        if backend == "nccl":
            kwargs["device_id"] = device  # binds the communicator to this GPU at once
        dist.init_process_group(**kwargs)
        owns = True
    else:
        backend = dist.get_backend()
    ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend, owns_group=owns)
    log.info("rank %d of %d (local rank %d) on %s, backend %s", rank, world, local_rank, device, backend)
    return ctx


def torchrun_command(nproc_per_node: int, args: list[str]) -> list[str]:
    """The command that starts ``python -m pyroseg ARGS`` on ``nproc_per_node``
    processes of this machine (``torchrun --standalone``: a local rendezvous on a
    free port)."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(nproc_per_node)}",
            "-m", "pyroseg", *args]
