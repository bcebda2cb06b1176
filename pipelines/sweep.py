"""Stage 4, sweep: Ray Tune over method x d_t x w_bias x batch size M x gate width x lr.

method x d_t is always a grid; the hyperparameters are a grid too, or a search (random or
Optuna, `--search`, `--num-samples`) with ASHA stopping lost trials (`--scheduler asha`): see
pipelines/search.py.

Each trial trains (or applies) a gate on the expert cache only. MLflow: one experiment per
task, a parent run per sweep, one child run per trial (params, per-epoch metrics, final test
performance, d_mean, u, C_g, the trained gate as an artifact). Tune's state lives under the
root's tune/ storage path; trials write their gates and test assignments to the root from
whichever node runs them. Interrupt a sweep and rerun the same command, on any machine that
sees the root: it resumes with Tuner.restore, and finished trials are neither rerun nor logged
twice. A sweep whose record is complete is not run again.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from ray.air.integrations.mlflow import MLflowLoggerCallback

from pipelines import gate_trial
from pipelines.gate_trial import SplitData, run_trial, save_gate
from pipelines.methods import HYPERPARAMETERS, METHODS, NAMES, STATIC, TrialConfig, epochs_for_steps
from pipelines.layout import RunLayout, plain_name
from pipelines.registry import GATE_ARTIFACT
from pipelines.integrity import cache_damage, digest, shard_damage
from pipelines.prepare import require_manifest, shard_files
from pipelines.resources import require, trial_demand
from pipelines.runtime import RunConfig, UserError, ensure_mlflow, ensure_ray
from pipelines.split_cache import DamagedDownload, node_local, node_local_files
from pipelines.search import SCHEDULERS, SEARCHES, PerPointASHA, PointSearch, PointSearchGenerator
from storage import AnyPath, read_json, write_bytes, write_json
from tasks import GATE_SPLIT, SCORED_SPLITS

MAX_TRIAL_FAILURES = 2  # a trial whose worker or node dies is restarted this many times


@dataclass(frozen=True)
class SweepGrid:
    """The search space, as plain values beside the code that uses them."""

    methods: tuple[str, ...] = STATIC + tuple(n for n in NAMES if n not in STATIC)  # static first
    points: int = 7  # d_t grid over [d_min, d_max]; d_max/2 and d_max/3 are added for the tables
    epochs: int = 20  # with gate_steps: the most any trial takes (ASHA's horizon), derived by with_gate_steps
    gate_steps: int = 0  # 0: train gates for `epochs`; else for this many optimizer steps (the task's gate_steps)
    batch_sizes: tuple[int, ...] = (128,)
    lrs: tuple[float, ...] = (1e-4,)
    widths: tuple[float, ...] = (1.0,)
    w_biases: tuple[float, ...] = (0.1, 1.0, 10.0)
    # enforce's own lrs (empty: lrs). Its gate learns only through the expert Algorithm 1 assigns
    # each input, and which lr trains it well varied with the data (action demo, routing
    # efficiency at 1e-3 and 3e-3: 0.47 and 0.60 on one draw, 0.58 and 0.31 on another), so
    # validation picks per target.
    enforce_lrs: tuple[float, ...] = ()
    seed: int = 0  # the RunConfig's (--seed): trial initialisations, random quotas, searchers
    search: str = "grid"  # grid | random | optuna (pipelines/search.py)
    num_samples: int = 1  # trials per (method, d_t) point when searching
    scheduler: str = "none"  # none | asha
    lr_range: tuple[float, float] = (1e-4, 1e-2)  # searched log-uniformly
    w_bias_range: tuple[float, float] = (0.1, 100.0)  # searched log-uniformly (soft)
    grace_epochs: int = 1  # ASHA: epochs every trial gets
    reduction_factor: float = 2.0  # ASHA: 1/reduction_factor of a rung's trials go on
    max_concurrent: int = 0  # 0: as many as the cluster's resources allow
    cpus_per_trial: float = 1.0  # each trial's torch threads too
    gpus_per_trial: float = 0.0  # e.g. 0.25: four trials share a GPU; the gate and its batches go there

    def __post_init__(self):
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0 or self.max_concurrent < 0:
            raise ValueError("--cpus-per-trial must be positive, --gpus-per-trial and --max-concurrent-trials "
                             "not negative")
        if self.search not in SEARCHES:
            raise ValueError(f"--search {self.search!r}: choose from {', '.join(SEARCHES)}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"--scheduler {self.scheduler!r}: choose from {', '.join(SCHEDULERS)}")
        if self.num_samples < 1 or self.grace_epochs < 1 or self.reduction_factor <= 1:
            raise ValueError("--num-samples and the grace epochs must be at least 1, the reduction factor above 1")
        if self.search == "grid" and self.num_samples != 1:
            raise ValueError("--num-samples needs --search random or optuna (a grid runs each point once)")

    def trial_resources(self) -> dict[str, float]:
        """What each trial asks Ray for (tune.with_resources)."""
        return {"cpu": self.cpus_per_trial, **({"gpu": self.gpus_per_trial} if self.gpus_per_trial else {})}


GRIDS = {
    "smoke": SweepGrid(points=3, epochs=2, batch_sizes=(16,), lrs=(1e-3,), widths=(0.25,), w_biases=(1.0,)),
    "demo": SweepGrid(points=5, epochs=12, batch_sizes=(32,), lrs=(1e-3,), widths=(0.5,), w_biases=(1.0, 10.0, 100.0),
                      enforce_lrs=(1e-3, 3e-3)),
    "paper": SweepGrid(),  # the paper: batch 128, lr 1e-4, 20 epochs, w_bias cross-validated
}


def targets(d: np.ndarray, points: int) -> list[float]:
    """points d_t evenly over [d_min, d_max], plus d_max/2 and d_max/3 where they lie inside."""
    lo, hi = float(d.min()), float(d.max())
    grid = set(np.round(np.linspace(lo, hi, points), 6).tolist())
    grid |= {round(hi / k, 6) for k in (2, 3) if lo <= hi / k <= hi}
    return sorted(grid)


def trial_configs(cfg: RunConfig, grid: SweepGrid, d: np.ndarray) -> list[TrialConfig]:
    """Every trial of the sweep: per method (pipelines/methods.py), one trial for every target or
    one per target, times the grid of the hyperparameters the method has."""
    ts = tuple(targets(d, grid.points))
    configs = []
    for name in grid.methods:
        try:
            spec = METHODS[name]
        except KeyError:
            raise UserError(f"unknown method {name!r}; choose from {', '.join(NAMES)}") from None
        base = {"task_name": cfg.task_name, "profile": cfg.profile, "options": dict(cfg.task_options), "seed": grid.seed,
                "epochs": grid.epochs, "steps": grid.gate_steps, "method": name}
        where = [{"d_target": d_t} for d_t in ts] if spec.per_target else [{"targets": ts}]
        if not spec.trains_gate:
            configs += [TrialConfig(**base, **at) for at in where]
            continue
        w_biases = grid.w_biases if "w_bias" in spec.searched else (0.0,)
        lrs = grid.enforce_lrs if name == "enforce" and grid.enforce_lrs else grid.lrs
        configs += [TrialConfig(**base, **at, batch_size=M, lr=lr, width=width, w_bias=w)
                    for at in where for M in grid.batch_sizes for lr in lrs for width in grid.widths
                    for w in w_biases]
    return configs


def with_gate_steps(grid: SweepGrid, steps: int, gate_rows: int) -> SweepGrid:
    """The grid training gates for `steps` optimizer steps (the task's gate_steps; 0 keeps the
    grid's epochs): the paper states gate training in steps (20k for detection, 80k for action at
    batch 128), which mean the same on any data size where epochs do not. Each trial derives its
    own epochs from its batch size (TrialConfig.epochs_on); the grid's epochs become the most
    any trial takes, ASHA's horizon."""
    if not steps:
        return grid
    return replace(grid, gate_steps=steps, epochs=max(epochs_for_steps(steps, M, gate_rows) for M in grid.batch_sizes))


