"""Scale benchmark: superres on DIV2K-sized images (2040x1356, 651 patches of 64x64 each).

DIV2K cannot be downloaded here, so the bench draws procedural images of DIV2K's size (the
embedded data's generator) and writes them as PNG in DIV2K's folder layout, with `n` images in
train and 2 each in val and test. The `paper` profile keeps them at full size.

Part 1, prepare: for n = 8, 32, 96 (--sizes), (a) pipelines.prepare.prepare (Ray Data, one
streaming pass) and (b) a single-process loop doing the same work on the same files (task.load
of every image, pipelines.shard_writer.ShardWriter with the same target sizes), measured side
by side; afterwards every shard set of both is read back and checked equal row by row. A
sampler thread records, every 0.2 s, the RSS of this process (Ray's driver) and of the largest
Ray worker process, and the growth of /dev/shm (Ray's object store). The loop runs in a fresh
process (its time and peak RSS are its own), and so does the check.
Ray is started once and warmed up on a 2-image set first (workers import the task once per
process, as on a long-lived cluster); its start-up time is reported apart.

Part 2, a sweep trial: an `enforce` trial (the demo grid's batch size, width and lr) on the
train split of the 8-image and the 32-image runs (1x and 4x), each in a fresh process that
streams its inputs from the shards (pipelines.gate_trial.load_split + run_trial, as a Tune
trial does, without Tune), with its wall time and peak RSS. Its experts are trained once, for
one epoch at width 0.25, on the 8-image run and scored over both runs by the cache stage:
the trial's cost does not depend on how good they are.

Run from the repository root:  .venv/bin/python bench/scale.py [--sizes 8,32,96]
Writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from pipelines.runtime import RunConfig, quiet_environment  # noqa: E402
from tasks import GATE_SPLIT, SOURCE_SPLITS, SPLITS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"
HEIGHT, WIDTH = 1356, 2040  # a DIV2K-sized image: 21 x 31 = 651 patches
OPTIONS = {"expert_width": 0.25, "epochs": 1}  # the experts only feed the trial bench (part 2)
TRIAL = {"method": "enforce", "batch_size": 64, "lr": 1e-3, "width": 0.5, "epochs": 2, "seed": 0}


# -- data ---------------------------------------------------------------------------------------

def write_images(root: Path, n_train: int, n_eval: int = 2) -> Path:
    """n_train (+ 2 x n_eval) procedural 2040x1356 PNGs in DIV2K's layout under root."""
    from tasks.superres.synthetic import procedural_image, write_div2k_tree

    splits = {}
    for split, count in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        splits[split] = [(f"{split}{i:04d}", procedural_image(np.random.default_rng([7, SOURCE_SPLITS.index(split), i]),
                                                             HEIGHT, WIDTH)) for i in range(count)]
    return write_div2k_tree(root, splits)


# -- memory -------------------------------------------------------------------------------------

class MemorySampler:
    """Peak RSS of this process and of the largest Ray worker, and peak /dev/shm growth."""

    def __init__(self, period: float = 0.2):
        import psutil

        self.psutil, self.period = psutil, period
        self.me = psutil.Process()
        self._stop = threading.Event()
        self.shm_base = self._shm()
        self.driver = self.worker = self.shm = 0

    @staticmethod
    def _shm() -> int:
        return shutil.disk_usage("/dev/shm").used if os.path.isdir("/dev/shm") else 0

    def _sample(self) -> None:
        self.driver = max(self.driver, self.me.memory_info().rss)
        for child in self.me.children(recursive=True):
            try:
                if child.name().startswith("ray::") or "default_worker" in " ".join(child.cmdline()[:3]):
                    self.worker = max(self.worker, child.memory_info().rss)
            except self.psutil.Error:
                continue
        self.shm = max(self.shm, self._shm() - self.shm_base)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self) -> "MemorySampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def figures(self) -> dict:
        return {"driver_rss_mb": round(self.driver / 2**20, 1), "largest_worker_rss_mb": round(self.worker / 2**20, 1),
                "object_store_shm_mb": round(self.shm / 2**20, 1)}


# -- part 1: prepare ----------------------------------------------------------------------------

