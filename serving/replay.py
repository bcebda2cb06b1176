"""`bmoe replay`: a split of a run root sent through a running endpoint, over HTTP only, and the
responses scored with the task's own metric exactly as the report scores the cache: what a
user runs after every deployment to see that the mixture delivers its report row.

Each source file of the split (an image, a clip) is POSTed as a client would send it, at each
target (X-BMoE-Target-Cost; none: the endpoint's own default). The task turns each response
into the cache columns its metric reads (tasks.base.TaskBase.served_columns: superres cuts the
served image back into its patches, detection takes the served boxes, action the served class),
and task.metric scores the split as the report does. Only the rows the root's cache scored are
counted, so served and report figures cover the same units. The report's row is the served
gate's own trial in the sweep of the root's report (else its latest), at the same target, as
served (bmoe.stream: the split streamed through a fresh router in the order replay sends it),
with the batch row (the whole split routed at once) beside it.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from pipelines.layout import RunLayout
from pipelines.manifest import read_manifest
from pipelines.points import Point
from pipelines.runtime import RunConfig, UserError
from serving.router import TARGET_HEADER
from serving.loading import reported_sweep
from bmoe.stream import STREAM_SEED, request_order
from storage import as_path, read_table

SPLITS = ("val", "test")
ORDERS = ("shuffled", "listed")


@dataclass
class ReplayRow:
    """One target's replay: served figures beside the report's for the same gate and target."""

    task: str
    split: str
    order: str
    target: float  # bytes per routing unit
    gate_method: str
    gate_file: str
    requests: int
    units: int
    served: dict  # performance, d_mean and the metric's secondary figures
    report: dict | None = None  # the gate's own trial at this target: performance, d_mean (as served), batch_*
    cached: float | None = None  # the metric of the served choices on the root's cache: what the report's
    # scoring gives for them (served - cached: the experts' fidelity; cached - report: the routing's)
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)  # sources prepare could not use either

    @property
    def performance_diff(self) -> float | None:
        return None if self.report is None else self.served["performance"] - self.report["performance"]

    @property
    def d_mean_diff(self) -> float | None:
        """Relative: (served - report) / report."""
        return None if self.report is None else self.served["d_mean"] / self.report["d_mean"] - 1.0

    def as_dict(self) -> dict:
        return {**asdict(self), "performance_diff": self.performance_diff, "d_mean_diff": self.d_mean_diff}


def endpoint(url: str, task_name: str) -> str:
    """The task's base URL under `url` (http://host:port, or already .../<task>)."""
    url = url.rstrip("/")
    return url if url.endswith(f"/{task_name}") else f"{url}/{task_name}"


def replay(root: str, task_name: str, url: str, targets: list[float | None], split: str = "test",
           timeout: float = 300.0, progress: Callable[[str], None] = lambda line: None,
           tracking_uri: str | None = None, order: str = "shuffled", seed: int = STREAM_SEED) -> list[ReplayRow]:
    """The split of `root` through the endpoint at `url`, once per target (None: the endpoint's
    default, sent without a header). UserError names what is missing or what the endpoint refused.
    tracking_uri: where a registered gate the endpoint serves (models:/...) is looked up.
    order: "shuffled" (requests in bmoe.stream's order for `seed`: with the default seed the
    order the report's as-served rows were scored in, so a fresh endpoint's choices are the
    report's unit by unit) or "listed" (the data set's order: UCF-101's lists are sorted by
    class, a stream's hardest case)."""
    if split not in SPLITS:
        raise UserError(f"--split {split!r}: choose {' or '.join(SPLITS)}")
    if order not in ORDERS:
        raise UserError(f"--order {order!r}: choose {' or '.join(ORDERS)}")
    layout = RunLayout.of(root, task_name)
    sweep = reported_sweep(layout)
    trial_options = next((t["config"]["options"] for t in sweep["trials"]), {})
    task = RunConfig(task_name=task_name, root=str(root), profile=sweep["profile"], task_options=trial_options).task()
    base = endpoint(url, task_name)
    stats = _get(f"{base}/stats", timeout)
    served_gate = stats["gate"]
    costs = task.data_costs()
    names = task.expert_names()
    sources, skipped = _sources(layout, task, split)
    if order == "shuffled":  # the order the report's as-served rows assume (bmoe.stream), for seed 0
        rank = request_order([str(rows[0][task.request_column]) for _, rows, _ in sources], seed)
        sources = sorted(sources, key=lambda source: rank[str(source[1][0][task.request_column])])
    cache_rows = read_table(layout.cache(split)).to_pandas().set_index("sample_id", drop=False)
    trial = _trial_of(sweep, _gate_file_of(served_gate["file"], tracking_uri), layout)
    results = []
    for target in targets:
        started = time.perf_counter()
        headers = {} if target is None else {TARGET_HEADER: f"{target:.17g}"}
        meta, columns, assignment = [], [], []
        served_target = target
        for k, (source, rows, keep) in enumerate(sources):
            answer = _post(f"{base}/predict", as_path(source["path"]).read_bytes(), headers, timeout)
            served_target = float(answer["target_cost"])
            experts = np.array([names.index(name) for name in answer["experts"]])
            if len(experts) != len(rows):
                raise UserError(f"the endpoint routed {len(experts)} units of {source['path']}, the task makes "
                                f"{len(rows)}: it serves other task settings than {root}'s sweep")
            cols = task.served_columns(rows, answer, experts)
            meta += [{c: r[c] for c in ("sample_id", "group", *task.meta_columns)} for r, scored in zip(rows, keep)
                     if scored]
            columns.append({c: (v[keep], experts[keep]) for c, v in cols.items()})
            assignment.append(experts[keep])
            if (k + 1) % 25 == 0 or k + 1 == len(sources):
                progress(f"replay {task_name} {split} at {served_target:g} B: {k + 1}/{len(sources)} requests")
        assignment = np.concatenate(assignment) if assignment else np.zeros(0, dtype=np.int64)
        frame = _cache_like(meta, columns, len(costs))
        figures = {k: float(v) for k, v in task.metric(frame, assignment).items()}
        ids = frame["sample_id"].to_numpy()
        cached = float(task.metric(cache_rows.loc[ids].reset_index(drop=True), assignment)["performance"])
        served = {**figures, "d_mean": float(costs[assignment].mean()) if len(assignment) else float("nan")}
        results.append(ReplayRow(task=task_name, split=split, order=order, target=served_target, gate_method=served_gate["method"],
                                 gate_file=served_gate["file"], requests=len(sources), units=len(assignment),
                                 served=served, cached=cached, report=_report_row(trial, served_target) if split == "test" else None,
                                 seconds=round(time.perf_counter() - started, 1), skipped=skipped))
    return results


