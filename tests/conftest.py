"""Shared fixtures: quiet telemetry, paths to the real sample files beside the project, an S3 server."""

from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

PROJECT = Path(__file__).resolve().parents[1]
SAMPLES = PROJECT.parent / "shared" / "samples"


def assert_same_rows(ours: list[dict], theirs: list[dict]) -> None:
    """Two loads of the same sources gave the same sample rows (ids, keys, values) and some."""
    import numpy as np

    assert [r["sample_id"] for r in ours] == [r["sample_id"] for r in theirs] and ours
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(np.asarray(a[key]), np.asarray(b[key])), key


def assert_same_listing(task, local, remote, split: str, requests, suffixes: tuple[str, ...]):
    """task.list_sources of one tree, on disk and in the bucket: the bucket is listed, never asked
    file by file, and gives the same problems and sources (paths under the bucket, sizes from the
    listing). Returns both listings, bucket first."""
    requests.seen.clear()
    theirs, ours = task.list_sources(local, split), task.list_sources(remote, split)
    assert any("list-type=2" in r[1] for r in requests.seen)  # the recorder sees the listings...
    assert not [r for r in requests.seen if r[1].split("?")[0].endswith(suffixes)]  # ...and no file asked alone
    assert [p.replace(str(remote), str(local)) for p in ours.problems] == theirs.problems
    for a, b in zip(ours.sources, theirs.sources, strict=True):
        assert a["path"].startswith("s3://") and a["path"].replace(str(remote), str(local)) == b["path"]
        assert {k: v for k, v in a.items() if k not in ("path", "stamp")} == \
               {k: v for k, v in b.items() if k not in ("path", "stamp")}
        assert a["stamp"][0] == b["stamp"][0] == Path(b["path"]).stat().st_size and a["stamp"][1] > 0
    return ours, theirs


@pytest.fixture(scope="session")
def samples() -> Path:
    """../shared/samples: real COCO, Set5 and UCF-101 files (read in place, never copied)."""
    if not SAMPLES.is_dir():
        pytest.skip(f"real sample files not found at {SAMPLES}")
    return SAMPLES


@pytest.fixture
def one_thread():
    """Tiny networks train far faster on one thread than fighting for two busy cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray for the whole test session (ray.init costs 5-8 s here)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray
    ray.shutdown()


# -- an S3 server on 127.0.0.1 (moto), for data roots and run roots in an object store -------------


class S3Requests(logging.Handler):
    """The requests the moto server answered, as (method, path with query), oldest first."""

    LINE = re.compile(r'"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/')
    STYLE = re.compile(r"\x1b\[[0-9;]*m")  # werkzeug colours some request lines

    def __init__(self):
        super().__init__(logging.INFO)
        self.seen: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = self.LINE.search(self.STYLE.sub("", record.getMessage()))
        if match:
            self.seen.append((match[1], match[2]))


@pytest.fixture(scope="session")
def _moto_server():
    """One moto S3 server for the session, on 127.0.0.1 and a port the OS picked; its request
    log goes to an S3Requests recorder (werkzeug's own console handler stays off)."""
    from moto.server import ThreadedMotoServer

    recorder = S3Requests()
    log = logging.getLogger("werkzeug")
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(recorder)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}", recorder
    server.stop()
    log.removeHandler(recorder)
    log.setLevel(level)


@pytest.fixture
def s3_bucket(_moto_server, monkeypatch):
    """A new, empty bucket in the moto server, as the StoragePath s3://<bucket>; the AWS settings
    that reach it are set for the test only. Each test gets its own bucket name, so storage's
    per-bucket filesystem cache (storage.paths._FILESYSTEMS) never holds a client of another
    server; the test's entry is dropped after it."""
    import boto3

    from storage import as_path, paths

    endpoint, _ = _moto_server
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    name = f"bmoe-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    yield as_path(f"s3://{name}")
    paths._FILESYSTEMS.pop(f"s3://{name}", None)


@pytest.fixture
def s3_requests(_moto_server) -> S3Requests:
    """The moto server's request log, emptied for this test (use with s3_bucket)."""
    _, recorder = _moto_server
    recorder.seen.clear()
    return recorder
