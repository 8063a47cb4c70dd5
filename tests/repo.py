"""Temporary copies of this repository for the end-to-end tests, and the one reproduced copy they share.

`reproduce` builds, once per test run (conftest's session fixture `reproduced_repo`), a copy whose
tiny dataset is versioned (data.dvc) and whose whole pipeline has run under `dvc repro` (committed):
what a team member pushes. Tests that change it work on their own `copy_reproduced` (seconds), so
the fetch and the reproduction, most of an end-to-end test's time, happen once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import FMNIST_DIR, REPO_ROOT

BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")


def run_tool(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command; with `check`, a failure fails the test with the end of its output."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def copy_repo(dest: Path) -> Path:
    """A fresh git+dvc repository holding the tracked files of this one (no data, no runs)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    for name in tracked.stdout.splitlines():
        source = REPO_ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    # No runs: neither pipeline's lock (the quick profile's names models only its own runs cached).
    for name in ("dvc.lock", "profiles/quick/dvc.lock"):
        (dest / name).unlink(missing_ok=True)
    run_tool(["git", "init", "-q"], dest)
    commit(dest, "copy")
    return dest


def tool_env(root: Path) -> dict:
    """This environment for the project's tools: .venv's first on PATH, no tracking URI, no DVC analytics."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{BIN}:{env['PATH']}"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def use_tiny_params(root: Path, name: str = "params.yaml") -> None:
    """One run (Lite0 frozen, seed 0, one split at full size), 1 epoch at 32 px, 6 images a class."""
    params = yaml.safe_load((root / name).read_text())
    params["data"]["per_class"] = 6
    # small_cnn-frozen is in train.exclude (params.yaml's and params.quick.yaml's): its matrix stage
    # must still leave its out.
    params["train"].update(architectures=["efficientnet_lite0", "small_cnn"], conditions=["frozen"], epochs=1,
                           exclude=["small_cnn-frozen"], seeds=[0], early_stopping=None,
                           image_size={"resnet18": 32, "vgg19": 32, "inception_v3": 75, "efficientnet_lite0": 32,
                                       "small_cnn": 28})
    params["split"].update(repeats=1, train_fractions=[1.0])
    params["evaluate"]["bootstrap_samples"] = 200
    (root / name).write_text(yaml.safe_dump(params, sort_keys=False))


def commit(root: Path, message: str) -> None:
    run_tool(["git", "add", "-A"], root)
    run_tool(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], root)


@dataclass(frozen=True)
class Reproduced:
    root: Path
    repro_log: str  # what `dvc repro` printed


def reproduce(dest: Path) -> Reproduced:
    """A repository copy with the tiny dataset fetched and versioned (`dvc add`), then `dvc repro`, committed."""
    if not FMNIST_DIR.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    root = copy_repo(dest)
    (root / "data.dvc").unlink()  # a smaller dataset than the committed version
    use_tiny_params(root)
    env = tool_env(root)
    run_tool([str(BIN / "transfer-study"), "data", "fetch"], root, env)
    run_tool([DVC, "add", "-q", "data/raw"], root, env)
    repro = run_tool([DVC, "repro"], root, env)
    commit(root, "tiny dataset and its pipeline run")
    return Reproduced(root, repro.stdout + repro.stderr)


def copy_reproduced(reproduced: Reproduced, dest: Path) -> Path:
    """A copy of the reproduced repository (git, DVC cache, mlflow.db and all) to change freely.

    Its MLflow experiment keeps the original's artifact folder (an absolute path in mlflow.db), so
    runs logged in the copy put their files there; new experiments get the copy's own folder."""
    shutil.copytree(reproduced.root, dest, symlinks=True)
    return dest
