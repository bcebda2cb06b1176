"""Several gate configurations of one (method, d_t) point on one data pass, or one pass each?

Issue 29 asks before building it: a searched sweep trains many configurations (lr, w_bias) of
one point on the same inputs. Trained in lockstep, they share each batch's read, transfer to the
device and augmentation; trained apart (today: one Tune trial each), every configuration pays
for its own. This measures gates trained per hour both ways, side by side in one process, on a
finished demo root: K enforce gates at d_max/2 (the demo grid's batch size and width, K lrs),
each epoch's training batches and a validation routing, E epochs.

Run:  .venv/bin/python bench/multi_config.py --root /tmp/dd [--tasks superres,action] [--k 4]
Writes bench/results/multi_config.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from pipelines.runtime import RunConfig, quiet_environment  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "multi_config.json"
LRS = (1e-3, 3e-3, 1e-4, 3e-4, 1e-2, 3e-2, 3e-5, 1e-5)


def _gates(task, k: int, width: float, lrs) -> list[tuple]:
    from bmoe.gating import build_gate

    out = []
    for i in range(k):
        torch.manual_seed(i)
        gate = build_gate(task.gate_spec(), width)
        out.append((gate, torch.optim.Adam(gate.parameters(), lr=lrs[i])))
    return out


def _epoch(task, gates, train, val, losses, b, batch: int, gen, device) -> None:
    """One epoch of every gate in `gates` on one pass over the batches, then each one's
    validation logits on one pass over the validation inputs."""
    from bmoe.gating import gate_step
    from pipelines.gate_trial import EVAL_BATCH, _batches, augment, to_device

    for idx, x in _batches(train, batch, gen):
        x = augment(task, to_device(task, x, device), gen)  # shared: read, moved and augmented once
        y = losses[torch.from_numpy(idx)]
        for gate, optimizer in gates:
            gate_step(gate, optimizer, x, y, "enforce", b)
    with torch.no_grad():
        for _, x in val.gate_inputs.batches(EVAL_BATCH):
            x = to_device(task, x, device)
            for gate, _ in gates:
                gate.eval()
                gate(x)


def measure(root: str, task_name: str, k: int, epochs: int) -> dict:
    from bmoe.bias import select_bias
    from pipelines.gate_trial import expert_performance
    from pipelines.grid import GRIDS
    from pipelines.sweep import load_split
    from tasks import GATE_SPLIT

    cfg = RunConfig(task_name=task_name, root=root, profile="demo")
    task = cfg.task()
    grid = GRIDS["demo"]
    train, val = load_split(cfg, task, GATE_SPLIT), load_split(cfg, task, "val")
    d = task.data_costs()
    b = select_bias(d, expert_performance(task, val), float(d.max()) / 2)
    losses = torch.as_tensor(train.losses / max(train.losses.mean(), 1e-12), dtype=torch.float32)
    batch, width, device = grid.batch_sizes[0], grid.widths[0], torch.device("cpu")
    figures = {}
    for way in ("apart", "lockstep", "apart_again"):  # apart twice: the spread of the baseline
        gates = _gates(task, k, width, LRS)
        started = time.perf_counter()
        for _ in range(epochs):
            if way == "lockstep":
                _epoch(task, gates, train, val, losses, b, batch, torch.Generator().manual_seed(0), device)
            else:
                for one in gates:
                    _epoch(task, [one], train, val, losses, b, batch, torch.Generator().manual_seed(0), device)
        figures[way] = time.perf_counter() - started
    apart = min(figures["apart"], figures["apart_again"])
    return {"task": task_name, "k": k, "epochs": epochs, "gate_rows": len(train.cache), "val_rows": len(val.cache),
            "seconds": {w: round(s, 2) for w, s in figures.items()},
            "gates_per_hour_apart": round(k * 3600 / apart, 1),
            "gates_per_hour_lockstep": round(k * 3600 / figures["lockstep"], 1),
            "lockstep_speedup": round(apart / figures["lockstep"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="a finished demo root (bmoe demo)")
    parser.add_argument("--tasks", default="superres,action,detection")
    parser.add_argument("--k", type=int, default=4, help="configurations of the point")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a trial's --cpus-per-trial)")
    args = parser.parse_args()
    quiet_environment()
    torch.set_num_threads(args.threads)
    rows = []
    for task_name in args.tasks.split(","):
        row = measure(args.root, task_name, args.k, args.epochs)
        print(f"{task_name:10s} K={row['k']} apart {row['seconds']['apart']:.1f}/{row['seconds']['apart_again']:.1f}s "
              f"lockstep {row['seconds']['lockstep']:.1f}s: x{row['lockstep_speedup']:.2f} "
              f"({row['gates_per_hour_apart']:.0f} -> {row['gates_per_hour_lockstep']:.0f} gates/h)", flush=True)
        rows.append(row)
    record = {"when": datetime.datetime.now().isoformat(timespec="seconds"), "device": "cpu",
              "threads": args.threads, "load_average": [round(x, 2) for x in os.getloadavg()], "rows": rows}
    RESULTS.write_text(json.dumps(record, indent=2))
    print(f"load average {os.getloadavg()}; written {RESULTS}")


if __name__ == "__main__":
    main()
