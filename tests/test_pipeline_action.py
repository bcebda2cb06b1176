"""Every stage of the action pipeline on the smoke profile, through real Ray, real MLflow and
real codecs, on a small UCF-101 tree written here (with a corrupt, an all-intra and a missing
clip among the listed ones) and on the real sample's layout."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipelines.gate_inputs import GateInputs
from pipelines.manifest import shard_files
from pipelines.runtime import RunConfig, UserError
from tasks import get_task
from tasks.action import synthetic

pytestmark = pytest.mark.slow

CORRUPT = "SlideRight/v_SlideRight_g09_c02.avi"
INTRA = "Rise/v_Rise_g01_c02.avi"
MISSING = "Fall/v_Fall_g08_c05.avi"


def _intra_clip(path: Path, frames: int) -> None:
    import av

    video = synthetic.render_clip(synthetic.CLASSES[2], frames, 120, 160, np.random.default_rng(3))
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.height, stream.width, stream.pix_fmt = 120, 160, "yuv420p"
        stream.options = {"g": "1"}  # every frame intra-coded: no motion vectors at all
        for array in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """Synthetic UCF-101 (split 1 layout, CRLF lists) plus three listed clips that cannot be used."""
    task = get_task("action", "smoke")
    root = synthetic.write_ucf101_tree(tmp_path_factory.mktemp("ucf"), clips_per_group=1,
                                       frames=task.clip_frames(), groups=10)
    lists = root / "ucfTrainTestlist"
    (root / "UCF-101" / CORRUPT).write_bytes(b"RIFF\x00\x00\x00\x00AVI LIST truncated")
    _intra_clip(root / "UCF-101" / INTRA, task.clip_frames())
    with open(lists / "trainlist01.txt", "ab") as fh:
        fh.write(f"{CORRUPT} 1\r\n{MISSING} 4\r\n".encode())
    with open(lists / "testlist01.txt", "ab") as fh:
        fh.write(f"{INTRA}\r\n".encode())
    return root


@pytest.fixture(scope="module")
def run(tree, tmp_path_factory, ray_session):
    from pipelines.cache import cache
    from pipelines.prepare import prepare
    from pipelines.train_experts import train_experts

    # a third of a CPU per fit: the three experts train at once beside Ray Data's reads (2 CPUs)
    cfg = RunConfig(task_name="action", root=str(tmp_path_factory.mktemp("run")), profile="smoke", data_root=str(tree),
                    cpus_per_worker=0.3)
    manifest = prepare(cfg)
    experts = train_experts(cfg)
    files = cache(cfg)
    return cfg, manifest, experts, files


def test_prepare_counts_and_names_bad_clips(run, tree, capsys):
    from pipelines.prepare import prepare

    cfg, manifest, _, _ = run
    task = cfg.task()
    assert manifest["experts"] == ["temporal", "spatial", "fusion"]
    assert manifest["data_costs"] == [float(d) for d in task.data_costs()]
    on_disk = {split: len(task.list_sources(tree, split).sources) for split in ("train", "val", "test")}
    splits = manifest["splits"]
    # the gate split is whole groups of train's (a class's gXX clips share actors: never in both), held out
    groups = {split: set(pd.read_parquet(cfg.layout.shards(split, "gate"), columns=["group"])["group"])
              for split in ("train", "gate")}
    assert groups["train"] and groups["gate"] and not groups["train"] & groups["gate"]
    assert splits["train"]["samples"] + splits["gate"]["samples"] == on_disk["train"] - 1  # the corrupt clip
    assert splits["val"]["samples"] == on_disk["val"]
    assert splits["test"]["samples"] == on_disk["test"] - 1  # the all-intra clip
    train_problems = " | ".join(splits["train"]["problems"] + splits["gate"]["problems"])
    assert "v_SlideRight_g09_c02.avi" in train_problems and "cannot decode" in train_problems
    assert "1 listed train clips not on disk" in train_problems and MISSING in train_problems
    assert any("v_Rise_g01_c02.avi" in p and "no motion vectors" in p for p in splits["test"]["problems"])
    for split, info in splits.items():
        for part in ("p0", "p1", "p2", "gate"):
            assert info["shards"][part]["rows"] == info["samples"]
        enc = info["mean_encoded_bytes"]
        assert 0 < enc["p0"] < enc["p2"] and 0 < enc["p1"] < enc["p2"]
        assert enc["p2"] == pytest.approx(enc["p0"] + enc["p1"])
    again = prepare(cfg)
    assert again["created"] == manifest["created"]
    assert "nothing to do" in capsys.readouterr().out


def test_strict_prepare_and_a_partial_download_fail_in_one_line(tree, tmp_path, samples):
    from pipelines.prepare import prepare

    with pytest.raises(UserError, match="not on disk|cannot decode"):
        prepare(RunConfig(task_name="action", root=str(tmp_path / "strict"), profile="smoke", data_root=str(tree),
                          strict=True))
    real = samples / "ucf101"
    if (real / "UCF-101").is_dir():  # the real sample: a single train clip, no val or test clip on disk
        with pytest.raises(UserError, match=r"no usable val inputs .*not on disk"):
            prepare(RunConfig(task_name="action", root=str(tmp_path / "real"), profile="smoke", data_root=str(real),
                              task_options={"classes": 101}))


def test_experts_and_cache(run):
    cfg, manifest, experts, files = run
    assert [e["name"] for e in experts] == ["temporal", "spatial", "fusion"]
    mlflow.set_tracking_uri(cfg.mlflow_uri)
    for e in experts:
        assert cfg.layout.resolve(e["weights"]) == cfg.layout.weights(e["expert"]) and cfg.layout.weights(e["expert"]).exists()
        assert "train_loss" in mlflow.get_run(e["mlflow_run_id"]).data.metrics
    for split, path in files.items():
        table = pd.read_parquet(path)
        assert len(table) == manifest["splits"][split]["samples"]
        assert table["label"].between(0, len(synthetic.CLASSES) - 1).all()
        for n in range(3):
            assert np.isfinite(table[f"loss_{n}"]).all() and (table[f"loss_{n}"] >= 0).all()
            assert set(table[f"score_{n}"].unique()) <= {0.0, 1.0}
            correct = table[f"pred_{n}"] == table["label"]
            assert (correct == (table[f"score_{n}"] == 1.0)).all()
        assert len([c for c in table.columns if c.startswith("emb") and c.endswith("_0")]) > 0
        # rows in the order of the split's gate shards: what trials stream their inputs in
        gate = GateInputs(shard_files(cfg.layout, manifest, split, "gate"))
        assert table["sample_id"].tolist() == gate.sample_ids().astype(str).tolist()


def test_the_cache_scores_only_the_splits_something_reads(run):
    from pipelines.sweep import TRIAL_SPLITS

    cfg, manifest, _, files = run
    assert set(files) == set(TRIAL_SPLITS) and "train" not in files  # the experts' own split: the largest
    written = sorted(p.stem for p in cfg.layout.cache("gate").parent.glob("*.parquet"))
    assert written == sorted(TRIAL_SPLITS)
    assert manifest["splits"]["train"]["samples"] > 0


def test_sweep_and_report(run):
    from pipelines.report import report
    from pipelines.grid import GRIDS
    from pipelines.sweep import sweep
    from pipelines.grid import targets as sweep_targets

    cfg, _, _, _ = run
    grid = GRIDS["smoke"]  # every method: the served mixture is replayed for each servable one
    grid = dataclasses.replace(grid, cpus_per_trial=2)  # what --cpus-per-trial sets
    result = json.loads(sweep(cfg, grid, name="smoke-sweep").read_text())
    # every trial got what the flag asked for, from Ray, and ran where Ray put it (no GPU here)
    assert all(t["resources"] == {"cpu": 2.0, "gpu": 0.0} and t["device"] == "cpu" for t in result["trials"])
    # MLflow: one run per (method, d_t) with the same keys for every method, static ones included
    mlflow.set_tracking_uri(cfg.mlflow_uri)
    points = mlflow.search_runs(experiment_names=["bmoe-action"],
                                filter_string="tags.`bmoe.point` = 'smoke-sweep'")
    targets = {f"{t:.6g}" for t in sweep_targets(get_task("action", "smoke").data_costs(), grid.points)}
    common = ["params.method", "params.d_target", "metrics.val_performance", "metrics.test_performance",
              "metrics.d_mean", "metrics.C_g", "metrics.u_0", "metrics.u_1", "metrics.u_2"]
    assert not points[common].isna().any().any()
    pairs = points.groupby(["params.method", "params.d_target"]).size()
    assert set(pairs.index) == {(m, t) for m in grid.methods for t in targets} and (pairs == 1).all()
    at = points[points["params.d_target"] == sorted(targets, key=float)[1]]  # methods side by side at one target
    assert set(at["params.method"]) == set(grid.methods)
    assert {t["config"]["method"] for t in result["trials"]} == set(grid.methods)
    summary = json.loads(report(cfg).read_text())
    # bmoe compare --format csv: every method at every target, with the gap to the oracle
    from typer.testing import CliRunner

    from cli.main import app

    out = CliRunner().invoke(app, ["compare", "--task", "action", "--root", cfg.root, "--format", "csv"])
    assert out.exit_code == 0, out.output
    rows = [r for r in csv.DictReader(io.StringIO(out.output)) if r["sweep"] == "smoke-sweep"]
    assert {(r["method"], f"{float(r['d_target']):.6g}") for r in rows} == {(m, t) for m in grid.methods for t in targets}
    for r in rows:
        assert float(r["rho"]) == pytest.approx(summary["methods"][r["method"]]["rho"])
        if r["method"] in ("random", "oracle") and r["routing_efficiency"]:
            assert float(r["routing_efficiency"]) == (0.0 if r["method"] == "random" else 1.0)
    table = CliRunner().invoke(app, ["compare", "--task", "action", "--root", cfg.root]).output
    assert "routing efficiency" in table and "rho eff" in table and "sweep smoke-sweep" in table
    d = get_task("action", "smoke").data_costs()
    assert summary["task"] == "action" and summary["metric"].startswith("top-1 accuracy")
    assert summary["experts"] == ["temporal", "spatial", "fusion"] and summary["data_costs"] == list(d)
    assert 0 < summary["C_g"] < 1e8  # Table X's budget
    for info in summary["methods"].values():
        assert np.isfinite(info["rho"])
        assert all(0.0 <= p["performance"] <= 100.0 for p in info["points"])
    oracle = summary["methods"]["oracle"]["rho"]
    assert all(info["rho"] <= oracle + 1e-9 for info in summary["methods"].values())
    reports = cfg.layout.reports()
    text = (reports / "report.md").read_text()
    assert "Table I / V / VIII" in text and "Table II / VI / IX" in text and "assignment.png" in text
    assert (reports / "performance_vs_cost.png").stat().st_size > 10_000
    assert (reports / "assignment.png").stat().st_size > 10_000  # Fig. 9: embeddings by class and by expert


def test_the_served_mixture_delivers_its_report_row(run):
    """Each servable gate of the sweep (soft, enforce, lagrange), served over HTTP at d_max / 2 and
    sent the test split by `bmoe replay`: every clip scored, top-1 from the responses equal to what
    the root's cache gives for the same choices (the experts answer as cached), and within a point
    and 2 % of d̄ of the report's as-served row (issue 28's tolerances), which the sweep scored by
    streaming the split through a fresh router in the order replay sends it."""
    from pipelines.methods import SERVABLE
    from serving.replay import replay_each_gate
    from serving_http import free_port

    cfg = run[0]
    target = float(cfg.task().data_costs().max()) / 2
    rows = replay_each_gate(cfg.root, "action", SERVABLE, [target], port=free_port())
    assert set(rows) == set(SERVABLE)
    for method, (row,) in rows.items():
        print(f"replay {method}: served {row.served['performance']:.2f} cached {row.cached:.2f} report "
              f"{row.report['performance']:.2f} (batch {row.report['batch_performance']:.2f}); d {row.served['d_mean']:.0f} "
              f"report {row.report['d_mean']:.0f}")
        assert row.report is not None and row.report["as_served"] and row.units == run[1]["splits"]["test"]["samples"], row
        assert abs(row.served["performance"] - row.cached) <= 1e-9, (method, row.as_dict())
        assert abs(row.performance_diff) <= 1.0 and abs(row.d_mean_diff) <= 0.02, (method, row.as_dict())


def test_a_sweep_rerun_without_its_tune_state_logs_each_trial_once(run, capsys):
    """tune/ lost, the tracking store kept: the rerun starts over and the first start's runs are
    marked deleted, so the parent holds one run per trial and one point per target."""
    import shutil

    from pipelines.grid import GRIDS, with_methods
    from pipelines.sweep import sweep

    cfg, _, _, _ = run
    grid = with_methods(GRIDS["smoke"], "random")
    sweep(cfg, grid, name="rerun-sweep")
    shutil.rmtree(cfg.layout.tune_experiment("rerun-sweep"))
    cfg.layout.sweep_record("rerun-sweep").unlink()
    sweep(cfg, grid, name="rerun-sweep")
    assert "runs are marked deleted" in capsys.readouterr().out
    mlflow.set_tracking_uri(cfg.mlflow_uri)
    trials = mlflow.search_runs(experiment_names=["bmoe-action"], filter_string="tags.`bmoe.sweep` = 'rerun-sweep'")
    points = mlflow.search_runs(experiment_names=["bmoe-action"], filter_string="tags.`bmoe.point` = 'rerun-sweep'")
    assert len(trials) == 1 and len(points) == points["params.d_target"].nunique() > 1



def test_a_copied_root_keeps_every_stage_and_damage_is_named_and_made_again(run, tmp_path, capsys):
    """A copy of the finished root (cp -a) reruns every stage as kept. Then, on the copy: 64 bytes
    flipped in a shard, a truncated cache and truncated expert weights are each named in one line
    by `bmoe verify` and by the stage that would read them, and the stage that made each file makes
    it again, leaving a root that verifies clean."""
    import shutil

    from typer.testing import CliRunner

    from cli.main import app
    from pipelines.cache import cache
    from pipelines.prepare import prepare
    from pipelines.report import report
    from pipelines.grid import GRIDS
    from pipelines.sweep import sweep
    from pipelines.train_experts import train_experts
    from serving.loading import resolve_run

    cfg = dataclasses.replace(run[0], root=str(tmp_path / "copy"))
    shutil.copytree(run[0].root, cfg.root)  # contents and modification times
    capsys.readouterr()
    prepare(cfg), train_experts(cfg), cache(cfg), sweep(cfg, GRIDS["smoke"], name="smoke-sweep"), report(cfg)
    out = capsys.readouterr().out
    assert "nothing to do" in out and out.count("unchanged, kept") == 3 and "cache kept" in out, out
    assert "already complete" in out and "up to date" in out, out

    def verify() -> tuple[int, list[str]]:
        result = CliRunner().invoke(app, ["verify", "--task", "action", "--root", cfg.root])
        return result.exit_code, result.output.strip().splitlines()

    assert verify()[0] == 0
    layout = cfg.layout
    shard = layout.shards("test", "p0") / run[1]["splits"]["test"]["shards"]["p0"]["files"][0]["name"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2:len(data) // 2 + 64])
    shard.write_bytes(bytes(data))
    (layout.cache("val")).write_bytes(layout.cache("val").read_bytes()[:100])
    weights = layout.weights(0)
    weights.write_bytes(weights.read_bytes()[:1000])
    code, lines = verify()
    assert code == 1 and any(str(shard) in line and "SHA-256" in line for line in lines), lines
    assert any(str(layout.cache("val")) in line for line in lines) and any(str(weights) in line for line in lines)

    for stage, expected in ((["sweep"], "run `bmoe cache`"), (["cache"], "run `bmoe train-experts`")):
        result = CliRunner().invoke(app, [*stage, "--task", "action", "--root", cfg.root, "--profile", "smoke",
                                          "--data-root", str(run[0].data_root)])
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert expected in result.output, result.output
    with pytest.raises(UserError, match="run `bmoe train-experts` to train expert 0"):
        resolve_run(cfg.root, "action")

    capsys.readouterr()
    prepare(cfg)  # the damaged shard: the shards made again (the data is unchanged: the experts' inputs too)
    train_experts(cfg)  # the truncated weights: that expert trained again, the others kept
    cache(cfg)  # the truncated cache: scored again
    out = capsys.readouterr().out
    assert "damaged): making the shards again" in out and "training it again" in out and "scoring again" in out, out
    assert out.count("unchanged, kept") == 2, out
    code, lines = verify()
    assert code == 0 and lines[0].endswith(" 0 damaged"), lines
