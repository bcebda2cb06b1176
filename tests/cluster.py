"""A real multi-node Ray cluster, an S3-compatible server and an MLflow server on 127.0.0.1.

Helpers for tests, not a test module. Each worker node runs in its own mount namespace with
private tmpfs over /tmp, ~/.cache, ~/ray_results, ./bmoe-runs and any folder a test names, so it
cannot read the head's or the test's local files: what a job needs must travel through Ray
(working_dir, objects), the object store or MLflow, as on a real cluster. The venv and the
project's source stay shared, as an image installed on every node would be. Every process is
started here and stopped by its PID.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Uploading these with `--working-dir` would send gigabytes (.venv) or stale run state.
EXCLUDES = [".venv", ".git", "bmoe-runs"]
# What a node needs from the environment of the test that starts it; the rest (BMOE_*, pytest's
# own variables) stays behind, as it would on another machine.
NODE_ENV_KEYS = ("HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ")


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1: all bound at once so none repeats."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _processes(marker: str) -> dict[int, str]:
    """PID -> command line of every live process whose command line contains `marker`, and of
    their descendants (this process excluded). Zombies count as gone: they have exited, and
    waiting for their parent to reap them would wait out every grace period."""
    parents, lines, found = {}, {}, set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state, ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):  # gone meanwhile
            continue
        if state in ("Z", "X"):
            continue
        parents[int(proc.name)] = int(ppid)
        lines[int(proc.name)] = cmdline
        if marker in cmdline:
            found.add(int(proc.name))
    while grown := {pid for pid, ppid in parents.items() if ppid in found} - found:
        found |= grown
    return {pid: lines[pid] for pid in found}


def _terminate(marker: str, pids: set[int], grace: float) -> None:
    """SIGTERM `pids`, SIGKILL those still among `marker`'s processes after `grace` s."""
    def signal_all(targets: set[int], sig: int) -> None:
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (left := pids & set(_processes(marker))) and time.monotonic() < deadline:
        time.sleep(0.2)
    signal_all(left, signal.SIGKILL)


def stop_processes(marker: str, grace: float = 15.0) -> None:
    """SIGTERM every process whose command line contains `marker` (a unique temp dir) and its
    descendants, SIGKILL what is left after `grace` s: `ray stop` or `pkill -f` would also hit
    processes this test did not start."""
    _terminate(marker, set(_processes(marker)), grace)


def _stop_ray(marker: str, grace: float = 15.0) -> None:
    """stop_processes in `ray stop`'s order (raylets, the rest, gcs_server last): stopped all at
    once, gcs_server ignores SIGTERM and every stop waits the full grace."""
    def named(name: str) -> set[int]:
        return {pid for pid, line in _processes(marker).items() if line.split(" ", 1)[0].endswith(name)}

    _terminate(marker, named("/raylet"), grace)
    _terminate(marker, set(_processes(marker)) - named("/gcs_server"), grace)
    _terminate(marker, set(_processes(marker)), grace)


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set, restored after: in-process clients (pyarrow, boto3, mlflow)
    read their endpoint and credentials from there."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass(frozen=True)
class S3Server:
    """A moto S3 server with one bucket: pass `env` to every process that should reach it."""

    bucket: str
    uri: str  # s3://bucket
    endpoint: str  # http://127.0.0.1:PORT
    env: dict[str, str]


