"""Object-store reads of sweep trials, and what Ray Tune costs per trial over a thousand trials.

Part bytes (trial_bytes): a sweep trial on an s3:// root reads its splits through the node's
split cache (pipelines/split_cache.py), so a trial of many epochs should fetch each file once.
For each task, a smoke-profile root is made locally (prepare, train-experts, cache), its data and
cache uploaded to a moto S3 server run in this process, and one enforce trial of EPOCHS epochs
runs in a fresh process against it, with an empty node cache; then a second trial on the same
node cache. The bytes are counted at the server (every GET's response body, per key), so
nothing the client caches or retries can hide a fetch. As in a Tune sweep, the driver (this
process) reads the manifest and the cache stamp once and hands the trial its split_inputs.

Part sweep (thousand_trial_sweep): `bmoe sweep --search random` with >= 1000 enforce trials on
a superres smoke root; from its record, the share of the wall time x concurrency that is spent
outside the trials' own work (Tune's published figure: 14% for 10,000 one-second trials on 16 CPUs).

Run from the repository root:  nice -n 10 .venv/bin/python bench/scale_io.py --part bytes|sweep
Prints the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from pipelines.runtime import RunConfig  # noqa: E402
from tasks import GATE_SPLIT  # noqa: E402

TASKS = ("superres", "detection", "action")
BUCKET = "bmoe-scale-io"
EPOCHS = 5  # every epoch reads every split: a cache that fails to keep them shows as ~5x the bytes
# The smoke grid's batch size, lr and width (pipelines/sweep.py GRIDS["smoke"]), for EPOCHS epochs.
TRIAL = {"method": "enforce", "batch_size": 16, "lr": 1e-3, "width": 0.25, "epochs": EPOCHS, "seed": 0}
BMOE = Path(sys.executable).with_name("bmoe")
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true"}  # no probing of 169.254.169.254 for credentials


# -- part 1: bytes fetched by a trial -------------------------------------------------------------

class GetBytes:
    """WSGI middleware: counts the response body bytes of every GET the wrapped app answers, in
    all and per object key."""

    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()
        self.per_key: dict[str, list[int]] = {}  # key -> [GETs, bytes]

    def reset(self) -> None:
        with self.lock:
            self.per_key = {}

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.per_key.values())

    @property
    def requests(self) -> int:
        return sum(n for n, _ in self.per_key.values())

    def __call__(self, environ, start_response):
        body = self.app(environ, start_response)
        if environ["REQUEST_METHOD"] != "GET":
            return body
        key = environ["PATH_INFO"].lstrip("/")
        with self.lock:
            self.per_key.setdefault(key, [0, 0])[0] += 1
        return self._counted(body, key)

    def _counted(self, body, key: str):
        try:
            for chunk in body:
                with self.lock:
                    self.per_key.setdefault(key, [0, 0])[1] += len(chunk)
                yield chunk
        finally:
            if hasattr(body, "close"):
                body.close()


class S3Server:
    """moto's S3 on 127.0.0.1 and a free port, behind GetBytes; `env` reaches it from any process."""

    def __init__(self):
        from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        self.counter = GetBytes(DomainDispatcherApplication(create_backend_app))
        self.server = make_server("127.0.0.1", 0, self.counter, threaded=True, request_handler=MotoRequestHandler)
        self.env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.server.server_port}", **AWS}
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "S3Server":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.thread.join()


def _build_roots(root: Path, tasks: tuple[str, ...]) -> dict[str, float]:
    """prepare, train-experts, cache per task on one local root (stages that already ran are
    kept); seconds per task."""
    import ray

    from pipelines.cache import cache
    from pipelines.prepare import prepare
    from pipelines.train_experts import train_experts

    seconds = {}
    for task in tasks:
        cfg = RunConfig(task_name=task, root=str(root), profile="smoke")
        started = time.perf_counter()
        for stage in (prepare, train_experts, cache):
            stage(cfg)
        seconds[task] = round(time.perf_counter() - started, 1)
    ray.shutdown()
    return seconds


def _split_files(root: str, task: str) -> list[dict]:
    """Each file a trial reads ({path, bytes, sha256} as the root recorded it)."""
    from pipelines.manifest import require_manifest
    from pipelines.sweep import split_inputs

    cfg = RunConfig(task_name=task, root=root, profile="smoke")
    files = []
    for where in split_inputs(cfg.layout, require_manifest(cfg)).values():
        files.append({"path": str(where["cache_file"]), **where["cache_record"]})
        files += [{"path": str(p), **r} for p, r in zip(where["gate_files"], where["gate_records"])]
    return files


