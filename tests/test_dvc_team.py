"""DVC for a team: data and models through a DVC remote, and experiments queued and run in parallel."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from repo import DVC, commit, copy_reproduced, run_tool, tool_env

CELL = "models/efficientnet_lite0-frozen"


@pytest.mark.slow
def test_push_then_pull_on_a_fresh_clone(reproduced_repo, tmp_path):
    """`dvc push` to a remote, then a fresh clone's `dvc pull` brings back raw data, crops and
    models, and the clone's pipeline is up to date (the session's reproduced repository, copied)."""
    root = copy_reproduced(reproduced_repo, tmp_path / "repo")
    env = tool_env(root)
    remote = tmp_path / "remote"
    run_tool([DVC, "remote", "add", "-d", "storage", str(remote)], root, env)
    commit(root, "DVC remote")
    # As the README says (`dvc push dvc.yaml data.dvc`): this copy's `dvc add` named its data file data/raw.dvc.
    run_tool([DVC, "push", "dvc.yaml", "data/raw.dvc"], root, env)
    assert any(p.is_file() for p in (remote / "files" / "md5").rglob("*")), "dvc push stored nothing"

    clone = tmp_path / "clone"
    run_tool(["git", "clone", "-q", str(root), str(clone)], tmp_path)
    assert not (clone / "data/raw").exists()
    run_tool([DVC, "pull", "dvc.yaml", "data/raw.dvc"], clone, env)
    status = run_tool([DVC, "status", "dvc.yaml"], clone, env)  # the study's pipeline; the quick profile's never ran
    assert "up to date" in status.stdout, status.stdout

    assert len(list((clone / "data/raw").glob("*/*.png"))) == 36
    assert len(list((clone / "data/cropped").glob("*/*.png"))) == 36
    assert (clone / "data/split/manifest.csv").read_bytes() == (root / "data/split/manifest.csv").read_bytes()
    run = json.loads((clone / CELL / "s0/run.json").read_text())
    assert run == json.loads((root / CELL / "s0/run.json").read_text())
    assert (clone / CELL / "s0/best.pt").read_bytes() == (root / CELL / "s0/best.pt").read_bytes()


def test_tracking_uri_follows_dvc_root(tmp_path, monkeypatch):
    """In a `dvc exp run --queue` copy the working folder is temporary; DVC_ROOT names the repository."""
    from transfer_study import config

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workspace = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc"
    workspace.mkdir(parents=True)
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    assert config.tracking_uri() == f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}"
    monkeypatch.delenv("DVC_ROOT")
    assert config.tracking_uri() == f"sqlite:///{workspace / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert config.tracking_uri() == "http://tracking.example:5000"


def _queue_status(root: Path, env: dict) -> str:
    return run_tool([DVC, "queue", "status"], root, env).stdout


@pytest.mark.slow
def test_queued_experiments_record_every_run_in_the_repository_store(reproduced_repo, tmp_path):
    """`dvc exp run --queue` + `dvc queue start -j 2`: each experiment runs in a temporary copy
    that is deleted afterwards, yet its runs, metrics and model files stay in the repository's
    MLflow store (config.tracking_uri follows DVC_ROOT)."""
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    root = copy_reproduced(reproduced_repo, tmp_path / "repo")
    env = tool_env(root)
    experiment = "transfer-study-queue"  # new: the queued runs create it, both at once
    for seed in (1, 2):
        run_tool([DVC, "exp", "run", "--queue", "-n", f"seed{seed}", "-S", f"train.seeds=[{seed}]",
              "-S", f"tracking.experiment={experiment}"], root, env)
    run_tool([DVC, "queue", "start", "-j", "2"], root, env)
    try:
        deadline = time.monotonic() + 900
        while ("Queued" in (status := _queue_status(root, env)) or "Running" in status) and time.monotonic() < deadline:
            time.sleep(5)
    finally:
        run_tool([DVC, "queue", "stop"], root, env, check=False)
    assert status.count("Success") == 2, status + run_tool([DVC, "queue", "logs", "seed1"], root, env, check=False).stdout
    exps = run_tool([DVC, "exp", "list", "--name-only"], root, env).stdout.split()
    assert sorted(exps) == ["seed1", "seed2"]

    store = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, "the queued runs did not record to the repository's mlflow.db"
    runs = {r.info.run_name: r for r in client.search_runs([found.experiment_id])}
    assert sorted(runs) == ["efficientnet_lite0-frozen-s1", "efficientnet_lite0-frozen-s2"]
    for name, run in runs.items():
        assert run.info.status == "FINISHED", name
        assert {"val_acc", "test_accuracy"} <= set(run.data.metrics), name  # train's and evaluate's
        # The files outlive the temporary copy: they are kept beside the repository's store.
        history = Path(download_artifacts(run_id=run.info.run_id, artifact_path="history.csv",
                                          tracking_uri=store,
                                          dst_path=str(root / "checkpoints" / name)))
        assert history.read_text().startswith("epoch"), name
        assert run.info.artifact_uri.startswith((root / "mlartifacts").as_uri()), run.info.artifact_uri
    assert not list((root / ".dvc" / "tmp" / "exps").glob("tmp*/mlflow.db")), "a run recorded to a temporary store"
