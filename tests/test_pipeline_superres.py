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
    """A smoke run taken through prepare, train-experts and cache once for the module. Its root
    is an object-store URI (file://, the same pyarrow path as s3://): the stages work in the
    working copy under $BMOE_WORKDIR, and the CLI and job tests below sync it to the store."""
    from pipelines.cache import cache
    from pipelines.prepare import prepare
    from pipelines.train_experts import train_experts

    before = os.environ.get("BMOE_WORKDIR")
    os.environ["BMOE_WORKDIR"] = str(tmp_path_factory.mktemp("workdir"))  # CLI subprocesses inherit it
    cfg = RunConfig(task="superres", root=(tmp_path_factory.mktemp("bucket") / "runs").as_uri(), profile="smoke")
    manifest = prepare(cfg)
    experts = train_experts(cfg)
    files = cache(cfg)
    yield cfg, manifest, experts, files
    if before is None:
        os.environ.pop("BMOE_WORKDIR", None)
    else:
        os.environ["BMOE_WORKDIR"] = before


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
            assert all((cfg.task_dir("data") / split / part / f["name"]).exists() for f in info["shards"][part]["files"])
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
        assert Path(e["weights"]).exists()
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
    m_test = json.loads((cfg.task_dir("data") / "manifest.json").read_text())["splits"]["test"]["samples"]
    step = (summary["d_max"] - summary["d_min"]) / m_test
    for method in ("random", "heuristic", "enforce"):
        for p in summary["methods"][method]["points"]:
            assert abs(p["d_mean"] - p["d_target"]) <= step + 1e-6, (method, p)
    for p in summary["methods"]["oracle"]["points"]:
        assert p["d_mean"] <= p["d_target"] + step + 1e-6
    reports = cfg.task_dir("reports")
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


