r"""The CUDA paths of every task, checked on a GPU machine. Not a test: CI has no GPU.

smoke (export, then check): each expert trains a few steps and scores a batch (task.train_loss,
task.evaluate), and each trained gate method takes its training steps (gate_step with enforce
and soft, the lagrange gate's regression and lambda), on the GPU and on the CPU from the same
inputs, which must agree; with the gate's training steps per second on both. Two steps, because
the GPU machine has PyTorch but not Ray (whose Arrow tensor types the shards are written with):
  here:     python bench/gpu_check.py export --root-template /tmp/smoke-{task} --out .gpucheck
            (roots made by `bmoe demo --profile smoke --task <task> --root ...`)
  the GPU:  python bench/gpu_check.py check --data .gpucheck --out bench/results/gpu_check.json

paper (one step, no export): the paper profile's models, built by get_task(task, "paper") as
the pipeline builds them, on synthetic batches of the paper's shapes: per expert one training
step (task.initial_expert, build_optimizer of its recipe, task.train_loss) and one scoring batch
(task.serve_expert, what a Serve replica runs), and one gate step per gate-training method;
each timed (the first call apart: it pays CUDA's start-up and cuDNN's autotuning), with the
peak GPU memory, as a table and bench/results/gpu_check_paper-<device>.json.
  here (a dry run on the CPU: about a minute of CPU time on 2 cores, longer on a busy machine):
            python bench/gpu_check.py paper --accelerator cpu --batch 2 --gate-batch 8 --repeats 0
  the GPU:  the image has PyTorch, torchvision, pandas and pyarrow, not pycocotools (detection's
            metrics import it): carry its wheel for the machine's Python 3.12. Here, once:
              echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: \
                --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64 -d .whl pycocotools==2.0.11
            there (carry .whl; batches default to each recipe's, the paper's):
              python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
                PYTHONPATH=/tmp/site python3 bench/gpu_check.py paper --out $OUT/gpu_check_paper.json
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

    from pipelines.expert_rows import read_unit, read_units
    from pipelines.manifest import require_manifest
    from pipelines.runtime import RunConfig
    from pipelines.sweep import load_split

    out.mkdir(parents=True, exist_ok=True)
    for name in TASKS:
        cfg = RunConfig(task_name=name, root=root_template.format(task=name), profile="smoke")
        task, manifest = cfg.task(), require_manifest(cfg)
        arrays = {}
        for n in range(len(task.expert_names())):
            units = read_units(cfg.layout, manifest, "train", n)
            rows = pd.concat([t.to_pandas() for t in read_unit(units[0], ["x", *task.target_columns])]).iloc[:BATCH]
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


# -- paper profile: one step of every model, on synthetic batches of the paper's shapes --------------

PAPER_GATE_BATCH = 128  # the paper sweep's gate batch (pipelines/sweep.py GRIDS["paper"]; it imports Ray)
PAPER_GATE_LR = 1e-4
W_BIAS = 1.0


def _superres_batch(task, b: int, rng: np.random.Generator) -> tuple[list[np.ndarray], dict, np.ndarray]:
    """HR patches and their bicubic P_n, as tasks/superres/task.py load stores them."""
    from tasks.superres import patches

    hr = rng.integers(0, 256, (b, patches.PATCH, patches.PATCH, 3), dtype=np.uint8)
    return [patches.downscale(hr, s) for s in task.settings.scales], {"hr": hr}, hr


def _detection_batch(task, b: int, rng: np.random.Generator) -> tuple[list[np.ndarray], dict, np.ndarray]:
    """R_n x R_n images, one box per image in padded targets, the gate's centre crop."""
    s = task.settings
    xs = [rng.integers(0, 256, (b, r, r, 3), dtype=np.uint8) for r in s.resolutions]
    boxes = np.zeros((b, s.max_boxes, 4), dtype=np.float32)
    boxes[:, 0] = [0.2, 0.25, 0.7, 0.8]  # xyxy in [0, 1] of the image
    labels = np.zeros((b, s.max_boxes), dtype=np.int64)
    labels[:, 0] = s.categories[0]  # COCO ids; 0 = padding
    gate = rng.integers(0, 256, (b, s.gate_crop, s.gate_crop, 3), dtype=np.uint8)
    return xs, {"boxes": boxes, "labels": labels}, gate


