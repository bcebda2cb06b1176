"""The method table and typed trial configs (pipelines/methods.py): what each stage asks of a
method, and a trial that is wrong for its method refused when it is made, not mid-sweep."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.methods import (ALL_TARGET_GATES, METHODS, NAMES, PER_TARGET_GATES, SERVABLE, STATIC, TrialConfig,
                               method)
from pipelines.runtime import RunConfig


def test_the_table_says_what_each_method_is():
    assert NAMES == ("experts", "random", "heuristic", "soft", "enforce", "lagrange", "oracle")  # report order
    assert STATIC == ("experts", "random", "heuristic", "oracle")
    assert PER_TARGET_GATES == ("soft", "enforce") and ALL_TARGET_GATES == ("lagrange",)
    assert set(SERVABLE) == set(PER_TARGET_GATES + ALL_TARGET_GATES)
    assert "w_bias" in METHODS["soft"].searched and "w_bias" not in METHODS["enforce"].searched
    assert {m.gate_output for m in METHODS.values() if m.servable} == {"logits", "scores"}
    with pytest.raises(ValueError, match="unknown method 'hard'; choose from experts, random"):
        method("hard")


def test_trial_configs_round_trip_through_tunes_dict():
    base = dict(task_name="superres", profile="smoke", seed=3, epochs=2)
    soft = TrialConfig(**base, method="soft", d_target=4096.0, batch_size=16, lr=1e-3, width=0.5, w_bias=10.0)
    enforce = TrialConfig(**base, method="enforce", d_target=4096.0, batch_size=16, lr=1e-3, width=0.5)
    lagrange = TrialConfig(**base, method="lagrange", targets=(3072.0, 4096.0), batch_size=16, lr=1e-3, width=0.5)
    static = TrialConfig(**base, method="oracle", targets=(3072.0,))
    for config in (soft, enforce, lagrange, static):
        plain = config.as_tune()
        assert json.loads(json.dumps(plain)) == plain  # JSON-able: sweep records, MLflow params
        assert TrialConfig.from_tune({**plain, "tune_extra": 1}) == config
    assert enforce.as_tune()["w_bias"] == 0.0  # both per-target gates carry the same keys
    assert "w_bias" not in lagrange.as_tune() and "batch_size" not in static.as_tune()
    tuned = TrialConfig.from_tune({**soft.as_tune(), "batch_size": np.int64(32), "lr": "0.01"})  # what searchers give
    assert tuned.batch_size == 32 and type(tuned.batch_size) is int and tuned.lr == 0.01


@pytest.mark.parametrize("bad, message", [
    (dict(method="soft", targets=(1.0,), batch_size=16, lr=1e-3, width=1.0), "takes a d_target"),
    (dict(method="lagrange", d_target=1.0, batch_size=16, lr=1e-3, width=1.0), "takes targets"),
    (dict(method="enforce", d_target=1.0), "needs batch_size, lr and width"),
    (dict(method="enforce", d_target=1.0, batch_size=16, lr=1e-3, width=1.0, w_bias=1.0), "has no w_bias"),
    (dict(method="random"), "takes targets"),
    (dict(method="hard", d_target=1.0), "unknown method"),
])
def test_a_trial_wrong_for_its_method_is_refused_when_made(bad, message):
    with pytest.raises(ValueError, match=message):
        TrialConfig(task_name="superres", profile="smoke", **bad)


def test_the_sweeps_trials_follow_the_table():
    from dataclasses import replace

    from pipelines.grid import GRIDS, trial_configs

    cfg = RunConfig(task_name="superres", root="/unused", profile="demo")
    d = cfg.task().data_costs()
    grid = GRIDS["demo"]
    configs = trial_configs(cfg, grid, d)
    by_method = {name: [c for c in configs if c.method == name] for name in grid.methods}
    points = len({c.d_target for c in by_method["enforce"]})
    assert points == grid.points + 2  # the grid's targets and d_max/2, d_max/3
    assert all(len(by_method[m]) == 1 for m in STATIC + ALL_TARGET_GATES)
    lrs, batch_sizes, inits = grid.own(METHODS["enforce"])  # enforce's own: validation picks among them
    assert len(by_method["enforce"]) == points * len(lrs) * len(batch_sizes) * inits
    assert len(by_method["soft"]) == points * len(grid.w_biases)
    assert {(c.lr, c.batch_size) for c in by_method["enforce"]} == {(lr, M) for lr in lrs for M in batch_sizes}
    assert batch_sizes != grid.batch_sizes  # the demo's enforce trains on batches of 64
    restarts = trial_configs(cfg, replace(grid, enforce_inits=3), d)
    enforce = [c for c in restarts if c.method == "enforce"]
    assert len(enforce) == 3 * len(by_method["enforce"]) and len({c.gate_seed for c in enforce}) == 3
    assert sorted(c.init for c in enforce) == sorted([0, 1, 2] * len(by_method["enforce"]))
    assert {c.init for c in restarts if c.method != "enforce"} == {0}
    assert {c.batch_size for c in by_method["soft"] + by_method["lagrange"]} == set(grid.batch_sizes)
    assert {c.lr for c in by_method["soft"] + by_method["lagrange"]} == set(grid.lrs)
    assert [c.method for c in configs][:4] == list(STATIC)  # static first, as sweeps always ran them


def test_enforces_own_batch_sizes_reach_searches_and_step_budgets():
    from dataclasses import replace

    from pipelines.grid import SweepGrid, with_gate_steps
    from pipelines.search import space

    grid = SweepGrid(batch_sizes=(8,), enforce_batch_sizes=(32,))
    assert space(grid, "enforce")["batch_size"].categories == [32]
    assert space(grid, "soft")["batch_size"].categories == [8]
    # the horizon is the most epochs any trial takes: 100 steps on 64 rows are 50 epochs of
    # batch 32 (2 steps an epoch) and 13 of batch 8
    assert with_gate_steps(grid, steps=100, gate_rows=64).epochs == 50
    assert with_gate_steps(replace(grid, enforce_batch_sizes=()), steps=100, gate_rows=64).epochs == 13


def test_restarts_are_named_only_where_used():
    from dataclasses import replace

    from pipelines.grid import GRIDS, grid_identity

    # a paper sweep named before enforce had its own batch sizes and restarts keeps its name
    assert "enforce_inits" not in grid_identity(GRIDS["paper"]) and "enforce_batch_sizes" not in grid_identity(GRIDS["paper"])
    assert grid_identity(GRIDS["demo"])["enforce_batch_sizes"] == (64,) and "enforce_inits" not in grid_identity(GRIDS["demo"])
    assert grid_identity(replace(GRIDS["demo"], enforce_inits=2))["enforce_inits"] == 2
    first = TrialConfig(task_name="superres", profile="demo", method="enforce", d_target=5000.0, batch_size=64, lr=1e-3,
                        width=0.5, seed=1)
    again = TrialConfig.from_tune({**first.as_tune(), "init": 1})
    assert "init" not in first.as_tune() and again.as_tune()["init"] == 1
    assert first.gate_seed == 1 and again.gate_seed != first.gate_seed
    with pytest.raises(ValueError, match="no gate"):
        TrialConfig(task_name="superres", profile="demo", method="random", targets=(5000.0,), init=1)
