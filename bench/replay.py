"""Serving fidelity benchmark: does the deployed mixture deliver its report row?

For each task with a trained run under --root (`bmoe demo`), each servable method is served by
Ray Serve on 127.0.0.1 and the test split is replayed through HTTP (serving.replay, what `bmoe
replay` runs) at d_max / 2 and d_max / 3: soft and enforce with the sweep's best gate on validation
trained for each target (an application per target), lagrange's one gate at both (d_max / 2 the
app's own target, d_max / 3 a per-request override). Printed per row: served performance and mean
data cost, the same choices scored on the root's cache ("cached": served - cached is the experts
as served, cached - report the routing), the report's as-served row for the same gate and target
(what the tolerances apply to) and its batch row (the whole split routed at once).

Run from the repository root:  .venv/bin/python bench/replay.py --root RUN [--task T ...]
Writes bench/results/replay.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.methods import SERVABLE  # noqa: E402
from pipelines.runtime import RunConfig, ensure_ray  # noqa: E402
from serving.replay import replay_each_gate  # noqa: E402
from storage import read_json  # noqa: E402
from tasks import TASKS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="run root holding `bmoe demo` runs")
    parser.add_argument("--task", action="append", choices=sorted(TASKS), help="repeatable; default: every task")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--order", choices=("shuffled", "listed"), default="shuffled",
                        help="the requests' order (bmoe replay --order)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "replay.json"))
    args = parser.parse_args()
    results = []
    for task_name in args.task or sorted(TASKS):
        cfg = RunConfig(task_name=task_name, root=args.root)
        manifest = read_json(cfg.layout.manifest())
        if manifest is None or read_json(cfg.layout.latest_sweep()) is None:
            print(f"{task_name}: no trained run under {args.root}, skipped")
            continue
        ensure_ray(cfg)
        d_max = max(manifest["data_costs"])
        sweep = read_json(cfg.layout.resolve(read_json(cfg.layout.latest_sweep())["file"]))
        methods = [m for m in SERVABLE if any(t["config"]["method"] == m and t.get("gate_file") for t in sweep["trials"])]
        rows = replay_each_gate(args.root, task_name, tuple(methods), [d_max / 2, d_max / 3], port=args.port,
                                order=args.order)
        for method, method_rows in rows.items():
            for row in method_rows:
                results.append({"method": method, **row.as_dict()})
                rep = row.report or {}
                print(f"{task_name:9s} {args.order:8s} {method:8s} {row.target:8.0f} B: served {row.served['performance']:8.3f} "
                      f"cached {row.cached:8.3f} report {rep.get('performance', float('nan')):8.3f} "
                      f"diff {row.performance_diff if row.report else float('nan'):+7.3f} "
                      f"(batch {rep.get('batch_performance', float('nan')):8.3f}) | d served "
                      f"{row.served['d_mean']:8.0f} report {rep.get('d_mean', float('nan')):8.0f} "
                      f"{100 * row.d_mean_diff if row.report else float('nan'):+5.1f}% | {row.units} units, {row.seconds:.0f} s",
                      flush=True)
    out = {"when": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(),
           "cpus": os.cpu_count(), "load_average": os.getloadavg(), "root": args.root, "rows": results}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