@contextlib.contextmanager
def s3_server(bucket: str) -> Iterator[S3Server]:
    """moto's S3 on 127.0.0.1 with `bucket` created; its endpoint and fake credentials are in
    os.environ meanwhile, so pyarrow's `FileSystem.from_uri("s3://...")` in this process reaches it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_ports(1)[0]
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}  # no probing of 169.254.169.254 for credentials
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        with _environ(env):
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
            yield S3Server(bucket=bucket, uri=f"s3://{bucket}", endpoint=endpoint, env=env)
    finally:
        server.stop()


def _wait_http(url: str, timeout: float, alive: subprocess.Popen | None = None) -> bytes:
    """The body of the first 200 answer from `url` within `timeout` s; fails early if `alive` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return response.read()
        except (OSError, http.client.HTTPException):  # not up yet
            pass
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"{alive.args[:2]} exited with {alive.returncode} before {url} answered")
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@contextlib.contextmanager
def mlflow_server(data_dir: Path | str, timeout: float = 90.0) -> Iterator[str]:
    """infra/mlflow/serve.sh on a free port with its sqlite backend and artifacts in `data_dir`;
    yields its http URI. Stopped by its process group (the script execs mlflow, which forks uvicorn)."""
    port = free_ports(1)[0]
    env = {**os.environ, "BMOE_MLFLOW_DATA": str(data_dir), "BMOE_MLFLOW_PORT": str(port),
           "BMOE_MLFLOW_WORKERS": "1", "MLFLOW": str(BIN / "mlflow"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = Path(data_dir) / "server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        server = subprocess.Popen(["bash", str(PROJECT / "infra" / "mlflow" / "serve.sh")], env=env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        try:
            _wait_http(f"{uri}/health", timeout, alive=server)
        except (TimeoutError, RuntimeError) as error:
            raise RuntimeError(f"{error}; {log}:\n{log.read_text()[-3000:]}") from None
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):  # a slow graceful shutdown on a busy machine
            server.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # whatever of the group outlived mlflow itself
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


@dataclass(frozen=True)
class RayCluster:
    """Addresses of a running cluster: `dashboard` for `ray job submit --address`, `gcs_address`
    for RAY_ADDRESS / ray.init."""

    dashboard: str  # http://127.0.0.1:PORT
    gcs_address: str  # 127.0.0.1:PORT
    temp_dir: str  # the head's
    worker_temp_dirs: tuple[str, ...]  # temp_dir + "-w<i>": paths on each worker's own /tmp

    def client_env(self) -> dict[str, str]:
        """The environment for a driver or the `ray` CLI on the head's machine, as a user would run
        them: this cluster's address, the venv first on PATH, no token authentication."""
        return {**os.environ, "RAY_ADDRESS": self.gcs_address, **_ray_env()}

    def nodes(self) -> list[dict]:
        """The cluster's nodes from the dashboard's state API (no ray.init in this process, where
        other tests keep their own local Ray)."""
        body = _wait_http(f"{self.dashboard}/api/v0/nodes?limit=100&detail=true", timeout=30)
        return json.loads(body)["data"]["result"]["result"]


def _ray_env() -> dict[str, str]:
    """What every Ray process here needs: the venv's `ray` and `python` first on PATH, no token
    auth (the first ray.init would otherwise write ~/.ray/auth_token), no usage stats."""
    return {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}", "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0"}


def _can_unshare_mounts() -> str | None:
    """Why worker nodes cannot get private folders here, or None when they can."""
    if shutil.which("unshare") is None:
        return "no `unshare` on this machine"
    probe = tempfile.mkdtemp(prefix="bmoe-unshare-", dir="/tmp")
    try:
        done = subprocess.run(["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "bmoe-probe",
                               probe], capture_output=True, text=True, timeout=30)
    finally:
        os.rmdir(probe)
    if done.returncode != 0:
        return f"`unshare -m` + `mount -t tmpfs` not permitted: {(done.stderr or done.stdout).strip()}"
    return None


def _hidden_roots(hidden: Sequence[str | Path], temp_dirs: Sequence[str]) -> list[str]:
    """The folders a worker gets its own empty tmpfs over: /tmp (the head's temp dir, pytest's base
    temp), the default places for caches, Tune results and runs that nodes must not share, the
    cluster's temp dirs and `hidden`. A default folder that holds what every node must run (the
    project, the venv, the Python install: a checkout under /tmp, as a CI clone may be) is left
    out; the temp dirs and `hidden` are then hidden one by one. Resolved, parents first, none
    inside another (a folder under a fresh tmpfs is already gone); each is created on the host if
    missing so it can be a mount point."""
    home = Path.home()
    needed = [os.path.realpath(p) for p in (PROJECT, sys.prefix, sys.base_prefix)]

    def holds_needed(folder: str) -> bool:
        return any(n == folder or n.startswith(folder.rstrip("/") + "/") for n in needed)

    defaults = [os.path.realpath(p) for p in ("/tmp", home / ".cache", home / "ray_results", PROJECT / "bmoe-runs")]
    paths = {p for p in defaults if not holds_needed(p)} | {os.path.realpath(p) for p in [*temp_dirs, *hidden]}
    roots = [p for p in sorted(paths)
             if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in paths)]
    for root in roots:
        os.makedirs(root, exist_ok=True)
    return roots


