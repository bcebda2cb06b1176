"""`bmoe compare`: the MLflow experiment comparison in one command.

side_by_side: every method at every target of a sweep from its point runs (the keys every method
shares in MLflow), with the routing efficiency (p - p_random) / (p_oracle - p_random) per target
and over rho; as a table or CSV.

For every sweep (parent run) in a task's experiment and every method, its rho (once `bmoe report`
has logged it) and its best trial: for gates trained per target, the trial with the best
validation performance at each target (as the report picks them), with its d_mean and test
performance; the static methods and lagrange cover all targets in one trial (their figures: the
mean over its targets). Both read the same point runs, as pipelines.points.Point. It reads MLflow
only, so it works the same against the local sqlite file and a shared `mlflow server`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from bmoe.curves import routing_efficiency
from pipelines.methods import BOUNDS, NAMES, PER_TARGET_GATES
from pipelines.points import Point
from pipelines.runtime import RunConfig, UserError, ensure_mlflow
from pipelines.selection import best_on_validation, validation_figure


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
    client, experiment_id, parents = _sweep_parents(cfg, sweeps)
    rows: list[BestTrial] = []
    for parent in parents:
        groups: dict[tuple[str, float | None], dict[str, list[Point]]] = {}
        for method, trial, point in _points(client, experiment_id, parent):
            key = (method, point.d_target if method in PER_TARGET_GATES else None)  # else: a trial covers every d_t
            groups.setdefault(key, {}).setdefault(trial, []).append(point)
        if d_target is not None:
            groups = {key: trials for key, trials in groups.items()
                      if key[1] is None or key[1] == min((t for m, t in groups if m == key[0]),
                                                         key=lambda t: abs(t - d_target))}
        sweep_rows = [_best(parent, method, d_t, trials) for (method, d_t), trials in groups.items()]
        rows += sorted(sweep_rows, key=lambda r: (-(r.rho if r.rho is not None else float("-inf")), r.method,
                                                  r.d_target or 0.0))
    return rows


def _sweep_parents(cfg: RunConfig, sweeps: list[str] | None):
    """(client, experiment id, the sweeps' parent runs, newest first); UserError when none."""
    import mlflow

    experiment_id = ensure_mlflow(cfg)
    client = mlflow.MlflowClient()
    parents = client.search_runs([experiment_id], filter_string="tags.`bmoe.stage` = 'sweep'",
                                 order_by=["attributes.start_time DESC"], max_results=1000)
    if sweeps:
        parents = [p for p in parents if p.info.run_name in sweeps]
    if not parents:
        raise UserError(f"no sweeps of task {cfg.task_name} in MLflow at {cfg.mlflow_uri}: run `bmoe sweep` first")
    return client, experiment_id, parents


def _points(client, experiment_id: str, parent) -> list[tuple[str, str, Point]]:
    """(method, trial, point) of every point run of the sweep (tag bmoe.point, Point.mlflow's
    keys); ASHA's losers are no candidates."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`bmoe.point` = '{parent.info.run_name}'",
                              max_results=50000)
    return [(r.data.params["method"], r.data.tags.get("trial_name", r.info.run_name),
             Point.from_mlflow(r.data.params, r.data.metrics))
            for r in runs if r.data.tags.get("bmoe.stopped_early") != "true"]


def _best(parent, method: str, d_t: float | None, trials: dict[str, list[Point]]) -> BestTrial:
    """The trial best on validation (a trial of every target: over its points' mean)."""
    def mean(values) -> float | None:
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    (trial,) = best_on_validation(trials, key=lambda trial: method,
                                  val=lambda trial: mean(validation_figure(vars(p)) for p in trials[trial])).values()
    points = trials[trial]
    return BestTrial(
        sweep=parent.info.run_name,
        method=method,
        rho=parent.data.metrics.get(f"rho_{method}"),
        trial=trial,
        trials=len(trials),
        d_target=d_t,
        d_mean=mean(p.d_mean for p in points),
        val_performance=mean(p.val_performance for p in points),
        test_performance=mean(p.performance for p in points),
        hyperparameters=points[0].hyperparameters or {},
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


@dataclass
class TargetPoint:
    """One method at one target of one sweep: the point MLflow holds (best on validation when
    the sweep trained several), beside the sweep's rho for the method."""

    sweep: str
    d_target: float
    method: str
    test_performance: float
    val_performance: float | None
    d_mean: float
    routing_efficiency: float | None  # (p - p_random) / (p_oracle - p_random) at this target
    rho: float | None
    rho_efficiency: float | None  # the same over rho: how much of the oracle's gain over random


def side_by_side(cfg: RunConfig, sweeps: list[str] | None = None) -> list[TargetPoint]:
    """Every method at every target of each sweep, from the sweep's point runs in MLflow (tag
    bmoe.point; the keys every method shares), with the gap to the oracle as routing efficiency."""
    client, experiment_id, parents = _sweep_parents(cfg, sweeps)
    out: list[TargetPoint] = []
    for parent in parents:
        name = parent.info.run_name
        best = {key: point for key, (_, point) in best_on_validation(
            ((method, point) for method, _, point in _points(client, experiment_id, parent)),
            key=lambda mp: (mp[0], mp[1].d_target), val=lambda mp: validation_figure(vars(mp[1]))).items()}
        rho = {m: parent.data.metrics.get(f"rho_{m}") for m, _ in best}
        for (method, d_t), point in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            ref = {m: best[(m, d_t)].performance for m in BOUNDS if (m, d_t) in best}
            out.append(TargetPoint(sweep=name, d_target=d_t, method=method, test_performance=point.performance,
                                   val_performance=point.val_performance, d_mean=point.d_mean,
                                   routing_efficiency=routing_efficiency(point.performance,
                                                                         *(ref.get(m) for m in BOUNDS)),
                                   rho=rho.get(method),
                                   rho_efficiency=routing_efficiency(rho.get(method), *(rho.get(m) for m in BOUNDS))))
    return out


def format_side_by_side(points: list[TargetPoint]) -> str:
    """Per sweep: one row per target, one column per method (test performance and, in brackets,
    routing efficiency), then rho and rho's efficiency."""
    lines = []
    for sweep in dict.fromkeys(p.sweep for p in points):
        mine = [p for p in points if p.sweep == sweep]
        methods = list(dict.fromkeys(sorted((p.method for p in mine), key=_method_order)))
        cell = {(p.method, p.d_target): p for p in mine}
        width = 17
        lines += ["", f"sweep {sweep}: test performance (routing efficiency) per target",
                  f"  {'d_t kB':>8}" + "".join(f"{m:>{width}}" for m in methods)]
        for d_t in sorted({p.d_target for p in mine}):
            row = ""
            for m in methods:
                p = cell.get((m, d_t))
                eff = "" if p is None or p.routing_efficiency is None else f" ({p.routing_efficiency:.2f})"
                row += f"{'—' if p is None else f'{p.test_performance:.3f}{eff}':>{width}}"
            lines.append(f"  {d_t / 1000:>8.2f}" + row)
        first: dict[str, TargetPoint] = {}
        for p in mine:  # a method's rho is on each of its points: its first one
            first.setdefault(p.method, p)
        lines.append(f"  {'rho':>8}" + "".join(f"{_num(first[m].rho):>{width}}" for m in methods))
        lines.append(f"  {'rho eff':>8}" + "".join(f"{_num(first[m].rho_efficiency, 2):>{width}}" for m in methods))
    lines += ["", "routing efficiency: (p - p_random) / (p_oracle - p_random); rho: eq. 11 (— until `bmoe report`)."]
    return "\n".join(lines)


def as_csv(points: list[TargetPoint]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    fields = list(TargetPoint.__dataclass_fields__)
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for p in points:
        writer.writerow({k: "" if v is None else v for k, v in asdict(p).items()})
    return buffer.getvalue()


def _num(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _method_order(method: str) -> int:
    order = NAMES
    return order.index(method) if method in order else len(order)


@dataclass
class RegisteredVersion:
    """One version of the task's registered gate or experts (pipelines/registry.py)."""

    model: str
    version: int
    aliases: list[str]
    method: str | None
    d_target: str | None
    source_run: str


def registered(cfg: RunConfig) -> list[RegisteredVersion]:
    """Every version of bmoe-<task>-gate and bmoe-<task>-expert-<n> in the registry, newest first."""
    import mlflow

    from pipelines.registry import expert_model, gate_model

    ensure_mlflow(cfg)
    client = mlflow.MlflowClient()
    names = [gate_model(cfg.task_name)] + [expert_model(cfg.task_name, n) for n in range(len(cfg.task().expert_names()))]
    out = []
    for name in names:
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            continue
        aliases: dict[int, list[str]] = {}  # searches return versions without their aliases
        for alias, number in client.get_registered_model(name).aliases.items():
            aliases.setdefault(int(number), []).append(alias)
        for v in sorted(versions, key=lambda v: -int(v.version)):
            out.append(RegisteredVersion(model=name, version=int(v.version),
                                         aliases=sorted(aliases.get(int(v.version), [])), method=v.tags.get("method"),
                                         d_target=v.tags.get("d_target"), source_run=v.run_id))
    return out


def format_registered(versions: list[RegisteredVersion]) -> str:
    """The registry, one line per version with its aliases (what `bmoe serve --gate` takes)."""
    if not versions:
        return "\nregistry: nothing registered for this task yet (`bmoe train-experts`, `bmoe report` register)"
    lines = ["", "registry (serve with --gate / --expert-uri models:/NAME@ALIAS or models:/NAME/VERSION):",
             f"  {'model':<26}{'version':>8}  {'method':<9}{'d_t':>9}  aliases"]
    for v in versions:
        lines.append(f"  {v.model:<26}{v.version:>8}  {v.method or '':<9}{v.d_target or '':>9}  {', '.join(v.aliases)}")
    return "\n".join(lines)
