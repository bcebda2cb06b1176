"""Every stage of the detection pipeline on the smoke profile, through real Ray, real MLflow
and real pycocotools, on a synthetic COCO tree (the embedded default) and a broken one."""

from __future__ import annotations

import json
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipelines.runtime import RunConfig, UserError
from tasks.detection import metrics, synthetic

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_session):
    """A smoke run taken through prepare, train-experts and cache once for the module."""
    from pipelines.cache import cache
    from pipelines.prepare import prepare
    from pipelines.train_experts import train_experts

    cfg = RunConfig(task="detection", root=str(tmp_path_factory.mktemp("run")), profile="smoke")
    manifest = prepare(cfg)
    experts = train_experts(cfg)
    files = cache(cfg)
    return cfg, manifest, experts, files


def test_prepare_reads_the_embedded_coco_tree(run):
    cfg, manifest, _, _ = run
    raw = cfg.layout.raw()
    assert (raw / "annotations" / "instances_train2017.json").exists() and any((raw / "val2017").glob("*.jpg"))
    assert manifest["experts"] == ["ssd_tiny_36", "ssd_tiny_48", "ssd_tiny_64"]
    assert manifest["data_costs"] == [3 * 36**2 * 4.0, 3 * 48**2 * 4.0, 3 * 64**2 * 4.0]
    for split in ("train", "val", "test"):
        info = manifest["splits"][split]
        assert info["samples"] > 0 and info["problems"] == []
        assert all(info["shards"][part]["rows"] == info["samples"] for part in ("p0", "p1", "p2", "gate"))
        enc = info["mean_encoded_bytes"]
        assert enc["p0"] < enc["p1"] < enc["p2"]  # JPEG bytes of P_n(x) grow with R


def test_experts_checkpointed_and_logged(run):
    cfg, _, experts, _ = run
    mlflow.set_tracking_uri(cfg.mlflow_uri)
    assert [e["expert"] for e in experts] == [0, 1, 2]
    for e in experts:
        logged = mlflow.get_run(e["mlflow_run_id"])
        assert np.isfinite(logged.data.metrics["train_loss"]) and np.isfinite(logged.data.metrics["val_loss"])


def test_cache_holds_every_experts_detections_loss_and_score(run):
    cfg, manifest, _, files = run
    for split, path in files.items():
        table = pd.read_parquet(path)
        assert len(table) == manifest["splits"][split]["samples"]
        for n in range(3):
            assert np.isfinite(table[f"loss_{n}"]).all() and (table[f"loss_{n}"] > 0).all()
            assert ((table[f"score_{n}"] >= 0) & (table[f"score_{n}"] <= 1)).all()  # each image's own AP
            for blob in table[f"dets_{n}"]:
                dets = metrics.unpack_dets(blob)
                assert set(dets[:, 5].astype(int)) <= set(synthetic.CATEGORY_IDS)


def test_sweep_and_report(run):
    from pipelines.report import report
    from pipelines.sweep import GRIDS, sweep, with_methods

    cfg, _, _, _ = run
    grid = with_methods(GRIDS["smoke"], "experts,random,heuristic,oracle,enforce")
    result = json.loads(sweep(cfg, grid, name="smoke-detection").read_text())
    assert {t["config"]["method"] for t in result["trials"]} == {"experts", "random", "heuristic", "oracle", "enforce"}

    summary = json.loads(report(cfg).read_text())
    assert summary["task"] == "detection" and summary["metric"].startswith("COCO mAP")
    assert summary["d_min"] == 3 * 36**2 * 4.0 and summary["d_max"] == 3 * 64**2 * 4.0
    assert 0 < summary["C_g"] < 1e8
    for method, info in summary["methods"].items():
        assert np.isfinite(info["rho"]), method
        for p in info["points"]:
            assert 0 <= p["performance"] <= 1 and {"d_target", "d_mean"} <= set(p)
            if method != "experts":
                assert 0 <= p["map50"] <= 1
    reports = cfg.layout.reports()
    text = (reports / "report.md").read_text()
    assert "rho" in text and "map50" in text
    assert (reports / "performance_vs_cost.png").stat().st_size > 10_000


def test_bad_coco_tree_is_named_counted_and_strict_fails(tmp_path, ray_session):
    from pipelines.prepare import prepare

    root = synthetic.write_coco_tree(tmp_path / "coco", {"train2017": 6, "val2017": 6}, seed=5)
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    missing, broken = data["images"][0]["file_name"], data["images"][1]["file_name"]
    (root / "val2017" / missing).unlink()
    (root / "val2017" / broken).write_bytes(b"\xff\xd8\xff\xe0 truncated")
    data["annotations"][-1]["bbox"][3] = 0.0
    path.write_text(json.dumps(data))

    cfg = RunConfig(task="detection", root=str(tmp_path / "run"), profile="smoke", data_root=str(root))
    manifest = prepare(cfg)
    problems = "\n".join(p for s in manifest["splits"].values() for p in s["problems"])
    assert missing in problems and broken in problems and "zero-area box" in problems
    assert sum(s["samples"] for s in manifest["splits"].values()) == 10  # the other images are used
    strict = RunConfig(task="detection", root=str(tmp_path / "strict"), profile="smoke", data_root=str(root),
                       strict=True)
    with pytest.raises(UserError, match=r"\.jpg"):
        prepare(strict)
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
