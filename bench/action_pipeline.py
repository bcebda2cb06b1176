"""Action pipeline benchmark: motion-vector extraction vs plain decoding, and prepare's clips/s.

Why these figures matter:

* The temporal modality is read from the codec's bitstream instead of computing optical flow;
  its cost over plain decoding is what realtime classifiers [8], [53] rely on being small.
  Part 1 decodes the same file three ways in one run: plain decoding, decoding with
  flags2=+export_mvs (reading each frame's MOTION_VECTORS side data), and our full temporal
  modality (export + rasterising to the 24x24x2 grid), for MPEG-4 part 2 (UCF-101's Xvid
  family) and H.264 clips written with PyAV at UCF-101's 320x240, plus the real sample clip.
  Each figure is the median of `--repeats` passes; the ratio is export / plain.
* Part 2 times pipelines.prepare.prepare (Ray Data) over the demo profile's embedded clips
  (written first, timed apart) and a plain loop of task.load() over the same clips, in
  clips/s: decode, vectors, frames, JPEG sizes; Ray Data adds its fixed costs on 2 cores.

Run from the repository root:  .venv/bin/python bench/action_pipeline.py [--repeats 5]
Writes bench/results/action_pipeline.json.
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
from bench.core import median_time  # noqa: E402
from pipelines.runtime import RunConfig, quiet_environment  # noqa: E402
from tasks import SOURCE_SPLITS  # noqa: E402
from tasks.action import synthetic  # noqa: E402
from tasks.action.motion_vectors import count_frames, motion_grids  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "action_pipeline.json"
SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "samples" / "ucf101" / "UCF-101"


def extraction(path: Path, repeats: int) -> dict:
    """Frames/s of plain decoding, decoding with vector export, and the full 24x24x2 grids."""
    frames = count_frames(path, export_mvs=False)
    plain = median_time(lambda: count_frames(path, export_mvs=False), repeats, warmup=0)
    export = median_time(lambda: count_frames(path, export_mvs=True), repeats, warmup=0)
    grids = median_time(lambda: motion_grids(path, frames), repeats, warmup=0)  # every frame with vectors
    return {"file": path.name, "frames": frames, "bytes": path.stat().st_size,
            "plain_fps": frames / plain, "export_mvs_fps": frames / export, "grid_fps": frames / grids,
            "export_over_plain": plain / export, "grid_over_plain": plain / grids}


def part1(folder: Path, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    video = synthetic.render_clip(synthetic.CLASSES[3], 250, 240, 320, rng, pan=True)  # 10 s at 25 fps
    out = {}
    for codec, name in (("mpeg4", "mpeg4_part2"), ("libx264", "h264")):
        path = synthetic.encode_clip(video, folder / f"bench_{name}.{'avi' if codec == 'mpeg4' else 'mp4'}", codec)
        out[name] = extraction(path, repeats)
    real = sorted(SAMPLE.glob("*/*.avi"))
    if real:
        out["ucf101_sample"] = extraction(real[0], repeats)
    for name, r in out.items():
        print(f"  {name:<14} {r['frames']} frames: plain {r['plain_fps']:8.0f} fps, "
              f"export_mvs {r['export_mvs_fps']:8.0f} fps (x{r['export_over_plain']:.2f}), "
              f"24x24x2 grids {r['grid_fps']:8.0f} fps (x{r['grid_over_plain']:.2f})")
    return out


def part2(folder: Path) -> dict:
    from pipelines.prepare import prepare

    cfg = RunConfig(task_name="action", root=str(folder / "run"), profile="demo")
    task = cfg.task()
    start = time.perf_counter()
    data_root = task.embedded_data(cfg.layout.raw())
    write_s = time.perf_counter() - start
    sources = [s for split in SOURCE_SPLITS for s in task.list_sources(data_root, split).sources]
    start = time.perf_counter()
    manifest = prepare(cfg)
    ray_s = time.perf_counter() - start
    start = time.perf_counter()
    loop_rows = sum(len(task.load(s)) for s in sources)
    loop_s = time.perf_counter() - start
    samples = sum(info["samples"] for info in manifest["splits"].values())
    out = {"profile": "demo", "clips": len(sources), "samples": samples, "loop_samples": loop_rows,
           "write_embedded_s": write_s, "write_clips_per_s": len(sources) / write_s,
           "prepare_ray_s": ray_s, "prepare_ray_clips_per_s": samples / ray_s,
           "loop_s": loop_s, "loop_clips_per_s": loop_rows / loop_s}
    print(f"  embedded clips written: {len(sources)} in {write_s:.1f}s ({out['write_clips_per_s']:.1f} clips/s)")
    print(f"  prepare (Ray Data): {samples} clips in {ray_s:.1f}s ({out['prepare_ray_clips_per_s']:.1f} clips/s); "
          f"plain loop of task.load(): {loop_s:.1f}s ({out['loop_clips_per_s']:.1f} clips/s)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-prepare", action="store_true", help="part 1 only (no Ray)")
    args = parser.parse_args()
    quiet_environment()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "python": platform.python_version(), "cpu_count": os.cpu_count(),
              "loadavg_start": list(os.getloadavg())}
    import av

    result["pyav_version"] = av.__version__
    with tempfile.TemporaryDirectory() as tmp:
        print("Part 1: motion-vector extraction vs plain decoding (same file, one run)")
        result["extraction"] = part1(Path(tmp), args.repeats)
        if not args.skip_prepare:
            print("Part 2: prepare, demo profile")
            result["prepare"] = part2(Path(tmp))
            import ray

            ray.shutdown()
    result["loadavg_end"] = list(os.getloadavg())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
