"""The console script as a user runs it: help, and one-line errors for bad flags and paths."""

from __future__ import annotations

import subprocess
import sys

import pytest


def bmoe(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
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
        (("cache", "--root", "s3://"), "no bucket in the URI"),
        (("sweep", "--root", "s3://bucket/runs"), "pass --tracking-uri of an MLflow server (infra/mlflow/serve.sh"),
        (("demo", "--root", "gs://bucket/runs", "--profile", "smoke"), "is in object storage"),
        (("sweep", "--gpus-per-trial", "-1", "--root", "{tmp}"), "--gpus-per-trial and --max-concurrent-trials"),
        (("prepare", "--row-group-mb", "500", "--root", "{tmp}"), "shard sizes need 0 < row group (500.0 MB)"),
        (("sweep", "--name", "../../evil", "--root", "{tmp}"), "--name: name '../../evil' cannot be a file name"),
        (("serve", "--port", "70000", "--root", "{tmp}"), "should be less than or equal to 65535"),
        (("serve", "--host", "0.0.0.0", "--root", "{tmp}"), "warning: --host 0.0.0.0 exposes the server beyond"),
        (("serve", "--bias", "0.5,x", "--root", "{tmp}"), "bias='0.5,x': expected comma-separated floats"),
        (("prepare", "-o", "epochs=-3", "--root", "{tmp}"), "superres option epochs='-3': must be positive"),
        (("prepare", "--task", "detection", "-o", "train_images=-1", "--root", "{tmp}"), "must be zero or more"),
        (("prepare", "--task", "action", "-o", "gate_share=1", "--root", "{tmp}"), "gate_share='1': must be below 1"),
        (("sweep", "--search", "bayes", "--root", "{tmp}"), "--search 'bayes': choose from grid, random, optuna"),
        (("sweep", "--num-samples", "3", "--root", "{tmp}"), "--num-samples needs --search random or optuna"),
        (("sweep", "--scheduler", "pbt", "--root", "{tmp}"), "--scheduler 'pbt': choose from none, asha"),
        (("serve", "--gate", "{tmp}/photo.png", "--root", "{tmp}"), "is not a gate file saved by `bmoe sweep`"),
        (("serve", "--gate", "models:/bmoe-superres-gate@best-d4096", "--root", "{tmp}"),
         "cannot download a gate from models:/bmoe-superres-gate@best-d4096"),
    ],
)
def test_user_errors_are_one_line(tmp_path, args, message):
    """In process (typer's runner: a subprocess per case would cost ~7 s of imports each);
    test_help_lists_every_stage runs the real console entry point."""
    from typer.testing import CliRunner

    from cli.main import app

    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))  # for --gate: not a gate file
    out = CliRunner().invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert out.exit_code in (1, 2), out.output
    assert message in " ".join(out.output.replace("│", " ").split())
    assert out.exception is None or isinstance(out.exception, SystemExit), out.exception


def test_task_options_select_fsrcnn_experts():
    from pipelines.runtime import RunConfig

    task = RunConfig(task_name="superres", profile="smoke", task_options={"model": "fsrcnn", "epochs": "3"}).task()
    assert task.expert_names() == ["fsrcnn_x4", "fsrcnn_x3", "fsrcnn_x2"]
    assert task.expert_training(0).epochs == 3
    assert type(task.build_expert(2)).__name__ == "FSRCNN"
