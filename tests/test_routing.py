"""Expert selection: sparse gates (eq. 3), utility (eq. 4), quotas and Algorithm 1, random
selection, the oracle upper bound, and the lagrange routing rule built on the same costs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from bmoe.bias import bias_loss
from bmoe.lagrange import calibrate_lambda, lagrange_assignment, score_loss
from bmoe.routing import (
    enforce_bias,
    oracle_assignment,
    quotas,
    random_assignment,
    sparse_gates,
    utility,
)

FAST = settings(max_examples=60, deadline=None)


# --------------------------------------------------------------------------- strategies


@st.composite
def biases(draw, n_min: int = 1, n_max: int = 5):
    """A bias vector: non-negative, sums to 1, some entries possibly exactly zero."""
    n = draw(st.integers(n_min, n_max))
    weights = draw(st.lists(st.integers(0, 12), min_size=n, max_size=n).filter(lambda w: sum(w) > 0))
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def counts(assignment: torch.Tensor, n: int) -> np.ndarray:
    return np.bincount(assignment.numpy(), minlength=n)


def reference_algorithm_1(G: np.ndarray, K: np.ndarray) -> list[int]:
    """Algorithm 1 written out naively: expert by expert, the K_n unassigned rows with the
    highest G[:, n]; equal gate values go to the lower row index."""
    M, N = G.shape
    out = [-1] * M
    free = list(range(M))
    for n in range(N):
        chosen = sorted(free, key=lambda i: (-G[i, n], i))[: int(K[n])]
        for i in chosen:
            out[i] = n
        free = [i for i in free if i not in chosen]
    return out


# --------------------------------------------------------------------------- eq. 3 and eq. 4


def test_sparse_gates_by_hand():
    logits = torch.tensor([[0.0, math.log(2.0), 0.0], [math.log(3.0), 0.0, 0.0]])
    G = sparse_gates(logits)
    # row 0: softmax = [1, 2, 1] / 4, keep column 1; row 1: softmax = [3, 1, 1] / 5, keep column 0
    expected = torch.tensor([[0.0, 0.5, 0.0], [0.6, 0.0, 0.0]])
    torch.testing.assert_close(G, expected)


@FAST
@given(st.integers(1, 30), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_sparse_gates_keep_exactly_the_argmax_probability(M, N, seed):
    logits = torch.randn(M, N, generator=torch.Generator().manual_seed(seed)) * 3
    G = sparse_gates(logits)
    probs = torch.softmax(logits, dim=1)
    top = probs.argmax(dim=1)
    assert ((G != 0).sum(dim=1) == 1).all()
    torch.testing.assert_close(G[torch.arange(M), top], probs[torch.arange(M), top])
    # utility of sparse rows (eq. 4, rows normalised to unit mass) is the selection frequency
    u = utility(G)
    np.testing.assert_allclose(u.numpy(), np.bincount(top.numpy(), minlength=N) / M, rtol=0, atol=1e-6)
    assert abs(float(u.sum()) - 1.0) < 1e-6


def test_utility_passes_a_gradient_to_the_logits_in_the_right_direction():
    torch.manual_seed(0)
    logits = torch.randn(16, 3)
    logits[:12, 0] += 5.0  # 12 of 16 rows pick expert 0: u_0 = 0.75 > b_0
    logits[12:14, 1] += 5.0
    logits[14:, 2] += 5.0
    logits.requires_grad_(True)
    u = utility(sparse_gates(logits))
    assert abs(float(u[0].detach()) - 12 / 16) < 1e-6
    b = torch.tensor([1 / 3, 1 / 3, 1 / 3])
    loss = bias_loss(u, b, w_bias=1.0)
    loss.backward()
    grad = logits.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    # expert 0 is over-used, so descending the loss must lower its kept gate values
    assert (grad[:12, 0] > 0).all()


# --------------------------------------------------------------------------- quotas


def test_quotas_by_hand():
    assert quotas(4, [0.5, 0.25, 0.25]).tolist() == [2, 1, 1]
    # 10/3 each: floors 3,3,3, one left over; equal remainders -> lowest expert index
    assert quotas(10, [1 / 3, 1 / 3, 1 / 3]).tolist() == [4, 3, 3]
    # exact 3.5, 2.1, 1.4 -> floors 3, 2, 1; the spare input goes to the largest remainder (0.5)
    assert quotas(7, [0.5, 0.3, 0.2]).tolist() == [4, 2, 1]
    assert quotas(0, [0.2, 0.8]).tolist() == [0, 0]


@pytest.mark.parametrize("bad", [[0.5, 0.6], [1.2, -0.2], [], [0.3, 0.3]])
def test_quotas_reject_a_bias_that_is_not_a_distribution(bad):
    with pytest.raises(ValueError, match="bias must be non-negative and sum to 1"):
        quotas(8, bad)


@FAST
@given(st.integers(0, 300), biases())
def test_quotas_are_exact_largest_remainder(M, b):
    K = quotas(M, b)
    assert K.dtype.kind == "i"
    assert int(K.sum()) == M
    assert np.all(K >= 0)
    assert np.all(np.abs(K - M * b) < 1)
    assert np.all(K[b == 0] == 0)


# --------------------------------------------------------------------------- Algorithm 1


def test_algorithm_1_on_the_fig_3_example():
    # N = 3, M = 4, b = [0.5, 0.25, 0.25]  ->  K = [2, 1, 1]
    G = torch.tensor(
        [
            [0.40, 0.55, 0.05],  # row 0: argmax expert 1
            [0.50, 0.20, 0.30],  # row 1: argmax expert 0
            [0.45, 0.50, 0.05],  # row 2: argmax expert 1
            [0.70, 0.10, 0.20],  # row 3: argmax expert 0
        ]
    )
    # Expert 0 (K=2): column 0 = [0.40, 0.50, 0.45, 0.70] -> top 2 are rows 3 (0.70), 1 (0.50).
    # Expert 1 (K=1): free rows {0, 2}, column 1 = [0.55, 0.50] -> row 0.
    # Expert 2 (K=1): the only free row left is row 2 (its own best was expert 1, already full).
    assignment = enforce_bias(G, [0.5, 0.25, 0.25])
    assert assignment.dtype == torch.long
    assert assignment.tolist() == [1, 0, 2, 0]
    # the argmax routing would differ: Algorithm 1 overrides it to meet the bias
    assert G.argmax(dim=1).tolist() == [1, 0, 1, 0]


def test_algorithm_1_ties_go_to_the_lower_row_index():
    G = torch.full((5, 2), 0.5)  # every gate value equal
    assert enforce_bias(G, [0.6, 0.4]).tolist() == [0, 0, 0, 1, 1]
    G = torch.tensor([[0.2, 0.8], [0.7, 0.3], [0.2, 0.8], [0.7, 0.3], [0.2, 0.8]])
    # expert 0 takes 3: rows 1, 3 (0.7) then the lowest-index 0.2 row, row 0
    assert enforce_bias(G, [0.6, 0.4]).tolist() == [0, 0, 1, 0, 1]


def test_enforce_bias_rejects_a_bias_of_the_wrong_length():
    with pytest.raises(ValueError, match="bias has 2 entries but the gates have 3 experts"):
        enforce_bias(torch.rand(4, 3), [0.5, 0.5])


@FAST
@given(st.data())
def test_enforce_bias_matches_algorithm_1_and_meets_the_quotas(data):
    b = data.draw(biases(n_min=1, n_max=5))
    N = len(b)
    M = data.draw(st.integers(1, 40))
    levels = data.draw(st.integers(1, 5))  # few distinct values -> many ties
    raw = data.draw(st.lists(st.integers(0, levels), min_size=M * N, max_size=M * N))
    G = torch.tensor(raw, dtype=torch.float32).reshape(M, N) / levels
    K = quotas(M, b)

    assignment = enforce_bias(G, b)
    assert assignment.shape == (M,)
    assert ((assignment >= 0) & (assignment < N)).all()  # each input exactly once
    assert counts(assignment, N).tolist() == K.tolist()  # exactly K_n per expert
    assert assignment.tolist() == reference_algorithm_1(G.numpy(), K)
    # deterministic: same input, a copy of it, and a float64 copy give the same routing
    assert enforce_bias(G, b).tolist() == assignment.tolist()
    assert enforce_bias(G.clone().double(), torch.tensor(b)).tolist() == assignment.tolist()


@FAST
@given(st.integers(0, 60), biases(), st.integers(0, 2**31 - 1))
def test_random_assignment_meets_the_quotas(M, b, seed):
    K = quotas(M, b)
    a = random_assignment(M, b, torch.Generator().manual_seed(seed))
    assert a.shape == (M,) and a.dtype == torch.long
    assert counts(a, len(b)).tolist() == K.tolist()
    # a seeded generator reproduces the same assignment
    assert random_assignment(M, b, torch.Generator().manual_seed(seed)).tolist() == a.tolist()


def test_random_assignment_actually_shuffles():
    b = [0.5, 0.5]
    seen = {tuple(random_assignment(20, b, torch.Generator().manual_seed(s)).tolist()) for s in range(5)}
    assert len(seen) > 1


# --------------------------------------------------------------------------- oracle


def total(scores: np.ndarray, assignment) -> float:
    a = np.asarray(assignment)
    return float(scores[np.arange(len(a)), a].sum())


def lp_optimum(S: np.ndarray, d: np.ndarray, d_target: float) -> float:
    """LP relaxation: max sum x_in S_in, sum_n x_in = 1, sum x_in d_n <= M d_target."""
    M, N = S.shape
    res = linprog(
        -S.reshape(-1),
        A_ub=np.tile(d, M)[None, :],
        b_ub=[M * d_target],
        A_eq=np.kron(np.eye(M), np.ones(N)),
        b_eq=np.ones(M),
        bounds=(0, 1),
        method="highs",
    )
    assert res.status == 0
    return -res.fun


def check_oracle_bounds(S, d, d_target, a):
    M = S.shape[0]
    step = float(d.max() - d.min())
    eps = 1e-9 * max(1.0, float(np.abs(d).max()))
    assert a.shape == (M,) and a.dtype == torch.long
    assert float(d[a.numpy()].mean()) <= d_target + step / M + eps


@FAST
@given(st.data())
def test_oracle_is_never_below_a_quota_assignment_with_the_same_budget(data):
    M = data.draw(st.integers(1, 40))
    b = data.draw(biases(n_min=2, n_max=4))
    N = len(b)
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if data.draw(st.booleans()):  # quantised scores and costs: ties and collinear points
        S = rng.integers(0, 6, size=(M, N)) / 10
        d = rng.integers(1, 6, size=N) / 10
    else:
        S = rng.uniform(0, 1, size=(M, N))
        d = rng.uniform(1, 2000, size=N)
    gen = torch.Generator().manual_seed(seed)
    G = torch.softmax(torch.randn(M, N, generator=gen), dim=1)
    for a in (random_assignment(M, b, gen), enforce_bias(G, b)):
        a = a.numpy()
        d_target = float(d[a].mean())
        o = oracle_assignment(S, d, d_target)
        check_oracle_bounds(S, d, d_target, o)
        assert total(S, o) >= total(S, a) - 1e-9


@FAST
@given(st.integers(1, 8), st.integers(2, 4), st.floats(0, 1), st.booleans(), st.integers(0, 2**31 - 1))
def test_oracle_reaches_the_lp_optimum(M, N, t, quantised, seed):
    rng = np.random.default_rng(seed)
    if quantised:
        S = rng.integers(0, 6, size=(M, N)) / 10
        d = rng.integers(1, 6, size=N) / 10
    else:
        S = rng.normal(size=(M, N))
        d = rng.uniform(1, 100, size=N)
    d_target = float(d.min() + t * (d.max() - d.min()))
    o = oracle_assignment(S, d, d_target)
    check_oracle_bounds(S, d, d_target, o)
    assert total(S, o) >= lp_optimum(S, d, d_target) - 1e-7


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(2, 3), st.floats(0, 1), st.integers(0, 2**31 - 1))
def test_oracle_beats_every_assignment_within_budget_exhaustively(M, N, t, seed):
    rng = np.random.default_rng(seed)
    S = rng.integers(0, 5, size=(M, N)) / 4
    d = rng.integers(1, 5, size=N).astype(np.float64)
    d_target = float(d.min() + t * (d.max() - d.min()))
    o = oracle_assignment(S, d, d_target)
    check_oracle_bounds(S, d, d_target, o)
    every = np.array(list(itertools.product(range(N), repeat=M)))  # (N**M, M)
    feasible = every[d[every].mean(axis=1) <= d_target + 1e-12]
    best = S[np.arange(M)[None, :], feasible].sum(axis=1).max()
    assert total(S, o) >= best - 1e-9


@FAST
@given(st.integers(1, 30), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_oracle_at_the_largest_budget_is_the_per_row_argmax(M, N, seed):
    rng = np.random.default_rng(seed)
    S = rng.normal(size=(M, N))
    d = rng.uniform(1, 1000, size=N)
    o = oracle_assignment(torch.tensor(S), torch.tensor(d), float(d.max()))
    assert total(S, o) == pytest.approx(S.max(axis=1).sum(), abs=1e-9)


def test_oracle_at_the_smallest_budget_uses_the_cheapest_expert():
    S = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.8]])
    d = np.array([270.0, 120.0, 1080.0])
    assert oracle_assignment(S, d, 120.0).tolist() == [1, 1]


def test_oracle_on_collinear_points_spends_its_budget():
    # Row 0's points (cost, score) (0, .8), (.3, .98), (1.1, 1.46) lie on one line of slope
    # 0.6; in floating point the second segment's slope comes out an ulp above the first's.
    # Row 1 gains 0.25 for 0.5 extra cost (slope 0.5). Budget: mean 0.4, i.e. 0.8 in total.
    # Routing [1, 2] fits (cost 0.3 + 0.5) and scores 1.23; the LP optimum is 1.28.
    d = np.array([0.0, 0.3, 0.5, 1.1])
    S = np.array([[0.8, 0.98, 0.0, 1.46], [0.0, 0.0, 0.25, 0.0]])
    assert total(S, [1, 2]) == pytest.approx(1.23) and d[[1, 2]].mean() <= 0.4
    o = oracle_assignment(S, d, 0.4)
    check_oracle_bounds(S, d, 0.4, o)
    assert total(S, o) >= lp_optimum(S, d, 0.4) - 1e-9
    assert total(S, o) >= 1.23


def test_oracle_rejects_a_target_outside_the_costs():
    with pytest.raises(ValueError, match=r"d_target=50 is outside \[120, 1080\]"):
        oracle_assignment(np.zeros((2, 3)), [120, 270, 1080], 50)
    with pytest.raises(ValueError, match="expected"):
        oracle_assignment(np.zeros((2, 3)), [120, 270], 200)


# --------------------------------------------------------------------------- lagrange


def test_lagrange_assignment_by_hand():
    S = np.array([[1.0, 2.0, 3.5]])
    d = np.array([1.0, 2.0, 3.0])
    assert lagrange_assignment(S, d, 0.0).tolist() == [2]
    assert lagrange_assignment(S, d, 1.0).tolist() == [2]  # values 0, 0, 0.5
    assert lagrange_assignment(S, d, 1.5).tolist() == [0]  # -0.5, -1, -1
    assert lagrange_assignment(S, d, 1.25).tolist() == [0]  # -0.25, -0.5, -0.25: tie -> cheaper
    # ties go to the cheaper expert even when it has the higher index
    assert lagrange_assignment(np.array([[1.0, 1.0]]), np.array([3.0, 1.0]), 0.0).tolist() == [1]


@FAST
@given(st.integers(1, 40), st.integers(2, 5), st.floats(0, 1), st.integers(0, 2**31 - 1))
def test_calibrate_lambda_meets_the_budget_with_the_smallest_price(M, N, t, seed):
    rng = np.random.default_rng(seed)
    S = rng.uniform(0, 1, size=(M, N))
    d = rng.choice(np.arange(1, 200), size=N, replace=False).astype(np.float64)
    d_target = float(d.min() + t * (d.max() - d.min()))

    def mean_cost(lam):
        return float(d[lagrange_assignment(S, d, lam).numpy()].mean())

    lam = calibrate_lambda(S, d, d_target)
    assert mean_cost(lam) <= d_target + 1e-9
    if lam != 0 and mean_cost(lam) < d.max():
        # any lower price overspends: the budget is spent as far as whole inputs allow
        assert mean_cost(lam * (1 + 1e-6) if lam < 0 else lam * (1 - 1e-6)) > d_target
    if lam < 0:  # a subsidy only where it moves inputs that argmax routing left below the budget
        assert mean_cost(0.0) < mean_cost(lam)
    # the lagrange routing is one assignment within the budget: the oracle must match or beat it
    a = lagrange_assignment(S, d, lam).numpy()
    assert total(S, oracle_assignment(S, d, d_target)) >= total(S, a) - 1e-9


def test_calibrate_lambda_subsidises_data_when_argmax_underspends():
    S = np.array([[0.1, 0.9, 0.2], [0.8, 0.1, 0.3], [0.2, 0.3, 0.7]])
    d = np.array([120.0, 270.0, 1080.0])
    # argmax routing [1, 0, 2] costs (270 + 120 + 1080) / 3 = 490
    assert lagrange_assignment(S, d, 0.0).tolist() == [1, 0, 2]
    lam = calibrate_lambda(S, d, 489.0)
    assert lam > 0
    assert d[lagrange_assignment(S, d, lam).numpy()].mean() <= 489.0
    # a budget above argmax's spend is spent: below lam = -1/1920 input 1 moves to expert 2
    # (0.8 - 120 lam = 0.3 - 1080 lam), for (270 + 1080 + 1080) / 3 = 810; the smallest price
    # that keeps within 810 is where input 0 would move too (0.9 - 270 lam = 0.2 - 1080 lam)
    lam = calibrate_lambda(S, d, 810.0)
    assert lam == pytest.approx(-0.7 / 810)
    assert lagrange_assignment(S, d, lam).tolist() == [1, 2, 2]
    # between two whole-input steps the spend stays at the step below the target
    assert lagrange_assignment(S, d, calibrate_lambda(S, d, 800.0)).tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match=r"d_target=50 is outside \[120, 1080\]"):
        calibrate_lambda(S, d, 50.0)


def test_score_loss_is_the_mean_squared_error_and_differentiable():
    pred = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    target = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    loss = score_loss(pred, target)
    assert float(loss.detach()) == pytest.approx((1 + 0 + 1 + 4) / 4)
    loss.backward()
    torch.testing.assert_close(pred.grad, 2 * (pred.detach() - target) / 4)
