"""Evaluate every trained run: metrics per split, bootstrap CIs, paired tests.

The core is pure (arrays in, numbers out): `classification_metrics`, the batched
metrics in `BATCH_METRICS`, `bootstrap_ci` and `mcnemar`. The stage
`evaluate_runs` is the edge: it reads run folders, logs to MLflow and writes the
files dvc.yaml lists (metrics.json, plots/, runs.csv).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score, roc_curve

from .config import EvaluateParams, UserError
from .cells import Cell
from .runs import find_run_dirs, read_run_info
from .split import UNUSED
from .tracking import PIPELINE_CURRENT_TAG, set_cells_view

SPLITS = ("train", "val", "test")
# Scalar metrics, in the order tables show them; each has a batched twin in BATCH_METRICS.
SCALAR_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "auc_macro")
EXACT_MCNEMAR_BELOW = 25  # b + c below this: exact binomial test; the chi-square approximation is poor


# --------------------------------------------------------------------------- plain metrics


def per_class_auc(y_true: np.ndarray, proba: np.ndarray, num_classes: int) -> tuple[list[float], str | None]:
    """One-vs-rest AUC for each class, and why any is undefined.

    Takes labels (n,) and probabilities (n, K). Gives back K AUCs (NaN for a class
    that is absent from `y_true`, or that is every label) and a reason string, or None.
    """
    aucs, missing = [], []
    for k in range(num_classes):
        positives = y_true == k
        if positives.all() or not positives.any():
            aucs.append(float("nan"))
            missing.append(k)
        else:
            aucs.append(float(roc_auc_score(positives, proba[:, k])))
    note = None
    if missing:
        note = (f"one-vs-rest AUC is undefined for class(es) {missing}: they are absent from "
                f"(or are all of) these {len(y_true)} labels")
    return aucs, note


def classification_metrics(y_true, y_pred, proba, num_classes: int) -> dict:
    """Accuracy, macro and per-class precision/recall/F1, one-vs-rest AUC, confusion matrix.

    Takes class indices `y_true`, `y_pred` (n,) and probabilities `proba` (n, K).
    Gives back a dict: the scalars in SCALAR_METRICS (auc_macro is NaN when a class is
    absent, with the reason in `auc_note`), `per_class` lists of length K
    (precision, recall, f1, auc, support), `confusion_matrix` (rows actual, columns
    predicted) and `n`. Precision of a never-predicted class counts as 0.
    """
    y_true, y_pred, proba = np.asarray(y_true), np.asarray(y_pred), np.asarray(proba, dtype=float)
    labels = list(range(num_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    aucs, note = per_class_auc(y_true, proba, num_classes)
    return {
        "n": int(len(y_true)),
        "accuracy": float(np.mean(y_true == y_pred)),
        "precision_macro": float(np.mean(precision)),
        "recall_macro": float(np.mean(recall)),
        "f1_macro": float(np.mean(f1)),
        "auc_macro": float("nan") if note else float(np.mean(aucs)),
        "auc_note": note,
        "per_class": {
            "precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
            "auc": aucs, "support": [int(s) for s in support],
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


# --------------------------------------------------------------------------- batched metrics
# Each takes `weights` (B, n): how often each image appears in each of B resamples,
# plus y_true, y_pred (n,) and proba (n, K); each gives back B values. A bootstrap
# resample is a row of counts, so B resamples cost a few matrix products, not a loop.
# With weights all ones they equal the plain metrics above.


def _one_hot(indices: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes)[indices]


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (sklearn's zero_division=0)."""
    out = np.zeros_like(numerator, dtype=float)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _class_counts(weights, y_true, y_pred, num_classes):
    """Weighted true positives, predicted counts and actual counts per class, each (B, K)."""
    actual = _one_hot(y_true, num_classes)
    predicted = _one_hot(y_pred, num_classes)
    true_positive = actual * (y_true == y_pred)[:, None]
    return weights @ true_positive, weights @ predicted, weights @ actual


def batch_accuracy(weights, y_true, y_pred, proba):
    """Accuracy of each resample."""
    return weights @ (y_true == y_pred).astype(float) / weights.sum(axis=1)


def batch_precision_macro(weights, y_true, y_pred, proba):
    """Macro precision of each resample."""
    tp, predicted, _ = _class_counts(weights, y_true, y_pred, proba.shape[1])
    return _safe_ratio(tp, predicted).mean(axis=1)


