"""Super-resolution pipeline benchmark: prepare throughput (Ray Data vs a plain loop) and the
cost of one gate-training trial with the expert cache vs running the experts at every step.

Why these figures matter:

* The expert cache (pipelines/cache.py) is the pipeline's main performance lever. A sweep runs
  many gate-training trials (method x d_t x batch size x width x lr); with the cache each trial
  reads every expert's per-sample loss and metric terms from a table, without it every trial
  must run all N frozen experts on every training batch and again on validation and test
  inputs. Part 2 times one `enforce` trial both ways on the same data, gate, batches and epochs,
  so the ratio is the factor the cache saves on every trial of every sweep.
* Ray Data's value in prepare (pipelines/prepare.py) is scale-out: the same code runs its
  decode -> patches -> bicubic P_n -> PNG sizes -> Parquet work on many nodes and cores. On a
  2-core machine with a few hundred patches its fixed costs (scheduling, worker start-up and
  imports, one materialised dataset written several times, per-operator overhead) dominate, and
  a single-process loop doing the same work on the same files is faster. Part 1 reports both as
  measured, plus the no-op rerun, which is what a user pays when nothing changed.

Part 1: the `demo` profile's embedded data is written to <tmp>/prep/raw first (timed apart), then
(a) pipelines.prepare.prepare (Ray Data) and (b) a loop over task.load() + pyarrow.parquet both
read those PNG files and write the same rows and columns; the shards are compared afterwards.
Part 2: a `smoke` run (prepare, train-experts, cache; timed as setup) is made in a temporary root,
or an existing run root is reused with --root. The sweep's trial function
(pipelines.gate_trial._train_biased_gate, method `enforce`, the demo grid's batch size, lr and
width) is timed against a variant in this file that reads the P_n shards and runs the three
frozen experts per batch (per-sample MSE, as the cache's loss) and on validation/test routing.
Both use one torch thread, as sweep trials do.

Run from the repository root:  .venv/bin/python bench/superres_pipeline.py [--root RUN_ROOT]
Writes bench/results/superres_pipeline.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import io
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
from tasks import SPLITS, BadInput, get_task  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "superres_pipeline.json"


class _Tee(io.TextIOBase):
    """stdout that is also kept, to check what a stage said (e.g. 'nothing to do')."""

    def __init__(self, stream):
        self.stream, self.kept = stream, io.StringIO()

    def write(self, text):
        self.kept.write(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


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


# -- part 1: prepare ---------------------------------------------------------------------------

def _tensor_column(arrays: list[np.ndarray]) -> tuple[object, dict]:
    """(M, *shape) uint8 tensors as a fixed-size-list column and its field metadata (the shape)."""
    import pyarrow as pa

    stacked = np.stack(arrays)  # (M, *shape)
    shape = stacked.shape[1:]
    flat = pa.array(stacked.reshape(-1))
    column = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(shape)))
    return column, {b"shape": json.dumps(list(shape)).encode()}


def _write_table(columns: dict, folder: Path) -> dict:
    """One Parquet file of `columns` (name -> array or (array, field metadata)) in folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields, arrays = [], []
    for name, value in columns.items():
        array, meta = value if isinstance(value, tuple) else (value, None)
        fields.append(pa.field(name, array.type, metadata=meta))
        arrays.append(array)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "part-00000.parquet"
    pq.write_table(pa.Table.from_arrays(arrays, schema=pa.schema(fields)), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"rows": len(arrays[0]), "files": [{"name": path.name, "bytes": path.stat().st_size, "sha256": digest}]}


