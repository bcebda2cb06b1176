"""Area under the performance-vs-data-cost curve, rho (eq. 11)."""

from __future__ import annotations

import numpy as np

__all__ = ["rho", "routing_efficiency"]


def rho(costs, perfs, d_min: float, d_max: float) -> float:
    """rho = integral over t in [0, 1] of p(d_min + t (d_max - d_min)) dt, by trapezoids (eq. 11).

    The points are sorted by cost first, so their order does not matter. Costs are normalised
    to t = (c - d_min) / (d_max - d_min) and clipped to [0, 1]; where the points do not reach
    an end of [0, 1], the curve is held flat at its nearest point.
    """
    c = np.asarray(costs, dtype=np.float64).reshape(-1)
    p = np.asarray(perfs, dtype=np.float64).reshape(-1)
    if c.shape != p.shape or c.size == 0:
        raise ValueError(f"costs and perfs must be non-empty and of equal length, got {c.size} and {p.size}")
    if not d_max > d_min:
        raise ValueError(f"need d_max > d_min, got d_min={d_min:g}, d_max={d_max:g}")
    order = np.lexsort((p, c))  # by cost, ties by performance: independent of input order
    t = np.clip((c[order] - d_min) / (d_max - d_min), 0.0, 1.0)
    p = p[order]
    t = np.concatenate([[0.0], t, [1.0]])
    p = np.concatenate([[p[0]], p, [p[-1]]])
    return float(np.sum(np.diff(t) * (p[1:] + p[:-1]) / 2.0))


def routing_efficiency(value: float | None, random: float | None, oracle: float | None) -> float | None:
    """(value - random) / (oracle - random): the share of the oracle's gain over random selection
    that a method achieves (of performance at one target, or of rho); None where undefined."""
    if value is None or random is None or oracle is None or abs(oracle - random) < 1e-12:
        return None
    return (value - random) / (oracle - random)
