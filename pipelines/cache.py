"""Stage 3, cache: every frozen expert over the gate, val and test splits, once (the experts'
own train split is not scored: nothing reads it, and it is the largest).

Ray Data batch inference with an actor pool per expert writes, per sample, each expert's loss
(the gate's training signal) and score (additive under the task metric: the oracle's input)
and any task columns the metric needs, to cache/<task>/<split>.parquet under the root. Each
actor loads its expert's weights from the root itself, on whichever node it runs. A gate
sweep then never runs an expert: that is the main performance lever of the whole pipeline.

The driver never holds a split: the scored rows stream to it in the shards' order and go to
local files batch by batch, and each split's cache is written by zipping those files with the
gate shards' keys a few thousand rows at a time. So its memory is the same for COCO as for
the demo.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipelines.expert_rows import expert_dataset
from pipelines.integrity import cache_damage, digest, expert_damage, shard_damage
from pipelines.manifest import require_manifest, require_targets, shard_files
from pipelines.resources import cache_demand, require
from pipelines.runtime import RunConfig, UserError, ensure_ray
from pipelines.train_experts import load_expert
from storage import copy_file, read_json, write_json
from tasks import SCORED_SPLITS

CACHE_ORDER = "gate-shards"  # rows in the order of the split's gate shards (older caches were sorted by id)
CACHE_SPLITS = "scored"  # SCORED_SPLITS only (older caches scored train too)
MERGE_ROWS = 4096  # rows the driver holds while it writes a split's cache


def cache(cfg: RunConfig, actors: int = 0, batch_size: int = 0) -> dict[str, str]:
    """Write the per-sample cache of every split; returns the file of each split. actors: the
    most scorer actors per expert (0: with --gpu, as many as the cluster's GPUs take, growing as
    an autoscaling cluster adds GPU nodes; else one); the pool grows from one as Ray places them.
    batch_size: inputs a scorer takes at once (0: the task's score_batch)."""
    import ray.data

    manifest = require_manifest(cfg, "cache")
    task = cfg.task()
    layout = cfg.layout
    experts = _expert_fingerprints(cfg, task)
    key = {"data": manifest["fingerprint"], "experts": experts, "order": CACHE_ORDER, "splits": CACHE_SPLITS,
           "metric": task.metric_name}  # another metric, another per-sample score: scored again
    files = {split: layout.cache(split) for split in SCORED_SPLITS}
    stamp = read_json(layout.cache_stamp()) or {}
    if {k: v for k, v in stamp.items() if k != "files"} == key and all(f.exists() for f in files.values()):
        damaged = cache_damage(layout, stamp)
        if not damaged:
            print("cache: data and experts unchanged, cache kept")
            return {split: str(f) for split, f in files.items()}
        print(f"cache: {damaged[0]}: scoring again")
    require_targets(layout, manifest)
    if damaged := shard_damage(layout, manifest, SCORED_SPLITS):
        raise UserError(f"cache: {damaged[0]} ({len(damaged)} shard file(s) damaged): run `bmoe prepare` to make "
                        f"them again")

    ensure_ray(cfg)
    require(cache_demand(cfg.use_gpu))
    started = time.perf_counter()
    context = ray.data.DataContext.get_current()
    ordered = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # rows in the shards' order: the gate shards' order
    with tempfile.TemporaryDirectory(prefix="bmoe-cache-") as tmp:
        scored: dict[str, list[Path]] = {split: [] for split in SCORED_SPLITS}  # per split, each expert's columns
        try:
            for n in range(len(experts)):
                # one pass per expert over all splits: one actor pool, one model load per actor
                stream = expert_dataset(layout, manifest, SCORED_SPLITS, n, with_split=True).map_batches(
                    _ExpertScorer,
                    fn_constructor_kwargs={"ref": cfg.ref, "n": n, "weights": str(layout.weights(n)),
                                           "use_gpu": cfg.use_gpu},
                    compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors or (None if cfg.use_gpu else 1)),
                    batch_size=batch_size or task.score_batch,
                    batch_format="numpy",
                    num_gpus=1 if cfg.use_gpu else 0,
                )
                counts = _write_by_split(stream, n, Path(tmp), scored)
                print(f"cache: expert {n}: {sum(counts.values())} samples scored "
                      f"({time.perf_counter() - started:.1f}s)")
        finally:
            context.execution_options.preserve_order = ordered
        rows = {split: _merge(layout, manifest, task, split, scored[split], files[split], Path(tmp))
                for split in SCORED_SPLITS}
    write_json(layout.cache_stamp(), {**key, "files": {split: digest(f) for split, f in files.items()}})
    print(f"cache: {', '.join(f'{s} {m}' for s, m in rows.items())} samples x {len(experts)} experts "
          f"in {time.perf_counter() - started:.1f}s")
    return {split: str(f) for split, f in files.items()}