def _action_batch(task, b: int, rng: np.random.Generator) -> tuple[list[np.ndarray], dict, np.ndarray]:
    """Motion grids and RGB frames, each clip's P_n made by task.expert_inputs."""
    from tasks.action.motion_vectors import GRID

    s = task.settings
    grids = rng.normal(0.0, 2.0, (b, s.F_t, GRID, GRID, 2)).astype(np.float32)  # pixels per frame
    frames = rng.integers(0, 256, (b, s.F_s, s.H_s, s.W_s, 3), dtype=np.uint8)
    per_clip = [task.expert_inputs(g, f) for g, f in zip(grids, frames)]
    xs = [np.stack([clip[n] for clip in per_clip]) for n in range(len(per_clip[0]))]
    return xs, {"label": rng.integers(0, s.classes, b)}, grids


SYNTHETIC = {"superres": _superres_batch, "detection": _detection_batch, "action": _action_batch}


def _timed(fn, device, repeats: int) -> tuple[float, float | None, object]:
    """(seconds of the first call, mean seconds of `repeats` more or None, the last result)."""
    import torch

    def once():
        started = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started, out

    first, out = once()
    rest = [once() for _ in range(repeats)]
    if rest:
        out = rest[-1][1]
    return first, (float(np.mean([t for t, _ in rest])) if rest else None), out


def _peak_mib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _row(task: str, part: str, step: str, batch: int, timing: tuple, device, value: float, params: int) -> dict:
    """One timed step; value: its loss (training steps) or the sum of |outputs| (serving)."""
    first, mean, _ = timing
    return {"task": task, "part": part, "step": step, "batch": batch, "params_m": params / 1e6,
            "first_ms": 1e3 * first, "mean_ms": None if mean is None else 1e3 * mean, "peak_mib": _peak_mib(device),
            "value": value, "finite": bool(np.isfinite(value))}


def check_paper(accelerator: str, tasks: list[str], batch: int | None, gate_batch: int, repeats: int,
                out: Path) -> dict:
    """One training step and one scoring batch per expert, one gate step per gate-training
    method, of every task's paper models; batch None: each expert's recipe batch size."""
    import torch

    from bmoe.bias import select_bias
    from bmoe.gating import build_gate, gate_step
    from bmoe.lagrange import score_loss
    from pipelines.gate_trial import augment, to_device
    from pipelines.methods import TABLE
    from pipelines.train_experts import build_optimizer
    from tasks import get_task

    if accelerator == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here (--accelerator cpu dry-runs the paper check on the CPU)")
    device = torch.device(accelerator)
    started, rows = time.perf_counter(), []
    print(HEADER)
    for name in tasks:
        task = get_task(name, "paper")  # no backbone_weights: initial_expert downloads nothing
        rng = np.random.default_rng(0)
        for n, expert in enumerate(task.expert_names()):
            recipe = task.expert_training(n)
            b = batch or recipe.batch_size
            xs, targets, _ = SYNTHETIC[name](task, b, rng)
            torch.manual_seed(0)
            model = task.initial_expert(n).to(device)
            params = sum(p.numel() for p in model.parameters())
            optimizer = build_optimizer(model, recipe)
            tensors = {k: torch.as_tensor(v, device=device) for k, v in {"x": xs[n], **targets}.items()}

            def train_step():
                model.train()
                loss = task.train_loss(n, model, tensors)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                return float(loss.detach())

            _reset_peak(device)
            timing = _timed(train_step, device, repeats)
            rows.append(_row(name, expert, f"train ({recipe.optimizer})", b, timing, device, timing[2], params))
            _print_row(rows[-1])
            model.eval()
            _reset_peak(device)
            timing = _timed(lambda: task.serve_expert(n, model, xs[n], device), device, repeats)
            total = float(sum(np.abs(np.asarray(o, dtype=np.float64)).sum() for o in timing[2]))
            rows.append(_row(name, expert, "serve", b, timing, device, total, params))
            _print_row(rows[-1])
            del model, optimizer, tensors
        d = task.data_costs()
        bias = select_bias(d, np.log(d), float(d.mean()))  # performance rising with data: a mix of experts
        _, _, gate_np = SYNTHETIC[name](task, gate_batch, rng)
        losses = torch.as_tensor(rng.uniform(0.5, 1.5, (gate_batch, len(d))), dtype=torch.float32, device=device)
        scores = torch.as_tensor(rng.normal(size=(gate_batch, len(d))), dtype=torch.float32, device=device)
        for method in (m for m in TABLE if m.trains_gate):
            torch.manual_seed(0)
            gate = build_gate(task.gate_spec(), 1.0).to(device)
            params = sum(p.numel() for p in gate.parameters())
            optimizer = torch.optim.Adam(gate.parameters(), lr=PAPER_GATE_LR)
            gen = torch.Generator().manual_seed(0)

            def gate_train_step():
                x = augment(task, to_device(task, gate_np, device), gen)
                if method.gate_output == "scores":  # lagrange: regress every expert's score
                    gate.train()
                    optimizer.zero_grad(set_to_none=True)
                    loss = score_loss(gate(x), scores)
                    loss.backward()
                    optimizer.step()
                    return float(loss.detach())
                return gate_step(gate, optimizer, x, losses, method.name, bias, W_BIAS)["loss"]

            _reset_peak(device)
            timing = _timed(gate_train_step, device, repeats)
            rows.append(_row(name, f"gate {method.name}", "gate step", gate_batch, timing, device, timing[2], params))
            _print_row(rows[-1])
            del gate, optimizer
    report = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "profile": "paper", "repeats": repeats, "wall_s": time.perf_counter() - started, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    bad = [f"{r['task']} {r['part']} {r['step']}" for r in rows if not r["finite"]]
    print(f"value: the step's loss, or the sum of |outputs| of a serving batch. {len(rows)} steps on {report['device']} "
          f"in {report['wall_s']:.0f} s, {len(bad)} not finite{': ' + ', '.join(bad) if bad else ''}; written to {out}")
    return report


