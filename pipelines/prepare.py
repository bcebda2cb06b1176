"""Stage 1, prepare: raw data -> Parquet shards per split and per P_n, plus the gate input.

Layout (pipelines/layout.py): data/<task>/<split>/p<n>/*.parquet and <split>/gate/*.parquet,
with manifest.json (rows, bytes and SHA-256 per file, d_n, problems). One streaming Ray Data
pass per split reads and decodes each source once and writes every shard set at the root's URI
from whichever node does the work; no split is ever held whole in memory or the object store.
Rerunning with unchanged inputs and intact outputs does no work. Bad files are named and
counted, never silently lost; a file a worker cannot read is counted apart from bad content.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

from pipelines.identity import check_identity, identity
from pipelines.integrity import shard_damage
from pipelines.manifest import read_manifest
from pipelines.runtime import RunConfig, UserError, ensure_ray, label_options
from pipelines.shard_writer import ShardColumns, ShardSizes, merge_written, rows_to_block, shard_sink
from storage import AnyPath, StoragePath, as_path, read_json, remove_tree, upload_tree, write_json
from tasks import GATE_SPLIT, SOURCE_SPLITS, SPLITS, BadInput, UnreadableInput
from tasks.base import TaskBase, carve_gate_split, settings_record

EMBEDDED_STAMP = "embedded.json"  # what each task's embedded_data writes last, with its settings
BLOCK_BYTES = 32 << 20  # Ray Data blocks from the loaders to the writers (Ray's default: 128 MiB)
TASKS_PER_CPU = 4  # write tasks per cluster CPU: enough to balance uneven sources, few enough for big files


def prepare(cfg: RunConfig, sizes: ShardSizes = ShardSizes()) -> dict:
    """Write the shards of every split; returns the manifest. `sizes`: target file and row-group
    sizes of the shards."""
    task = cfg.task()
    layout = cfg.layout
    data_root = _data_root(cfg, task)
    try:
        listings = list_splits(task, data_root)
    except ValueError as err:
        raise UserError(str(err)) from None
    # the data set's own splits first: a missing one says more than a train split of one group
    for split in sorted(listings, key=lambda split: split == GATE_SPLIT):
        listing = listings[split]
        if split == GATE_SPLIT and not listing.sources and listings["train"].sources:
            raise UserError(f"the train inputs under {data_root} are one group: at least two are needed to hold "
                            f"some out for training gates")
        if not listing.sources:
            raise UserError(f"no usable {split} inputs under {data_root} ({len(listing.problems)} problems: "
                            f"{'; '.join(listing.problems[:3]) or 'nothing found'})")
        if cfg.strict and listing.problems:
            raise UserError(listing.problems[0])

    fingerprint = _fingerprint(task, listings, data_root)
    previous = read_manifest(layout)
    if previous:  # never remake the shards (and so orphan the experts) of a root made with other settings
        check_identity(cfg, previous, "prepare")
    # (a manifest without "targets" is an earlier bmoe's: its targets are in every P_n set)
    if previous and previous.get("fingerprint") == fingerprint \
            and previous.get("targets") == ShardColumns.of(task).targets() and _outputs_intact(layout, previous):
        recorded = [m for info in previous["splits"].values() for m in info["problems"] + info["unreadable"]]
        if cfg.strict and recorded:  # strict holds for the problems the kept shards were made with, too
            raise UserError(f"{recorded[0]} (recorded by the prepare of {previous['created']}; "
                            f"{len(recorded)} problem(s) in all)")
        print(f"prepare: inputs unchanged since {previous['created']}, shards intact: nothing to do")
        return previous

    ensure_ray(cfg)
    manifest = {
        "task": task.name,
        "profile": cfg.profile,
        "data_root": layout.record_data_root(data_root),  # relative when it is the root's own (embedded) data
        "fingerprint": fingerprint,
        "identity": identity(cfg),  # every later stage compares its own (pipelines/identity.py)
        "experts": task.expert_names(),
        "data_costs": [float(c) for c in task.data_costs()],
        "targets": ShardColumns.of(task).targets(),  # each target's column in the gate set (pipelines/expert_rows.py)
        # the label set the data root defined (pipelines.runtime.label_options), for later stages
        "label_options": {k: cfg.task_options[k] for k in label_options(cfg.task_name, cfg.profile, cfg.data_root)
                          if cfg.data_root and k in cfg.task_options},
        "splits": {},
    }
    for key, value in manifest["label_options"].items():
        shown = value if len(str(value)) < 60 else f"{len(str(value).split(','))} ids"
        print(f"prepare: label set from the data: {key}={shown} (-o {key}=... overrides it)")
    # The new shards are written beside the old ones (every prepare's file names are its own):
    # the old manifest and its shards stay usable until the new manifest replaces it, last.
    log = _problem_log()
    for split in SPLITS:
        started = time.perf_counter()
        manifest["splits"][split] = _prepare_split(cfg, task, split, listings[split], log, sizes)
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
    removed = _remove_unlisted_shards(layout, manifest)
    if removed:
        print(f"prepare: removed {removed} shard file(s) of earlier prepares")
    unreadable = sum(len(info["unreadable"]) for info in manifest["splits"].values())
    if unreadable:
        raise UserError(f"{unreadable} input files could not be read by the Ray workers (named above): the shards "
                        f"hold the rest; make the data root readable from every node and rerun")
    return manifest


def list_splits(task: TaskBase, data_root: AnyPath) -> dict:
    """The sources of every split: the data set's own (task.list_sources), with the gate split
    carved out of train (tasks.base.carve_gate_split)."""
    listings = {split: task.list_sources(data_root, split) for split in SOURCE_SPLITS}
    listings["train"], listings[GATE_SPLIT] = carve_gate_split(listings["train"], task.settings.gate_share)
    return {split: listings[split] for split in SPLITS}


def _prepare_split(cfg: RunConfig, task: TaskBase, split: str, listing, log, sizes: ShardSizes) -> dict:
    """One streaming pass: Ray Data reads and decodes each source once on a worker (one block
    per source), and the same task writes its rows to every shard set (pipelines/shard_writer.py). Nothing of the
    split is materialised, and the driver only sees the writers' small records."""
    import ray
    import ray.data

    layout = cfg.layout
    columns = ShardColumns.of(task)
    folders = {part: layout.shards(split, part) for part in columns.parts()}
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    blocks = max(1, min(len(listing.sources), TASKS_PER_CPU * cpus))
    sink = shard_sink(folders, columns, sizes)
    context = ray.data.DataContext.get_current()
    default_block = context.target_max_block_size
    # small blocks between the loader and the writer: a write task's memory stays a few blocks
    context.target_max_block_size = min(default_block or BLOCK_BYTES, BLOCK_BYTES)
    try:
        ray.data.from_items(listing.sources, override_num_blocks=blocks) \
            .map_batches(_Loader(task, log), batch_size=1, batch_format="pyarrow", zero_copy_batch=True) \
            .write_datasink(sink)
    finally:
        context.target_max_block_size = default_block
    written = sink.written or merge_written([])
    count = sum(written["source_rows"].values())
    found = ray.get(log.take.remote())  # what the workers could not read or decode, by source
    problems, unreadable = list(listing.problems), []
    for source in listing.sources:
        if source["source_id"] not in written["source_rows"]:
            kind, message = found.get(source["source_id"], ("bad", f"{source['source_id']}: produced no samples"))
            (unreadable if kind == "unreadable" else problems).append(message)
    if cfg.strict and (unreadable or len(problems) > len(listing.problems)):
        raise UserError((unreadable + problems[len(listing.problems):])[0])
    if count == 0:
        raise UserError(f"no usable {split} inputs: {'; '.join((unreadable + problems)[:3])}")
    shards = {}
    for part in columns.parts():
        files = written["files"].get(part, [])
        shards[part] = {"rows": sum(f["rows"] for f in files), "files": files}
        if shards[part]["rows"] != count:  # a bug, not user input: every set holds every sample
            raise RuntimeError(f"prepare: {split}/{part} holds {shards[part]['rows']} of {count} samples")
    return {
        "sources": len(listing.sources),
        "samples": count,
        "problems": problems,
        "unreadable": unreadable,
        "mean_encoded_bytes": {part: written["encoded_bytes"].get(part, 0) / count for part in columns.parts()
                               if part != "gate"},
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
    """Ray Data map_batches over sources: each source -> one columnar block of its sample rows
    (built once per source, not row by row by Ray). A source that cannot be read, or whose
    content is bad, yields nothing and is told to the problem log (a worker's view, not the
    driver's: the driver may see files that a worker node cannot)."""

    def __init__(self, task: TaskBase, log):
        self.task, self.log = task, log

    def __call__(self, sources):
        import ray

        for source in sources.to_pylist():
            try:
                samples = self.task.load(source)
            except UnreadableInput as err:
                ray.get(self.log.add.remote(source["source_id"], "unreadable", str(err)))
                continue
            except BadInput as err:
                ray.get(self.log.add.remote(source["source_id"], "bad", str(err)))
                continue
            if samples:
                for sample in samples:
                    sample["source_id"] = source["source_id"]
                yield rows_to_block(samples)


def _data_root(cfg: RunConfig, task: TaskBase) -> AnyPath:
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


def _embedded_data(cfg: RunConfig, task: TaskBase) -> AnyPath:
    """The task's embedded data set under <root>/raw/<task>. For an object-store root it is
    generated in a temporary folder on this machine and uploaded once (workers read it from
    the store); an upload whose settings stamp is unchanged is kept."""
    raw = cfg.layout.raw()
    if not isinstance(raw, StoragePath):
        return task.embedded_data(raw, cfg.seed)
    with tempfile.TemporaryDirectory(prefix="bmoe-embedded-") as tmp:
        local = Path(tmp)
        stamp = read_json(raw / EMBEDDED_STAMP)
        if stamp is not None:  # the task regenerates nothing when its settings match the stamp
            (local / EMBEDDED_STAMP).write_text(json.dumps(stamp))
        task.embedded_data(local, cfg.seed)
        if any(p.is_file() and p.name != EMBEDDED_STAMP for p in local.rglob("*")):
            remove_tree(raw)
            count = upload_tree(local, raw)
            print(f"prepare: embedded {task.name} data written to {raw} ({count} files)")
    return raw


def _fingerprint(task: TaskBase, listings: dict, data_root: AnyPath) -> str:
    """Hash of the task settings and every source (its path under the data root, size and mtime):
    changes -> redo. Paths are taken relative to the data root, so a copied or moved run root
    (its embedded data with it) or data root is recognised, not recomputed."""
    digest = hashlib.sha256()
    record = settings_record(task.settings)
    digest.update(json.dumps(record.get("repr", record), sort_keys=True, default=str).encode())
    base = str(data_root).rstrip("/") + "/"
    for split in SPLITS:
        for source in listings[split].sources:
            entry = dict(source, split=split)
            if str(entry.get("path", "")).startswith(base):
                entry["path"] = str(entry["path"])[len(base):]
            digest.update(json.dumps(entry, sort_keys=True, default=str).encode())
        digest.update(json.dumps(listings[split].problems).encode())
    return digest.hexdigest()


def _remove_unlisted_shards(layout, manifest: dict) -> int:
    """Delete what the (new) manifest does not list under the data folder: an earlier prepare's
    shards, an interrupted one's partial files, sets of experts no longer there."""
    listed = {(split, part, f["name"]) for split, info in manifest["splits"].items()
              for part, shard in info["shards"].items() for f in shard["files"]}
    data, removed = layout.data(), 0
    if not data.is_dir():
        return 0
    for split_dir in data.iterdir():
        if not split_dir.is_dir():
            continue
        for part_dir in split_dir.iterdir():
            if not part_dir.is_dir():
                continue
            stale = [f for f in part_dir.iterdir() if (split_dir.name, part_dir.name, f.name) not in listed]
            for f in stale:
                if f.is_dir():
                    remove_tree(f)
                else:
                    f.unlink(missing_ok=True)
            removed += len(stale)
    return removed


def _outputs_intact(layout, manifest: dict) -> bool:
    """Every shard file the manifest names is there with its size (one listing per shard set)
    and its SHA-256, and no file was left unread last time."""
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
    damaged = shard_damage(layout, manifest)
    if damaged:
        print(f"prepare: {damaged[0]} ({len(damaged)} shard file(s) damaged): making the shards again")
    return not damaged