def _helper(*args: str) -> dict:
    """This script in a fresh process (a loop prepare, a check, a trial); its last line's JSON."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def loop_in_process(data_root: str, out: str) -> dict:
    cfg = RunConfig(task_name="superres", root=str(Path(out) / "unused"), profile="paper", data_root=data_root,
                    task_options=OPTIONS)
    import ray.data.block  # noqa: F401  imports done before the clock starts, as Ray's warm workers have them

    import pipelines.prepare  # noqa: F401
    import pipelines.shard_writer  # noqa: F401

    cfg.task()
    started = time.perf_counter()
    loop_prepare(cfg, Path(out))
    return {"seconds": round(time.perf_counter() - started, 2), "peak_rss_mb": _peak_rss_mb()}


def loop_prepare(cfg: RunConfig, out: Path) -> dict:
    """Prepare's work in this one process: every image loaded once by task.load, its rows
    written by the same ShardWriter Ray's write tasks use. Returns {split: {part: rows}}."""
    from pipelines.prepare import _data_root, list_splits
    from pipelines.shard_writer import ShardColumns, ShardSizes, ShardWriter, rows_to_block

    task = cfg.task()
    columns = ShardColumns.of(task)
    counts = {}
    for split, listing in list_splits(task, _data_root(cfg, task)).items():
        folders = {part: out / split / part for part in columns.parts()}
        writer = ShardWriter(folders, columns, ShardSizes(), prefix="loop")
        for source in listing.sources:
            rows = task.load(source)
            for row in rows:
                row["source_id"] = source["source_id"]
            writer.add(rows_to_block(rows))
        written = writer.close()
        counts[split] = {part: sum(f["rows"] for f in files) for part, files in written["files"].items()}
    return counts


def same_shards(ray_data: Path, loop_data: Path) -> int:
    """Every shard set of both holds the same rows (sorted by sample_id); returns rows compared."""
    import pyarrow.parquet as pq

    compared = 0
    for split in SPLITS:
        for folder in sorted((ray_data / split).iterdir()):
            if not folder.is_dir():
                continue
            ours = pq.read_table(folder).sort_by("sample_id")
            theirs = pq.read_table(loop_data / split / folder.name).sort_by("sample_id")
            if not ours.equals(theirs):
                raise AssertionError(f"{split}/{folder.name}: Ray Data's shards differ from the loop's")
            compared += len(ours)
    return compared


def bench_prepare(work: Path, n: int, loop: bool = True) -> dict:
    """Ray Data prepare and the loop on the same n-image data set; shards checked equal."""
    from pipelines.prepare import prepare

    data_root = write_images(work / f"div2k-{n}", n)
    cfg = RunConfig(task_name="superres", root=str(work / f"run-{n}"), profile="paper", data_root=str(data_root),
                    task_options=OPTIONS)
    result = {"images": {"train": n, "val": 2, "test": 2}}
    with MemorySampler() as ray_memory:
        started = time.perf_counter()
        manifest = prepare(cfg)
        result["ray_seconds"] = round(time.perf_counter() - started, 2)
    result["ray_memory"] = ray_memory.figures()
    patches = sum(info["samples"] for info in manifest["splits"].values())
    result["patches"] = patches
    result["ray_files"] = {part: len(shard["files"]) for part, shard in manifest["splits"]["train"]["shards"].items()}
    if not loop:
        print(f"prepare n={n:3d}: {patches} patches  Ray {result['ray_seconds']:7.1f}s  memory {result['ray_memory']}",
              flush=True)
        return result
    loop_out = work / f"loop-{n}"
    # The loop and the check each run in a fresh process: their memory is their own, and what
    # the check reads back never inflates the driver's figures of the next size.
    loop = _helper("--loop", cfg.data_root, str(loop_out))
    result["loop_seconds"] = loop["seconds"]
    result["loop_memory"] = {"process_rss_mb": loop["peak_rss_mb"]}
    result["rows_checked_equal"] = _helper("--compare", str(cfg.layout.data()), str(loop_out))["rows"]
    shutil.rmtree(loop_out)
    result["ray_patches_per_s"] = round(patches / result["ray_seconds"], 1)
    result["loop_patches_per_s"] = round(patches / result["loop_seconds"], 1)
    result["ray_over_loop"] = round(result["loop_seconds"] / result["ray_seconds"], 3)
    print(f"prepare n={n:3d}: {patches} patches  Ray {result['ray_seconds']:7.1f}s  loop {result['loop_seconds']:7.1f}s"
          f"  ratio {result['ray_over_loop']:.2f}x  memory {result['ray_memory']}", flush=True)
    return result


# -- part 2: a sweep trial ----------------------------------------------------------------------

def trial_in_process(root: str) -> dict:
    """One enforce trial on the run at `root`, streamed from its shards; run in a fresh process."""
    import torch

    from pipelines.gate_trial import load_split, run_trial
    from pipelines.methods import TrialConfig
    from pipelines.prepare import require_manifest
    from pipelines.sweep import split_inputs, targets

    torch.set_num_threads(1)  # a trial with --cpus-per-trial 1
    cfg = RunConfig(task_name="superres", root=root, profile="paper", task_options=OPTIONS)
    task = cfg.task()
    inputs = split_inputs(cfg.layout, require_manifest(cfg))
    import psutil

    baseline = round(psutil.Process().memory_info().rss / 2**20, 1)  # with its imports, before any data
    started = time.perf_counter()
    with MemorySampler(period=0.05) as memory:
        n = len(task.expert_names())
        data = {split: load_split(where["cache_file"], where["gate_files"], n, full=split != GATE_SPLIT)
                for split, where in inputs.items()}
        d = task.data_costs()
        config = {"task": "superres", "profile": "paper", "options": OPTIONS, **TRIAL,
                  "d_target": targets(d, 7)[3]}
        result = run_trial(TrialConfig.from_tune(config), data, report=lambda metrics: None)
    return {"gate_rows": len(data[GATE_SPLIT].cache), "seconds": round(time.perf_counter() - started, 2),
            "peak_rss_mb": memory.figures()["driver_rss_mb"], "rss_before_data_mb": baseline,
            "test_performance": result["points"][0]["performance"]}


