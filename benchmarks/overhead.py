"""Item 1: Pyro's overhead. One training step of our :class:`~pyroseg.train.Trainer`
and of ``pyro.infer.SVI.step`` against the hand-written PyTorch twin
(:mod:`benchmarks.plain`): same network, loss, optimiser and batch.

Target: ratio <= 1.10 for ``unet`` and ``prob_unet``.
"""

from __future__ import annotations

import copy
import logging

import pyro
from pyro import poutine
from pyro.infer import SVI, TraceMeanField_ELBO

from benchmarks.common import Settings, interleave, median, median_ratio, random_batch
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
    trainer = Trainer(copy.deepcopy(base))
    svi = _svi_step(copy.deepcopy(base), s.batch)

    def trainer_step():
        pyro.clear_param_store()
        return trainer.step(image, mask, beta=1.0)

    return {
        "plain": lambda: plain.step(image, mask, 1.0),
        "trainer": trainer_step,
        "svi": lambda: svi(image, mask),
    }, base, (image, mask)


def run(s: Settings) -> dict:
    rows = []
    for name in s.overhead_models:
        fns, base, (image, mask) = variants(name, s, s.device)
        same = check_same_loss(copy.deepcopy(base), image, mask)
        times = interleave(fns, warmup=s.overhead_warmup, repeats=s.overhead_repeats, device=s.device)
        for v in ("plain", "trainer", "svi"):
            ratio = median_ratio(times[v], times["plain"])
            rows.append({
                "model": name,
                "variant": v,
                "median_ms": 1e3 * median(times[v]),
                "ratio_vs_plain": ratio,
                "meets_target": None if v == "plain" else ratio <= TARGET,
            })
        rows[-1]["loss_rel_diff_plain_vs_pyro"] = same
        log.info("overhead %s: trainer %.3fx, svi %.3fx of plain", name, rows[-2]["ratio_vs_plain"], rows[-1]["ratio_vs_plain"])
    return {
        "what": f"one training step, batch {s.batch}, {s.overhead_size}x{s.overhead_size}, "
                f"{s.overhead_repeats} interleaved repeats after {s.overhead_warmup} warm-up; "
                "ratio = median of per-round ratios to the hand-written PyTorch step",
        "target": f"ratio <= {TARGET}",
        "rows": rows,
    }
