"""Real `dvc` runs of the pipeline in temporary copies of the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FMNIST_DIR, REPO_ROOT

BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
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
    for name in ("dvc.lock",):
        (dest / name).unlink(missing_ok=True)
    _run(["git", "init", "-q"], dest)
    _run(["git", "add", "-A"], dest)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], dest)
    return dest


def _env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{BIN}:{env['PATH']}"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def _tiny_params(root: Path) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["per_class"] = 6
    params["train"].update(architectures=["efficientnet_lite0"], conditions=["frozen"], epochs=1,
                           image_size={"resnet18": 32, "vgg19": 32, "inception_v3": 75, "efficientnet_lite0": 32})
    params["evaluate"]["bootstrap_samples"] = 200
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_then_is_clean(tmp_path):
    if not FMNIST_DIR.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    root = copy_repo(tmp_path / "repo")
    (root / "data.dvc").unlink()  # this test fetches a smaller dataset than the committed version
    _tiny_params(root)
    env = _env(root)
    _run([str(BIN / "transfer-study"), "data", "fetch"], root, env)
    _run([str(BIN / "dvc"), "repro"], root, env)

    assert len(list((root / "data/cropped").glob("*/*.png"))) == 36
    assert (root / "data/split/manifest.csv").is_file()
    run = json.loads((root / "models/efficientnet_lite0-frozen/s0/run.json").read_text())
    assert run["architecture"] == "efficientnet_lite0"
    assert (root / "evaluation/metrics.json").is_file() and (root / "reports/table1.md").is_file()
    champion = json.loads((root / "registry/champion.json").read_text())
    assert champion["run_id"] == run["run_id"]
    assert (root / "mlflow.db").is_file(), "runs were not recorded in the project's SQLite store"
    status = _run([str(BIN / "dvc"), "status"], root, env)
    assert "up to date" in status.stdout, status.stdout

    metrics = _run([str(BIN / "dvc"), "metrics", "show"], root, env)
    assert "validation.json" in metrics.stdout and "metrics.json" in metrics.stdout

    # The train stages depend only on what training runs: editing the HTTP client retrains nothing.
    client = root / "src/transfer_study/client.py"
    client.write_text(client.read_text() + "\n# an edit to the prediction client\n")
    status = _run([str(BIN / "dvc"), "status", "train"], root, env)
    assert "up to date" in status.stdout, status.stdout

    # A split param changes: only split and what depends on it run again.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["split"]["seed"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = _run([str(BIN / "dvc"), "repro"], root, env)
    log = rerun.stdout + rerun.stderr
    assert "Running stage 'split'" in log
    assert "Running stage 'preprocess'" not in log and "Running stage 'validate'" not in log
    assert "Running stage 'train@efficientnet_lite0-frozen'" in log


@pytest.mark.slow
def test_fetch_matches_the_committed_data_dvc(tmp_path):
    """Fetching on a fresh clone reproduces data.dvc's hash: `dvc status` is clean, twice."""
    if not FMNIST_DIR.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    root = copy_repo(tmp_path / "repo")
    env = _env(root)
    committed = (root / "data.dvc").read_bytes()
    for attempt in range(2):
        shutil.rmtree(root / "data" / "raw", ignore_errors=True)
        shutil.rmtree(root / ".dvc" / "cache", ignore_errors=True)
        _run([str(BIN / "transfer-study"), "data", "fetch"], root, env)
        # As `make data` does: cache the fetched folder; data.dvc must not change.
        _run([str(BIN / "dvc"), "commit", "--force", "--quiet", "data.dvc"], root, env)
        assert (root / "data.dvc").read_bytes() == committed, f"fetch {attempt + 1} changed the dataset's hash"
        status = _run([str(BIN / "dvc"), "status", "data.dvc"], root, env)
        assert "up to date" in status.stdout, f"fetch {attempt + 1}: {status.stdout}"


@pytest.mark.slow
def test_mlflow_run_main_runs_the_pipeline_and_records_it_in_the_store(tmp_path):
    """`mlflow run . -e main --env-manager local`: MLproject's main runs every stage (tiny params);
    the cell's run lands in the study's experiment, apart from `mlflow run`'s own run."""
    from mlflow.tracking import MlflowClient

    if not FMNIST_DIR.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    root = copy_repo(tmp_path / "repo")
    _tiny_params(root)
    uri = f"sqlite:///{tmp_path / 'projects.db'}"
    _run([str(BIN / "mlflow"), "run", ".", "-e", "main", "--env-manager", "local"], root,
         _env(root) | {"MLFLOW_TRACKING_URI": uri})
    summary = json.loads((root / "data/validation.json").read_text())
    assert summary["total_images"] == 36 and summary["passed"] is True

    client = MlflowClient(uri)
    (project_run,) = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert project_run.data.tags["mlflow.project.entryPoint"] == "main" and project_run.info.status == "FINISHED"
    (cell_run,) = client.search_runs([client.get_experiment_by_name("transfer-study").experiment_id])
    assert cell_run.info.run_name == "efficientnet_lite0-frozen-s0" and cell_run.info.status == "FINISHED"
    assert cell_run.info.run_id != project_run.info.run_id
    assert {"val_acc", "best_val_acc", "test_accuracy"} <= set(cell_run.data.metrics)  # train and evaluate
    run_info = json.loads((root / "models/efficientnet_lite0-frozen/s0/run.json").read_text())
    assert run_info["run_id"] == cell_run.info.run_id
    assert run_info["experiment_id"] == cell_run.info.experiment_id
    champion = client.get_model_version_by_alias("clothing-classifier", "champion")
    assert champion.run_id == cell_run.info.run_id
