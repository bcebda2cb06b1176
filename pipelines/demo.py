"""`bmoe demo`: every stage of every task on the embedded default, then one summary table."""

from __future__ import annotations

import json
import time

from pipelines.runtime import RunConfig


def run_demo(configs: list[RunConfig]) -> dict[str, dict]:
    """Prepare, train experts, cache, sweep and report each task; print rho per method."""
    from pipelines.cache import cache
    from pipelines.prepare import prepare
    from pipelines.report import report
    from pipelines.sweep import sweep
    from pipelines.train_experts import train_experts

    summaries = {}
    for cfg in configs:
        print(f"== bmoe demo: task {cfg.task_name}, profile {cfg.profile}, root {cfg.root} ==")
        started = time.perf_counter()
        for name, stage in (("prepare", prepare), ("train-experts", train_experts), ("cache", cache),
                            ("sweep", sweep), ("report", report)):
            t0 = time.perf_counter()
            result = stage(cfg)
            print(f"-- {name} done in {time.perf_counter() - t0:.1f}s")
        summaries[cfg.task_name] = json.loads(result.read_text())
        print(f"== {cfg.task_name}: all stages in {time.perf_counter() - started:.0f}s; report in "
              f"{cfg.layout.reports() / 'report.md'}")
    print(summary_table(summaries))
    return summaries


def summary_table(summaries: dict[str, dict]) -> str:
    """rho per method (rows) and task (columns) with its routing efficiency, as plain text."""
    methods = []
    for s in summaries.values():
        methods += [m for m in s["methods"] if m not in methods]
    tasks = list(summaries)
    lines = ["", "rho (eq. 11) per method and task (routing efficiency: the share of the oracle's gain over random):",
             f"  {'method':<10}" + "".join(f"{t:>20}" for t in tasks)]
    for m in methods:
        cells = ""
        for t in tasks:
            info = summaries[t]["methods"].get(m)
            eff = None if info is None else info.get("efficiency")
            cell = "—" if info is None else f"{info['rho']:.3f}" + ("" if eff is None else f" ({eff:+.2f})")
            cells += f"{cell:>20}"
        lines.append(f"  {m:<10}{cells}")
    return "\n".join(lines)
