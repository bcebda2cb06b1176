"""Sweep trials without Tune, on a small superres-shaped split written here (gate shards in the
real Parquet format, a cache whose experts differ only on textured patches), and the search
pieces Tune drives: one searcher and one ASHA per (method, d_t) point, saved and restored."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from ray.tune import Stopper

from pipelines import gate_trial
from pipelines.gate_trial import BUDGET_TOLERANCE, SOFT_TOLERANCE, budget_objective, run_trial
from pipelines.methods import HYPERPARAMETERS, TABLE, TrialConfig
from pipelines.points import Point
from pipelines.shard_writer import rows_to_block
from tasks import get_task

TASK = get_task("superres", "smoke")
D = TASK.data_costs()  # three experts, cheapest first
ERROR = np.array([4.0, 1.5, 0.2])[: len(D)]  # per unit of texture: the dearer, the better


def _split(folder, split: str, rows: int, seed: int) -> gate_trial.SplitData:
    """Patches of texture a in [0, 1] (noise amplitude); expert n's error is a^2 * ERROR[n], so a
    flat patch needs no resolution and a textured one needs the dearest expert."""
    rng = np.random.default_rng(seed)
    texture = rng.uniform(0, 1, rows)
    noise = rng.normal(0, 1, (rows, 64, 64, 3))
    patches = np.clip(128 + 100 * texture[:, None, None, None] * noise, 0, 255).astype(np.uint8)
    ids = [f"{split}/{i:04d}" for i in range(rows)]
    path = folder / f"{split}.parquet"
    pq.write_table(rows_to_block([{"sample_id": s, "gate": p} for s, p in zip(ids, patches)]), path,
                   row_group_size=64)
    cache = {"sample_id": ids, "group": [f"img{i // 8}" for i in range(rows)]}
    for n in range(len(D)):
        mse = 1e-4 + texture**2 * ERROR[n] * 1e-2
        cache.update({f"loss_{n}": mse, f"score_{n}": -mse * 4096, f"sse_y_{n}": mse * 4096 * 255**2,
                      f"count_y_{n}": np.full(rows, 4096.0), f"sse_rgb_{n}": mse * 3 * 4096 * 255**2,
                      f"count_rgb_{n}": np.full(rows, 3 * 4096.0)})
    cache_file = folder / f"{split}-cache.parquet"
    pd.DataFrame(cache).to_parquet(cache_file)
    return gate_trial.load_split(cache_file, [path], len(D))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trial")
    return {split: _split(folder, split, rows, seed)
            for split, rows, seed in (("gate", 256, 0), ("val", 128, 1), ("test", 128, 2))}


def _config(method: str, **extra) -> TrialConfig:
    base = {"task": "superres", "profile": "smoke", "options": {}, "seed": 0, "epochs": 3, "method": method}
    if method in ("soft", "enforce", "lagrange"):
        base.update(batch_size=32, lr=3e-3, width=0.25, w_bias=1.0 if method == "soft" else 0.0)
    return TrialConfig.from_tune({**base, **extra})


def test_budget_objective_ranks_every_in_budget_gate_above_any_overspending_one():
    p_val = np.array([30.0, 31.0, 32.0])
    assert budget_objective(31.5, 1000, 1000 / (1 + BUDGET_TOLERANCE) + 1e-6, p_val) == 31.5  # within the tolerance
    over = [budget_objective(40.0, cost, 1000, p_val) for cost in (1200, 1500, 3000)]
    assert max(over) < 30.0 - 1e-9 and over == sorted(over, reverse=True)  # worse the more it overspends
    assert budget_objective(29.0, 1050, 1000, p_val) > max(over)
    # soft regularisation meets its bias: under-spending by more than the tolerance misses it too
    assert budget_objective(29.0, 500, 1000, p_val) == 29.0
    assert budget_objective(29.0, 500, 1000, p_val, two_sided=True) < 30.0 - 1e-9
    assert budget_objective(29.0, 1000 * (1 - SOFT_TOLERANCE) + 1e-6, 1000, p_val, two_sided=True) == 29.0
    assert budget_objective(29.0, 1000 * (1 + SOFT_TOLERANCE) + 1e-3, 1000, p_val, two_sided=True) < 30.0 - 1e-9


def test_run_trial_without_tune_every_method(data, one_thread):
    d_t = float(D[0] + D[-1]) / 2
    reports: list[dict] = []
    static = run_trial(_config("random", targets=[float(D[0]), d_t]), data, report=reports.append)
    assert reports == [] and len(static.points) == 2
    for point in static.points:
        assert abs(point.d_mean - point.d_target) <= 0.02 * point.d_target  # exact quotas
        assert point.val_objective == point.val_performance  # in budget by construction

    enforce = run_trial(_config("enforce", d_target=d_t), data, report=reports.append)
    assert [r["epoch"] for r in reports] == [1, 2, 3]
    assert all(set(r) >= {"val_performance", "val_objective", "val_d_mean", "train_loss"} for r in reports)
    (point,) = enforce.points
    assert abs(point.d_mean - d_t) <= 0.05 * d_t  # enforced on test as in training
    assert enforce.val_objective == max(r["val_objective"] for r in reports)  # the best epoch is kept
    assert len(enforce.test_assignment) == len(data["test"].cache)
    oracle = run_trial(_config("oracle", targets=[d_t]), data, report=reports.append).points[0]
    assert point.performance <= oracle.performance + 1e-9

    lagrange = run_trial(_config("lagrange", targets=[d_t, float(D[-1])]), data, report=reports.append)
    assert len(lagrange.points) == 2 and "val_score_mse" in reports[-1]
    # the price of data is set on the routed inputs themselves: never over budget, within a few inputs of it
    assert all(p.d_mean <= p.d_target * (1 + 1e-9) for p in lagrange.points)
    assert lagrange.points[0].d_mean >= 0.98 * d_t
    assert lagrange.val_objective == pytest.approx(np.mean([p.val_objective for p in lagrange.points]))


@pytest.mark.parametrize("spec", TABLE, ids=lambda m: m.name)
def test_every_method_in_the_table_runs_a_smoke_trial(data, one_thread, spec):
    """The contract a method (a new one too: pipelines/README.md) keeps, read from its table
    entry alone: one point per target with the keys report, compare and MLflow read; epochs
    reported, and a gate saved for serving, exactly when it trains one."""
    d_t = float(D[0] + D[-1]) / 2
    extra = {"d_target": d_t} if spec.per_target else {"targets": [d_t]}
    if spec.trains_gate:
        extra.update(batch_size=32, lr=3e-3, width=0.25, w_bias=1.0 if "w_bias" in spec.searched else 0.0)
    reports: list[dict] = []
    config = TrialConfig.from_tune({"task": "superres", "profile": "smoke", "method": spec.name, "epochs": 2, **extra})
    result = run_trial(config, data, report=reports.append)
    (point,) = result.points
    assert {"d_target", "d_mean", "performance", "share", "val_performance", "val_objective"} <= set(point.as_dict())
    assert Point.from_dict(json.loads(json.dumps(point.as_dict()))) == point  # as the sweep record keeps it
    params, metrics = point.mlflow(config.as_tune(), result.C_g)  # the one MLflow key scheme, every method
    assert params["method"] == spec.name and metrics["test_performance"] == point.performance
    back = Point.from_mlflow(params, metrics)  # what `bmoe compare` reads: all MLflow keeps of the point
    served = point.served and {k: point.served[k] for k in ("performance", "d_mean")}
    assert back == replace(point, b=None, assigned_performance=None, val_d_mean=None, served=served,
                           hyperparameters=back.hyperparameters)
    tune = config.as_tune()
    assert back.hyperparameters == ({k: str(tune[k]) for k in HYPERPARAMETERS if k in tune} or None)
    assert point.d_target == d_t and np.isfinite(point.performance) and sum(point.share) == pytest.approx(1)
    assert [r["epoch"] for r in reports] == ([1, 2] if spec.trains_gate else [])
    assert (result.gate is not None) == spec.trains_gate == spec.servable
    if spec.trains_gate:
        assert result.gate["method"] == spec.name
    if spec.trains_gate and spec.per_target:  # the report's picture of its routing
        assert len(result.test_assignment) == len(data["test"].cache)


def test_soft_keeps_the_epoch_that_respects_the_budget(data, one_thread):
    """With no bias weight the soft gate sends everything to the dearest expert; the kept epoch
    (and the trial's validation figure) is then the objective's, not the raw performance's."""
    d_t = float(D[0]) * 1.05
    reports: list[dict] = []
    result = run_trial(_config("soft", d_target=d_t, w_bias=0.0), data, report=reports.append)
    best = max(reports, key=lambda r: r["val_objective"])
    assert result.val_objective == best["val_objective"]
    assert result.val_performance == best["val_performance"] and result.val_d_mean == best["val_d_mean"]


def test_point_search_samples_every_point_alike_and_survives_a_restore(tmp_path):
    from ray.tune.search import Searcher

    from pipelines.search import PointSearch
    from pipelines.grid import GRIDS, search_points

    grid = GRIDS["smoke"]
    points = search_points([_config("random", targets=[1.0, 2.0]),
                            *[_config(m, d_target=t, lr=lr) for m in ("soft", "enforce") for t in (1.0, 2.0)
                              for lr in (1e-3, 1e-2)]])  # hyperparameters dropped: one point per (method, d_t)
    assert [(p["method"], p.get("d_target")) for p in points] == [
        ("random", None), ("soft", 1.0), ("soft", 2.0), ("enforce", 1.0), ("enforce", 2.0)]
    search = PointSearch(points, grid, "random", num_samples=3)
    assert search.total == 1 + 4 * 3
    first = [search.suggest(f"t{i}")["trial"] for i in range(6)]
    assert [t["method"] for t in first[:5]] == ["random", "soft", "soft", "enforce", "enforce"]
    assert first[5]["method"] == "soft" and first[5]["d_target"] == 1.0  # the point with fewest trials next
    assert all(grid.lr_range[0] <= t["lr"] <= grid.lr_range[1] for t in first[1:])
    assert all(t["w_bias"] == 0.0 for t in first if t["method"] == "enforce")
    assert all(grid.w_bias_range[0] <= t["w_bias"] <= grid.w_bias_range[1] for t in first if t["method"] == "soft")
    for i, t in enumerate(first):
        search.on_trial_complete(f"t{i}", {"val_objective": float(i), "epoch": 3})
    search.save(str(tmp_path / "search.pkl"))
    restored = PointSearch(points, grid, "random", num_samples=3)
    restored.restore(str(tmp_path / "search.pkl"))
    rest = [restored.suggest(f"r{i}") for i in range(search.total - 6)]
    assert all(r is not None and r != Searcher.FINISHED for r in rest)
    assert restored.suggest("late") == Searcher.FINISHED  # the budget holds across the restore
    counts = pd.Series([(t["method"], t.get("d_target")) for t in first + [r["trial"] for r in rest]]).value_counts()
    assert counts[("random", None)] == 1 and (counts.drop(("random", None)) == 3).all()
    with pytest.raises(ValueError, match="unknown search"):
        PointSearch(points, grid, "bayes", num_samples=2)


class _StopFlag(Stopper):
    """Tune stops the whole experiment while the flag file exists (a `ray job stop`, politely)."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        import os

        return os.path.exists(self.flag)


@pytest.mark.slow  # real Tune on a local Ray
def test_a_restored_search_issues_again_the_trials_its_experiment_lost(ray_session, tmp_path):
    """The driver dies between uploading the searcher's state and the trial list (simulated by
    dropping the newest trial from the experiment state): the restored search takes the trial
    list as the truth and every point still ends with its samples."""
    import json

    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from pipelines.search import PointSearch, PointSearchGenerator
    from pipelines.grid import GRIDS, search_points

    def finishing(config):  # defined here: Ray's workers cannot import a test module
        import os

        if config["trial"]["method"] == "enforce" and not os.path.exists(f"{config['flag']}.done"):
            open(config["flag"], "a").close()  # the first gate trial to finish stops the experiment
        tune.report({"val_objective": float(config["trial"].get("lr", 0.0)), "epoch": 1})

    points = search_points([_config("random", targets=[1.0, 2.0]),
                            *[_config("enforce", d_target=t) for t in (1.0, 2.0)]])
    search = PointSearch(points, GRIDS["smoke"], "random", num_samples=2)
    flag = tmp_path / "stop"
    tuner = tune.Tuner(finishing, param_space={"flag": str(flag)},
                       tune_config=tune.TuneConfig(search_alg=PointSearchGenerator(ConcurrencyLimiter(search, 1)),
                                                   num_samples=search.total),
                       run_config=tune.RunConfig(name="lost", storage_path=str(tmp_path), stop=_StopFlag(flag),
                                                 verbose=0))
    first = tuner.fit()
    assert flag.exists() and len(first) < search.total
    state_file = max((tmp_path / "lost").glob("experiment_state-*.json"))
    state = json.loads(state_file.read_text())
    kept = state["trial_data"][:-1]
    lost = json.loads(state["trial_data"][-1][0])["trial_id"]
    state_file.write_text(json.dumps({**state, "trial_data": kept}))
    flag.rename(f"{flag}.done")

    results = tune.Tuner.restore(str(tmp_path / "lost"), trainable=finishing).fit()
    configs = [r.config["trial"] for r in results]
    assert len(configs) == search.total and not any(r.error for r in results)
    counts = pd.Series([(c["method"], c.get("d_target")) for c in configs]).value_counts()
    assert counts[("random", None)] == 1 and (counts.drop(("random", None)) == 2).all()
    assert lost not in {r.metrics.get("trial_id") for r in results}


class _Trial:
    def __init__(self, trial_id: str, config: TrialConfig):
        self.trial_id, self.config = trial_id, {"trial": config.as_tune()}  # Tune's dict


def test_asha_compares_trials_only_within_their_point():
    from pipelines.search import PerPointASHA

    asha = PerPointASHA(epochs=4, grace_epochs=1, reduction_factor=2)
    cheap = [_Trial(f"c{i}", _config("enforce", d_target=1.0)) for i in range(2)]
    dear = [_Trial(f"d{i}", _config("enforce", d_target=9.0)) for i in range(2)]
    static = _Trial("s", _config("random", targets=[1.0, 9.0]))
    for trial in (*cheap, *dear, static):
        asha.on_trial_add(None, trial)
    # the dear point's trials score far above the cheap point's: the cheap ones still go on...
    assert asha.on_trial_result(None, dear[0], {"epoch": 1, "val_objective": 32.0}) == "CONTINUE"
    assert asha.on_trial_result(None, cheap[0], {"epoch": 1, "val_objective": 20.0}) == "CONTINUE"
    # ...and a trial trailing its own point's first one at the rung is stopped
    assert asha.on_trial_result(None, cheap[1], {"epoch": 1, "val_objective": 19.0}) == "STOP"
    assert asha.on_trial_result(None, dear[1], {"epoch": 1, "val_objective": 33.0}) == "CONTINUE"
    assert asha.on_trial_result(None, static, {"val_objective": 0.0}) == "CONTINUE"
    assert asha.stopped == 1 and "1 trials stopped early" in asha.debug_string()
    pickle.loads(pickle.dumps(asha))  # Tune saves the scheduler with the experiment


def test_a_searched_sweep_is_not_capped_by_the_gpus_present_at_start():
    """An autoscaling cluster that starts with no GPU node: a GPU search still keeps one trial per
    (method, d_t) point pending (the demand that adds GPU nodes); a cluster with room runs more."""
    import dataclasses

    from pipelines.grid import GRIDS
    from pipelines.sweep import search_concurrency

    grid = dataclasses.replace(GRIDS["demo"], search="optuna", cpus_per_trial=1.0, gpus_per_trial=0.25)
    assert search_concurrency(grid, points=21, resources={"CPU": 2.0}) == 21  # no GPU yet
    assert search_concurrency(grid, points=21, resources={"CPU": 64.0, "GPU": 8.0}) == 32  # 8 GPUs / 0.25
    assert search_concurrency(dataclasses.replace(grid, gpus_per_trial=0.0), points=3,
                              resources={"CPU": 2.0}) == 3


@pytest.mark.parametrize("method", ["soft", "enforce"])
def test_at_an_end_of_the_budget_range_every_input_goes_to_that_expert_untrained(data, method):
    """b is one-hot at d_min and d_max: nothing for a gate to choose, so none is trained or saved."""
    reports: list[dict] = []
    for n, d_t in ((0, float(D[0])), (len(D) - 1, float(D[-1]))):
        result = run_trial(_config(method, d_target=d_t), data, report=reports.append)
        (point,) = result.points
        assert point.d_mean == pytest.approx(d_t) and point.share[n] == 1.0
        assert result.gate is None and result.C_g == 0 and set(result.test_assignment) == {n}
        assert result.val_objective == result.val_performance  # on budget by construction
    assert reports == []  # no epochs ran
