"""The ``overhead`` item: Pyro's overhead. One training step of our :class:`~pyroseg.train.Trainer`
and of ``pyro.infer.SVI.step`` against the hand-written PyTorch twin
(:mod:`benchmarks.plain`): same network, loss, optimiser and batch.

Variants: ``plain`` (the twin, ``loss.item()`` every step: the yardstick),
``plain_nosync`` (the twin without ``.item()``), ``trainer`` (the Trainer as
``fit`` builds it for the device: loop Adam on CPU; fused Adam with the guard on
the device on a GPU), ``trainer_fused`` (CPU only: the GPU's configuration, fused
Adam, counters read every 50 steps), ``trainer_loop`` (GPU only: loop Adam, whose
guard decides on the host: one sync per step), ``trainer_host_sync`` (pyroseg's
earlier step, which reads the loss and gradient norm on the host:
:mod:`benchmarks.host_sync_step`) and ``svi``. Each timed call runs
``Settings.block`` steps in a row (20 on a GPU: a sync after every step would
hide what a step that never waits gains); the figures are per step.

Target: ratio <= 1.10 for ``unet`` and ``prob_unet`` (on a GPU: 1.05 for
``unet``).
"""

from __future__ import annotations

import copy
import logging

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, TraceMeanField_ELBO

from benchmarks.common import Settings, interleave, median, median_ratio, random_batch, repeat
from benchmarks.host_sync_step import HostSyncTrainer
from benchmarks.plain import PlainStep, check_same_loss
from pyroseg.models import build_model
from pyroseg.train import Trainer

__all__ = ["run"]

log = logging.getLogger(__name__)

TARGET = 1.10


def _svi_step(model, batch_size: int):
    """``SVI.step`` with ``pyro.optim.Adam`` and the loss per image, as in tests/test_train.py.

    The param store is cleared before each step: every variant registers its
    networks under the same names, and a stale store would make SVI step the
    tensors of another variant (the stale-param-store pitfall)."""
    scale = 1.0 / batch_size
    svi = SVI(
        poutine.scale(model.model, scale=scale),
        poutine.scale(model.guide, scale=scale),
        pyro.optim.Adam({"lr": 1e-3}),
        TraceMeanField_ELBO(),
    )

    def step(image, mask):
        pyro.clear_param_store()
        return svi.step(image, mask, beta=1.0)

    return step


def variants(name: str, s: Settings, device) -> dict:
    """The three steps to compare, each on its own copy of one freshly built model."""
    pyro.set_rng_seed(0)
    base = build_model(name, image_size=s.overhead_size).to(device)
    image, mask = random_batch(s.batch, s.overhead_size, device=device)
    plain = PlainStep(copy.deepcopy(base))
    plain_nosync = PlainStep(copy.deepcopy(base))
    gpu = torch.device(device).type == "cuda"
    trainers = {"trainer": Trainer(copy.deepcopy(base)), "trainer_host_sync": HostSyncTrainer(copy.deepcopy(base))}
    if gpu:
        trainers["trainer_loop"] = Trainer(copy.deepcopy(base), fused_adam=False)
    else:
        trainers["trainer_fused"] = Trainer(copy.deepcopy(base), fused_adam=True, check_every=50)
    svi = _svi_step(copy.deepcopy(base), s.batch)

    def trainer_step(trainer):
        def step():
            pyro.clear_param_store()
            return trainer.step(image, mask, beta=1.0)
        return step

    fns = {
        "plain": lambda: plain.step(image, mask, 1.0),
        "plain_nosync": lambda: plain_nosync.step(image, mask, 1.0, item=False),
        **{k: trainer_step(t) for k, t in trainers.items()},
        "svi": lambda: svi(image, mask),
    }
    return {k: repeat(f, s.block) for k, f in fns.items()}, base, (image, mask)


def run(s: Settings) -> dict:
    rows = []
    for name in s.overhead_models:
        fns, base, (image, mask) = variants(name, s, s.device)
        same = check_same_loss(copy.deepcopy(base), image, mask)
        times = interleave(fns, warmup=s.overhead_warmup, repeats=s.overhead_repeats, device=s.device)
        for v in fns:
            ratio = median_ratio(times[v], times["plain"])
            rows.append({
                "model": name,
                "variant": v,
                "median_ms": 1e3 * median(times[v]) / s.block,
                "ratio_vs_plain": ratio,
                "ratio_vs_plain_nosync": median_ratio(times[v], times["plain_nosync"]),
                "meets_target": None if v.startswith("plain") else ratio <= TARGET,
            })
        rows[-1]["loss_rel_diff_plain_vs_pyro"] = same
        got = {r["variant"]: r["ratio_vs_plain"] for r in rows if r["model"] == name}
        log.info("overhead %s: %s of plain", name, ", ".join(f"{k} {v:.3f}x" for k, v in got.items()))
    return {
        "what": f"one training step, batch {s.batch}, {s.overhead_size}x{s.overhead_size}, timed {s.block} in a row, "
                f"{s.overhead_repeats} interleaved repeats after {s.overhead_warmup} warm-up; "
                "ratio = median of per-round ratios to the hand-written PyTorch step",
        "target": f"ratio <= {TARGET}",
        "rows": rows,
    }
