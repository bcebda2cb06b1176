"""The data plane at scale, in small: prepare's rolling shard writer and the sweep trials'
streaming reader of gate inputs (order, last partial batch, stored dtype kept, bounded buffer)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.expert_rows import expert_dataset
from pipelines.gate_inputs import GateInputs
from pipelines.layout import RunLayout
from pipelines.shard_writer import MB, ShardColumns, ShardSizes, ShardWriter, merge_written, rows_to_block
from storage import StoragePath


def _rows(source: str, count: int, start: int = 0) -> list[dict]:
    return [{"sample_id": f"{source}/{i:04d}", "group": source, "source_id": source,
             "gate": np.full((8, 8, 3), (start + i) % 251, np.uint8), "hr": np.full((8, 8, 3), i % 7, np.uint8),
             "x0": np.zeros((2, 2, 3), np.uint8), "enc0": 10 + i, "x1": np.zeros((4, 4, 3), np.uint8), "enc1": 20,
             "row": i, "col": 0}
            for i in range(count)]


COLUMNS = ShardColumns(data_costs=(12.0, 48.0), target_columns=("hr", "row", "col"), meta_columns=("row", "col"))


def _write(folder, sizes: ShardSizes, blocks: list[list[dict]], prefix: str = "w", columns=COLUMNS) -> dict:
    folders = {part: folder / part for part in columns.parts()}
    writer = ShardWriter(folders, columns, sizes, prefix=prefix)
    for rows in blocks:
        writer.add(rows_to_block(rows))
    return writer.close()


def test_shard_writer_rolls_files_at_the_target_size_and_records_rows_and_checksums(tmp_path):
    import hashlib

    sizes = ShardSizes(file_mb=40_000 / MB, row_group_mb=10_000 / MB)  # tiny targets: several files and groups
    result = _write(tmp_path, sizes, [_rows("a", 150), _rows("b", 90, start=150)])
    written = merge_written([result])
    assert written["source_rows"] == {"a": 150, "b": 90}
    assert written["encoded_bytes"] == {"p0": sum(10 + i for i in range(150)) + sum(10 + i for i in range(90)),
                                        "p1": 20 * 240}
    gate_files = written["files"]["gate"]
    assert len(gate_files) > 1  # rolled over, not one file per block or one huge file
    for part, files in written["files"].items():
        assert sum(f["rows"] for f in files) == 240
        for f in files:
            path = tmp_path / part / f["name"]
            data = path.read_bytes()
            assert f["bytes"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
            meta = pq.read_metadata(path)
            assert meta.num_rows == f["rows"] and meta.num_row_groups >= 1
    assert not list(tmp_path.rglob(".*partial"))  # every file was renamed into place
    p1 = pq.read_table(tmp_path / "p1").to_pandas()
    assert set(p1.columns) == {"sample_id", "group", "x", "encoded_bytes", "data_cost_bytes"}
    assert (p1["data_cost_bytes"] == 48.0).all()
    gate = pq.read_table(tmp_path / "gate").to_pandas()  # the targets, once for every expert
    assert set(gate.columns) == {"sample_id", "group", "gate", "hr", "row", "col"}
    assert list(gate["sample_id"]) == list(p1["sample_id"])
    gate = GateInputs(sorted((tmp_path / "gate").glob("*.parquet")))
    assert list(gate.sample_ids()) == [r["sample_id"] for r in _rows("a", 150) + _rows("b", 90)]


def _manifest(folder, written: dict, columns: ShardColumns) -> tuple[RunLayout, dict]:
    """A layout whose train split's shard sets are `folder`/<part>, and its manifest."""
    layout = RunLayout.of(folder.parent.parent.parent, "t")
    return layout, {"targets": columns.targets(), "splits": {"train": {"shards": {
        part: {"files": files} for part, files in written["files"].items()}}}}


