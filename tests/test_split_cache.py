"""The node-local split cache (pipelines/split_cache.py) against a real S3 server (moto): a file is
fetched once per node, checked against its record, never served stale, and shared by trials
running at the same time."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from pipelines.integrity import digest
from pipelines.split_cache import DamagedDownload, node_local, node_local_files
from storage import write_bytes


def _gets(requests, key: str) -> int:
    return sum(1 for method, path in requests.seen if method == "GET" and path.split("?")[0].endswith(key))


@pytest.fixture
def stored(s3_bucket):
    """A 3 MB file in the bucket, with the record a manifest would hold for it."""
    path = s3_bucket / "data" / "superres" / "val" / "gate" / "part-0.parquet"
    write_bytes(path, os.urandom(3 << 20))
    return path, digest(path)


def test_a_file_is_fetched_once_then_read_from_the_node(stored, s3_requests, tmp_path):
    path, record = stored
    first = node_local(path, record, tmp_path)  # miss: fetched
    fetched = _gets(s3_requests, "part-0.parquet")
    second = node_local(path, record, tmp_path)  # hit: the server sees nothing more
    assert first == second and first.parent == tmp_path
    assert fetched >= 1 and _gets(s3_requests, "part-0.parquet") == fetched
    assert first.read_bytes() == path.read_bytes()
    assert digest(first) == record


def test_a_new_manifest_is_never_served_a_stale_copy(stored, s3_requests, tmp_path):
    path, record = stored
    old = node_local(path, record, tmp_path)
    write_bytes(path, os.urandom(3 << 20))  # prepare made the file again: other bytes, a new record
    new = node_local(path, digest(path), tmp_path)
    assert new != old and new.read_bytes() == path.read_bytes()


def test_a_damaged_download_is_refused_and_not_kept(stored, tmp_path):
    path, record = stored
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF  # one flipped byte in the object store
    write_bytes(path, bytes(data))
    with pytest.raises(DamagedDownload, match="damaged"):
        node_local(path, record, tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".lock"]  # nothing cached, no partial file


def test_local_files_and_unrecorded_files_are_read_in_place(stored, tmp_path):
    path, _ = stored
    local = tmp_path / "shard.parquet"
    local.write_bytes(b"x")
    assert node_local_files([local, path], [digest(local), None], tmp_path / "cache") == [local, path]
    assert not (tmp_path / "cache").exists()


def test_the_least_recently_used_entry_goes_over_the_bound(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("BMOE_SPLIT_CACHE_GB", str(5 / 1024))  # 5 MB: two 3 MB files do not fit
    a, b = s3_bucket / "a.parquet", s3_bucket / "b.parquet"
    for path in (a, b):
        write_bytes(path, os.urandom(3 << 20))
    first = node_local(a, digest(a), tmp_path)
    second = node_local(b, digest(b), tmp_path)
    assert second.exists() and not first.exists()


def _fetch_in_process(path, record, folder, queue):
    queue.put(str(node_local(path, record, folder)))


def test_trials_on_one_node_share_one_fetch(stored, s3_requests, tmp_path):
    """Two processes (two trials) ask at once: the server sends the file's bytes once."""
    path, record = stored
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_fetch_in_process, args=(path, record, tmp_path, queue)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert all(proc.exitcode == 0 for proc in procs)
    copies = {queue.get(timeout=5) for _ in procs}
    assert len(copies) == 1
    both = _gets(s3_requests, "part-0.parquet")
    s3_requests.seen.clear()
    node_local(path, record, tmp_path / "other-node")  # what one fetch of the file costs at the server
    assert both == _gets(s3_requests, "part-0.parquet") >= 1
