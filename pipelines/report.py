"""Stage 5, report: the paper's tables and figures for one task, from its latest sweep.

Writes reports/<task>/summary.json, report.md and PNG plots under the root, and logs them to
the sweep's parent MLflow run. For trained methods, each target's trial is the one with the best
validation performance (cross-validation of w_bias, M, lr, width); its test figures are shown.
A report already made from the same sweep record is kept.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from bmoe.curves import rho, routing_efficiency
from pipelines.gate_trial import expert_performance
from pipelines.methods import ALL_TARGET_GATES, BOUNDS, HYPERPARAMETERS, NAMES, PER_TARGET_GATES
from pipelines.manifest import require_manifest
from pipelines.points import Point
from pipelines.runtime import RunConfig, UserError, ensure_mlflow
from pipelines.selection import best_on_validation, validation_figure
from pipelines.sweep import load_array, load_split
from storage import AnyPath, as_path, read_json, upload_tree

ORDER = NAMES


def report(cfg: RunConfig, sweep_file: str | None = None) -> AnyPath:
    """Write the task's report; returns summary.json's path."""
    layout = cfg.layout
    require_manifest(cfg, "report")  # the root's settings, not another profile's or seed's
    sweep = _load_sweep(cfg, sweep_file)
    made_from = hashlib.sha256(json.dumps(sweep, sort_keys=True).encode()).hexdigest()
    existing = read_json(layout.reports() / "summary.json")
    if existing is not None and existing.get("made_from") == made_from:
        print(f"report: {layout.reports() / 'report.md'} is up to date with sweep {sweep['name']}: kept")
        return layout.reports() / "summary.json"
    with tempfile.TemporaryDirectory(prefix="bmoe-report-") as tmp:
        summary = _write_report(cfg, sweep, Path(tmp))
        summary["registered"] = _register_gates(cfg, sweep)
        summary_path = Path(tmp) / "summary.json"
        summary_path.write_text(json.dumps({**summary, "made_from": made_from}, indent=2))
        _log_to_mlflow(cfg, sweep, summary, Path(tmp))
        upload_tree(Path(tmp), layout.reports())
    print(f"report: {layout.reports() / 'report.md'}")
    for method, info in summary["methods"].items():
        eff = info.get("efficiency")
        print(f"  rho {method:<10} {info['rho']:.4f}" + ("" if eff is None else f"  efficiency {eff:+.2f}"))
    best = sorted((a for a in summary["registered"] if a.startswith("best-d")), key=lambda a: int(a[len("best-d"):]))
    if best:
        print(f"  registered the best gate per method and target as {len(summary['registered'])} aliases of "
              f"bmoe-{cfg.task_name}-gate (best-d<bytes>, best-<method>-d<bytes>, best-lagrange); e.g. "
              f"bmoe serve --gate {summary['registered'][best[len(best) // 2]]}")
    return layout.reports() / "summary.json"


def _write_report(cfg: RunConfig, sweep: dict, out: Path) -> dict:
    """summary (returned), report.md and the figures, into the local folder `out`."""
    import matplotlib

    matplotlib.use("Agg")
    task = cfg.task()
    d = task.data_costs()
    d_min, d_max = float(d.min()), float(d.max())
    test = load_split(cfg, task, "test")
    p_test = expert_performance(task, test)

    curves, chosen = _curves(sweep["trials"])
    cheapest = (float(d.min()), float(p_test[int(np.argmin(d))]))
    methods = {}
    for method in sorted(curves, key=lambda m: ORDER.index(m) if m in ORDER else len(ORDER)):
        points = sorted(curves[method], key=lambda p: p.d_target)
        methods[method] = {"rho": curve_rho(points, cheapest, d_max), "points": [p.as_dict() for p in points]}
    bounds = [methods.get(m, {}).get("rho") for m in BOUNDS]
    for info in methods.values():  # how much of the oracle's gain over random selection each method gets
        info["efficiency"] = routing_efficiency(info["rho"], *bounds)
    c_g = max((t.get("C_g") or 0) for t in sweep["trials"])
    summary = {
        "task": task.name,
        "metric": task.metric_name,
        "profile": cfg.profile,
        "sweep": sweep["name"],
        "d_min": d_min,
        "d_max": d_max,
        "data_costs": [float(x) for x in d],
        "experts": task.expert_names(),
        "expert_performance": [float(x) for x in p_test],
        "C_g": int(c_g),
        "methods": methods,
    }
    figures = [_plot_curves(summary, out / "performance_vs_cost.png")]
    enforce = chosen.get("enforce", {})
    if enforce:
        # the picture at d_max/2 (or the nearest target), where the gate's choice is most mixed
        d_t = min(enforce, key=lambda t: abs(t - d_max / 2))
        assignment_file = enforce[d_t].get("assignment_file")
        assignment = cfg.layout.resolve(assignment_file) if assignment_file else None
        if assignment is not None and assignment.exists():
            drawn = task.draw_assignment(test, load_array(assignment), out / "assignment.png")
            figures += [drawn] if drawn is not None else []
    (out / "report.md").write_text(_markdown(summary, figures))
    return summary


def _log_to_mlflow(cfg: RunConfig, sweep: dict, summary: dict, out: Path) -> None:
    """rho per method as metrics of the sweep's parent run, the report's files as its artifacts."""
    import mlflow

    ensure_mlflow(cfg)
    with mlflow.start_run(run_id=sweep["mlflow_parent_run"]):
        for method, info in summary["methods"].items():
            mlflow.log_metric(f"rho_{method}", info["rho"])
            if info.get("efficiency") is not None:
                mlflow.log_metric(f"efficiency_{method}", info["efficiency"])
        mlflow.log_artifacts(str(out), artifact_path="report")
    mlflow.MlflowClient().set_terminated(sweep["mlflow_parent_run"])


def _register_gates(cfg: RunConfig, sweep: dict) -> dict[str, str]:
    """Register the best servable gate on validation per method and target as versions of
    bmoe-<task>-gate with aliases best-<method>-d<target> (best-lagrange: one gate for every
    target) and best-d<target> (the best of them at that target); returns {alias: models:/ URI}.
    Sweeps whose trial runs carry no bmoe.gate_file tag (older ones) register nothing."""
    import mlflow

    from pipelines.registry import GATE_ARTIFACT, gate_alias, gate_model, register

    _, chosen = _curves(sweep["trials"])
    candidates = [(method, d_t, trial, validation_figure(trial)) for method, by_target in chosen.items()
                  for d_t, trial in by_target.items()]
    every_target = best_on_validation([t for t in sweep["trials"] if t["config"]["method"] in ALL_TARGET_GATES
                                       and t["points"]], key=lambda t: t["config"]["method"], val=validation_figure)
    for method, trial in every_target.items():  # one gate for every target: a candidate at each
        candidates += [(method, p["d_target"], trial, validation_figure(p)) for p in trial["points"]]
    ensure_mlflow(cfg)
    runs = {r.data.tags["bmoe.gate_file"]: r.info.run_id for r in mlflow.search_runs(
        [sweep["experiment_id"]], filter_string=f"tags.`bmoe.sweep` = '{sweep['name']}'", output_format="list")
        if r.data.tags.get("bmoe.gate_file")}
    candidates = [c for c in candidates if c[2].get("gate_file") in runs]
    best_at = best_on_validation(candidates, key=lambda c: c[1], val=lambda c: c[3])
    client, name, registered = mlflow.MlflowClient(), gate_model(cfg.task_name), {}
    for candidate in candidates:
        method, d_t, trial, figure = candidate
        for_all = method in ALL_TARGET_GATES
        aliases = [gate_alias(None if for_all else d_t, method)]
        aliases += [gate_alias(d_t)] if best_at[d_t] is candidate else []
        tags = {"method": method, "d_target": "all" if for_all else f"{d_t:.6g}",
                "sweep": sweep["name"], "val_objective": f"{figure:.6g}" if figure is not None else "",
                "gate_file": trial["gate_file"]}  # bmoe replay finds the gate's trial from it
        register(client, name, runs[trial["gate_file"]], GATE_ARTIFACT, tags, tuple(aliases))
        registered.update({alias: f"models:/{name}@{alias}" for alias in aliases})
    return registered


def curve_rho(points: list[Point], cheapest: tuple[float, float], d_max: float) -> float:
    """rho (eq. 11) over the data cost actually spent, d_mean.

    A method that never spends as little as d_min (soft regularisation often does not) is
    anchored at the cheapest expert's (d_min, performance): mixing that expert with the
    method's cheapest operating point achieves the line between them, and nothing better is
    known below it. To the right of its dearest point the curve is held flat (spending more
    is allowed, not required).
    """
    costs = [p.d_mean for p in points]
    perfs = [p.performance for p in points]
    d_min = cheapest[0]
    if min(costs) > d_min * (1 + 1e-9):
        costs, perfs = [d_min, *costs], [cheapest[1], *perfs]
    return rho(costs, perfs, d_min, d_max)


def _load_sweep(cfg: RunConfig, sweep_file: str | None) -> dict:
    if sweep_file is None:
        latest = read_json(cfg.layout.latest_sweep())
        if latest is None:
            raise UserError(f"no sweep of task {cfg.task_name} under {cfg.root}: run `bmoe sweep` first")
        path = cfg.layout.resolve(latest["file"])
    else:
        path = as_path(sweep_file)
    sweep = read_json(path)
    if sweep is None:
        raise UserError(f"sweep results {path} not found")
    return sweep


def _curves(trials: list[dict]) -> tuple[dict[str, list[Point]], dict[str, dict[float, dict]]]:
    """Points per method; for trained methods the best-on-validation trial per target (the
    sweep record's trials, whose points are in their JSON form)."""
    curves: dict[str, list[Point]] = {}
    chosen: dict[str, dict[float, dict]] = {}
    trained = [t for t in trials if t["config"]["method"] in PER_TARGET_GATES and t["points"]]  # not stopped early
    best = best_on_validation(trained, key=lambda t: (t["config"]["method"], t["config"]["d_target"]),
                              val=validation_figure)
    for (method, d_t), trial in best.items():
        chosen.setdefault(method, {})[d_t] = trial
    others = [t for t in trials if t["config"]["method"] not in PER_TARGET_GATES and t["points"]]
    for method, trial in best_on_validation(others, key=lambda t: t["config"]["method"], val=validation_figure).items():
        curves[method] = [Point.from_dict(p) for p in trial["points"]]  # static; lagrange's best when searched
    for method, by_target in chosen.items():
        curves[method] = [replace(Point.from_dict(t["points"][0]),
                                  hyperparameters={k: t["config"][k] for k in HYPERPARAMETERS if k in t["config"]})
                          for t in by_target.values()]
    return curves, chosen


def _points(info: dict) -> list[Point]:
    """A method's points in the summary, as Points."""
    return [Point.from_dict(p) for p in info["points"]]


def _at(info: dict, d_t: float) -> Point | None:
    return next((p for p in _points(info) if abs(p.d_target - d_t) <= 1e-6 * max(1.0, d_t)), None)


def _markdown(summary: dict, figures: list[Path]) -> str:
    d_max = summary["d_max"]
    columns = [("d_max", d_max), ("d_max/2", d_max / 2), ("d_max/3", d_max / 3)]
    costs = ", ".join(f"{c / 1000:.2f}" for c in summary["data_costs"])
    lines = [
        f"# BMoE report: {summary['task']} ({summary['profile']} profile, sweep {summary['sweep']})",
        "",
        f"Metric: {summary['metric']}. Experts: {', '.join(summary['experts'])}; data costs d_n = {{{costs}}} kB;"
        f" gate C_g = {summary['C_g']:,} multiply-adds per input.",
        "",
        "## Performance at data-cost targets and rho (our Table I / V / VIII)",
        "",
        "| method | " + " | ".join(f"{name} ({v / 1000:.2f} kB)" for name, v in columns) + " | rho | efficiency |",
        "|---|" + "---|" * (len(columns) + 2),
    ]
    for method, info in summary["methods"].items():
        cells = []
        for _, v in columns:
            p = _at(info, v)
            cells.append(f"{p.performance:.3f} (d̄ {p.d_mean / 1000:.2f})" if p else "—")
        eff = info.get("efficiency")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {info['rho']:.3f} | "
                     + ("—" if eff is None else f"{eff:.2f}") + " |")
    extra = sorted({k for info in summary["methods"].values() for p in _points(info) for k in p.secondary})
    lines += ["", "d̄ is the mean data cost actually spent on the test set (kB); rho is eq. 11 over d̄; efficiency "
              "is (rho - rho_random) / (rho_oracle - rho_random), the share of the oracle's gain over random "
              "selection a method achieves."]
    if extra:  # the task's secondary metrics, e.g. RGB PSNR beside Y PSNR
        lines += ["", "Secondary metrics: " + ", ".join(extra) + " at " + ", ".join(n for n, _ in columns) + ":", "",
                  "| method | " + " | ".join(f"{k} @ {n}" for k in extra for n, _ in columns) + " |",
                  "|---|" + "---|" * (len(extra) * len(columns))]
        for method, info in summary["methods"].items():
            cells = [f"{p.secondary[k]:.3f}" if (p := _at(info, v)) and k in p.secondary else "—"
                     for k in extra for _, v in columns]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += _served_table(summary, columns)
    lines += [
        "",
        "## Each expert on the inputs the gate gave it (our Table II / VI / IX)",
        "",
        "Baseline: each expert over all test inputs: "
        + ", ".join(f"E{n + 1} {p:.3f}" for n, p in enumerate(summary["expert_performance"])) + ".",
        "",
    ]
    n_experts = len(summary["experts"])
    for method in PER_TARGET_GATES:
        info = summary["methods"].get(method)
        if not info:
            continue
        lines += [f"**{method}**", "", "| d_t (kB) | b | " + " | ".join(f"E{n + 1}" for n in range(n_experts))
                  + " | BMoE |", "|---|---|" + "---|" * (n_experts + 1)]
        for p in _points(info):
            cells = []
            for n in range(n_experts):
                value = p.assigned_performance[n]
                cells.append("—" if value is None else
                             f"{value:.3f} ({value - summary['expert_performance'][n]:+.3f})")
            b = "[" + ", ".join(f"{max(x, 0.0):.2f}" for x in p.b or ()) + "]"
            lines.append(f"| {p.d_target / 1000:.2f} | {b} | " + " | ".join(cells) + f" | {p.performance:.3f} |")
        lines.append("")
    lines += ["## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures] + [""]
    return "\n".join(lines)


def _served_table(summary: dict, columns: list[tuple[str, float]]) -> list[str]:
    """The servable methods as a deployment delivers them (bmoe.stream): what `bmoe replay`
    compares an endpoint with, beside the batch rows above."""
    rows = []
    for method, info in summary["methods"].items():
        cells = []
        for _, v in columns:
            p = _at(info, v)
            served = p and p.served
            cells.append(f"{served['performance']:.3f} ({served['performance'] - p.performance:+.3f}; "
                         f"d̄ {served['d_mean'] / 1000:.2f})" if served else "—")
        if any(c != "—" for c in cells):
            rows.append(f"| {method} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["", "## As served (`bmoe serve`: one request at a time, the streaming budget)", "",
            "The table above routes the whole test split at once (Algorithm 1's quotas, lagrange's price set on the "
            "test predictions); a deployment routes each request as it comes, at the price calibrated on validation "
            "and corrected by the overspend so far. This is the test split sent in `bmoe replay`'s order to a fresh "
            "router (difference to the row above in brackets): what `bmoe replay` measures an endpoint against.", "",
            "| method | " + " | ".join(f"{name} ({v / 1000:.2f} kB)" for name, v in columns) + " |",
            "|---|" + "---|" * len(columns), *rows]


def _plot_curves(summary: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, info in summary["methods"].items():
        pts = sorted(_points(info), key=lambda p: p.d_mean)
        x = [p.d_mean / 1000 for p in pts]
        y = [p.performance for p in pts]
        style = {"experts": dict(ls=":", marker="s", color="k"), "oracle": dict(ls="--", color="grey")}.get(
            method, dict(marker="o"))
        ax.plot(x, y, label=f"{method} (rho {info['rho']:.3f})", **style)
    ax.set_xlabel("mean data cost d̄ (kB)")
    ax.set_ylabel(summary["metric"])
    ax.set_title(f"{summary['task']}: performance vs data cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
