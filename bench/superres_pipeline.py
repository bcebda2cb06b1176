"""Super-resolution pipeline benchmark: the cost of one gate-training trial with the expert
cache vs running the experts at every step. (Prepare's throughput, Ray Data against a plain
loop, is measured at DIV2K's scale by bench/scale.py.)

Why the figure matters: the expert cache (pipelines/cache.py) is the pipeline's main performance
lever. A sweep runs many gate-training trials (method x d_t x batch size x width x lr); with the
cache each trial reads every expert's per-sample loss and metric terms from a table, without it
every trial must run all N frozen experts on every training batch and again on validation and
test inputs. This times one `enforce` trial both ways on the same data, gate, batches and
epochs, so the ratio is the factor the cache saves on every trial of every sweep.

A `smoke` run (prepare, train-experts, cache; timed as setup) is made in a temporary root, or an
existing run root is reused with --root. The sweep's trial function
(pipelines.gate_trial._train_biased_gate, method `enforce`, the demo grid's batch size, lr and
width) is timed against a variant in this file that reads the P_n shards and runs the three
frozen experts per batch (per-sample MSE, as the cache's loss) and on validation/test routing.
Both use one torch thread, as sweep trials do by default.

Run from the repository root:  .venv/bin/python bench/superres_pipeline.py [--root RUN_ROOT]
Writes bench/results/superres_pipeline.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from pipelines.runtime import RunConfig, quiet_environment  # noqa: E402
from tasks import GATE_SPLIT, SPLITS, get_task  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "superres_pipeline.json"


@contextlib.contextmanager
def _timed(store: dict, key: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        store[key] = time.perf_counter() - start


def start_ray(work: Path) -> float:
    """The one local Ray instance of this benchmark; returns its start-up time."""
    import logging

    quiet_environment()  # before ray.init: the workers inherit the Parquet datasource setting
    import ray
    import ray.data

    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(work / "ray"))
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # display only: keeps the printed table readable
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return time.perf_counter() - started


# -- part 2: sweep trial, cached vs experts at every step ---------------------------------------

def setup_run(work: Path) -> tuple[RunConfig, dict]:
    """A smoke run in a temporary root: prepare, train-experts, cache."""
    from pipelines.cache import cache
    from pipelines.prepare import prepare
    from pipelines.train_experts import train_experts

    cfg = RunConfig(task_name="superres", root=str(work / "smoke"), profile="smoke")
    print(f"\n== part 2 setup: smoke run (prepare, train-experts, cache) in {cfg.root} ==")
    times = {}
    for name, stage in (("prepare", prepare), ("train_experts", train_experts), ("cache", cache)):
        with _timed(times, f"{name}_s"):
            stage(cfg)
    return cfg, times


def _to_float(x):
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1], as the task feeds its experts."""
    return x.permute(0, 3, 1, 2).float() / 255.0


def load_expert_inputs(cfg: RunConfig, task, split: str, sample_ids) -> dict:
    """The P_n inputs and targets of one split from the Parquet shards, in the cache's row order."""
    import ray.data  # noqa: F401  registers Ray's Arrow tensor types: tensor columns read as ndarrays
    import torch

    from storage import read_table

    out = {"x": []}
    for n in range(len(task.expert_names())):
        frame = read_table(cfg.layout.shards(split, f"p{n}"), ["sample_id", "x"]).to_pandas()
        frame = frame.set_index("sample_id").loc[sample_ids]
        out["x"].append(torch.as_tensor(np.stack(frame["x"].to_numpy())))
    frame = read_table(cfg.layout.shards(split, "target"), ["sample_id", *task.target_columns]).to_pandas()
    frame = frame.set_index("sample_id").loc[sample_ids]
    out["hr"] = torch.as_tensor(np.stack(frame["hr"].to_numpy()))
    for c in ("row", "col", "img_h", "img_w"):
        out[c] = frame[c].to_numpy()
    return out


