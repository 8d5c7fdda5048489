"""KL-annealing (beta) and learning-rate schedules: pure functions of training progress.

``progress`` is measured in epochs and may be fractional (epoch + fraction of
its steps done), so beta and the learning rate move every step, not in jumps
at epoch ends. Being functions of the position alone, they need no state of
their own in a checkpoint: a resumed run recomputes them from the saved step.
"""

from __future__ import annotations

import math

__all__ = ["beta_at", "lr_at"]


def beta_at(progress: float, *, beta: float = 1.0, warmup: float = 0.0, cycle: float = 0.0) -> float:
    """The KL weight after ``progress`` epochs.

    * constant: ``warmup = cycle = 0`` -> ``beta``;
    * linear warm-up: ``warmup = W > 0`` -> ``beta * min(1, progress / W)``;
    * cyclical (Fu et al. 2019): ``cycle = C > 0`` -> within each cycle of ``C``
      epochs, a linear ramp from 0 to ``beta`` over the first half, then
      ``beta`` for the second half. ``warmup`` is ignored when ``cycle`` is set.

    >>> beta_at(5, warmup=20)
    0.25
    >>> beta_at(3, cycle=4), beta_at(5, cycle=4)
    (1.0, 0.5)
    """
    if progress < 0 or beta < 0 or warmup < 0 or cycle < 0:
        raise ValueError(f"beta_at: progress, beta, warmup and cycle must be >= 0 (got {progress}, {beta}, {warmup}, {cycle})")
    if cycle > 0:
        phase = math.fmod(progress, cycle) / (cycle / 2)
        return beta * min(1.0, phase)
    if warmup > 0:
        return beta * min(1.0, progress / warmup)
    return beta


def lr_at(progress: float, *, lr: float, schedule: str = "constant", warmup: float = 0.0, epochs: float = 1.0) -> float:
    """The learning rate after ``progress`` of ``epochs`` epochs.

    A linear warm-up from 0 to ``lr`` over the first ``warmup`` epochs (0: none),
    then, over the rest of the run:

    * ``constant``: ``lr``;
    * ``cosine``: half a cosine from ``lr`` to 0 at ``epochs`` (Loshchilov &
      Hutter 2017, SGDR without restarts);
    * ``step``: ``lr``, divided by 10 at 50 % and again at 75 % of ``epochs``
      (the ResNet-style decay).

    >>> lr_at(0.5, lr=1.0, warmup=1)
    0.5
    >>> round(lr_at(6, lr=1.0, schedule="cosine", warmup=2, epochs=10), 6)
    0.5
    >>> lr_at(8, lr=1.0, schedule="step", epochs=10)
    0.01
    """
    if progress < 0 or lr <= 0 or warmup < 0 or epochs <= 0:
        raise ValueError(f"lr_at: need progress >= 0, lr > 0, warmup >= 0, epochs > 0 (got {progress}, {lr}, {warmup}, {epochs})")
    if warmup > 0 and progress < warmup:
        return lr * progress / warmup
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = epochs - warmup
        done = min(1.0, (progress - warmup) / span) if span > 0 else 1.0
        return lr * 0.5 * (1.0 + math.cos(math.pi * done))
    if schedule == "step":
        return lr * (1.0, 0.1, 0.01)[(progress >= 0.5 * epochs) + (progress >= 0.75 * epochs)]
    raise ValueError(f"lr_at: unknown schedule {schedule!r}: expected constant, cosine or step")
