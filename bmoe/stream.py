"""What a deployment does to a split, predicted offline: the order its requests arrive in and
the streaming budget's choice for every unit in that order.

A report's batch rows (Algorithm 1 over the whole test split, lagrange's price set on the test
predictions) see every test input before routing any; a deployment cannot. Its router prices
each unit as it comes (bmoe.budget), from the price calibrated on validation and the overspend
so far, so its choices depend on the order of the stream. The sweep scores each servable gate's
test split once more through this prediction, in one canonical order (requests shuffled with a
seed, each request's units in the order the router routes them), and `bmoe replay` sends the
requests in the same order: served and predicted then agree unit by unit, and the report shows
both the method's batch figure and the figure its deployment delivers.
"""

from __future__ import annotations

import numpy as np

from bmoe.budget import BudgetController

__all__ = ["DEFAULT_WINDOW", "STREAM_SEED", "request_order", "stream_order", "streamed_assignment"]

DEFAULT_WINDOW = 200  # units in the budget's window (serving.settings.ServeSettings.window)
STREAM_SEED = 0  # the canonical stream's shuffle


def request_order(keys, seed: int = STREAM_SEED) -> dict[str, int]:
    """Each distinct request key's place in the stream: the sorted keys, shuffled by `seed`
    (independent of the order a listing or a cache happens to hold them in)."""
    unique = sorted({str(k) for k in keys})
    return {unique[k]: rank for rank, k in enumerate(np.random.default_rng(seed).permutation(len(unique)))}


def stream_order(keys, sample_ids, seed: int = STREAM_SEED) -> np.ndarray:
    """Row indices in stream order: requests (rows sharing a key) by request_order, and a
    request's units by sample id (the order a task's load() makes them in)."""
    keys = [str(k) for k in keys]
    rank = request_order(keys, seed)
    return np.array(sorted(range(len(keys)), key=lambda i: (rank[keys[i]], str(sample_ids[i]))), dtype=np.int64)


def streamed_assignment(d, target: float, val_values: np.ndarray, values: np.ndarray, order: np.ndarray,
                        window: int = DEFAULT_WINDOW) -> np.ndarray:
    """(M,) the expert a fresh router stream at `target` gives each row of values (M, N) when the
    rows arrive in `order`, its price calibrated on val_values as a router replica calibrates it."""
    controller = BudgetController.calibrated(d, target, val_values, window=window)
    assignment = np.empty(len(values), dtype=np.int64)
    assignment[order] = controller.route(np.asarray(values, dtype=np.float64)[order])
    return assignment
