"""KL-annealing (beta) schedules: pure functions of training progress.

``progress`` is measured in epochs and may be fractional (epoch + fraction of
its steps done), so beta moves every step, not in jumps at epoch ends.
"""

from __future__ import annotations

import math

__all__ = ["beta_at"]


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