def search_points(configs: list[TrialConfig]) -> list[dict]:
    """The grid points of a search: the trial configs without their hyperparameters, once each."""
    points, seen = [], set()
    for config in configs:
        point = {k: v for k, v in config.as_tune().items() if k not in HYPERPARAMETERS}
        key = json.dumps(point, sort_keys=True)
        if key not in seen:
            seen.add(key)
            points.append(point)
    return points


def _tune_config(grid: SweepGrid, configs: list[TrialConfig]):
    """(param_space, TuneConfig, number of trials) for the grid or the search."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    scheduler = PerPointASHA(grid.epochs, grid.grace_epochs, grid.reduction_factor) if grid.scheduler == "asha" else None
    if grid.search == "grid":
        return ({"trial": tune.grid_search([c.as_tune() for c in configs])},
                tune.TuneConfig(reuse_actors=True, max_concurrent_trials=grid.max_concurrent or None,
                                scheduler=scheduler), len(configs))
    points = search_points(configs)
    search = PointSearch(points, grid, grid.search, grid.num_samples)
    limit = grid.max_concurrent or search_concurrency(grid, len(points), _cluster_resources())
    limited = ConcurrencyLimiter(search, max_concurrent=limit)
    return ({}, tune.TuneConfig(reuse_actors=True, search_alg=PointSearchGenerator(limited),
                                num_samples=search.total, scheduler=scheduler), search.total)


def search_concurrency(grid: SweepGrid, points: int, resources: dict) -> int:
    """Trials a searched sweep keeps in flight: as many as the cluster's CPUs (and GPUs) run now,
    and never fewer than one per (method, d_t) point. Each point has its own sequential searcher,
    which learns only from its finished trials, so one trial per point costs the search nothing;
    and an autoscaling cluster that starts without the GPUs the trials ask for (none counted here)
    sees every point's trial pending, the demand that makes it add nodes."""
    slots = resources.get("CPU", 1) / grid.cpus_per_trial
    if grid.gpus_per_trial:
        slots = min(slots, resources.get("GPU", 0) / grid.gpus_per_trial)
    return max(1, int(slots), points)


