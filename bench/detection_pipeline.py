"""Detection pipeline benchmark: prepare and cache throughput (images/s) and COCOeval seconds
per 1,000 images, plain and pooled.

Why these figures matter:
* prepare decodes each JPEG once and writes three P_n (R x R) shards, their JPEG sizes and the
  gate crop; cache runs every frozen SSD over every image once. Both scale with the data set.
* COCOeval is the detection metric, and a sweep evaluates it at every gate epoch (validation
  performance for model selection) and per expert for Table II. The plain pycocotools sequence
  (loadRes, evaluate, accumulate, summarize) re-matches every detection each time; the pooled
  evaluator (tasks/detection/metrics.py) matches each (image, expert) once and then only
  accumulates, which is what makes a detection sweep affordable.

Part 1 (prepare): a synthetic COCO tree of --images scenes (train2017 60%, val2017 40%) is
written (timed apart), then pipelines.prepare.prepare (Ray Data) reads it: images/s over all
splits; and a single-process loop over task.load() on the same sources, for scale.
Part 2 (cache): with --root of a run whose experts are trained (e.g. a `bmoe demo` root), the
cache stage is rerun from scratch there: images/s = images x experts scored per second. Without
--root a smoke run is trained first (its setup time is reported apart).
Part 3 (COCOeval): 1,000 synthetic images' ground truth with jittered detections from three
simulated experts; plain COCOeval vs the pooled evaluator's first call (matching) and its
later calls (one new assignment each).

Run from the repository root:  .venv/bin/python bench/detection_pipeline.py [--root RUN_ROOT]
Writes bench/results/detection_pipeline.json. Timings on a shared 2-core machine are noisy: the
load average at start and end is recorded beside them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from pipelines.runtime import RunConfig, ensure_ray, quiet_environment  # noqa: E402
from tasks import SOURCE_SPLITS, get_task  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "detection_pipeline.json"


def bench_prepare(work: Path, images: int) -> dict:
    from pipelines.prepare import prepare
    from tasks.detection import synthetic

    started = time.perf_counter()
    tree = synthetic.write_coco_tree(work / "coco", {"train2017": int(images * 0.6),
                                                     "val2017": images - int(images * 0.6)})
    write_s = time.perf_counter() - started
    cfg = RunConfig(task_name="detection", root=str(work / "prep"), profile="demo", data_root=str(tree))
    ensure_ray(cfg)
    started = time.perf_counter()
    manifest = prepare(cfg)
    ray_s = time.perf_counter() - started
    samples = sum(s["samples"] for s in manifest["splits"].values())

    task = cfg.task()
    sources = [s for split in SOURCE_SPLITS for s in task.list_sources(tree, split).sources]
    started = time.perf_counter()
    for source in sources:
        task.load(source)
    loop_s = time.perf_counter() - started
    return {"images": samples, "resolutions": list(task.settings.resolutions), "write_tree_s": round(write_s, 2),
            "ray_prepare_s": round(ray_s, 2), "ray_images_per_s": round(samples / ray_s, 1),
            "loop_load_s": round(loop_s, 2), "loop_images_per_s": round(len(sources) / loop_s, 1),
            "notes": "ray: pipelines.prepare.prepare after ray.init (listing, Ray Data flat_map, Parquet writes "
                     "per P_n and gate, checksums); loop: task.load() alone (decode, 3 resizes + JPEG sizes, "
                     "gate crop), no writes"}


def bench_cache(work: Path, root: str | None) -> dict:
    from pipelines.cache import cache
    from pipelines.prepare import prepare
    from pipelines.train_experts import train_experts

    setup = {}
    if root is None:
        cfg = RunConfig(task_name="detection", root=str(work / "smoke"), profile="smoke")
        started = time.perf_counter()
        prepare(cfg)
        train_experts(cfg)
        setup["prepare_and_train_s"] = round(time.perf_counter() - started, 1)
    else:
        manifest = json.loads((Path(root) / "data" / "detection" / "manifest.json").read_text())
        cfg = RunConfig(task_name="detection", root=root, profile=manifest["profile"])
    ensure_ray(cfg)
    stamp = cfg.layout.cache_stamp()
    if stamp.exists():
        stamp.unlink()  # force a full rerun
    started = time.perf_counter()
    files = cache(cfg)
    seconds = time.perf_counter() - started
    import pandas as pd

    images = sum(len(pd.read_parquet(f, columns=["sample_id"])) for f in files.values())
    experts = len(cfg.task().expert_names())
    return {"root": cfg.root, "profile": cfg.profile, "images": images, "experts": experts,
            "cache_s": round(seconds, 1), "image_expert_pairs_per_s": round(images * experts / seconds, 1),
            "images_per_s_all_experts": round(images / seconds, 2), **setup,
            "notes": "pipelines.cache.cache from scratch: per expert one Ray Data actor pool pass (SSD forward, "
                     "per-image loss, detections, per-image AP) over all splits, then the merge and Parquet write"}


def bench_cocoeval(images: int = 1000, repeats: int = 3) -> dict:
    import pandas as pd

    from tasks.detection import metrics, synthetic

    rng = np.random.default_rng(0)
    rows = []
    for i in range(images):
        _, anns, _ = synthetic.scene(rng)
        rows.append(np.array([[*a["bbox"], a["category_id"], 0, a["area"]] for a in anns]).reshape(-1, 7))
    cache = pd.DataFrame({"image_id": np.arange(1, images + 1), "img_w": 320, "img_h": 240,
                          "gt": [metrics.pack(g, np.float64) for g in rows]})
    for n, (keep, noise) in enumerate(((0.4, 4.0), (0.7, 2.0), (0.95, 1.0))):
        dets = []
        for g in rows:
            found = [[*(r[:4] + rng.normal(0, noise, 4)), rng.uniform(0.2, 1), r[4]] for r in g if rng.random() < keep]
            found += [[*rng.uniform(0, 200, 2), *rng.uniform(5, 60, 2), rng.uniform(0, 0.6),
                       rng.choice(synthetic.CATEGORY_IDS)] for _ in range(int(rng.integers(0, 20)))]  # false positives
            dets.append(metrics.pack(np.array(found, dtype=np.float32).reshape(-1, 6), np.float32))
        cache[f"dets_{n}"] = dets
    ground = metrics.coco_from_rows(cache["image_id"], list(zip(cache["img_w"], cache["img_h"])), rows)
    task = get_task("detection", "demo")
    plain, pooled_later = [], []
    started = time.perf_counter()
    first = task.metric(cache, rng.integers(0, 3, images))
    pooled_first = time.perf_counter() - started
    for r in range(repeats):
        assignment = np.random.default_rng(r).integers(0, 3, images)
        results = [{"image_id": int(i + 1), "bbox": [float(v) for v in d[:4]], "score": float(d[4]),
                    "category_id": int(d[5])}
                   for i, n in enumerate(assignment) for d in metrics.unpack_dets(cache[f"dets_{n}"][i])]
        started = time.perf_counter()
        reference = metrics.coco_map(ground, results)
        plain.append(time.perf_counter() - started)
        started = time.perf_counter()
        pooled = task.metric(cache, assignment)
        pooled_later.append(time.perf_counter() - started)
        assert abs(pooled["performance"] - reference["map50"]) < 1e-12, (pooled, reference)
    per_k = 1000.0 / images
    return {"images": images, "detections_per_image": round(sum(len(metrics.unpack_dets(d)) for d in cache["dets_2"])
                                                            / images, 1),
            "plain_cocoeval_s_per_1000": round(float(np.median(plain)) * per_k, 3),
            "pooled_first_call_s_per_1000": round(pooled_first * per_k, 3),
            "pooled_later_call_s_per_1000": round(float(np.median(pooled_later)) * per_k, 3),
            "map_example": round(first["performance"], 4),
            "notes": "plain: loadRes + evaluate + accumulate + summarize on the assignment's pooled results; "
                     "pooled first call: matches all 3 experts' detections (3 evaluate() passes) + accumulate; "
                     "later calls: accumulate + summarize only; equal mAP checked on every repeat"}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="a run root whose detection experts are trained (e.g. a bmoe demo root)")
    parser.add_argument("--images", type=int, default=300, help="synthetic images for the prepare benchmark")
    args = parser.parse_args(argv)
    quiet_environment()
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "python": platform.python_version(), "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bdet-") as tmp:
        work = Path(tmp)
        result["cocoeval"] = bench_cocoeval()
        print("cocoeval:", json.dumps(result["cocoeval"]), flush=True)
        result["prepare"] = bench_prepare(work, args.images)
        print("prepare:", json.dumps(result["prepare"]), flush=True)
        result["cache"] = bench_cache(work, args.root)
        print("cache:", json.dumps(result["cache"]), flush=True)
    import ray

    ray.shutdown()
    result["loadavg_end"] = os.getloadavg()
    result["wall_s"] = round(time.perf_counter() - wall, 1)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(f"prepare {result['prepare']['ray_images_per_s']} images/s (Ray), cache "
          f"{result['cache']['images_per_s_all_experts']} images/s (all experts), COCOeval "
          f"{result['cocoeval']['plain_cocoeval_s_per_1000']} s per 1,000 images (pooled later calls "
          f"{result['cocoeval']['pooled_later_call_s_per_1000']} s) -> {RESULTS}")
    return result


if __name__ == "__main__":
    main()
