"""Tracking for a team: the shared server (scripts/tracking-server.sh) on PostgreSQL with basic
auth, and one SQLite store written by several processes at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import FMNIST_DIR, REPO_ROOT
from postgres import free_port, postgres  # noqa: F401  (postgres is a fixture)
from repo import copy_repo, run_tool, tool_env, use_tiny_params

BIN = Path(sys.executable).parent
SCRIPT = REPO_ROOT / "scripts" / "tracking-server.sh"


def _wait_for_health(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the tracking server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"the tracking server did not answer /health in {timeout:.0f}s:\n{log.read_text()[-4000:]}")


@contextmanager
def tracking_server(folder: Path, env: dict[str, str], *options: str) -> Iterator[str]:
    """scripts/tracking-server.sh on a free loopback port, with `env` added; yields its URL."""
    port = free_port()
    log = folder / "server.log"
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | env
    full_env["PATH"] = f"{BIN}:{full_env['PATH']}"
    with open(log, "w") as out:
        # A session of its own: stopping the server stops its workers too.
        proc = subprocess.Popen(["bash", str(SCRIPT), "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                 *options], cwd=folder, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_health(url, proc, log)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


ADMIN_PASSWORD = "admin-test-password"  # MLflow wants 12 characters or more


@pytest.fixture(scope="module")
def team_server(tmp_path_factory, postgres) -> Iterator[SimpleNamespace]:  # noqa: F811
    """The README's team server: scripts/tracking-server.sh with `--app-name basic-auth`, runs and
    users in PostgreSQL, artifacts served from a folder. Gives url, artifacts, postgres."""
    folder = tmp_path_factory.mktemp("server")
    (folder / "auth.ini").write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {postgres.uri('mlflow_auth')}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {
        "MLFLOW_BACKEND_STORE_URI": postgres.uri("mlflow"),
        "MLFLOW_ARTIFACTS_DESTINATION": str(folder / "artifacts"),
        "MLFLOW_AUTH_CONFIG_PATH": str(folder / "auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key",
    }
    with tracking_server(folder, env, "--app-name", "basic-auth") as url:
        yield SimpleNamespace(url=url, artifacts=folder / "artifacts", postgres=postgres)


def test_server_script_needs_a_backend_store(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_BACKEND_STORE_URI"}
    result = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "MLFLOW_BACKEND_STORE_URI" in result.stderr and "postgresql://" in result.stderr


@pytest.mark.slow
def test_pipeline_records_everything_on_the_team_server(tmp_path, team_server, monkeypatch):
    """The quick pipeline with MLFLOW_TRACKING_URI at the team server (and its credentials) sends
    its run, metrics, registered model and @champion there, and writes no local store."""
    import psycopg
    from mlflow.tracking import MlflowClient

    if not FMNIST_DIR.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    url = team_server.url
    root = copy_repo(tmp_path / "repo")
    (root / "data.dvc").unlink()  # a smaller dataset than the committed version
    use_tiny_params(root)
    credentials = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}
    env = tool_env(root) | {"MLFLOW_TRACKING_URI": url} | credentials
    run_tool([str(BIN / "transfer-study"), "data", "fetch"], root, env)
    run_tool([str(BIN / "transfer-study"), "pipeline"], root, env)

    for name, value in credentials.items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("transfer-study")
    assert experiment is not None, "the pipeline's experiment is not on the server"
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == ["efficientnet_lite0-frozen-s0"]
    run = runs[0]
    assert run.info.status == "FINISHED"
    local = json.loads((root / "models/efficientnet_lite0-frozen/s0/run.json").read_text())
    assert run.info.run_id == local["run_id"]
    # train's per-epoch metrics and evaluate's test metrics with their CIs
    for metric in ("val_acc", "train_loss", "best_val_acc", "test_accuracy", "test_f1_macro_ci_low"):
        assert metric in run.data.metrics, metric
    assert run.data.params["train.epochs"] == "1"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"history.csv", "evaluation"}

    champion = client.get_model_version_by_alias("clothing-classifier", "champion")
    assert champion.run_id == run.info.run_id
    assert int(champion.version) == json.loads((root / "registry/champion.json").read_text())["version"]

    # Everything sits in PostgreSQL and the server's artifact folder, nothing in the project.
    with psycopg.connect(team_server.postgres.uri("mlflow")) as db:
        names = [row[0] for row in db.execute("SELECT name FROM runs")]
        assert names == ["efficientnet_lite0-frozen-s0"]
        aliases = db.execute("SELECT name, alias FROM registered_model_aliases").fetchall()
        assert aliases == [("clothing-classifier", "champion")]
    assert any(p.is_file() for p in team_server.artifacts.rglob("*")), "no artifact reached the server's folder"
    for local_store in ("mlflow.db", "mlruns", "mlartifacts"):
        assert not (root / local_store).exists(), f"{local_store} was written in the project"


@pytest.mark.slow
def test_basic_auth_refuses_anonymous_clients(team_server, monkeypatch):
    """`--app-name basic-auth`: no credentials or a wrong password get 401; the admin's work, and
    a user the admin adds reads with default_permission READ but cannot delete."""
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client
    from mlflow.tracking import MlflowClient

    url = team_server.url
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
    assert anonymous.value.code == 401

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(MlflowException) as wrong:
        MlflowClient(tracking_uri=url).create_experiment("team")
    assert wrong.value.message.startswith(  # MLflow's words for the server's 401, as the user reads them
        "API request to endpoint /api/2.0/mlflow/experiments/create failed with error code 401 != 200. "
        "Response body: 'You are not authenticated."), wrong.value.message

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    experiment_id = MlflowClient(tracking_uri=url).create_experiment("team")
    get_app_client("basic-auth", tracking_uri=url).create_user("alice", "alice-long-password")

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "alice-long-password")
    alice = MlflowClient(tracking_uri=url)
    assert alice.get_experiment(experiment_id).name == "team"
    with pytest.raises(MlflowException) as denied:
        alice.delete_experiment(experiment_id)
    assert denied.value.error_code == "PERMISSION_DENIED"


LOGGER = """
import sys
from transfer_study import tracking

uri, worker = sys.argv[1], sys.argv[2]
experiment_id = tracking.ensure_experiment(uri, "concurrency", None)
tracker = tracking.RunTracker.start(uri, experiment_id, f"worker-{worker}")
tracker.add_params_and_tags({f"param_{i}": str(i) for i in range(20)}, {"worker": worker})
for step in range(50):
    tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
tracker.log_metrics({f"metric_{i}": float(i) for i in range(10)})
tracker.finish()
print(experiment_id, tracker.run_id)
"""


@pytest.mark.slow
def test_concurrent_processes_share_one_new_sqlite_store(tmp_path):
    """4 training processes (tracking.py's calls) start at once on a SQLite store nobody created
    yet, as `dvc queue start -j 4` on a fresh clone does: the tables are made once, all four use
    one experiment, none fails with 'database is locked', and no metric is lost."""
    from mlflow.tracking import MlflowClient

    tracking_uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    script = tmp_path / "logger.py"
    script.write_text(LOGGER)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    workers = [subprocess.Popen([sys.executable, str(script), tracking_uri, str(n)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(4)]
    results = [(w.communicate(timeout=300), w.returncode) for w in workers]
    for (out, err), code in results:
        assert code == 0, err[-3000:]
        assert "database is locked" not in err
    (experiment_id,) = {out.split()[0] for (out, _), _ in results}

    client = MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"worker-{n}" for n in range(4)]
    assert sorted(r.info.run_id for r in runs) == sorted(out.split()[1] for (out, _), _ in results)
    for run in runs:
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(50))
        assert len(run.data.params) == 20 and run.data.tags["worker"] == run.info.run_name[-1]
        assert {f"metric_{i}" for i in range(10)} <= set(run.data.metrics)
