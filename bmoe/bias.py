"""Choosing the bias b by linear programming (eqs. 6-10) and the soft bias loss (eq. 5)."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linprog

__all__ = ["select_bias", "select_bias_for_performance", "bias_loss", "expected_cost"]


def select_bias(d, p, d_target: float) -> np.ndarray:
    """Bias b maximising expected performance b.p subject to b.d = d_target (eqs. 6-8).

    Args:
        d: (N,) data cost of each expert.
        p: (N,) validation performance of each expert.
        d_target: the target mean data cost.
    Returns:
        (N,) bias: non-negative, summing to 1.
    Raises:
        ValueError: d_target lies outside [min d, max d].
    """
    d, p = _vectors(d, p)
    d_target = _check_range("d_target", d_target, d)
    return _solve(objective=-p, equality=d, target=d_target)  # linprog minimises: max b.p


def select_bias_for_performance(d, p, p_target: float) -> np.ndarray:
    """Bias b minimising expected data cost b.d subject to b.p = p_target (eqs. 7, 9, 10).

    Raises:
        ValueError: p_target lies outside [min p, max p].
    """
    d, p = _vectors(d, p)
    p_target = _check_range("p_target", p_target, p)
    return _solve(objective=d, equality=p, target=p_target)


def expected_cost(b, d) -> float:
    """Mean data cost b.d of a mixture used with bias b."""
    return float(np.dot(np.asarray(b, dtype=np.float64), np.asarray(d, dtype=np.float64)))


def bias_loss(u: torch.Tensor, b, w_bias: float) -> torch.Tensor:
    """Soft bias regularisation, eq. 5: -w_bias * log(1 - ||u - b||_2 / sqrt(2)).

    The argument of the log is positive for any two distributions u, b; it is clamped away
    from zero only to keep a gradient finite when the two are disjoint one-hots.
    """
    b = torch.as_tensor(b, dtype=u.dtype, device=u.device)
    distance = torch.linalg.vector_norm(u - b) / math.sqrt(2.0)
    return -w_bias * torch.log((1.0 - distance).clamp_min(1e-6))


def _solve(objective: np.ndarray, equality: np.ndarray, target: float) -> np.ndarray:
    N = objective.shape[0]
    A_eq = np.vstack([equality, np.ones(N)])  # eq. 6 (or 9) and sum b = 1
    b_eq = np.array([target, 1.0])
    result = linprog(objective, A_eq=A_eq, b_eq=b_eq, bounds=[(0.0, 1.0)] * N, method="highs")
    if result.status != 0:  # cannot happen for a target inside the range; say so if it does
        raise RuntimeError(f"linprog failed to select a bias: {result.message}")
    b = np.clip(result.x, 0.0, 1.0)
    return b / b.sum()


def _vectors(d, p) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(d, dtype=np.float64).reshape(-1)
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    if d.shape != p.shape or d.size == 0:
        raise ValueError(f"d and p must be non-empty and of equal length, got {d.size} and {p.size}")
    if not (np.all(np.isfinite(d)) and np.all(np.isfinite(p))):
        raise ValueError("d and p must be finite")
    return d, p


def _check_range(name: str, target: float, values: np.ndarray) -> float:
    lo, hi = float(values.min()), float(values.max())
    tol = 1e-9 * max(abs(lo), abs(hi), 1.0)
    if not (lo - tol <= target <= hi + tol):
        raise ValueError(f"{name}={target:g} is outside [{lo:g}, {hi:g}]")
    return min(max(float(target), lo), hi)
