"""Stage `register`: register every run's model, build the served champion, point `champion` at it.

1. Every run's model is registered (one version per run, tagged with its metrics).
2. What to serve is chosen on validation only (champion.py): among the MAX_CANDIDATES best runs
   on validation macro-F1 (then validation accuracy, then run name, so ties resolve the same way
   every time), test-time flips per run, the ensemble's members, and a temperature.
3. The served model is logged and registered as a version of the same registered model, and
   `champion` moves to it: one run → an ImageClassifier with `tta` and `temperature` in its
   config.json, logged as `calibrated_model` in that run; several → an EnsembleClassifier in a
   new run `ensemble` (params: the members and their run ids; metrics: `served_*`).
4. Its calibration on test (ECE, reliability diagram before and after temperature scaling) is
   written beside champion.json and logged to the served model's run.
The test split never enters a choice: it stays an unbiased estimate of the served model.
Rerunning with unchanged inputs changes nothing in the registry: runs are found by run id or
model URI, the served model by a fingerprint of what it serves (tag `served_fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .config import UserError

CHAMPION, PREVIOUS = "champion", "previous"
REQUIRED_COLUMNS = ("run", "architecture", "condition", "seed", "run_id", "model_uri", "run_dir",
                    "val_f1_macro", "val_accuracy", "test_f1_macro", "test_accuracy")
TAGGED_METRICS = ("val_f1_macro", "val_accuracy", "test_f1_macro", "test_accuracy")
SERVED_TAG = "served_fingerprint"  # on the served model's versions: what they serve, for idempotent reruns
CHOSEN_ON = ("validation only: runs ranked by macro-F1 (ties: accuracy, then run name); test-time flips "
             "per run when they raise macro-F1 (or keep it and lower log-loss); members by greedy forward "
             "selection on the mean probabilities' macro-F1; temperature by log-loss")


@dataclass(frozen=True)
class RegisterPaths:
    """Where the register stage reads and writes."""

    runs_csv: Path  # evaluate's runs.csv
    models_dir: Path  # run folders; runs.csv's run_dir is relative to it
    root: Path  # project root: predictions.csv's paths (the crops) are relative to it
    out_dir: Path  # champion.json, calibration.json, reliability.png


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


def rank_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that may be served, best first: validation macro-F1, then validation accuracy, then
    run name. Test metrics play no part.

    Runs trained on another split repeat or on part of the training split (runs.csv columns
    `repeat`, `fraction`, when present) see other validation images and are left out. Raises
    UserError when no run has validation metrics.
    """
    pool = runs
    if "repeat" in pool.columns:
        pool = pool[pool["repeat"] == 0]
    if "fraction" in pool.columns and not pool.empty:
        pool = pool[pool["fraction"] == pool["fraction"].max()]
    scored = pool.dropna(subset=["val_f1_macro"])
    if scored.empty:
        raise UserError("no run has validation metrics, and the champion is chosen on validation only; "
                        "give the split a val set (split.val in params.yaml) and rerun")
    return scored.assign(_acc=scored["val_accuracy"].fillna(-1.0)).sort_values(
        ["val_f1_macro", "_acc", "run"], ascending=[False, False, True], kind="stable").drop(columns="_acc")


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
    """The lowest version registered from this run's trained model (by run_id, or by source =
    model_uri; a served model logged into the run does not count); None if none."""
    matches = [v for v in versions if SERVED_TAG not in v.tags
               and (v.run_id == row["run_id"] or v.source == row["model_uri"])]
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


# --------------------------------------------------------------------------- the candidates' evidence


@dataclass(frozen=True)
class SplitPredictions:
    """One split of a run's predictions.csv, in file order: crop paths, labels, probabilities."""

    paths: tuple[str, ...]
    labels: np.ndarray
    probs: np.ndarray


@dataclass(frozen=True)
class CandidateRun:
    """A run that may be served: its runs.csv row, its logged model's files, its predictions."""

    row: pd.Series
    weights: Path
    config_path: Path
    val: SplitPredictions
    test: SplitPredictions

    @property
    def name(self) -> str:
        return str(self.row["run"])

    @property
    def config(self) -> dict:
        return json.loads(self.config_path.read_text())


def split_predictions(predictions: pd.DataFrame, split: str) -> SplitPredictions:
    from .evaluate import split_arrays

    labels, _, probs = split_arrays(predictions, split)
    return SplitPredictions(tuple(predictions.loc[predictions["split"] == split, "path"]), labels, probs)


