"""Where a run lives and how it reaches Ray and MLflow: the embedded defaults.

Everything a run writes stays under its root: data shards, checkpoints, caches, Tune state,
reports and (by default) the MLflow database. Nothing here runs at import time.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROFILES = ("smoke", "demo", "paper")
RAY_SOCKET_SUFFIX = len("/session_2026-12-05_13-32-58_213021_2408100/sockets/plasma_store")  # below Ray's temp dir


def resource_problem(err: BaseException, root: str | None = None, tracking_uri: str | None = None) -> str | None:
    """One line for a full disk or a refused write anywhere under a stage (a shard, MLflow's
    sqlite, Tune's state; raised here or on a Ray worker), naming the path and what was kept;
    None for any other error."""
    import errno

    seen, current = set(), err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = current.errno if isinstance(current, OSError) else None
        text = str(current)
        if code in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in text or "disk is full" in text:
            where = getattr(current, "filename", None) or (tracking_uri if "database" in text and tracking_uri else root)
            return (f"no space left on the device holding {where}{_free_space(where)}: what finished is kept "
                    f"under {root}; free some space and rerun the same command to go on from there")
        if code in (errno.EACCES, errno.EROFS):
            return (f"writing {current.filename or root} is refused ({os.strerror(code)}): what finished is kept "
                    f"under {root}; make it writable and rerun the same command to go on from there")
        current = current.__cause__ or current.__context__
    return None


def _free_space(where) -> str:
    import shutil

    path = str(where or "").removeprefix("sqlite:///")
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return f" ({shutil.disk_usage(path or '.').free / 2**20:.1f} MiB free)"
    except OSError:
        return ""


class UserError(Exception):
    """A problem the user can fix (bad path, bad flag, bad file); the CLI prints it as one line."""


@dataclass(frozen=True)
class RunConfig:
    """Options shared by every stage (the CLI's common flags)."""

    task_name: str = "superres"  # the task's registry name; task() makes the task itself
    root: str = "bmoe-runs"  # a local folder or an object-store URI (s3://bucket/runs)
    profile: str = "demo"
    data_root: str | None = None  # None: the task's embedded default data
    tracking_uri: str | None = None  # None: sqlite:///<root>/mlflow.db (local roots only)
    strict: bool = False  # fail on the first bad input instead of counting it
    num_workers: int = 1  # Ray Train workers per expert
    cpus_per_worker: float | None = None  # None: Ray Train's default (1 CPU, or a GPU and no CPU)
    use_gpu: bool = False  # Ray Train / cache actors ask for GPUs
    concurrent_fits: int = 0  # experts trained at once; 0: decided from the cluster (train_experts)
    seed: int = 0
    task_options: dict = field(default_factory=dict)  # overrides of the task's settings

    @property
    def ref(self):
        """The configured task by reference (tasks.TaskRef): what travels to Ray workers."""
        from tasks import TaskRef

        return TaskRef(self.task_name, self.profile, dict(self.task_options), int(self.seed))

    def task(self):
        """The configured task."""
        return self.ref.task()

    def __post_init__(self):
        if self.profile not in PROFILES:
            raise ValueError(f"profile {self.profile!r} is not one of {', '.join(PROFILES)}")
        if self.num_workers < 1 or (self.cpus_per_worker is not None and self.cpus_per_worker < 0):
            raise ValueError("--num-workers must be at least 1 and --cpus-per-worker not negative")

    @property
    def layout(self):
        """Every path of this task's run under the root (pipelines/layout.py)."""
        from pipelines.layout import RunLayout

        try:
            return RunLayout.of(self.root, self.task_name)
        except ValueError as err:  # a URI pyarrow cannot resolve: one line
            raise UserError(f"--root {err}") from None

    @property
    def mlflow_uri(self) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        if self.layout.is_remote:
            raise UserError(f"--root {self.root} is in object storage, where a sqlite file is not a database: "
                            "pass --tracking-uri of an MLflow server (infra/mlflow/serve.sh starts one)")
        return f"sqlite:///{self.layout.mlflow_db()}"

    def as_params(self) -> dict[str, str]:
        """Every setting the run used, as MLflow params: these flags and the task's full settings
        for the profile with -o applied (task.<field>), so a run is reproducible from its record."""
        params = {("task" if k == "task_name" else k): v for k, v in asdict(self).items() if k != "task_options"}
        settings = asdict(self.task().settings)
        return {k: str(v) for k, v in {**params, **{f"task.{k}": v for k, v in settings.items()}}.items()}


def quiet_environment() -> None:
    """Telemetry off and token auth relaxed for the local embedded cluster (see STACK.md)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per tiny weights file
    if not os.environ.get("RAY_ADDRESS"):
        # A local instance: on Linux Ray takes the default route's address as the node's and its
        # GCS, raylet, workers and agents listen on every interface; with this setting (read when
        # ray is first imported) it takes 127.0.0.1 and binds every port there (tests/test_binds.py).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Ray 2.60's Parquet datasource V2 starts fresh FooterReader actors for every read (about
    # 4 s each on 2 cores, measured); V1 reads the same shards in 0.2-0.3 s.
    os.environ.setdefault("RAY_DATA_USE_DATASOURCE_V2", "0")


def label_options(task_name: str, profile: str, data_root: str | None, root: str | None = None) -> dict[str, str]:
    """The label set the data defines, as task options: from the data root when one is given
    (the task's label_options hook: classInd.txt, the COCO JSON's categories), else from the
    manifest of the prepare that had one (later stages run without --data-root), else none: the
    profile's label set belongs to the embedded data only. A data root that cannot be read gives
    none here; prepare says what is wrong with it."""
    from storage import as_path, read_json
    from tasks import BadInput, get_task

    if data_root:
        try:
            return get_task(task_name, profile).label_options(as_path(data_root))
        except (BadInput, ValueError, OSError):
            return {}
    if root is None:
        return {}
    try:
        manifest = read_json(RunConfig(task_name=task_name, root=root, profile=profile).layout.manifest())
    except (UserError, ValueError, OSError):
        return {}
    return dict((manifest or {}).get("label_options") or {})


def ensure_ray(cfg: RunConfig) -> None:
    """Join the cluster named by RAY_ADDRESS (as `ray job submit` sets it) or start a local one."""
    import logging

    import ray
    import ray.data

    from pipelines import ray_watchdog

    quiet_environment()
    # Ray Data logs every operator at INFO; the stages print their own progress lines.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().use_datasource_v2 = os.environ["RAY_DATA_USE_DATASOURCE_V2"] != "0"
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
        unreachable = _unreachable(address)
        try:
            if unreachable:
                raise ConnectionError(unreachable)
            ray.init(log_to_driver=True)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError, PermissionError) as err:
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise UserError(f"cannot join the Ray cluster at RAY_ADDRESS={address} ({reason}): check that its head "
                            f"is up and reachable from here, that the address is the GCS address (host:6379) or "
                            f"ray://host:10001, and, for a cluster with token auth, that this machine has its "
                            f"token (RAY_AUTH_TOKEN or ~/.ray/auth_token; see STACK.md); unset RAY_ADDRESS to "
                            f"run on a local Ray") from None
        return
    kwargs = dict(include_dashboard=False, log_to_driver=True)
    # Ray's socket paths (<temp>/session_<date>_<time>_<pid>/sockets/plasma_store, about 64
    # characters below temp) must stay under 107: keep state under a local root when short enough
    # (a 52-character one failed with "AF_UNIX path length cannot exceed 107 bytes").
    temp = cfg.layout.ray_temp()
    if not cfg.layout.is_remote and len(str(temp)) + RAY_SOCKET_SUFFIX <= 107:
        temp.mkdir(parents=True, exist_ok=True)
        kwargs["_temp_dir"] = str(temp)
    records = _local_ray_records(cfg)
    if records is not None:
        killed = sum(ray_watchdog.clean_stale(r) for r in sorted(records.glob("local-ray-*.json")))
        if killed:
            print(f"ray: stopped {killed} process(es) a killed stage on this root left behind")
    before = ray_watchdog.children(os.getpid())
    ray.init(**kwargs)
    if records is not None:  # the local Ray goes with this driver, however it ends (pipelines/ray_watchdog.py)
        ray_watchdog.start(records / f"local-ray-{os.getpid()}.json", ray_watchdog.children(os.getpid()) - before)


def _local_ray_records(cfg: RunConfig) -> Path | None:
    """Where the watchdogs of local Rays started on `cfg`'s root record their processes: a local
    root's (an object-store root keeps none: /proc is this machine's), on Linux."""
    if cfg.layout.is_remote or not os.path.isdir("/proc"):
        return None
    return Path(str(cfg.layout.ray_temp()))


def _unreachable(address: str, timeout_s: float = 5.0) -> str | None:
    """Why nothing answers at a host:port RAY_ADDRESS (a TCP connect, before Ray's own retries,
    which end in a traceback or abort the process), or None; ray:// and "auto" are left to Ray."""
    import socket

    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        return f"nothing answers at {host}:{port}: {err.strerror or type(err).__name__}"
    return None


def ensure_mlflow(cfg: RunConfig, experiment: str | None = None) -> str:
    """Point MLflow at the run's tracking URI and select the task's experiment; returns its id."""
    import mlflow

    quiet_environment()
    name = experiment or f"bmoe-{cfg.task_name}"
    mlflow.set_tracking_uri(cfg.mlflow_uri)
    if cfg.tracking_uri is None:
        # the default database's artifacts stay under the (local) root too (MLflow's default is ./mlruns)
        cfg.layout.root.mkdir(parents=True, exist_ok=True)
        if mlflow.get_experiment_by_name(name) is None:
            mlflow.create_experiment(name, artifact_location=(cfg.layout.root / "mlartifacts").as_uri())
    return mlflow.set_experiment(name).experiment_id