def _cluster_resources() -> dict:
    import ray

    return ray.cluster_resources()


def _identity(grid: SweepGrid) -> dict:
    """What names a sweep: its search space, not the resources it ran with (a sweep resumed
    on other machines is the same sweep)."""
    return {k: v for k, v in asdict(grid).items() if k not in ("max_concurrent", "cpus_per_trial", "gpus_per_trial")}


TRIAL_SPLITS = SCORED_SPLITS  # what a trial reads: the experts' own train split is not among them


def split_inputs(layout: RunLayout, manifest: dict, splits: tuple[str, ...] = TRIAL_SPLITS) -> dict[str, dict]:
    """Where each split's cache and gate shards are, with the size and SHA-256 the root recorded
    for each file: what a trial reads, on its own node (read_split)."""
    cached = (read_json(layout.cache_stamp()) or {}).get("files", {})
    return {split: {"cache_file": layout.cache(split), "cache_record": cached.get(split),
                    "gate_files": shard_files(layout, manifest, split, "gate"),
                    "gate_records": manifest["splits"][split]["shards"]["gate"]["files"]}
            for split in splits}


def read_split(where: dict, n_experts: int, full: bool = True) -> SplitData:
    """One split of split_inputs, read on this node: from the node's checked copy of each file
    when the root is an object store, fetched once for every trial on the node
    (pipelines/split_cache.py), else in place."""
    return gate_trial.load_split(node_local(where["cache_file"], where["cache_record"]),
                                 node_local_files(where["gate_files"], where["gate_records"]), n_experts, full)


def load_split(cfg: RunConfig, task, split: str, manifest: dict | None = None) -> SplitData:
    """One split's cache and (streamed) gate inputs, lined up (report, bench)."""
    manifest = manifest or require_manifest(cfg)
    if not cfg.layout.cache(split).exists():
        raise UserError(f"no expert cache for task {cfg.task_name} under {cfg.root}: run `bmoe cache` first")
    try:
        return read_split(split_inputs(cfg.layout, manifest, (split,))[split], len(task.expert_names()))
    except gate_trial.CacheMismatch as err:
        raise UserError(str(err)) from None


