"""rho, the area under the performance-vs-normalised-data-cost curve (eq. 11)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bmoe.curves import rho

FAST = settings(max_examples=80, deadline=None)


def test_rho_by_hand():
    # Table I's experts as a curve: (120, 57.91), (270, 64.60), (1080, 80.01) on [120, 1080].
    # t = 0, 150/960 = 0.15625, 1:
    #   0.15625 * (57.91 + 64.60) / 2 + 0.84375 * (64.60 + 80.01) / 2 = 9.5711 + 61.0073 = 70.578
    assert rho([120, 270, 1080], [57.91, 64.60, 80.01], 120, 1080) == pytest.approx(70.5784, abs=1e-4)


def test_rho_holds_the_curve_flat_beyond_its_points():
    # points at t = 0.2 and t = 0.6 with p = 2 and 4:
    #   flat 2 on [0, .2] -> 0.4; trapezoid (2 + 4)/2 on [.2, .6] -> 1.2; flat 4 on [.6, 1] -> 1.6
    assert rho([20.0, 60.0], [2.0, 4.0], 0.0, 100.0) == pytest.approx(3.2)
    assert rho([160.0, 200.0], [2.0, 4.0], 100.0, 300.0) == pytest.approx(3.2)  # same t's
    # one point: a constant curve
    assert rho([42.0], [7.5], 0.0, 100.0) == pytest.approx(7.5)


def test_rho_rejects_bad_input():
    with pytest.raises(ValueError, match="equal length"):
        rho([1.0, 2.0], [1.0], 0.0, 3.0)
    with pytest.raises(ValueError, match="equal length"):
        rho([], [], 0.0, 3.0)
    with pytest.raises(ValueError, match="d_max > d_min"):
        rho([1.0], [1.0], 3.0, 3.0)


@FAST
@given(
    st.floats(-100, 100),  # intercept
    st.floats(-100, 100),  # slope per unit of normalised cost
    st.floats(0, 1000),  # d_min
    st.floats(1, 1000),  # d_max - d_min
    st.lists(st.floats(0, 1), max_size=8),  # interior points (normalised)
    st.randoms(use_true_random=False),
)
def test_rho_of_a_linear_curve_is_its_value_at_the_midpoint(a, k, d_min, span, interior, rnd):
    d_max = d_min + span
    t = np.array([0.0, 1.0, *interior])
    costs = d_min + t * span
    costs[0], costs[1] = d_min, d_max  # the ends exactly
    perfs = a + k * (costs - d_min) / span
    order = list(range(len(costs)))
    rnd.shuffle(order)
    value = rho(costs[order], perfs[order], d_min, d_max)
    assert value == pytest.approx(a + k / 2, rel=1e-9, abs=1e-9 * (abs(a) + abs(k) + 1))


@FAST
@given(
    st.lists(
        st.tuples(st.integers(0, 20), st.floats(-50, 50, allow_nan=False)),  # few costs -> ties
        min_size=1,
        max_size=10,
    ),
    st.randoms(use_true_random=False),
)
def test_rho_does_not_depend_on_the_order_of_the_points(points, rnd):
    costs = np.array([c for c, _ in points], dtype=np.float64) * 5 + 100
    perfs = np.array([p for _, p in points], dtype=np.float64)
    base = rho(costs, perfs, 100.0, 200.0)
    order = list(range(len(points)))
    for _ in range(3):
        rnd.shuffle(order)
        assert rho(costs[order], perfs[order], 100.0, 200.0) == pytest.approx(base, rel=1e-12, abs=1e-12)
    # the area of a curve inside [min p, max p] stays inside it
    assert perfs.min() - 1e-9 <= base <= perfs.max() + 1e-9


@FAST
@given(st.lists(st.floats(0, 1), min_size=2, max_size=8, unique=True), st.floats(0.5, 3))
def test_rho_scales_and_shifts_with_the_performance(ts, scale):
    t = np.array(ts)
    perfs = np.sin(7 * t)  # an arbitrary non-linear curve
    base = rho(t * 10, perfs, 0.0, 10.0)
    assert rho(t * 10, scale * perfs + 3, 0.0, 10.0) == pytest.approx(scale * base + 3, rel=1e-9, abs=1e-9)
    # a larger area under the curve pointwise -> a larger rho
    assert rho(t * 10, perfs + np.abs(np.cos(t)) + 0.01, 0.0, 10.0) > base
