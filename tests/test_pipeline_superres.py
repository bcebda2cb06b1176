"""Every stage of the superres pipeline on the smoke profile, through real Ray and real MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from pipelines.runtime import RunConfig, UserError

PROJECT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_session):
    """A smoke run taken through prepare, train-experts and cache once for the module, on a
    local root given as a file:// URI (tests/test_cluster.py runs the same stages on S3)."""
    from pipelines.cache import cache
    from pipelines.prepare import prepare
    from pipelines.train_experts import train_experts

    cfg = RunConfig(task="superres", root=(tmp_path_factory.mktemp("store") / "runs").as_uri(), profile="smoke")
    manifest = prepare(cfg)
    experts = train_experts(cfg)
    files = cache(cfg)
    yield cfg, manifest, experts, files


def test_prepare_writes_shards_per_expert_and_is_idempotent(run, capsys):
    from pipelines.prepare import prepare

    cfg, manifest, _, _ = run
    assert manifest["experts"] == ["espcn_x4", "espcn_x3", "espcn_x2"]
    assert manifest["data_costs"] == [3072.0, pytest.approx(64 * 64 / 9 * 12), 12288.0]
    for split in ("train", "val", "test"):
        info = manifest["splits"][split]
        assert info["samples"] > 0 and info["problems"] == []
        for part in ("p0", "p1", "p2", "gate"):
            assert info["shards"][part]["rows"] == info["samples"]
            files = info["shards"][part]["files"]
            assert all((cfg.layout.shards(split, part) / f["name"]).exists() for f in files)
            assert sum(f["rows"] for f in files) == info["samples"] and all(len(f["footer_sha256"]) == 64 for f in files)
        # PNG bytes of the LR patch grow with resolution, as the data costs do
        enc = info["mean_encoded_bytes"]
        assert enc["p0"] < enc["p1"] < enc["p2"]
    again = prepare(cfg)
    assert again["created"] == manifest["created"]
    assert "nothing to do" in capsys.readouterr().out


def test_experts_checkpointed_and_logged_to_mlflow(run):
    cfg, _, experts, _ = run
    assert [e["expert"] for e in experts] == [0, 1, 2]
    mlflow.set_tracking_uri(cfg.mlflow_uri)
    for e in experts:
        assert cfg.layout.resolve(e["weights"]) == cfg.layout.weights(e["expert"]) and cfg.layout.weights(e["expert"]).exists()
        logged = mlflow.get_run(e["mlflow_run_id"])
        assert "train_loss" in logged.data.metrics
        assert mlflow.pytorch.load_model(f"runs:/{e['mlflow_run_id']}/model") is not None


def test_cache_has_every_expert_on_every_sample(run):
    import pandas as pd

    cfg, manifest, _, files = run
    for split, path in files.items():
        table = pd.read_parquet(path)
        assert len(table) == manifest["splits"][split]["samples"]
        for n in range(3):
            assert np.isfinite(table[f"loss_{n}"]).all() and (table[f"loss_{n}"] >= 0).all()
            assert (table[f"score_{n}"] <= 0).all()  # score = -MSE


def test_sweep_report_and_mlflow_runs(run):
    from pipelines.report import report
    from pipelines.sweep import GRIDS, sweep

    cfg, _, _, _ = run
    out = sweep(cfg, GRIDS["smoke"], name="smoke-sweep")
    result = json.loads(out.read_text())
    methods = {t["config"]["method"] for t in result["trials"]}
    assert methods == {"experts", "random", "heuristic", "oracle", "soft", "enforce", "lagrange"}

    mlflow.set_tracking_uri(cfg.mlflow_uri)
    children = mlflow.search_runs(experiment_names=["bmoe-superres"],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{result['mlflow_parent_run']}'",
                                  output_format="list")
    assert len(children) == len(result["trials"])
    trained = [r for r in children if "test_performance" in r.data.metrics]
    assert trained and all("d_mean" in r.data.metrics and "C_g" in r.data.metrics for r in trained)

    summary = json.loads(report(cfg).read_text())
    assert summary["task"] == "superres" and summary["d_min"] == 3072.0 and summary["d_max"] == 12288.0
    assert len(summary["expert_performance"]) == 3 and summary["C_g"] > 0
    for method, info in summary["methods"].items():
        assert np.isfinite(info["rho"])
        for p in info["points"]:
            assert {"d_target", "d_mean", "performance"} <= set(p)
    # budgets: quota methods spend the target up to one input's rounding, the oracle at most one
    # input's cost step over it (on 2 cores the smoke test set is too small to rank methods)
    m_test = json.loads(cfg.layout.manifest().read_text())["splits"]["test"]["samples"]
    step = (summary["d_max"] - summary["d_min"]) / m_test
    for method in ("random", "heuristic", "enforce"):
        for p in summary["methods"][method]["points"]:
            assert abs(p["d_mean"] - p["d_target"]) <= step + 1e-6, (method, p)
    for p in summary["methods"]["oracle"]["points"]:
        assert p["d_mean"] <= p["d_target"] + step + 1e-6
    reports = cfg.layout.reports()
    assert (reports / "report.md").read_text().count("|") > 20
    assert (reports / "performance_vs_cost.png").stat().st_size > 10_000


def test_corrupt_image_is_named_counted_and_strict_fails(tmp_path, ray_session):
    from pipelines.prepare import prepare

    data = tmp_path / "images"
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        (data / split).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(data / split / f"{split}{i}.png")
    (data / "train" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    cfg = RunConfig(task="superres", root=str(tmp_path / "run"), profile="smoke", data_root=str(data))
    manifest = prepare(cfg)
    problems = [p for s in manifest["splits"].values() for p in s["problems"]]
    assert len(problems) == 1 and "broken.png" in problems[0]
    with pytest.raises(UserError, match="broken.png"):
        prepare(RunConfig(task="superres", root=str(tmp_path / "strict"), profile="smoke", data_root=str(data),
                          strict=True))


def test_interrupted_sweep_resumes_without_duplicate_runs(run):
    from pipelines.sweep import GRIDS, sweep

    cfg, _, _, _ = run
    name = "resume-me"
    env = dict(os.environ, RAY_ADDRESS=ray_address())
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "sweep", "--root", cfg.root, "--profile", "smoke",
                             "--name", name], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    mlflow.set_tracking_uri(cfg.mlflow_uri)
    finished = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            finished = mlflow.search_runs(experiment_names=["bmoe-superres"], output_format="list",
                                          filter_string=f"tags.`bmoe.sweep` = '{name}' and attributes.status = 'FINISHED'")
            if len(finished) >= 2:
                break
            time.sleep(0.5)
        assert len(finished) >= 2, "the sweep finished no trial before the deadline"
        os.killpg(proc.pid, signal.SIGINT)  # as a user's Ctrl-C
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "Traceback" not in output

    result = json.loads(sweep(cfg, GRIDS["smoke"], name=name).read_text())
    runs = mlflow.search_runs(experiment_names=["bmoe-superres"], output_format="list",
                              filter_string=f"tags.`bmoe.sweep` = '{name}' and attributes.status = 'FINISHED'")
    names = [r.data.tags["trial_name"] for r in runs]
    assert len(names) == len(set(names)), "a finished trial was logged twice"
    assert len(result["trials"]) == len(set(names))


def ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address
