"""Scale benchmark: each stage's memory as its input grows, and Ray Data's prepare against a loop.

Part stages (bench/scale_stages.py says how): for each task (superres, detection, action), the
peak RSS of the driver and of the largest Ray worker in prepare, cache, one sweep trial and a
Serve router replica's start, at 1x and 4x input at the paper's sizes, each in a fresh process.

Parts bytes and sweep (bench/scale_io.py, when it is there): the bytes a sweep trial reads from
an object-store root, and Ray Tune's cost per trial over --sweep-trials trials.

Part shards: for each task, one 1x prepare of part stages' inputs; from the Parquet footers,
the bytes of every shard set, and for every target column the sets that store it and its bytes
(each target must be stored once: superres's HR patch is the gate input itself).

Part prepare, superres on DIV2K-sized images (2040x1356, 651 patches of 64x64 each): for n = 8,
32, 96 train images (--sizes; 2 each in val and test), (a) pipelines.prepare.prepare (Ray Data,
one streaming pass) and (b) a single-process loop doing the same work on the same files (task.load
of every image, pipelines.shard_writer.ShardWriter with the same target sizes), measured side
by side; afterwards every shard set of both is read back and checked equal row by row. A
sampler thread records, every 0.2 s, the RSS of this process (Ray's driver) and of the largest
Ray worker process, and the growth of /dev/shm (Ray's object store). The loop runs in a fresh
process (its time and peak RSS are its own), and so does the check.
Ray is started once and warmed up on a 2-image set first (workers import the task once per
process, as on a long-lived cluster); its start-up time is reported apart.

DIV2K, COCO and UCF-101 cannot be downloaded here: the inputs are synthetic, of their sizes
and in their layouts, so the real readers run on them.

Run from the repository root:  nice -n 10 .venv/bin/python bench/scale.py [--part stages,bytes,sweep,shards,prepare]
--part picks the parts (default all); a run records its parts in bench/results/scale.json and
keeps what it did not run; --quick (stages on small inputs) and --skip-loop only print.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from bench.scale_stages import OPTIONS, TASKS, MemorySampler, fresh_process, write_images  # noqa: E402
from pipelines.runtime import RunConfig, quiet_environment  # noqa: E402
from tasks import SPLITS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"
PARTS = ("stages", "bytes", "sweep", "shards", "prepare")


# -- part prepare: Ray Data against a loop ----------------------------------------------------

def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def loop_in_process(data_root: str, out: str) -> dict:
    cfg = RunConfig(task_name="superres", root=str(Path(out) / "unused"), profile="paper", data_root=data_root,
                    task_options=OPTIONS["superres"])
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
                    task_options=OPTIONS["superres"])
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
    loop = fresh_process(__file__, "--loop", cfg.data_root, str(loop_out))
    result["loop_seconds"] = loop["seconds"]
    result["loop_memory"] = {"process_rss_mb": loop["peak_rss_mb"]}
    result["rows_checked_equal"] = fresh_process(__file__, "--compare", str(cfg.layout.data()), str(loop_out))["rows"]
    shutil.rmtree(loop_out)
    result["ray_patches_per_s"] = round(patches / result["ray_seconds"], 1)
    result["loop_patches_per_s"] = round(patches / result["loop_seconds"], 1)
    result["ray_over_loop"] = round(result["loop_seconds"] / result["ray_seconds"], 3)
    print(f"prepare n={n:3d}: {patches} patches  Ray {result['ray_seconds']:7.1f}s  loop {result['loop_seconds']:7.1f}s"
          f"  ratio {result['ray_over_loop']:.2f}x  memory {result['ray_memory']}", flush=True)
    return result


def bench_prepares(work: Path, sizes: list[int], loop: bool) -> dict:
    """Part prepare: Ray started and warmed up once, then every size; the part's keys."""
    import ray

    from pipelines.runtime import ensure_ray

    started = time.perf_counter()
    ensure_ray(RunConfig(root=str(work / "ray-root")))
    ray_start = round(time.perf_counter() - started, 2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        bench_prepare(work, 2)  # warm-up: the workers import the task once
        by_n = {n: bench_prepare(work, n, loop=loop) for n in sizes}
    finally:
        ray.shutdown()  # now, not at exit: its session folder is under the scratch folder removed before

    def ratio(a: int, b: int, key: str) -> float | None:
        if a in by_n and b in by_n:
            return round(by_n[b]["ray_memory"][key] / max(by_n[a]["ray_memory"][key], 1e-9), 3)
        return None

    return {"ray_start_seconds": ray_start, "prepare": list(by_n.values()),
            "ray_over_loop": {n: row.get("ray_over_loop") for n, row in by_n.items()},
            "memory_96_over_32": {key: ratio(32, 96, key) for key in ("driver_rss_mb", "largest_worker_rss_mb",
                                                                      "object_store_shm_mb")}}


# -- part shards: each target stored once ---------------------------------------------------------

def shard_bytes(task_name: str, root: Path) -> dict:
    """From the manifest and the footers of a prepared root: bytes per shard set, and per target
    column the sets storing it (the gate column counted for the target it is) and its bytes."""
    import pyarrow.parquet as pq

    layout = RunConfig(task_name=task_name, root=str(root)).layout
    manifest = json.loads(layout.manifest().read_text())
    sets: dict[str, int] = {}
    columns: dict[str, dict[str, int]] = {}  # column -> {set: compressed bytes}
    for split, info in manifest["splits"].items():
        for part, shard in info["shards"].items():
            for f in shard["files"]:
                sets[part] = sets.get(part, 0) + f["bytes"]
                meta = pq.read_metadata(layout.shards(split, part) / f["name"])
                for g in range(meta.num_row_groups):
                    for c in range(meta.num_columns):
                        chunk = meta.row_group(g).column(c)
                        name = chunk.path_in_schema.split(".")[0]
                        held = columns.setdefault(name, {})
                        held[part] = held.get(part, 0) + chunk.total_compressed_size
    targets = {target: {"stored_in": sorted(columns[column]), "bytes": sum(columns[column].values())}
               for target, column in manifest["targets"].items()}
    return {"task": task_name, "samples": sum(info["samples"] for info in manifest["splits"].values()),
            "set_bytes": sets, "total_bytes": sum(sets.values()), "targets": targets,
            "copies": max(len(t["stored_in"]) for t in targets.values())}


def bench_shards(work: Path, tasks: tuple[str, ...], quick: bool) -> list[dict]:
    from bench.scale_stages import WRITERS, stage

    rows = []
    for task_name in tasks:
        data = WRITERS[task_name](work / f"{task_name}-data", 1, quick)
        stage("prepare", task_name, work / task_name, data, quick)
        rows.append(shard_bytes(task_name, work / task_name))
        row = rows[-1]
        print(f"shards {task_name}: {row['total_bytes'] / 1e6:.1f} MB for {row['samples']} samples; "
              + ", ".join(f"{t} {v['bytes'] / 1e6:.2f} MB in {'+'.join(v['stored_in'])}" for t, v in row["targets"].items()),
              flush=True)
    return rows


def trial_summary(trials: list[dict]) -> dict:
    """The superres trial at 4x against 1x (the keys of the trial part the stages replaced)."""
    one, four = trials
    return {"trial_memory_4x_over_1x": round(four["peak_rss_mb"] / one["peak_rss_mb"], 3),
            "trial_memory_growth_mb": [round(r["peak_rss_mb"] - r["rss_before_data_mb"], 1) for r in trials],
            "trial_time_4x_over_1x": round(four["seconds"] / one["seconds"], 3)}


def run_parts(args, parts: list[str], work: Path) -> dict:
    """Every part asked for, in an order that keeps one Ray at a time: the stages' fresh
    processes first, the prepare part (Ray in this process) last."""
    record: dict = {}
    tasks = tuple(args.tasks.split(","))
    if "stages" in parts:
        from bench.scale_stages import bench_stages, table

        record.update(bench_stages(work / "stages", tasks, args.quick))
        print(table(record["stages"]), flush=True)
        if "trial" in record:
            record["summary"] = trial_summary(record["trial"])
    if {"bytes", "sweep"} & set(parts) and not Path(__file__).with_name("scale_io.py").exists():
        print("parts bytes and sweep: bench/scale_io.py is not there, skipped", flush=True)
    elif {"bytes", "sweep"} & set(parts):
        from bench import scale_io

        if "bytes" in parts:
            record["trial_bytes"] = scale_io.trial_bytes(work / "bytes")
        if "sweep" in parts:
            record["sweep"] = scale_io.thousand_trial_sweep(work / "sweep", args.sweep_trials)
    if "shards" in parts:
        record["shards"] = bench_shards(work / "shards", tasks, args.quick)
    if "prepare" in parts:
        prepared = bench_prepares(work, [int(s) for s in args.sizes.split(",")], loop=not args.skip_loop)
        record.update({k: prepared[k] for k in ("ray_start_seconds", "prepare")})
        record["summary"] = {**record.get("summary", {}),
                             **{k: prepared[k] for k in ("ray_over_loop", "memory_96_over_32")}}
    return record


def recorded_with(record: dict) -> dict:
    """The recorded results with this run's parts in place: other tasks' stage rows, and other
    parts, are kept."""
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if "stages" in record:
        ran = {row["task"] for row in record["stages"]}
        record["stages"] = [r for r in previous.get("stages", []) if r["task"] not in ran] + record["stages"]
        record["stage_inputs"] = {**previous.get("stage_inputs", {}), **record["stage_inputs"]}
    if "summary" in record:
        record["summary"] = {**previous.get("summary", {}), **record["summary"]}
    return {**previous, **record}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", default=",".join(PARTS), help="parts to run, comma-separated (default: all)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="tasks of part stages (comma-separated)")
    parser.add_argument("--quick", action="store_true", help="part stages on small inputs: checks the bench, "
                                                             "records nothing")
    parser.add_argument("--sweep-trials", type=int, default=1000, help="trials of part sweep")
    parser.add_argument("--sizes", default="8,32,96", help="train images per prepare run (comma-separated)")
    parser.add_argument("--skip-loop", action="store_true", help="part prepare: Ray Data only (no loop, no check)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--loop", nargs=2, default=None, help=argparse.SUPPRESS)  # the helper processes
    parser.add_argument("--compare", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    quiet_environment()
    if args.loop:
        print(json.dumps(loop_in_process(*args.loop)))
        return
    if args.compare:
        import ray.data  # noqa: F401  Ray's tensor types, to read both sets alike

        print(json.dumps({"rows": same_shards(Path(args.compare[0]), Path(args.compare[1]))}))
        return
    parts = args.part.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")

    work = Path(args.work or tempfile.mkdtemp(prefix="bmoe-scale-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        record = run_parts(args, parts, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    load = [round(x, 2) for x in os.getloadavg()]
    record = {"when": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "load_average": load},
              "load_average": load, "seconds": round(time.perf_counter() - started, 1), **record}
    if args.quick or args.skip_loop:  # a check or a partial part: printed, the recorded results kept
        print(json.dumps(record, indent=2))
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(recorded_with(record), indent=2))
    print(json.dumps(record.get("summary", {}), indent=2))
    print(f"load average {load}; {record['seconds']:.0f}s; written {RESULTS}")


if __name__ == "__main__":
    main()
