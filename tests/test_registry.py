"""Tests for registry.py (and champion.py's choice) against a real SQLite MLflow registry with
real logged classifiers: the served model is chosen on validation only, an ensemble is served
when it beats the best single run, the champion is calibrated, alias moves, idempotent reruns."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_params
from PIL import Image

from transfer_study import champion, models, serve
from transfer_study.calibration import fit_temperature, logits_from_probabilities, temperature_scaled
from transfer_study.config import UserError
from transfer_study.evaluate import classification_metrics
from transfer_study.registry import RegisterPaths, promote_champion, rank_runs
from transfer_study.runs import RUN_JSON_KEYS, write_run_info

CLASSES = ["coat", "shirt", "trouser"]
PER_SPLIT = 12  # val and test images, 4 per class


@pytest.fixture(scope="module")
def store(tmp_path_factory, empty_mlflow_db):
    """One SQLite store with three logged classifiers, and the crops their predictions name.

    The networks are real EfficientNet-Lite0s whose head is zeroed: they answer 1/3 for every
    class, so the mirror-image pass runs for real but never changes a predicted class, and
    which runs make the best ensemble follows from the predictions.csv each test writes.
    """
    root = tmp_path_factory.mktemp("registry")
    shutil.copy(empty_mlflow_db, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.create_experiment("test", artifact_location=(root / "artifacts").as_uri())
    network = models.build_model("efficientnet_lite0", len(CLASSES), pretrained=False).eval()
    with torch.no_grad():
        network.head.weight.zero_()
        network.head.bias.zero_()
    logged = []
    for n in range(3):
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"logged{n}") as run:
            info = serve.log_servable_model(network, "efficientnet_lite0", CLASSES, 32, tiny_params(), Path("best.pt"))
        logged.append({"run_id": run.info.run_id, "model_uri": info.model_uri})
    rows = []
    for split in ("val", "test"):
        for i in range(PER_SPLIT):
            label = i % len(CLASSES)
            path = Path("data/cropped") / CLASSES[label] / f"{split}{i}.png"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 40), (60 * label, 200 - 50 * label, 20 * i)).save(root / path)
            rows.append({"path": path.as_posix(), "split": split, "label": label})
    return {"root": root, "uri": uri, "logged": logged, "images": pd.DataFrame(rows)}


def probabilities(labels: np.ndarray, wrong: set[int]) -> np.ndarray:
    """0.9 on the true class, except on rows `wrong`: 0.6 on the next class (a confident mistake)."""
    probs = np.full((len(labels), len(CLASSES)), 0.05)
    for i, label in enumerate(labels):
        if i in wrong:
            probs[i] = 0.2
            probs[i, (label + 1) % len(CLASSES)] = 0.6
        else:
            probs[i, label] = 0.9
    return probs


def write_run(store, project: Path, name: str, model: int, wrong_val: set[int], wrong_test: set[int]) -> dict:
    """A run folder (run.json, predictions.csv) under project/models and its runs.csv row; the
    run's model is logged classifier number `model` of the store."""
    arch, condition, seed = name.rsplit("-", 2)
    run_dir = project / "models" / f"{arch}-{condition}" / seed
    run_dir.mkdir(parents=True)
    logged = store["logged"][model]
    write_run_info(run_dir, {key: None for key in RUN_JSON_KEYS} | logged | {
        "architecture": arch, "condition": condition, "seed": int(seed[1:]), "class_names": CLASSES})
    frames, row = [], {"run": name, "architecture": arch, "condition": condition, "seed": int(seed[1:]), **logged,
                       "run_dir": run_dir.relative_to(project / "models").as_posix()}
    for split, wrong in (("val", wrong_val), ("test", wrong_test)):
        rows = store["images"][store["images"]["split"] == split].reset_index(drop=True)
        probs = probabilities(rows["label"].to_numpy(), wrong)
        frame = rows.assign(pred=probs.argmax(1), **{f"prob_{k}": probs[:, k] for k in range(len(CLASSES))})
        frames.append(frame)
        metrics = classification_metrics(rows["label"].to_numpy(), probs.argmax(1), probs, len(CLASSES))
        row |= {f"{split}_f1_macro": metrics["f1_macro"], f"{split}_accuracy": metrics["accuracy"]}
    pd.concat(frames)[["path", "split", "label", "pred", *[f"prob_{k}" for k in range(len(CLASSES))]]].to_csv(
        run_dir / "predictions.csv", index=False)
    return row