def trial_in_process(task: str, inputs_file: str) -> dict:
    """One enforce trial on the split_inputs pickled in inputs_file (as Tune hands them to a
    trial), read as a sweep trial reads them (read_split); run in a fresh process whose
    BMOE_SPLIT_CACHE is the node's cache."""
    import pickle

    import torch

    from pipelines.gate_trial import run_trial
    from pipelines.methods import TrialConfig
    from pipelines.grid import targets
    from pipelines.sweep import read_split
    from tasks import get_task

    torch.set_num_threads(1)  # a trial with --cpus-per-trial 1
    started = time.perf_counter()
    task_ = get_task(task, "smoke")
    inputs = pickle.loads(Path(inputs_file).read_bytes())
    n = len(task_.expert_names())
    data = {split: read_split(where, n, full=split != GATE_SPLIT) for split, where in inputs.items()}
    read = time.perf_counter() - started
    config = {"task": task, "profile": "smoke", **TRIAL, "d_target": targets(task_.data_costs(), 3)[1]}
    epochs = []
    result = run_trial(TrialConfig.from_tune(config), data, report=lambda metrics: epochs.append(metrics))
    return {"epochs_reported": len(epochs), "gate_rows": len(data[GATE_SPLIT].cache),
            "read_seconds": round(read, 2), "seconds": round(time.perf_counter() - started, 2),
            "test_performance": result.points[0].performance}