def batch_recall_macro(weights, y_true, y_pred, proba):
    """Macro recall of each resample."""
    tp, _, actual = _class_counts(weights, y_true, y_pred, proba.shape[1])
    return _safe_ratio(tp, actual).mean(axis=1)


def batch_f1_macro(weights, y_true, y_pred, proba):
    """Macro F1 of each resample (per class F1 = 2 tp / (predicted + actual))."""
    tp, predicted, actual = _class_counts(weights, y_true, y_pred, proba.shape[1])
    return _safe_ratio(2 * tp, predicted + actual).mean(axis=1)


def _batch_binary_auc(weights, positives, scores):
    """Weighted Mann-Whitney AUC of one class for each resample; NaN where a side is empty.

    AUC = P(score of a positive > score of a negative) + 0.5 P(tie), with each image
    counted as often as its weight. Images are sorted once; ties share a group.
    """
    order = np.argsort(scores, kind="stable")
    sorted_scores, sorted_pos = scores[order], positives[order]
    w = weights[:, order]
    neg_w, pos_w = w * ~sorted_pos, w * sorted_pos
    neg_up_to = np.cumsum(neg_w, axis=1)  # negatives at or before each position
    # first and last position of each image's tie group
    _, group, group_sizes = np.unique(sorted_scores, return_inverse=True, return_counts=True)
    group_end = np.cumsum(group_sizes) - 1
    group_start = group_end - group_sizes + 1
    start, end = group_start[group], group_end[group]
    neg_below = neg_up_to[:, start] - neg_w[:, start]
    neg_tied = neg_up_to[:, end] - neg_below
    wins = (pos_w * (neg_below + 0.5 * neg_tied)).sum(axis=1)
    pairs = pos_w.sum(axis=1) * neg_w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1), np.nan)


def batch_auc_macro(weights, y_true, y_pred, proba):
    """Macro one-vs-rest AUC of each resample; NaN where a class is absent from it."""
    per_class = [_batch_binary_auc(weights, y_true == k, proba[:, k]) for k in range(proba.shape[1])]
    return np.mean(per_class, axis=0)


BATCH_METRICS: dict[str, Callable] = {
    "accuracy": batch_accuracy,
    "precision_macro": batch_precision_macro,
    "recall_macro": batch_recall_macro,
    "f1_macro": batch_f1_macro,
    "auc_macro": batch_auc_macro,
}


# --------------------------------------------------------------------------- bootstrap and McNemar


def resample_weights(n_images: int, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, n_images) counts: row b says how often each image is drawn in resample b."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_images, size=(n_resamples, n_images))
    offsets = (np.arange(n_resamples) * n_images)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=n_resamples * n_images)
    return counts.reshape(n_resamples, n_images).astype(float)


def bootstrap_distribution(y_true, y_pred, proba, metric_fn: Callable, n: int, seed: int,
                           chunk: int = 500) -> np.ndarray:
    """The metric on `n` bootstrap resamples of the images (same seed → same resamples).

    `metric_fn` is batched (see BATCH_METRICS). Gives back an array of n values.
    Resamples are processed `chunk` at a time to bound memory.
    """
    y_true, y_pred, proba = np.asarray(y_true), np.asarray(y_pred), np.asarray(proba, dtype=float)
    weights = resample_weights(len(y_true), n, seed)
    parts = [metric_fn(weights[i:i + chunk], y_true, y_pred, proba) for i in range(0, n, chunk)]
    return np.concatenate(parts)