def project(store, tmp_path: Path, runs: list[tuple[str, int, set[int], set[int]]]) -> RegisterPaths:
    """runs.csv and run folders for (name, logged model, wrong val rows, wrong test rows) each."""
    rows = [write_run(store, tmp_path, *run) for run in runs]
    (tmp_path / "evaluation").mkdir(exist_ok=True)
    pd.DataFrame(rows).to_csv(tmp_path / "evaluation" / "runs.csv", index=False)
    return RegisterPaths(runs_csv=tmp_path / "evaluation" / "runs.csv", models_dir=tmp_path / "models",
                         root=store["root"], out_dir=tmp_path / "registry")


def version_count(uri: str, name: str) -> int:
    return len(mlflow.MlflowClient(uri).search_model_versions(f"name = '{name}'"))


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


# Two runs whose confident mistakes fall on different validation images: their mean fixes both.
COMPLEMENTARY = [("resnet18-frozen-s0", 0, {0, 1, 2}, {0, 1}),
                 ("vgg19-frozen-s0", 1, {9, 10, 11}, {5}),
                 ("vgg19-scratch-s0", 2, {0, 1, 2, 3, 4, 5}, set())]  # best on test, worst on val


@pytest.fixture(scope="module")
def ensemble_champion(store, tmp_path_factory):
    paths = project(store, tmp_path_factory.mktemp("ensemble"), COMPLEMENTARY)
    return paths, promote_champion(paths, "ensembled", store["uri"])


