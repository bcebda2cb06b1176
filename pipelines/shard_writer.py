"""Prepare's writer: a split's sample rows -> all of its shard sets (p<n>/ and gate/) in one pass.

Each Ray Data write task (or the single-process loop of bench/scale.py) keeps one rolling
Parquet file per shard set: rows are buffered per set and written in row groups, and a file is
closed once it holds the target size, so files have the size a reader likes whatever the size
of Ray's blocks. Row counts, sizes and SHA-256 checksums are taken while the bytes are written:
nothing is read back. Memory per writer is bounded by one row group per shard set.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections import Counter
from dataclasses import dataclass

import numpy as np

from storage import AnyPath, StoragePath

MB = 1 << 20


@dataclass(frozen=True)
class ShardSizes:
    """Target sizes, in MB of Arrow data (before Parquet's compression)."""

    file_mb: float = 128.0  # a shard file is closed once it holds this much
    row_group_mb: float = 8.0  # rows are buffered per shard set and written in row groups this big

    def __post_init__(self):
        if not 0 < self.row_group_mb <= self.file_mb:
            raise ValueError(f"shard sizes need 0 < row group ({self.row_group_mb} MB) <= file ({self.file_mb} MB)")


@dataclass(frozen=True)
class ShardColumns:
    """Which columns of a sample row go to which shard set (the task's contract, tasks/base.py)."""

    data_costs: tuple[float, ...]  # d_n, one shard set p<n> per expert
    target_columns: tuple[str, ...]  # stored once, in the gate set, for every expert
    meta_columns: tuple[str, ...]  # travel with the gate shard into the cache
    gate_target: str | None = None  # the target the gate input is (superres: the HR patch), stored as `gate`

    @classmethod
    def of(cls, task) -> "ShardColumns":
        return cls(tuple(float(c) for c in task.data_costs()), tuple(task.target_columns), tuple(task.meta_columns),
                   task.gate_target)

    def parts(self) -> list[str]:
        return [f"p{n}" for n in range(len(self.data_costs))] + ["gate"]

    def targets(self) -> dict[str, str]:
        """Where each target is stored in the gate set: {target: column} (the manifest keeps it)."""
        return {c: "gate" if c == self.gate_target else c for c in self.target_columns}

    def split(self, block):
        """{part: pyarrow Table} of one block of sample rows: p<n> holds x<n> as `x`, enc<n> as
        `encoded_bytes` and the constant `data_cost_bytes`; gate holds the gate input, the meta
        columns and the targets, once for all experts (pipelines/expert_rows.py reads them
        beside a p<n>)."""
        import pyarrow as pa

        keys = ["sample_id", "group"]
        tables = {}
        for n, cost in enumerate(self.data_costs):
            part = block.select([*keys, f"x{n}", f"enc{n}"]).rename_columns([*keys, "x", "encoded_bytes"])
            tables[f"p{n}"] = part.append_column("data_cost_bytes", pa.array(np.full(len(part), cost)))
        stored = dict.fromkeys([*self.meta_columns, *(c for c in self.targets().values() if c != "gate")])
        tables["gate"] = block.select([*keys, "gate", *stored])
        return tables


class _HashingFile:
    """A writable file that hashes and counts the bytes on their way out."""

    def __init__(self, path: AnyPath):
        self.path = path
        if isinstance(path, StoragePath):
            self._tmp = None
            self._raw = path.open("wb")  # an object appears whole when the stream closes
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = path.with_name(f".{path.name}.partial")
            self._raw = open(self._tmp, "wb")  # renamed into place when complete
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self._raw.write(view)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._raw.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
            if self._tmp is not None:
                os.replace(self._tmp, self.path)
            self.closed = True


class _RollingFile:
    """One open shard file of a set."""

    def __init__(self, path: AnyPath, schema):
        import pyarrow.parquet as pq

        self.file = _HashingFile(path)
        self.writer = pq.ParquetWriter(self.file, schema)
        self.schema = schema
        self.rows = 0
        self.data_bytes = 0

    def write(self, table) -> None:
        self.writer.write_table(table, row_group_size=len(table))
        self.rows += len(table)
        self.data_bytes += table.nbytes

    def close(self) -> dict:
        self.writer.close()
        self.file.close()
        return {"name": self.file.path.name, "rows": self.rows, "bytes": self.file.size,
                "sha256": self.file.sha256.hexdigest()}


class ShardWriter:
    """Writes blocks of one split's sample rows to every shard set. Files are named
    <prefix>-<k>.parquet, so writers with different prefixes never collide."""

    def __init__(self, folders: dict[str, AnyPath], columns: ShardColumns, sizes: ShardSizes, prefix: str):
        self.folders, self.columns, self.sizes, self.prefix = folders, columns, sizes, prefix
        self._open: dict[str, _RollingFile] = {}
        self._pending: dict[str, list] = {part: [] for part in folders}
        self._count = Counter()  # files started per set
        self.files: dict[str, list[dict]] = {part: [] for part in folders}
        self.source_rows: Counter = Counter()  # rows written per source_id
        self.encoded_bytes = {part: 0 for part in folders if part != "gate"}

    def add(self, block) -> None:
        """One block (pyarrow Table) of sample rows, with their source_id and enc<n> columns."""
        import pyarrow.compute as pc

        if block.num_rows == 0:
            return
        counts = pc.value_counts(block.column("source_id"))
        self.source_rows.update(dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())))
        for part, table in self.columns.split(block).items():
            if part in self.encoded_bytes:
                self.encoded_bytes[part] += int(pc.sum(table.column("encoded_bytes")).as_py() or 0)
            pending = self._pending[part]
            if pending and not pending[0].schema.equals(table.schema):
                self._flush(part, final=True)  # e.g. a ragged column Ray typed differently in this block
            self._pending[part].append(table)
            if sum(t.nbytes for t in self._pending[part]) >= self.sizes.row_group_mb * MB:
                self._flush(part)

    def _flush(self, part: str, final: bool = False) -> None:
        """Write the set's buffered rows as row groups of the target size (the rest stays
        buffered unless final), starting a new file whenever the open one is full."""
        import pyarrow as pa

        pending, self._pending[part] = self._pending[part], []
        if not pending:
            return
        table = pa.concat_tables(pending).combine_chunks()
        per_group = max(1, int(self.sizes.row_group_mb * MB / max(table.nbytes / len(table), 1)))
        start = 0
        while len(table) - start >= per_group or (final and start < len(table)):
            self._write_group(part, table.slice(start, per_group))
            start += per_group
        if start < len(table):
            self._pending[part] = [table.slice(start)]

    def _write_group(self, part: str, group) -> None:
        current = self._open.get(part)
        if current is not None and not current.schema.equals(group.schema):
            self._close(part)
            current = None
        if current is None:
            name = f"{self.prefix}-{self._count[part]:04d}.parquet"
            self._count[part] += 1
            current = self._open[part] = _RollingFile(self.folders[part] / name, group.schema)
        current.write(group)
        if current.data_bytes >= self.sizes.file_mb * MB:
            self._close(part)

    def _close(self, part: str) -> None:
        current = self._open.pop(part, None)
        if current is not None:
            self.files[part].append(current.close())

    def close(self) -> dict:
        """Flush and close every set; returns what was written (see merge_written)."""
        for part in self.folders:
            self._flush(part, final=True)
            self._close(part)
        return {"files": self.files, "source_rows": dict(self.source_rows), "encoded_bytes": self.encoded_bytes}