def _write_by_split(stream, n: int, tmp: Path, scored: dict[str, list[Path]]) -> dict[str, int]:
    """Expert n's scored rows, streamed to the driver batch by batch (never the whole split) and
    written to one local file per split with each column suffixed _n."""
    import pyarrow.parquet as pq

    writers: dict[str, pq.ParquetWriter] = {}
    counts = {split: 0 for split in scored}
    try:
        for batch in stream.iter_batches(batch_size=None, batch_format="pyarrow"):
            split_of = np.array(batch.column("split").to_pylist())
            batch = batch.drop_columns(["split"])
            batch = batch.rename_columns([c if c == "sample_id" else f"{c}_{n}" for c in batch.column_names])
            for split in np.unique(split_of):
                part = batch.filter(pa.array(split_of == split))
                if split not in writers:
                    path = tmp / f"{split}-{n}.parquet"
                    writers[split] = pq.ParquetWriter(path, part.schema)
                    scored[split].append(path)
                writers[split].write_table(part)
                counts[split] += part.num_rows
    finally:
        for writer in writers.values():
            writer.close()
    return counts


def _merge(layout, manifest: dict, task, split: str, scored: list[Path], out, tmp: Path) -> int:
    """The split's cache file: its gate shards' keys and task columns beside every expert's
    columns, zipped chunk by chunk in the gate shards' row order (the order the experts were
    scored in); the driver holds one chunk, whatever the split's size. Returns its rows."""
    import pyarrow.parquet as pq

    meta = _chunks(_gate_batches(layout, manifest, split, ["sample_id", "group", *task.meta_columns]))
    experts = [_chunks(pq.ParquetFile(path).iter_batches()) for path in scored]
    local = tmp / f"{split}.parquet"
    writer, rows = None, 0
    try:
        for chunk in meta:
            parts = [next(e, None) for e in experts]
            for n, part in enumerate(parts):  # a bug, not user input: every prepared sample must be scored
                if part is None or not part.column("sample_id").equals(chunk.column("sample_id")):
                    raise RuntimeError(f"cache: expert {n} did not score the {split} samples in the order of "
                                       f"their gate shards (at row {rows})")
            merged = pa.Table.from_arrays(
                [*chunk.columns, *(c for part in parts for c in part.drop_columns(["sample_id"]).columns)],
                names=[*chunk.column_names, *(c for part in parts for c in part.column_names if c != "sample_id")])
            writer = writer or pq.ParquetWriter(local, merged.schema)
            writer.write_table(merged)
            rows += merged.num_rows
        if any(next(e, None) is not None for e in experts):
            raise RuntimeError(f"cache: an expert scored more {split} samples than its gate shards hold")
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise RuntimeError(f"cache: the {split} split has no samples")
    copy_file(local, out)
    return rows


def _gate_batches(layout, manifest: dict, split: str, columns: list[str]):
    import pyarrow.parquet as pq

    for path in shard_files(layout, manifest, split, "gate"):
        with path.open("rb") as f:
            yield from pq.ParquetFile(f).iter_batches(columns=columns)


def _chunks(batches, rows: int = MERGE_ROWS):
    """Tables of exactly `rows` rows (the last one fewer) from record batches of any sizes, so
    streams batched differently line up."""
    held, count = [], 0
    for batch in batches:
        held.append(batch)
        count += batch.num_rows
        while count >= rows:
            table = pa.Table.from_batches(held).combine_chunks()
            yield table.slice(0, rows)
            rest = table.slice(rows)
            held, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(held).combine_chunks()


class _ExpertScorer:
    """Actor: holds one frozen expert and scores batches of its P_n shard."""

    def __init__(self, ref, n: int, weights: str, use_gpu: bool):
        self.task = ref.task()
        self.n = n
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = load_expert(self.task, n, weights, self.device)  # read from the root on this node

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            columns = self.task.evaluate(self.n, self.model, batch, self.device)
        return {"sample_id": batch["sample_id"], "split": batch["split"], **columns}


def _expert_fingerprints(cfg: RunConfig, task) -> list[str]:
    prints = []
    for n in range(len(task.expert_names())):
        meta = read_json(cfg.layout.expert_meta(n))
        if meta is None:
            raise UserError(f"expert {n} of task {cfg.task_name} is not trained: run `bmoe train-experts` first")
        if problem := expert_damage(cfg.layout, n, meta):
            raise UserError(f"cache: {problem}: run `bmoe train-experts` to train expert {n} again")
        prints.append(meta["fingerprint"])
    return prints
