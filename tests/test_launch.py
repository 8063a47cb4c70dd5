"""launch.py: what `make ui` and `make serve` start, and the lines a finished run ends with."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from urllib.parse import unquote

import mlflow
import pytest
from conftest import REPO_ROOT

from transfer_study import launch
from transfer_study.config import Params, TrackingParams, UserError, load_params


def test_runs_url_opens_the_runs_table_and_can_filter_the_current_runs():
    assert launch.runs_url("http://127.0.0.1:5000/", "7") == "http://127.0.0.1:5000/#/experiments/7/runs"
    current = launch.runs_url("http://127.0.0.1:5000", "7", current_only=True)
    assert current.startswith("http://127.0.0.1:5000/#/experiments/7/runs?searchFilter=")
    assert unquote(current.split("searchFilter=")[1]) == "tags.pipeline_current = 'true'"


def test_ui_runs_on_the_project_store_with_its_artifact_folder(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = launch.ui_command(uri, port=5050)
    assert command[:2] == ["mlflow", "ui"]
    assert command[command.index("--backend-store-uri") + 1] == uri
    assert command[command.index("--default-artifact-root") + 1] == (tmp_path / "mlartifacts").as_uri()
    assert command[command.index("--port") + 1] == "5050"


def test_serve_runs_the_champion_in_this_environment():
    command = launch.serve_command("clothing-classifier-quick", port=5002)
    assert command[:3] == ["mlflow", "models", "serve"]
    assert command[command.index("-m") + 1] == "models:/clothing-classifier-quick@champion"
    assert command[command.index("--env-manager") + 1] == "local"


def test_the_tools_environment_finds_uvicorn_without_an_activated_venv():
    bin_dir = Path(sys.executable).parent
    env = launch.tool_environment({"PATH": "/usr/bin:/bin"}, bin_dir, "sqlite:////x/mlflow.db")
    assert shutil.which("uvicorn", path=env["PATH"]) == str(bin_dir / "uvicorn")
    assert shutil.which("mlflow", path=env["PATH"]) == str(bin_dir / "mlflow")
    assert env["MLFLOW_TRACKING_URI"] == "sqlite:////x/mlflow.db"  # where models:/ URIs resolve


def test_ui_prints_the_runs_table_of_the_profile_experiment(tracking_uri, tmp_path):
    experiment_id = mlflow.MlflowClient(tracking_uri).create_experiment("transfer-study-quick")
    params = Params(tracking=TrackingParams(experiment="transfer-study-quick"))
    lines, command = launch.ui_launch(params, tracking_uri, 5000)
    assert f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs" in lines[0]
    assert "searchFilter=" in lines[1]
    assert command == launch.ui_command(tracking_uri, port=5000)


def test_ui_and_serve_before_any_run_say_to_train_first(tracking_uri, tmp_path):
    params = Params(tracking=TrackingParams(experiment="never-run"))
    with pytest.raises(UserError, match="'never-run'.*make run"):
        launch.ui_launch(params, tracking_uri, 5000)
    with pytest.raises(UserError, match="'clothing-classifier@champion'.*make run"):
        launch.check_champion(tracking_uri, "clothing-classifier")
    missing = f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}"
    message = (f"no tracking store at '{tmp_path / 'none' / 'mlflow.db'}' yet, so no registered model "
               "'clothing-classifier'; `make run` (or `make quick`) trains and registers first")
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        launch.check_champion(missing, "clothing-classifier")
    assert not (tmp_path / "none").exists()  # no empty store was created


def test_closing_lines_name_the_report_ui_and_serve_of_the_profile():
    quick = "\n".join(launch.closing_lines(load_params(REPO_ROOT / "params.quick.yaml"), "params.quick.yaml"))
    assert "outputs/quick/reports/" in quick
    assert "make ui PROFILE=quick" in quick and "make serve PROFILE=quick" in quick
    assert "models:/clothing-classifier-quick@champion" in quick
    own = "\n".join(launch.closing_lines(Params(), "mine.yaml"))
    assert "transfer-study --params mine.yaml ui" in own and "report: reports/" in own