def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central `confidence` percentile interval of values (NaNs ignored; all NaN → NaN, NaN)."""
    values = np.asarray(values, dtype=float)
    if np.isnan(values).all():
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ci(y_true, y_pred, proba, metric_fn: Callable, n: int, confidence: float,
                 seed: int) -> tuple[float, float]:
    """Percentile bootstrap CI over test images: (low, high) at `confidence` (e.g. 0.95)."""
    values = bootstrap_distribution(y_true, y_pred, proba, metric_fn, n, seed)
    return percentile_interval(values, confidence)


def mcnemar(correct_a, correct_b) -> dict:
    """McNemar's test of two classifiers on the same images.

    Takes two boolean arrays (is each image classified correctly by A, by B), in the
    same image order. Gives back b (A right, B wrong), c (A wrong, B right), the
    statistic, the two-sided p-value and the method: exact binomial when b + c < 25,
    else chi-square with continuity correction.
    """
    correct_a, correct_b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if correct_a.shape != correct_b.shape:
        raise ValueError(f"McNemar needs paired results on the same images; "
                         f"got {correct_a.shape} and {correct_b.shape}")
    b = int(np.sum(correct_a & ~correct_b))
    c = int(np.sum(~correct_a & correct_b))
    if b + c < EXACT_MCNEMAR_BELOW:
        p_value = 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5).pvalue
        return {"b": b, "c": c, "statistic": float(min(b, c)), "p_value": float(p_value), "method": "exact binomial"}
    statistic = (abs(b - c) - 1) ** 2 / (b + c)
    return {"b": b, "c": c, "statistic": float(statistic), "p_value": float(stats.chi2.sf(statistic, df=1)),
            "method": "chi-square, continuity-corrected"}


# --------------------------------------------------------------------------- reading run folders


def run_name(info: dict) -> str:
    """`<arch>-<condition>-<variant>` (cells.Cell.name): one name per run folder, used in every output."""
    return Cell(info["architecture"], info["condition"], int(info["seed"]), int(info["repeat"]),
                float(info["fraction"])).name


def read_predictions(path: Path, num_classes: int) -> pd.DataFrame:
    """predictions.csv checked against the run-folder format; a UserError names the file at fault."""
    path = Path(path)
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise UserError(f"cannot read predictions file '{path}': {exc}") from None
    prob_columns = [f"prob_{k}" for k in range(num_classes)]
    missing = [c for c in ("path", "split", "label", "pred", *prob_columns) if c not in frame.columns]
    if missing:
        raise UserError(f"predictions file '{path}' lacks column(s) {', '.join(missing)} "
                        f"({num_classes} classes in run.json); rerun `dvc repro train` for this run")
    extra = sorted(set(c for c in frame.columns if c.startswith("prob_")) - set(prob_columns))
    if extra:
        raise UserError(f"predictions file '{path}' has column(s) {', '.join(extra)} beyond the "
                        f"{num_classes} classes in run.json; rerun `dvc repro train` for this run")
    for column in ("label", "pred"):
        values = pd.to_numeric(frame[column], errors="coerce")
        if values.isna().any() or (values % 1 != 0).any() or not values.between(0, num_classes - 1).all():
            raise UserError(f"predictions file '{path}': column '{column}' must hold class indices "
                            f"0..{num_classes - 1}")
        frame[column] = values.astype(int)
    probs = frame[prob_columns].apply(pd.to_numeric, errors="coerce")
    if probs.isna().any().any():
        raise UserError(f"predictions file '{path}': prob_* columns hold empty or non-numeric values")
    frame[prob_columns] = probs
    # UNUSED: training images a learning-curve run left out (split.cell_manifest); predicted, not scored.
    unknown = sorted(set(frame["split"]) - set(SPLITS) - {UNUSED})
    if unknown:
        raise UserError(f"predictions file '{path}': unknown split(s) {unknown}; expected {', '.join(SPLITS)}")
    if not (frame["split"] == "test").any():
        raise UserError(f"predictions file '{path}' has no test rows; check the split manifest")
    return frame


def split_arrays(predictions: pd.DataFrame, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y_true, y_pred, proba) of one split, in file order."""
    rows = predictions[predictions["split"] == split]
    prob_columns = [c for c in predictions.columns if c.startswith("prob_")]
    prob_columns.sort(key=lambda c: int(c.split("_")[1]))
    return rows["label"].to_numpy(), rows["pred"].to_numpy(), rows[prob_columns].to_numpy(dtype=float)


# --------------------------------------------------------------------------- outputs


