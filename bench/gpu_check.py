"""The CUDA paths of every task, checked on a GPU machine: each expert trains a few steps and
scores a batch (task.train_loss, task.evaluate), and each trained gate method takes its training
steps (gate_step with enforce and soft, the lagrange gate's regression and lambda), on the GPU and
on the CPU from the same inputs, which must agree; with the gate's training steps per second on
both. Not a test: CI has no GPU.

Two steps, because the GPU machine has PyTorch but not Ray (whose Arrow tensor types the shards
are written with):
  here:     python bench/gpu_check.py export --root-template /tmp/smoke-{task} --out .gpucheck
            (roots made by `bmoe demo --profile smoke --task <task> --root ...`)
  the GPU:  python bench/gpu_check.py check --data .gpucheck --out bench/results/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

TASKS = ("superres", "detection", "action")
BATCH = 8  # expert rows per task
GATE_BATCH = 64


def export(root_template: str, out: Path) -> None:
    """One .npz per task of a smoke run: a batch of every expert's shard rows, the gate inputs
    and cached losses and scores of the gate split."""
    import pandas as pd

    from pipelines.prepare import require_manifest, shard_files
    from pipelines.runtime import RunConfig
    from pipelines.sweep import load_split
    from storage import read_table

    out.mkdir(parents=True, exist_ok=True)
    for name in TASKS:
        cfg = RunConfig(task_name=name, root=root_template.format(task=name), profile="smoke")
        task, manifest = cfg.task(), require_manifest(cfg)
        arrays = {}
        for n in range(len(task.expert_names())):
            table = pd.concat([read_table(f).to_pandas() for f in shard_files(cfg.layout, manifest, "train", f"p{n}")])
            rows = table.iloc[:BATCH]
            for column in ("x", *task.target_columns):
                arrays[f"e{n}/{column}"] = _stack(rows[column].to_numpy())
        gate = load_split(cfg, task, "gate")
        arrays["gate"] = gate.gate_inputs.take(np.arange(min(len(gate.gate_inputs), GATE_BATCH)))
        arrays["losses"], arrays["scores"] = gate.losses[:GATE_BATCH], gate.scores[:GATE_BATCH]
        np.savez(out / f"{name}.npz", **arrays)
        print(f"export: {name}: {len(task.expert_names())} experts x {BATCH} rows, {len(arrays['gate'])} gate inputs")


def _stack(values: np.ndarray) -> np.ndarray:
    """A pandas column of arrays (or bytes, or scalars) as one numpy array."""
    first = values[0]
    if isinstance(first, (bytes, bytearray)):
        return np.array(values, dtype=object)
    return np.stack([np.asarray(v) for v in values])


def check(data: Path, out: Path, accelerator: str = "cuda") -> dict:
    """accelerator "cpu": a dry run of this script on a machine without a GPU (CPU against CPU)."""
    import torch

    from bmoe.gating import build_gate, gate_step
    from bmoe.lagrange import calibrate_lambda, score_loss
    from bmoe.bias import select_bias
    from tasks import get_task

    if accelerator == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here (--accelerator cpu runs the script CPU against CPU)")
    cuda, cpu = torch.device(accelerator), torch.device("cpu")
    report = {"device": torch.cuda.get_device_name(0) if accelerator == "cuda" else "cpu", "torch": torch.__version__,
              "tasks": {}}
    for name in TASKS:
        arrays = np.load(data / f"{name}.npz", allow_pickle=True)
        task = get_task(name, "smoke")
        result = {"experts": [], "gates": {}}
        for n in range(len(task.expert_names())):
            batch = {k.split("/", 1)[1]: arrays[k] for k in arrays.files if k.startswith(f"e{n}/")}
            figures = {}
            for device in (cpu, cuda):
                torch.manual_seed(0)
                model = task.build_expert(n).to(device)
                optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
                tensors = {k: torch.as_tensor(v, device=device) for k, v in batch.items() if v.dtype != object}
                model.train()
                losses = []
                for _ in range(3):
                    torch.manual_seed(1)  # the same augmentation on both devices
                    loss = task.train_loss(n, model, tensors)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses.append(float(loss.detach()))
                model.eval()
                with torch.no_grad():
                    scored = task.evaluate(n, model, batch, device)
                figures[str(device)] = {"train_losses": losses, "loss": np.asarray(scored["loss"], dtype=float)}
            ours, theirs = figures["cpu"]["loss"], figures[str(cuda)]["loss"]
            agree = bool(np.allclose(ours, theirs, rtol=2e-2, atol=1e-3))
            result["experts"].append({"expert": task.expert_names()[n], "agree": agree,
                                      "train_losses": {k: v["train_losses"] for k, v in figures.items()},
                                      "max_abs_loss_diff": float(np.max(np.abs(ours - theirs)))})
        d = task.data_costs()
        b = select_bias(d, -arrays["losses"].mean(axis=0), float(d.mean()))
        x = arrays["gate"]
        for method in ("enforce", "soft", "lagrange"):
            timings, outputs = {}, {}
            for device in (cpu, cuda):
                torch.manual_seed(0)
                gate = build_gate(task.gate_spec(), 0.5).to(device)
                optimizer = torch.optim.Adam(gate.parameters(), lr=1e-3)
                inputs = task.gate_tensor(torch.from_numpy(x).to(device))
                losses = torch.as_tensor(arrays["losses"], dtype=torch.float32, device=device)
                scores = torch.as_tensor(arrays["scores"], dtype=torch.float32, device=device)
                steps = 20
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                for _ in range(steps):
                    if method == "lagrange":
                        optimizer.zero_grad(set_to_none=True)
                        loss = score_loss(gate(inputs), (scores - scores.mean()) / scores.std().clamp_min(1e-12))
                        loss.backward()
                        optimizer.step()
                    else:
                        gate_step(gate, optimizer, inputs, losses / losses.mean(), method, b, 1.0)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                timings[str(device)] = steps / (time.perf_counter() - started)
                with torch.no_grad():
                    outputs[str(device)] = gate.eval()(inputs).float().cpu().numpy()
            lam = calibrate_lambda(outputs[str(cuda)], d, float(d.mean())) if method == "lagrange" else None
            result["gates"][method] = {"steps_per_s": {k: round(v, 1) for k, v in timings.items()},
                                       "max_abs_logit_diff": float(np.max(np.abs(outputs["cpu"] - outputs[str(cuda)]))),
                                       **({"lambda": lam} if lam is not None else {})}
        report["tasks"][name] = result
        print(json.dumps({name: result}, indent=1, default=float))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    ex = sub.add_parser("export", help="here: a batch of each smoke run's shards and cache as .npz")
    ex.add_argument("--root-template", required=True, help="smoke run root per task; {task} is replaced")
    ex.add_argument("--out", type=Path, default=Path(".gpucheck"))
    ch = sub.add_parser("check", help="on the GPU machine: CUDA against CPU")
    ch.add_argument("--data", type=Path, default=Path(".gpucheck"))
    ch.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu_check.json")
    ch.add_argument("--accelerator", default="cuda", help="cuda; cpu for a dry run here")
    args = parser.parse_args()
    if args.step == "export":
        export(args.root_template, args.out)
    else:
        check(args.data, args.out, args.accelerator)


if __name__ == "__main__":
    main()