def expert_trial(task, config, data: dict, inputs: dict, experts: list, d) -> dict:
    """_train_biased_gate without the cache: the frozen experts run on every training batch (their
    per-sample losses feed the same gate_step), on the whole validation split for p_val (eqs. 6-8),
    and on the inputs each expert is routed in validation (per epoch) and test."""
    import pandas as pd
    import torch

    from bmoe.bias import select_bias
    from bmoe.gating import build_gate, enforced_gates, gate_step
    from bmoe.routing import enforce_bias
    from pipelines.gate_trial import SplitData, _batches, _point, expert_performance, gate_logits, to_device

    n_experts = len(experts)
    cpu = torch.device("cpu")
    timers = {"train_expert_s": 0.0, "eval_expert_s": 0.0}

    def evaluate(split: str, n: int, idx: np.ndarray) -> dict:
        started = time.perf_counter()
        src = inputs[split]
        batch = {"x": src["x"][n][idx], "hr": src["hr"][idx].numpy(),
                 **{c: src[c][idx] for c in ("row", "col", "img_h", "img_w")}}
        with torch.no_grad():
            columns = task.evaluate(n, experts[n], batch, cpu)
        timers["eval_expert_s"] += time.perf_counter() - started
        return columns

    def frame(split: str, assignment: np.ndarray | None) -> SplitData:
        """A cache-like table built by running the experts: all of them (assignment None) or only
        the expert each input is routed to (the others' columns stay 0 and are never read)."""
        cache = data[split].cache[["sample_id", "group"]].copy()
        M = len(cache)
        losses = np.zeros((M, n_experts))
        cols = {f"{c}_{n}": np.zeros(M) for c in ("loss", "score", "sse_y", "count_y", "sse_rgb", "count_rgb")
                for n in range(n_experts)}
        for n in range(n_experts):
            idx = np.arange(M) if assignment is None else np.flatnonzero(assignment == n)
            if len(idx):
                for c, v in evaluate(split, n, idx).items():
                    cols[f"{c}_{n}"][idx] = v
                losses[idx, n] = cols[f"loss_{n}"][idx]
        return SplitData(gate_inputs=data[split].gate_inputs, cache=pd.concat([cache, pd.DataFrame(cols, index=cache.index)], axis=1),
                         losses=losses, scores=None)

    d_t = float(config.d_target)
    p_val = expert_performance(task, frame("val", None))
    b = select_bias(d, p_val, d_t)
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    gate = build_gate(task.gate_spec(), config.width)
    optimizer = torch.optim.Adam(gate.parameters(), lr=config.lr)
    xs, hr_train = inputs[GATE_SPLIT]["x"], inputs[GATE_SPLIT]["hr"]
    M = len(data[GATE_SPLIT].gate_inputs)
    batch = min(config.batch_size, M)

    def route(split: str) -> np.ndarray:
        logits = gate_logits(task, gate, data[split], cpu)
        return enforce_bias(enforced_gates(logits, b), b).numpy()

    best, best_state, steps = -np.inf, None, 0
    for _epoch in range(config.epochs):
        for rows, x in _batches(data[GATE_SPLIT], batch, gen):
            idx = torch.from_numpy(rows)
            started = time.perf_counter()
            with torch.no_grad():
                hr = _to_float(hr_train[idx])
                losses = torch.stack([((experts[n](_to_float(xs[n][idx])).clamp(0, 1) - hr) ** 2).mean(dim=(1, 2, 3))
                                      for n in range(n_experts)], dim=1)  # (B, N) per-sample MSE
            timers["train_expert_s"] += time.perf_counter() - started
            # the cached trial divides by the train-set mean loss (known from the cache); without a
            # cache that needs a full expert pass first, so the batch mean stands in (a scale only)
            losses = losses / losses.mean().clamp_min(1e-12)
            gate_step(gate, optimizer, to_device(task, x, cpu), losses, "enforce", b, config.w_bias)
            steps += 1
        assignment = route("val")
        val = _point(task, frame("val", assignment), assignment, d, d_t, b)
        if val["performance"] > best:
            best, best_state = val["performance"], {k: v.clone() for k, v in gate.state_dict().items()}
    if best_state is not None:
        gate.load_state_dict(best_state)
    assignment = route("test")
    point = _point(task, frame("test", assignment), assignment, d, d_t, b)
    return {"points": [point], "val_performance": best, "steps": steps, **timers}


