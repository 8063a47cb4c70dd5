"""tracking.py: the dataset input each training run logs (the UI's Dataset column)."""

from __future__ import annotations

import pandas as pd
from mlflow.tracking import MlflowClient

from transfer_study import tracking


def _manifest() -> pd.DataFrame:
    return pd.DataFrame({"path": ["data/cropped/coat/a.png", "data/cropped/shirt/b.png", "data/cropped/coat/c.png"],
                         "label": ["coat", "shirt", "coat"], "split": ["train", "val", "test"],
                         "sha256": ["1" * 64, "2" * 64, "3" * 64]})


def test_dataset_digest_changes_with_the_data_version_and_the_split_not_the_row_order():
    manifest = _manifest()
    digest = tracking.dataset_digest("0123456789abcdef0123.dir", manifest)
    assert digest.startswith("0123456789ab-") and len(digest) <= 36  # MLflow stores 36 characters
    assert tracking.dataset_digest("0123456789abcdef0123.dir", manifest.iloc[::-1]) == digest
    assert tracking.dataset_digest("ffff456789abcdef0123.dir", manifest) != digest
    moved = manifest.assign(split=["train", "train", "test"])
    assert tracking.dataset_digest("0123456789abcdef0123.dir", moved) != digest


def test_a_run_logs_the_manifest_as_its_training_dataset_once(tracking_uri, tmp_path):
    experiment_id = tracking.ensure_experiment(tracking_uri, "datasets", (tmp_path / "artifacts").as_uri())
    tracker = tracking.RunTracker.start(tracking_uri, experiment_id, "resnet18-scratch-s0")
    manifest, path = _manifest(), tmp_path / "data" / "split" / "manifest.csv"

    for _ in range(2):  # a resumed run logs it again: still one input
        tracker.log_dataset_input(manifest, path, "data/split/manifest.csv", "0123456789abcdef0123.dir")
    tracker.finish()

    inputs = MlflowClient(tracking_uri).get_run(tracker.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert dataset.name == "data/split/manifest.csv"
    assert dataset.digest == tracking.dataset_digest("0123456789abcdef0123.dir", manifest)
    assert str(path) in dataset.source
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"
    assert '"num_rows": 3' in dataset.profile
