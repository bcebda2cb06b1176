"""The pipeline on a real two-node cluster whose nodes share no disk, with the run root and a data
root in an S3 bucket and a real MLflow server, sent with `ray job submit` as a user would.

The head has no CPUs, so everything that needs one (Ray Data's read and write tasks, the Ray Train
workers, the cache's actors, the Tune trials) runs on the worker node, which sees neither the
head's nor this test's local folders (tests/cluster.py): whatever a stage wrote that a later
stage or machine needs must be in the bucket. This module runs every stage of superres on its
embedded data, and detection's prepare from a COCO tree in the bucket (the one stage that reads a
data root: the later stages read shards from the run root, as superres's do here; detection's
train-experts, cache, sweep and report run in tests/test_paper_profile.py), and takes over the
single-node tests of those stages, of `ray job submit`, of the MLflow server and of an
interrupted sweep.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest

from cluster import free_ports, mlflow_server, ray_cluster, s3_server, stop_processes, submit_job

pytestmark = pytest.mark.slow

BUCKET = "bmoe-cluster"
ROOT = f"s3://{BUCKET}/runs"
COCO = f"s3://{BUCKET}/datasets/coco"
JOB_TIMEOUT = 480
# Logical CPUs of the worker node (the machine has 2 cores): the smoke stages wait on process starts
# more than they compute, so three expert fits and four sweep trials at once finish sooner.
WORKER_CPUS = 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """S3, MLflow and a two-node Ray cluster, once for the module."""
    from storage import as_path, upload_tree
    from tasks.detection import synthetic

    base = tmp_path_factory.getbasetemp()
    with s3_server(BUCKET) as s3, mlflow_server(tmp_path_factory.mktemp("mlflow")) as tracking, \
            ray_cluster(workers=1, worker_cpus=WORKER_CPUS, hidden=[base], env=s3.env) as ray:
        coco = synthetic.write_coco_tree(tmp_path_factory.mktemp("coco"), {"train2017": 24, "val2017": 16}, seed=3)
        upload_tree(coco, as_path(COCO))  # real-format files, in the bucket only as far as the cluster knows
        yield {"s3": s3, "tracking": tracking, "ray": ray}


def job(cluster: dict, submission_id: str, *args: str) -> str:
    """`ray job submit -- bmoe <args>`; returns the job's logs after checking it succeeded."""
    env = {**cluster["s3"].env, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    started = time.perf_counter()
    code, logs = submit_job(cluster["ray"], ["bmoe", *args, "--root", ROOT, "--tracking-uri", cluster["tracking"]],
                            {"env_vars": env}, submission_id, JOB_TIMEOUT)
    print(f"job {submission_id}: {time.perf_counter() - started:.0f} s")
    assert code == 0, logs[-4000:]
    return logs


@pytest.fixture(scope="module")
def runs(cluster) -> dict[str, str]:
    """Superres's smoke pipeline and detection's prepare, one job each, submitted at once as two users
    of the cluster would (each waits on process starts more than it computes)."""
    from concurrent.futures import ThreadPoolExecutor

    head = [n for n in cluster["ray"].nodes() if n.get("is_head_node")]
    assert head and not head[0].get("resources_total", {}).get("CPU"), "the head must run no work"
    jobs = {
        "superres": ("superres-1", "demo", "--task", "superres", "--profile", "smoke"),
        "detection": ("detection-1", "prepare", "--task", "detection", "--profile", "smoke", "--data-root", COCO),
    }
    with ThreadPoolExecutor(len(jobs)) as pool:
        running = {task: pool.submit(job, cluster, *args) for task, args in jobs.items()}
        return {task: future.result() for task, future in running.items()}


def check_shards(layout, manifest: dict) -> None:
    """Every shard file the manifest names is in the bucket with its row count."""
    import pyarrow.parquet as pq

    for split, info in manifest["splits"].items():
        assert info["samples"] > 0 and info["unreadable"] == []
        for part, shard in info["shards"].items():
            assert shard["rows"] == info["samples"] and shard["files"]
            for f in shard["files"]:
                path = layout.shards(split, part) / f["name"]
                assert pq.read_metadata(path.key, filesystem=path.filesystem).num_rows == f["rows"] > 0


def test_detection_prepares_from_a_coco_tree_in_the_bucket(runs):
    """The worker, which sees no local folder, lists and reads COCO's JSON and JPEGs from the bucket:
    every split's shards in the bucket, COCO category ids kept, P_n's JPEG bytes growing with R."""
    from pipelines.layout import RunLayout
    from storage import read_json, read_table
    from tasks.detection import metrics, synthetic

    layout = RunLayout.of(ROOT, "detection")
    manifest = read_json(layout.manifest())
    assert manifest is not None, runs["detection"][-3000:]
    assert manifest["data_root"] == COCO and manifest["experts"] == ["ssd_tiny_36", "ssd_tiny_48", "ssd_tiny_64"]
    check_shards(layout, manifest)
    for split, info in manifest["splits"].items():
        enc = info["mean_encoded_bytes"]
        assert enc["p0"] < enc["p1"] < enc["p2"]
        gate = read_table(layout.shards(split, "gate"), ["gt"]).column("gt").to_pylist()
        ids = {int(c) for blob in gate for c in metrics.unpack_gt(blob)[:, 4]}
        assert ids and ids <= set(synthetic.CATEGORY_IDS), ids


def test_the_bucket_holds_the_complete_run(runs, cluster):
    from pipelines.layout import RunLayout
    from storage import load_torch, read_json, read_table

    task = "superres"
    layout = RunLayout.of(ROOT, task)
    manifest = read_json(layout.manifest())
    assert manifest is not None, runs[task][-3000:]
    assert layout.raw().is_dir()  # the embedded data was uploaded, for the worker to read
    check_shards(layout, manifest)
    for split, info in manifest["splits"].items():
        if split != "train":  # nothing reads the experts' scores on their own training inputs
            assert read_table(layout.cache(split), ["sample_id"]).num_rows == info["samples"]
        else:
            assert not layout.cache(split).exists()
    for n in range(len(manifest["experts"])):
        assert layout.weights(n).is_file() and read_json(layout.expert_meta(n))["fingerprint"]
    assert any(p.name.startswith(f"{task}-expert-0-") for p in (layout.root / "ray-train").iterdir())

    latest = read_json(layout.latest_sweep())
    sweep = read_json(layout.resolve(latest["file"]))
    assert (layout.root / "tune" / task / sweep["name"]).is_dir()  # Tune's experiment state, for restore
    gates = [t["gate_file"] for t in sweep["trials"] if t.get("gate_file")]
    assignments = [t["assignment_file"] for t in sweep["trials"] if t.get("assignment_file")]
    assert gates and assignments and not any(g.startswith(("/", "s3:")) for g in gates + assignments)
    assert all(layout.resolve(g).is_file() for g in gates + assignments)  # written by the trials on the worker
    summary = read_json(layout.reports() / "summary.json")
    assert summary["sweep"] == sweep["name"] and all(np.isfinite(m["rho"]) for m in summary["methods"].values())
    assert (layout.reports() / "report.md").is_file() and (layout.reports() / "performance_vs_cost.png").is_file()

    check_superres(manifest, layout, summary)

    client = mlflow.MlflowClient(cluster["tracking"])
    parent = client.get_run(sweep["mlflow_parent_run"])
    assert parent.info.status == "FINISHED" and {f"rho_{m}" for m in summary["methods"]} <= set(parent.data.metrics)
    assert "report" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    experiment = client.get_experiment_by_name(f"bmoe-{task}")
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == len(sweep["trials"]) and all(r.info.status == "FINISHED" for r in children)
    trained = [r for r in children if r.data.params.get("trial/method") in ("soft", "enforce", "lagrange")]
    gated = [r for r in trained if r.data.metrics.get("C_g")]  # at d_min and d_max (b one-hot) no gate is trained
    assert gated and all(client.list_artifacts(r.info.run_id, "gate") for r in gated)
    # logged by the trial's worker on the worker node, straight to the server (not via the Tune driver)
    assert all(r.data.metrics.get("gate_logged") == 1.0 for r in gated)
    per_target = [r for r in trained if r.data.params["trial/method"] != "lagrange"]
    assert per_target and all({"d_mean", "C_g", "test_performance"} <= set(r.data.metrics) for r in per_target)
    # one run per (method, d_t) on the server, every method with the same keys (static ones nested under their trial)
    points = client.search_runs([experiment.experiment_id], filter_string=f"tags.`bmoe.point` = '{sweep['name']}'")
    pairs = [(r.data.params["method"], r.data.params["d_target"]) for r in points]
    methods = {t["config"]["method"] for t in sweep["trials"]}
    assert len(pairs) == len(set(pairs)) and {m for m, _ in pairs} == methods
    assert len(pairs) == len(methods) * len({t for _, t in pairs})  # every method at every target
    for r in points:
        assert {"val_performance", "test_performance", "d_mean", "C_g", "u_0"} <= set(r.data.metrics), r.data
    # the registry: every expert, and the best gate per method and target, as plain weights on the server
    from pipelines.registry import load_weights

    for n in range(3):
        registered = read_json(layout.expert_meta(n))["registered"]
        assert registered.startswith(f"models:/bmoe-{task}-expert-{n}/")
        assert set(load_weights(registered, cluster["tracking"], "an expert")) == set(load_torch(layout.weights(n)))
    targets = {p["d_target"] for p in summary["methods"]["enforce"]["points"]  # where a gate was trained
               if summary["d_min"] < p["d_target"] < summary["d_max"]}
    assert {f"best-d{round(t)}" for t in targets} | {f"best-enforce-d{round(t)}" for t in targets} \
        <= set(summary["registered"])
    version = client.get_model_version_by_alias(f"bmoe-{task}-gate", f"best-enforce-d{round(min(targets))}")
    assert version.tags["method"] == "enforce" and float(version.tags["d_target"]) == min(targets)


def check_superres(manifest: dict, layout, summary: dict) -> None:
    from storage import read_table

    assert manifest["experts"] == ["espcn_x4", "espcn_x3", "espcn_x2"]
    for split, info in manifest["splits"].items():
        enc = info["mean_encoded_bytes"]
        assert enc["p0"] < enc["p1"] < enc["p2"]  # PNG bytes of the LR patch grow as the data costs do
        if split == "train":
            continue
        table = read_table(layout.cache(split)).to_pandas()
        for n in range(3):
            assert np.isfinite(table[f"loss_{n}"]).all() and (table[f"loss_{n}"] >= 0).all()
            assert (table[f"score_{n}"] <= 0).all()  # score = -MSE
    assert summary["d_min"] == 3072.0 and summary["d_max"] == 12288.0 and summary["C_g"] > 0
    # budgets: quota methods spend the target up to one input's rounding, the oracle at most one
    # input's cost step over it (the smoke test set is too small to rank methods)
    step = (summary["d_max"] - summary["d_min"]) / manifest["splits"]["test"]["samples"]
    for method in ("random", "heuristic", "enforce"):
        assert all(abs(p["d_mean"] - p["d_target"]) <= step + 1e-6 for p in summary["methods"][method]["points"])
    assert all(p["d_mean"] <= p["d_target"] + step + 1e-6 for p in summary["methods"]["oracle"]["points"])
    assert (layout.reports() / "assignment.png").is_file()  # Fig. 7, from a trial's assignment in the bucket


def test_a_second_identical_job_does_no_repeated_work(runs, cluster):
    logs = job(cluster, "superres-2", "demo", "--task", "superres", "--profile", "smoke")
    for said in ("nothing to do", "unchanged, kept", "cache kept", "already complete", "up to date"):
        assert said in logs, said
    assert "Training started" not in logs and "sweep: resuming" not in logs


def test_compare_reads_the_tracking_server(runs, cluster):
    from pipelines.compare import (compare, format_registered, format_side_by_side, format_table, registered,
                                   side_by_side)
    from pipelines.runtime import RunConfig

    cfg = RunConfig(task_name="superres", root=ROOT, tracking_uri=cluster["tracking"])
    rows = compare(cfg)
    assert {r.method for r in rows} >= {"random", "enforce", "oracle"} and all(r.rho is not None for r in rows)
    assert "sweep sweep-" in format_table(rows)
    points = side_by_side(cfg)  # every method at every target, side by side, from the server's point runs
    by_sweep = {}
    for p in points:
        by_sweep.setdefault(p.sweep, []).append(p)
    for sweep_points in by_sweep.values():
        methods, targets = {p.method for p in sweep_points}, {p.d_target for p in sweep_points}
        assert len(sweep_points) == len(methods) * len(targets) and "random" in methods
        assert all(p.routing_efficiency in (None, 1.0) for p in sweep_points if p.method == "oracle")
    assert any(p.method == "oracle" and p.routing_efficiency == 1.0 for p in points)
    assert "rho eff" in format_side_by_side(points)
    versions = registered(cfg)  # the registry: experts once each (trained once), gates with their aliases
    assert [v.version for v in versions if v.model == "bmoe-superres-expert-0"] == [1]
    gates = [v for v in versions if v.model == "bmoe-superres-gate"]
    assert gates and all(v.method in ("soft", "enforce", "lagrange") for v in gates)
    assert any(a.startswith("best-d") for v in gates for a in v.aliases)
    assert "bmoe-superres-gate" in format_registered(versions)


def test_a_sweep_stopped_on_the_cluster_resumes_on_another_machine(runs, cluster):
    """A random search with ASHA: `ray job stop` once two trials finished, then the same command on
    this machine with its own local Ray, sharing only the bucket and the tracking server: Tune
    restores the experiment and its searcher from the bucket and finishes it; ASHA stopped some
    enforce trials after their first epoch; no trial is logged twice."""
    import tempfile

    from ray.job_submission import JobStatus, JobSubmissionClient

    from cluster import EXCLUDES, PROJECT
    from storage import as_path, read_json

    name = "moved-sweep"
    command = ["bmoe", "sweep", "--task", "superres", "--profile", "smoke", "--root", ROOT,
               "--tracking-uri", cluster["tracking"], "--name", name, "--methods", "random,enforce",
               "--search", "random", "--num-samples", "3", "--scheduler", "asha"]
    env = {**cluster["s3"].env, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    jobs = JobSubmissionClient(cluster["ray"].dashboard)
    job_id = jobs.submit_job(entrypoint=" ".join(command), submission_id="sweep-stopped",
                             runtime_env={"working_dir": str(PROJECT), "excludes": EXCLUDES, "env_vars": env})
    client = mlflow.MlflowClient(cluster["tracking"])
    experiment = client.get_experiment_by_name("bmoe-superres").experiment_id
    finished = f"tags.`bmoe.sweep` = '{name}' and attributes.status = 'FINISHED'"
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline and len(client.search_runs([experiment], finished)) < 2:
        assert jobs.get_job_status(job_id) in (JobStatus.PENDING, JobStatus.RUNNING), jobs.get_job_logs(job_id)[-3000:]
        time.sleep(1)
    jobs.stop_job(job_id)
    while time.monotonic() < deadline and not jobs.get_job_status(job_id).is_terminal():
        time.sleep(1)
    assert jobs.get_job_status(job_id) == JobStatus.STOPPED

    temp = tempfile.mkdtemp(prefix="bmoe-m2-", dir="/tmp")  # the other machine's Ray; short socket paths
    local = {**os.environ, **env, "RAY_TMPDIR": temp, "RAY_AUTH_MODE": "disabled"}
    local.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run([str(Path(sys.executable).parent / command[0]), *command[1:]], env=local,
                              capture_output=True, text=True, timeout=JOB_TIMEOUT)
    finally:
        stop_processes(temp)
        shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert f"sweep: resuming {name} from {ROOT}/tune/superres/{name}" in done.stdout
    names = [r.data.tags["trial_name"] for r in client.search_runs([experiment], finished)]
    record = read_json(as_path(f"{ROOT}/sweeps/superres/{name}.json"))
    assert len(names) == len(set(names)) == len(record["trials"]), "a finished trial was logged twice"
    targets = {t["config"]["d_target"] for t in record["trials"] if t["config"]["method"] == "enforce"}
    assert len(record["trials"]) == 1 + 3 * len(targets)  # random once; three samples per enforce target
    stopped = [t for t in record["trials"] if t.get("stopped_early")]
    assert stopped and all(t["config"]["method"] == "enforce" and t["epochs"] == 1 for t in stopped)
    tagged = client.search_runs([experiment], f"tags.`bmoe.sweep` = '{name}' and tags.`bmoe.stopped_early` = 'true'")
    assert len(tagged) == len(stopped)
    assert len({t["config"]["lr"] for t in record["trials"] if t["config"]["method"] == "enforce"}) > len(targets)


def test_serve_answers_from_the_buckets_run(runs, cluster):
    """`bmoe serve --root s3://...` on this machine (its own local Ray) serves the bucket's run, its
    gate and experts loaded from the registry on the tracking server by alias and version."""
    import tempfile

    from serving_http import png

    port, temp = free_ports(1)[0], tempfile.mkdtemp(prefix="bmoe-sv-", dir="/tmp")  # short socket paths
    env = {**os.environ, **cluster["s3"].env, "RAY_TMPDIR": temp, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    from storage import as_path, read_json

    summary = read_json(as_path(f"{ROOT}/reports/superres/summary.json"))
    alias = max(a for a in summary["registered"] if a.startswith("best-d"))  # its target becomes the budget
    experts = [arg for n in range(3) for arg in ("--expert-uri", f"models:/bmoe-superres-expert-{n}/latest")]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "bmoe"), "serve", "--task", "superres", "--root", ROOT,
                             "--gate", summary["registered"][alias], *experts, "--tracking-uri", cluster["tracking"],
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline, answer = time.monotonic() + 180, None
        while time.monotonic() < deadline and proc.poll() is None and answer is None:
            try:
                request = urllib.request.Request(  # at d_max: its own stream, the default one stays fresh for replay
                    f"http://127.0.0.1:{port}/superres/predict?target_cost={max(summary['data_costs']):g}",
                    data=png(128, 128), method="POST")
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = (response.status, json.loads(response.read()))
            except OSError:
                time.sleep(1)
        assert answer is not None, proc.stdout.read() if proc.poll() is not None else "no answer within 180 s"
        status, body = answer
        assert status == 200 and body["data_cost_bytes"] > 0 and len(body["experts"]) == 4  # 2x2 patches
        # `bmoe replay` from here, over HTTP only: the bucket's test split, the registered gate's report row
        from serving.replay import replay

        row, = replay(ROOT, "superres", f"http://127.0.0.1:{port}", [None], tracking_uri=cluster["tracking"])
        assert row.report is not None and row.target == float(alias.removeprefix("best-d")), row.as_dict()
        assert row.units == read_json(as_path(f"{ROOT}/data/superres/manifest.json"))["splits"]["test"]["samples"]
        assert abs(row.served["performance"] - row.cached) < 0.05, row.as_dict()  # the experts answer as cached
        assert row.report["as_served"] and abs(row.performance_diff) <= 0.05 and abs(row.d_mean_diff) <= 0.02, \
            row.as_dict()  # issue 28's tolerances, against the report's row as served
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        stop_processes(temp)
        shutil.rmtree(temp, ignore_errors=True)