def bench_trials(cfg: RunConfig, epochs: int, repeats: int) -> dict:
    import torch

    from pipelines.gate_trial import _train_biased_gate, expert_performance
    from pipelines.methods import TrialConfig
    from pipelines.grid import GRIDS, targets
    from pipelines.sweep import TRIAL_SPLITS, load_split
    from pipelines.train_experts import load_expert

    task = get_task(cfg.task_name, cfg.profile)
    grid = GRIDS["demo"]
    d = task.data_costs()
    grid_targets = targets(d, grid.points)
    d_t = grid_targets[len(grid_targets) // 2]
    config = TrialConfig(task_name=cfg.task_name, profile=cfg.profile, method="enforce", d_target=d_t,
                         batch_size=grid.batch_sizes[0], lr=grid.lrs[0], width=grid.widths[0], epochs=epochs)
    print(f"\n== part 2: one `enforce` trial, {epochs} epochs, from {cfg.root} (profile {cfg.profile}) ==")
    load = {}
    with _timed(load, "cache_load_s"):
        data = {split: load_split(cfg, task, split) for split in TRIAL_SPLITS}
    with _timed(load, "shard_load_s"):
        inputs = {split: load_expert_inputs(cfg, task, split, data[split].cache["sample_id"]) for split in TRIAL_SPLITS}
    with _timed(load, "expert_load_s"):
        experts = [load_expert(task, n, cfg.layout.weights(n)) for n in range(len(d))]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as run_trial: sweep trials share the cores, one thread each
    try:
        # untimed check: the per-batch expert losses are the cached ones (same experts, same inputs)
        with torch.no_grad():
            hr = _to_float(inputs[GATE_SPLIT]["hr"])
            fresh = np.stack([((m(_to_float(inputs[GATE_SPLIT]["x"][n])).clamp(0, 1) - hr) ** 2).mean(dim=(1, 2, 3)).numpy()
                              for n, m in enumerate(experts)], axis=1)
        loss_rel_err = float(np.max(np.abs(fresh - data[GATE_SPLIT].losses)
                                    / np.maximum(data[GATE_SPLIT].losses, 1e-12)))

        cached_times, expert_times, cached_result, expert_result = [], [], None, None
        for _ in range(repeats):
            started = time.perf_counter()
            p_val = expert_performance(task, data["val"])  # as run_trial, inside the trial
            cached_result = _train_biased_gate(task, config, data, d, p_val, lambda metrics: None,
                                               torch.device("cpu"))
            cached_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            expert_result = expert_trial(task, config, data, inputs, experts, d)
            expert_times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    M = len(data[GATE_SPLIT].losses)
    batch = min(config.batch_size, M)
    cached_s, expert_s = statistics.median(cached_times), statistics.median(expert_times)
    return {
        "root": str(cfg.root), "profile": cfg.profile, "config": config.as_tune(),
        "samples": {s: len(data[s].losses) for s in TRIAL_SPLITS}, "batch": batch, "steps_per_epoch": M // batch,
        "steps": expert_result["steps"], "repeats": repeats, **load,
        "cached_s_per_trial": cached_s, "cached_s_all": cached_times,
        "expert_s_per_trial": expert_s, "expert_s_all": expert_times,
        "expert_over_cached": expert_s / cached_s,
        "expert_train_forward_s": expert_result["train_expert_s"], "expert_eval_s": expert_result["eval_expert_s"],
        "cached_test_performance": cached_result.points[0].performance,
        "expert_test_performance": expert_result["points"][0]["performance"],
        "expert_loss_vs_cache_max_rel_err": loss_rel_err,
        "notes": "cached: pipelines.gate_trial._train_biased_gate + expert_performance (what run_trial does). "
                 "experts: same gate, batches, epochs and gate_step, experts run per batch, on all of val for "
                 "p_val, and on their routed val (per epoch) and test inputs; experts loaded and shards read "
                 "before timing (a lower bound on an uncached trial). Losses scaled by the batch mean instead "
                 "of the train-set mean, so test performance can differ slightly.",
    }


# -- report ------------------------------------------------------------------------------------

def print_table(result: dict) -> None:
    s = result.get("sweep")
    print(f"\nsuperres pipeline benchmark, {result['date']}: torch {result['torch_version']}, "
          f"ray {result['ray_version']}, {result['cpu_count']} CPUs, load avg {result['loadavg_start']} "
          f"-> {result['loadavg_end']}")
    print(f"ray.init: {result['ray_init_s']:.1f} s (once, not in the figures below)")
    if s:
        if "setup" in s:
            print("\n   part 2 setup (smoke run): " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in s["setup"].items()))
        c = s["config"]
        print(f"\nsweep trial, method enforce, d_t {c['d_target']:.0f} B, batch {s['batch']} (grid {c['batch_size']}), "
              f"lr {c['lr']}, width {c['width']}, {c['epochs']} epochs x {s['steps_per_epoch']} steps; "
              f"gate/val/test {s['samples']['gate']}/{s['samples']['val']}/{s['samples']['test']}; "
              f"profile {s['profile']}; median of {s['repeats']}")
        print(f"   {'contender':<34} {'s/trial':>8} {'test PSNR':>10}")
        print(f"   {'from the cache (_train_biased_gate)':<34} {s['cached_s_per_trial']:>8.3f} "
              f"{s['cached_test_performance']:>10.3f}")
        print(f"   {'experts at every step':<34} {s['expert_s_per_trial']:>8.3f} {s['expert_test_performance']:>10.3f}")
        print(f"   ratio experts / cache: {s['expert_over_cached']:.1f}x  (expert forward in training "
              f"{s['expert_train_forward_s']:.3f} s, in val/test evaluation {s['expert_eval_s']:.3f} s, last trial)")
        print(f"   per-batch expert losses vs cached losses: max relative error "
              f"{s['expert_loss_vs_cache_max_rel_err']:.1e}")
    print(f"\nbenchmark wall time {result['wall_s']:.1f} s")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description="Super-resolution pipeline benchmark (2-core friendly, about 2 minutes). Measures "
        "seconds per gate-training sweep trial (method enforce, demo grid's "
        "batch size/lr/width, fixed epochs) reading the expert cache vs running the three frozen "
        "experts on every batch and on validation/test routing, and their ratio. It builds a "
        "smoke run (prepare, train-experts, cache) in a temporary root unless --root names an "
        "existing run root. One local Ray instance (2 CPUs). Prints a table and writes "
        "bench/results/superres_pipeline.json.")
    parser.add_argument("--root", help="existing run root with prepared data, trained experts and a cache "
                        "(e.g. a `bmoe demo` root) to use for part 2 instead of building a smoke run")
    parser.add_argument("--profile", choices=("smoke", "demo", "paper"),
                        help="profile of --root (default: the one in its data manifest)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed trial (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed trials per contender; median (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    args = parser.parse_args(argv)

    import ray
    import torch

    reuse = None
    if args.root:
        profile = args.profile
        if profile is None:
            manifest = Path(args.root).expanduser() / "data" / "superres" / "manifest.json"
            if not manifest.exists():
                parser.error(f"--root {args.root}: no {manifest}; run `bmoe demo` (or prepare/train-experts/cache)")
            profile = json.loads(manifest.read_text())["profile"]
        reuse = RunConfig(task_name="superres", root=args.root, profile=profile)
        if not reuse.layout.cache_stamp().exists():
            parser.error(f"--root {args.root}: no expert cache; run `bmoe cache --root {args.root}` first")

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bsr-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch_version": torch.__version__, "ray_version": ray.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        result["ray_init_s"] = start_ray(work)
        if reuse is None:
            cfg, setup = setup_run(work)
            result["sweep"] = {**bench_trials(cfg, args.epochs, args.repeats), "setup": setup}
        else:
            result["sweep"] = bench_trials(reuse, args.epochs, args.repeats)
    finally:
        ray.shutdown()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = time.perf_counter() - t0
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
