"""`bmoe`: one console script, one subcommand per pipeline stage.

Every stage is a plain function in pipelines/ that the CLI, `ray job submit` and the tests
all call; the CLI only turns flags into a RunConfig and user errors into one line.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from typing import Annotated, Callable, Optional

import typer

from pipelines.runtime import PROFILES, RunConfig, UserError, label_options, quiet_environment, resource_problem
from storage import StoragePath

LOOPBACK = ("127.0.0.1", "localhost", "::1")  # serve hosts that keep the server on this machine

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Biased Mixtures of Experts on Ray: prepare data, train experts, cache their losses, "
    "sweep gates with Ray Tune + MLflow, and report rho per method.",
)

Task = Annotated[str, typer.Option("--task", help="Task: superres (DIV2K), detection (COCO) or action (UCF-101).")]
Root = Annotated[str, typer.Option(help="Run root: shards, checkpoints, caches, Tune state, reports, mlflow.db; "
                                        "a path, or an object-store URI (s3://, gs://, file://).")]
Profile = Annotated[str, typer.Option(help=f"Sizes and epochs: {'|'.join(PROFILES)} (smoke: seconds, for tests).")]
DataRoot = Annotated[Optional[str], typer.Option(help="Real dataset folder; absent: the embedded default data.")]
TrackingUri = Annotated[Optional[str], typer.Option(help="MLflow tracking URI; default sqlite:///<root>/mlflow.db.")]
Workers = Annotated[int, typer.Option(help="Ray Train workers per expert.")]
Gpu = Annotated[bool, typer.Option("--gpu/--no-gpu", help="Train and score experts on GPUs (Ray resources).")]
Seed = Annotated[int, typer.Option(help="Seed of the embedded data, the expert and gate initialisations and the "
                                        "sweep: another seed is another run (use another --root to keep both).")]
Options = Annotated[Optional[list[str]], typer.Option(
    "--task-option", "-o", help="Override a task setting, KEY=VALUE, repeatable (superres: model=fsrcnn, "
    "scales=4,3,2; detection: resolutions=100,150,300; action: F_t=150, split=2; any task: epochs=30, K=1 ...; "
    "an unknown key lists the known ones).")]


@app.callback()
def _group() -> None:
    """Biased Mixtures of Experts on Ray."""


def _config(task_name: str, root: str, profile: str, data_root: str | None, tracking_uri: str | None,
            options: list[str] | None = None, tracking: bool = False, **extra) -> RunConfig:
    """The stage's RunConfig; a bad root (or, for a stage that logs to MLflow, a URI root
    without a tracking server) stops here, before any work, in one line."""
    from tasks import TASKS

    if task_name not in TASKS:
        raise typer.BadParameter(f"unknown task {task_name!r}; available: {', '.join(sorted(TASKS))}",
                                 param_hint="--task")
    parsed = {}
    for item in options or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--task-option")
        parsed[key.strip()] = value.strip()
    try:
        cfg = RunConfig(task_name=task_name, root=root, profile=profile, data_root=data_root, tracking_uri=tracking_uri,
                        task_options=parsed, **extra)
        cfg.task()  # bad task options fail here, as one line
        if tracking:
            cfg.mlflow_uri  # noqa: B018  a URI root needs --tracking-uri
        root = cfg.layout.root
        if isinstance(root, StoragePath):
            try:
                root.filesystem  # noqa: B018  unknown scheme, bad bucket, no credentials
            except ValueError as err:
                raise UserError(f"--root {err}") from None
        labels = label_options(task_name, profile, data_root, str(root))  # the data's label set; -o wins
        if labels:
            cfg = replace(cfg, task_options={**labels, **parsed})
            cfg.task()
        return cfg
    except ValueError as err:  # a bad flag value: one line, no traceback
        raise typer.BadParameter(str(err)) from None
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


def _run(stage: Callable, *args, **kwargs):
    """Call a stage; user errors and bad inputs become one line on stderr and exit code 1."""
    from storage import UnsafeFile
    from tasks import BadInput

    try:
        return stage(*args, **kwargs)
    except (UserError, BadInput, UnsafeFile) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    except Exception as err:  # a full disk or a refused write anywhere: one line, the rest re-raised
        configs = args[0] if args and isinstance(args[0], list) else args[:1]
        cfg = next((c for c in configs if isinstance(c, RunConfig)), None)
        try:
            tracking = cfg.mlflow_uri if cfg else None
        except UserError:
            tracking = None
        problem = resource_problem(err, cfg.root if cfg else None, tracking)
        if problem is None:
            raise
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(1) from None


@app.command()
def prepare(task_name: Task = "superres", root: Root = "bmoe-runs", profile: Profile = "demo",
            data_root: DataRoot = None, tracking_uri: TrackingUri = None, option: Options = None, seed: Seed = 0,
            strict: Annotated[bool, typer.Option(help="Fail on the first bad input file instead of counting it.")] = False,
            shard_file_mb: Annotated[float, typer.Option(help="Close a shard file once it holds this many MB "
                                                              "(Arrow data, before compression).")] = 128.0,
            row_group_mb: Annotated[float, typer.Option(help="Parquet row group size in MB: the unit sweep "
                                                             "trials stream and shuffle.")] = 8.0):
    """Stage 1: one streaming Ray Data pass per split writes Parquet shards per P_n and the gate input."""
    from pipelines.prepare import prepare as stage
    from pipelines.shard_writer import ShardSizes

    try:
        sizes = ShardSizes(file_mb=shard_file_mb, row_group_mb=row_group_mb)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    _run(stage, _config(task_name, root, profile, data_root, tracking_uri, option, strict=strict, seed=seed), sizes)


@app.command("train-experts")
def train_experts(task_name: Task = "superres", root: Root = "bmoe-runs", profile: Profile = "demo",
                  data_root: DataRoot = None, tracking_uri: TrackingUri = None, option: Options = None,
                  seed: Seed = 0, num_workers: Workers = 1, gpu: Gpu = False,
                  cpus_per_worker: Annotated[Optional[float], typer.Option(
                      help="CPUs each Ray Train worker reserves (default: Ray's, 1, or none beside a GPU); the "
                           "cluster must also keep one CPU free for Ray Data's reads.", min=0)] = None,
                  concurrent_fits: Annotated[int, typer.Option(
                      help="Experts trained at once (0: with --gpu all of them, each waiting for its GPUs, which "
                           "is what makes an autoscaler add GPU nodes; on CPUs what the cluster holds now).",
                      min=0)] = 0):
    """Stage 2: one Ray Train TorchTrainer run per expert; checkpoints and MLflow runs."""
    from pipelines.train_experts import train_experts as stage

    _run(stage, _config(task_name, root, profile, data_root, tracking_uri, option, tracking=True,
                        num_workers=num_workers, cpus_per_worker=cpus_per_worker, use_gpu=gpu,
                        concurrent_fits=concurrent_fits, seed=seed))


@app.command()
def cache(task_name: Task = "superres", root: Root = "bmoe-runs", profile: Profile = "demo",
          data_root: DataRoot = None, tracking_uri: TrackingUri = None, option: Options = None, seed: Seed = 0,
          gpu: Gpu = False,
          actors: Annotated[int, typer.Option(help="Most scorer actors per expert (0: with --gpu, one per "
                                                   "GPU the cluster has or adds; else one).", min=0)] = 0,
          batch_size: Annotated[int, typer.Option(help="Inputs a scorer takes at once: its memory (0: the task's, "
                                                       "superres 256 patches, detection 16 images, action 8 clips).",
                                                  min=0)] = 0):
    """Stage 3: every frozen expert scores every sample once (Ray Data actor pool)."""
    from pipelines.cache import cache as stage

    _run(stage, _config(task_name, root, profile, data_root, tracking_uri, option, use_gpu=gpu, seed=seed), actors=actors,
         batch_size=batch_size)


@app.command()
def sweep(task_name: Task = "superres", root: Root = "bmoe-runs", profile: Profile = "demo",
          data_root: DataRoot = None, tracking_uri: TrackingUri = None, option: Options = None, seed: Seed = 0,
          methods: Annotated[Optional[str], typer.Option(help="Comma-separated subset of methods.")] = None,
          name: Annotated[Optional[str], typer.Option(help="Sweep name (default: a hash of grid and cache).")] = None,
          cpus_per_trial: Annotated[Optional[float], typer.Option(
              help="CPUs per trial (and its torch threads); default: the profile's grid.")] = None,
          gpus_per_trial: Annotated[Optional[float], typer.Option(
              help="GPUs per trial, e.g. 0.25 for four trials per GPU; the gate trains there.")] = None,
          max_concurrent_trials: Annotated[Optional[int], typer.Option(
              help="At most this many trials at once (0: as many as the resources allow).")] = None,
          search: Annotated[Optional[str], typer.Option(
              help="Hyperparameters (lr, w_bias, gate width, batch size): grid (the profile's lists), random or "
                   "optuna (TPE, per method and target); default: the profile's.")] = None,
          num_samples: Annotated[Optional[int], typer.Option(
              help="With --search random|optuna: trials per method and target.")] = None,
          scheduler: Annotated[Optional[str], typer.Option(
              help="none, or asha: stop soft/enforce trials that trail their target's others on the per-epoch "
                   "validation objective.")] = None):
    """Stage 4: Ray Tune trains gates from the cache; MLflow parent run + one child per trial."""
    from pipelines.grid import GRIDS, with_methods
    from pipelines.sweep import sweep as stage

    cfg = _config(task_name, root, profile, data_root, tracking_uri, option, tracking=True, seed=seed)
    grid = _run(with_methods, GRIDS[cfg.profile], methods)
    overrides = {"cpus_per_trial": cpus_per_trial, "gpus_per_trial": gpus_per_trial,
                 "max_concurrent": max_concurrent_trials, "search": search, "num_samples": num_samples,
                 "scheduler": scheduler}
    try:
        grid = replace(grid, **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    _run(stage, cfg, grid, name)


@app.command()
def report(task_name: Task = "superres", root: Root = "bmoe-runs", profile: Profile = "demo",
           data_root: DataRoot = None, tracking_uri: TrackingUri = None, option: Options = None, seed: Seed = 0,
           sweep_file: Annotated[Optional[str], typer.Option(help="Sweep results JSON (default: latest).")] = None):
    """Stage 5: tables, plots and summary.json under <root>/reports/<task>/, logged to MLflow."""
    from pipelines.report import report as stage

    _run(stage, _config(task_name, root, profile, data_root, tracking_uri, option, tracking=True, seed=seed), sweep_file)


@app.command()
def compare(task_name: Task = "superres", root: Root = "bmoe-runs", tracking_uri: TrackingUri = None,
            sweep: Annotated[Optional[list[str]], typer.Option(help="Only these sweeps (repeatable).")] = None,
            d_target: Annotated[Optional[float], typer.Option(
                help="Bytes: show each trained method only at its target nearest to this.")] = None,
            output: Annotated[str, typer.Option(
                "--format", help="table: best trials, every method side by side per target, the registered gates and "
                                 "experts; csv: one row per (sweep, target, method); json: all three.")] = "table"):
    """Across the sweeps in the task's MLflow experiment: each method's rho and best trial, and every method
    side by side at each target with its routing efficiency (the gap to the oracle)."""
    import json
    from dataclasses import asdict

    from pipelines.compare import (as_csv, compare as stage, format_registered, format_side_by_side, format_table,
                                   registered, side_by_side)

    if output not in ("table", "csv", "json"):
        raise typer.BadParameter(f"--format {output!r}: choose table, csv or json")
    cfg = _config(task_name, root, "demo", None, tracking_uri, tracking=True)
    points = _run(side_by_side, cfg, sweep)
    if output == "csv":
        typer.echo(as_csv(points), nl=False)
        return
    rows = _run(stage, cfg, sweep, d_target)
    if output == "json":
        typer.echo(json.dumps({"best_trials": [asdict(r) for r in rows], "per_target": [asdict(p) for p in points],
                               "registered": [asdict(v) for v in _run(registered, cfg)]}, indent=2))
    else:
        typer.echo(format_table(rows) + "\n" + format_side_by_side(points) + "\n" + format_registered(_run(registered, cfg)))


@app.command()
def serve(task_name: Task = "superres", root: Root = "bmoe-runs",
          target_cost: Annotated[Optional[float], typer.Option(
              help="Budget d_t in bytes per routing unit (default d_max/2); requests may override it with "
                   "the X-BMoE-Target-Cost header or ?target_cost=.")] = None,
          bias: Annotated[Optional[str], typer.Option(help="Budget as expert shares b1,b2,...: d_t = b.d.")] = None,
          gate_file: Annotated[Optional[str], typer.Option(
              "--gate", "--gate-file",
              help="Gate to serve: a gate file, or a registered one (models:/bmoe-TASK-gate@best-d4096, whose target "
                   "becomes the default budget); default: from the latest sweep.")] = None,
          expert_uri: Annotated[Optional[list[str]], typer.Option(
              help="Registered expert in order (models:/bmoe-TASK-expert-N/VERSION or @ALIAS, runs:/ID/expert), "
                   "repeatable; default: the checkpoints under --root.")] = None,
          tracking_uri: TrackingUri = None,
          host: Annotated[str, typer.Option(help="HTTP host; 0.0.0.0 exposes the server to the network.")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="HTTP port.", min=1, max=65535)] = 8000,
          expert_gpus: Annotated[float, typer.Option(
              help="GPUs per expert replica (Ray's num_gpus; 0.25: four replicas share a GPU); 0: the CPU. "
                   "A replica runs on CUDA only when Ray gives it a GPU.", min=0.0)] = 0.0,
          router_gpus: Annotated[float, typer.Option(
              help="GPUs per router replica, for its gate (Ray's num_gpus); 0: the CPU.", min=0.0)] = 0.0):
    """Serve the task's mixture with Ray Serve: POST /<task>/predict, GET /<task>/stats (Ctrl-C stops)."""
    if host not in LOOPBACK:
        typer.echo(f"warning: --host {host} exposes the server beyond this machine (it has no authentication)",
                   err=True)
    from pipelines.runtime import ensure_ray
    from serving.app import budget_target, default_gate_target, run as serve_app
    from serving.loading import load_run
    from serving.settings import ROUTER_SCALING, Scaling, ServeSettings
    from tasks.typed_values import typed_fields

    try:  # the options are typed already; only --bias's "b1,b2,..." is text
        shares = typed_fields(ServeSettings, {"bias": bias}, "serve option")["bias"] if bias else None
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    settings = ServeSettings(task=task_name, root=root, target_cost=target_cost, bias=shares, gate_file=gate_file,
                             expert_uris=tuple(expert_uri) if expert_uri else None, tracking_uri=tracking_uri,
                             expert=replace(Scaling(), num_gpus=expert_gpus),
                             router=replace(ROUTER_SCALING, num_gpus=router_gpus))
    # Everything loaded once here, to fail fast in one line; the replicas then load their own parts.
    models = _run(load_run, root, task_name, gate_file, default_gate_target(settings), settings.expert_uris, tracking_uri)
    if models.gate_target is not None and target_cost is None and bias is None:
        settings = replace(settings, target_cost=models.gate_target)
    served = models.run
    del models
    try:
        budget_target(settings, served.costs)
        ensure_ray(RunConfig(task_name=task_name, root=root))
        _warn_without_gpus(max(expert_gpus, router_gpus))
        typer.echo(f"serving {task_name} on http://{host}:{port}/{task_name}/predict (stats: /{task_name}/stats)")
        _run(serve_app, settings, host=host, port=port, blocking=True, served=served)
    except ValueError as err:  # a budget outside the feasible range, a bad bias
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


