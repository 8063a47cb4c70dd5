"""conftest.py's CI rule: with CI=true a skipped test fails the run unless it is allow-listed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ALLOWED_SKIPS_IN_CI

DEMO = """
import pytest

def test_runs():
    pass

def test_skips():
    pytest.skip("the widget is not installed")

@pytest.mark.xfail(reason="a known bug, not a skip")
def test_expected_failure():
    assert False
"""


def _pytest(folder: Path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci else {})
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q",
                           "test_demo.py"], cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def test_a_skip_fails_the_run_in_ci_and_is_listed(tmp_path):
    (tmp_path / "test_demo.py").write_text(DEMO)
    ci = _pytest(tmp_path, "true")
    assert ci.returncode == 1, ci.stdout
    assert "unexpected skips (CI=true)" in ci.stdout
    assert "test_demo.py::test_skips: the widget is not installed" in ci.stdout
    assert "test_expected_failure" not in ci.stdout.split("unexpected skips")[1].split("short test summary")[0]

    local = _pytest(tmp_path, None)
    assert local.returncode == 0 and "unexpected skips" not in local.stdout, local.stdout


def test_every_allowed_skip_says_why():
    for nodeid, reason in ALLOWED_SKIPS_IN_CI.items():
        assert nodeid.startswith("tests/test_") and "::" in nodeid and len(reason) > 20, nodeid