def test_an_ensemble_that_beats_the_best_single_run_on_validation_is_served(store, ensemble_champion):
    paths, summary = ensemble_champion
    client = mlflow.MlflowClient(store["uri"])

    assert summary["kind"] == "ensemble" and summary["run"] == "ensemble"
    assert [m["run"] for m in summary["members"]] == ["resnet18-frozen-s0", "vgg19-frozen-s0"]
    assert summary["best_single"]["run"] == "resnet18-frozen-s0" and summary["best_single"]["val_f1"] < 1.0
    assert summary["val_f1"] == 1.0 and summary["val_f1"] > summary["best_single"]["val_f1"]
    assert summary["test_accuracy"] == pytest.approx(1.0)  # their test mistakes differ too
    champion_version = client.get_model_version_by_alias("ensembled", "champion")
    assert int(champion_version.version) == summary["version"] and champion_version.run_id == summary["run_id"]
    assert champion_version.tags["kind"] == "ensemble"
    assert champion_version.tags["members"] == "resnet18-frozen-s0,vgg19-frozen-s0"
    assert version_count(store["uri"], "ensembled") == 4  # three runs and the ensemble

    run = client.get_run(summary["run_id"])
    assert run.info.run_name == "ensemble" and run.info.status == "FINISHED"
    assert run.data.params["ensemble.members"] == "resnet18-frozen-s0,vgg19-frozen-s0"
    assert run.data.params["member.vgg19-frozen-s0.run_id"] == store["logged"][1]["run_id"]
    assert run.data.metrics["served_val_f1_macro"] == 1.0 and "served_test_ece_after" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "calibration")} == {
        "calibration/calibration.json", "calibration/reliability.png"}
    assert json.loads((paths.out_dir / "champion.json").read_text()) == summary
    assert "so val_* is optimistic" in summary["honest_figure"] and summary["honest_figure"].startswith("test_*")
    calibration = json.loads((paths.out_dir / "calibration.json").read_text())
    assert calibration["temperature"] == summary["temperature"] and calibration["ece_bins"] == 15
    # Every validation answer of the ensemble is right: no fit to trust, so T = 1, and it says so.
    assert summary["temperature"] == 1.0 and calibration["temperature_applied"] is False
    assert calibration["val_errors"] == 0 and "0 wrong validation answer(s)" in summary["temperature_note"]
    assert champion_version.tags["calibration"] == summary["temperature_note"] == calibration["temperature_note"]
    assert calibration["test"]["ece_after"] == summary["test_ece_after"]
    # ... fitted on what is served, the members' mean validation probabilities (0.1, the range's lower
    # end: their mean is right on every validation image), not on the best member's (0.92, 3 errors).
    val = [pd.read_csv(paths.models_dir / run.rsplit("-", 1)[0] / run.rsplit("-", 1)[1] / "predictions.csv")
           .query("split == 'val'") for run in ("resnet18-frozen-s0", "vgg19-frozen-s0")]
    mean = np.mean([frame[[f"prob_{k}" for k in range(3)]].to_numpy() for frame in val], axis=0)
    fitted = fit_temperature(logits_from_probabilities(mean), val[0]["label"].to_numpy())
    assert calibration["temperature_fitted"] == summary["temperature_fitted"]
    assert calibration["temperature_fitted"] == pytest.approx(fitted, abs=1e-3) == pytest.approx(0.1, abs=1e-3)
    assert (paths.out_dir / "reliability.png").stat().st_size > 1000

    mlflow.set_tracking_uri(store["uri"])
    model = mlflow.pyfunc.load_model("models:/ensembled@champion")
    image = serve.example_images(1)
    answer = model.predict(image)
    probs = answer[[f"prob_{c}" for c in CLASSES]].to_numpy()
    assert list(answer.columns) == ["label", *[f"prob_{c}" for c in CLASSES]]
    assert np.allclose(probs.sum(1), 1.0) and np.allclose(probs, 1 / 3)  # zeroed heads: uniform, any T


def test_the_choice_never_reads_test_labels(store, ensemble_champion, tmp_path, monkeypatch):
    paths, summary = ensemble_champion
    corrupted = tmp_path / "corrupted"
    shutil.copytree(paths.runs_csv.parent.parent, corrupted, ignore=shutil.ignore_patterns("registry"))
    rng = np.random.default_rng(0)
    runs = pd.read_csv(corrupted / "evaluation" / "runs.csv")
    for column in ("test_f1_macro", "test_accuracy"):
        runs[column] = rng.uniform(size=len(runs))
    runs.to_csv(corrupted / "evaluation" / "runs.csv", index=False)
    shuffled, noise = rng.permutation(PER_SPLIT), rng.dirichlet(np.ones(3), size=PER_SPLIT)
    for predictions in corrupted.glob("models/*/s*/predictions.csv"):  # the same wrong labels in every run
        frame = pd.read_csv(predictions)
        test = frame["split"] == "test"
        frame.loc[test, "label"] = frame.loc[test, "label"].to_numpy()[shuffled]
        frame.loc[test, [f"prob_{k}" for k in range(3)]] = noise
        frame.to_csv(predictions, index=False)
    writes = record_writes(monkeypatch)

    again = promote_champion(RegisterPaths(corrupted / "evaluation" / "runs.csv", corrupted / "models",
                                           paths.root, corrupted / "registry"), "ensembled", store["uri"])

    for key in ("version", "run_id", "members", "temperature", "val_f1", "best_single"):
        assert again[key] == summary[key], key
    assert again["test_accuracy"] != summary["test_accuracy"]  # the test numbers did change
    assert "create_model_version" not in writes and version_count(store["uri"], "ensembled") == 4


# The first run's mistakes include the second's: no mean of the two beats the second alone.
NESTED = [("resnet18-scratch-s0", 0, {0, 1, 2, 3, 4, 5}, set()), ("resnet18-frozen-s0", 1, {0, 1, 2}, {2})]