def loop_prepare(task, data_root: Path, out: Path) -> dict:
    """The prepare stage's work in one process: list, task.load() every source, write the shards
    of every P_n and the gate per split with pyarrow, checksums and a manifest."""
    import pyarrow as pa

    costs = task.data_costs()
    manifest = {"task": task.name, "splits": {}}
    if out.exists():
        shutil.rmtree(out)
    for split in SPLITS:
        listing = task.list_sources(data_root, split)
        rows, problems = [], list(listing.problems)
        for source in listing.sources:
            try:
                samples = task.load(source)
            except BadInput as err:
                problems.append(str(err))
                continue
            if not samples:
                problems.append(f"{source['source_id']}: produced no samples")
            rows.extend(samples)
        scalars = {
            "sample_id": pa.array([r["sample_id"] for r in rows], pa.string()),
            "group": pa.array([r["group"] for r in rows], pa.string()),
            **{c: pa.array(np.array([r[c] for r in rows], dtype=np.int64)) for c in ("row", "col", "img_h", "img_w")},
        }
        hr = _tensor_column([r["hr"] for r in rows])
        shards = {}
        for n in range(len(costs)):
            columns = {  # the Ray shard's column order: sample_id, group, targets, x, encoded_bytes, cost
                "sample_id": scalars["sample_id"], "group": scalars["group"], "hr": hr,
                **{c: scalars[c] for c in ("row", "col", "img_h", "img_w")},
                "x": _tensor_column([r[f"x{n}"] for r in rows]),
                "encoded_bytes": pa.array(np.array([r[f"enc{n}"] for r in rows], dtype=np.int64)),
                "data_cost_bytes": pa.array(np.full(len(rows), float(costs[n]))),
            }
            shards[f"p{n}"] = _write_table(columns, out / split / f"p{n}")
        shards["gate"] = _write_table({"sample_id": scalars["sample_id"], "group": scalars["group"],
                                       "gate": _tensor_column([r["gate"] for r in rows]),
                                       **{c: scalars[c] for c in task.meta_columns}}, out / split / "gate")
        manifest["splits"][split] = {
            "sources": len(listing.sources), "samples": len(rows), "problems": problems,
            "mean_encoded_bytes": {f"p{n}": float(np.mean([r[f"enc{n}"] for r in rows])) for n in range(len(costs))},
            "shards": shards,
        }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _columns(folder: Path) -> dict[str, np.ndarray]:
    """Every column of a shard folder as numpy, rows sorted by sample_id; tensors as (M, values)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(str(folder))
    out = {}
    for name in table.column_names:
        array = table.column(name).combine_chunks()
        if isinstance(array, pa.ExtensionArray):
            array = array.storage
        if pa.types.is_list(array.type) or pa.types.is_large_list(array.type) \
                or pa.types.is_fixed_size_list(array.type):
            out[name] = array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), -1)
        else:
            out[name] = array.to_numpy(zero_copy_only=False)
    order = np.argsort(out["sample_id"], kind="stable")
    return {k: v[order] for k, v in out.items()}


def compare_shards(ray_dir: Path, loop_dir: Path, parts: list[str]) -> dict:
    """Same rows and the same content in every column of every shard set (untimed check)."""
    mismatches = []
    for split in SPLITS:
        for part in parts:
            a, b = _columns(ray_dir / split / part), _columns(loop_dir / split / part)
            if list(a) != list(b):
                mismatches.append(f"{split}/{part}: columns {list(a)} vs {list(b)}")
                continue
            for name in a:
                if a[name].shape != b[name].shape or not np.array_equal(a[name], b[name]):
                    mismatches.append(f"{split}/{part}/{name}")
    return {"identical": not mismatches, "mismatches": mismatches}


def bench_prepare(work: Path) -> dict:
    from pipelines.prepare import prepare

    task = get_task("superres", "demo")
    root = work / "prep"
    cfg = RunConfig(task="superres", root=str(root), profile="demo")
    t = {}
    with _timed(t, "embed_s"):  # the task writes its embedded images as PNG files: both read these
        raw = task.embedded_data(root / "raw" / "superres")

    print("\n== part 1: prepare (profile demo, embedded data) ==")
    with _timed(t, "ray_s"):
        manifest = prepare(cfg)
    samples = sum(info["samples"] for info in manifest["splits"].values())
    sources = sum(info["sources"] for info in manifest["splits"].values())
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee), _timed(t, "ray_rerun_s"):
        again = prepare(cfg)
    rerun_noop = "nothing to do" in tee.kept.getvalue() and again.get("created") == manifest.get("created")

    print("prepare: plain loop (task.load + pyarrow.parquet, one process) on the same PNG files")
    loop_out = work / "loop" / "data" / "superres"
    with _timed(t, "loop_s"):
        loop_manifest = loop_prepare(task, raw, loop_out)
    loop_samples = sum(info["samples"] for info in loop_manifest["splits"].values())
    check = compare_shards(cfg.layout.data(), loop_out, [f"p{n}" for n in range(len(task.data_costs()))] + ["gate"])
    ray_pps, loop_pps = samples / t["ray_s"], loop_samples / t["loop_s"]
    return {
        "profile": "demo", "sources": sources, "samples": samples, "loop_samples": loop_samples,
        "samples_per_split": {s: info["samples"] for s, info in manifest["splits"].items()},
        "embed_s": t["embed_s"], "ray_s": t["ray_s"], "loop_s": t["loop_s"], "ray_rerun_s": t["ray_rerun_s"],
        "ray_rerun_said_nothing_to_do": rerun_noop,
        "ray_patches_per_s": ray_pps, "loop_patches_per_s": loop_pps, "ray_over_loop": ray_pps / loop_pps,
        "ray_shard_files": sum(len(sh["files"]) for info in manifest["splits"].values()
                               for sh in info["shards"].values()),
        "loop_shard_files": sum(len(sh["files"]) for info in loop_manifest["splits"].values()
                                for sh in info["shards"].values()),
        "shards_compared": check,
        "notes": "Ray time includes everything pipelines.prepare.prepare does after ray.init (listing, "
                 "fingerprint, Ray Data flat_map + materialize, 4 write_parquet per split, checksums); the loop "
                 "writes one file per shard set with tensors as fixed_size_list<uint8> (Ray: its tensor "
                 "extension type over large_list<uint8>); same rows and values, checked after timing.",
    }


# -- part 2: sweep trial, cached vs experts at every step ---------------------------------------

def setup_run(work: Path) -> tuple[RunConfig, dict]:
    """A smoke run in a temporary root: prepare, train-experts, cache."""
    from pipelines.cache import cache
    from pipelines.prepare import prepare
    from pipelines.train_experts import train_experts

    cfg = RunConfig(task="superres", root=str(work / "smoke"), profile="smoke")
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
        columns = ["sample_id", "x"] + (list(task.target_columns) if n == 0 else [])
        frame = read_table(cfg.layout.shards(split, f"p{n}"), columns).to_pandas().set_index("sample_id").loc[sample_ids]
        out["x"].append(torch.as_tensor(np.stack(frame["x"].to_numpy())))
        if n == 0:
            out["hr"] = torch.as_tensor(np.stack(frame["hr"].to_numpy()))
            for c in ("row", "col", "img_h", "img_w"):
                out[c] = frame[c].to_numpy()
    return out


def expert_trial(task, config: dict, data: dict, inputs: dict, experts: list, d) -> dict:
    """_train_biased_gate without the cache: the frozen experts run on every training batch (their
    per-sample losses feed the same gate_step), on the whole validation split for p_val (eqs. 6-8),
    and on the inputs each expert is routed in validation (per epoch) and test."""
    import pandas as pd
    import torch

    from bmoe.bias import select_bias
    from bmoe.gating import build_gate, enforced_gates, gate_step
    from bmoe.routing import enforce_bias
    from pipelines.gate_trial import SplitData, _batches, _point, expert_performance

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
        return SplitData(gate=data[split].gate, cache=pd.concat([cache, pd.DataFrame(cols, index=cache.index)], axis=1),
                         losses=losses, scores=None)

    d_t = float(config["d_target"])
    p_val = expert_performance(task, frame("val", None))
    b = select_bias(d, p_val, d_t)
    gen = torch.Generator().manual_seed(int(config.get("seed", 0)))
    torch.manual_seed(int(config.get("seed", 0)))
    gate = build_gate(task.gate_spec(), config["width"])
    optimizer = torch.optim.Adam(gate.parameters(), lr=config["lr"])
    x_train = task.gate_tensor(data["train"].gate)
    xs, hr_train = inputs["train"]["x"], inputs["train"]["hr"]
    M = len(x_train)
    batch = min(int(config["batch_size"]), M)

    def route(split: str) -> np.ndarray:
        gate.eval()
        with torch.no_grad():
            logits = gate(task.gate_tensor(data[split].gate))
        return enforce_bias(enforced_gates(logits, b), b).numpy()

    best, best_state, steps = -np.inf, None, 0
    for _epoch in range(int(config["epochs"])):
        for idx in _batches(M, batch, gen):
            started = time.perf_counter()
            with torch.no_grad():
                hr = _to_float(hr_train[idx])
                losses = torch.stack([((experts[n](_to_float(xs[n][idx])).clamp(0, 1) - hr) ** 2).mean(dim=(1, 2, 3))
                                      for n in range(n_experts)], dim=1)  # (B, N) per-sample MSE
            timers["train_expert_s"] += time.perf_counter() - started
            # the cached trial divides by the train-set mean loss (known from the cache); without a
            # cache that needs a full expert pass first, so the batch mean stands in (a scale only)
            losses = losses / losses.mean().clamp_min(1e-12)
            gate_step(gate, optimizer, x_train[idx], losses, "enforce", b, config.get("w_bias", 0.0))
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
    from pipelines.sweep import GRIDS, load_split, targets
    from pipelines.train_experts import load_expert

    task = get_task(cfg.task, cfg.profile)
    grid = GRIDS["demo"]
    d = task.data_costs()
    grid_targets = targets(d, grid.points)
    d_t = grid_targets[len(grid_targets) // 2]
    config = {"task": cfg.task, "profile": cfg.profile, "method": "enforce", "d_target": d_t,
              "batch_size": grid.batch_sizes[0], "lr": grid.lrs[0], "width": grid.widths[0], "w_bias": 0.0,
              "epochs": epochs, "seed": 0}
    print(f"\n== part 2: one `enforce` trial, {epochs} epochs, from {cfg.root} (profile {cfg.profile}) ==")
    load = {}
    with _timed(load, "cache_load_s"):
        data = {split: load_split(cfg, task, split) for split in SPLITS}
    with _timed(load, "shard_load_s"):
        inputs = {split: load_expert_inputs(cfg, task, split, data[split].cache["sample_id"]) for split in SPLITS}
    with _timed(load, "expert_load_s"):
        experts = [load_expert(task, n, cfg.layout.weights(n)) for n in range(len(d))]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as run_trial: sweep trials share the cores, one thread each
    try:
        # untimed check: the per-batch expert losses are the cached ones (same experts, same inputs)
        with torch.no_grad():
            hr = _to_float(inputs["train"]["hr"])
            fresh = np.stack([((m(_to_float(inputs["train"]["x"][n])).clamp(0, 1) - hr) ** 2).mean(dim=(1, 2, 3)).numpy()
                              for n, m in enumerate(experts)], axis=1)
        loss_rel_err = float(np.max(np.abs(fresh - data["train"].losses) / np.maximum(data["train"].losses, 1e-12)))

        cached_times, expert_times, cached_result, expert_result = [], [], None, None
        for _ in range(repeats):
            started = time.perf_counter()
            p_val = expert_performance(task, data["val"])  # as run_trial, inside the trial
            cached_result = _train_biased_gate(task, config, data, d, p_val, lambda metrics: None)
            cached_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            expert_result = expert_trial(task, config, data, inputs, experts, d)
            expert_times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    M = len(data["train"].losses)
    batch = min(config["batch_size"], M)
    cached_s, expert_s = statistics.median(cached_times), statistics.median(expert_times)
    return {
        "root": str(cfg.root), "profile": cfg.profile, "config": config,
        "samples": {s: len(data[s].losses) for s in SPLITS}, "batch": batch, "steps_per_epoch": M // batch,
        "steps": expert_result["steps"], "repeats": repeats, **load,
        "cached_s_per_trial": cached_s, "cached_s_all": cached_times,
        "expert_s_per_trial": expert_s, "expert_s_all": expert_times,
        "expert_over_cached": expert_s / cached_s,
        "expert_train_forward_s": expert_result["train_expert_s"], "expert_eval_s": expert_result["eval_expert_s"],
        "cached_test_performance": cached_result["points"][0]["performance"],
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
    p, s = result.get("prepare"), result.get("sweep")
    print(f"\nsuperres pipeline benchmark, {result['date']}: torch {result['torch_version']}, "
          f"ray {result['ray_version']}, {result['cpu_count']} CPUs, load avg {result['loadavg_start']} "
          f"-> {result['loadavg_end']}")
    print(f"ray.init: {result['ray_init_s']:.1f} s (once, not in the figures below)")
    if p:
        print(f"\n1. prepare, profile demo: {p['samples']} patches from {p['sources']} images "
              f"(embedded PNGs written first: {p['embed_s']:.1f} s)")
        print(f"   {'contender':<34} {'seconds':>8} {'patches/s':>10} {'files':>6}")
        print(f"   {'(a) Ray Data: prepare()':<34} {p['ray_s']:>8.2f} {p['ray_patches_per_s']:>10.1f} "
              f"{p['ray_shard_files']:>6}")
        print(f"   {'(b) plain loop: load + pyarrow':<34} {p['loop_s']:>8.2f} {p['loop_patches_per_s']:>10.1f} "
              f"{p['loop_shard_files']:>6}")
        print(f"   ratio Ray / loop (patches/s): {p['ray_over_loop']:.2f}")
        print(f"   Ray prepare rerun, same root: {p['ray_rerun_s']:.2f} s "
              f"({'said nothing to do' if p['ray_rerun_said_nothing_to_do'] else 'DID WORK'})")
        print(f"   shards identical in rows and values: {p['shards_compared']['identical']}"
              + (f" ({', '.join(p['shards_compared']['mismatches'][:4])})" if not p['shards_compared']['identical'] else ""))
    if s:
        if "setup" in s:
            print("\n   part 2 setup (smoke run): " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in s["setup"].items()))
        c = s["config"]
        print(f"\n2. sweep trial, method enforce, d_t {c['d_target']:.0f} B, batch {s['batch']} (grid {c['batch_size']}), "
              f"lr {c['lr']}, width {c['width']}, {c['epochs']} epochs x {s['steps_per_epoch']} steps; "
              f"train/val/test {s['samples']['train']}/{s['samples']['val']}/{s['samples']['test']}; "
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
        description="Super-resolution pipeline benchmark (2-core friendly, about 3 minutes). Measures "
        "(1) prepare throughput in patches/s on the demo profile's embedded images: Ray Data "
        "(pipelines.prepare.prepare on a fresh temporary root) vs a plain single-process loop "
        "(task.load + pyarrow.parquet) on the same PNG files, their ratio, and the no-op rerun time "
        "of the Ray prepare; (2) seconds per gate-training sweep trial (method enforce, demo grid's "
        "batch size/lr/width, fixed epochs) reading the expert cache vs running the three frozen "
        "experts on every batch and on validation/test routing, and their ratio. Part 2 builds a "
        "smoke run (prepare, train-experts, cache) in a temporary root unless --root names an "
        "existing run root. One local Ray instance (2 CPUs). Prints a table and writes "
        "bench/results/superres_pipeline.json.")
    parser.add_argument("--root", help="existing run root with prepared data, trained experts and a cache "
                        "(e.g. a `bmoe demo` root) to use for part 2 instead of building a smoke run")
    parser.add_argument("--profile", choices=("smoke", "demo", "paper"),
                        help="profile of --root (default: the one in its data manifest)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed trial (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed trials per contender; median (default 3)")
    parser.add_argument("--skip-prepare", action="store_true", help="skip part 1")
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
        reuse = RunConfig(task="superres", root=args.root, profile=profile)
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
        if not args.skip_prepare:
            result["prepare"] = bench_prepare(work)
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