def sweep(cfg: RunConfig, grid: SweepGrid | None = None, name: str | None = None) -> Path:
    """Run (or resume) the sweep; returns the JSON file of its results."""
    import mlflow
    from ray import tune

    if name is not None:
        try:
            plain_name(name)
        except ValueError as err:
            raise UserError(f"--name: {err}") from None
    manifest = require_manifest(cfg, "sweep")
    task = cfg.task()
    layout = cfg.layout
    grid = replace(grid or GRIDS[cfg.profile], seed=cfg.seed)  # the run's seed is the sweep's
    grid = with_gate_steps(grid, task.gate_steps(), int(manifest["splits"][GATE_SPLIT]["samples"]))
    d = task.data_costs()
    configs = trial_configs(cfg, grid, d)
    planned = len(search_points(configs)) if grid.search != "grid" else len(configs)
    cache_key = read_json(layout.cache_stamp())
    # On an object store each trial's node checks every file's SHA-256 as it fetches it, once
    # (pipelines/split_cache.py): here sizes only, or the driver would read every split once more.
    content = not layout.is_remote
    if cache_key is not None and (damaged := cache_damage(layout, cache_key, content)):
        raise UserError(f"sweep: {damaged[0]}: run `bmoe cache` to make it again")
    if damaged := shard_damage(layout, manifest, TRIAL_SPLITS, ("gate",), content):  # the gates' inputs
        raise UserError(f"sweep: {damaged[0]} ({len(damaged)} shard file(s) damaged): run `bmoe prepare` to make "
                        f"them again")
    cache_key = {k: v for k, v in (cache_key or {}).items() if k != "files"} or None  # what it was made from
    if cache_key is None:
        raise UserError(f"no expert cache for task {cfg.task_name} under {cfg.root}: run `bmoe cache` first")
    key = hashlib.sha256(json.dumps({"grid": _identity(grid), "cache": cache_key, "data": manifest["fingerprint"]},
                                    sort_keys=True).encode()).hexdigest()[:10]
    name = name or f"sweep-{key}"
    out = layout.sweep_record(name)
    done = read_json(out)
    if done is not None and done.get("complete", len(done.get("trials", [])) == len(configs)):
        print(f"sweep: {name} already complete ({len(done['trials'])} trials): kept {out}")
        write_json(layout.latest_sweep(), {"name": name, "file": layout.relative(out)})
        return out

    ensure_ray(cfg)
    require(trial_demand(grid.trial_resources()))
    experiment_id = ensure_mlflow(cfg)
    parent = _parent_run(name, experiment_id, grid, cfg)
    for split in SCORED_SPLITS:
        if not layout.cache(split).exists():
            raise UserError(f"no expert cache for task {cfg.task_name} under {cfg.root}: run `bmoe cache` first")
    # Trials read their splits themselves, streamed from the root on their own node: only paths travel.
    inputs = split_inputs(layout, manifest)
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, inputs=inputs, n_experts=len(d), layout=layout, sweep_name=name,
                             tracking=GateTracking(cfg.mlflow_uri, f"bmoe-{cfg.task_name}")),
        grid.trial_resources())
    path = layout.tune_experiment(name)
    resuming = tune.Tuner.can_restore(path)
    callbacks = [_ResumableMLflowLogger(layout, cfg.as_params(), tracking_uri=cfg.mlflow_uri,
                                        experiment_name=f"bmoe-{cfg.task_name}",
                                        tags={"mlflow.parentRunId": parent, "bmoe.sweep": name})]
    run_config = tune.RunConfig(name=name, storage_path=layout.tune_storage(), callbacks=callbacks, verbose=1,
                                failure_config=tune.FailureConfig(max_failures=MAX_TRIAL_FAILURES))
    started = time.perf_counter()
    if resuming:
        print(f"sweep: resuming {name} from {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        _close_orphaned_runs(experiment_id, name)
        param_space, tune_config, trials = _tune_config(grid, configs)
        how = "grid" if grid.search == "grid" else f"{grid.search} search, {grid.num_samples} per point"
        print(f"sweep: {name}: {trials} trials ({', '.join(grid.methods)}; {planned} points; {how}"
              f"{'; ASHA' if grid.scheduler == 'asha' else ''}), each with {grid.trial_resources()}, "
              f"MLflow parent run {parent}")
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    results = tuner.fit()
    records = []
    for result in results:
        if isinstance(result.error, DamagedDownload):  # found by a trial's node as it fetched the file
            raise UserError(f"sweep: {result.error.cause}: run `bmoe verify` to list the damaged files, then "
                            "`bmoe prepare` (shards) or `bmoe cache` (the cache) to make them again")
        if result.error:
            raise RuntimeError(f"sweep trial failed: {result.error}")
        metrics = result.metrics
        if "points_json" not in metrics:
            if metrics.get("done") and "epoch" in metrics:  # stopped by ASHA after this epoch
                records.append({"config": result.config["trial"], "points": [], "stopped_early": True,
                                "epochs": metrics["epoch"], "val_objective": metrics.get("val_objective"),
                                "trial_dir": result.path})
                continue
            raise UserError(f"sweep {name} was interrupted before every trial finished: "
                            "rerun the same command to resume it")
        records.append({"config": result.config["trial"], "points": json.loads(metrics["points_json"]),
                        "C_g": metrics.get("C_g"), "val_performance": metrics.get("val_performance"),
                        "val_objective": metrics.get("val_objective"),
                        "trial_dir": result.path, "assignment_file": metrics.get("assignment_file"),
                        "gate_file": metrics.get("gate_file"),
                        **({"gate_digest": {"bytes": int(metrics["gate_bytes"]), "sha256": metrics["gate_sha256"]}}
                           if metrics.get("gate_sha256") else {}),
                        "resources": {k: metrics.get(f"assigned_{k}") for k in ("cpu", "gpu")},
                        "trial_seconds": metrics.get("trial_seconds"),
                        "device": metrics.get("device")})
    if resuming:
        _close_lost_trials(experiment_id, name, {result.metrics.get("trial_id") for result in results})
    summary = {"name": name, "task": cfg.task_name, "profile": cfg.profile, "grid": asdict(grid),
               "mlflow_parent_run": parent, "experiment_id": experiment_id,
               "seconds": round(time.perf_counter() - started, 1), "complete": True,
               "stopped_early": sum(bool(r.get("stopped_early")) for r in records), "trials": records}
    write_json(out, summary)
    write_json(layout.latest_sweep(), {"name": name, "file": layout.relative(out)})
    with mlflow.start_run(run_id=parent):
        mlflow.log_metric("trials", len(records))
        mlflow.log_dict(summary, out.name)
    mlflow.MlflowClient().set_terminated(parent)
    stopped = f" ({summary['stopped_early']} stopped early by ASHA)" if summary["stopped_early"] else ""
    print(f"sweep: {len(records)} trials done{stopped} in {summary['seconds']}s -> {out}")
    return out


def _parent_run(name: str, experiment_id: str, grid: SweepGrid, cfg: RunConfig) -> str:
    """The sweep's parent MLflow run, reused when the sweep resumes."""
    import mlflow

    found = mlflow.search_runs([experiment_id], filter_string=f"tags.`bmoe.sweep_parent` = '{name}'",
                               output_format="list")
    if found:
        return found[0].info.run_id
    with mlflow.start_run(run_name=name, tags={"bmoe.sweep_parent": name, "bmoe.stage": "sweep"}) as run:
        mlflow.log_params({**{f"grid.{k}": str(v) for k, v in asdict(grid).items()}, **cfg.as_params()})
        return run.info.run_id


def _close_orphaned_runs(experiment_id: str, name: str) -> None:
    """A sweep starting over without its Tune state (tune/ lost, the tracking store kept) would
    log a second run per trial under the same parent: the first start's trial and point runs are
    deleted first (MLflow's soft delete: hidden from searches and the UI, restorable until
    `mlflow gc`), so the sweep's parent holds one run per trial, and compare counts each once."""
    import mlflow

    client = mlflow.MlflowClient()
    old = {r.info.run_id for tag in ("bmoe.sweep", "bmoe.point") for r in mlflow.search_runs(
        [experiment_id], filter_string=f"tags.`{tag}` = '{name}'", output_format="list")}
    for run_id in old:
        client.delete_run(run_id)
    if old:
        print(f"sweep: {name} starts over (no Tune state to resume): its {len(old)} earlier MLflow trial and point "
              "runs are marked deleted (restorable with `mlflow runs restore`)")


def _close_lost_trials(experiment_id: str, name: str, kept: set[str]) -> None:
    """A driver killed between a trial's end and Tune's next save of its experiment loses that
    trial: the restored search issues it again under a new id. The lost trial's MLflow runs
    (its own and its points') are marked deleted, so the sweep's parent holds one run per trial."""
    import mlflow

    client = mlflow.MlflowClient()
    lost = [r for r in mlflow.search_runs([experiment_id], filter_string=f"tags.`bmoe.sweep` = '{name}'",
                                          output_format="list")
            if r.data.tags.get(TRIAL_ID_TAG) and r.data.tags[TRIAL_ID_TAG] not in kept]
    for run in lost:
        trial = run.data.tags["trial_name"]
        points = mlflow.search_runs([experiment_id], output_format="list",
                                    filter_string=f"tags.`bmoe.point` = '{name}' and tags.trial_name = '{trial}'")
        for run_id in {run.info.run_id, *(p.info.run_id for p in points)}:
            client.delete_run(run_id)
    if lost:
        print(f"sweep: {len(lost)} trial(s) finished before the interruption but were lost from Tune's saved state "
              "and ran again: their first MLflow runs are marked deleted")


class _ResumableMLflowLogger(MLflowLoggerCallback):
    """One MLflow run per trial, across resumes: a trial restarted by Tuner.restore logs into
    the run its first attempt opened instead of opening a second one. A trial's trained gate
    (written to the root by the trial) is logged as an artifact of its run when it ends."""

    def __init__(self, layout: RunLayout, settings: dict[str, str], **kwargs):
        super().__init__(**kwargs)
        self.layout = layout
        self.settings = settings  # the run's full settings (RunConfig.as_params), on every trial's run

    def log_trial_start(self, trial):
        """The trial's run, opened once with its tags and every param in one request (Ray's
        logger sends each param on its own), or found again (a restored sweep's trial)."""
        import mlflow
        from mlflow.entities import Param
        from ray._private.dict import flatten_dict

        if trial in self._trial_runs:
            return
        client = mlflow.MlflowClient(self.tracking_uri)
        # looked for in every sweep, not only a restored one: looking only on restore, a searched
        # sweep with ASHA stopped by `ray job stop` and resumed logged two runs for two trials
        found = client.search_runs(
            [self.mlflow_util.experiment_id], max_results=1,
            filter_string=f"tags.`bmoe.sweep` = '{self.tags['bmoe.sweep']}' and tags.trial_name = '{trial}'")
        if found:
            self._trial_runs[trial] = found[0].info.run_id
            client.update_run(found[0].info.run_id, status="RUNNING")
            return
        run = client.create_run(self.mlflow_util.experiment_id, run_name=str(trial), tags={
            **self.tags, "trial_name": str(trial), TRIAL_ID_TAG: trial.trial_id})  # how its worker finds it
        self._trial_runs[trial] = run.info.run_id
        params = {**{k: str(v) for k, v in flatten_dict(trial.config).items()}, **self.settings}
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])

    def log_trial_result(self, iteration: int, trial, result: dict):
        """The trial's own figures in one request. Ray's logger sends each key of a result on
        its own (a SQLite commit each), Tune's bookkeeping (config/*, pid, timestamp) included:
        that was 55-62 % of the driver's time and left the trial slots idle 60 % of a
        thousand-trial sweep (bench/scale_io.py)."""
        import mlflow
        from mlflow.entities import Metric
        from ray.tune.result import AUTO_RESULT_KEYS

        stamp, step = int(time.time() * 1000), int(result.get("training_iteration") or 0)
        metrics = [Metric(k, float(v), stamp, step) for k, v in result.items()
                   if k not in AUTO_RESULT_KEYS and isinstance(v, (int, float)) and np.isfinite(v)]
        if metrics:
            mlflow.MlflowClient(self.tracking_uri).log_batch(self._trial_runs[trial], metrics=metrics)

    def log_trial_end(self, trial, failed: bool = False):
        result = trial.last_result or {}
        if not failed and "points_json" in result:
            import mlflow

            client = mlflow.MlflowClient(self.tracking_uri)
            run_id = self._trial_runs[trial]
            gate_file = result.get("gate_file")
            if gate_file and not result.get("gate_logged"):  # the worker could not reach the store itself
                gate = self.layout.resolve(gate_file)
                with tempfile.TemporaryDirectory(prefix="bmoe-gate-") as tmp:
                    local = Path(tmp) / gate.name
                    local.write_bytes(gate.read_bytes())
                    client.log_artifact(run_id, str(local), GATE_ARTIFACT)
            if gate_file:
                client.set_tag(run_id, "bmoe.gate_file", gate_file)  # how the report finds the run to register
            self._log_points(client, trial, run_id, trial.config["trial"], json.loads(result["points_json"]),
                             float(result.get("C_g") or 0))
        elif not failed and result.get("done"):  # stopped by the scheduler: not a candidate anywhere
            import mlflow

            mlflow.MlflowClient(self.tracking_uri).set_tag(self._trial_runs[trial], "bmoe.stopped_early", "true")
        super().log_trial_end(trial, failed)

    def _log_points(self, client, trial, run_id: str, config: dict, points: list[dict], c_g: float) -> None:
        """One MLflow run per (method, d_t) point with the same keys for every method (see
        point_record): the trial's own run when it has one target (soft, enforce), else a run per
        target nested under the trial's run (static methods, lagrange), made once across resumes.
        All carry the tag bmoe.point = <sweep>, so one search lines the methods up."""
        from mlflow.entities import Metric, Param, RunTag

        sweep = self.tags["bmoe.sweep"]
        experiment = client.get_experiment_by_name(self.experiment_name).experiment_id
        for point in points:
            params, metrics = point_record(config, point, c_g)
            target = run_id
            if len(points) > 1:
                found = client.search_runs(
                    [experiment], filter_string=f"tags.`bmoe.point` = '{sweep}' and tags.trial_name = '{trial}' "
                                                f"and params.d_target = '{params['d_target']}'")
                if found:  # logged before an interruption: not twice
                    continue
                target = client.create_run(experiment, run_name=f"{trial}-d{params['d_target']}", tags={
                    "mlflow.parentRunId": run_id, "trial_name": str(trial), "bmoe.stage": "sweep-point"}).info.run_id
            stamp = int(time.time() * 1000)
            client.log_batch(target, metrics=[Metric(k, v, stamp, 0) for k, v in metrics.items()],
                             params=[Param(k, v) for k, v in params.items()], tags=[RunTag("bmoe.point", sweep)])
            if target != run_id:
                client.set_terminated(target)


