"""Tests for registry.py against a real SQLite MLflow registry: champion on validation,
alias moves, idempotent reruns."""

from __future__ import annotations

import json
import mlflow
import pandas as pd
import pytest

from transfer_study.config import UserError
from transfer_study.registry import promote_champion


class EchoModel(mlflow.pyfunc.PythonModel):
    """The smallest servable model: it returns its input."""

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return model_input


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one takes a second); tests use their own model names."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.create_experiment("test", artifact_location=(root / "artifacts").as_uri())
    return uri, experiment_id


def logged_run(store, name: str) -> dict:
    """An MLflow run with a logged pyfunc model, as train.py leaves it: run_id and model_uri."""
    uri, experiment_id = store
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=name) as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=EchoModel(), pip_requirements=[])
    return {"run_id": run.info.run_id, "model_uri": info.model_uri}


def runs_row(store, run: str, val_f1: float, test_f1: float, val_acc: float = 0.8) -> dict:
    arch, condition, seed = run.rsplit("-", 2)
    return {"run": run, "architecture": arch, "condition": condition, "seed": int(seed[1:]),
            **logged_run(store, run), "val_f1_macro": val_f1, "val_accuracy": val_acc,
            "test_f1_macro": test_f1, "test_accuracy": test_f1}


def write_runs(path, rows) -> None:
    pd.DataFrame(rows).to_csv(path, index=False)


def record_writes(monkeypatch) -> list[str]:
    """Record every registry write the code under test makes (they still happen)."""
    calls: list[str] = []
    for method in ("set_model_version_tag", "set_registered_model_alias", "delete_registered_model_alias",
                   "create_model_version", "create_registered_model"):
        original = getattr(mlflow.MlflowClient, method)

        def recording(self, *args, _original=original, _method=method, **kwargs):
            calls.append(_method)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(mlflow.MlflowClient, method, recording)
    return calls


def version_count(uri: str, name: str) -> int:
    return len(mlflow.MlflowClient(uri).search_model_versions(f"name = '{name}'"))


def test_champion_is_chosen_on_validation_not_test(tmp_path, store):
    uri, _ = store
    rows = [runs_row(store, "resnet18-frozen-s0", val_f1=0.90, test_f1=0.70),
            runs_row(store, "vgg19-frozen-s0", val_f1=0.80, test_f1=0.95)]
    write_runs(tmp_path / "runs.csv", rows)

    summary = promote_champion(tmp_path / "runs.csv", "by-val", uri, tmp_path / "registry" / "champion.json")

    assert summary["run_id"] == rows[0]["run_id"]
    assert summary["val_f1"] == 0.90 and summary["test_f1"] == 0.70
    champion = mlflow.MlflowClient(uri).get_model_version_by_alias("by-val", "champion")
    assert champion.run_id == rows[0]["run_id"] and int(champion.version) == summary["version"]
    assert champion.tags["architecture"] == "resnet18" and champion.tags["condition"] == "frozen"
    assert champion.tags["seed"] == "0" and float(champion.tags["test_f1_macro"]) == pytest.approx(0.70)
    assert json.loads((tmp_path / "registry" / "champion.json").read_text()) == summary
    assert version_count(uri, "by-val") == 2


def test_ties_on_validation_f1_break_on_accuracy_then_name(tmp_path, store):
    uri, _ = store
    rows = [runs_row(store, "vgg19-scratch-s0", val_f1=0.85, test_f1=0.8, val_acc=0.86),
            runs_row(store, "resnet18-scratch-s0", val_f1=0.85, test_f1=0.9, val_acc=0.86),
            runs_row(store, "inception_v3-scratch-s0", val_f1=0.85, test_f1=0.9, val_acc=0.84)]
    write_runs(tmp_path / "runs.csv", rows)

    assert promote_champion(tmp_path / "runs.csv", "ties", uri)["run"] == "resnet18-scratch-s0"
    assert (tmp_path / "champion.json").is_file()  # default: beside runs.csv


def test_alias_moves_to_new_winner_and_rerun_is_idempotent(tmp_path, store, monkeypatch):
    uri, _ = store
    client = mlflow.MlflowClient(uri)
    first = [runs_row(store, "resnet18-scratch-s0", val_f1=0.70, test_f1=0.70),
             runs_row(store, "resnet18-frozen-s0", val_f1=0.80, test_f1=0.80)]
    write_runs(tmp_path / "runs.csv", first)
    before = promote_champion(tmp_path / "runs.csv", "moving", uri)
    assert before["run"] == "resnet18-frozen-s0" and before["previous_version"] is None

    again = promote_champion(tmp_path / "runs.csv", "moving", uri)
    assert again == before
    assert version_count(uri, "moving") == 2
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias("moving", "previous")

    better = runs_row(store, "vgg19-frozen-s0", val_f1=0.85, test_f1=0.60)
    write_runs(tmp_path / "runs.csv", [*first, better])
    after = promote_champion(tmp_path / "runs.csv", "moving", uri)

    assert after["run_id"] == better["run_id"]
    assert after["versions"]["resnet18-frozen-s0"] == before["versions"]["resnet18-frozen-s0"]
    assert version_count(uri, "moving") == 3
    assert client.get_model_version_by_alias("moving", "champion").run_id == better["run_id"]
    assert int(client.get_model_version_by_alias("moving", "previous").version) == before["version"]

    writes = record_writes(monkeypatch)
    rerun = promote_champion(tmp_path / "runs.csv", "moving", uri)
    assert writes == []  # nothing re-registered, re-tagged or re-aliased
    assert rerun == after and version_count(uri, "moving") == 3
    assert int(client.get_model_version_by_alias("moving", "previous").version) == before["version"]


def test_no_validation_metrics_is_a_user_error(tmp_path, store):
    uri, _ = store
    row = runs_row(store, "resnet18-frozen-s0", val_f1=float("nan"), test_f1=0.9)
    write_runs(tmp_path / "runs.csv", [row])
    with pytest.raises(UserError, match="validation"):
        promote_champion(tmp_path / "runs.csv", "no-val", uri)


def test_missing_runs_csv_says_to_evaluate(tmp_path, store):
    with pytest.raises(UserError, match="dvc repro evaluate"):
        promote_champion(tmp_path / "runs.csv", "none", store[0])