def load_candidate(row: pd.Series, models_dir: Path, download_dir: Path) -> CandidateRun:
    """A run's predictions.csv and its logged model's weights and config.json (downloaded)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from .evaluate import read_predictions
    from .runs import read_run_info
    from .serve import classifier_files

    run_dir = Path(models_dir) / row["run_dir"]
    predictions = read_predictions(run_dir / "predictions.csv", len(read_run_info(run_dir)["class_names"]))
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=row["model_uri"],
                                                    dst_path=str(Path(download_dir) / row["run"]))
    except MlflowException as exc:
        raise UserError(f"cannot download the model of run {row['run']} ({row['model_uri']}): {exc.message}; "
                        f"was it trained against this tracking store?") from None
    weights, config_path = classifier_files(Path(local))
    return CandidateRun(row, weights, config_path, split_predictions(predictions, "val"),
                        split_predictions(predictions, "test"))


def check_same_images(candidates: list[CandidateRun]) -> None:
    """Every candidate must predict the same val and test images in the same order, with the same classes."""
    first = candidates[0]
    for other in candidates[1:]:
        for split in ("val", "test"):
            a, b = getattr(first, split), getattr(other, split)
            if a.paths != b.paths or not np.array_equal(a.labels, b.labels):
                raise UserError(f"runs {first.name} and {other.name} list different {split} images in their "
                                f"predictions.csv; retrain them on one split manifest (`dvc repro train`)")
        if other.config["class_names"] != first.config["class_names"]:
            raise UserError(f"runs {first.name} and {other.name} have different classes; "
                            f"retrain them on one split manifest (`dvc repro train`)")


def mirrored(candidate: CandidateRun, split: str, root: Path) -> np.ndarray:
    """The candidate's network on the mirror images of one split's crops."""
    from .champion import mirror_probabilities
    from .serve import ImageClassifier

    crops = [Path(root) / p for p in getattr(candidate, split).paths]
    missing = [p for p in crops if not p.is_file()]
    if missing:
        raise UserError(f"{len(missing)} crop(s) named in {candidate.name}'s predictions.csv are missing, "
                        f"e.g. '{missing[0]}'; rerun `dvc repro preprocess split`")
    return mirror_probabilities(ImageClassifier().load(candidate.weights, candidate.config_path), crops)


# --------------------------------------------------------------------------- the served model's numbers


def split_report(probs: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    """Accuracy and macro-F1 of the served probabilities (temperature keeps the argmax), and ECE and
    log-loss before and after temperature scaling."""
    from .calibration import ECE_BINS, expected_calibration_error, negative_log_likelihood, temperature_scaled
    from .evaluate import classification_metrics

    scaled = temperature_scaled(probs, temperature)
    metrics = classification_metrics(labels, probs.argmax(1), probs, probs.shape[1])
    return {"n": int(len(labels)), "accuracy": metrics["accuracy"], "f1_macro": metrics["f1_macro"],
            "ece_before": expected_calibration_error(probs, labels, ECE_BINS),
            "ece_after": expected_calibration_error(scaled, labels, ECE_BINS),
            "nll_before": negative_log_likelihood(probs, labels), "nll_after": negative_log_likelihood(scaled, labels)}


def write_calibration_report(val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                             choice, out_dir: Path) -> dict:
    """calibration.json (the temperature served, the one fitted and, when they differ, why; val and
    test: accuracy, macro-F1, ECE and log-loss before/after) and reliability.png (test, before and
    after) in out_dir; gives back calibration.json's content. `choice`: a calibration.TemperatureChoice."""
    from .calibration import ECE_BINS, reliability_diagram, temperature_scaled

    temperature = choice.served
    report = {"temperature": temperature, "temperature_fitted": choice.fitted,
              "temperature_applied": choice.note is None, "temperature_note": choice.note,
              "temperature_at_bound": choice.at_bound, "val_errors": choice.errors, "ece_bins": ECE_BINS,
              "val": split_report(*val, temperature), "test": split_report(*test, temperature)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "calibration.json").write_text(json.dumps(report, indent=2) + "\n")
    probs, labels = test
    figure = reliability_diagram({"before (T = 1)": (probs, labels),
                                  f"after (T = {temperature:g})": (temperature_scaled(probs, temperature), labels)},
                                 f"served champion on test ({len(labels)} images)")
    figure.savefig(out_dir / "reliability.png", dpi=100)
    return report


