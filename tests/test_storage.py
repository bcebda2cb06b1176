"""storage.as_path and the run-root layout, on local folders and on a real S3 server (moto)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipelines.layout import RunLayout
from storage import (StoragePath, as_path, is_uri, load_torch, local_copy, read_json, read_table, remove_tree,
                     save_torch, upload_tree, write_json, write_table)


def test_as_path_tells_local_paths_from_object_store_uris(tmp_path):
    assert as_path(str(tmp_path)) == tmp_path and isinstance(as_path(tmp_path.as_uri()), Path)
    assert as_path(tmp_path.as_uri()) == tmp_path  # file:// is this machine's disk
    assert isinstance(as_path("s3://bucket/runs"), StoragePath) and is_uri("gs://b/x") and not is_uri("file:///x")
    for bad, said in (("s3://", "no bucket"), ("s3://bucket/../etc", "not allowed"), ("s3://b/a/./c", "not allowed")):
        with pytest.raises(ValueError, match=said):
            as_path(bad)
    with pytest.raises(ValueError, match="Unrecognized filesystem type"):
        as_path("nosuchscheme://bucket/x").exists()  # resolved on first use, in one line


@pytest.mark.parametrize("where", ["local", "s3"])
def test_files_round_trip_through_either_kind_of_path(where, tmp_path, request):
    root = tmp_path / "root" if where == "local" else request.getfixturevalue("s3_bucket") / "root"
    assert read_json(root / "missing.json", "default") == "default" and not root.exists()
    write_json(root / "a" / "b.json", {"x": 1})
    assert read_json(root / "a" / "b.json") == {"x": 1} and root.is_dir() and (root / "a" / "b.json").is_file()
    frame = pd.DataFrame({"sample_id": ["s0", "s1"], "loss_0": [0.5, 0.25]})
    write_table(frame, root / "cache" / "test.parquet")
    assert read_table(root / "cache" / "test.parquet", ["loss_0"]).to_pandas()["loss_0"].tolist() == [0.5, 0.25]
    save_torch({"w": torch.arange(3)}, root / "model.pt")
    assert load_torch(root / "model.pt")["w"].tolist() == [0, 1, 2]
    with local_copy(root / "a" / "b.json") as local:  # for decoders that only open file names
        assert isinstance(local, Path) and local.read_text().startswith("{")
    assert not local.exists() or where == "local"  # a remote file's copy is gone after
    names = sorted(p.name for p in root.iterdir())
    assert names == ["a", "cache", "model.pt"] and [p.name for p in root.glob("*.pt")] == ["model.pt"]
    remove_tree(root / "a")
    assert not (root / "a" / "b.json").exists() and (root / "model.pt").exists()


def test_a_storage_path_pickles_as_its_uri_and_lists_in_one_request(s3_bucket, tmp_path):
    for i in range(3):
        (tmp_path / "tree" / "sub").mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / "sub" / f"f{i}.bin").write_bytes(bytes([i]) * (i + 1))
    assert upload_tree(tmp_path / "tree", s3_bucket / "tree") == 3
    again = pickle.loads(pickle.dumps(s3_bucket / "tree"))  # as Ray ships it to a worker
    assert again == s3_bucket / "tree" and again.uri.startswith("s3://bmoe-test-")
    files = list(again.files())
    assert [f.relative_to(again).as_posix() for f in files] == ["sub/f0.bin", "sub/f1.bin", "sub/f2.bin"]
    assert [f.stat().st_size for f in files] == [1, 2, 3]  # sizes from the listing itself
    with pytest.raises(FileNotFoundError):
        (again / "nope").read_bytes()


def test_the_layout_names_every_path_and_keeps_recorded_paths_relative(tmp_path):
    local, remote = RunLayout.of(tmp_path, "superres"), RunLayout.of("s3://bucket/runs", "superres")
    assert local.shards("train", "p0") == tmp_path / "data" / "superres" / "train" / "p0"
    assert str(remote.weights(2)) == "s3://bucket/runs/experts/superres/2/model.pt"
    assert remote.tune_storage() == "s3://bucket/runs/tune/superres" and remote.is_remote and not local.is_remote
    gate = remote.gate_bundle("sweep-1", "abc_00001")
    assert remote.relative(gate) == "sweeps/superres/sweep-1/gates/abc_00001.pt"
    assert remote.resolve(remote.relative(gate)) == gate
    # an absolute path recorded by an older run, moved since, is found under this root
    assert local.resolve("/old/place/sweeps/superres/sweep-1/gates/x.pt") == local.sweeps() / "sweep-1/gates/x.pt"
    with pytest.raises(ValueError, match="not a plain path"):
        local.resolve("sweeps/../../etc/passwd")
