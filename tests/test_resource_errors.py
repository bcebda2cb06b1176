"""A full disk under a stage is one line naming where and what to do: `bmoe prepare` on a root in
a 3.5 MB tmpfs (mounted in a private mount namespace, so nothing outside this test sees it) runs
out of space while Ray Data's workers write the shards."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _can_mount(folder: Path) -> bool:
    if not shutil.which("unshare") or not shutil.which("mount"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {folder}"],
                           capture_output=True)
    return probe.returncode == 0


def test_a_full_disk_is_one_line(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _can_mount(disk):
        pytest.skip("no private mount namespace here (unshare -m and mount need CAP_SYS_ADMIN)")
    bmoe = Path(sys.executable).parent / "bmoe"
    stage = f"{bmoe} prepare --task action --profile smoke --root {disk}/r"
    script = (f"mount -t tmpfs -o size=3500k tmpfs {disk} && {{ {stage} > /dev/null 2> {tmp_path}/full.err; "
              f"echo $? > {tmp_path}/full.rc; }}")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, timeout=600, check=True)
    errors = [line for line in (tmp_path / "full.err").read_text().splitlines() if line.startswith("error:")]
    assert (tmp_path / "full.rc").read_text().strip() == "1"
    assert len(errors) == 1 and "no space left on the device holding" in errors[0] and str(disk) in errors[0], errors
    assert "rerun the same command" in errors[0]
