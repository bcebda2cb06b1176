"""Expert selection: sparse gates (eq. 3), utility (eq. 4), batchwise bias enforcement
(Algorithm 1), random selection, and the oracle upper bound."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "sparse_gates",
    "utility",
    "quotas",
    "enforce_bias",
    "random_assignment",
    "oracle_assignment",
]


def sparse_gates(logits: torch.Tensor) -> torch.Tensor:
    """Softmax gates with only the arg-max column kept per row (eq. 3).

    Args:
        logits: (M, N) gate outputs f(x; W_g).
    Returns:
        (M, N) tensor, one non-zero per row holding that expert's softmax probability, so
        gradients reach the logits through the kept entry.
    """
    probs = torch.softmax(logits, dim=-1)  # (M, N) eq. 1
    psi = F.one_hot(probs.argmax(dim=-1), probs.shape[-1]).to(probs.dtype)  # (M, N) one-hot ψ
    return probs * psi  # eq. 3


def utility(G: torch.Tensor) -> torch.Tensor:
    """Per-expert utility u (eq. 4): the mean over the batch of each row's gate mass.

    Each row is normalised to unit mass by a detached constant, so for sparse (one-hot
    support) rows the value of u is exactly the selection frequency and ``||u||_1 = 1`` as
    eq. 5 assumes, while the gradient still flows through the kept gate values.

    Args:
        G: (M, N) gates, e.g. from :func:`sparse_gates`.
    Returns:
        (N,) utility.
    """
    mass = G.sum(dim=-1, keepdim=True).detach().clamp_min(torch.finfo(G.dtype).tiny)  # (M, 1)
    return (G / mass).mean(dim=0)


def quotas(M: int, b) -> np.ndarray:
    """Inputs per expert, K_n = M * b_n rounded by the largest-remainder method (sum == M).

    Ties among remainders go to the lower expert index, so the result is deterministic.
    """
    b = _as_bias(b)
    if M < 0:
        raise ValueError(f"batch size M={M} must be >= 0")
    exact = M * b
    K = np.floor(exact).astype(np.int64)
    short = M - int(K.sum())
    if short > 0:
        remainder = exact - K
        # stable sort on -remainder: equal remainders keep expert order
        order = np.argsort(-remainder, kind="stable")
        K[order[:short]] += 1
    return K


def enforce_bias(G: torch.Tensor, b) -> torch.Tensor:
    """Batchwise bias enforcement (Algorithm 1).

    Expert by expert (n = 1..N), the K_n rows with the highest G[:, n] among rows not yet
    assigned go to expert n. Ties are broken by lower row index.

    Args:
        G: (M, N) soft gates (eq. 1).
        b: (N,) bias, non-negative, summing to 1.
    Returns:
        (M,) LongTensor, the expert of each row; expert n gets exactly K_n rows.
    """
    M, N = G.shape
    b = _as_bias(b)
    if b.shape[0] != N:
        raise ValueError(f"bias has {b.shape[0]} entries but the gates have {N} experts")
    K = quotas(M, b)
    values = G.detach().to(torch.float64).cpu()
    assignment = torch.full((M,), -1, dtype=torch.long)
    free = torch.ones(M, dtype=torch.bool)
    for n in range(N):
        if K[n] == 0:
            continue
        column = torch.where(free, values[:, n], torch.tensor(-torch.inf, dtype=torch.float64))
        # stable descending sort: equal gate values keep row order (deterministic ties)
        order = torch.sort(column, descending=True, stable=True).indices
        chosen = order[: int(K[n])]
        assignment[chosen] = n
        free[chosen] = False
    return assignment.to(G.device)


def random_assignment(M: int, b, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random selection: exactly K_n inputs per expert, placed uniformly at random.

    Returns:
        (M,) LongTensor of expert indices.
    """
    K = quotas(M, b)
    labels = torch.repeat_interleave(torch.arange(len(K)), torch.as_tensor(K))
    return labels[torch.randperm(M, generator=generator)]


