"""A sweep's MLflow record: the parent run, one run per trial (opened once, found again on
resume), one run per (method, d_t) point with the same keys for every method, and the trained
gates as artifacts, logged from the trial's worker when the store is a tracking server.

Ray's MLflowLoggerCallback sends every key of every result in its own request; at a thousand
trials that was most of the Tune driver's time (bench/scale_io.py), so this logger batches.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from ray.air.integrations.mlflow import MLflowLoggerCallback

from pipelines.grid import SweepGrid
from pipelines.layout import RunLayout
from pipelines.points import Point
from pipelines.registry import GATE_ARTIFACT
from pipelines.runtime import RunConfig

TRIAL_ID_TAG = "bmoe.trial_id"  # on each trial's MLflow run: its Tune trial id
RUN_LOOKUP_SECONDS = 60.0  # how long a trial's worker looks for the run the driver opens for it


def parent_run(name: str, experiment_id: str, grid: SweepGrid, cfg: RunConfig) -> str:
    """The sweep's parent MLflow run, reused when the sweep resumes."""
    import mlflow

    found = mlflow.search_runs([experiment_id], filter_string=f"tags.`bmoe.sweep_parent` = '{name}'",
                               output_format="list")
    if found:
        return found[0].info.run_id
    with mlflow.start_run(run_name=name, tags={"bmoe.sweep_parent": name, "bmoe.stage": "sweep"}) as run:
        mlflow.log_params({**{f"grid.{k}": str(v) for k, v in asdict(grid).items()}, **cfg.as_params()})
        return run.info.run_id


def close_orphaned_runs(experiment_id: str, name: str) -> None:
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


def close_lost_trials(experiment_id: str, name: str, kept: set[str]) -> None:
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


class SweepLogger(MLflowLoggerCallback):
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
        Point.mlflow): the trial's own run when it has one target (soft, enforce), else a run per
        target nested under the trial's run (static methods, lagrange), made once across resumes.
        All carry the tag bmoe.point = <sweep>, so one search lines the methods up."""
        from mlflow.entities import Metric, Param, RunTag

        sweep = self.tags["bmoe.sweep"]
        experiment = client.get_experiment_by_name(self.experiment_name).experiment_id
        for point in points:
            params, metrics = Point.from_dict(point).mlflow(config, c_g)
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