def merge_written(results: list[dict]) -> dict:
    """The writers' results of one split as one: files per set (by name), rows per source and
    encoded bytes per set."""
    files: dict[str, list[dict]] = {}
    source_rows: Counter = Counter()
    encoded: Counter = Counter()
    for result in results:
        for part, written in result["files"].items():
            files.setdefault(part, []).extend(written)
        source_rows.update(result["source_rows"])
        encoded.update(result["encoded_bytes"])
    return {"files": {part: sorted(f, key=lambda f: f["name"]) for part, f in files.items()},
            "source_rows": dict(source_rows), "encoded_bytes": dict(encoded)}


def write_id() -> str:
    """A short unique prefix for one prepare run's shard files."""
    return uuid.uuid4().hex[:8]


def shard_sink(folders: dict[str, AnyPath], columns: ShardColumns, sizes: ShardSizes):
    """A Ray Data Datasink that writes a dataset of sample rows to every shard set of a split;
    after `write_datasink`, its `written` holds merge_written of all write tasks."""
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    run = write_id()

    class ShardSink(Datasink):
        written: dict | None = None

        def get_name(self) -> str:
            return "Shards"

        def write(self, blocks, ctx) -> dict:
            writer = ShardWriter(folders, columns, sizes, prefix=f"{run}-{ctx.task_idx:05d}")
            for block in blocks:
                writer.add(BlockAccessor.for_block(block).to_arrow())
            return writer.close()

        def on_write_complete(self, write_result) -> None:
            self.written = merge_written(write_result.write_returns)

    return ShardSink()


def rows_to_block(rows: list[dict]):
    """Sample rows (dicts, as a task's load returns them) as one pyarrow Table, typed as Ray
    Data types the rows of a flat_map (tensor columns as Ray's Arrow tensor types)."""
    from ray.data.block import BlockAccessor

    return BlockAccessor.batch_to_block({key: [row[key] for row in rows] for key in rows[0]})
