"""The console script as a user runs it: help, the demo, and one-line errors for bad flags."""

from __future__ import annotations

import subprocess
import sys

import pytest


def bmoe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_stages():
    out = bmoe("--help")
    assert out.returncode == 0
    assert "demo" in out.stdout


def test_bad_profile_is_one_clear_line():
    out = bmoe("demo", "--profile", "huge")
    assert out.returncode == 2
    assert "profile 'huge' is not one of smoke, demo, paper" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("method", ["experts", "random", "oracle"])
def test_core_demo_orders_methods(method):
    from pipelines.core_demo import core_demo

    rho = core_demo()
    assert rho["oracle"] >= rho[method]
    assert abs(rho["random"] - rho["experts"]) < 0.01  # random selection follows the LP mix line