def point_record(config: dict, point: dict, c_g: float) -> tuple[dict[str, str], dict[str, float]]:
    """The keys every method's point carries in MLflow: params method, d_target (one string per
    target for every method, so params.d_target = '...' lines them up) and the hyperparameters
    the method has; metrics val_performance, test_performance, d_mean, u_<n>, C_g and the task's
    secondary metrics as test_<name>."""
    params = {"method": config["method"], "d_target": f"{float(point['d_target']):.6g}"}
    params.update({k: str(config[k]) for k in ("lr", "batch_size", "width", "w_bias") if k in config})
    metrics = {"val_performance": point.get("val_performance", float("nan")),
               "val_objective": point.get("val_objective", point.get("val_performance", float("nan"))),
               "test_performance": point["performance"], "d_mean": point["d_mean"], "C_g": c_g,
               **{f"u_{n}": u for n, u in enumerate(point.get("share", []))}}
    skip = {"d_target", "d_mean", "performance", "val_performance", "val_objective", "val_d_mean", "share",
            "assigned_performance", "b"}
    metrics.update({f"test_{k}" if k != "lambda" else k: v for k, v in point.items()
                    if k not in skip and isinstance(v, (int, float))})
    if "served" in point:  # what a deployment of the gate delivers (bmoe.stream)
        metrics.update({"served_performance": point["served"]["performance"], "served_d_mean": point["served"]["d_mean"]})
    return params, {k: float(v) for k, v in metrics.items()}