def oracle_assignment(scores, d, d_target: float) -> torch.Tensor:
    """Best expert per input under mean data cost <= d_target, every per-input score known.

    Solves the LP relaxation of this multiple-choice knapsack exactly (greedy over the upper
    concave hull of each input's (cost, score) points, steepest slope first); the one input
    the LP would split is rounded up. The total score is therefore at least the LP optimum,
    and so at least that of ANY assignment within the budget, while the mean cost exceeds
    d_target by at most one input's cost step divided by M. This is the upper bound that
    no gate can beat.

    Args:
        scores: (M, N) per-input score of each expert, higher is better and additive.
        d: (N,) data cost of each expert.
        d_target: target mean data cost, within [min d, max d].
    Returns:
        (M,) LongTensor of expert indices.
    """
    S = _to_numpy(scores).astype(np.float64)
    cost = np.asarray(_to_numpy(d), dtype=np.float64)
    M, N = S.shape
    if cost.shape != (N,):
        raise ValueError(f"d has shape {cost.shape}, expected ({N},) to match scores")
    lo, hi = float(cost.min()), float(cost.max())
    tol = 1e-9 * max(abs(hi), 1.0)
    if not (lo - tol <= d_target <= hi + tol):
        raise ValueError(f"d_target={d_target:g} is outside [{lo:g}, {hi:g}]")
    if M == 0:
        return torch.zeros(0, dtype=torch.long)

    rows = np.arange(M)
    # Start: the best of the cheapest experts.
    cheapest = np.isclose(cost, lo, rtol=0, atol=tol)
    start = np.where(cheapest[None, :], S, -np.inf).argmax(axis=1)
    current = start.copy()

    # Walk each input's upper concave hull from the cheapest point (gift wrapping): each step
    # moves to the costlier expert with the steepest positive score gain per byte.
    steps_row, steps_to, steps_dc, steps_slope, steps_k = [], [], [], [], []
    active = np.ones(M, dtype=bool)
    prev_slope = np.full(M, np.inf)  # (M,) slope of each input's previous hull step
    for k in range(N):
        dc = cost[None, :] - cost[current][:, None]  # (M, N) extra bytes
        ds = S - S[rows, current][:, None]  # (M, N) extra score
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = np.where(dc > tol, ds / dc, -np.inf)
        nxt = slope.argmax(axis=1)
        best = slope[rows, nxt]
        step = active & (best > 0)
        if not step.any():
            break
        # Hull slopes never increase along a path, but on collinear points rounding can make
        # a later one larger by an ulp; clamp so each input's steps sort as a prefix.
        best = np.minimum(best, prev_slope)
        prev_slope = np.where(step, best, prev_slope)
        idx = rows[step]
        steps_row.append(idx)
        steps_to.append(nxt[step])
        steps_dc.append(dc[idx, nxt[step]])
        steps_slope.append(best[step])
        steps_k.append(np.full(idx.shape, k))
        current = np.where(step, nxt, current)
        active = step

    assignment = start.copy()
    if steps_row:
        row = np.concatenate(steps_row)
        dcs = np.concatenate(steps_dc)
        slope = np.concatenate(steps_slope)
        k = np.concatenate(steps_k)
        path = np.full((M, len(steps_row)), -1, dtype=np.int64)  # (M, steps) hull vertices
        for j, (r, t) in enumerate(zip(steps_row, steps_to)):
            path[r, j] = t
        # Steepest first; within an input the hull slopes never increase, so sorting by
        # (slope desc, step asc) applies each input's steps as a prefix of its path.
        order = np.lexsort((row, k, -slope))
        budget = M * d_target - cost[start].sum()
        spent = np.cumsum(dcs[order])
        n_full = int(np.searchsorted(spent, budget + tol, side="right"))
        left = budget - (spent[n_full - 1] if n_full else 0.0)
        take = n_full + int(n_full < len(order) and left > tol)  # round the split input up
        n_steps = np.bincount(row[order[:take]], minlength=M)  # (M,) hull steps taken
        moved = n_steps > 0
        assignment[moved] = path[rows[moved], n_steps[moved] - 1]
    return torch.as_tensor(assignment, dtype=torch.long)


def _as_bias(b) -> np.ndarray:
    b = np.asarray(_to_numpy(b), dtype=np.float64).reshape(-1)
    if b.size == 0 or np.any(b < -1e-9) or not np.isclose(b.sum(), 1.0, atol=1e-6):
        raise ValueError(f"bias must be non-negative and sum to 1, got {b.tolist()}")
    return np.clip(b, 0.0, None)


def _to_numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