@pytest.fixture(scope="module")
def single_champion(store, tmp_path_factory):
    paths = project(store, tmp_path_factory.mktemp("single"), NESTED)
    return paths, promote_champion(paths, "moving", store["uri"])


def test_the_best_single_run_is_served_calibrated_when_no_ensemble_beats_it(store, single_champion, tmp_path):
    _, summary = single_champion
    assert summary["kind"] == "single" and summary["run"] == "resnet18-frozen-s0"
    assert summary["run_id"] == store["logged"][1]["run_id"]  # logged into the member's own run
    assert summary["members"][0]["version"] == summary["versions"]["resnet18-frozen-s0"] != summary["version"]
    assert summary["previous_version"] is None
    mlflow.set_tracking_uri(store["uri"])
    served = Path(mlflow.artifacts.download_artifacts(f"models:/moving/{summary['version']}",
                                                      dst_path=str(tmp_path / "dl")))
    config = json.loads((served / "artifacts" / "config.json").read_text())
    assert config["temperature"] == summary["temperature"] and config["tta"] == summary["members"][0]["tta"]
    assert config["weights_sha256"]  # the member's weights, still verified when loaded
    answer = mlflow.pyfunc.load_model(str(served)).predict(serve.example_images(2))
    assert np.allclose(answer[[f"prob_{c}" for c in CLASSES]].to_numpy().sum(1), 1.0)


def test_alias_moves_to_a_new_winner_and_reruns_write_nothing(store, single_champion, tmp_path, monkeypatch):
    uri = store["uri"]
    client = mlflow.MlflowClient(uri)
    paths, before = single_champion
    writes = record_writes(monkeypatch)
    assert promote_champion(paths, "moving", uri) == before
    assert writes == []  # nothing re-registered, re-tagged, re-logged or re-aliased
    assert version_count(uri, "moving") == 3  # two runs and the served model
    with pytest.raises(mlflow.exceptions.MlflowException, match="^Registered model alias previous not found.$"):
        client.get_model_version_by_alias("moving", "previous")  # no former champion yet
    monkeypatch.undo()

    paths = project(store, tmp_path, [*NESTED, ("vgg19-frozen-s0", 2, set(), {0, 1, 2, 3})])
    after = promote_champion(paths, "moving", uri)
    assert after["run"] == "vgg19-frozen-s0" and after["version"] != before["version"]
    assert after["versions"]["resnet18-frozen-s0"] == before["versions"]["resnet18-frozen-s0"]
    assert version_count(uri, "moving") == 5  # one more run, one more served model
    assert int(client.get_model_version_by_alias("moving", "previous").version) == before["version"]

    writes = record_writes(monkeypatch)
    assert promote_champion(paths, "moving", uri) == after
    assert writes == [] and version_count(uri, "moving") == 5


def test_ranking_breaks_validation_ties_on_accuracy_then_name_and_ignores_other_splits():
    runs = pd.DataFrame({"run": ["vgg19-s0", "resnet18-s0", "inception-s0", "alexnet-s0", "lenet-s0"],
                         "val_f1_macro": [0.85, 0.85, 0.85, 0.95, 0.99], "val_accuracy": [0.86, 0.86, 0.84, 0.9, 0.9],
                         "test_f1_macro": [0.1, 0.9, 0.99, 0.5, 0.5], "repeat": [0, 0, 0, 1, 0],
                         "fraction": [1.0, 1.0, 1.0, 1.0, 0.5]})
    assert list(rank_runs(runs)["run"]) == ["resnet18-s0", "vgg19-s0", "inception-s0"]


def test_greedy_selection_adds_runs_only_while_validation_f1_rises():
    labels = np.arange(12) % 3
    probs = {"a": probabilities(labels, {0, 1, 2}), "b": probabilities(labels, {9, 10, 11}),
             "c": probabilities(labels, {0, 1, 2, 9, 10, 11})}
    assert champion.greedy_members(probs, labels, max_members=5) == ["a", "b"]
    assert champion.greedy_members(probs, labels, max_members=1) == ["a"]
    assert champion.greedy_members({"c": probs["c"], "a": probs["a"]}, labels, 5) == ["a"]