def replay_each_gate(root: str, task_name: str, methods: tuple[str, ...], targets: list[float],
                     port: int = 8000, order: str = "shuffled") -> dict[str, list[ReplayRow]]:
    """For each method, the test split replayed at every target through its best gate on validation
    there, served on 127.0.0.1:port by Ray Serve in this process (the Ray it is connected to):
    {method: rows}. A gate trained for one target (soft, enforce) gets an application per target;
    one that serves every target (lagrange) one application, the first target its own (no header)
    and the others per request. One application at a time, shut down after (benchmarks, tests)."""
    from ray import serve

    from pipelines.methods import method as method_spec
    from serving.app import run
    from serving.loading import best_gate
    from serving.settings import ServeSettings

    layout = RunLayout.of(root, task_name)
    sweep = reported_sweep(layout)
    results = {}
    for name in methods:
        trials = [t for t in sweep["trials"] if t["config"]["method"] == name and t.get("gate_file")]
        if not trials:
            raise UserError(f"sweep {sweep['name']} trained no {name} gate")
        apps = [[t] for t in targets] if method_spec(name).per_target else [list(targets)]
        results[name] = []
        for app_targets in apps:
            gate = best_gate(trials, app_targets[0])
            settings = ServeSettings(task=task_name, root=str(root), gate_file=str(layout.resolve(gate["gate_file"])),
                                     target_cost=app_targets[0])
            run(settings, host="127.0.0.1", port=port, access_log=False)
            try:
                results[name] += replay(str(root), task_name, f"http://127.0.0.1:{port}", [None, *app_targets[1:]],
                                        order=order)
            finally:
                serve.shutdown()
    return results


def _sources(layout: RunLayout, task, split: str) -> tuple[list[tuple[dict, list[dict], np.ndarray]], list[str]]:
    """The split's sources that the cache scored, each with its load() rows (one per routing unit,
    in the request's unit order) and which of them the cache holds; and the sources skipped."""
    manifest = read_manifest(layout)
    if manifest is None:
        raise UserError(f"no prepared data for task {layout.task_name} under {layout.root}: run `bmoe prepare` first")
    cache = layout.cache(split)
    if not cache.exists():
        raise UserError(f"no cache of the {split} split under {layout.root}: run `bmoe cache` first")
    scored = set(read_table(cache, ["sample_id"]).column("sample_id").to_pylist())
    data_root = layout.data_root(manifest)
    listing = task.list_sources(data_root, split)
    wanted = {"sample_id", "group", *task.target_columns, *task.meta_columns}  # not the P_n: memory
    kept, skipped = [], []
    for source in listing.sources:
        try:
            rows = [{k: v for k, v in row.items() if k in wanted} for row in task.load(source)]
        except Exception as err:  # noqa: BLE001 - prepare skipped it too: it is not in the cache
            skipped.append(f"{source['path']}: {' '.join(str(err).split())[:120]}")
            continue
        keep = np.array([row["sample_id"] in scored for row in rows], dtype=bool)
        if keep.any():
            kept.append((source, rows, keep))
        else:
            skipped.append(f"{source['path']}: not in the {split} cache")
    if not kept:
        raise UserError(f"none of the {split} split's sources under {data_root} is in the cache "
                        f"of {layout.root}")
    return kept, skipped


