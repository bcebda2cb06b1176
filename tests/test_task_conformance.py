"""Every registered task against tasks.base.TaskBase: nothing abstract left, the class attributes
and settings the pipelines rely on, N experts everywhere N is counted, the base's own behaviour
(embedded data kept by its key, a root that is not the data set's layout refused in one line),
and the cache column contract (evaluate's columns, read back by metric as <column>_<n>)."""

from __future__ import annotations

import inspect
import time

import numpy as np
import pandas as pd
import pytest
import torch

from tasks import TASKS, BadInput, TaskBase, get_task
from tasks.base import SOURCE_SPLITS


@pytest.fixture(params=sorted(TASKS))
def task(request) -> TaskBase:
    return get_task(request.param, "smoke")


def test_the_class_is_complete_and_says_what_the_pipelines_read(task):
    cls = type(task)
    assert isinstance(task, TaskBase) and not cls.__abstractmethods__
    assert task.name in TASKS and get_task(task.name, "smoke").name == task.name
    assert isinstance(task.metric_name, str) and task.metric_name
    assert all(isinstance(c, tuple) and c for c in (task.target_columns, task.meta_columns))
    assert set(task.train_columns or task.target_columns) <= set(task.target_columns)
    assert set(cls.profiles) == {"smoke", "demo", "paper"}
    for profile in cls.profiles:
        settings = get_task(task.name, profile).settings
        assert all(hasattr(settings, key) for key in ("epochs", "batch_size", "lr", "K", "gate_share"))
    with pytest.raises(ValueError, match="unknown .* option"):
        get_task(task.name, "smoke", {"no_such_setting": "1"})
    assert list(inspect.signature(cls.response).parameters) == ["self", "request", "outputs"]


@pytest.mark.parametrize("profile", ["smoke", "demo", "paper"])
def test_n_experts_agree_everywhere(task, profile):
    task = get_task(task.name, profile)
    names, d = task.expert_names(), task.data_costs()
    n = len(names)
    assert n >= 2 and d.shape == (n,) and (d > 0).all() and len(set(names)) == n
    assert task.gate_spec().n_experts == n
    assert task.expert_training(0).epochs == task.settings.epochs


def test_embedded_data_is_written_once_per_key_and_listed(task, tmp_path):
    root = task.embedded_data(tmp_path / "data", seed=0)
    stamp = root / "embedded.json"
    written = stamp.stat().st_mtime_ns
    time.sleep(0.01)
    assert task.embedded_data(tmp_path / "data", seed=0) == root and stamp.stat().st_mtime_ns == written
    for split in SOURCE_SPLITS:
        listing = task.list_sources(root, split)
        assert listing.sources and all({"source_id", "path", "stamp"} <= set(s) for s in listing.sources)
    rows = task.load(task.list_sources(root, "val").sources[0])
    n = len(task.expert_names())
    assert rows and {"sample_id", "group", "gate", *(f"x{k}" for k in range(n)), *(f"enc{k}" for k in range(n)),
                     *task.target_columns, *task.meta_columns} <= set(rows[0])
    x = task.gate_tensor(np.stack([r["gate"] for r in rows]))
    spec = task.gate_spec()
    assert x.dtype == torch.float32 and tuple(x.shape[1:]) == (spec.in_channels, *spec.in_size)
    with pytest.raises(BadInput) as info:
        task.list_sources(tmp_path / "not-a-data-set", "train")
    assert "\n" not in str(info.value)


def test_the_cache_column_contract(task, tmp_path):
    """evaluate's per-sample columns, stored as <column>_<n>, are what metric reads: a cache made
    the way pipelines/cache.py makes it gives a finite metric for any assignment."""
    root = task.embedded_data(tmp_path / "data", seed=0)
    rows = [r for s in task.list_sources(root, "val").sources[:2] for r in task.load(s)]
    torch.manual_seed(0)
    cache = pd.DataFrame({"sample_id": [r["sample_id"] for r in rows], "group": [r["group"] for r in rows],
                          **{c: [r[c] for r in rows] for c in task.meta_columns}})
    for n in range(len(task.expert_names())):
        batch = {"x": np.stack([r[f"x{n}"] for r in rows]),
                 **{c: np.stack([np.asarray(r[c]) for r in rows]) for c in task.target_columns}}
        with torch.no_grad():  # as pipelines/cache.py scores
            columns = task.evaluate(n, task.build_expert(n).eval(), batch, torch.device("cpu"))
        assert {"loss", "score"} <= set(columns) and all(len(v) == len(rows) for v in columns.values())
        for column, values in columns.items():
            cache[f"{column}_{n}"] = list(values)
    for expert in range(len(task.expert_names())):
        figures = task.metric(cache, np.full(len(cache), expert))
        assert np.isfinite(figures["performance"])
    assert task.sample_weights(cache).shape == (len(cache),)