def overconfident(labels: np.ndarray, wrong: set[int]) -> np.ndarray:
    """0.98 on the true class, except on rows `wrong`: 0.7 on the next class (overconfident throughout)."""
    rows = np.arange(len(labels))
    top = np.where(np.isin(rows, list(wrong)), 0.7, 0.98)
    probs = np.repeat(((1 - top) / 2)[:, None], len(CLASSES), axis=1)
    probs[rows, (labels + np.isin(rows, list(wrong))) % len(CLASSES)] = top
    return probs


def test_the_served_temperature_is_fitted_on_the_ensembles_own_probabilities():
    """An ensemble of two overconfident runs with ten shared mistakes (enough for the fit to be
    applied): the temperature served is the one that minimises the validation log-loss of the
    ensemble's mean probabilities, not of its best member's."""
    labels = np.arange(30) % 3
    a, b = overconfident(labels, set(range(12))), overconfident(labels, set(range(10)) | {12, 13, 14})
    unhelpful = np.full((30, 3), 1 / 3)  # mirror images that tell nothing: no flips
    choice = champion.choose_served([champion.Candidate("a", a, unhelpful), champion.Candidate("b", b, unhelpful)],
                                    labels)
    assert choice.members == ("a", "b") and choice.tta == {"a": False, "b": False}
    assert choice.calibration.errors == 10 and choice.calibration.note is None  # the ensemble's errors; applied
    mean = (a + b) / 2

    def log_loss(probs: np.ndarray, temperature: float) -> float:
        scaled = temperature_scaled(probs, temperature)
        return float(-np.log(scaled[np.arange(30), labels]).mean())

    # The ensemble's optimum (1.561 here), found without fit_temperature: a 1e-3 grid around it is no better.
    assert choice.temperature == choice.calibration.fitted == pytest.approx(1.561, abs=2e-3)
    assert all(log_loss(mean, choice.temperature) <= log_loss(mean, t) + 1e-9
               for t in np.arange(1.2, 2.0, 0.001))
    assert log_loss(a, 1.726) < log_loss(a, choice.temperature)  # the best member's own fit differs


def test_flips_are_kept_only_when_they_help_on_validation():
    labels = np.arange(12) % 3
    plain = probabilities(labels, {0, 1, 2})
    assert champion.flips_help(plain, probabilities(labels, set()), labels)  # the mirror image fixes mistakes
    confidently_wrong = np.full((12, 3), 0.01)
    confidently_wrong[np.arange(12), (labels + 1) % 3] = 0.98
    assert not champion.flips_help(plain, confidently_wrong, labels)
    choice = champion.choose_served([champion.Candidate("a", plain, probabilities(labels, set()))], labels)
    assert choice.tta == {"a": True} and choice.members == ("a",) and choice.val_f1 == 1.0


def test_no_validation_metrics_is_a_user_error(store, tmp_path):
    paths = project(store, tmp_path, [("resnet18-frozen-s0", 0, set(), set())])
    runs = pd.read_csv(paths.runs_csv).assign(val_f1_macro=float("nan"))
    runs.to_csv(paths.runs_csv, index=False)
    with pytest.raises(UserError) as error:
        promote_champion(paths, "no-val", store["uri"])
    assert str(error.value) == ("no run has validation metrics, and the champion is chosen on validation only; "
                                "give the split a val set (split.val in params.yaml) and rerun")


def test_missing_runs_csv_says_to_evaluate(tmp_path, store):
    paths = RegisterPaths(tmp_path / "runs.csv", tmp_path / "models", tmp_path, tmp_path / "registry")
    with pytest.raises(UserError, match="dvc repro evaluate"):
        promote_champion(paths, "none", store["uri"])
