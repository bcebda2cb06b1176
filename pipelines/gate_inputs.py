"""A split's gate inputs streamed from its gate shards in batches, as stored (uint8 for images).

Sweep trials read their inputs through this on whichever node they run: row group by row group
from the Parquet files at the root (memory-mapped when local), never the whole split at once.
Batches stay in the stored dtype until the trial moves them to its device and converts them
there (task.gate_tensor), so a trial's memory does not grow with the split.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from storage import AnyPath, StoragePath, refuse_pickled


class GateInputs:
    """The `column` of a list of Parquet files (in order) as one indexable stream of rows."""

    def __init__(self, files: list[AnyPath], column: str = "gate"):
        import pyarrow.parquet as pq
        import ray.data  # noqa: F401  registers Ray's Arrow tensor types before any schema is read

        self.files, self.column = list(files), column
        self._handles: dict[int, pq.ParquetFile] = {}
        self.groups: list[tuple[int, int, int, int]] = []  # (file, row group, first row, rows)
        start, size = 0, 0
        for f in range(len(self.files)):
            refuse_pickled(self._file(f).schema_arrow, self.files[f])  # before any row is converted
            meta = self._file(f).metadata  # the footer only
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                self.groups.append((f, g, start, rows))
                start += rows
                size += meta.row_group(g).total_byte_size
        self.rows = start
        self.row_bytes = size / max(start, 1)  # uncompressed bytes of a row in its file (all columns)

    def __len__(self) -> int:
        return self.rows

    def __getstate__(self):  # open files stay on the node that opened them
        return {"files": self.files, "column": self.column}

    def __setstate__(self, state):
        self.__init__(state["files"], state["column"])

    def _file(self, f: int):
        import pyarrow.parquet as pq

        if f not in self._handles:
            path = self.files[f]
            if isinstance(path, StoragePath):
                self._handles[f] = pq.ParquetFile(path.filesystem.open_input_file(path.key))
            else:
                self._handles[f] = pq.ParquetFile(str(path), memory_map=True)
        return self._handles[f]

    def read_group(self, index: int, column: str | None = None) -> np.ndarray:
        """One row group's values of the column, as a numpy array (rows first)."""
        f, g, _, _ = self.groups[index]
        values = self._file(f).read_row_group(g, columns=[column or self.column]).column(0)
        chunk = values.combine_chunks()
        return chunk.to_numpy(zero_copy_only=False) if hasattr(chunk, "to_numpy") else np.asarray(chunk)

    def take(self, indices) -> np.ndarray:
        """The rows at `indices` (in that order), reading only the row groups that hold them."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.rows):
            raise IndexError(f"rows {indices.min()}..{indices.max()} outside a stream of {self.rows}")
        starts = np.array([start for _, _, start, _ in self.groups], dtype=np.int64)
        owner = np.searchsorted(starts, indices, side="right") - 1  # the row group of each index
        out = None
        for group in np.unique(owner):
            values = self.read_group(int(group))
            where = np.flatnonzero(owner == group)
            if out is None:
                out = np.empty((len(indices), *values.shape[1:]), dtype=values.dtype)
            out[where] = values[indices[where] - starts[group]]
        return out if out is not None else np.zeros((0,), dtype=np.uint8)

    def sample_ids(self) -> np.ndarray:
        """(M,) the sample_id of every row, in stream order (to check a cache lines up)."""
        if not self.groups:
            return np.array([], dtype=object)
        return np.concatenate([self.read_group(i, "sample_id") for i in range(len(self.groups))])

    def batches(self, batch_size: int, gen=None, buffer_rows: int = 0,
                drop_last: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row indices (B,), inputs (B, ...)) in the stored dtype.

        gen None: rows in order, the last batch partial unless drop_last. With a torch.Generator:
        row groups in a random order through a shuffle buffer of at least buffer_rows rows (the
        whole split when it is smaller: a full permutation); with drop_last, every batch is full
        and floor(M / batch_size) batches come out, as from a permutation of the split.
        """
        if batch_size < 1:
            raise ValueError(f"batch size must be positive, not {batch_size}")
        if gen is None:
            yield from self._ordered(batch_size, drop_last)
        else:
            yield from self._shuffled(batch_size, gen, max(buffer_rows, batch_size), drop_last)

    def _ordered(self, batch_size: int, drop_last: bool):
        carry_idx, carry_x = [], []
        held = 0
        for i, (_, _, start, rows) in enumerate(self.groups):
            carry_idx.append(np.arange(start, start + rows))
            carry_x.append(self.read_group(i))
            held += rows
            if held >= batch_size:
                idx, x = np.concatenate(carry_idx), np.concatenate(carry_x)
                whole = (held // batch_size) * batch_size
                for s in range(0, whole, batch_size):
                    yield idx[s:s + batch_size], x[s:s + batch_size].copy()
                carry_idx, carry_x, held = [idx[whole:]], [x[whole:]], held - whole
        if held and not drop_last:
            yield np.concatenate(carry_idx), np.concatenate(carry_x).copy()

    def _shuffled(self, batch_size: int, gen, buffer_rows: int, drop_last: bool):
        import torch

        order = torch.randperm(len(self.groups), generator=gen).tolist()
        buffer_idx, buffer_x, held = [], [], 0

        def drain(final: bool):
            idx, x = np.concatenate(buffer_idx), np.concatenate(buffer_x)
            perm = torch.randperm(len(idx), generator=gen).numpy()
            whole = (len(idx) // batch_size) * batch_size
            batches = [perm[s:s + batch_size] for s in range(0, whole, batch_size)]
            rest = perm[whole:]
            if final and len(rest) and not drop_last:
                batches.append(rest)
                rest = perm[:0]
            return [(idx[b], x[b]) for b in batches], idx[rest], x[rest]

        for i in order:
            _, _, start, rows = self.groups[i]
            buffer_idx.append(np.arange(start, start + rows))
            buffer_x.append(self.read_group(i))
            held += rows
            if held >= buffer_rows:
                out, rest_idx, rest_x = drain(final=False)
                yield from out
                buffer_idx, buffer_x, held = [rest_idx], [rest_x], len(rest_idx)
        if held:
            out, _, _ = drain(final=True)
            yield from out
