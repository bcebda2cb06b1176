"""The local Ray a stage starts goes when the stage goes, however it ends.

Ray stops what it started when its driver exits normally; a driver killed by SIGKILL (or by an
out-of-memory killer) leaves its GCS, raylet, workers and agents behind, and the agents ignore
SIGTERM. So ensure_ray starts this watchdog beside a local Ray: a small process in its own
session that, once a second, notes every process of Ray's trees (those ray.init started, and
their descendants: raylet's agents and workers; pid and start time, so a reused pid is never
touched) and writes them under the run root; when the driver is gone, it kills the ones still
alive and exits. Nothing else the driver started is touched. A watchdog killed too leaves the record, which the next
start on that root reads and cleans up the same way (`clean_stale`).

    python -m pipelines.ray_watchdog DRIVER_PID RECORD_FILE RAY_PID...
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 1.0


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[19])


def children(pid: int) -> set[int]:
    """The live processes whose parent is `pid`."""
    return {int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and (i := _stat(int(e.name))) and i[0] == pid}


def tree(roots) -> dict[int, int]:
    """{pid: start time} of the live `roots` and all their descendants (one pass over /proc)."""
    kids: dict[int, list[int]] = {}
    starts = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := _stat(int(entry.name))):
            kids.setdefault(info[0], []).append(int(entry.name))
            starts[int(entry.name)] = info[1]
    found = {r: starts[r] for r in roots if r in starts}
    todo = list(found)
    while todo:
        for child in kids.get(todo.pop(), []):
            if child not in found:
                found[child] = starts[child]
                todo.append(child)
    return found


def kill_recorded(processes: dict[int, int]) -> int:
    """SIGKILL each recorded process that is still the one recorded (same start time); returns
    how many were killed."""
    killed = 0
    for pid, started in processes.items():
        info = _stat(int(pid))
        if info and info[1] == started:
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


def clean_stale(record: Path) -> int:
    """Kill what a dead driver's record lists (the watchdog itself was killed); returns the count."""
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return 0
    driver = data.get("driver", {})
    if _stat(int(driver.get("pid", 0)) or 0) and _stat(int(driver["pid"]))[1] == driver.get("start"):
        return 0  # its driver is alive: another stage on this root is running
    killed = kill_recorded({int(k): v for k, v in data.get("processes", {}).items()})
    record.unlink(missing_ok=True)
    return killed


def start(record: Path, roots: set[int]) -> subprocess.Popen:
    """The watchdog of this process's local Ray (`roots`: the processes ray.init started, whose
    trees are Ray's), recording under `record`."""
    record.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "pipelines.ray_watchdog", str(os.getpid()), str(record),
                             *map(str, sorted(roots))], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)


def watch(driver: int, record: Path, roots: set[int]) -> None:
    me = _stat(driver)
    if me is None:
        return
    processes: dict[int, int] = {}
    while (info := _stat(driver)) and info[1] == me[1]:
        now = tree(roots)
        if now.keys() - processes.keys():
            processes.update(now)
            tmp = record.with_suffix(".tmp")
            tmp.write_text(json.dumps({"driver": {"pid": driver, "start": me[1]},
                                       "processes": {str(k): v for k, v in processes.items()}}))
            tmp.replace(record)
        processes = {pid: s for pid, s in processes.items() if (i := _stat(pid)) and i[1] == s} | now
        time.sleep(POLL_S)
    kill_recorded(processes)
    record.unlink(missing_ok=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]), Path(sys.argv[2]), {int(a) for a in sys.argv[3:]})
