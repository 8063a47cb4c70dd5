"""Register every run's model and point the `champion` alias at the best on validation.

The champion is chosen on validation macro-F1 (then validation accuracy, then run
name, so ties resolve the same way every time), never on test: the test set stays an
unbiased estimate of the chosen model. Rerunning with the same runs.csv changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .config import UserError

CHAMPION, PREVIOUS = "champion", "previous"
REQUIRED_COLUMNS = ("run", "architecture", "condition", "seed", "run_id", "model_uri",
                    "val_f1_macro", "val_accuracy", "test_f1_macro", "test_accuracy")
TAGGED_METRICS = ("val_f1_macro", "val_accuracy", "test_f1_macro", "test_accuracy")


def read_runs(runs_csv: Path) -> pd.DataFrame:
    """runs.csv from the evaluate stage, checked for the columns the registry needs."""
    runs_csv = Path(runs_csv)
    if not runs_csv.is_file():
        raise UserError(f"'{runs_csv}' not found; run `dvc repro evaluate` first")
    runs = pd.read_csv(runs_csv)
    missing = [c for c in REQUIRED_COLUMNS if c not in runs.columns]
    if missing:
        raise UserError(f"'{runs_csv}' lacks column(s) {', '.join(missing)}; rerun `dvc repro evaluate`")
    if runs.empty:
        raise UserError(f"'{runs_csv}' lists no runs; run `dvc repro train evaluate` first")
    return runs


def choose_champion(runs: pd.DataFrame) -> pd.Series:
    """The row with the best validation macro-F1; ties → higher val accuracy, then first run name.

    Test metrics play no part. Raises UserError when no run has validation metrics.
    """
    scored = runs.dropna(subset=["val_f1_macro"])
    if scored.empty:
        raise UserError("no run has validation metrics, and the champion is chosen on validation only; "
                        "give the split a val set (split.val in params.yaml) and rerun")
    ranked = scored.assign(_acc=scored["val_accuracy"].fillna(-1.0)).sort_values(
        ["val_f1_macro", "_acc", "run"], ascending=[False, False, True], kind="stable")
    return ranked.iloc[0]


def version_tags(row: pd.Series) -> dict[str, str]:
    """Tags that say what a model version is and how it scored."""
    tags = {"architecture": str(row["architecture"]), "condition": str(row["condition"]),
            "seed": str(row["seed"]), "run_name": str(row["run"])}
    for metric in TAGGED_METRICS:
        value = row[metric]
        tags[metric] = "nan" if pd.isna(value) else f"{float(value):.6f}"
    return tags


def existing_versions(client, name: str) -> list:
    """Every version of registered model `name`, creating the registered model if missing."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name)
        return []
    return list(client.search_model_versions(f"name = '{name}'"))


def find_version(versions: list, row: pd.Series):
    """The lowest version registered from this run (by run_id, or by source = model_uri); None if none."""
    matches = [v for v in versions if v.run_id == row["run_id"] or v.source == row["model_uri"]]
    return min(matches, key=lambda v: int(v.version)) if matches else None


def register_run(client, name: str, row: pd.Series, versions: list) -> str:
    """The version number of this run's model, registering it only if it is not registered yet."""
    import mlflow
    from mlflow.exceptions import MlflowException

    found = find_version(versions, row)
    if found is not None:
        return str(found.version)
    try:
        created = mlflow.register_model(row["model_uri"], name)
    except MlflowException as exc:
        raise UserError(f"cannot register the model of run {row['run']} ({row['model_uri']}): {exc.message}; "
                        f"was it trained against this tracking store?") from None
    return str(created.version)


def sync_tags(client, name: str, version: str, tags: dict[str, str]) -> None:
    """Set only tags that are missing or differ, so a rerun writes nothing."""
    current = client.get_model_version(name, version).tags
    for key, value in tags.items():
        if current.get(key) != value:
            client.set_model_version_tag(name, version, key, value)


def alias_version(client, name: str, alias: str) -> str | None:
    """The version an alias points at, or None when the alias is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        return None


def move_champion(client, name: str, winner: str) -> str | None:
    """Point `champion` at winner; a different former champion becomes `previous`.

    Gives back the version `previous` points at afterwards (None if unset).
    """
    former = alias_version(client, name, CHAMPION)
    if former != winner:
        if former is not None:
            client.set_registered_model_alias(name, PREVIOUS, former)
        client.set_registered_model_alias(name, CHAMPION, winner)
    return alias_version(client, name, PREVIOUS)


def number_or_none(value) -> float | None:
    """A plain float for JSON; None for a missing (NaN) metric."""
    return None if pd.isna(value) else float(value)


def promote_champion(runs_csv: Path, registered_model: str, tracking_uri: str,
                     summary_path: Path | None = None) -> dict:
    """The `register` stage: register each run's model, tag it, move @champion.

    Takes runs.csv from the evaluate stage, the registered model name and the tracking
    URI (the model registry lives in the same store). Writes the summary to
    `summary_path` (default: champion.json beside runs.csv) and gives it back:
    name, version, run_id, run, val_f1, test_f1, previous_version and every run's version.
    Points MLflow's process-wide tracking URI at tracking_uri.
    """
    import mlflow
    from mlflow import MlflowClient

    runs = read_runs(runs_csv)
    winner = choose_champion(runs)  # before any registry write: fail early without val metrics
    # mlflow.register_model is fluent: it reads the process-wide tracking URI (as train does).
    # The registry follows the tracking URI unless MLFLOW_REGISTRY_URI says otherwise.
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)

    versions = existing_versions(client, registered_model)
    run_versions = {}
    for _, row in runs.sort_values("run").iterrows():
        version = register_run(client, registered_model, row, versions)
        sync_tags(client, registered_model, version, version_tags(row))
        run_versions[row["run"]] = version

    previous = move_champion(client, registered_model, run_versions[winner["run"]])
    summary = {
        "name": registered_model, "version": int(run_versions[winner["run"]]), "run_id": winner["run_id"],
        "run": winner["run"], "val_f1": number_or_none(winner["val_f1_macro"]),
        "test_f1": number_or_none(winner["test_f1_macro"]),
        "previous_version": int(previous) if previous is not None else None,
        "chosen_on": "validation macro-F1 (ties: validation accuracy, then run name)",
        "versions": {run: int(v) for run, v in run_versions.items()},
    }
    summary_path = Path(summary_path) if summary_path else Path(runs_csv).with_name("champion.json")
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary
