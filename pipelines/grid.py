"""A sweep's search space: the grid of each profile, the data-cost targets, and the trial
configurations (pipelines/methods.py says which hyperparameters each method has). Plain values
beside the code that uses them; pipelines/sweep.py runs them with Ray Tune."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import numpy as np

from pipelines.methods import HYPERPARAMETERS, METHODS, NAMES, STATIC, TrialConfig, epochs_for_steps
from pipelines.runtime import RunConfig, UserError
from pipelines.search import SCHEDULERS, SEARCHES


@dataclass(frozen=True)
class SweepGrid:
    """The search space, as plain values beside the code that uses them."""

    methods: tuple[str, ...] = STATIC + tuple(n for n in NAMES if n not in STATIC)  # static first
    points: int = 7  # d_t grid over [d_min, d_max]; d_max/2 and d_max/3 are added for the tables
    epochs: int = 20  # with gate_steps: the most any trial takes (ASHA's horizon), derived by with_gate_steps
    gate_steps: int = 0  # 0: train gates for `epochs`; else for this many optimizer steps (the task's gate_steps)
    batch_sizes: tuple[int, ...] = (128,)
    lrs: tuple[float, ...] = (1e-4,)
    widths: tuple[float, ...] = (1.0,)
    w_biases: tuple[float, ...] = (0.1, 1.0, 10.0)
    # enforce's own lrs and batch sizes (empty: the grid's), and how many initialisations of its
    # gate each of them trains (validation picks). Its gate learns only through the expert
    # Algorithm 1 assigns each input among the batch's, so the batch matters (the paper's Table
    # III) and so does where it starts: measured on the demos, routing efficiency of three
    # initialisations at lr 1e-3, action batch 32 0.17 / 0.65 / 0.67, batch 64 0.66 / 0.62 / 0.64;
    # detection batch 64 0.39 / 0.11 (seed-0 demo), 0.20 / 0.04 / 0.08 (seed 1). The demo trains
    # one: a second per target moved its enforce rows by +0.00..+0.06 of efficiency (detection
    # seed 1: 0.06 to 0.12), and the seed-1 demo took 21.1 minutes with two and 18.6 with one.
    enforce_lrs: tuple[float, ...] = ()
    enforce_batch_sizes: tuple[int, ...] = ()
    enforce_inits: int = 1
    seed: int = 0  # the RunConfig's (--seed): trial initialisations, random quotas, searchers
    search: str = "grid"  # grid | random | optuna (pipelines/search.py)
    num_samples: int = 1  # trials per (method, d_t) point when searching
    scheduler: str = "none"  # none | asha
    lr_range: tuple[float, float] = (1e-4, 1e-2)  # searched log-uniformly
    w_bias_range: tuple[float, float] = (0.1, 100.0)  # searched log-uniformly (soft)
    grace_epochs: int = 1  # ASHA: epochs every trial gets
    reduction_factor: float = 2.0  # ASHA: 1/reduction_factor of a rung's trials go on
    max_concurrent: int = 0  # 0: as many as the cluster's resources allow
    cpus_per_trial: float = 1.0  # each trial's torch threads too
    gpus_per_trial: float = 0.0  # e.g. 0.25: four trials share a GPU; the gate and its batches go there

    def __post_init__(self):
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0 or self.max_concurrent < 0:
            raise ValueError("--cpus-per-trial must be positive, --gpus-per-trial and --max-concurrent-trials "
                             "not negative")
        if self.search not in SEARCHES:
            raise ValueError(f"--search {self.search!r}: choose from {', '.join(SEARCHES)}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"--scheduler {self.scheduler!r}: choose from {', '.join(SCHEDULERS)}")
        if self.enforce_inits < 1:
            raise ValueError("enforce's initialisations per grid point must be at least 1")
        if self.num_samples < 1 or self.grace_epochs < 1 or self.reduction_factor <= 1:
            raise ValueError("--num-samples and the grace epochs must be at least 1, the reduction factor above 1")
        if self.search == "grid" and self.num_samples != 1:
            raise ValueError("--num-samples needs --search random or optuna (a grid runs each point once)")

    def own(self, spec) -> tuple[tuple[float, ...], tuple[int, ...], int]:
        """The lrs, batch sizes and initialisations the grid gives a method (enforce's own)."""
        if not spec.own_grid:
            return self.lrs, self.batch_sizes, 1
        return self.enforce_lrs or self.lrs, self.enforce_batch_sizes or self.batch_sizes, self.enforce_inits

    def trial_resources(self) -> dict[str, float]:
        """What each trial asks Ray for (tune.with_resources)."""
        return {"cpu": self.cpus_per_trial, **({"gpu": self.gpus_per_trial} if self.gpus_per_trial else {})}


ADDED_LATER = ("enforce_batch_sizes", "enforce_inits")  # grid_identity: sweeps named before them keep their names

GRIDS = {
    "smoke": SweepGrid(points=3, epochs=2, batch_sizes=(16,), lrs=(1e-3,), widths=(0.25,), w_biases=(1.0,)),
    "demo": SweepGrid(points=5, epochs=12, batch_sizes=(32,), lrs=(1e-3,), widths=(0.5,), w_biases=(1.0, 10.0, 100.0),
                      enforce_batch_sizes=(64,)),
    "paper": SweepGrid(),  # the paper: batch 128, lr 1e-4, 20 epochs, w_bias cross-validated
}


def targets(d: np.ndarray, points: int) -> list[float]:
    """points d_t evenly over [d_min, d_max], plus d_max/2 and d_max/3 where they lie inside."""
    lo, hi = float(d.min()), float(d.max())
    grid = set(np.round(np.linspace(lo, hi, points), 6).tolist())
    grid |= {round(hi / k, 6) for k in (2, 3) if lo <= hi / k <= hi}
    return sorted(grid)


def trial_configs(cfg: RunConfig, grid: SweepGrid, d: np.ndarray) -> list[TrialConfig]:
    """Every trial of the sweep: per method (pipelines/methods.py), one trial for every target or
    one per target, times the grid of the hyperparameters the method has."""
    ts = tuple(targets(d, grid.points))
    configs = []
    for name in grid.methods:
        try:
            spec = METHODS[name]
        except KeyError:
            raise UserError(f"unknown method {name!r}; choose from {', '.join(NAMES)}") from None
        base = {"task_name": cfg.task_name, "profile": cfg.profile, "options": dict(cfg.task_options), "seed": grid.seed,
                "epochs": grid.epochs, "steps": grid.gate_steps, "method": name}
        where = [{"d_target": d_t} for d_t in ts] if spec.per_target else [{"targets": ts}]
        if not spec.trains_gate:
            configs += [TrialConfig(**base, **at) for at in where]
            continue
        w_biases = grid.w_biases if "w_bias" in spec.searched else (0.0,)
        lrs, batch_sizes, inits = grid.own(spec)
        configs += [TrialConfig(**base, **at, batch_size=M, lr=lr, width=width, w_bias=w, init=i)
                    for at in where for M in batch_sizes for lr in lrs for width in grid.widths
                    for w in w_biases for i in range(inits)]
    return configs


def with_gate_steps(grid: SweepGrid, steps: int, gate_rows: int) -> SweepGrid:
    """The grid training gates for `steps` optimizer steps (the task's gate_steps; 0 keeps the
    grid's epochs): the paper states gate training in steps (20k for detection, 80k for action at
    batch 128), which mean the same on any data size where epochs do not. Each trial derives its
    own epochs from its batch size (TrialConfig.epochs_on); the grid's epochs become the most
    any trial takes, ASHA's horizon."""
    if not steps:
        return grid
    return replace(grid, gate_steps=steps, epochs=max(epochs_for_steps(steps, M, gate_rows)
                                                       for M in grid.batch_sizes + grid.enforce_batch_sizes))


def search_points(configs: list[TrialConfig]) -> list[dict]:
    """The grid points of a search: the trial configs without their hyperparameters, once each."""
    points, seen = [], set()
    for config in configs:
        point = {k: v for k, v in config.as_tune().items() if k not in HYPERPARAMETERS}
        key = json.dumps(point, sort_keys=True)
        if key not in seen:
            seen.add(key)
            points.append(point)
    return points


def grid_identity(grid: SweepGrid) -> dict:
    """What names a sweep: its search space, not the resources it ran with (a sweep resumed
    on other machines is the same sweep). Fields added later are left out at their defaults, so
    a sweep from before them keeps its name and resumes."""
    defaults = SweepGrid()
    return {k: v for k, v in asdict(grid).items() if k not in ("max_concurrent", "cpus_per_trial", "gpus_per_trial")
            and not (k in ADDED_LATER and v == getattr(defaults, k))}


def with_methods(grid: SweepGrid, methods: str | None) -> SweepGrid:
    """The grid restricted to a comma-separated list of methods (CLI)."""
    if not methods:
        return grid
    chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    return replace(grid, methods=chosen)