def _wait_for_nodes(cluster: RayCluster, count: int, workers: list[subprocess.Popen], logs: list[Path],
                    timeout: float) -> None:
    """Until the dashboard lists `count` alive nodes: `ray start --block` prints no "ready"."""
    deadline = time.monotonic() + timeout
    alive: list[dict] = []
    while time.monotonic() < deadline:
        for worker, log in zip(workers, logs):
            if worker.poll() is not None:
                raise RuntimeError(f"worker node exited with {worker.returncode}:\n{log.read_text()[-3000:]}")
        try:
            alive = [n for n in cluster.nodes() if n["state"] == "ALIVE"]
        except (TimeoutError, KeyError, ValueError):
            alive = []
        if len(alive) >= count:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{len(alive)} of {count} Ray nodes alive after {timeout:.0f} s")


def _head_command(cluster: RayCluster, ports: list[int], common: list[str]) -> list[str]:
    """`ray start --head` with no CPUs and every port pinned to a free one on 127.0.0.1."""
    return [str(BIN / "ray"), "start", "--head", f"--port={cluster.gcs_address.rsplit(':', 1)[1]}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports[0]}",
            f"--dashboard-agent-listen-port={ports[1]}", f"--dashboard-agent-grpc-port={ports[2]}",
            f"--ray-client-server-port={ports[3]}", f"--metrics-export-port={ports[4]}",
            f"--runtime-env-agent-port={ports[5]}", "--num-cpus=0", f"--temp-dir={cluster.temp_dir}", *common]


def _worker_command(cluster: RayCluster, temp_dir: str, cpus: int, ports: list[int], common: list[str],
                    roots: list[str]) -> list[str]:
    """A worker node in a mount namespace of its own: a fresh tmpfs over each of `roots`, then
    `ray start --block` with its ports pinned and its temp dir on its own /tmp."""
    start = [str(BIN / "ray"), "start", f"--address={cluster.gcs_address}", f"--num-cpus={cpus}",
             f"--temp-dir={temp_dir}",  # Ray 2.60 takes one per node
             f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
             f"--dashboard-agent-listen-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
             f"--metrics-export-port={ports[4]}", f"--runtime-env-agent-port={ports[5]}", *common, "--block"]
    logs = shlex.quote(f"{temp_dir}/session_latest/logs")
    script = (f'set -eu\nfor d in {shlex.join(roots)}; do\n'
              f'  mount -t tmpfs -o mode="$(stat -c %a "$d")" bmoe-private "$d"\ndone\n'
              f'status=0\n{shlex.join(start)} || status=$?\n'
              f'tail -n 40 {logs}/raylet.out {logs}/raylet.err || true\n'  # a failed start: they go with the tmpfs
              f'exit $status\n')
    return ["unshare", "-m", "--propagation", "private", "bash", "-c", script]


