"""How much of the oracle's gain a trained gate earns, and how much of that is its own seed: the
enforce gate trained at every target of a finished demo root, for each gate seed and lr, on the
cached losses (the paper's signal) or on 1 - the per-input score, and the gate that validation
picks per target among them (as a sweep picks among lrs).

Why: on the detection demo a router told each scene's kind reaches 0.44-0.6 routing efficiency
(bench/group_ceiling.py) while one enforce gate scored 0.00. One gate is one draw: this bench
shows the spread over draws, so a lever (lr, signal, more gates to pick from) is judged by more
than the noise of one.

Efficiency is (rho - rho_random) / (rho_oracle - rho_random) on test, with random and oracle as
the report computes them, at the sweep grid's targets (pipelines.grid.targets).

--on-gate-split asks whether the gate fits what it trains on: validation and test are both the
gate split itself, so each gate is picked, and scored, on its own training inputs (random and the
oracle too). Low efficiency there is a gate that cannot learn the signal, not one that overfits.

--kinds DEPTHS asks why, on detection: can a gate of that depth tell the embedded scenes' kinds
apart at all, trained on the kinds themselves? (The Table IV gate, depth 1, could not: about half.)

Run from the repository root on a finished demo root (bmoe demo --root R), e.g.
  .venv/bin/python bench/gate_levers.py --root R --task detection --seeds 0,1,2,3 --lrs 1e-3,3e-4
  .venv/bin/python bench/gate_levers.py --root R --kinds 1,3 --seeds 0,1 --epochs 25
Writes bench/results/gate_levers.json (--quick: one seed, one lr, two epochs; prints only).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

RESULTS = Path(__file__).resolve().parent / "results" / "gate_levers.json"


def curve_efficiency(points, d, bounds) -> tuple[float, float]:
    from bmoe.curves import rho, routing_efficiency

    r = rho([p.d_mean for p in points], [p.performance for p in points], float(d.min()), float(d.max()))
    return r, routing_efficiency(r, *bounds)


def levers(root: str, task_name: str, seeds: list[int], lrs: list[float], epochs: int, signal: str,
           root_seed: int = 0, on_gate_split: bool = False, batch_size: int = 32) -> dict:
    import torch

    from pipelines.gate_trial import run_trial
    from pipelines.grid import GRIDS, targets
    from pipelines.methods import TrialConfig
    from pipelines.runtime import RunConfig
    from pipelines.sweep import load_split
    from tasks import GATE_SPLIT

    torch.set_num_threads(1)
    cfg = RunConfig(task_name=task_name, root=root, profile="demo", seed=root_seed)
    task = cfg.task()
    d = task.data_costs()
    data = {split: load_split(cfg, task, split) for split in (GATE_SPLIT, "val", "test")}
    if on_gate_split:
        data["val"] = data["test"] = data[GATE_SPLIT]
    if signal == "score":  # the per-input score as the gate's "loss": 1 - score, positive like a loss
        gate = data[GATE_SPLIT]
        data[GATE_SPLIT] = dataclasses.replace(gate, losses=(1.0 - gate.scores + 1e-3).astype(gate.losses.dtype))
    ts = tuple(float(t) for t in targets(d, GRIDS["demo"].points))
    base = {"task_name": task_name, "profile": "demo", "seed": 0, "epochs": epochs}
    bounds = [curve_efficiency(run_trial(TrialConfig(**base, method=m, targets=ts), data, report=lambda _: None).points,
                               d, (None, None))[0] for m in ("random", "oracle")]
    started, runs = time.perf_counter(), {}
    for seed in seeds:
        for lr in lrs:
            for t in ts:
                config = TrialConfig(**{**base, "seed": seed}, method="enforce", d_target=t, batch_size=batch_size, lr=lr,
                                     width=0.5)
                runs[(seed, lr, t)] = run_trial(config, data, report=lambda _: None,
                                                device=torch.device("cpu")).points[0]
            r, e = curve_efficiency([runs[(seed, lr, t)] for t in ts], d, bounds)
            print(f"{task_name} {signal}: gate seed {seed} lr {lr:g}: rho {r:.4f} efficiency {e:+.2f}", flush=True)
    singles = {f"seed {s} lr {lr:g}": curve_efficiency([runs[(s, lr, t)] for t in ts], d, bounds)[1]
               for s in seeds for lr in lrs}
    picked = [max((runs[(s, lr, t)] for s in seeds for lr in lrs), key=lambda p: p.val_objective) for t in ts]
    r, e = curve_efficiency(picked, d, bounds)
    print(f"{task_name} {signal}: picked on validation per target among {len(singles)} gates: rho {r:.4f} "
          f"efficiency {e:+.2f} (single gates: mean {np.mean(list(singles.values())):+.2f}, "
          f"{min(singles.values()):+.2f} to {max(singles.values()):+.2f})", flush=True)
    return {"root": root, "signal": signal, "epochs": epochs, "batch_size": batch_size, "scored_on": GATE_SPLIT if on_gate_split else "test", "targets": list(ts),
            "rho_random": bounds[0], "rho_oracle": bounds[1], "single_efficiency": singles,
            "single_mean": float(np.mean(list(singles.values()))), "picked_rho": r, "picked_efficiency": e,
            "seconds": round(time.perf_counter() - started, 1)}


def kinds(root: str, depths: list[int], seeds: list[int], epochs: int) -> dict:
    """How well a detection gate of the root's settings, at each depth, tells the embedded scenes'
    kinds apart (large, medium, small, mixed: which expert suffices), trained with cross-entropy on
    the gate split's kinds, its epoch picked on validation: test accuracy, and how often a mixed
    scene (small objects beside a large one: the dear expert's) is called large."""
    import torch
    from dataclasses import replace

    from bmoe.gating import build_gate, count_macs
    from pipelines.manifest import read_manifest
    from pipelines.runtime import RunConfig
    from pipelines.sweep import load_split
    from tasks import GATE_SPLIT
    from tasks.detection.synthetic import KINDS

    torch.set_num_threads(1)
    recorded = read_manifest(RunConfig(task_name="detection", root=root, profile="demo").layout) or {}
    cfg = RunConfig(task_name="detection", root=root, profile="demo", seed=int(recorded["identity"]["seed"]))
    task = cfg.task()
    kind_of = {}
    for source in ("train2017", "val2017"):
        instances = json.loads((Path(str(cfg.layout.raw())) / "annotations" / f"instances_{source}.json").read_text())
        kind_of.update({image["id"]: KINDS.index(image["kind"]) for image in instances["images"]})
    x, y = {}, {}
    for split in (GATE_SPLIT, "val", "test"):
        data = load_split(cfg, task, split)
        x[split] = task.gate_tensor(np.asarray(data.gate_inputs.take(np.arange(len(data.cache)))))
        y[split] = torch.as_tensor([kind_of[int(i)] for i in data.cache["image_id"]])
    out = {}
    for depth in depths:
        spec = replace(task.gate_spec(), n_experts=len(KINDS), depth=depth, hidden=256 if depth > 1 else 1024)
        for seed in seeds:
            torch.manual_seed(seed)
            gate = build_gate(spec)
            optimizer = torch.optim.Adam(gate.parameters(), lr=1e-3)
            order = torch.Generator().manual_seed(seed)
            best = (-1.0, None)
            for _ in range(epochs):
                gate.train()
                for batch in torch.randperm(len(y[GATE_SPLIT]), generator=order).split(32):
                    inputs = task.augment_gate(x[GATE_SPLIT][batch], order)
                    loss = torch.nn.functional.cross_entropy(gate(inputs), y[GATE_SPLIT][batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                gate.eval()
                with torch.no_grad():
                    val = float((gate(x["val"]).argmax(1) == y["val"]).float().mean())
                    if val > best[0]:
                        best = (val, gate(x["test"]).argmax(1))
            predicted, truth = best[1], y["test"]
            mixed = truth == KINDS.index("mixed")
            record = {"C_g": count_macs(build_gate(replace(spec, n_experts=3)), spec.input_shape),
                      "test_accuracy": float((predicted == truth).float().mean()),
                      "mixed_called_large": float((predicted[mixed] == KINDS.index("large")).float().mean())}
            out[f"depth {depth} seed {seed}"] = record
            print(f"kinds: depth {depth} seed {seed}: C_g {record['C_g']:,}, test accuracy "
                  f"{record['test_accuracy']:.3f}, mixed called large {record['mixed_called_large']:.2f}", flush=True)
    return {"root": root, "gate_input": list(task.gate_spec().in_size), "epochs": epochs, "results": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="a finished demo root (bmoe demo --root ...)")
    parser.add_argument("--task", default="detection", choices=("superres", "detection", "action"))
    parser.add_argument("--seeds", default="0,1,2,3", help="gate seeds, comma-separated")
    parser.add_argument("--lrs", default="1e-3,3e-4", help="gate learning rates, comma-separated")
    parser.add_argument("--epochs", type=int, default=12, help="gate epochs (the demo grid's)")
    parser.add_argument("--signal", default="loss", choices=("loss", "score"),
                        help="what the gate trains on: the cached loss (the paper's) or 1 - the per-input score")
    parser.add_argument("--batch-size", type=int, default=32, help="enforce's batch (the demo grid's: 64)")
    parser.add_argument("--root-seed", type=int, default=0, help="the seed the root's demo ran with (bmoe demo --seed)")
    parser.add_argument("--on-gate-split", action="store_true",
                        help="pick and score every gate on its own training split: does it fit the signal at all?")
    parser.add_argument("--quick", action="store_true", help="one seed, one lr, two epochs: a check, printed only")
    parser.add_argument("--kinds", default="", metavar="DEPTHS",
                        help="detection: instead, how well gates of these depths (e.g. 1,3) tell the scene kinds "
                             "apart when trained on them (--epochs 25 is enough)")
    args = parser.parse_args()
    if args.kinds:
        record = kinds(args.root, [int(k) for k in args.kinds.split(",")],
                       [int(s) for s in args.seeds.split(",")], args.epochs)
        _write(f"detection kinds {Path(args.root).name}", record)
        return
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")][:1 if args.quick else None]
    record = levers(args.root, args.task, seeds, lrs, 2 if args.quick else args.epochs, args.signal,
                    args.root_seed, args.on_gate_split, args.batch_size)
    if args.quick:
        return
    where = (f" batch {args.batch_size}, {Path(args.root).name}"
             + (", on the gate split" if args.on_gate_split else "")) if args.batch_size != 32 or args.on_gate_split else ""
    _write(f"{args.task} {args.signal}{where}", record)


def _write(key: str, record: dict) -> None:
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    previous[key] = {**record, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                     "load_average": [round(x, 2) for x in os.getloadavg()]}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(previous, indent=2))
    print(f"wrote {RESULTS} [{key}]")


if __name__ == "__main__":
    main()
