"""`bmoe compare`: the MLflow experiment comparison in one command.

For every sweep (parent run) in a task's experiment and every method, its rho (once `bmoe report`
has logged it) and its best trial: for gates trained per target, the trial with the best
validation performance at each target (as the report picks them), with its d_mean and test
performance; the static methods cover all targets in one trial. It reads MLflow
only, so it works the same against the local sqlite file and a shared `mlflow server`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from pipelines.runtime import RunConfig, UserError, ensure_mlflow

HYPERPARAMETERS = ("w_bias", "batch_size", "lr", "width")


@dataclass
class BestTrial:
    sweep: str
    method: str
    rho: float | None  # None until `bmoe report` ran for the sweep
    trial: str
    trials: int  # trials of this method (at this target) in the sweep
    d_target: float | None
    d_mean: float | None
    val_performance: float | None
    test_performance: float | None
    hyperparameters: dict


def compare(cfg: RunConfig, sweeps: list[str] | None = None, d_target: float | None = None) -> list[BestTrial]:
    """The best trial per method (and target) and sweep of the task's experiment, best rho first
    per sweep; `d_target` keeps only each trained method's target nearest to it."""
    import mlflow

    experiment_id = ensure_mlflow(cfg)
    client = mlflow.MlflowClient()
    parents = client.search_runs([experiment_id], filter_string="tags.`bmoe.stage` = 'sweep'",
                                 order_by=["attributes.start_time DESC"], max_results=1000)
    if sweeps:
        parents = [p for p in parents if p.info.run_name in sweeps]
    if not parents:
        raise UserError(f"no sweeps of task {cfg.task} in MLflow at {cfg.mlflow_uri}: run `bmoe sweep` first")
    rows: list[BestTrial] = []
    for parent in parents:
        children = client.search_runs([experiment_id], max_results=5000,
                                      filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        groups: dict[tuple[str, float | None], list] = {}
        for child in children:
            method = child.data.params.get("trial/method")
            if method:
                groups.setdefault((method, _target(child)), []).append(child)
        if d_target is not None:
            groups = {key: runs for key, runs in groups.items()
                      if key[1] is None or key[1] == min((t for m, t in groups if m == key[0]),
                                                         key=lambda t: abs(t - d_target))}
        sweep_rows = [_best(parent, method, runs) for (method, _), runs in groups.items()]
        rows += sorted(sweep_rows, key=lambda r: (-(r.rho if r.rho is not None else float("-inf")), r.method,
                                                  r.d_target or 0.0))
    return rows


def _target(run) -> float | None:
    value = run.data.params.get("trial/d_target")
    return None if value in (None, "None") else float(value)


def _best(parent, method: str, runs: list) -> BestTrial:
    def val(run) -> float:
        return run.data.metrics.get("val_performance", float("-inf"))

    best = max(runs, key=val)
    m, p = best.data.metrics, best.data.params
    return BestTrial(
        sweep=parent.info.run_name,
        method=method,
        rho=parent.data.metrics.get(f"rho_{method}"),
        trial=best.info.run_name,
        trials=len(runs),
        d_target=_target(best),
        d_mean=m.get("d_mean"),
        val_performance=m.get("val_performance"),
        test_performance=m.get("test_performance", m.get("mean_test_performance")),
        hyperparameters={k: p[f"trial/{k}"] for k in HYPERPARAMETERS if f"trial/{k}" in p},
    )


def format_table(rows: list[BestTrial]) -> str:
    """Plain text, one block per sweep (static methods cover every target: no single d_t)."""
    def num(x, scale=1.0, digits=3):
        return "—" if x is None else f"{x / scale:.{digits}f}"

    header = f"  {'method':<10}{'rho':>9}{'d_t kB':>9}{'d̄ kB':>9}{'val':>9}{'test':>9}  trial (of n)  hyperparameters"
    lines, current = [], None
    for r in rows:
        if r.sweep != current:
            current = r.sweep
            lines += ["", f"sweep {r.sweep}:", header]
        hp = ", ".join(f"{k}={v}" for k, v in r.hyperparameters.items())
        lines.append(f"  {r.method:<10}{num(r.rho):>9}{num(r.d_target, 1000, 2):>9}{num(r.d_mean, 1000, 2):>9}"
                     f"{num(r.val_performance):>9}{num(r.test_performance):>9}  {r.trial} ({r.trials})  {hp}")
    lines += ["", "rho: eq. 11 (— until `bmoe report` ran for the sweep). Trained methods: per target, the trial "
              "with the best validation performance; static methods: test performance averaged over targets."]
    return "\n".join(lines)


def as_json(rows: list[BestTrial]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)