@app.command()
def replay(task_name: Task = "superres", root: Root = "bmoe-runs",
           url: Annotated[str, typer.Option(help="The endpoint: http://HOST:PORT (a running `bmoe serve`, here or "
                                                 "remote; only HTTP is used).")] = "http://127.0.0.1:8000",
           target_cost: Annotated[Optional[list[float]], typer.Option(
               help="Budget d_t in bytes per routing unit, sent with each request; repeatable; default: the "
                    "endpoint's own.")] = None,
           split: Annotated[str, typer.Option(help="The root's split to send: test (compared with the report) or "
                                                   "val.")] = "test",
           timeout: Annotated[float, typer.Option(help="Seconds per request.", min=1.0)] = 300.0,
           order: Annotated[str, typer.Option(
               help="shuffled (seeded by --seed: unrelated consecutive requests, as a deployment sees them; seed 0 "
                    "is the order the report's as-served rows were scored in) or listed (the data set's order, e.g. "
                    "UCF-101's sorted by class: a stream's hardest case).")] = "shuffled",
           seed: Annotated[int, typer.Option(help="Seed of the shuffled order (0: the report's).")] = 0,
           tracking_uri: TrackingUri = None,
           output: Annotated[str, typer.Option("--format", help="table or json.")] = "table"):
    """Send a split of the root through a running endpoint and score the responses with the task's own
    metric, as the report does: served performance and data cost beside the report's row for the same
    gate and target. Run it after every deployment."""
    import json

    from serving.replay import format_table, replay as stage

    if output not in ("table", "json"):
        raise typer.BadParameter(f"--format {output!r}: choose table or json")
    cfg = _config(task_name, root, "demo", None, tracking_uri)
    tracking = tracking_uri or (None if cfg.layout.is_remote else cfg.mlflow_uri)  # for a registered gate's trial
    rows = _run(stage, str(cfg.layout.root), task_name, url, list(target_cost or [None]), split, timeout,
                progress=lambda line: typer.echo(line, err=True), tracking_uri=tracking, order=order, seed=seed)
    if output == "json":
        typer.echo(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        typer.echo(format_table(rows, cfg.task().metric_name))


def _warn_without_gpus(asked: float) -> None:
    """Replicas that ask for GPUs the Ray cluster lacks wait for GPU nodes: say so, in one line."""
    import ray

    have = ray.cluster_resources().get("GPU", 0.0)
    if asked > have:
        typer.echo(f"warning: replicas ask for {asked:g} GPU(s) each and the Ray cluster has {have:g}: they wait "
                   "until GPU nodes join (drop --expert-gpus/--router-gpus to serve on CPUs)", err=True)


@app.command()
def verify(task_name: Annotated[Optional[str], typer.Option("--task", help="One task only; default: every task "
                                                                         "the root holds.")] = None,
           root: Root = "bmoe-runs"):
    """Check every file the root recorded (shards, expert weights, caches, the latest sweep's gates)
    against the size and SHA-256 recorded when it was written; list what is damaged (exit 1) and
    which stage makes it again."""
    from pipelines.integrity import verify_root
    from pipelines.layout import RunLayout
    from tasks import TASKS

    damaged = 0
    for name in [task_name] if task_name else list(TASKS):
        try:
            layout = RunLayout.of(root, name)
        except ValueError as err:
            typer.echo(f"error: --root {err}", err=True)
            raise typer.Exit(1) from None
        if not task_name and not layout.manifest().exists():
            continue
        problems, checked = verify_root(layout)
        damaged += len(problems)
        typer.echo(f"{name}: {checked} file(s) checked, {len(problems)} damaged")
        for problem in problems:
            typer.echo(f"  {problem}")
    if damaged:
        typer.echo("rerun the stage that made each file (prepare: shards, train-experts: weights, cache: caches, "
                   "sweep: gates): it makes the damaged ones again", err=True)
        raise typer.Exit(1)


@app.command()
def demo(task_name: Annotated[Optional[str], typer.Option("--task", help="Run one task only; default: every task.")] = None,
         root: Root = "bmoe-runs", profile: Profile = "demo", data_root: DataRoot = None,
         tracking_uri: TrackingUri = None, option: Options = None, seed: Seed = 0,
         concurrent_fits: Annotated[int, typer.Option(
             help="Experts trained at once (0: as many as the cluster's CPUs hold beside Ray Data's reads); "
                  "1 when other jobs share the cluster.", min=0)] = 0):
    """Run every stage of every task on the embedded default data and print what ran."""
    from pipelines.demo import run_demo
    from tasks import TASKS

    names = [task_name] if task_name else list(TASKS)
    configs = [_config(name, root, profile, data_root, tracking_uri, option, tracking=True, seed=seed,
                       concurrent_fits=concurrent_fits) for name in names]
    _run(run_demo, configs)


def main() -> None:
    quiet_environment()
    started = time.perf_counter()
    try:
        app(prog_name="bmoe", standalone_mode=True)
    finally:
        if "--help" not in sys.argv:
            print(f"[bmoe] {time.perf_counter() - started:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