def macro_roc_curve(y_true: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Macro-average one-vs-rest ROC: mean TPR of the defined class curves on a shared FPR grid."""
    curves = []
    for k in range(proba.shape[1]):
        positives = y_true == k
        if positives.any() and not positives.all():
            fpr, tpr, _ = roc_curve(positives, proba[:, k])
            curves.append((fpr, tpr))
    if not curves:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    grid = np.unique(np.concatenate([fpr for fpr, _ in curves]))
    return grid, np.mean([np.interp(grid, fpr, tpr) for fpr, tpr in curves], axis=0)


def save_confusion_png(matrix, class_names: list[str], title: str, path: Path) -> None:
    """Confusion matrix as a heat map with counts (rows actual, columns predicted)."""
    from matplotlib.figure import Figure  # Figure without pyplot: no GUI backend, no global state

    matrix = np.asarray(matrix)
    fig = Figure(figsize=(1.2 + 0.8 * len(class_names), 1 + 0.8 * len(class_names)), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(matrix, cmap="Blues")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center",
                color="white" if count > matrix.max() / 2 else "black")
    fig.savefig(path, dpi=100)


def save_roc_png(y_true, proba, class_names: list[str], title: str, path: Path) -> None:
    """One-vs-rest ROC curve of every class present, plus the macro average."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.add_subplot()
    for k, name in enumerate(class_names):
        positives = y_true == k
        if positives.any() and not positives.all():
            fpr, tpr, _ = roc_curve(positives, proba[:, k])
            ax.plot(fpr, tpr, linewidth=1, label=name)
    fpr, tpr = macro_roc_curve(y_true, proba)
    ax.plot(fpr, tpr, color="black", linewidth=2, label="macro average")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    fig.savefig(path, dpi=100)


def classification_report_text(metrics: dict, class_names: list[str], split: str) -> str:
    """Per-class precision/recall/F1/AUC/support as a fixed-width table."""
    per_class = metrics["per_class"]
    width = max(len(n) for n in [*class_names, "macro"])
    lines = [f"{split} split, {metrics['n']} images",
             f"{'class':<{width}}  precision  recall     f1    auc  support"]
    for k, name in enumerate(class_names):
        lines.append(f"{name:<{width}}  {per_class['precision'][k]:9.4f}  {per_class['recall'][k]:6.4f}  "
                     f"{per_class['f1'][k]:.4f}  {per_class['auc'][k]:.4f}  {per_class['support'][k]:7d}")
    lines.append(f"{'macro':<{width}}  {metrics['precision_macro']:9.4f}  {metrics['recall_macro']:6.4f}  "
                 f"{metrics['f1_macro']:.4f}  {metrics['auc_macro']:.4f}  {metrics['n']:7d}")
    lines.append(f"accuracy {metrics['accuracy']:.4f}")
    if metrics["auc_note"]:
        lines.append(f"note: {metrics['auc_note']}")
    return "\n".join(lines) + "\n"


def metric_key(*parts: str) -> str:
    """An MLflow metric name: parts joined by '_', characters MLflow rejects replaced by '_'."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", "_".join(parts))


def mlflow_metrics(split_metrics: dict[str, dict], test_cis: dict[str, tuple[float, float]],
                   class_names: list[str]) -> dict[str, float]:
    """Flat MLflow metrics: `<split>_<metric>`, `<split>_<stat>_<class>`, `test_<metric>_ci_low/high`.

    Undefined (NaN) values are left out; the reason is logged as a tag instead.
    """
    flat: dict[str, float] = {}
    for split, metrics in split_metrics.items():
        for name in SCALAR_METRICS:
            flat[metric_key(split, name)] = metrics[name]
        for stat in ("precision", "recall", "f1", "auc"):
            for name, value in zip(class_names, metrics["per_class"][stat]):
                flat[metric_key(split, stat, name)] = value
    for name, (low, high) in test_cis.items():
        flat[metric_key("test", name, "ci_low")] = low
        flat[metric_key("test", name, "ci_high")] = high
    return {k: float(v) for k, v in flat.items() if v is not None and math.isfinite(v)}


def log_to_mlflow(client, info: dict, metrics: dict[str, float], notes: dict[str, str], artifact_dir: Path,
                  tracking_uri: str) -> None:
    """Log metrics, notes (tags) and the artifact folder to the run named in run.json."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    run_id = info["run_id"]
    try:
        client.get_run(run_id)
    except MlflowException:
        raise UserError(f"run {run_name(info)} names MLflow run {run_id}, which the tracking store "
                        f"'{tracking_uri}' does not hold; was it trained with another MLFLOW_TRACKING_URI? "
                        f"Set it back, or retrain with `dvc repro train`") from None
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in sorted(metrics.items())])
    for key, note in notes.items():
        client.set_tag(run_id, key, note)
    client.log_artifacts(run_id, str(artifact_dir), artifact_path="evaluation")


def mark_current_runs(client, run_ids: list[str]) -> list[str]:
    """Tag `run_ids` (the runs this evaluation read) and their parent runs (a study cell's row when
    it has several runs) PIPELINE_CURRENT_TAG=true, and remove the tag from every other run of
    their experiments: older runs of the same cells, left by earlier `dvc repro`s, stay in the
    experiment but drop out of the UI's filter. Gives back the cleared runs."""
    runs = [client.get_run(run_id) for run_id in run_ids]
    experiment_ids = sorted({run.info.experiment_id for run in runs})
    parents = {run.data.tags.get("mlflow.parentRunId") for run in runs} - {None}
    run_ids = [*run_ids, *sorted(parents)]
    for run_id in run_ids:
        client.set_tag(run_id, PIPELINE_CURRENT_TAG, "true")
    cleared, page_token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=f"tags.{PIPELINE_CURRENT_TAG} = 'true'",
                                  max_results=1000, page_token=page_token)
        for run in page:
            if run.info.run_id not in run_ids:
                client.delete_tag(run.info.run_id, PIPELINE_CURRENT_TAG)
                cleared.append(run.info.run_id)
        page_token = page.token
        if not page_token:
            return cleared


