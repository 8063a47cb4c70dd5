"""What `make ui` and `make serve` start, and the lines a finished run ends with.

`mlflow ui` on the project's tracking store, with the address of the cells' view (the current runs
with their test accuracy and macro-F1 as columns, which evaluate stores in the experiment) and of
the profile's runs table (MLflow 3 opens an experiment on a GenAI overview unless the experiment is
marked as model training; the runs are at `#/experiments/<id>/runs`), and
`mlflow models serve` of the profile's @champion. Both run with this environment's bin folder
first on PATH: `mlflow models serve` starts `uvicorn` by name, which an unactivated venv lacks.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

from .config import Params, UserError
from .plan import profile_of
from .tracking import CELLS_VIEW, PIPELINE_CURRENT_TAG, SHARED_VIEW_TAG_PREFIX, artifact_location_for

HOST = "127.0.0.1"
UI_PORT = 5000
SERVE_PORT = 5001
CHAMPION_ALIAS = "champion"


def cells_view_url(base_url: str, experiment_id: str) -> str:
    """The experiment page opened on the cells' view that evaluate stores (tracking.set_cells_view):
    current runs, test accuracy and macro-F1 with their intervals as columns."""
    return f"{runs_url(base_url, experiment_id)}&viewStateShareKey={CELLS_VIEW}"


def runs_url(base_url: str, experiment_id: str, current_only: bool = False) -> str:
    """The UI's runs table of an experiment; with current_only, filtered to the runs the pipeline's
    current state uses (evaluate.py tags them)."""
    # workflowType: MLflow 3.17's UI otherwise shows the GenAI view of any experiment
    url = f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if current_only:
        url += "&searchFilter=" + quote(f"tags.{PIPELINE_CURRENT_TAG} = 'true'")
    return url


def ui_command(tracking_uri: str, host: str = HOST, port: int = UI_PORT) -> list[str]:
    """`mlflow ui` on a SQLite store, new experiments' artifacts where tracking.py puts them."""
    return ["mlflow", "ui", "--backend-store-uri", tracking_uri,
            "--default-artifact-root", artifact_location_for(tracking_uri),
            "--host", host, "--port", str(port)]


def serve_command(model_name: str, host: str = HOST, port: int = SERVE_PORT) -> list[str]:
    """`mlflow models serve` of the model's @champion version, in this environment (no conda)."""
    return ["mlflow", "models", "serve", "-m", f"models:/{model_name}@{CHAMPION_ALIAS}",
            "--env-manager", "local", "--host", host, "--port", str(port)]


def _require_store(tracking_uri: str, what: str) -> None:
    """UserError when a SQLite store does not exist yet (MLflow would create an empty one)."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise UserError(f"no tracking store at '{tracking_uri.removeprefix('sqlite:///')}' yet, so no {what}; "
                        f"`make run` (or `make quick`) trains and registers first")


def find_experiment(tracking_uri: str, name: str):
    """Experiment `name` (tracking.experiment); UserError naming the fix when it has no runs yet."""
    from mlflow.tracking import MlflowClient

    _require_store(tracking_uri, f"experiment '{name}'")
    experiment = MlflowClient(tracking_uri).get_experiment_by_name(name)
    if experiment is None:
        raise UserError(f"the tracking store '{tracking_uri}' has no experiment '{name}' (tracking.experiment) yet; "
                        f"train first (`make run`, or `make quick` for the quick profile)")
    return experiment


def check_champion(tracking_uri: str, model_name: str) -> None:
    """UserError when `model_name` has no @champion version in the store yet."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    _require_store(tracking_uri, f"registered model '{model_name}'")
    try:
        MlflowClient(tracking_uri).get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException:
        raise UserError(f"no '{model_name}@{CHAMPION_ALIAS}' (tracking.registered_model) in '{tracking_uri}' yet; "
                        f"the register stage sets it: `make run`, or `make quick` for the quick profile") from None


def ui_launch(params: Params, tracking_uri: str, port: int) -> tuple[list[str], list[str] | None]:
    """The lines `make ui` prints (the runs table's address) and the `mlflow ui` command to run;
    None when MLFLOW_TRACKING_URI names a server, which serves the UI itself."""
    name = params.tracking.experiment
    experiment = find_experiment(tracking_uri, name)
    exp_id = experiment.experiment_id
    local = tracking_uri.startswith("sqlite:///")
    base = f"http://{HOST}:{port}" if local else tracking_uri
    lines = [f"experiment {name}: {runs_url(base, exp_id)}",
             f"the runs the pipeline's current state uses: {runs_url(base, exp_id, current_only=True)}"]
    if SHARED_VIEW_TAG_PREFIX + CELLS_VIEW in experiment.tags:  # evaluate has run: open on the cells' numbers
        lines.insert(0, f"the cells' test accuracy and macro-F1, with intervals: {cells_view_url(base, exp_id)}")
    return lines, ui_command(tracking_uri, port=port) if local else None


def tool_environment(env: dict[str, str], bin_dir: Path, tracking_uri: str) -> dict[str, str]:
    """`env` with `bin_dir` first on PATH and MLFLOW_TRACKING_URI set (models:/ URIs resolve there)."""
    return env | {"PATH": os.pathsep.join([str(bin_dir), env.get("PATH", "")]), "MLFLOW_TRACKING_URI": tracking_uri}


def exec_tool(command: list[str], env: dict[str, str]) -> None:
    """Replace this process with `command`, found on env's PATH (Ctrl-C then stops the tool itself)."""
    os.execvpe(command[0], command, env)


def closing_lines(params: Params, params_path: str) -> list[str]:
    """What a finished run leaves and how to look at it: the report, `make ui`, `make serve`."""
    profile = profile_of(params_path)
    ui, serve = ((f"make ui PROFILE={profile}", f"make serve PROFILE={profile}") if profile else
                 (f"transfer-study --params {params_path} ui", f"transfer-study --params {params_path} serve"))
    reports = (Path(params.paths.outputs) / "reports").as_posix()
    url = f"http://{HOST}:{SERVE_PORT}"
    return [
        f"done ({params_path}):",
        f"  report: {reports}/ (conclusion.md, table1.md, figure1.png, comparison.md, ...)",
        f"  runs:   {ui}: mlflow ui, opening on experiment {params.tracking.experiment}'s runs",
        (f"  serve:  {serve}: models:/{params.tracking.registered_model}@{CHAMPION_ALIAS} at {url}; "
         f"then `transfer-study predict --url {url} IMAGE`"),
    ]
