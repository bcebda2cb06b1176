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

The search space is pipelines/grid.py; the MLflow record pipelines/tracking.py; this module runs
the trials (Tune, the trainable, the splits each trial reads).
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from pipelines import gate_trial
from pipelines.gate_trial import SplitData, run_trial, save_gate
from pipelines.grid import GRIDS, SweepGrid, grid_identity, search_points, trial_configs, with_gate_steps
from pipelines.integrity import cache_damage, digest, shard_damage
from pipelines.layout import RunLayout, plain_name
from pipelines.methods import TrialConfig
from pipelines.manifest import require_manifest, shard_files
from pipelines.resources import require, trial_demand
from pipelines.runtime import RunConfig, UserError, ensure_mlflow, ensure_ray
from pipelines.search import PerPointASHA, PointSearch, PointSearchGenerator
from pipelines.split_cache import DamagedDownload, node_local, node_local_files
from pipelines.tracking import GateTracking, SweepLogger, close_lost_trials, close_orphaned_runs, parent_run
from storage import AnyPath, read_json, write_bytes, write_json
from tasks import GATE_SPLIT, SCORED_SPLITS

MAX_TRIAL_FAILURES = 2  # a trial whose worker or node dies is restarted this many times


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
    cache_key = _intact_inputs(cfg, manifest)
    key = hashlib.sha256(json.dumps({"grid": grid_identity(grid), "cache": cache_key, "data": manifest["fingerprint"]},
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
    parent = parent_run(name, experiment_id, grid, cfg)
    for split in SCORED_SPLITS:
        if not layout.cache(split).exists():
            raise UserError(f"no expert cache for task {cfg.task_name} under {cfg.root}: run `bmoe cache` first")
    started = time.perf_counter()
    tuner, resuming = _tuner(cfg, grid, configs, manifest, name, parent, experiment_id, planned)
    results = tuner.fit()
    records = _records(name, results)
    if resuming:
        close_lost_trials(experiment_id, name, {result.metrics.get("trial_id") for result in results})
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


def _tuner(cfg: RunConfig, grid: SweepGrid, configs: list, manifest: dict, name: str, parent: str,
           experiment_id: str, planned: int):
    """(Tune's tuner of the sweep, whether it resumes): a fresh one over the grid, or the one
    Tune left at the experiment's path, restored."""
    from ray import tune

    layout = cfg.layout
    n_experts = len(cfg.task().data_costs())
    # Trials read their splits themselves, streamed from the root on their own node: only paths travel.
    inputs = split_inputs(layout, manifest)
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, inputs=inputs, n_experts=n_experts, layout=layout, sweep_name=name,
                             tracking=GateTracking(cfg.mlflow_uri, f"bmoe-{cfg.task_name}")),
        grid.trial_resources())
    path = layout.tune_experiment(name)
    resuming = tune.Tuner.can_restore(path)
    callbacks = [SweepLogger(layout, cfg.as_params(), tracking_uri=cfg.mlflow_uri,
                                        experiment_name=f"bmoe-{cfg.task_name}",
                                        tags={"mlflow.parentRunId": parent, "bmoe.sweep": name})]
    run_config = tune.RunConfig(name=name, storage_path=layout.tune_storage(), callbacks=callbacks, verbose=1,
                                failure_config=tune.FailureConfig(max_failures=MAX_TRIAL_FAILURES))
    if resuming:
        print(f"sweep: resuming {name} from {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        close_orphaned_runs(experiment_id, name)
        param_space, tune_config, trials = _tune_config(grid, configs)
        how = "grid" if grid.search == "grid" else f"{grid.search} search, {grid.num_samples} per point"
        print(f"sweep: {name}: {trials} trials ({', '.join(grid.methods)}; {planned} points; {how}"
              f"{'; ASHA' if grid.scheduler == 'asha' else ''}), each with {grid.trial_resources()}, "
              f"MLflow parent run {parent}")
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    return tuner, resuming


def _records(name: str, results) -> list[dict]:
    """The sweep record's trials from Tune's results: each finished trial's points (their JSON
    form) and files, each trial ASHA stopped early; UserError for a damaged split a trial found,
    or an interrupted sweep."""
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
    return records


def _intact_inputs(cfg: RunConfig, manifest: dict) -> dict:
    """What the cache was made from (its stamp without the file digests), once the cache and the
    gate shards the trials read are checked; UserError naming what is damaged or missing."""
    layout = cfg.layout
    stamp = read_json(layout.cache_stamp())
    # On an object store each trial's node checks every file's SHA-256 as it fetches it, once
    # (pipelines/split_cache.py): here sizes only, or the driver would read every split once more.
    content = not layout.is_remote
    if stamp is not None and (damaged := cache_damage(layout, stamp, content)):
        raise UserError(f"sweep: {damaged[0]}: run `bmoe cache` to make it again")
    if damaged := shard_damage(layout, manifest, TRIAL_SPLITS, ("gate",), content):  # the gates' inputs
        raise UserError(f"sweep: {damaged[0]} ({len(damaged)} shard file(s) damaged): run `bmoe prepare` to make "
                        f"them again")
    cache_key = {k: v for k, v in (stamp or {}).items() if k != "files"}
    if not cache_key:
        raise UserError(f"no expert cache for task {cfg.task_name} under {cfg.root}: run `bmoe cache` first")
    return cache_key


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
    final = {"points_json": json.dumps([p.as_dict() for p in result.points]), "C_g": result.C_g,
             "assigned_cpu": float(assigned.get("CPU", 0)), "assigned_gpu": float(assigned.get("GPU", 0)),
             "device": str(gate_trial.trial_device())}
    assignment, gate = result.test_assignment, result.gate
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
    final["val_objective"] = result.val_objective
    if result.val_performance is not None:
        final["val_performance"] = result.val_performance
    if len(result.points) == 1:  # one target: its figures as plain metrics for MLflow
        (point,) = result.points
        final.update({"test_performance": point.performance, "d_mean": point.d_mean,
                      **{f"u_{n}": u for n, u in enumerate(point.share)}})
    else:
        final["mean_test_performance"] = float(np.mean([p.performance for p in result.points]))
    final["trial_seconds"] = time.perf_counter() - started  # the trial's own work (bench/scale.py's overhead)
    tune.report(final)


def _save_array(array: np.ndarray, path: AnyPath) -> AnyPath:
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_bytes(path, buffer.getvalue())
    return path


def load_array(path: AnyPath) -> np.ndarray:
    return np.load(io.BytesIO(path.read_bytes()))


