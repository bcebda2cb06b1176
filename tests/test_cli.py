"""The console script as a user runs it: help, and one-line errors for bad flags and paths."""

from __future__ import annotations

import subprocess
import sys

import pytest


def bmoe(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_help_lists_every_stage():
    out = bmoe("--help")
    assert out.returncode == 0
    for stage in ("prepare", "train-experts", "cache", "sweep", "report", "demo", "compare"):
        assert stage in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("demo", "--profile", "huge"), "profile 'huge' is not one of smoke, demo, paper"),
        (("prepare", "--task", "nope"), "unknown task 'nope'; available:"),
        (("sweep", "--methods", "enforce,magic", "--root", "{tmp}"), "unknown method(s) magic"),
        (("prepare", "--data-root", "{tmp}/missing", "--root", "{tmp}"), "is not a folder"),
        (("cache", "--root", "{tmp}"), "run `bmoe prepare` first"),
        (("prepare", "-o", "modle=fsrcnn", "--root", "{tmp}"), "unknown superres option(s) modle"),
        (("prepare", "-o", "model=srgan", "--root", "{tmp}"), "unknown super-resolution model 'srgan'"),
        (("compare", "--root", "{tmp}"), "no sweeps of task superres in MLflow"),
        (("cache", "--root", "nosuchscheme://bucket/runs"), "--root nosuchscheme://bucket/runs:"),
    ],
)
def test_user_errors_are_one_line(tmp_path, args, message):
    out = bmoe(*(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert out.returncode in (1, 2)
    assert message in " ".join(out.stderr.replace("│", " ").split())
    assert "Traceback" not in out.stderr


def test_task_options_select_fsrcnn_experts():
    from pipelines.runtime import RunConfig

    task = RunConfig(task="superres", profile="smoke", task_options={"model": "fsrcnn", "epochs": "3"}).task_obj()
    assert task.expert_names() == ["fsrcnn_x4", "fsrcnn_x3", "fsrcnn_x2"]
    assert task.expert_training(0).epochs == 3
    assert type(task.build_expert(2)).__name__ == "FSRCNN"
