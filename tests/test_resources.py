"""What a stage asks of the cluster, against what the cluster holds (pipelines/resources.py), without Ray."""

from __future__ import annotations

import pytest

from pipelines.resources import Demand, cache_demand, shortfall, train_demand, trial_demand, wait_seconds
from pipelines.runtime import UserError

TWO_CPUS = ({"CPU": 2.0}, [{"CPU": 2.0}])


def test_train_workers_must_leave_a_cpu_for_ray_datas_reads():
    assert "needs 3 CPU" in shortfall(train_demand(0, 2, False, None), *TWO_CPUS)  # the hang, refused
    assert shortfall(train_demand(0, 1, False, None), *TWO_CPUS) is None
    assert shortfall(train_demand(0, 2, False, 0.5), *TWO_CPUS) is None  # --cpus-per-worker 0.5


def test_gpu_workers_take_no_cpu_by_default_but_need_their_gpus():
    assert "needs 2 GPU" in shortfall(train_demand(0, 2, True, None), *TWO_CPUS)
    gpus = ({"CPU": 2.0, "GPU": 2.0}, [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}])
    assert shortfall(train_demand(0, 2, True, None), *gpus) is None


def test_a_bundle_must_fit_on_one_node():
    nodes = ({"CPU": 4.0}, [{"CPU": 2.0}, {"CPU": 2.0}])
    assert "on one node" in shortfall(trial_demand({"cpu": 3.0}), *nodes)
    assert shortfall(trial_demand({"cpu": 2.0}), *nodes) is None
    assert "needs 1 GPU" in shortfall(cache_demand(True), *nodes)
    assert shortfall(cache_demand(False), *TWO_CPUS) is None


def test_the_wait_is_none_locally_and_bounded_on_a_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("BMOE_RESOURCE_WAIT_S", raising=False)
    assert wait_seconds() == 0
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert 0 < wait_seconds() <= 600
    monkeypatch.setenv("BMOE_RESOURCE_WAIT_S", "7")
    assert wait_seconds() == 7
    monkeypatch.setenv("BMOE_RESOURCE_WAIT_S", "soon")
    with pytest.raises(UserError, match="BMOE_RESOURCE_WAIT_S"):
        wait_seconds()


def test_demand_totals_count_the_free_cpus():
    demand = Demand("x", ({"CPU": 0.5}, {"CPU": 0.5, "GPU": 1.0}), "fix", free_cpus=1.0)
    assert demand.total("CPU") == 2.0 and demand.total("GPU") == 1.0