def json_ready(value):
    """NaN → None, recursively, so metrics.json is valid JSON that `dvc metrics show` reads."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def fresh_dir(path: Path) -> Path:
    """An empty folder at path (our own output: stale files from removed runs must not linger)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# --------------------------------------------------------------------------- the stage


def evaluate_run(run_dir: Path, out_dirs: dict[str, Path], params: EvaluateParams) -> tuple[dict, dict, dict]:
    """Metrics, CIs and output files for one run folder.

    Gives back (run.json info, metrics per split, test CIs per scalar metric) and writes
    the DVC plot CSVs and the per-run artifact folder `runs/<run>/`.
    """
    info = read_run_info(run_dir)
    class_names = list(info["class_names"])
    predictions = read_predictions(run_dir / "predictions.csv", len(class_names))
    name = run_name(info)
    split_metrics = {}
    for split in SPLITS:
        y_true, y_pred, proba = split_arrays(predictions, split)
        if len(y_true):
            split_metrics[split] = classification_metrics(y_true, y_pred, proba, len(class_names))
    y_true, y_pred, proba = split_arrays(predictions, "test")
    test_cis = {metric: bootstrap_ci(y_true, y_pred, proba, BATCH_METRICS[metric], params.bootstrap_samples,
                                     params.confidence, params.seed)
                for metric in SCALAR_METRICS}

    names = np.asarray(class_names)
    pd.DataFrame({"actual": names[y_true], "predicted": names[y_pred]}).to_csv(
        out_dirs["confusion"] / f"{name}.csv", index=False)
    fpr, tpr = macro_roc_curve(y_true, proba)
    pd.DataFrame({"fpr": fpr, "tpr": tpr, "class": "macro"}).to_csv(out_dirs["roc"] / f"{name}.csv", index=False)

    artifact_dir = out_dirs["runs"] / name
    artifact_dir.mkdir()
    test = split_metrics["test"]
    save_confusion_png(test["confusion_matrix"], class_names, f"{name}: test confusion matrix",
                       artifact_dir / "confusion_matrix.png")
    save_roc_png(y_true, proba, class_names, f"{name}: test ROC (one-vs-rest)", artifact_dir / "roc_curve.png")
    report = "".join(classification_report_text(m, class_names, s) + "\n" for s, m in split_metrics.items())
    (artifact_dir / "classification_report.txt").write_text(report)
    (artifact_dir / "classification_report.json").write_text(json.dumps(json_ready(
        {"class_names": class_names, "splits": split_metrics,
         "test_ci": {k: list(v) for k, v in test_cis.items()}, "confidence": params.confidence}), indent=2))
    return info, split_metrics, test_cis


def runs_row(run_dir: Path, models_dir: Path, info: dict, split_metrics: dict, test_cis: dict) -> dict:
    """One runs.csv row: identity, where the run folder is, and every split's scalar metrics."""
    train_per_class = info["train_per_class"]
    if train_per_class is None:  # a run folder from before run.json recorded it
        train_per_class = split_metrics.get("train", {}).get("n", 0) / len(info["class_names"])
    row = {"run": run_name(info), "architecture": info["architecture"], "condition": info["condition"],
           "seed": info["seed"], "repeat": info["repeat"], "fraction": info["fraction"],
           "train_per_class": train_per_class, "run_id": info["run_id"], "model_uri": info["model_uri"],
           "run_dir": run_dir.relative_to(models_dir).as_posix()}
    for split in SPLITS:
        row[f"n_{split}"] = split_metrics[split]["n"] if split in split_metrics else 0
        for metric in SCALAR_METRICS:
            row[f"{split}_{metric}"] = split_metrics.get(split, {}).get(metric, float("nan"))
    for metric, (low, high) in test_cis.items():
        row[f"test_{metric}_ci_low"], row[f"test_{metric}_ci_high"] = low, high
    return row


