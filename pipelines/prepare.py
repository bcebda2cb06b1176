"""Stage 1, prepare: raw data -> Parquet shards per split and per P_n, plus the gate input.

Layout (pipelines/layout.py): data/<task>/<split>/p<n>/*.parquet and <split>/gate/*.parquet,
with manifest.json (row counts and footer checksums per file, d_n, problems). Ray Data reads
each source and writes the shards at the root's URI from whichever node does the work.
Rerunning with unchanged inputs and intact outputs does no work. Bad files are named and
counted, never silently lost; a file a worker cannot read is counted apart from bad content.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np

from pipelines.runtime import RunConfig, UserError, ensure_ray
from storage import AnyPath, StoragePath, as_path, read_json, remove_tree, upload_tree, write_json
from tasks import SPLITS, BadInput, UnreadableInput
from tasks.base import Task

EMBEDDED_STAMP = "embedded.json"  # what each task's embedded_data writes last, with its settings


def prepare(cfg: RunConfig) -> dict:
    """Write the shards of every split; returns the manifest."""
    task = cfg.task_obj()
    layout = cfg.layout
    data_root = _data_root(cfg, task)
    listings = {split: task.list_sources(data_root, split) for split in SPLITS}
    for split, listing in listings.items():
        if not listing.sources:
            raise UserError(f"no usable {split} inputs under {data_root} ({len(listing.problems)} problems: "
                            f"{'; '.join(listing.problems[:3]) or 'nothing found'})")
        if cfg.strict and listing.problems:
            raise UserError(listing.problems[0])

    fingerprint = _fingerprint(task, listings)
    previous = read_manifest(cfg)
    if previous and previous.get("fingerprint") == fingerprint and _outputs_intact(layout, previous):
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
    remove_tree(layout.data())
    log = _problem_log()
    for split in SPLITS:
        started = time.perf_counter()
        manifest["splits"][split] = _prepare_split(cfg, task, split, listings[split], log)
        info = manifest["splits"][split]
        print(f"prepare: {split}: {info['samples']} samples from {info['sources']} sources, "
              f"{len(info['problems'])} problems, {len(info['unreadable'])} unreadable, "
              f"{time.perf_counter() - started:.1f}s")
        for problem in info["problems"]:
            print(f"  skipped: {problem}")
        for problem in info["unreadable"]:
            print(f"  unreadable: {problem}")
    manifest["created"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(layout.manifest(), manifest)
    unreadable = sum(len(info["unreadable"]) for info in manifest["splits"].values())
    if unreadable:
        raise UserError(f"{unreadable} input files could not be read by the Ray workers (named above): the shards "
                        f"hold the rest; make the data root readable from every node and rerun")
    return manifest


def read_manifest(cfg: RunConfig) -> dict | None:
    return read_json(cfg.layout.manifest())


def require_manifest(cfg: RunConfig) -> dict:
    manifest = read_manifest(cfg)
    if manifest is None:
        raise UserError(f"no prepared data for task {cfg.task} under {cfg.root}: run `bmoe prepare` first")
    return manifest


def _prepare_split(cfg: RunConfig, task: Task, split: str, listing, log) -> dict:
    import ray

    layout = cfg.layout
    blocks = max(1, min(len(listing.sources), 64))
    rows = ray.data.from_items(listing.sources, override_num_blocks=blocks).flat_map(_Loader(task, log)).materialize()
    count = rows.count()
    costs = task.data_costs()
    # scalar columns only: which sources gave rows, and the encoded bytes of each P_n
    meta = rows.select_columns(["source_id", *(f"enc{n}" for n in range(len(costs)))]).to_pandas() if count else None
    produced = set(meta["source_id"]) if count else set()
    found = ray.get(log.take.remote())  # what the workers could not read or decode, by source
    problems, unreadable = list(listing.problems), []
    for source in listing.sources:
        if source["source_id"] not in produced:
            kind, message = found.get(source["source_id"], ("bad", f"{source['source_id']}: produced no samples"))
            (unreadable if kind == "unreadable" else problems).append(message)
    if cfg.strict and (unreadable or len(problems) > len(listing.problems)):
        raise UserError((unreadable + problems[len(listing.problems):])[0])
    if count == 0:
        raise UserError(f"no usable {split} inputs: {'; '.join((unreadable + problems)[:3])}")

    # Built-in column operations only: a UDF that carries the task would make every write
    # re-import the task's modules in fresh workers (seconds each on 2 cores, measured).
    shards = {}
    for n in range(len(costs)):
        expert_rows = rows.select_columns(["sample_id", "group", *task.target_columns, f"x{n}", f"enc{n}"]) \
            .rename_columns({f"x{n}": "x", f"enc{n}": "encoded_bytes"}) \
            .add_column("data_cost_bytes", _constant(float(costs[n])), batch_format="numpy")
        shards[f"p{n}"] = _write(expert_rows, layout.shards(split, f"p{n}"))
    shards["gate"] = _write(rows.select_columns(["sample_id", "group", "gate", *task.meta_columns]),
                            layout.shards(split, "gate"))
    encoded = meta.drop(columns="source_id").mean()
    return {
        "sources": len(listing.sources),
        "samples": count,
        "problems": problems,
        "unreadable": unreadable,
        "mean_encoded_bytes": {f"p{n}": float(encoded[f"enc{n}"]) for n in range(len(costs))},
        "shards": shards,
    }


def _problem_log():
    """A small actor the loaders tell why a source gave no rows, from whichever node they run on."""
    import ray

    @ray.remote(num_cpus=0)
    class ProblemLog:
        def __init__(self):
            self._found: dict[str, tuple[str, str]] = {}

        def add(self, source_id: str, kind: str, message: str) -> None:
            self._found[source_id] = (kind, message)

        def take(self) -> dict[str, tuple[str, str]]:
            """What was told since the last take (one split's sources)."""
            found, self._found = self._found, {}
            return found

    return ProblemLog.remote()


class _Loader:
    """Ray Data flat_map: one source -> its sample rows. A source that cannot be read, or whose
    content is bad, yields no rows and is told to the problem log (a worker's view, not the
    driver's: the driver may see files that a worker node cannot)."""

    def __init__(self, task: Task, log):
        self.task, self.log = task, log

    def __call__(self, source: dict) -> list[dict]:
        import ray

        try:
            samples = self.task.load(source)
        except UnreadableInput as err:
            ray.get(self.log.add.remote(source["source_id"], "unreadable", str(err)))
            return []
        except BadInput as err:
            ray.get(self.log.add.remote(source["source_id"], "bad", str(err)))
            return []
        for sample in samples:
            sample["source_id"] = source["source_id"]
        return samples


def _constant(value: float):
    """A column of one value (the data cost of every row of a shard)."""

    def column(batch: dict) -> np.ndarray:
        return np.full(len(batch["x"]), value)

    return column


def _write(ds, folder: AnyPath) -> dict:
    """Ray Data writes the shard files at the folder's URI; their row counts and checksums come
    from the Parquet footers (two small reads per file), never from reading the data back."""
    ds.write_parquet(str(folder))
    files = [_footer(f) for f in sorted(folder.glob("*.parquet"))]
    return {"rows": sum(f["rows"] for f in files), "files": files}


def _footer(path: AnyPath) -> dict:
    """{name, bytes, rows, footer_sha256} of one Parquet file."""
    import pyarrow.parquet as pq

    size = path.stat().st_size
    with path.open("rb") as f:
        f.seek(size - 8)
        length = int.from_bytes(f.read(4), "little")
        f.seek(size - 8 - length)
        footer = f.read(length)
    rows = pq.read_metadata(_footer_buffer(footer)).num_rows
    return {"name": path.name, "bytes": size, "rows": rows, "footer_sha256": hashlib.sha256(footer).hexdigest()}


def _footer_buffer(footer: bytes):
    """A file-like holding just a Parquet footer, which is all pyarrow reads for metadata."""
    import pyarrow as pa

    tail = len(footer).to_bytes(4, "little") + b"PAR1"
    return pa.BufferReader(b"PAR1" + footer + tail)


def _data_root(cfg: RunConfig, task: Task) -> AnyPath:
    if cfg.data_root is None:
        return _embedded_data(cfg, task)
    try:
        root = as_path(cfg.data_root)
        is_dir = root.is_dir()
    except ValueError as err:  # a URI pyarrow cannot resolve: scheme, bucket, credentials
        raise UserError(f"--data-root {err}") from None
    if not is_dir:
        raise UserError(f"--data-root {root} is not a folder")
    return root


def _embedded_data(cfg: RunConfig, task: Task) -> AnyPath:
    """The task's embedded data set under <root>/raw/<task>. For an object-store root it is
    generated in a temporary folder on this machine and uploaded once (workers read it from
    the store); an upload whose settings stamp is unchanged is kept."""
    raw = cfg.layout.raw()
    if not isinstance(raw, StoragePath):
        return task.embedded_data(raw)
    with tempfile.TemporaryDirectory(prefix="bmoe-embedded-") as tmp:
        local = Path(tmp)
        stamp = read_json(raw / EMBEDDED_STAMP)
        if stamp is not None:  # the task regenerates nothing when its settings match the stamp
            (local / EMBEDDED_STAMP).write_text(json.dumps(stamp))
        task.embedded_data(local)
        if any(p.is_file() and p.name != EMBEDDED_STAMP for p in local.rglob("*")):
            remove_tree(raw)
            count = upload_tree(local, raw)
            print(f"prepare: embedded {task.name} data written to {raw} ({count} files)")
    return raw


def _fingerprint(task: Task, listings: dict) -> str:
    """Hash of the task settings and every source (with file size and mtime): changes -> redo."""
    digest = hashlib.sha256()
    settings = getattr(task, "settings", None)
    digest.update(json.dumps(asdict(settings) if is_dataclass(settings) else repr(settings), sort_keys=True,
                             default=str).encode())
    for split in SPLITS:
        for source in listings[split].sources:
            digest.update(json.dumps(dict(source, split=split), sort_keys=True, default=str).encode())
        digest.update(json.dumps(listings[split].problems).encode())
    return digest.hexdigest()


def _outputs_intact(layout, manifest: dict) -> bool:
    """Every shard file the manifest names is there with its size (one listing per shard set),
    and no file was left unread last time."""
    for split, info in manifest.get("splits", {}).items():
        if info.get("unreadable"):
            return False
        for part, shard in info["shards"].items():
            folder = layout.shards(split, part)
            if not folder.is_dir():
                return False
            sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
            if any(sizes.get(f["name"]) != f["bytes"] for f in shard["files"]):
                return False
    return True
