"""A one-second walk through the core method on a toy mixture (the situation of Fig. 1).

Inputs are easy or hard; a cheap expert is as good as a dear one on easy inputs only. The
table shows what each selection rule makes of that at every data budget, before any task
or Ray is involved.
"""

from __future__ import annotations

import numpy as np
import torch

from bmoe.bias import expected_cost, select_bias
from bmoe.curves import rho
from bmoe.routing import oracle_assignment, random_assignment


def toy_scores(M: int = 4096, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(M, 3) per-input expected accuracy of three experts with costs 1, 3, 9 (arbitrary units)."""
    rng = np.random.default_rng(seed)
    hard = rng.random(M) < 0.5  # (M,) which inputs need detail
    base = np.array([0.55, 0.75, 0.95])  # hard inputs: accuracy grows with data
    easy = np.array([0.93, 0.94, 0.95])  # easy inputs: the cheap expert suffices
    noise = rng.normal(0.0, 0.01, size=(M, 3))
    return np.where(hard[:, None], base, easy) + noise, np.array([1.0, 3.0, 9.0])  # (M, 3), (3,)


def core_demo(points: int = 7) -> dict[str, float]:
    """Print perf-vs-cost per method and return rho per method (eq. 11)."""
    scores, d = toy_scores()
    M = len(scores)
    p = scores.mean(axis=0)  # each expert's accuracy over all inputs
    targets = np.linspace(d.min(), d.max(), points)
    curves: dict[str, list[tuple[float, float]]] = {"experts": [], "random": [], "oracle": []}
    gen = torch.Generator().manual_seed(0)
    for d_t in targets:
        b = select_bias(d, p, d_t)  # eqs. 6-8
        curves["experts"].append((expected_cost(b, d), float(b @ p)))
        a = random_assignment(M, b, gen).numpy()
        curves["random"].append((float(d[a].mean()), float(scores[np.arange(M), a].mean())))
        a = oracle_assignment(scores, d, d_t).numpy()
        curves["oracle"].append((float(d[a].mean()), float(scores[np.arange(M), a].mean())))
    print("core method on a toy mixture (3 experts, costs 1/3/9, half the inputs easy):")
    print("  d_target " + "".join(f"{m:>18}" for m in curves))
    for i, d_t in enumerate(targets):
        row = "".join(f"   {c:5.2f} -> {v:6.3f}" for c, v in (curves[m][i] for m in curves))
        print(f"  {d_t:8.2f} {row}")
    result = {m: rho([c for c, _ in pts], [v for _, v in pts], d.min(), d.max()) for m, pts in curves.items()}
    print("  rho: " + ", ".join(f"{m} {v:.3f}" for m, v in result.items()))
    return result
