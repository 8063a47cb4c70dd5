"""The run folder: what the train stage leaves for each cell, and the one place that knows its format.

`<outputs>/models/<arch>-<condition>/<variant>/`, the variant `s<seed>` with `-rep<replicate>`,
`-r<repeat>` and `-f<fraction>` when those are not the study's 0, 0 and 1 (cells.Cell):
- `best.pt`, `last.pt`: `{"model": state_dict, "epoch", "val_acc", "class_names"}`, each with a
  `.sha256` beside it (checkpoints.py);
- `run.json`: `{"run_id", "experiment_id", "run_name", "architecture", "condition", "seed",
  "repeat", "fraction", "replicate", "train_per_class", "class_names", "image_size", "checkpoint"
  ("best"|"last"), "model_uri", "fingerprint", "epochs", "max_epochs", "best_epoch", "hit_cap"}`;
  the last four are the training rule's outcome (stopping.py): epochs trained, the cap in epochs,
  the best epoch (the one `best.pt` holds) and whether the run stopped at the cap while still improving;
- `history.csv`: one row per epoch (epoch, train_loss, train_acc, val_loss, val_acc, seconds);
- `metrics.json`: best/last validation accuracy, the training rule's outcome (as in run.json) and
  training seconds (DVC metrics);
- `predictions.csv`: the chosen checkpoint's predictions on every row of the run's manifest (its
  replicate's rows, then any external test set's, split `external`): `path, split, label, pred,
  prob_0 … prob_{K-1}` (label/pred index into `class_names`).

A cell listed in train.exclude gets `<outputs>/models/<arch>-<condition>/EXCLUDED` instead (no
run folder): dvc.yaml's train matrix makes a stage for every arch × condition and each must
leave its out.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import UserError

RUN_JSON = "run.json"
EXCLUDED = "EXCLUDED"
RUN_JSON_KEYS = ("run_id", "experiment_id", "run_name", "architecture", "condition", "seed", "repeat",
                 "fraction", "replicate", "train_per_class", "class_names", "image_size", "checkpoint", "model_uri",
                 "fingerprint", "epochs", "max_epochs", "best_epoch", "hit_cap")
# What readers need; the other keys are written for people and MLflow.
REQUIRED_KEYS = ("run_id", "architecture", "condition", "seed", "class_names", "model_uri")


def run_dir_for(models_dir: Path, group: str, variant: str) -> Path:
    """`<models_dir>/<arch>-<condition>/<variant>`: the folder of one cell's run (cells.Cell names both)."""
    return Path(models_dir) / group / variant


def cell_dir(models_dir: Path, architecture: str, condition: str) -> Path:
    """`<models_dir>/<arch>-<condition>`: the folder of a cell's runs, dvc.yaml's train out."""
    return Path(models_dir) / f"{architecture}-{condition}"


def mark_excluded(models_dir: Path, architecture: str, condition: str) -> Path:
    """Write `<models_dir>/<arch>-<condition>/EXCLUDED` for a cell in train.exclude; returns the folder."""
    folder = cell_dir(models_dir, architecture, condition)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / EXCLUDED).write_text(f"{architecture}-{condition} is listed in train.exclude: nothing was trained.\n")
    return folder


def write_run_info(run_dir: Path, info: dict) -> None:
    """Write run.json; `info` must hold exactly RUN_JSON_KEYS."""
    if set(info) != set(RUN_JSON_KEYS):
        raise ValueError(f"run.json keys {sorted(info)} differ from {sorted(RUN_JSON_KEYS)}")
    (Path(run_dir) / RUN_JSON).write_text(json.dumps({k: info[k] for k in RUN_JSON_KEYS}, indent=2))


def find_run_dirs(models_dir: Path) -> list[Path]:
    """Run folders `<models_dir>/<arch>-<condition>/s<seed>/` that hold a run.json, sorted."""
    run_dirs = sorted(p.parent for p in Path(models_dir).glob(f"*/s*/{RUN_JSON}"))
    if not run_dirs:
        raise UserError(f"no trained runs under '{models_dir}' (expected <arch>-<condition>/s<seed>/{RUN_JSON}); "
                        f"run `dvc repro train` first")
    return run_dirs


def read_run_info(run_dir: Path) -> dict:
    """run.json of a run folder, checked for the keys readers need."""
    path = Path(run_dir) / RUN_JSON
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read '{path}': {exc}; rerun `dvc repro train` for this run") from None
    missing = [key for key in REQUIRED_KEYS if key not in info]
    if missing:
        raise UserError(f"'{path}' lacks {', '.join(missing)}; rerun `dvc repro train` for this run")
    # run folders from before repeats, replicates and the training rule's record
    return {"repeat": 0, "fraction": 1.0, "replicate": 0, "train_per_class": None, "epochs": None,
            "max_epochs": None, "best_epoch": None, "hit_cap": None} | info
