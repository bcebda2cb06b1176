"""How a sweep explores hyperparameters: a grid (Tune's grid_search), or a search over lr,
w_bias, gate width and batch size with random sampling or Optuna's TPE, optionally with ASHA
stopping the trials that are clearly lost.

The method x d_t axis always stays a grid: the paper compares methods at the same targets.
Tune's searchers sample one flat space, and OptunaSearch refuses grid_search in it, so
PointSearch keeps one Tune OptunaSearch per point (method, d_t) and hands out their suggestions
in turn: every point gets the same number of samples, and each point's sampler learns only from
its own trials. For the same reason PerPointASHA keeps one ASHA per point: a trial at a cheap
target is never stopped for scoring below a trial at a dear one. Static methods have no
hyperparameters and run once.
"""

from __future__ import annotations

import pickle
from typing import Hashable

from ray.tune.schedulers import FIFOScheduler
from ray.tune.schedulers.async_hyperband import AsyncHyperBandScheduler
from ray.tune.search import ConcurrencyLimiter, SearchGenerator, Searcher

from pipelines.methods import METHODS, TrialConfig

SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("none", "asha")
METRIC, MODE = "val_objective", "max"  # per epoch and final: pipelines.gate_trial.budget_objective
# ASHA stops per-target gates only: lagrange trains one gate for every target, it runs to the end
EARLY_STOPPED = tuple(m.name for m in METHODS.values() if m.trains_gate and m.per_target)


def point_key(trial: dict) -> Hashable:
    """The grid point a trial belongs to: (method, d_target), or (method,) for all-target methods."""
    return (trial["method"], trial["d_target"]) if "d_target" in trial else (trial["method"],)


def searched(method: str) -> tuple[str, ...]:
    """The hyperparameters a method has (soft alone weighs the bias term)."""
    return METHODS[method].searched


def space(grid, method: str) -> dict:
    """A method's search space in Tune's terms: lr and w_bias log-uniform over the grid's ranges,
    gate width and batch size chosen from its lists (enforce's own batch sizes, where set)."""
    from ray import tune

    domains = {"lr": tune.loguniform(*grid.lr_range), "w_bias": tune.loguniform(*grid.w_bias_range),
               "width": tune.choice(list(grid.widths)),
               "batch_size": tune.choice(list(grid.own(METHODS[method])[1]))}
    return {k: domains[k] for k in searched(method)}


class PointSearch(Searcher):
    """A searcher per grid point; suggestions go to the point with the fewest trials so far, so
    points progress together and concurrent trials spread over points."""

    def __init__(self, points: list[dict], grid, kind: str, num_samples: int):
        super().__init__(metric=None, mode=None)  # each point's searcher has its own (METRIC)
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        if kind not in ("random", "optuna"):
            raise ValueError(f"unknown search {kind!r}; choose from {', '.join(SEARCHES)}")
        self._points = points
        self._budget = [num_samples if searched(p["method"]) else 1 for p in points]
        self._issued = [0] * len(points)
        self._searchers: list = []
        for i, point in enumerate(points):
            if not searched(point["method"]):
                self._searchers.append(None)
                continue
            seed = int(grid.seed) * 1000 + i
            sampler = (optuna.samplers.RandomSampler(seed=seed) if kind == "random"
                       else optuna.samplers.TPESampler(seed=seed))
            self._searchers.append(OptunaSearch(space=space(grid, point["method"]), metric=METRIC, mode=MODE,
                                                sampler=sampler))
        self._owner: dict[str, int] = {}

    @property
    def total(self) -> int:
        """Trials the whole search runs (Tune's num_samples)."""
        return sum(self._budget)

    def suggest(self, trial_id: str) -> dict | None:
        open_points = [i for i, (n, cap) in enumerate(zip(self._issued, self._budget)) if n < cap]
        if not open_points:
            return Searcher.FINISHED
        i = min(open_points, key=lambda j: (self._issued[j], j))
        sampled = {} if self._searchers[i] is None else self._searchers[i].suggest(trial_id)
        if sampled is None:
            return None
        self._issued[i] += 1
        self._owner[trial_id] = i
        # typed and checked, then Tune's dict: enforce gets w_bias 0, the same keys as the grid's trials
        return {"trial": TrialConfig.from_tune({**self._points[i], **sampled}).as_tune()}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        inner = self._inner(trial_id)
        if inner is not None and METRIC in result:
            inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        inner = self._inner(trial_id)
        if inner is not None:
            inner.on_trial_complete(trial_id, result if result and METRIC in result else None, error)

    def _inner(self, trial_id: str):
        i = self._owner.get(trial_id)
        return None if i is None else self._searchers[i]

    def save(self, checkpoint_path: str) -> None:  # Tuner.restore resumes the search where it was
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.__dict__, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            self.__dict__.update(pickle.load(fh))

    def recount(self, trials: dict[str, dict]) -> None:
        """Take the trials the experiment holds (id -> Tune config) as the ones issued. A trial
        this searcher issued but the experiment lost is issued again; one it never heard of
        counts for its point but teaches no point's sampler."""
        index = {point_key(p): i for i, p in enumerate(self._points)}
        issued = [0] * len(self._points)
        for config in trials.values():
            issued[index[point_key(config["trial"])]] += 1
        self._issued = issued
        self._owner = {t: i for t, i in self._owner.items() if t in trials}

    @property
    def exhausted(self) -> bool:
        return all(n >= cap for n, cap in zip(self._issued, self._budget))