def experts_and_cache(work: Path, sizes: list[int]) -> None:
    """Experts trained once on the smallest run; the cache stage scores every run with them."""
    from pipelines.cache import cache
    from pipelines.train_experts import train_experts

    first = RunConfig(task_name="superres", root=str(work / f"run-{sizes[0]}"), profile="paper", task_options=OPTIONS)
    train_experts(first)
    for n in sizes:
        cfg = RunConfig(task_name="superres", root=str(work / f"run-{n}"), profile="paper", task_options=OPTIONS)
        if n != sizes[0]:
            shutil.copytree(first.layout.expert(0).parent, cfg.layout.expert(0).parent, dirs_exist_ok=True)
        cache(cfg)


def bench_trials(work: Path, sizes: list[int]) -> list[dict]:
    rows = []
    for n in sizes:
        row = {"train_images": n, **_helper("--trial-root", str(work / f"run-{n}"))}
        print(f"trial n={n:3d}: {row['gate_rows']} gate-training patches  {row['seconds']:6.1f}s  "
              f"peak RSS {row['peak_rss_mb']:.0f} MB ({row['rss_before_data_mb']:.0f} MB before reading data)", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="8,32,96", help="train images per prepare run (comma-separated)")
    parser.add_argument("--trial-sizes", default="8,32", help="runs whose train split the trial bench uses (1x, 4x)")
    parser.add_argument("--skip-loop", action="store_true", help="Ray Data prepare only (no loop, no check)")
    parser.add_argument("--skip-trials", action="store_true", help="part 1 only")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--trial-root", default=None, help=argparse.SUPPRESS)  # the helper processes
    parser.add_argument("--loop", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--compare", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    quiet_environment()
    if args.trial_root:
        print(json.dumps(trial_in_process(args.trial_root)))
        return
    if args.loop:
        print(json.dumps(loop_in_process(*args.loop)))
        return
    if args.compare:
        import ray.data  # noqa: F401  Ray's tensor types, to read both sets alike

        print(json.dumps({"rows": same_shards(Path(args.compare[0]), Path(args.compare[1]))}))
        return

    import ray

    from pipelines.runtime import ensure_ray

    sizes = [int(s) for s in args.sizes.split(",")]
    trial_sizes = [int(s) for s in args.trial_sizes.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="bmoe-scale-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        ensure_ray(RunConfig(root=str(work / "ray-root")))
        ray_start = round(time.perf_counter() - started, 2)
        ray.data.DataContext.get_current().enable_progress_bars = False
        bench_prepare(work, 2)  # warm-up: the workers import the task once
        prepare_rows = [bench_prepare(work, n, loop=not args.skip_loop) for n in sizes]
        trial_rows = []
        if not args.skip_trials:
            experts_and_cache(work, trial_sizes)
            trial_rows = bench_trials(work, trial_sizes)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    by_n = {row["images"]["train"]: row for row in prepare_rows}

    def ratio(a: int, b: int, key: str) -> float | None:
        if a in by_n and b in by_n:
            return round(by_n[b]["ray_memory"][key] / max(by_n[a]["ray_memory"][key], 1e-9), 3)
        return None

    summary = {
        "ray_over_loop": {n: row.get("ray_over_loop") for n, row in by_n.items()},
        "memory_96_over_32": {key: ratio(32, 96, key) for key in ("driver_rss_mb", "largest_worker_rss_mb",
                                                                  "object_store_shm_mb")},
        "trial_memory_4x_over_1x": round(trial_rows[-1]["peak_rss_mb"] / trial_rows[0]["peak_rss_mb"], 3)
        if len(trial_rows) > 1 else None,
        "trial_memory_growth_mb": [round(r["peak_rss_mb"] - r["rss_before_data_mb"], 1) for r in trial_rows],
        "trial_time_4x_over_1x": round(trial_rows[-1]["seconds"] / trial_rows[0]["seconds"], 3)
        if len(trial_rows) > 1 else None,
    }
    record = {
        "when": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average": [round(x, 2) for x in os.getloadavg()]},
        "ray_start_seconds": ray_start,
        "prepare": prepare_rows,
        "trial": trial_rows,
        "summary": summary,
    }
    if args.skip_loop or args.skip_trials:  # a partial run: printed, the recorded results kept
        print(json.dumps(record, indent=2))
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"load average {os.getloadavg()}; written {RESULTS}")


if __name__ == "__main__":
    main()
