"""What an expert reads: its P_n shard set beside the targets, row for row.

Prepare stores each split's targets once, in the gate set (<split>/gate/), and every P_n without
them (<split>/p<n>/): for DIV2K the HR patch is most of a row, and it used to be stored in every
P_n set as well as being the gate's input. The manifest's "targets" says which gate column holds
each target (superres: "hr" is the "gate" column). All sets hold the same samples in the same
order (each writer writes a block's rows to every set at once, pipelines/shard_writer.py) but
close files and row groups at their own sizes. So a read task takes one P_n file and the gate
rows at the same row numbers, which the manifest's row counts and the gate files' row-group
footers locate: it reads only the row groups that hold those rows, and holds one row group of
each set at a time.
"""

from __future__ import annotations

import json
from itertools import accumulate

from pipelines.manifest import require_targets
from storage import as_path

X_COLUMNS = ("sample_id", "group", "x", "encoded_bytes", "data_cost_bytes")  # what a p<n> shard set holds


def expert_dataset(layout, manifest: dict, splits, n: int, columns: list[str] | None = None,
                   with_split: bool = False):
    """A Ray Dataset of the splits' rows for expert n, in the shards' row order: `columns` of
    the p<n> set and the targets (default all), plus a `split` column if asked."""
    import ray.data

    units = [json.dumps(unit) for split in splits for unit in read_units(layout, manifest, split, n)]
    reader = _UnitReader(columns, with_split)
    return ray.data.from_items([{"unit": u} for u in units], override_num_blocks=max(1, len(units))) \
        .map_batches(reader, batch_size=1, batch_format="pyarrow", zero_copy_batch=True)


def read_units(layout, manifest: dict, split: str, n: int) -> list[dict]:
    """One read task per p<n> file: its path, the gate files' row ranges that hold the same
    rows, and where the targets are stored in them."""
    require_targets(layout, manifest)
    shards = manifest["splits"][split]["shards"]
    x_files, t_files = shards[f"p{n}"]["files"], shards["gate"]["files"]
    x_folder, t_folder = layout.shards(split, f"p{n}"), layout.shards(split, "gate")
    t_starts = [0, *accumulate(f["rows"] for f in t_files)]
    units, start = [], 0
    for f in x_files:
        stop = start + f["rows"]
        ranges = [[str(t_folder / t["name"]), max(start, lo) - lo, min(stop, hi) - lo]
                  for t, lo, hi in zip(t_files, t_starts, t_starts[1:]) if lo < stop and hi > start]
        units.append({"split": split, "x": str(x_folder / f["name"]), "targets": ranges,
                      "stored": manifest["targets"]})
        start = stop
    if start != t_starts[-1]:  # a bug, not user input: prepare checks every set holds every sample
        raise RuntimeError(f"{split}: p{n} holds {start} rows, the targets {t_starts[-1]}")
    return units


class _UnitReader:
    """Ray Data's map over units: one JSON-encoded unit in, its tables out (read_unit)."""

    def __init__(self, columns: list[str] | None, with_split: bool):
        self.columns, self.with_split = columns, with_split

    def __call__(self, batch):
        for unit in batch.column("unit").to_pylist():
            yield from read_unit(json.loads(unit), self.columns, self.with_split)


def read_unit(unit: dict, columns: list[str] | None = None, with_split: bool = False):
    """One read unit (read_units) as tables of its P_n rows beside their targets, one P_n row
    group at a time: `columns` of both sets (default all), and `split` if asked."""
    import pyarrow as pa

    x_file = _parquet(unit["x"])
    x_wanted = [c for c in X_COLUMNS if columns is None or c in columns]
    t_wanted = [c for c in unit["stored"] if columns is None or c in columns]
    stored = list(dict.fromkeys(["sample_id", *(unit["stored"][c] for c in t_wanted)]))
    targets = _RowTaker(_target_groups(unit["targets"], stored))
    for i in range(x_file.num_row_groups):
        x = x_file.read_row_group(i, columns=list(dict.fromkeys(["sample_id", *x_wanted])))
        t = targets.take(x.num_rows)
        if not t.column("sample_id").equals(x.column("sample_id")):  # a bug, not user input
            raise RuntimeError(f"{unit['x']}: its rows and the gate rows at the same row numbers differ")
        arrays = [x.column(c) for c in x_wanted] + [t.column(unit["stored"][c]) for c in t_wanted]
        names = x_wanted + t_wanted
        if with_split:
            arrays.append(pa.array([unit["split"]] * x.num_rows))
            names.append("split")
        yield pa.Table.from_arrays(arrays, names=names)


def _parquet(path: str):
    import pyarrow.parquet as pq

    return pq.ParquetFile(as_path(path).open("rb"))


def _target_groups(ranges: list, columns: list[str]):
    """`columns` of the gate rows in `ranges` ([path, first row, end row] per file), row group by
    row group, reading only the groups that hold them."""
    for path, first, end in ranges:
        f = _parquet(path)
        lo = 0
        for i in range(f.num_row_groups):
            hi = lo + f.metadata.row_group(i).num_rows
            if hi > first and lo < end:
                group = f.read_row_group(i, columns=columns)
                yield group.slice(max(first - lo, 0), min(end, hi) - max(first, lo))
            lo = hi
            if lo >= end:
                break


class _RowTaker:
    """Takes exactly k rows at a time from a stream of tables."""

    def __init__(self, tables):
        self.tables, self.held = tables, []

    def take(self, k: int):
        import pyarrow as pa

        count = sum(t.num_rows for t in self.held)
        while count < k:
            table = next(self.tables, None)
            if table is None:
                raise RuntimeError(f"the gate rows ended {k - count} rows early")  # a bug, not user input
            self.held.append(table)
            count += table.num_rows
        table = pa.concat_tables(self.held) if len(self.held) > 1 else self.held[0]
        self.held = [table.slice(k)] if table.num_rows > k else []
        return table.slice(0, k)
