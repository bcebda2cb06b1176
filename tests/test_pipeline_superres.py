"""Superres on a local root through real Ray: prepare's shards, an expert fit that survives its
worker's death, a corrupt image. Every stage of the superres pipeline, from the embedded data to
the report, an interrupted sweep resumed on another machine and serving, runs in
tests/test_cluster.py on a two-node cluster with the run root in an S3 bucket."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.runtime import RunConfig, UserError

PROJECT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_session):
    """The smoke data prepared once for the module, on a local root given as a file:// URI."""
    from pipelines.prepare import prepare

    cfg = RunConfig(task_name="superres", root=(tmp_path_factory.mktemp("store") / "runs").as_uri(), profile="smoke")
    return cfg, prepare(cfg)


def test_prepare_writes_shards_per_expert_and_is_idempotent(run, capsys):
    from pipelines.prepare import prepare

    cfg, manifest = run
    assert manifest["experts"] == ["espcn_x4", "espcn_x3", "espcn_x2"]
    assert manifest["data_costs"] == [3072.0, pytest.approx(64 * 64 / 9 * 12), 12288.0]
    for split in ("train", "val", "test"):
        info = manifest["splits"][split]
        assert info["samples"] > 0 and info["problems"] == []
        for part in ("p0", "p1", "p2", "gate"):
            assert info["shards"][part]["rows"] == info["samples"]
            files = info["shards"][part]["files"]
            assert all((cfg.layout.shards(split, part) / f["name"]).exists() for f in files)
            assert sum(f["rows"] for f in files) == info["samples"] and all(len(f["sha256"]) == 64 for f in files)
        # each target once: the HR patch is the gate input, in no P_n set (a quarter of the bytes)
        assert manifest["targets"]["hr"] == "gate"
        for n in range(3):
            first = cfg.layout.shards(split, f"p{n}") / info["shards"][f"p{n}"]["files"][0]["name"]
            assert set(pq.read_schema(first).names) == {"sample_id", "group", "x", "encoded_bytes", "data_cost_bytes"}
        # PNG bytes of the LR patch grow with resolution, as the data costs do
        enc = info["mean_encoded_bytes"]
        assert enc["p0"] < enc["p1"] < enc["p2"]
    again = prepare(cfg)
    assert again["created"] == manifest["created"]
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("args, asked", [
    (["train-experts", "-o", "scales=2,3,4"], "this run asks for -o scales=2,3,4"),
    (["train-experts", "--seed", "1"], "this run asks for --seed 1"),
    (["cache", "--profile", "demo"], "this run asks for --profile demo"),
    (["prepare", "-o", "scales=4,3"], "this run asks for -o scales=4,3"),
    (["sweep", "--seed", "1"], "this run asks for --seed 1"),
])
def test_a_stage_with_other_settings_is_refused_in_one_line(run, args, asked):
    """A root records the profile, settings and seed it was prepared with; a stage asked for
    others says so in one line, naming both and the ways out, and leaves the root as it was."""
    from typer.testing import CliRunner

    from cli.main import app

    cfg, manifest = run
    local = Path(cfg.root.removeprefix("file://"))
    before = sorted(str(p) for p in local.rglob("*"))
    command, *rest = args
    if "--profile" not in rest:
        rest += ["--profile", "smoke"]
    out = CliRunner().invoke(app, [command, "--task", "superres", "--root", cfg.root, *rest])
    assert out.exit_code == 1, out.output
    message = out.output.strip()
    assert len(message.splitlines()) == 1 and asked in message, message
    assert "made with" in message and "another --root" in message, message
    assert sorted(str(p) for p in local.rglob("*")) == before
    assert json.loads((local / "data" / "superres" / "manifest.json").read_text())["created"] == manifest["created"]


def test_a_copied_root_is_recognised_not_prepared_again(run, tmp_path, capsys):
    """The fingerprint holds the sources' paths under the data root, not the run root's own path:
    a copy of a root (its embedded data inside it) prepares nothing."""
    import shutil

    from pipelines.prepare import prepare

    cfg, manifest = run
    copy = tmp_path / "copied"
    shutil.copytree(cfg.root.removeprefix("file://"), copy)  # copy2: contents and modification times, as cp -a
    capsys.readouterr()
    again = prepare(dataclasses.replace(cfg, root=str(copy)))
    assert "nothing to do" in capsys.readouterr().out
    assert again["created"] == manifest["created"] and again["data_root"] == "raw/superres"


