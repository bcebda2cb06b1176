"""Stage 1, prepare: raw data -> Parquet shards per split and per P_n, plus the gate input.

Layout: <root>/data/<task>/<split>/p<n>/*.parquet and <split>/gate/*.parquet, with
manifest.json (row counts, checksums, d_n, problems). Rerunning with unchanged inputs and
intact outputs does no work. Bad files are named and counted, never silently lost.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np

from pipelines.runtime import RunConfig, UserError, ensure_ray
from tasks import SPLITS, BadInput
from tasks.base import Task

MANIFEST = "manifest.json"


def prepare(cfg: RunConfig) -> dict:
    """Write the shards of every split; returns the manifest."""
    task = cfg.task_obj()
    data_root = _data_root(cfg, task)
    listings = {split: task.list_sources(data_root, split) for split in SPLITS}
    for split, listing in listings.items():
        if not listing.sources:
            raise UserError(f"no usable {split} inputs under {data_root} ({len(listing.problems)} problems: "
                            f"{'; '.join(listing.problems[:3]) or 'nothing found'})")
        if cfg.strict and listing.problems:
            raise UserError(listing.problems[0])

    out = cfg.task_dir("data")
    fingerprint = _fingerprint(task, listings)
    previous = read_manifest(cfg)
    if previous and previous.get("fingerprint") == fingerprint and _outputs_intact(out, previous):
        print(f"prepare: inputs unchanged since {previous['created']}, shards intact: nothing to do")
        return previous

    ensure_ray(cfg)
    manifest = {
        "task": task.name,
        "profile": cfg.profile,
        "data_root": str(data_root),
        "fingerprint": fingerprint,
        "experts": task.expert_names(),
        "data_costs": [float(c) for c in task.data_costs()],
        "splits": {},
    }
    if out.exists():
        shutil.rmtree(out)
    for split in SPLITS:
        started = time.perf_counter()
        manifest["splits"][split] = _prepare_split(cfg, task, split, listings[split], out / split)
        info = manifest["splits"][split]
        print(f"prepare: {split}: {info['samples']} samples from {info['sources']} sources, "
              f"{len(info['problems'])} problems, {time.perf_counter() - started:.1f}s")
        for problem in info["problems"]:
            print(f"  skipped: {problem}")
    manifest["created"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(cfg: RunConfig) -> dict | None:
    path = cfg.task_dir("data") / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def require_manifest(cfg: RunConfig) -> dict:
    manifest = read_manifest(cfg)
    if manifest is None:
        raise UserError(f"no prepared data for task {cfg.task} under {cfg.root_path}: run `bmoe prepare` first")
    return manifest


def shard_path(cfg: RunConfig, split: str, part: str) -> str:
    """Folder of one shard set: part is 'p<n>' (expert n's input) or 'gate'."""
    return str(cfg.task_dir("data") / split / part)


def _prepare_split(cfg: RunConfig, task: Task, split: str, listing, folder: Path) -> dict:
    import ray

    blocks = max(1, min(len(listing.sources), 64))
    rows = ray.data.from_items(listing.sources, override_num_blocks=blocks).flat_map(_Loader(task)).materialize()
    count = rows.count()
    produced = set(rows.select_columns(["source_id"]).to_pandas()["source_id"]) if count else set()
    problems = list(listing.problems)
    for source in listing.sources:
        if source["source_id"] not in produced:
            problems.append(_why_empty(task, source))
    if cfg.strict and len(problems) > len(listing.problems):
        raise UserError(problems[len(listing.problems)])
    if count == 0:
        raise UserError(f"no usable {split} inputs: {'; '.join(problems[:3])}")

    costs = task.data_costs()
    # Built-in column operations only: a UDF that carries the task would make every write
    # re-import the task's modules in fresh workers (seconds each on 2 cores, measured).
    shards = {}
    for n in range(len(costs)):
        expert_rows = rows.select_columns(["sample_id", "group", *task.target_columns, f"x{n}", f"enc{n}"]) \
            .rename_columns({f"x{n}": "x", f"enc{n}": "encoded_bytes"}) \
            .add_column("data_cost_bytes", _constant(float(costs[n])), batch_format="numpy")
        shards[f"p{n}"] = _write(expert_rows, folder / f"p{n}")
    shards["gate"] = _write(rows.select_columns(["sample_id", "group", "gate", *task.meta_columns]), folder / "gate")
    encoded = rows.select_columns([f"enc{n}" for n in range(len(costs))]).to_pandas().mean() if count else {}
    return {
        "sources": len(listing.sources),
        "samples": count,
        "problems": problems,
        "mean_encoded_bytes": {f"p{n}": float(encoded[f"enc{n}"]) for n in range(len(costs))} if count else {},
        "shards": shards,
    }


class _Loader:
    """Ray Data flat_map: one source -> its sample rows; a bad source yields no rows (named later)."""

    def __init__(self, task: Task):
        self.task = task

    def __call__(self, source: dict) -> list[dict]:
        try:
            samples = self.task.load(source)
        except BadInput:
            return []
        for sample in samples:
            sample["source_id"] = source["source_id"]
        return samples


def _constant(value: float):
    """A column of one value (the data cost of every row of a shard)."""

    def column(batch: dict) -> np.ndarray:
        return np.full(len(batch["x"]), value)

    return column


def _write(ds, folder: Path) -> dict:
    ds.write_parquet(str(folder))
    files = sorted(folder.glob("*.parquet"))
    return {
        "rows": ds.count(),
        "files": [{"name": f.name, "bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files],
    }


def _why_empty(task: Task, source: dict) -> str:
    try:
        task.load(source)
    except BadInput as err:
        return str(err)
    return f"{source['source_id']}: produced no samples"


def _data_root(cfg: RunConfig, task: Task) -> Path:
    if cfg.data_root is None:
        return task.embedded_data(cfg.root_path / "raw" / task.name)
    root = Path(cfg.data_root).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"--data-root {root} is not a folder")
    return root


def _fingerprint(task: Task, listings: dict) -> str:
    """Hash of the task settings and every source (with file size and mtime): changes -> redo."""
    digest = hashlib.sha256()
    settings = getattr(task, "settings", None)
    digest.update(json.dumps(asdict(settings) if is_dataclass(settings) else repr(settings), sort_keys=True,
                             default=str).encode())
    for split in SPLITS:
        for source in listings[split].sources:
            stamp = dict(source, split=split)
            path = source.get("path")
            if path and Path(path).exists():
                st = Path(path).stat()
                stamp["_stat"] = [st.st_size, st.st_mtime_ns]
            digest.update(json.dumps(stamp, sort_keys=True, default=str).encode())
        digest.update(json.dumps(listings[split].problems).encode())
    return digest.hexdigest()


def _outputs_intact(out: Path, manifest: dict) -> bool:
    for split, info in manifest.get("splits", {}).items():
        for part, shard in info["shards"].items():
            for f in shard["files"]:
                path = out / split / part / f["name"]
                if not path.exists() or path.stat().st_size != f["bytes"]:
                    return False
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