@pytest.mark.parametrize("store", ["local", "s3"])
def test_an_expert_reads_its_inputs_beside_the_targets_stored_once(tmp_path, request, store, ray_session):
    from pipelines.expert_rows import read_unit, read_units

    """p0's rows are small and the gate rows, which hold the targets, large: the sets close files
    and row groups at other rows, and each row still meets its own target, in order, over
    several writers. "hr" is the gate input here (gate_target), stored once."""
    folder = (tmp_path if store == "local" else request.getfixturevalue("s3_bucket")) / "data" / "t" / "train"
    sizes = ShardSizes(file_mb=9_000 / MB, row_group_mb=2_500 / MB)
    rows = [_rows("a", 70), _rows("b", 50, start=70)], [_rows("c", 40, start=120)]
    columns = ShardColumns(COLUMNS.data_costs, COLUMNS.target_columns, COLUMNS.meta_columns, gate_target="hr")
    written = merge_written([_write(folder, sizes, blocks, f"w{i}", columns) for i, blocks in enumerate(rows)])
    assert len(written["files"]["gate"]) > len(written["files"]["p0"])  # boundaries differ
    layout, manifest = _manifest(folder, written, columns)
    assert manifest["targets"]["hr"] == "gate"
    for columns in (None, ["x", "hr"]):
        if store == "local":  # through Ray Data; the S3 settings are this process's only: read here
            tables = ray_session.get(expert_dataset(layout, manifest, ["train"], 0, columns,
                                                    with_split=columns is None).to_arrow_refs())
        else:
            tables = [t for unit in read_units(layout, manifest, "train", 0)
                      for t in read_unit(unit, columns, with_split=columns is None)]
        table = pa.concat_tables(tables).to_pandas()
        expected = [r for blocks in rows for block in blocks for r in block]
        assert len(table) == len(expected)
        assert np.array_equal(np.stack(table["hr"].to_numpy())[:, 0, 0, 0], [r["gate"][0, 0, 0] for r in expected])
        if columns is None:
            assert list(table["sample_id"]) == [r["sample_id"] for r in expected]
            assert set(table["split"]) == {"train"} and (table["data_cost_bytes"] == 12.0).all()
        else:
            assert list(table.columns) == ["x", "hr"]


def test_an_earlier_layout_with_targets_in_every_set_asks_for_a_new_prepare(tmp_path):
    from pipelines.expert_rows import read_units
    from pipelines.runtime import UserError


    layout = RunLayout.of(tmp_path, "t")
    with pytest.raises(UserError, match="bmoe prepare"):
        read_units(layout, {"splits": {"train": {"shards": {"p0": {"files": []}, "gate": {"files": []}}}}},  # no "targets"
                   "train", 0)


def test_shard_writer_writes_to_an_object_store(s3_bucket):
    root = s3_bucket / "shards"
    result = _write(root, ShardSizes(), [_rows("a", 20)])
    (name,) = [f["name"] for f in result["files"]["gate"]]
    path = root / "gate" / name
    assert isinstance(path, StoragePath) and path.stat().st_size == result["files"]["gate"][0]["bytes"]
    assert len(GateInputs([path])) == 20


@pytest.fixture
def stream(tmp_path) -> GateInputs:
    """240 rows in 2 files, row groups of at most 25 rows; row i's gate value is i % 251."""
    sizes = ShardSizes(file_mb=30_000 / MB, row_group_mb=5_000 / MB)
    _write(tmp_path, sizes, [_rows("a", 130), _rows("b", 110, start=130)])
    files = sorted((tmp_path / "gate").glob("*.parquet"))
    assert len(files) >= 2
    return GateInputs(files)


def test_batches_in_order_end_with_a_partial_batch(stream):
    assert len(stream) == 240 and len(stream.groups) > 4
    batches = list(stream.batches(64))
    assert [len(i) for i, _ in batches] == [64, 64, 64, 48]
    idx = np.concatenate([i for i, _ in batches])
    assert (idx == np.arange(240)).all()
    for i, x in batches:
        assert x.dtype == np.uint8 and x.shape[1:] == (8, 8, 3)  # as stored, never float here
        assert (x[:, 0, 0, 0] == i % 251).all()
        assert x.flags.writeable  # torch.from_numpy takes it without a copy or a warning
    assert [len(i) for i, _ in stream.batches(64, drop_last=True)] == [64, 64, 64]