def test_an_expert_fit_whose_worker_dies_resumes_from_its_last_checkpoint(run):
    """The Ray Train worker is killed (as on a preempted node) once a checkpoint is registered:
    Ray Train restarts the worker group and the fit continues from that checkpoint (model,
    optimizer, epoch), not from epoch 1."""
    import dataclasses
    import threading

    from pipelines.train_experts import _fingerprint, _fit_task

    cfg, manifest = run
    longer = dataclasses.replace(cfg, task_options={"epochs": "10"})
    fingerprint = _fingerprint(manifest, longer.task(), 0, longer)
    storage = longer.layout.root / "ray-train" / f"superres-expert-0-{fingerprint[:8]}"
    killed: list[int] = []

    def kill_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            # a checkpoint the controller registered (it collects reports every 2 s; one still in
            # the killed worker's queue is lost with it, as on a real node)
            snapshot = storage / "checkpoint_manager_snapshot.json"
            if snapshot.exists() and json.loads(snapshot.read_text() or "{}").get("latest_checkpoint_result"):
                for pid in train_workers():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.1)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    _, history = _fit_task(longer, 0, fingerprint)
    killer.join(timeout=5)
    assert killed, "the fit ended before its worker could be killed"
    assert [row["epoch"] for row in history] == list(range(1, 11))
    resumed = [row["resumed_after"] for row in history if "resumed_after" in row]
    assert len(resumed) == 1 and 1 <= resumed[0] < 10  # continued from a checkpoint, once


def test_two_fits_with_one_seed_give_the_same_expert(run):
    """The seed fixes the initialisation, the block order and every epoch's local shuffle, and
    the blocks stream in that order: refitting an expert reproduces it weight for weight."""
    import dataclasses

    import ray
    import torch

    from pipelines.train_experts import _fit

    cfg, _ = run
    # the three fits at once, as train-experts runs them (each waits on process starts more than it computes)
    longer = dataclasses.replace(cfg, task_options={"epochs": "2"}, cpus_per_worker=0.3)  # a CPU left for reads
    fits = [_fit.remote(longer, 1, "aaaaaaaa-seed"), _fit.remote(longer, 1, "bbbbbbbb-seed"),
            _fit.remote(dataclasses.replace(longer, seed=1), 1, "cccccccc-seed")]
    (first, history), (second, again), (other, _) = ray.get(fits, timeout=600)
    assert [row["train_loss"] for row in history] == [row["train_loss"] for row in again]
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)  # the seed does reach the fit


def train_workers() -> list[int]:
    """PIDs of this session's Ray Train worker processes (Ray titles them ray::RayTrainWorker)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_corrupt_image_is_named_counted_and_strict_fails(tmp_path, ray_session):
    from pipelines.prepare import prepare

    data = tmp_path / "images"
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        (data / split).mkdir(parents=True)
        for i in range(4 if split == "train" else 2):  # train: the gate split takes half of its images
            Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(data / split / f"{split}{i}.png")
    (data / "train" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    cfg = RunConfig(task_name="superres", root=str(tmp_path / "run"), profile="smoke", data_root=str(data))
    manifest = prepare(cfg)
    problems = [p for s in manifest["splits"].values() for p in s["problems"]]
    assert len(problems) == 1 and "broken.png" in problems[0]
    with pytest.raises(UserError, match="broken.png"):
        prepare(RunConfig(task_name="superres", root=str(tmp_path / "strict"), profile="smoke", data_root=str(data),
                          strict=True))
    # unchanged inputs, shards kept: --strict still fails on the problem the kept shards were made with
    with pytest.raises(UserError, match=r"broken.png.*recorded by the prepare of"):
        prepare(RunConfig(task_name="superres", root=str(tmp_path / "run"), profile="smoke", data_root=str(data),
                          strict=True))
    assert prepare(cfg)["created"] == manifest["created"]  # and without --strict nothing is redone
    # a re-prepare that fails half-way leaves the previous run as it was; the next one cleans up
    Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(data / "train" / "new.png")
    listed = lambda m: {(s, p, f["name"]) for s, i in m["splits"].items()  # noqa: E731
                        for p, shard in i["shards"].items() for f in shard["files"]}
    with pytest.raises(UserError, match="broken.png"):
        prepare(RunConfig(task_name="superres", root=str(tmp_path / "run"), profile="smoke", data_root=str(data),
                          strict=True))
    kept = json.loads(cfg.layout.manifest().read_text())
    assert kept["created"] == manifest["created"]
    assert all((cfg.layout.shards(s, p) / name).is_file() for s, p, name in listed(kept))
    again = prepare(cfg)
    on_disk = {(f.parent.parent.name, f.parent.name, f.name) for f in cfg.layout.data().glob("*/*/*")}
    assert again["fingerprint"] != manifest["fingerprint"] and on_disk == listed(again)  # nothing stale left
