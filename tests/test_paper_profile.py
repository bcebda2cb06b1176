"""The paper profile, end to end: what a cluster user runs first. Every stage (prepare,
train-experts, cache, sweep, report) of detection and action, the tasks whose paper profile has
its own architectures and recipes (VGG16 SSDs with SGD; EMV-CNN streams over two DDP workers), on
a few real-format files written here (a COCO tree, a UCF-101 tree with MPEG-4 clips), with the
paper's grid and `-o` size overrides that keep each task to about a minute on 2 cores.
Superres's paper profile is the demo's full-width ESPCNs on more data for more epochs (its DIV2K
tree is read in tests/test_superres_paper.py and prepared below). Action's experts train with two
Ray Train workers (DDP over gloo) for several steps each, which a fusion expert holding unused
parameters fails. A fit that the cluster cannot hold, and a cluster that cannot be reached, are
refused in one line."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from pipelines.runtime import RunConfig, UserError

pytestmark = pytest.mark.slow
PROJECT = Path(__file__).resolve().parents[1]

# The gate's paper settings with fewer steps, experts for an epoch on tiny inputs (action's at 1/8 width);
# everything else is the paper profile (architectures, optimizers, the paper grid's batch and lr).
OPTIONS = {
    "superres": {"epochs": "1", "batch_size": "8", "gate_share": "0.4", "gate_steps": "3"},
    "detection": {"epochs": "1", "batch_size": "2", "gate_share": "0.4", "gate_steps": "3", "warmup_steps": "20"},
    "action": {"epochs": "1", "batch_size": "2", "gate_share": "0.4", "gate_steps": "3", "F_t": "8", "F_s": "1",
               "H_s": "48", "W_s": "64", "expert_width": "0.125"},  # EMV-CNN streams at 1/8 of their width
}
METHODS = ("experts", "random", "enforce", "lagrange", "oracle")


def _div2k_tree(root: Path) -> Path:
    """DIV2K's layout (DIV2K_train_HR, DIV2K_valid_HR) of 160 x 160 crops of real photographs
    (scikit-image's), nine 64 x 64 patches each after the 64-pixel grid."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.stereo_motorcycle()[0],
              data.immunohistochemistry(), data.hubble_deep_field(), data.retina(), data.cat()]
    for i, photo in enumerate(photos):
        folder = root / ("DIV2K_train_HR" if i < 6 else "DIV2K_valid_HR")
        folder.mkdir(parents=True, exist_ok=True)
        h, w = photo.shape[:2]
        crop = photo[(h - 192) // 2:(h - 192) // 2 + 192, (w - 192) // 2:(w - 192) // 2 + 192, :3]
        Image.fromarray(crop).save(folder / f"{i + 1:04d}.png")
    return root


def _coco_tree(root: Path) -> Path:
    from tasks.detection import synthetic

    return synthetic.write_coco_tree(root, {"train2017": 4, "val2017": 4}, seed=0, width=160, height=120)


def _ucf_tree(root: Path) -> Path:
    from tasks import get_task
    from tasks.action import synthetic

    frames = get_task("action", "paper", OPTIONS["action"]).clip_frames()
    return synthetic.write_ucf101_tree(root, clips_per_group=1, frames=frames, height=96, width=128, groups=12,
                                       classes=synthetic.CLASSES[:4])


TREES = {"superres": _div2k_tree, "detection": _coco_tree, "action": _ucf_tree}


def _paper_config(task_name: str, root: Path, data_root: Path, **extra) -> RunConfig:
    from pipelines.runtime import label_options

    options = {**label_options(task_name, "paper", str(data_root)), **OPTIONS[task_name]}
    return RunConfig(task_name=task_name, root=str(root), profile="paper", data_root=str(data_root),
                     task_options=options, **extra)


@pytest.mark.parametrize("task_name", ["detection", "action"])
def test_the_paper_profile_runs_every_stage(task_name, tmp_path, ray_session, capsys):
    from pipelines.cache import cache
    from pipelines.prepare import prepare
    from pipelines.report import report
    from pipelines.grid import GRIDS
    from pipelines.sweep import sweep
    from pipelines.train_experts import train_experts

    data_root = TREES[task_name](tmp_path / "data")
    # Logical CPU shares, so that the fits run at once beside Ray Data's reads on 2 CPUs (a small fit
    # waits on process starts more than it computes); action: two Train workers per expert (DDP)
    workers = {"num_workers": 2, "cpus_per_worker": 0.15} if task_name == "action" else {"cpus_per_worker": 0.3}
    cfg = _paper_config(task_name, tmp_path / "runs", data_root, **workers)
    task = cfg.task()
    seconds = {}

    def timed(stage: str, fn, *args):
        started = time.perf_counter()
        out = fn(*args)
        seconds[stage] = round(time.perf_counter() - started, 1)
        return out

    manifest = timed("prepare", prepare, cfg)
    assert all(manifest["splits"][s]["samples"] > 0 for s in ("train", "gate", "val", "test"))
    experts = timed("train-experts", train_experts, cfg)
    for summary in experts:
        history = json.loads(json.dumps(summary["final"]))
        assert math.isfinite(history["train_loss"]) and math.isfinite(history["val_loss"]), summary
        if task_name == "action":  # each of the two workers took several steps on its half
            assert history["steps"] >= 2, summary
    files = timed("cache", cache, cfg)
    assert set(files) == {"gate", "val", "test"}  # the experts' train split is never scored
    grid = dataclasses.replace(GRIDS["paper"], points=2, methods=METHODS, w_biases=(1.0,), cpus_per_trial=0.5)
    record = json.loads(timed("sweep", sweep, cfg, grid, "paper").read_text())
    summary = json.loads(timed("report", report, cfg).read_text())
    print(f"{task_name} paper profile, stage seconds: {seconds}")

    gate_steps = task.gate_steps()
    gate_rows = manifest["splits"]["gate"]["samples"]
    for trial in record["trials"]:
        config = trial["config"]
        assert config["steps"] == gate_steps and config["profile"] == "paper"
        if config["method"] in ("enforce", "lagrange"):
            assert config["batch_size"] == 128 and config["lr"] == 1e-4  # the paper grid's
    if gate_steps:  # the epochs a gate trains for are derived from the paper's steps and the data's size
        assert record["grid"]["epochs"] == math.ceil(gate_steps / max(gate_rows // min(128, gate_rows), 1))
    assert set(summary["methods"]) == set(METHODS)
    assert all(np.isfinite(info["rho"]) for info in summary["methods"].values())
    assert (cfg.layout.reports() / "report.md").exists()

    # every MLflow run of the stages carries the run's full settings, not only the -o overrides
    mlflow.set_tracking_uri(cfg.mlflow_uri)
    runs = mlflow.search_runs(experiment_names=[f"bmoe-{task_name}"], output_format="list")
    expert_runs = [r for r in runs if r.data.tags.get("bmoe.stage") == "train-experts"]
    sweep_runs = [r for r in runs if r.data.tags.get("bmoe.sweep_parent") or r.data.tags.get("trial_name")
                  and r.data.tags.get("bmoe.stage") != "sweep-point"]
    assert len(expert_runs) == len(task.expert_names()) and sweep_runs
    settings = {f"task.{k}": str(v) for k, v in dataclasses.asdict(task.settings).items()}
    for run in expert_runs + sweep_runs:
        assert {k: run.data.params.get(k) for k in settings} == settings, run.info.run_name
        assert run.data.params["profile"] == "paper"


def test_a_fit_the_cluster_cannot_hold_is_refused_in_one_line(tmp_path, ray_session):
    """Two Train workers of one CPU each on 2 CPUs leave none for Ray Data's reads: before, the
    fit waited for ever with no error; now it stops at once and says what to change."""
    from pipelines.prepare import prepare
    from pipelines.train_experts import train_experts

    cfg = _paper_config("superres", tmp_path / "runs", _div2k_tree(tmp_path / "data"), num_workers=2)
    prepare(cfg)
    started = time.perf_counter()
    with pytest.raises(UserError) as err:
        train_experts(cfg)
    message = str(err.value)
    assert "\n" not in message and "needs 3 CPU" in message and "--num-workers" in message, message
    assert time.perf_counter() - started < 60


def test_a_cluster_that_cannot_be_reached_is_one_line_naming_ray_address(tmp_path):
    """RAY_ADDRESS at a port where no Ray listens (as a cluster whose token this machine lacks):
    one line naming RAY_ADDRESS and what to check, exit code 1, no traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    out = subprocess.run([sys.executable, "-m", "cli.main", "prepare", "--task", "superres", "--profile", "smoke",
                          "--root", str(tmp_path / "runs")], cwd=PROJECT, env=env, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 1, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "RAY_ADDRESS=127.0.0.1:" in errors[0] and "token" in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
