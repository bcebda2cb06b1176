"""Every socket a local `bmoe` stage listens on is on the loopback interface, as the README says.

`make test` runs this module outside the loopback-only network namespace it uses for the rest:
inside it 127.0.0.1 is the only address there is, so a bind to the machine's own address or to
every interface could not show.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import tempfile
import time

import pytest

from cluster import BIN, PROJECT, stop_processes

pytestmark = pytest.mark.slow


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # ::ffff:127.0.0.1 counts


def test_a_stage_listens_on_loopback_only():
    """`bmoe prepare` on the embedded data starts a local Ray (GCS, raylet, agents, workers) and
    Ray Data tasks; every listening socket of it and its descendants, sampled while it runs."""
    import psutil

    root = tempfile.mkdtemp(prefix="bmoe-binds-", dir="/tmp")  # short: Ray's socket paths
    proc = subprocess.Popen([str(BIN / "bmoe"), "prepare", "--task", "superres", "--profile", "smoke", "--root", root],
                            cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: set[tuple[str, str, int]] = set()
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            except psutil.Error:
                break
            for p in tree:
                try:
                    seen |= {(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                             if c.status == psutil.CONN_LISTEN}
                except psutil.Error:  # exited meanwhile
                    continue
            time.sleep(0.2)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_processes(root)
        shutil.rmtree(root, ignore_errors=True)
    assert len({name for name, _, _ in seen}) >= 3, seen  # gcs_server, raylet, the agents and workers
    exposed = sorted(entry for entry in seen if not _loopback(entry[1]))
    assert not exposed, f"listening beyond loopback: {exposed}"
