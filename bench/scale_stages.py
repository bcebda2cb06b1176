"""Every stage's peak memory at 1x and 4x input, per task: the `stages` part of bench/scale.py,
with the memory sampler and DIV2K-sized images its `prepare` part uses too.

Inputs are synthetic, at the paper's sizes; the 4x set holds four times each split of the 1x set
(train, val and test, so the gate split carved from train by group is four times too):
  superres   DIV2K-sized 2040x1356 PNGs: 10 train (8 train, 2 gate), 2 val, 2 test;
  detection  300x300 COCO scenes: 100 train2017 (80 train, 20 gate), 40 val2017 (20 val, 20 test);
  action     UCF-101-sized 320x240 MPEG-4 clips, 2 classes x 25 groups x 1 clip (x4: 4 clips per
             group): 22 train, 6 gate, 8 val, 14 test.
Profile `paper` throughout, with cheap experts (OPTIONS): one epoch at a small width. Detection's
are the tiny SSD: a VGG16 SSD300 scorer holds 50-70 MB an image (measured) and scores a batch of
up to 256 at once, so the 4x run's 240 scored images would need 12-17 GB. Action's clips carry
F_t = 32 motion frames (36 frames a clip), a fifth of the paper's 160: its scorer upsamples each
clip's grids to 224x224, 126 MB a clip at F_t = 160 (measured), 14 GB for the 4x run's 112.
The experts are trained once on the 1x run and copied to the 4x run: the stages' memory does not
depend on their quality.

Each measured stage runs in a fresh process (prepare and cache each on a fresh local Ray, started
before the sampler), which records the peak RSS of the process itself (the driver) and of the
largest Ray worker under it (prepare's loaders and writers, cache's scorer actors):
  prepare       pipelines.prepare.prepare;
  cache         pipelines.cache.cache;
  trial         one enforce trial, as a Tune trial runs it without Tune: pipelines.sweep.read_split
                of every split, then pipelines.gate_trial.run_trial;
  router_start  what a new Serve router replica does before it answers (serving/router.py,
                Router.__init__): the task, serving.loading.load_gate (the values it calibrates on
                come from the bundle: no split is read) and the budget controller, on the gate
                the trial above trained and saved.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from pipelines.runtime import RunConfig, label_options, quiet_environment  # noqa: E402
from tasks import GATE_SPLIT, SOURCE_SPLITS  # noqa: E402

TASKS = ("superres", "detection", "action")
SCALES = (1, 4)
STAGES = {"prepare": ("driver", "largest_worker"), "cache": ("driver", "largest_worker"),
          "trial": ("driver",), "router_start": ("driver",)}  # the processes measured in each
HEIGHT, WIDTH = 1356, 2040  # a DIV2K-sized image: 21 x 31 = 651 patches
OPTIONS = {  # the paper profile with experts as cheap as they come
    "superres": {"expert_width": "0.25", "epochs": "1"},
    "detection": {"model": "tiny", "width": "0.5", "epochs": "1", "batch_size": "8"},
    "action": {"F_t": "32", "expert_width": "0.125", "epochs": "1", "batch_size": "8"},
}
QUICK = {"action": {"F_t": "8"}}  # --quick: short clips (a check of the bench, not a measurement)
TRIAL = {"method": "enforce", "batch_size": 64, "lr": 1e-3, "width": 0.5, "epochs": 2, "seed": 0}


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
        self.started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds = round(time.perf_counter() - self.started, 2)

    def figures(self) -> dict:
        return {"driver_rss_mb": round(self.driver / 2**20, 1), "largest_worker_rss_mb": round(self.worker / 2**20, 1),
                "object_store_shm_mb": round(self.shm / 2**20, 1)}


def rss_mb() -> float:
    """This process's RSS now: what it holds before a stage (imports, Ray's client)."""
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)


def fresh_process(script: str, *args: str) -> dict:
    """`script` in a fresh process, so that no peak carries over; its last line's JSON."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{Path(script).name} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- inputs -------------------------------------------------------------------------------------

def write_images(root: Path, n_train: int, n_eval: int = 2, height: int = HEIGHT, width: int = WIDTH) -> Path:
    """n_train (+ 2 x n_eval) procedural PNGs, DIV2K-sized by default, in DIV2K's layout under root."""
    from tasks.superres.synthetic import procedural_image, write_div2k_tree

    splits = {}
    for split, count in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        splits[split] = [(f"{split}{i:04d}", procedural_image(np.random.default_rng([7, SOURCE_SPLITS.index(split), i]),
                                                             height, width)) for i in range(count)]
    return write_div2k_tree(root, splits)


def write_div2k(root: Path, scale: int, quick: bool) -> Path:
    return write_images(root, 10 * scale, 2 * scale, *((192, 256) if quick else (HEIGHT, WIDTH)))


