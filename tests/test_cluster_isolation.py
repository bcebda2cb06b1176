"""tests/cluster.py is what it claims: a worker node sees none of the head's or the test's files
but reaches the S3 bucket, and `ray job submit` runs work on it. (tests/test_cluster.py runs the
product on it with the MLflow server.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import ray_cluster, s3_server, submit_job

pytestmark = pytest.mark.slow

# A driver on the head's machine; its 1-CPU task can only run on a worker (the head has 0 CPUs).
PROBE = """
import json, os, sys
import pyarrow.fs
import ray

@ray.remote(num_cpus=1)
def probe(secret, head_temp, uri):
    mounts = [line.split() for line in open("/proc/self/mountinfo")]
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    node = ray.get_runtime_context().get_node_id()
    with fs.open_output_stream(path) as out:
        out.write(node.encode())
    with fs.open_input_stream(path) as back:
        read_back = back.read().decode()
    return {"node": node, "sees_secret": os.path.exists(secret), "sees_head_temp": os.path.exists(head_temp),
            "tmpfs": sorted(m[4] for m in mounts if m[m.index("-") + 1] == "tmpfs"), "read_back": read_back}

ray.init(log_to_driver=False)
result = ray.get(probe.remote(*sys.argv[1:]))
print(json.dumps({"driver_node": ray.get_runtime_context().get_node_id(), **result}))
"""

# The job's entrypoint: one task on a worker that says where it runs.
JOB = """
import json, os
import ray

@ray.remote(num_cpus=1)
def work():
    node = ray.get_runtime_context().get_node_id()
    return {"node": node, "cwd": os.getcwd(), "has_project": os.path.isdir("pipelines")}

ray.init()
print("bmoe-job:", json.dumps(ray.get(work.remote())))
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """One S3 server and one head + 1 worker for the module (`ray start` costs ~10 s a node)."""
    with (s3_server("bmoe-isolation") as s3,
          ray_cluster(workers=1, worker_cpus=1, hidden=[tmp_path_factory.getbasetemp()], env=s3.env) as cluster):
        head = [n["node_id"] for n in cluster.nodes() if n["is_head_node"]]
        yield s3, cluster, head[0]


def test_a_worker_sees_only_its_own_disk_and_the_bucket(stack, tmp_path):
    """A task on the worker cannot read the test's tmp_path or the head's temp dir (its /tmp, ~/.cache...
    are tmpfs of its own), but writes to the bucket what this process then reads."""
    import pyarrow.fs

    s3, cluster, head = stack
    secret = tmp_path / "secret.txt"
    secret.write_text("only on the test's machine")
    uri = f"{s3.uri}/probe/node.txt"
    head_session = str(Path(cluster.temp_dir) / "session_latest")  # the head's files, not its (maybe mounted) folder
    done = subprocess.run([sys.executable, "-c", PROBE, str(secret), head_session, uri],
                          env=cluster.client_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])

    assert seen["driver_node"] == head != seen["node"]  # the driver attached to the head, the task ran elsewhere
    assert seen["node"] in {n["node_id"] for n in cluster.nodes() if n["state"] == "ALIVE"}
    assert Path(cluster.temp_dir, "session_latest").exists()  # on this side of the mount
    assert not seen["sees_secret"] and not seen["sees_head_temp"]
    project = Path(__file__).resolve().parents[1]
    private = {str(Path.home() / ".cache"), str(Path.home() / "ray_results"), str(project / "bmoe-runs")}
    # /tmp whole, unless it holds the checkout (a CI clone): then the temp dirs one by one
    private |= {cluster.temp_dir, *cluster.worker_temp_dirs} if str(project).startswith("/tmp/") else {"/tmp"}
    assert private <= set(seen["tmpfs"])
    own = Path(cluster.worker_temp_dirs[0])  # the worker's own session lives on its tmpfs
    assert not own.exists() or not any(own.iterdir())  # (an empty mount point where /tmp holds the project)
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    with fs.open_input_stream(path) as stored:
        assert stored.read().decode() == seen["read_back"] == seen["node"]


def test_submit_job_runs_on_the_worker(stack):
    """`ray job submit --working-dir` as a user would: the job's task runs on the worker, in the
    project as uploaded to the worker's own disk."""
    _, cluster, head = stack
    code, logs = submit_job(cluster, ["python", "-c", JOB], {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}},
                            submission_id="bmoe-isolation-job", timeout=240)
    assert code == 0, logs[-3000:]
    result = json.loads(next(line for line in logs.splitlines() if line.startswith("bmoe-job:")).split(":", 1)[1])
    assert result["node"] != head
    # it runs in the uploaded copy, unpacked on the worker's own disk
    assert result["cwd"].startswith(cluster.worker_temp_dirs[0] + "/") and result["has_project"]
