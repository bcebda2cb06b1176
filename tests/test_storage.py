"""Object-store run roots: a file:// URI stands in for s3:// or gs:// (same pyarrow code path)."""

from __future__ import annotations

import os

import pytest

from pipelines.runtime import RunConfig, UserError
from pipelines.storage import SYNC_STATE, RemoteRoot, synced, working_copy


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("BMOE_WORKDIR", str(tmp_path / "machine-a"))
    return tmp_path / "bucket" / "runs"


def _files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_stage_pushes_its_outputs_and_another_machine_pulls_them(store, tmp_path, monkeypatch):
    cfg = RunConfig(root=store.as_uri(), profile="smoke")
    assert cfg.root_path == working_copy(store.as_uri()) and str(tmp_path / "machine-a") in str(cfg.root_path)
    with synced(cfg):  # a stage writing shards, a report, and the embedded raw data
        (cfg.task_dir("data") / "train" / "p0").mkdir(parents=True)
        (cfg.task_dir("data") / "train" / "p0" / "part-0.parquet").write_bytes(b"shard" * 1000)
        (cfg.task_dir("reports")).mkdir(parents=True)
        (cfg.task_dir("reports") / "summary.json").write_text("{}")
        (cfg.root_path / "raw" / "superres").mkdir(parents=True)
        (cfg.root_path / "raw" / "superres" / "a.png").write_bytes(b"png")
    stored = _files(store)
    assert stored == {"data/superres/train/p0/part-0.parquet": b"shard" * 1000,
                      "reports/superres/summary.json": b"{}"}  # raw data is regenerated, not stored

    monkeypatch.setenv("BMOE_WORKDIR", str(tmp_path / "machine-b"))
    other = RunConfig(root=store.as_uri(), profile="smoke")
    assert other.root_path != cfg.root_path
    with synced(other):
        assert {k: v for k, v in _files(other.root_path).items() if k != SYNC_STATE} == stored


def test_unchanged_files_are_not_transferred_and_deletions_propagate(store):
    cfg = RunConfig(root=store.as_uri(), profile="smoke")
    remote = RemoteRoot(cfg.root, cfg.root_path)
    (cfg.root_path / "cache").mkdir(parents=True)
    for name in ("old.parquet", "kept.parquet"):
        (cfg.root_path / "cache" / name).write_bytes(name.encode())
    assert remote.push() == 2
    assert remote.push() == 0 and remote.pull() == 0  # nothing changed on either side

    (cfg.root_path / "cache" / "old.parquet").unlink()  # prepare replaced its shards
    (cfg.root_path / "cache" / "new.parquet").write_bytes(b"new")
    assert remote.push() == 2
    assert sorted(_files(store)) == ["cache/kept.parquet", "cache/new.parquet"]

    # a change made in the store by another machine comes back on the next pull
    (store / "cache" / "kept.parquet").write_bytes(b"changed elsewhere")
    os.utime(store / "cache" / "kept.parquet", ns=(1, 10**18))
    assert RemoteRoot(cfg.root, cfg.root_path).pull() == 1
    assert (cfg.root_path / "cache" / "kept.parquet").read_bytes() == b"changed elsewhere"


def test_a_bad_uri_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("BMOE_WORKDIR", str(tmp_path))
    cfg = RunConfig(root="nosuchscheme://bucket/runs", profile="smoke")
    with pytest.raises(UserError, match="--root nosuchscheme://bucket/runs"):
        with synced(cfg):
            pass