def test_shuffled_batches_cover_each_row_once_with_a_bounded_buffer(stream):
    gen = torch.Generator().manual_seed(0)
    batches = list(stream.batches(32, gen=gen, buffer_rows=50, drop_last=True))
    assert len(batches) == 240 // 32 and all(len(i) == 32 for i, _ in batches)
    idx = np.concatenate([i for i, _ in batches])
    assert len(set(idx.tolist())) == len(idx)  # no row twice
    assert not (idx[:32] == np.arange(32)).all()  # shuffled
    for i, x in batches:
        assert (x[:, 0, 0, 0] == i % 251).all()  # inputs stay with their row indices
    again = list(stream.batches(32, gen=torch.Generator().manual_seed(0), buffer_rows=50, drop_last=True))
    assert all((a[0] == b[0]).all() for a, b in zip(batches, again))  # the seed decides the order
    every = np.concatenate([i for i, _ in stream.batches(32, gen=gen, buffer_rows=1000)])
    assert sorted(every.tolist()) == list(range(240))  # without drop_last the remainder comes last


def test_take_reads_rows_in_the_order_asked(stream):
    rows = stream.take([200, 3, 131, 3])
    assert rows.dtype == np.uint8 and list(rows[:, 0, 0, 0]) == [200, 3, 131, 3]
    with pytest.raises(IndexError):
        stream.take([240])


def test_a_trial_moves_batches_to_its_device_in_the_stored_dtype(stream):
    from pipelines.gate_trial import to_device
    from tasks import get_task

    seen = []

    class Recording:
        def gate_tensor(self, x):
            seen.append(x.dtype)
            return get_task("superres", "smoke").gate_tensor(x)

    _, x = next(stream.batches(16))
    out = to_device(Recording(), x, torch.device("cpu"))
    assert seen == [torch.uint8] and out.dtype == torch.float32 and out.shape == (16, 3, 8, 8)


def test_a_fresh_process_reads_the_stored_dtype(stream):
    """Nothing imported before (as in `bmoe serve`): the tensor type is known before the schema is read."""
    import subprocess
    import sys

    files = [str(f) for f in stream.files]
    code = ("import sys; from pathlib import Path; from pipelines.gate_inputs import GateInputs; "
            "_, x = next(GateInputs([Path(f) for f in sys.argv[1:]]).batches(8)); print(x.dtype, x.shape)")
    out = subprocess.run([sys.executable, "-c", code, *files], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["uint8", "(8,", "8,", "8,", "3)"], out.stderr[-2000:]


class _RunsCode:
    """Pickles to a call of os.system: what a planted column would run when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_planted_pickled_column_is_refused_and_never_unpickled(tmp_path, stream):
    """Whoever can write to a shared root must not run code in sweep, cache or serve."""
    from ray.data._internal.object_extensions.arrow import ArrowPythonObjectArray

    from storage import UnsafeFile, read_table

    marker = tmp_path / "ran"
    column = ArrowPythonObjectArray.from_objects([_RunsCode(marker)] * 3)
    planted = tmp_path / "planted.parquet"
    pq.write_table(pa.table({"sample_id": ["a", "b", "c"], "gate": column}), planted)
    with pytest.raises(UnsafeFile, match="column 'gate' holds pickled Python objects"):
        read_table(planted)  # how the cache, sweep trials and reports read tables
    with pytest.raises(UnsafeFile):
        GateInputs([*stream.files, planted])  # how trials and serving read gate inputs
    assert not marker.exists()
    assert len(read_table(stream.files[0])) > 0  # the pipeline's own files read as before