def test_sweep_logs_to_a_real_mlflow_server(run, tmp_path):
    """The same sweep against infra/mlflow/serve.sh's server on 127.0.0.1 over http (stopped by
    its PID); the runs are read back with MlflowClient and compared with `bmoe compare`."""
    import dataclasses
    import http.client
    import socket
    import urllib.request

    from pipelines.compare import compare, format_table
    from pipelines.sweep import GRIDS, sweep, with_methods

    cfg, _, _, _ = run
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "BMOE_MLFLOW_DATA": str(tmp_path / "server"), "BMOE_MLFLOW_PORT": str(port),
           "BMOE_MLFLOW_WORKERS": "1", "MLFLOW": str(Path(sys.executable).parent / "mlflow")}
    server = subprocess.Popen(["bash", str(PROJECT / "infra" / "mlflow" / "serve.sh")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (OSError, http.client.HTTPException):  # not up yet (or not yet the server on that port)
                assert server.poll() is None, "infra/mlflow/serve.sh exited"
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not become healthy within 90 s")
        grid = with_methods(GRIDS["smoke"], "random,enforce")
        remote = dataclasses.replace(cfg, tracking_uri=uri)
        result = json.loads(sweep(remote, grid, name="over-http").read_text())
        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name("bmoe-superres")
        children = client.search_runs([experiment.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{result['mlflow_parent_run']}'")
        assert len(children) == len(result["trials"]) > 0
        assert all(r.info.status == "FINISHED" for r in children)
        assert any("test_performance" in r.data.metrics for r in children)
        assert (tmp_path / "server" / "mlflow.db").exists()  # the script's sqlite backend, not the run root's

        rows = compare(remote)
        enforce = [r for r in rows if r.method == "enforce"]
        targets = sorted({t["config"]["d_target"] for t in result["trials"] if t["config"]["method"] == "enforce"})
        assert [r.d_target for r in enforce] == targets  # one best trial per target
        for row in enforce:  # the best on validation among that target's trials
            trials = [t for t in result["trials"]
                      if t["config"]["method"] == "enforce" and t["config"]["d_target"] == row.d_target]
            assert row.val_performance == pytest.approx(max(t["val_performance"] for t in trials))
            assert row.d_mean == pytest.approx(next(t["points"][0]["d_mean"] for t in trials
                                                    if t["val_performance"] == max(x["val_performance"] for x in trials)))
        assert {r.method for r in rows} == {"random", "enforce"} and all(r.rho is None for r in rows)  # no report yet
        assert "sweep over-http:" in format_table(rows)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a slow graceful shutdown on a busy machine
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def test_ray_job_submit_to_a_real_head(run, tmp_path):
    """`ray start --head` on 127.0.0.1, then `bmoe demo` sent with `ray job submit --working-dir .`
    as on a cluster. The job reuses the module's prepared data, experts and cache (the stages
    are idempotent), so it sweeps and reports for real; the head is stopped by its PIDs."""
    import tempfile

    from ray.job_submission import JobStatus, JobSubmissionClient

    cfg, _, _, _ = run
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    temp = tempfile.mkdtemp(prefix="bmoe-head-", dir="/tmp")  # Ray's socket paths must stay short
    ports = free_ports(7)
    start = subprocess.run(
        [str(bin_dir / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={ports[0]}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports[1]}",
         f"--dashboard-agent-listen-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
         f"--ray-client-server-port={ports[4]}", f"--metrics-export-port={ports[5]}",
         f"--runtime-env-agent-port={ports[6]}", "--num-cpus=4", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        address = f"http://127.0.0.1:{ports[1]}"
        runtime_env = {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
                                    "BMOE_WORKDIR": os.environ["BMOE_WORKDIR"]},
                       "excludes": [".venv", "bmoe-runs", ".git"]}
        submitted = time.time()
        job = subprocess.run(
            [str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
             "--submission-id", "bmoe-smoke-demo", "--runtime-env-json", json.dumps(runtime_env), "--",
             "bmoe", "demo", "--task", "superres", "--profile", "smoke", "--root", cfg.root],
            cwd=PROJECT, env=env, capture_output=True, text=True, timeout=500)
        logs = job.stdout + job.stderr
        assert job.returncode == 0, logs[-3000:]
        assert JobSubmissionClient(address).get_job_status("bmoe-smoke-demo") == JobStatus.SUCCEEDED
        # it ran on the module's root: the finished stages were kept, the sweep and report are new
        assert "nothing to do" in logs and "cache kept" in logs
        summary = json.loads((cfg.task_dir("reports") / "summary.json").read_text())
        assert summary["sweep"].startswith("sweep-") and summary["profile"] == "smoke"
        assert (cfg.task_dir("reports") / "summary.json").stat().st_mtime > submitted
        mlflow.set_tracking_uri(cfg.mlflow_uri)
        parent = mlflow.search_runs(experiment_names=["bmoe-superres"], output_format="list",
                                    filter_string=f"tags.`bmoe.sweep_parent` = '{summary['sweep']}'")
        assert len(parent) == 1 and parent[0].info.status == "FINISHED"
        assert {f"rho_{m}" for m in summary["methods"]} <= set(parent[0].data.metrics)
        # the object store now holds the run: shards, checkpoints, cache, Tune state, reports, MLflow
        store = Path(cfg.root.removeprefix("file://"))
        for stored in ("data/superres/manifest.json", "experts/superres/0/model.pt", "cache/superres/test.parquet",
                       f"tune/superres/{summary['sweep']}", f"sweeps/superres/{summary['sweep']}.json",
                       "reports/superres/summary.json", "reports/superres/report.md", "mlflow.db"):
            assert (store / stored).exists(), stored
        assert not (store / "raw").exists()  # the embedded data is regenerated, not stored
    finally:
        stop_processes(temp)
        subprocess.run(["rm", "-rf", temp], check=False)


def free_ports(count: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def stop_processes(marker: str, grace: float = 15.0) -> None:
    """SIGTERM every process whose command line names `marker` (a Ray head's temp dir) and its
    descendants, SIGKILL what is left after `grace` s: `ray stop` would stop every Ray on the machine."""
    def find() -> set[int]:
        parents, found = {}, set()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if marker in cmdline:
                found.add(int(proc.name))
        while grown := {pid for pid, ppid in parents.items() if ppid in found} - found:
            found |= grown
        return found

    def signal_all(pids: set[int], sig: int) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    signal_all(find(), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (left := find()) and time.monotonic() < deadline:
        time.sleep(0.5)
    signal_all(left, signal.SIGKILL)