class PointSearchGenerator(SearchGenerator):
    """Tune's SearchGenerator for PointSearch (inside a ConcurrencyLimiter), restored from the
    experiment's trial list rather than from the searcher's own counts.

    Tune writes both files together, but uploads them to the bucket one by one; `ray job stop`
    can kill the driver in between and leave a searcher state newer than the trial list. The
    searcher then counts a trial the experiment never ran, that point ends a sample short
    (CI saw 15 of 16 trials), and the limiter keeps a slot for it forever."""

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        trials = _experiment_trials(dirpath)
        searcher = self.searcher
        while not isinstance(searcher, PointSearch):
            if isinstance(searcher, ConcurrencyLimiter):
                searcher.live_trials &= set(trials)
                searcher.num_unfinished_live_trials = len(searcher.live_trials)
            searcher = searcher.searcher
        searcher.recount(trials)
        self._counter = len(trials)
        self._finished = searcher.exhausted


def _experiment_trials(dirpath: str) -> dict[str, dict]:
    """id -> config of the trials in the newest experiment state under dirpath: the file Tune
    restored its trials from (Tuner.restore downloads it beside the searcher's)."""
    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
    from ray.tune.utils.serialization import _loads_with_cloudpickle

    path = _find_newest_experiment_checkpoint(dirpath)
    if path is None:
        raise RuntimeError(f"no Tune experiment state under {dirpath} to restore the search from")
    with open(path, "rb") as fh:
        state = _loads_with_cloudpickle(fh.read())
    trials = [_loads_with_cloudpickle(trial_json) for trial_json, _ in state["trial_data"]]
    return {t["trial_id"]: t["config"] for t in trials}


class PerPointASHA(FIFOScheduler):
    """Asynchronous successive halving (Tune's ASHA) within each grid point, on the per-epoch
    budget-aware validation objective. Trials of other methods run to the end."""

    def __init__(self, epochs: int, grace_epochs: int = 1, reduction_factor: float = 2.0):
        super().__init__()
        # Rungs stop before the last epoch: stopping a trial there would save nothing and lose
        # its final test figures.
        self._settings = {"time_attr": "epoch", "metric": METRIC, "mode": MODE,
                          "max_t": max(int(epochs) - 1, int(grace_epochs)), "grace_period": int(grace_epochs),
                          "reduction_factor": float(reduction_factor), "stop_last_trials": False}
        self._by_point: dict[Hashable, AsyncHyperBandScheduler] = {}
        self.stopped = 0

    def _inner(self, trial) -> AsyncHyperBandScheduler | None:
        config = trial.config["trial"]
        if config["method"] not in EARLY_STOPPED:
            return None
        key = point_key(config)
        if key not in self._by_point:
            self._by_point[key] = AsyncHyperBandScheduler(**self._settings)
        return self._by_point[key]

    def on_trial_add(self, tune_controller, trial) -> None:
        inner = self._inner(trial)
        if inner is not None:
            inner.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        inner = self._inner(trial)
        if inner is None:
            return FIFOScheduler.CONTINUE
        decision = inner.on_trial_result(tune_controller, trial, result)
        self.stopped += decision == FIFOScheduler.STOP
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        inner = self._inner(trial)
        if inner is not None and trial.trial_id in inner._trial_info:
            inner.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        inner = self._inner(trial)
        if inner is not None and trial.trial_id in inner._trial_info:
            inner.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"ASHA per grid point ({len(self._by_point)} points): {self.stopped} trials stopped early"
