"""Choosing the bias by linear programming (eqs. 6-10) and the soft bias loss (eq. 5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bmoe.bias import bias_loss, expected_cost, select_bias, select_bias_for_performance

FAST = settings(max_examples=80, deadline=None)

# Table I / Table II: SSD experts at R = 100, 150, 300 px.
D_TABLE_I = np.array([120.0, 270.0, 1080.0])  # kB
P_TABLE_II = np.array([57.91, 64.60, 80.01])  # mAP %


# --------------------------------------------------------------------------- hand-worked LP


def test_table_i_mix_at_half_the_largest_cost():
    # d_t = 1080 / 2 = 540. Only pairs of experts can be optimal (two equality constraints):
    #   E1+E3: b3 = (540-120)/960 = 0.4375 -> 0.5625*57.91 + 0.4375*80.01 = 67.58
    #   E2+E3: b3 = (540-270)/810 = 1/3    -> (2/3)*64.60 + (1/3)*80.01   = 69.737
    #   E1+E2: cannot reach 540.
    b = select_bias(D_TABLE_I, P_TABLE_II, 540.0)
    np.testing.assert_allclose(b, [0.0, 2 / 3, 1 / 3], atol=1e-9)
    assert float(b @ P_TABLE_II) == pytest.approx(69.7367, abs=1e-3)
    assert round(float(b @ P_TABLE_II), 1) == 69.7
    assert expected_cost(b, D_TABLE_I) == pytest.approx(540.0)


def test_table_i_mix_at_a_third_and_at_the_largest_cost():
    # d_t = 360: E2+E3 with b3 = 90/810 = 1/9 -> (8/9)*64.60 + (1/9)*80.01 = 66.312
    # (E1+E3: b3 = 0.25 -> 63.435; E1+E2 cannot reach 360)
    b = select_bias(D_TABLE_I, P_TABLE_II, 360.0)
    np.testing.assert_allclose(b, [0.0, 8 / 9, 1 / 9], atol=1e-9)
    assert float(b @ P_TABLE_II) == pytest.approx(66.3122, abs=1e-3)
    np.testing.assert_allclose(select_bias(D_TABLE_I, P_TABLE_II, 1080.0), [0, 0, 1], atol=1e-9)
    np.testing.assert_allclose(select_bias(D_TABLE_I, P_TABLE_II, 120.0), [1, 0, 0], atol=1e-9)


def test_performance_target_is_the_dual_of_the_cost_target():
    # asking for the 69.737 mAP of the d_t = 540 mix at least cost gives back that mix:
    #   E1+E3 would need b3 = (69.737-57.91)/22.10 = 0.535 -> cost 633.8; E2+E3 costs 540.
    p_t = (2 / 3) * 64.60 + (1 / 3) * 80.01
    b = select_bias_for_performance(D_TABLE_I, P_TABLE_II, p_t)
    np.testing.assert_allclose(b, [0.0, 2 / 3, 1 / 3], atol=1e-9)
    assert expected_cost(b, D_TABLE_I) == pytest.approx(540.0)


def test_targets_outside_the_range_name_the_range():
    with pytest.raises(ValueError, match=r"^d_target=50 is outside \[120, 1080\]$"):
        select_bias(D_TABLE_I, P_TABLE_II, 50)
    with pytest.raises(ValueError, match=r"^d_target=2000 is outside \[120, 1080\]$"):
        select_bias(D_TABLE_I, P_TABLE_II, 2000)
    with pytest.raises(ValueError, match=r"^p_target=90 is outside \[57.91, 80.01\]$"):
        select_bias_for_performance(D_TABLE_I, P_TABLE_II, 90)
    with pytest.raises(ValueError, match=r"^p_target=50 is outside \[57.91, 80.01\]$"):
        select_bias_for_performance(D_TABLE_I, P_TABLE_II, 50)


def test_malformed_cost_and_performance_vectors_are_rejected():
    with pytest.raises(ValueError, match="equal length"):
        select_bias([1.0, 2.0], [1.0], 1.5)
    with pytest.raises(ValueError, match="finite"):
        select_bias([1.0, np.nan], [1.0, 2.0], 1.0)


# --------------------------------------------------------------------------- LP vs brute force


def best_pair(objective: np.ndarray, equality: np.ndarray, target: float, maximise: bool) -> float:
    """Optimum of the LP over {b >= 0, sum b = 1, b.equality = target}: a vertex has at most
    two non-zero entries, so enumerate every singleton and pair that can hit the target."""
    sign = 1.0 if maximise else -1.0
    scale = max(1.0, float(np.abs(equality).max()))
    best = -np.inf
    N = len(objective)
    for i in range(N):
        if abs(equality[i] - target) <= 1e-9 * scale:
            best = max(best, sign * objective[i])
        for j in range(N):
            if equality[i] < target < equality[j]:
                w_j = (target - equality[i]) / (equality[j] - equality[i])
                best = max(best, sign * ((1 - w_j) * objective[i] + w_j * objective[j]))
    return sign * best


@st.composite
def experts(draw):
    n = draw(st.integers(1, 6))
    d = draw(st.lists(st.integers(1, 2000), min_size=n, max_size=n))
    # performances with two decimals, like Table II's mAPs: the LP's feasibility tolerance
    # (~1e-7) cannot tell apart performances closer than that, so keep them apart
    p = draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n))
    return np.asarray(d, dtype=np.float64), np.asarray(p, dtype=np.float64) / 100


@st.composite
def target_in(draw, values: np.ndarray):
    if draw(st.booleans()):
        return float(draw(st.sampled_from(list(values))))  # exactly one expert's value
    t = draw(st.floats(0, 1))
    return float(values.min() + t * (values.max() - values.min()))


def check_distribution(b: np.ndarray, N: int):
    assert b.shape == (N,)
    assert np.all(b >= 0)
    assert float(b.sum()) == pytest.approx(1.0, abs=1e-12)


@FAST
@given(st.data())
def test_select_bias_meets_the_constraints_and_is_optimal(data):
    d, p = data.draw(experts())
    d_t = data.draw(target_in(d))
    b = select_bias(d, p, d_t)
    check_distribution(b, len(d))
    assert float(b @ d) == pytest.approx(d_t, rel=1e-7, abs=1e-7)
    assert float(b @ p) == pytest.approx(best_pair(p, d, d_t, maximise=True), rel=1e-7, abs=1e-6)


@FAST
@given(st.data())
def test_select_bias_for_performance_meets_the_constraints_and_is_optimal(data):
    d, p = data.draw(experts())
    p_t = data.draw(target_in(p))
    b = select_bias_for_performance(d, p, p_t)
    check_distribution(b, len(d))
    assert float(b @ p) == pytest.approx(p_t, rel=1e-7, abs=1e-6)
    assert float(b @ d) == pytest.approx(best_pair(d, p, p_t, maximise=False), rel=1e-7, abs=1e-6)


@FAST
@given(st.data())
def test_more_budget_never_lowers_the_expected_performance_when_the_dearest_is_best(data):
    d, p = data.draw(experts())
    p[np.argmax(d)] = p.max() + data.draw(st.floats(0, 10))  # the dearest expert is the best
    t1, t2 = sorted(data.draw(st.tuples(st.floats(0, 1), st.floats(0, 1))))
    lo, hi = d.min(), d.max()
    perf_1 = float(select_bias(d, p, lo + t1 * (hi - lo)) @ p)
    perf_2 = float(select_bias(d, p, lo + t2 * (hi - lo)) @ p)
    # f(d_t) = max b.p s.t. b.d = d_t is concave in d_t with f(d_max) = the dearest expert's
    # performance; with that the maximum, a concave f is non-decreasing.
    assert perf_2 >= perf_1 - 1e-6


# --------------------------------------------------------------------------- eq. 5


def test_bias_loss_by_hand():
    u = torch.tensor([0.5, 0.5, 0.0])
    b = [0.25, 0.25, 0.5]
    # u - b = [.25, .25, -.5], ||.||_2 = sqrt(0.375); / sqrt 2 = sqrt(0.1875) = sqrt(3)/4
    # l = -2 log(1 - sqrt(3)/4) = -2 log(0.566987) = 1.134837
    loss = bias_loss(u, b, w_bias=2.0)
    assert float(loss) == pytest.approx(-2 * math.log(1 - math.sqrt(3) / 4), rel=1e-6)
    assert float(loss) == pytest.approx(1.134837, abs=1e-5)
    assert float(bias_loss(u, [0.5, 0.5, 0.0], w_bias=2.0)) == pytest.approx(0.0, abs=1e-7)
    assert float(bias_loss(u, b, w_bias=0.5)) == pytest.approx(float(loss) / 4, rel=1e-6)


def test_bias_loss_is_differentiable():
    u = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: bias_loss(v, b, 1.5), (u,))
    loss = bias_loss(u, b, 1.5)
    loss.backward()
    # d/du = w / (1 - r) * (u - b) / (sqrt 2 ||u - b||), r = ||u - b|| / sqrt 2
    diff = (u - b).detach()
    norm = float(torch.linalg.vector_norm(diff))
    r = norm / math.sqrt(2)
    expected = 1.5 / (1 - r) * diff / (math.sqrt(2) * norm)
    torch.testing.assert_close(u.grad, expected)


def test_bias_loss_stays_finite_for_disjoint_one_hots():
    u = torch.tensor([1.0, 0.0], requires_grad=True)
    loss = bias_loss(u, [0.0, 1.0], 1.0)  # ||u - b|| = sqrt 2: the log's argument hits 0
    assert torch.isfinite(loss) and float(loss.detach()) > 10
    loss.backward()
    assert torch.isfinite(u.grad).all()


@FAST
@given(st.integers(2, 6), st.integers(0, 2**31 - 1), st.floats(0.1, 10))
def test_bias_loss_grows_with_the_distance_to_the_bias(N, seed, w):
    rng = np.random.default_rng(seed)
    b = rng.dirichlet(np.ones(N))
    u = rng.dirichlet(np.ones(N))
    near = b + 0.5 * (u - b)  # halfway from b to u: half the distance
    loss_far = float(bias_loss(torch.tensor(u), b, w))
    loss_near = float(bias_loss(torch.tensor(near), b, w))
    assert 0 <= loss_near <= loss_far
    dist = np.linalg.norm(u - b) / math.sqrt(2)
    assert loss_far == pytest.approx(-w * math.log(1 - dist), rel=1e-9)