def _cache_like(meta: list[dict], columns: list[dict], n_experts: int) -> pd.DataFrame:
    """A cache-shaped frame: the rows' meta columns, and each served column c as c_<n> filled for
    the expert each row went to (metric reads only those)."""
    frame = pd.DataFrame(meta)
    keys = {c for part in columns for c in part}
    for c in sorted(keys):
        values = [part[c] for part in columns if c in part]
        data = np.concatenate([v for v, _ in values]) if values else np.zeros(0)
        experts = np.concatenate([e for _, e in values]) if values else np.zeros(0, dtype=np.int64)
        for n in range(n_experts):
            col = np.full(len(data), None if data.dtype == object else np.nan, dtype=object if data.dtype == object
                          else np.float64)
            col[experts == n] = data[experts == n]
            frame[f"{c}_{n}"] = col
    return frame


def _trial_of(sweep: dict, gate_file: str, layout: RunLayout) -> dict | None:
    """The sweep trial whose saved gate the endpoint serves (its file under the root), if any."""
    for trial in sweep["trials"]:
        rel = trial.get("gate_file")
        if rel and (gate_file in (rel, str(layout.resolve(rel))) or gate_file.endswith("/" + rel.lstrip("/"))):
            return trial
    return None


def _gate_file_of(served: str, tracking_uri: str | None) -> str:
    """The gate file under the root that a registered gate was registered from (its version's tag)."""
    from pipelines import registry

    if not registry.is_model_uri(served) or not tracking_uri:
        return served
    try:
        return registry.version_tags(served, tracking_uri).get("gate_file", served)
    except Exception:  # noqa: BLE001 - an unreachable server: no report row, said in the table
        return served


def _report_row(trial: dict | None, target: float) -> dict | None:
    """The gate's report row at `target`: as served (bmoe.stream) where the sweep scored it, else
    the batch row; batch_* always the batch row (Algorithm 1's quotas, lagrange's test price)."""
    for point in (Point.from_dict(p) for p in (trial or {}).get("points", [])):
        if abs(point.d_target - target) <= 1e-6 * max(target, 1.0):
            row = point.served or {"performance": point.performance, "d_mean": point.d_mean}
            return {"performance": row["performance"], "d_mean": row["d_mean"], "method": trial["config"]["method"],
                    "as_served": point.served is not None, "batch_performance": point.performance,
                    "batch_d_mean": point.d_mean}
    return None


def _get(url: str, timeout: float) -> dict:
    return _request(urllib.request.Request(url), timeout)


def _post(url: str, body: bytes, headers: dict, timeout: float) -> dict:
    return _request(urllib.request.Request(url, data=body, headers=headers, method="POST"), timeout)


def _request(request: urllib.request.Request, timeout: float) -> dict:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        detail = err.read()[:300].decode("utf-8", "replace")
        raise UserError(f"{request.get_method()} {request.full_url} answered {err.code}: "
                        f"{' '.join(detail.split())}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"no endpoint at {request.full_url} ({reason}): start one with `bmoe serve` or pass --url") \
            from None


def format_table(rows: list[ReplayRow], metric_name: str) -> str:
    """Served vs report, one line per target."""
    if not rows:
        return "no replay"
    first = rows[0]
    lines = [f"replay of {first.task} {first.split} ({first.requests} requests in {first.order} order, "
             f"{first.units} units scored) "
             f"through the endpoint's {first.gate_method} gate ({first.gate_file})",
             f"metric: {metric_name}; cached: the served choices scored on the root's cache (served - cached: "
             "the experts as served; cached - report: the routing); report: the report's as-served row (a fresh "
             "router, this order); batch: its row for the whole split routed at once",
             f"{'target (B)':>11} {'served':>9} {'cached':>9} {'report':>9} {'diff':>8} {'batch':>9} {'served d (B)':>13} "
             f"{'report d (B)':>13} {'diff':>7} {'seconds':>8}"]
    for r in rows:
        rep = r.report or {}
        perf = f"{r.performance_diff:+8.3f}" if r.report else f"{'-':>8}"
        cost = f"{100 * r.d_mean_diff:+6.1f}%" if r.report else f"{'-':>7}"
        lines.append(f"{r.target:>11.0f} {r.served['performance']:>9.3f} {r.cached:>9.3f} {rep.get('performance', float('nan')):>9.3f} "
                     f"{perf} {rep.get('batch_performance', float('nan')):>9.3f} {r.served['d_mean']:>13.0f} "
                     f"{rep.get('d_mean', float('nan')):>13.0f} {cost} {r.seconds:>8.1f}")
    if any(r.report and not r.report["as_served"] for r in rows):
        lines.append("(report: the batch row, as the sweep predates as-served rows; rerun `bmoe sweep` for them)")
    if any(r.report is None for r in rows):
        lines.append("(no report row: the endpoint's gate is not a trial of the sweep the root's report shows, "
                     "the target is not one of its targets, or the split is not test)")
    if first.skipped:
        lines.append(f"{len(first.skipped)} source(s) not replayed, as prepare did not score them: "
                     + "; ".join(first.skipped[:3]))
    return "\n".join(lines)