@contextlib.contextmanager
def ray_cluster(workers: int = 1, worker_cpus: int = 2, hidden: Sequence[str | Path] = (),
                env: dict[str, str] | None = None, object_store_mb: int = 256,
                timeout: float = 180.0) -> Iterator[RayCluster]:
    """A head with 0 CPUs (so every task lands on a worker) and `workers` worker nodes, each in its
    own mount namespace with private tmpfs over /tmp (the head's temp dir, pytest's base temp),
    the other folders of _hidden_roots and `hidden`. `env` (object-store credentials...) is given
    to every node. Skips the test where `unshare -m` is not permitted; stops everything by PID,
    even when the body raises.

    Args:
        object_store_mb: per node; Ray's default (30% of RAM each) would overcommit one machine.
    """
    if reason := _can_unshare_mounts():
        pytest.skip(f"no private worker disks: {reason}")
    temp = tempfile.mkdtemp(prefix="bmoe-ray-", dir="/tmp")  # Ray's socket paths must stay under ~107 chars
    node_env = {**{k: os.environ[k] for k in NODE_ENV_KEYS if k in os.environ},
                "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", **(env or {}), **_ray_env()}
    ports = free_ports(7 + 6 * workers)  # gcs, 6 more for the head, 6 a worker
    common = ["--node-ip-address=127.0.0.1", f"--object-store-memory={object_store_mb * 1024 ** 2}",
              "--min-worker-port=0", "--max-worker-port=0",  # OS-chosen: no clash with another Ray's range
              "--disable-usage-stats"]
    cluster = RayCluster(dashboard=f"http://127.0.0.1:{ports[1]}", gcs_address=f"127.0.0.1:{ports[0]}",
                         temp_dir=temp, worker_temp_dirs=tuple(f"{temp}-w{i}" for i in range(workers)))
    nodes: list[subprocess.Popen] = []
    logs: list[Path] = []
    try:
        head = subprocess.run(_head_command(cluster, ports[1:7], common), env=node_env, capture_output=True,
                              text=True, timeout=timeout)
        if head.returncode != 0:
            raise RuntimeError(f"ray start --head failed:\n{(head.stdout + head.stderr)[-3000:]}")
        roots = _hidden_roots(hidden, [temp, *cluster.worker_temp_dirs])
        for i, worker_temp in enumerate(cluster.worker_temp_dirs):
            own = ports[7 + 6 * i:13 + 6 * i]
            command = _worker_command(cluster, worker_temp, worker_cpus, own, common, roots)
            logs.append(Path(temp) / f"worker-{i}.log")  # opened here: the worker cannot see the head's temp dir
            with logs[-1].open("wb") as log:
                nodes.append(subprocess.Popen(command, env=node_env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True, cwd="/"))
        _wait_for_nodes(cluster, 1 + workers, nodes, logs, timeout)
        yield cluster
    finally:
        _stop_ray(temp)  # the workers' temp dirs and so their processes' command lines start with it
        for node in nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=10)
        for folder in (temp, *cluster.worker_temp_dirs):
            shutil.rmtree(folder, ignore_errors=True)


def submit_job(cluster: RayCluster, entrypoint: list[str], runtime_env: dict, submission_id: str,
               timeout: int) -> tuple[int, str]:
    """`ray job submit --working-dir <project>` from the project root, as a user would; returns the
    CLI's exit code and its output (the job's logs). After `timeout` s the job is stopped and the
    code is 124, as with `timeout(1)`."""
    runtime_env = {**runtime_env, "excludes": sorted({*runtime_env.get("excludes", []), *EXCLUDES})}
    ray = str(BIN / "ray")
    command = [ray, "job", "submit", "--address", cluster.dashboard, "--working-dir", str(PROJECT),
               "--submission-id", submission_id, "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]
    env = cluster.client_env()
    try:
        done = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        subprocess.run([ray, "job", "stop", "--address", cluster.dashboard, "--no-wait", submission_id],
                       env=env, capture_output=True, timeout=60)
        output = [o.decode(errors="replace") if isinstance(o, bytes) else o or ""
                  for o in (expired.stdout, expired.stderr)]
        return 124, "".join(output) + f"\n[stopped after {timeout} s]"
    return done.returncode, done.stdout + done.stderr