def write_coco(root: Path, scale: int, quick: bool) -> Path:
    from tasks.detection.synthetic import write_coco_tree

    scenes = 10 if quick else 100  # train2017; val2017 (val and test) has 0.4 of it
    return write_coco_tree(root, {"train2017": scenes * scale, "val2017": scenes * 2 // 5 * scale}, width=300,
                           height=300)


def write_ucf101(root: Path, scale: int, quick: bool) -> Path:
    """More clips per group, not more groups: the gate split (whole groups) keeps its groups."""
    from tasks import get_task
    from tasks.action.synthetic import CLASSES, write_ucf101_tree

    frames = get_task("action", "paper", {**OPTIONS["action"], **(QUICK["action"] if quick else {})}).clip_frames()
    return write_ucf101_tree(root, clips_per_group=scale, frames=frames, height=240, width=320, groups=25,
                             classes=CLASSES[:2])


WRITERS = {"superres": write_div2k, "detection": write_coco, "action": write_ucf101}


def run_config(task_name: str, root: str, data_root: str | None, quick: bool) -> RunConfig:
    """The paper profile with OPTIONS and the data's label set (from the data root, else the manifest)."""
    options = {**label_options(task_name, "paper", data_root, root), **OPTIONS[task_name],
               **(QUICK.get(task_name, {}) if quick else {})}
    return RunConfig(task_name=task_name, root=root, profile="paper", data_root=data_root, task_options=options)


# -- the stages, each in a fresh process ----------------------------------------------------------

def ray_stage_in_process(cfg: RunConfig, stage: str) -> dict:
    """A Ray stage on a fresh local Ray: peak RSS of this driver and of the largest Ray worker."""
    from pipelines.cache import cache
    from pipelines.prepare import prepare
    from pipelines.runtime import ensure_ray
    from pipelines.train_experts import train_experts

    ensure_ray(cfg)  # before the sampler: both sizes start Ray alike
    before = rss_mb()
    with MemorySampler() as memory:
        out = {"prepare": prepare, "cache": cache, "train-experts": train_experts}[stage](cfg)
    result = {**memory.figures(), "seconds": memory.seconds, "rss_before_mb": before}
    if stage == "prepare":
        result["samples"] = {split: info["samples"] for split, info in out["splits"].items()}
    return result


def trial_in_process(cfg: RunConfig, gate_file: Path) -> dict:
    """One enforce trial (1 CPU, as --cpus-per-trial 1) on its splits, read as a Tune trial reads
    them; its trained gate is saved to gate_file for router_start."""
    import torch

    from pipelines.gate_trial import run_trial, save_gate
    from pipelines.methods import TrialConfig
    from pipelines.manifest import require_manifest
    from pipelines.grid import targets
    from pipelines.sweep import read_split, split_inputs

    torch.set_num_threads(1)
    task = cfg.task()
    n = len(task.expert_names())
    inputs = split_inputs(cfg.layout, require_manifest(cfg))
    # d_t inside (d_min, d_max) and at no expert's own cost: enforce trains a gate
    config = {"task": cfg.task_name, "profile": cfg.profile, "options": cfg.task_options, **TRIAL,
              "d_target": targets(task.data_costs(), 7)[3]}
    before = rss_mb()  # with its imports, before any data
    with MemorySampler(period=0.05) as memory:
        data = {split: read_split(where, n, full=split != GATE_SPLIT) for split, where in inputs.items()}
        result = run_trial(TrialConfig.from_tune(config), data, report=lambda metrics: None)
    save_gate(result.gate, gate_file)
    return {**memory.figures(), "seconds": memory.seconds, "rss_before_mb": before,
            "gate_rows": len(data[GATE_SPLIT].cache), "test_performance": result.points[0].performance}


def router_start_in_process(cfg: RunConfig, gate_file: Path) -> dict:
    """A router replica's start (serving/router.py Router.__init__) on the run's gate, measured
    from after the deploying driver resolved the run (resolve_run reads the gate, hashes experts)."""
    import torch

    import serving.router  # noqa: F401  a replica's imports, held before it starts
    from bmoe.budget import BudgetController
    from serving.loading import load_gate, resolve_run
    from serving.settings import ServeSettings

    run = resolve_run(cfg.root, cfg.task_name, gate_file=str(gate_file))
    settings = ServeSettings(task=cfg.task_name, root=cfg.root)
    torch.set_num_threads(1)
    before = rss_mb()
    with MemorySampler(period=0.01) as memory:
        run.task()
        _, _, values = load_gate(run, torch.device("cpu"))
        BudgetController.calibrated(run.costs, float(run.costs.max()) / 2, values, window=settings.window)
    return {**memory.figures(), "seconds": memory.seconds, "rss_before_mb": before, "val_rows": len(values)}


# -- one task at 1x and 4x (the parent process) ------------------------------------------------------

def stage(name: str, task_name: str, root: Path, path: Path | None = None, quick: bool = False) -> dict:
    """One stage of one run in a fresh process; path: the data root (prepare) or the gate file."""
    args = [name, task_name, str(root), *(["--path", str(path)] if path else []), *(["--quick"] if quick else [])]
    return fresh_process(__file__, *args)


def bench_task(task_name: str, work: Path, quick: bool) -> dict[int, dict]:
    """Every stage of one task at 1x and 4x: {scale: {stage: figures}}; experts trained on 1x."""
    roots = {s: work / f"{task_name}-{s}x" for s in SCALES}
    runs: dict[int, dict] = {s: {} for s in SCALES}
    for s in SCALES:
        started = time.perf_counter()
        data = WRITERS[task_name](work / f"{task_name}-data-{s}x", s, quick)
        print(f"{task_name} {s}x: inputs written in {time.perf_counter() - started:.0f}s", flush=True)
        runs[s]["prepare"] = stage("prepare", task_name, roots[s], data, quick)
    trained = stage("train-experts", task_name, roots[1], quick=quick)
    print(f"{task_name}: experts trained on 1x in {trained['seconds']:.0f}s", flush=True)
    experts = RunConfig(task_name=task_name, root=str(roots[1])).layout.expert(0).parent
    for s in SCALES[1:]:
        shutil.copytree(experts, RunConfig(task_name=task_name, root=str(roots[s])).layout.expert(0).parent,
                        dirs_exist_ok=True)
    for s in SCALES:
        runs[s]["cache"] = stage("cache", task_name, roots[s], quick=quick)
    for name in ("trial", "router_start"):  # the trial saves the gate the router starts on
        for s in SCALES:
            runs[s][name] = stage(name, task_name, roots[s], work / f"{task_name}-{s}x-gate.pt", quick)
    for s in SCALES:
        print(f"{task_name} {s}x: " + "  ".join(f"{name} {figures['driver_rss_mb']:.0f}/"
                                               f"{figures['largest_worker_rss_mb']:.0f} MB {figures['seconds']:.0f}s"
                                               for name, figures in runs[s].items()), flush=True)
    return runs


def stage_rows(task_name: str, runs: dict[int, dict]) -> list[dict]:
    """One row per stage and process measured: its peak RSS at 1x and 4x, their ratio, the
    stage's seconds, and for the driver what it held before the stage began."""
    one, four = (runs[s] for s in SCALES)
    rows = []
    for name, processes in STAGES.items():
        for process in processes:
            key = f"{process}_rss_mb"
            row = {"task": task_name, "stage": name, "process": process, "rss_mb_1x": one[name][key],
                   "rss_mb_4x": four[name][key], "ratio": round(four[name][key] / max(one[name][key], 1e-9), 3),
                   "seconds_1x": one[name]["seconds"], "seconds_4x": four[name]["seconds"]}
            if process == "driver":
                row.update(rss_before_mb_1x=one[name]["rss_before_mb"], rss_before_mb_4x=four[name]["rss_before_mb"])
            rows.append(row)
    return rows


def bench_stages(work: Path, tasks: tuple[str, ...], quick: bool) -> dict:
    """The stages part: {stages: rows, stage_inputs: samples per split, trial: superres's trials
    (the keys of the trial part this replaced)}."""
    record: dict = {"stages": [], "stage_inputs": {}}
    for task_name in tasks:
        runs = bench_task(task_name, work, quick)
        record["stages"] += stage_rows(task_name, runs)
        record["stage_inputs"][task_name] = {f"{s}x": runs[s]["prepare"]["samples"] for s in SCALES}
        if task_name == "superres":
            record["trial"] = [{"train_images": 10 * s, "gate_rows": runs[s]["trial"]["gate_rows"],
                                "seconds": runs[s]["trial"]["seconds"],
                                "peak_rss_mb": runs[s]["trial"]["driver_rss_mb"],
                                "rss_before_data_mb": runs[s]["trial"]["rss_before_mb"],
                                "test_performance": runs[s]["trial"]["test_performance"]} for s in SCALES]
    return record


def table(rows: list[dict]) -> str:
    lines = [f"{'task':10s} {'stage':13s} {'process':15s} {'1x MB':>8s} {'4x MB':>8s} {'ratio':>6s}"]
    lines += [f"{r['task']:10s} {r['stage']:13s} {r['process']:15s} {r['rss_mb_1x']:8.0f} {r['rss_mb_4x']:8.0f} "
              f"{r['ratio']:6.2f}" for r in rows]
    return "\n".join(lines)


def main() -> None:
    """A child process: one stage of one run, measured; prints its figures as JSON."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("stage", choices=(*STAGES, "train-experts"))
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("root")
    parser.add_argument("--path", default=None, help="the data root (prepare) or the gate file (trial, router_start)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    quiet_environment()
    cfg = run_config(args.task, args.root, args.path if args.stage == "prepare" else None, args.quick)
    if args.stage == "trial":
        print(json.dumps(trial_in_process(cfg, Path(args.path))))
    elif args.stage == "router_start":
        print(json.dumps(router_start_in_process(cfg, Path(args.path))))
    else:
        print(json.dumps(ray_stage_in_process(cfg, args.stage)))


if __name__ == "__main__":
    main()