def _helper(*args: str, env: dict | None = None) -> dict:
    """This script in a fresh process; its last line's JSON."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def trial_bytes(work: Path) -> list[dict]:
    """Per task: the bytes an EPOCHS-epoch trial on an s3:// root fetches from the server with an
    empty node cache, and a second trial on the same node cache, against its splits' size."""
    import boto3

    from pipelines.manifest import require_manifest
    from pipelines.sweep import split_inputs
    from storage import as_path, paths, upload_tree

    local = work / "roots"
    built = _build_roots(local, TASKS)
    results = []
    with S3Server() as s3:
        os.environ.update(s3.env)  # upload_tree's pyarrow client in this process
        boto3.client("s3", endpoint_url=s3.env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
        remote = f"s3://{BUCKET}/runs"
        env = {**os.environ, **s3.env}
        for task in TASKS:
            for kind in ("data", "cache"):  # all a trial reads: the manifest, shards, cache and its stamp
                upload_tree(local / kind / task, as_path(f"{remote}/{kind}/{task}"))
            files = _split_files(str(local), task)
            on_disk = sum(Path(f["path"]).stat().st_size for f in files)
            if on_disk != sum(f["bytes"] for f in files):
                raise AssertionError(f"{task}: the files' sizes differ from the root's records")
            keys = {f"{BUCKET}/runs/{Path(f['path']).relative_to(local).as_posix()}" for f in files}
            node = Path(tempfile.mkdtemp(prefix=f"node-{task}-", dir=work))
            inputs = node.with_suffix(".inputs.pickle")  # the driver's split_inputs, as Tune passes them
            cfg = RunConfig(task_name=task, root=remote, profile="smoke")
            inputs.write_bytes(pickle.dumps(split_inputs(cfg.layout, require_manifest(cfg))))
            runs = []
            for _ in range(2):  # a first trial on the node, then a second with its cache
                s3.counter.reset()
                started = time.perf_counter()
                trial = _helper("--trial", task, "--inputs", str(inputs), env={**env, "BMOE_SPLIT_CACHE": str(node)})
                per_key = dict(s3.counter.per_key)
                runs.append({**trial, "wall_s": round(time.perf_counter() - started, 1),
                             "fetched_bytes": s3.counter.bytes, "get_requests": s3.counter.requests,
                             "split_file_bytes": sum(per_key.get(k, (0, 0))[1] for k in keys),
                             "most_gets_of_a_split_file": max(per_key.get(k, (0, 0))[0] for k in keys),
                             "other_keys": {k.removeprefix(f"{BUCKET}/runs/"): v[1] for k, v in per_key.items()
                                            if k not in keys}})
            first, second = runs
            results.append({"task": task, "epochs": EPOCHS, "split_files": len(files), "split_bytes": on_disk,
                            "fetched_bytes": first["fetched_bytes"],
                            "fetched_over_split": round(first["fetched_bytes"] / on_disk, 4),
                            "second_trial_fetched_bytes": second["fetched_bytes"],
                            "split_file_bytes_fetched": [r["split_file_bytes"] for r in runs],
                            "most_gets_of_a_split_file": [r["most_gets_of_a_split_file"] for r in runs],
                            "other_bytes_fetched": [r["other_keys"] for r in runs],
                            "get_requests": [r["get_requests"] for r in runs],
                            "trial_wall_s": [r["wall_s"] for r in runs],
                            "read_seconds": [r["read_seconds"] for r in runs],
                            "epochs_reported": first["epochs_reported"], "gate_rows": first["gate_rows"],
                            "root_build_s": built[task]})
            print(f"bytes {task}: {on_disk} in {len(files)} files; fetched {first['fetched_bytes']} "
                  f"({first['fetched_bytes'] / on_disk:.3f}x; split files {first['split_file_bytes']}), "
                  f"second trial {second['fetched_bytes']}", flush=True)
        paths._FILESYSTEMS.pop(f"s3://{BUCKET}", None)
    return results


# -- part 2: a thousand-trial sweep -----------------------------------------------------------------

def _search_points(root: Path) -> int:
    """(method, d_t) points of an enforce sweep on the superres smoke root (pipelines/sweep.py)."""
    from pipelines.grid import GRIDS, search_points, trial_configs, with_methods

    cfg = RunConfig(task_name="superres", root=str(root), profile="smoke")
    grid = with_methods(GRIDS["smoke"], "enforce")
    return len(search_points(trial_configs(cfg, grid, cfg.task().data_costs())))


def thousand_trial_sweep(work: Path, trials: int = 1000) -> dict:
    """A random-search sweep of >= `trials` enforce trials; its wall time, the time inside the
    trials, and the share of wall time x concurrency spent elsewhere (Tune, MLflow, actors)."""
    root = work / "sweep-root"
    _build_roots(root, ("superres",))
    points = _search_points(root)
    per_point = math.ceil(trials / points)
    command = [str(BMOE), "sweep", "--task", "superres", "--profile", "smoke", "--root", str(root),
               "--methods", "enforce", "--search", "random", "--num-samples", str(per_point)]
    started = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True)
    command_s = time.perf_counter() - started
    log = work / f"sweep-{per_point * points}.log"
    log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    done = re.search(r"sweep: (\d+) trials done.* -> (\S+)\s*$", out.stdout, re.MULTILINE)
    record = json.loads(Path(done[2]).read_text())
    inside = sum(r["trial_seconds"] for r in record["trials"])
    cpus = {r["resources"]["cpu"] for r in record["trials"]}
    concurrency = os.cpu_count() / max(cpus)
    wall = record["seconds"]
    n = len(record["trials"])
    seconds = sorted(r["trial_seconds"] for r in record["trials"])
    return {"trials": n, "points": points, "num_samples": per_point, "wall_s": wall,
            "command_s": round(command_s, 1), "inside_trials_s": round(inside, 1), "concurrency": concurrency,
            "overhead_share": round(1 - inside / (wall * concurrency), 4),
            "trials_per_hour": round(n / wall * 3600, 1),
            "trial_seconds_median": round(seconds[len(seconds) // 2], 3),
            "wall_per_trial_slot_s": round(wall * concurrency / n, 3), "record": done[2], "log": str(log)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("bytes", "sweep"), default="bytes")
    parser.add_argument("--trials", type=int, default=1000, help="the sweep's trials, at least")
    parser.add_argument("--work", type=Path, help="where roots go (default: a new temporary folder)")
    parser.add_argument("--trial", help=argparse.SUPPRESS)  # internal: one trial in this process
    parser.add_argument("--inputs", help=argparse.SUPPRESS)  # its split_inputs, pickled by the driver
    args = parser.parse_args()
    if args.trial:
        print(json.dumps(trial_in_process(args.trial, args.inputs)))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="bmoe-scale-io-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = trial_bytes(work) if args.part == "bytes" else thousand_trial_sweep(work, args.trials)
    print(json.dumps({"part": args.part, "work": str(work), "result": result,
                      "seconds": round(time.perf_counter() - started, 1), "loadavg": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