def served_metrics(report: dict) -> dict[str, float]:
    """MLflow metrics of a served model: `served_<split>_<number>` and `served_temperature`."""
    flat = {f"served_{split}_{key}": float(value) for split in ("val", "test")
            for key, value in report[split].items() if key != "n"}
    return flat | {"served_temperature": float(report["temperature"])}


# --------------------------------------------------------------------------- the served model in the registry


def served_spec(choice, candidates: dict[str, CandidateRun]) -> dict:
    """What the served model is: classes, temperature, and each member's run, model and flips."""
    first = candidates[choice.members[0]]
    return {"class_names": first.config["class_names"], "temperature": choice.temperature,
            "members": [{"run": run, "run_id": str(candidates[run].row["run_id"]),
                         "model_uri": str(candidates[run].row["model_uri"]), "tta": choice.tta[run]}
                        for run in choice.members]}


def fingerprint(spec: dict) -> str:
    """A short hash of the served model's spec: equal specs are the same model."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def served_tags(spec: dict, report: dict) -> dict[str, str]:
    members = spec["members"]
    return {SERVED_TAG: fingerprint(spec), "kind": "ensemble" if len(members) > 1 else "single",
            "run_name": "ensemble" if len(members) > 1 else members[0]["run"],
            "members": ",".join(m["run"] for m in members),
            "tta": ",".join(m["run"] for m in members if m["tta"]) or "none",
            "temperature": f"{spec['temperature']:g}", "temperature_fitted": f"{report['temperature_fitted']:g}",
            "calibration": report["temperature_note"] or "temperature fitted on validation and applied",
            "val_f1_macro": f"{report['val']['f1_macro']:.6f}", "val_accuracy": f"{report['val']['accuracy']:.6f}",
            "test_f1_macro": f"{report['test']['f1_macro']:.6f}", "test_accuracy": f"{report['test']['accuracy']:.6f}",
            "test_ece": f"{report['test']['ece_after']:.6f}"}


REPORT_FILES = ("calibration.json", "reliability.png")


def log_served_model(spec: dict, candidates: dict[str, CandidateRun], report: dict, out_dir: Path):
    """Log the served model, its `served_*` metrics and its calibration report (REPORT_FILES in
    out_dir, under `calibration/`); gives back MLflow's ModelInfo.

    One member: an ImageClassifier (`calibrated_model`) in that member's run. Several: an
    EnsembleClassifier (`model`) in a new run `ensemble` of the first member's experiment, with
    the members, their run ids and flips as params.
    """
    import mlflow

    from .ensemble import log_ensemble_model
    from .serve import log_calibrated_model, with_serving_options

    members = spec["members"]
    if len(members) == 1:
        member = members[0]
        run = mlflow.start_run(run_id=member["run_id"])
    else:
        experiment_id = mlflow.MlflowClient().get_run(members[0]["run_id"]).info.experiment_id
        run = mlflow.start_run(experiment_id=experiment_id, run_name="ensemble")
    with run:
        if len(members) == 1:
            candidate = candidates[member["run"]]
            config = with_serving_options(candidate.config, member["tta"], spec["temperature"])
            info = log_calibrated_model(candidate.weights, config, "calibrated_model")
        else:
            mlflow.log_params({"ensemble.members": ",".join(m["run"] for m in members),
                               "ensemble.temperature": spec["temperature"],
                               **{f"member.{m['run']}.run_id": m["run_id"] for m in members},
                               **{f"member.{m['run']}.tta": m["tta"] for m in members}})
            info = log_ensemble_model([(candidates[m["run"]].weights,
                                        with_serving_options(candidates[m["run"]].config, m["tta"], 1.0))
                                       for m in members], spec)
        mlflow.log_metrics(served_metrics(report))
        for name in REPORT_FILES:
            mlflow.log_artifact(str(Path(out_dir) / name), artifact_path="calibration")
    return info


def register_served(client, name: str, spec: dict, candidates: dict[str, CandidateRun], report: dict,
                    versions: list, out_dir: Path) -> tuple[str, str]:
    """(version, run id) of the served model, logging and registering it only when no version
    carries its fingerprint."""
    import mlflow

    tags = served_tags(spec, report)
    found = [v for v in versions if v.tags.get(SERVED_TAG) == tags[SERVED_TAG]]
    if found:
        version = min(found, key=lambda v: int(v.version))
    else:
        info = log_served_model(spec, candidates, report, out_dir)
        version = mlflow.register_model(info.model_uri, name, tags={SERVED_TAG: tags[SERVED_TAG]})
    sync_tags(client, name, str(version.version), tags)
    return str(version.version), str(version.run_id)


# --------------------------------------------------------------------------- the stage


def promote_champion(paths: RegisterPaths, registered_model: str, tracking_uri: str) -> dict:
    """The `register` stage: register each run's model, build and register the served model
    chosen on validation, move @champion to it, and write champion.json, calibration.json and
    reliability.png to paths.out_dir.

    Gives back champion.json's content: the registered name, the served version, its run (id
    and name), kind (single or ensemble), members (run, run id, registered version of its
    trained model, tta), temperature, the served model's val/test accuracy, macro-F1 and test
    ECE, the best single run, the previous champion and every run's version. Points MLflow's
    process-wide tracking URI at tracking_uri.
    """
    import mlflow
    from mlflow import MlflowClient

    from .champion import MAX_CANDIDATES, Candidate, choose_served, served_probabilities

    runs = read_runs(paths.runs_csv)
    ranked = rank_runs(runs)  # before any registry write: fail early without val metrics
    # mlflow.register_model is fluent: it reads the process-wide tracking URI (as train does).
    # The registry follows the tracking URI unless MLFLOW_REGISTRY_URI says otherwise.
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    out_dir = Path(paths.out_dir)
    with tempfile.TemporaryDirectory() as download_dir:
        candidates = {str(row["run"]): load_candidate(row, paths.models_dir, Path(download_dir))
                      for _, row in ranked.head(MAX_CANDIDATES).iterrows()}
        check_same_images(list(candidates.values()))
        val_labels = next(iter(candidates.values())).val.labels
        val_mirrored = {run: mirrored(c, "val", paths.root) for run, c in candidates.items()}
        choice = choose_served([Candidate(run, c.val.probs, val_mirrored[run]) for run, c in candidates.items()],
                               val_labels)
        # Only now, with the choice made, does anything look at the test split.
        members = {run: candidates[run] for run in choice.members}
        val = served_probabilities({run: (c.val.probs, val_mirrored[run]) for run, c in members.items()}, choice.tta)
        test = served_probabilities({run: (c.test.probs, mirrored(c, "test", paths.root) if choice.tta[run] else None)
                                     for run, c in members.items()}, choice.tta)
        test_labels = next(iter(members.values())).test.labels
        report = write_calibration_report((val, val_labels), (test, test_labels), choice.calibration, out_dir)

        versions = existing_versions(client, registered_model)
        run_versions = {}
        for _, row in runs.sort_values("run").iterrows():
            version = register_run(client, registered_model, row, versions)
            sync_tags(client, registered_model, version, version_tags(row))
            run_versions[row["run"]] = version
        spec = served_spec(choice, candidates)
        served_version, served_run_id = register_served(client, registered_model, spec, candidates, report,
                                                        versions, out_dir)

    previous = move_champion(client, registered_model, served_version)
    summary = {
        "name": registered_model, "version": int(served_version), "run_id": served_run_id,
        "run": "ensemble" if len(choice.members) > 1 else choice.members[0],
        "kind": "ensemble" if len(choice.members) > 1 else "single",
        "members": [{"run": m["run"], "run_id": m["run_id"], "version": int(run_versions[m["run"]]),
                     "tta": m["tta"]} for m in spec["members"]],
        "temperature": choice.temperature, "temperature_fitted": choice.calibration.fitted,
        "temperature_note": choice.calibration.note,
        "val_f1": report["val"]["f1_macro"], "val_accuracy": report["val"]["accuracy"],
        "test_f1": report["test"]["f1_macro"], "test_accuracy": report["test"]["accuracy"],
        "test_ece_before": report["test"]["ece_before"], "test_ece_after": report["test"]["ece_after"],
        "best_single": {"run": choice.best_single, "val_f1": choice.best_single_val_f1},
        "previous_version": int(previous) if previous is not None else None,
        "chosen_on": CHOSEN_ON,
        "versions": {run: int(v) for run, v in run_versions.items()},
    }
    (out_dir / "champion.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