TRIAL_ID_TAG = "bmoe.trial_id"  # on each trial's MLflow run: its Tune trial id
RUN_LOOKUP_SECONDS = 60.0  # how long a trial's worker looks for the run the driver opens for it


@dataclass(frozen=True)
class GateTracking:
    """Where a trial's worker logs its trained gate: straight to a tracking server's artifact
    store (http(s) URIs), so a thousand gates never pass through the Tune driver. A local store
    (sqlite, a folder) is the driver's own disk: the driver logs the gate there."""

    uri: str
    experiment: str

    @property
    def direct(self) -> bool:
        return self.uri.startswith(("http://", "https://"))

    def log_gate(self, sweep_name: str, trial_id: str, local: Path) -> bool:
        """Log `local` as the gate artifact of the trial's run; False when the run was not found."""
        import mlflow

        client = mlflow.MlflowClient(self.uri)
        experiment = client.get_experiment_by_name(self.experiment)
        deadline = time.monotonic() + RUN_LOOKUP_SECONDS
        while experiment is not None:
            found = client.search_runs([experiment.experiment_id], max_results=1,
                                       filter_string=f"tags.`bmoe.sweep` = '{sweep_name}' and "
                                                     f"tags.`{TRIAL_ID_TAG}` = '{trial_id}'")
            if found:
                client.log_artifact(found[0].info.run_id, str(local), GATE_ARTIFACT)
                return True
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        return False


