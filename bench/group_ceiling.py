"""How much of the oracle's gain the embedded data lets a gate earn: the routing efficiency of a
router that knows each input's true group (what the generator drew), and of one that knows each
input's cached expert losses (what the gates train on), beside the learned gates'.

The oracle knows every input's per-expert score, luck included: on a clip that the temporal
expert gets right by chance, or an image whose AP happens to be high at 50 px. No gate can know
that. A gate that perfectly perceives what the data's generator varies (detection: the scene's
kind, large/medium/small/mixed objects; action: the clip's motion) can at best route by that
group. So this group router bounds what the paper's gates can show on the demo's data:

  group router   every input scored with its group's mean score per expert on the gate split
                 (inputs the experts never trained on; weighted as the oracle weighs them), then
                 routed as the oracle routes: the best mix within the budget d_t, at every target
                 (with three experts in the LP's mix, ranking groups by the dearest expert's gain
                 over the cheapest, as this bench did before, sent shaking clips to fusion where
                 the spatial expert does as well for less)

  loss router    every test input scored with minus its cached per-expert losses, the gates'
                 training signal itself, known exactly (no weights), routed as the oracle
                 routes: what a gate that learned its training signal perfectly could deliver.
                 Below the oracle where the loss and the metric disagree (detection's SSD loss
                 against per-image AP@0.5); above the learned gates by what the gate fails to
                 learn from the gate split.

Efficiency is (rho - rho_random) / (rho_oracle - rho_random), on test, as the reports give it.

Run from the repository root on finished demo roots (e.g. those bench/demo_seeds.py writes):
  .venv/bin/python bench/group_ceiling.py --root-template /tmp/bmoe-seed{seed} [--seeds 0,1]
Writes bench/results/group_ceiling.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

RESULTS = Path(__file__).resolve().parent / "results" / "group_ceiling.json"
TASKS = ("detection", "action", "superres")
GROUPED = ("detection", "action")  # the generators that record each input's group


def groups(task_name: str, cfg, cache) -> np.ndarray:
    """(M,) each input's true group, as the embedded data's generator drew it."""
    if task_name == "action":
        from tasks.action.synthetic import CLASSES

        return np.array([CLASSES[int(label)].motion for label in cache["label"]])
    kinds = {}
    for instances in (cfg.layout.raw() / "annotations").glob("instances_*.json"):
        kinds.update({image["id"]: image["kind"] for image in json.loads(instances.read_text())["images"]})
    return np.array([kinds[int(i)] for i in cache["image_id"]])


def ceilings(task_name: str, root: str, seed: int) -> dict:
    """rho and efficiency on test of the group router (tasks in GROUPED) and the loss router,
    beside random's, the oracle's and the sweep's."""
    from bmoe.curves import routing_efficiency
    from pipelines.gate_trial import sample_weights
    from pipelines.runtime import RunConfig
    from pipelines.sweep import load_split
    from storage import read_json
    from tasks import GATE_SPLIT

    cfg = RunConfig(task_name=task_name, root=root, profile="demo", seed=seed)
    if read_json(cfg.layout.reports() / "summary.json") is None:
        raise SystemExit(f"no finished {task_name} demo under {root}: run `bmoe demo --seed {seed} --root {root}` first")
    task = cfg.task()
    d = task.data_costs()
    test = load_split(cfg, task, "test")
    result, routers = {}, {"loss router": -test.losses}
    if task_name in GROUPED:
        gate = load_split(cfg, task, GATE_SPLIT)
        gate_groups = groups(task_name, cfg, gate.cache)
        scores = gate.scores * sample_weights(task, gate)[:, None]  # as the oracle weighs them
        mean = {str(g): scores[gate_groups == g].mean(axis=0) for g in np.unique(gate_groups)}
        dear, cheap = int(np.argmax(d)), int(np.argmin(d))
        gain = {g: float(m[dear] - m[cheap]) for g, m in mean.items()}
        result["group_gain_of_dearest"] = {g: round(v, 4) for g, v in sorted(gain.items(), key=lambda kv: kv[1])}
        test_groups = groups(task_name, cfg, test.cache)
        jitter = np.random.default_rng(seed).random((len(test_groups), len(d))) * 1e-9  # ties within a group at random
        routers["group router"] = np.stack([mean[str(g)] for g in test_groups]) + jitter
    methods = read_json(cfg.layout.reports() / "summary.json")["methods"]
    rhos = {m: methods[m]["rho"] for m in ("random", "heuristic", "enforce", "soft", "lagrange", "oracle")
            if m in methods}
    rhos.update({name: routed_rho(task, test, d, known) for name, known in routers.items()})
    return {**result, "rho": rhos,
            "efficiency": {m: routing_efficiency(r, rhos["random"], rhos["oracle"]) for m, r in rhos.items()}}


def routed_rho(task, split, d, known: np.ndarray) -> float:
    """rho on `split` of routing each input by `known` (M, N) per-expert scores as the oracle
    routes: the best mix within the budget, at the report's targets."""
    from bmoe.curves import rho
    from bmoe.routing import oracle_assignment
    from pipelines.grid import targets

    points = []
    for d_t in targets(d, 5):
        assignment = oracle_assignment(known, d, d_t).numpy()
        points.append((float(d[assignment].mean()), task.metric(split.cache, assignment)["performance"]))
    costs, perfs = zip(*points)
    return rho(costs, perfs, d.min(), d.max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks")
    parser.add_argument("--root-template", default="bmoe-runs-seed{seed}",
                        help="the run root of each seed's finished demo; {seed} is replaced")
    args = parser.parse_args()
    results = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        root = args.root_template.format(seed=seed)
        for task_name in args.tasks.split(","):
            r = ceilings(task_name, root, seed)
            results[f"{task_name} s{seed}"] = r
            eff = ", ".join(f"{m} {e:+.2f}" for m, e in r["efficiency"].items() if m not in ("random", "oracle"))
            print(f"seed {seed} {task_name:<10} efficiency: {eff}")
            if "group_gain_of_dearest" in r:
                print(f"{'':<18}dearest expert's mean gain per group (gate split): {r['group_gain_of_dearest']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"date": datetime.datetime.now().isoformat(timespec="seconds"),
                                   "load_average": [round(x, 2) for x in os.getloadavg()], "results": results},
                                  indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
