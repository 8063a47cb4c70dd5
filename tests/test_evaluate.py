"""Tests for evaluate.py: metrics against scikit-learn and by hand, bootstrap coverage,
McNemar against known tables, and the stage against a real SQLite MLflow store."""

from __future__ import annotations

import json
import math
import shutil
import zlib

import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score

from transfer_study.config import EvaluateParams, UserError
from transfer_study.evaluate import (BATCH_METRICS, SCALAR_METRICS, batch_accuracy, bootstrap_ci,
                                     bootstrap_distribution, classification_metrics, evaluate_runs, mcnemar,
                                     percentile_interval, resample_weights)

CLASSES = ["coat", "dress", "shirt"]


def synthetic_predictions(n: int, num_classes: int, accuracy: float, seed: int):
    """Labels, predictions right with probability `accuracy`, and matching probabilities."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, num_classes, n)
    right = rng.random(n) < accuracy
    y_pred = np.where(right, y_true, (y_true + rng.integers(1, num_classes, n)) % num_classes)
    proba = rng.dirichlet(np.ones(num_classes), n)
    proba[np.arange(n), y_pred] += 1.0  # the predicted class gets the largest probability
    proba = np.round(proba / proba.sum(axis=1, keepdims=True), 2)  # rounding makes ties, as real outputs do
    return y_true, y_pred, proba


# --------------------------------------------------------------------------- metrics


def test_metrics_match_scikit_learn():
    y_true, y_pred, proba = synthetic_predictions(300, 4, 0.7, seed=1)
    proba = proba / proba.sum(axis=1, keepdims=True)  # sklearn's multi-class AUC wants rows summing to 1
    m = classification_metrics(y_true, y_pred, proba, 4)

    assert m["accuracy"] == pytest.approx(np.mean(y_true == y_pred))
    assert m["precision_macro"] == pytest.approx(precision_score(y_true, y_pred, average="macro"))
    assert m["recall_macro"] == pytest.approx(recall_score(y_true, y_pred, average="macro"))
    assert m["f1_macro"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["per_class"]["f1"] == pytest.approx(f1_score(y_true, y_pred, average=None).tolist())
    assert m["auc_macro"] == pytest.approx(roc_auc_score(y_true, proba, multi_class="ovr", average="macro"))
    assert m["confusion_matrix"] == confusion_matrix(y_true, y_pred).tolist()
    assert m["auc_note"] is None


def test_metrics_of_a_tiny_case_by_hand():
    # 4 images, 2 classes; one class-0 image is predicted as class 1.
    y_true, y_pred = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    p1 = np.array([0.1, 0.75, 0.8, 0.7])  # positives 0.8, 0.7 vs negatives 0.1, 0.75: 3 of 4 pairs ordered
    m = classification_metrics(y_true, y_pred, np.column_stack([1 - p1, p1]), 2)

    assert m["accuracy"] == 0.75
    assert m["per_class"]["precision"] == pytest.approx([1.0, 2 / 3])
    assert m["per_class"]["recall"] == pytest.approx([0.5, 1.0])
    assert m["per_class"]["f1"] == pytest.approx([2 / 3, 0.8])
    assert m["f1_macro"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["auc_macro"] == pytest.approx(0.75)
    assert m["confusion_matrix"] == [[1, 1], [0, 2]]


def test_class_absent_from_split_gives_nan_auc_with_reason():
    y_true, y_pred = np.array([0, 1, 0, 1]), np.array([0, 1, 2, 1])
    proba = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.3, 0.6, 0.1]])
    m = classification_metrics(y_true, y_pred, proba, 3)

    assert math.isnan(m["auc_macro"])
    assert "[2]" in m["auc_note"]
    assert not math.isnan(m["per_class"]["auc"][0]) and math.isnan(m["per_class"]["auc"][2])
    assert m["accuracy"] == 0.75


@pytest.mark.parametrize("metric", SCALAR_METRICS)
def test_batched_metrics_equal_plain_metrics(metric):
    y_true, y_pred, proba = synthetic_predictions(120, 3, 0.7, seed=2)
    counts = np.random.default_rng(3).integers(0, 4, 120)  # a resample: image i drawn counts[i] times
    repeated = classification_metrics(np.repeat(y_true, counts), np.repeat(y_pred, counts),
                                      np.repeat(proba, counts, axis=0), 3)
    unweighted = classification_metrics(y_true, y_pred, proba, 3)

    batch = BATCH_METRICS[metric](np.stack([np.ones(120), counts]), y_true, y_pred, proba)
    assert batch == pytest.approx([unweighted[metric], repeated[metric]])


# --------------------------------------------------------------------------- bootstrap


def test_percentile_interval_is_the_central_one_ignoring_nans():
    values = np.append(np.arange(1001.0), np.nan)
    assert percentile_interval(values, 0.95) == pytest.approx((25.0, 975.0))  # 2.5 % in each tail
    assert percentile_interval(values, 0.5) == pytest.approx((250.0, 750.0))
    assert all(math.isnan(v) for v in percentile_interval(np.full(5, np.nan), 0.95))


def test_bootstrap_ci_covers_true_accuracy_at_nominal_rate():
    true_accuracy, covered, datasets = 0.8, 0, 200
    for i in range(datasets):
        y_true, y_pred, proba = synthetic_predictions(300, 6, true_accuracy, seed=100 + i)
        low, high = bootstrap_ci(y_true, y_pred, proba, batch_accuracy, n=1000, confidence=0.95, seed=i)
        covered += low <= true_accuracy <= high
    assert 0.90 <= covered / datasets <= 0.99


def test_bootstrap_ci_is_reproducible_and_brackets_the_estimate():
    y_true, y_pred, proba = synthetic_predictions(270, 6, 0.83, seed=5)
    first = bootstrap_ci(y_true, y_pred, proba, BATCH_METRICS["f1_macro"], 2000, 0.95, seed=7)
    again = bootstrap_ci(y_true, y_pred, proba, BATCH_METRICS["f1_macro"], 2000, 0.95, seed=7)
    estimate = classification_metrics(y_true, y_pred, proba, 6)["f1_macro"]
    assert first == again
    assert first[0] < estimate < first[1]
    assert 0.03 < (first[1] - first[0]) / 2 < 0.07  # about ±4.5 points for n = 270


def test_bootstrap_values_are_the_metric_of_each_resample_whatever_the_chunk():
    # Speed is bench/'s business; here: every value is the plain metric on its resample of the
    # images, and chunking the resamples (bounded memory) changes nothing.
    y_true, y_pred, proba = synthetic_predictions(90, 3, 0.7, seed=8)
    values = bootstrap_distribution(y_true, y_pred, proba, BATCH_METRICS["f1_macro"], 40, seed=3, chunk=7)
    assert np.array_equal(values, bootstrap_distribution(y_true, y_pred, proba, BATCH_METRICS["f1_macro"], 40, seed=3))
    weights = resample_weights(90, 40, seed=3).astype(int)
    assert (weights.sum(axis=1) == 90).all()
    for b in (0, 17, 39):
        drawn = np.repeat(np.arange(90), weights[b])
        plain = classification_metrics(y_true[drawn], y_pred[drawn], proba[drawn], 3)["f1_macro"]
        assert values[b] == pytest.approx(plain)


# --------------------------------------------------------------------------- McNemar


def paired_results(both: int, only_a: int, only_b: int, neither: int):
    """Correctness arrays of two classifiers with the given 2x2 table."""
    a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    return np.array(a), np.array(b)


def test_mcnemar_exact_on_small_discordance():
    result = mcnemar(*paired_results(50, 10, 2, 8))
    assert (result["b"], result["c"]) == (10, 2)
    assert result["method"] == "exact binomial"
    assert result["p_value"] == pytest.approx(0.0386, abs=1e-4)  # 2 * (1 + 12 + 66) / 2**12


@pytest.mark.parametrize("b, c, method", [(17, 7, "exact"), (18, 7, "chi-square")])
def test_mcnemar_is_exact_below_25_discordant_pairs(b, c, method):
    """b + c = 24 takes the exact binomial test, 25 the chi-square; the two p-values differ enough
    here (24: 0.064 exact vs 0.066 chi-square; 25: 0.043 vs 0.045) that the test shows which ran."""
    from scipy import stats

    exact = 2 * stats.binom.cdf(min(b, c), b + c, 0.5)
    chi_square = stats.chi2.sf((abs(b - c) - 1) ** 2 / (b + c), df=1)
    assert abs(exact - chi_square) > 1e-3
    result = mcnemar(*paired_results(40, b, c, 9))
    assert (result["b"], result["c"]) == (b, c)
    if method == "exact":
        assert result["method"] == "exact binomial" and result["p_value"] == pytest.approx(exact, rel=1e-9)
    else:
        assert result["method"].startswith("chi-square") and result["p_value"] == pytest.approx(chi_square, rel=1e-9)


def test_mcnemar_chi_square_textbook_example():
    # Agresti's approval ratings: 794 / 150 / 86 / 570; corrected chi-square = 63**2 / 236.
    result = mcnemar(*paired_results(794, 150, 86, 570))
    assert result["method"].startswith("chi-square")
    assert result["statistic"] == pytest.approx(63 ** 2 / 236)
    assert result["p_value"] == pytest.approx(math.erfc(math.sqrt(63 ** 2 / 236 / 2)))  # chi2(1) tail
    assert result["p_value"] < 1e-4


def test_mcnemar_identical_classifiers_and_unpaired_input():
    same = np.array([True, False, True])
    assert mcnemar(same, same)["p_value"] == 1.0
    with pytest.raises(ValueError, match="paired"):
        mcnemar(same, same[:2])


# --------------------------------------------------------------------------- the stage


def write_fake_run(models_dir, tracking_uri, experiment_id, arch, condition, seed, accuracy):
    """A run folder with run.json and predictions.csv, and its MLflow run (none if tracking_uri
    is None); returns the run_id."""
    run_id = "0" * 32
    if tracking_uri is not None:
        client = mlflow.MlflowClient(tracking_uri)
        run_id = client.create_run(experiment_id, run_name=f"{arch}-{condition}-s{seed}").info.run_id
    rows = []
    for split, n in (("train", 60), ("val", 30), ("test", 45)):
        seed_of_split = zlib.crc32(f"{arch}{split}".encode())  # stable across processes, unlike hash()
        y_true, y_pred, proba = synthetic_predictions(n, len(CLASSES), accuracy, seed=seed_of_split)
        frame = pd.DataFrame({"path": [f"{split}/{i}.png" for i in range(n)], "split": split,
                              "label": y_true, "pred": y_pred})
        for k in range(len(CLASSES)):
            frame[f"prob_{k}"] = proba[:, k]
        rows.append(frame)
    run_dir = models_dir / f"{arch}-{condition}" / f"s{seed}"
    run_dir.mkdir(parents=True)
    pd.concat(rows).to_csv(run_dir / "predictions.csv", index=False)
    (run_dir / "run.json").write_text(json.dumps({
        "run_id": run_id, "experiment_id": experiment_id, "run_name": f"{arch}-{condition}-s{seed}",
        "architecture": arch, "condition": condition, "seed": seed, "class_names": CLASSES, "image_size": 224,
        "checkpoint": "best", "model_uri": f"runs:/{run_id}/model"}))
    return run_id


@pytest.fixture
def tracking(tmp_path):
    """A fresh SQLite MLflow store with an experiment whose artifacts stay in tmp_path.

    Uses a client rather than mlflow.set_tracking_uri, so no process-wide state changes.
    """
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = mlflow.MlflowClient(uri).create_experiment(
        "test", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, experiment_id


def test_evaluate_runs_logs_to_mlflow_and_writes_dvc_files(tmp_path, tracking):
    uri, experiment_id = tracking
    models, out = tmp_path / "models", tmp_path / "evaluation"
    run_ids = {name: write_fake_run(models, uri, experiment_id, arch, "frozen", 0, acc)
               for name, arch, acc in (("resnet18-frozen-s0", "resnet18", 0.8), ("vgg19-frozen-s0", "vgg19", 0.6))}

    runs = evaluate_runs(models, out, EvaluateParams(bootstrap_samples=200), uri)

    predictions = pd.read_csv(models / "resnet18-frozen" / "s0" / "predictions.csv")
    test = predictions[predictions["split"] == "test"]
    expected_accuracy = float(np.mean(test["label"] == test["pred"]))
    logged = mlflow.MlflowClient(uri).get_run(run_ids["resnet18-frozen-s0"])
    assert logged.data.metrics["test_accuracy"] == pytest.approx(expected_accuracy)
    assert {"val_f1_macro", "train_accuracy", "test_f1_coat", "test_accuracy_ci_low"} <= set(logged.data.metrics)
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run_ids["resnet18-frozen-s0"], "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/roc_curve.png",
            "evaluation/classification_report.json"} <= artifacts

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == set(run_ids)
    assert metrics["resnet18-frozen-s0"]["test"]["accuracy"] == pytest.approx(expected_accuracy)
    assert set(metrics["vgg19-frozen-s0"]) == {"train", "val", "test"}

    confusion = pd.read_csv(out / "plots" / "confusion" / "resnet18-frozen-s0.csv")
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == len(test)
    assert set(confusion["actual"]) <= set(CLASSES)
    roc = pd.read_csv(out / "plots" / "roc" / "vgg19-frozen-s0.csv")
    assert {"fpr", "tpr", "class"} <= set(roc.columns) and roc["tpr"].is_monotonic_increasing

    table = pd.read_csv(out / "runs.csv")
    assert list(table["run"]) == ["resnet18-frozen-s0", "vgg19-frozen-s0"] == list(runs["run"])
    assert table.loc[0, "run_id"] == run_ids["resnet18-frozen-s0"]
    assert table.loc[0, "test_accuracy_ci_low"] < expected_accuracy < table.loc[0, "test_accuracy_ci_high"]

    # What `make ui` opens: the experiment marked as model training, and the cells' view (one run a
    # cell here: each run's test metrics and interval as columns, the current runs only).
    tags = mlflow.MlflowClient(uri).get_experiment(experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags["mlflow.sharedViewState.transfer-study-cells"])
    assert view["searchFilter"] == "tags.pipeline_current = 'true'"
    assert view["selectedColumns"][:3] == ["metrics.`test_accuracy`", "metrics.`test_accuracy_ci_low`",
                                           "metrics.`test_accuracy_ci_high`"]
    assert set(view["selectedColumns"]) <= {f"metrics.`{m}`" for m in logged.data.metrics}


def test_the_current_runs_tag_moves_to_the_runs_each_evaluation_reads(tmp_path, tracking):
    uri, experiment_id = tracking
    models, out = tmp_path / "models", tmp_path / "evaluation"
    params = EvaluateParams(bootstrap_samples=50)
    first = write_fake_run(models, uri, experiment_id, "resnet18", "frozen", 0, 0.8)
    kept = write_fake_run(models, uri, experiment_id, "vgg19", "frozen", 0, 0.6)
    parent = mlflow.MlflowClient(uri).create_run(experiment_id, run_name="vgg19-frozen").info.run_id
    mlflow.MlflowClient(uri).set_tag(kept, "mlflow.parentRunId", parent)  # a study cell's row (several runs)
    evaluate_runs(models, out, params, uri)
    shutil.rmtree(models / "resnet18-frozen")  # a later `dvc repro` retrains one cell: a new run, same name
    second = write_fake_run(models, uri, experiment_id, "resnet18", "frozen", 0, 0.7)
    unrelated = mlflow.MlflowClient(uri).create_run(experiment_id, run_name="by hand").info.run_id

    evaluate_runs(models, out, params, uri)

    client = mlflow.MlflowClient(uri)
    current = client.search_runs([experiment_id], filter_string="tags.pipeline_current = 'true'")
    assert {r.info.run_id for r in current} == {second, kept, parent}
    assert "pipeline_current" not in client.get_run(first).data.tags
    assert "pipeline_current" not in client.get_run(unrelated).data.tags
    assert client.get_run(first).info.run_name == client.get_run(second).info.run_name  # both stay in the store


def test_evaluate_runs_without_runs_says_to_train(tmp_path):
    with pytest.raises(UserError, match="dvc repro train"):
        evaluate_runs(tmp_path / "models", tmp_path / "evaluation", EvaluateParams(), f"sqlite:///{tmp_path}/x.db")


def test_a_run_the_store_lacks_is_named_with_the_fix(tmp_path, tracking):
    uri, experiment_id = tracking
    write_fake_run(tmp_path / "models", None, experiment_id, "resnet18", "scratch", 0, 0.7)  # not in the store

    with pytest.raises(UserError) as error:
        evaluate_runs(tmp_path / "models", tmp_path / "evaluation", EvaluateParams(bootstrap_samples=50), uri)
    message = str(error.value)
    assert f"run resnet18-scratch-s0 names MLflow run {'0' * 32}, which the tracking store '{uri}'" in message
    assert "MLFLOW_TRACKING_URI" in message and "dvc repro train" in message


@pytest.mark.parametrize("column, value, message", [
    ("prob_2", None, "lacks column(s) prob_2"),
    ("prob_3", 0.0, "has column(s) prob_3 beyond the 3 classes"),
    ("label", 3, "column 'label' must hold class indices 0..2"),
    ("pred", -1, "column 'pred' must hold class indices 0..2"),
    ("pred", 1.5, "column 'pred' must hold class indices 0..2"),
    ("prob_0", "high", "prob_* columns hold empty or non-numeric values"),
    ("split", "holdout", "unknown split(s) ['holdout']"),
])
def test_malformed_predictions_name_the_file(tmp_path, column, value, message):
    write_fake_run(tmp_path / "models", None, "0", "resnet18", "scratch", 0, 0.7)  # fails before MLflow
    bad = tmp_path / "models" / "resnet18-scratch" / "s0" / "predictions.csv"
    frame = pd.read_csv(bad)
    if value is None:
        frame = frame.drop(columns=[column])
    else:
        frame[column] = frame[column].astype(object) if column in frame else value
        frame.loc[frame.index[-1], column] = value  # one row (a test row) is wrong
    frame.to_csv(bad, index=False)

    with pytest.raises(UserError) as error:
        evaluate_runs(tmp_path / "models", tmp_path / "evaluation", EvaluateParams(), f"sqlite:///{tmp_path}/x.db")
    assert message in str(error.value) and str(bad) in str(error.value)
    assert not (tmp_path / "x.db").exists()  # every run folder is checked before anything is logged


def test_training_rows_a_learning_curve_run_left_out_are_read_but_not_scored(tmp_path):
    from transfer_study.evaluate import read_predictions, split_arrays
    from transfer_study.split import UNUSED

    frame = pd.DataFrame({"path": ["a", "b", "c"], "split": ["train", UNUSED, "test"], "label": [0, 1, 1],
                          "pred": [0, 0, 1], "prob_0": [0.9, 0.6, 0.2], "prob_1": [0.1, 0.4, 0.8]})
    frame.to_csv(tmp_path / "predictions.csv", index=False)
    predictions = read_predictions(tmp_path / "predictions.csv", 2)
    assert len(split_arrays(predictions, "train")[0]) == 1 and len(split_arrays(predictions, "test")[0]) == 1
    frame.assign(split=["train", "holdout", "test"]).to_csv(tmp_path / "predictions.csv", index=False)
    with pytest.raises(UserError, match=r"unknown split\(s\) \['holdout'\]"):
        read_predictions(tmp_path / "predictions.csv", 2)
