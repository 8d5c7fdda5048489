"""KL-annealing schedules: constant, linear warm-up, cyclical."""

from __future__ import annotations

import pytest

from pyroseg.schedules import beta_at


@pytest.mark.parametrize("progress", [0, 0.3, 1, 7.5, 1000])
def test_constant(progress):
    assert beta_at(progress) == 1.0
    assert beta_at(progress, beta=0.25) == 0.25
    assert beta_at(progress, beta=0.0) == 0.0


@pytest.mark.parametrize(
    "progress, expected",
    [(0, 0.0), (0.5, 0.05), (1, 0.1), (2.5, 0.25), (5, 0.5), (9.9, 0.99), (10, 1.0), (10.5, 1.0), (100, 1.0)],
)
def test_linear_warmup(progress, expected):
    assert beta_at(progress, warmup=10) == pytest.approx(expected)
    assert beta_at(progress, beta=4.0, warmup=10) == pytest.approx(4 * expected)


def test_linear_warmup_moves_every_step():
    """Fractional progress (epoch + fraction of its steps) moves beta within an epoch."""
    steps = [beta_at(e + s / 4, warmup=2) for e in range(2) for s in range(4)]
    assert steps == pytest.approx([0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875])
    assert all(b > a for a, b in zip(steps, steps[1:]))
    assert beta_at(5, warmup=20) == 0.25  # the docstring's example


@pytest.mark.parametrize(
    "progress, expected",
    [
        (0, 0.0), (0.5, 0.25), (1, 0.5), (1.5, 0.75), (2, 1.0), (3, 1.0), (3.99, 1.0),  # first cycle
        (4, 0.0), (5, 0.5), (6, 1.0), (7.5, 1.0),  # second cycle: ramp again
        (41, 0.5),  # eleventh cycle
    ],
)
def test_cyclical(progress, expected):
    assert beta_at(progress, cycle=4) == pytest.approx(expected)
    assert beta_at(progress, beta=2.0, cycle=4) == pytest.approx(2 * expected)


def test_cyclical_ignores_warmup():
    for p in (0.5, 1, 2, 4, 5, 9):
        assert beta_at(p, warmup=100, cycle=4) == beta_at(p, cycle=4)
    assert beta_at(5, warmup=100, cycle=4) == pytest.approx(0.5)  # warm-up alone would give 0.05
    assert beta_at(3, cycle=4) == 1.0 and beta_at(5, cycle=4) == 0.5  # the docstring's example


@pytest.mark.parametrize(
    "kwargs",
    [dict(progress=-0.1), dict(progress=1, beta=-1), dict(progress=1, warmup=-2), dict(progress=1, cycle=-4)],
)
def test_negative_inputs_raise(kwargs):
    progress = kwargs.pop("progress")
    with pytest.raises(ValueError, match=">= 0"):
        beta_at(progress, **kwargs)
