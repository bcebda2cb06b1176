"""A stage's local Ray goes with the stage: after SIGKILL of a stage's driver no process of its
Ray session (GCS, raylet, agents, workers) is alive 10 s later, and a record left by a killed
watchdog is cleaned up by its PIDs, never touching a process that only reuses a recorded PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import ray_watchdog

pytestmark = pytest.mark.slow


def test_sigkill_of_a_stage_leaves_no_process_of_its_ray(tmp_path):
    root = tmp_path / "root"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "bmoe"), "prepare", "--task", "action", "--profile",
                             "smoke", "--root", str(root)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, processes = time.monotonic() + 120, {}
        while time.monotonic() < deadline and proc.poll() is None and len(processes) < 5:  # GCS, raylet, agents...
            records = list((root / "ray").glob("local-ray-*.json"))
            if records:
                try:
                    processes = json.loads(records[0].read_text())["processes"]
                except (OSError, ValueError):
                    pass
            time.sleep(0.5)
        assert len(processes) >= 5 and proc.poll() is None, (processes, proc.poll())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline, left = time.monotonic() + 10, [0]
        while left and time.monotonic() < deadline:  # within 10 s: polled, so a quick cleanup ends the wait
            time.sleep(0.5)
            left = [int(pid) for pid, start in processes.items()
                    if (s := ray_watchdog._stat(int(pid))) and s[1] == start]  # noqa: SLF001
        assert not left, left
        assert not list((root / "ray").glob("local-ray-*.json"))  # the record goes with them
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_stale_record_is_cleaned_by_pid_and_start_time(tmp_path):
    """The record of a dead driver: its live process is killed, and one whose PID is alive but
    started at another time (a reused PID) is left alone."""
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    reused = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        record = tmp_path / "local-ray-1.json"
        start = lambda p: ray_watchdog._stat(p.pid)[1]  # noqa: E731, SLF001
        record.write_text(json.dumps({"driver": {"pid": dead.pid, "start": 1},
                                      "processes": {str(ours.pid): start(ours), str(reused.pid): start(reused) + 1}}))
        assert ray_watchdog.clean_stale(record) == 1
        assert ours.wait(timeout=10) == -signal.SIGKILL and reused.poll() is None and not record.exists()
    finally:
        for p in (ours, reused):
            if p.poll() is None:
                p.kill()
                p.wait()