HEADER = (f"{'task':<10} {'part':<16} {'step':<12} {'batch':>5} {'params M':>8} {'first ms':>9} {'mean ms':>9} "
          f"{'peak MiB':>8} {'value':>10}")


def _print_row(row: dict) -> None:
    """One line of the table, printed as the step ends (a slow model shows where it is)."""
    mean = "-" if row["mean_ms"] is None else f"{row['mean_ms']:.1f}"
    peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
    print(f"{row['task']:<10} {row['part']:<16} {row['step']:<12} {row['batch']:>5} {row['params_m']:>8.2f} "
          f"{row['first_ms']:>9.1f} {mean:>9} {peak:>8} {row['value']:>10.4g}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    ex = sub.add_parser("export", help="here: a batch of each smoke run's shards and cache as .npz")
    ex.add_argument("--root-template", required=True, help="smoke run root per task; {task} is replaced")
    ex.add_argument("--out", type=Path, default=Path(".gpucheck"))
    ch = sub.add_parser("check", help="on the GPU machine: CUDA against CPU")
    ch.add_argument("--data", type=Path, default=Path(".gpucheck"))
    ch.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu_check.json")
    ch.add_argument("--accelerator", default="cuda", help="cuda; cpu for a dry run here")
    pa = sub.add_parser("paper", help="on the GPU machine: one step of every paper-profile model (no export)",
                        description=__doc__[__doc__.index("paper (one step"):],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pa.add_argument("--accelerator", default="cuda", choices=("cuda", "cpu"), help="cuda; cpu for a dry run here")
    pa.add_argument("--task", action="append", choices=TASKS, help="repeatable; default: every task")
    pa.add_argument("--batch", type=int, default=None, help="expert batch; default: each expert's recipe (the paper's)")
    pa.add_argument("--gate-batch", type=int, default=PAPER_GATE_BATCH)
    pa.add_argument("--repeats", type=int, default=3, help="timed calls after the first (0: the first only)")
    pa.add_argument("--out", type=Path, default=None, help="default: bench/results/gpu_check_paper-<accelerator>.json")
    args = parser.parse_args()
    if args.step == "export":
        export(args.root_template, args.out)
    elif args.step == "check":
        check(args.data, args.out, args.accelerator)
    else:
        if min(args.batch or 2, args.gate_batch) < 2 or args.repeats < 0:
            parser.error("--batch and --gate-batch must be at least 2 (BatchNorm trains on 2 or more), --repeats >= 0")
        out = args.out or Path(__file__).resolve().parent / "results" / f"gpu_check_paper-{args.accelerator}.json"
        check_paper(args.accelerator, args.task or list(TASKS), args.batch, args.gate_batch, args.repeats, out)


if __name__ == "__main__":
    main()
