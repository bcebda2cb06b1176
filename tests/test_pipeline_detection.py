"""Detection's prepare on a broken COCO tree, through real Ray and real pycocotools. Every
stage of the detection pipeline runs in tests/test_cluster.py, from a COCO tree in an S3
bucket on a two-node cluster."""

from __future__ import annotations

import json
import shutil

import pytest

from pipelines.runtime import RunConfig, UserError
from tasks.detection import synthetic

pytestmark = pytest.mark.slow


def test_bad_coco_tree_is_named_counted_and_strict_fails(tmp_path, ray_session):
    from pipelines.prepare import prepare

    root = synthetic.write_coco_tree(tmp_path / "coco", {"train2017": 6, "val2017": 6}, seed=5)
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    missing, broken = data["images"][0]["file_name"], data["images"][1]["file_name"]
    (root / "val2017" / missing).unlink()
    (root / "val2017" / broken).write_bytes(b"\xff\xd8\xff\xe0 truncated")
    data["annotations"][-1]["bbox"][3] = 0.0
    path.write_text(json.dumps(data))

    cfg = RunConfig(task_name="detection", root=str(tmp_path / "run"), profile="smoke", data_root=str(root))
    manifest = prepare(cfg)
    problems = "\n".join(p for s in manifest["splits"].values() for p in s["problems"])
    assert missing in problems and broken in problems and "zero-area box" in problems
    assert sum(s["samples"] for s in manifest["splits"].values()) == 10  # the other images are used
    strict = RunConfig(task_name="detection", root=str(tmp_path / "strict"), profile="smoke", data_root=str(root),
                       strict=True)
    with pytest.raises(UserError, match=r"\.jpg"):
        prepare(strict)
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