def _trainable(config: dict, inputs: dict, n_experts: int, layout: RunLayout, sweep_name: str,
               tracking: GateTracking) -> None:
    """Tune function trainable: read the splits (a node-local copy when the root is an object
    store), run the trial, then report its final record. The trained gate and the test
    assignment are written to the run root from the node the trial runs on, and recorded
    relative to the root; the gate goes to the tracking server from here too (GateTracking)."""
    import ray
    from ray import tune

    started = time.perf_counter()
    trial = TrialConfig.from_tune(config["trial"])  # Tune's dict, typed at the edge
    assigned = ray.get_runtime_context().get_assigned_resources()
    torch.set_num_threads(max(1, int(assigned.get("CPU", 1))))  # the CPUs Ray gave this trial
    data = {split: read_split(where, n_experts, full=split != GATE_SPLIT) for split, where in inputs.items()}
    result = run_trial(trial, data)
    final = {"points_json": json.dumps(result["points"]), "C_g": result.get("C_g", 0),
             "assigned_cpu": float(assigned.get("CPU", 0)), "assigned_gpu": float(assigned.get("GPU", 0)),
             "device": str(gate_trial.trial_device())}
    assignment = result.pop("test_assignment", None)
    gate = result.pop("gate", None)
    trial_id = tune.get_context().get_trial_id()
    if gate is not None:  # the trained gate, for serving (serving/loading.py)
        saved = layout.gate_bundle(sweep_name, trial_id)
        with tempfile.TemporaryDirectory(prefix="bmoe-gate-") as tmp:
            local = save_gate(gate, Path(tmp) / saved.name)
            write_bytes(saved, local.read_bytes())
            recorded = digest(local)  # serving checks the file against it (pipelines/integrity.py)
            logged = tracking.direct and tracking.log_gate(sweep_name, trial_id, local)
        final.update({"gate_file": layout.relative(saved), "gate_bytes": recorded["bytes"],
                      "gate_sha256": recorded["sha256"], "gate_logged": float(bool(logged))})
    if assignment is not None:
        final["assignment_file"] = layout.relative(_save_array(assignment, layout.assignment(sweep_name, trial_id)))
    final.update({k: result[k] for k in ("val_performance", "val_objective") if k in result})
    if len(result["points"]) == 1:  # one target: its figures as plain metrics for MLflow
        point = result["points"][0]
        final.update({"test_performance": point["performance"], "d_mean": point["d_mean"],
                      **{f"u_{n}": u for n, u in enumerate(point["share"])}})
    else:
        final["mean_test_performance"] = float(np.mean([p["performance"] for p in result["points"]]))
    final["trial_seconds"] = time.perf_counter() - started  # the trial's own work (bench/scale.py's overhead)
    tune.report(final)


def _save_array(array: np.ndarray, path: AnyPath) -> AnyPath:
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_bytes(path, buffer.getvalue())
    return path


def load_array(path: AnyPath) -> np.ndarray:
    return np.load(io.BytesIO(path.read_bytes()))


def with_methods(grid: SweepGrid, methods: str | None) -> SweepGrid:
    """The grid restricted to a comma-separated list of methods (CLI)."""
    if not methods:
        return grid
    chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    return replace(grid, methods=chosen)