def evaluate_runs(models_dir: Path, out_dir: Path, params: EvaluateParams, tracking_uri: str) -> pd.DataFrame:
    """The `evaluate` stage: every run folder under models_dir → MLflow and out_dir.

    Writes out_dir/metrics.json (run → split → metric), out_dir/plots/confusion/<run>.csv
    (actual,predicted on test), out_dir/plots/roc/<run>.csv (fpr,tpr,class; macro average
    on test), out_dir/runs/<run>/ (PNGs and classification report, also logged to the
    run in MLflow) and out_dir/runs.csv, which it also gives back. The runs it read (and their parents) are tagged
    `pipeline_current=true`, and no other run of their experiments is (mark_current_runs).
    """
    from mlflow import MlflowClient

    models_dir, out_dir = Path(models_dir), Path(out_dir)
    run_dirs = find_run_dirs(models_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_dirs = {"confusion": fresh_dir(out_dir / "plots" / "confusion"), "roc": fresh_dir(out_dir / "plots" / "roc"),
                "runs": fresh_dir(out_dir / "runs")}
    # Read and check every run folder before logging anything, so bad input leaves MLflow untouched.
    results = [evaluate_run(run_dir, out_dirs, params) for run_dir in run_dirs]
    client = MlflowClient(tracking_uri=tracking_uri)
    rows, nested = [], {}
    for run_dir, (info, split_metrics, test_cis) in zip(run_dirs, results):
        name = run_name(info)
        notes = {f"evaluation.auc_note.{s}": m["auc_note"] for s, m in split_metrics.items() if m["auc_note"]}
        log_to_mlflow(client, info, mlflow_metrics(split_metrics, test_cis, info["class_names"]), notes,
                      out_dirs["runs"] / name, tracking_uri)
        nested[name] = {s: {k: m[k] for k in SCALAR_METRICS} for s, m in split_metrics.items()}
        rows.append(runs_row(run_dir, models_dir, info, split_metrics, test_cis))
    mark_current_runs(client, [info["run_id"] for info, _, _ in results])
    (out_dir / "metrics.json").write_text(json.dumps(json_ready(nested), indent=2) + "\n")
    runs = pd.DataFrame(rows)
    runs.to_csv(out_dir / "runs.csv", index=False)
    summarised = log_group_summaries(client, runs, params.confidence)
    for experiment_id in sorted({str(info["experiment_id"]) for info, _, _ in results if info.get("experiment_id")}):
        set_cells_view(client, experiment_id, CELL_SUMMARY_COLUMNS if summarised else RUN_COLUMNS)
    return runs


# The columns `make ui` opens the runs table with: a cell's parent run's summary when cells have
# several runs (log_group_summaries), else each run's test metrics and bootstrap interval.
CELL_SUMMARY_COLUMNS = [f"{m}_{stat}" for m in ("test_accuracy", "test_f1_macro") for stat in ("mean", "low", "high")]
RUN_COLUMNS = ["test_accuracy", "test_accuracy_ci_low", "test_accuracy_ci_high", "test_f1_macro",
               "test_f1_macro_ci_low", "test_f1_macro_ci_high"]


def log_group_summaries(client, runs: pd.DataFrame, confidence: float) -> bool:
    """On each study cell's parent run (its runs' `mlflow.parentRunId`), the mean test accuracy and
    macro-F1 over its seeds and splits at the full training set, with a t-interval: the one row
    per cell that `mlflow ui` shows at the top. Gives back whether there were such cells."""
    from mlflow.entities import Metric

    from .analysis import cell_summary

    full = runs[runs["fraction"] == 1.0]
    if full.groupby(["architecture", "condition"]).size().max() < 2:
        return False  # one run per cell: no parent runs, nothing to summarise
    now = int(time.time() * 1000)
    for row in cell_summary(full, confidence).to_dict("records"):
        members = full[(full["architecture"] == row["architecture"]) & (full["condition"] == row["condition"])]
        parents = {client.get_run(run_id).data.tags.get("mlflow.parentRunId") for run_id in members["run_id"]}
        metrics = {"runs": row["n_runs"]} | {f"{m}_{stat}": row[m if stat == "mean" else f"{m}_{stat}"]
                                             for m in ("test_accuracy", "test_f1_macro")
                                             for stat in ("mean", "low", "high")}
        for parent in parents - {None}:
            # rounded: the UI shows a metric's full float (0.7899999999999999)
            client.log_batch(parent, metrics=[Metric(k, round(float(v), 4), now, 0)
                                              for k, v in metrics.items() if pd.notna(v)])
    return True
