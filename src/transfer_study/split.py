"""Stage `split`: a seeded, stratified train/val/test split of the crops, written as a manifest CSV.

Rows are grouped by content hash, so identical images never land in two splits, and images
whose content appears under two different labels are excluded (their label is ambiguous).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from transfer_study.checksums import file_sha256
from transfer_study.config import SplitParams, UserError

SPLITS = ("train", "val", "test")
EXCLUDED = "excluded"  # split value of rows left out because their content has two labels
MANIFEST_COLUMNS = ["path", "label", "split", "sha256"]
MIN_PER_CLASS = len(SPLITS)


def split_sizes(n: int, params: SplitParams) -> dict[str, int]:
    """How many of n distinct images of one class go to each split: rounded ratios, at least one each.

    Needs n >= 3. Train takes what val and test leave, so once n is large enough for rounding alone
    to give val and test an image, every size is within one image of its ratio.
    """
    val = max(1, math.floor(n * params.val + 0.5))
    test = max(1, math.floor(n * params.test + 0.5))
    # Extreme ratios could leave train empty; take the image back from the larger of val/test.
    while n - val - test < 1:
        if val >= test:
            val -= 1
        else:
            test -= 1
    return {"train": n - val - test, "val": val, "test": test}


def _cross_label_hashes(items: pd.DataFrame) -> set[str]:
    """Content hashes that appear under more than one label."""
    labels_per_hash = items.groupby("sha256")["label"].nunique()
    return set(labels_per_hash[labels_per_hash > 1].index)


def _split_class(hashes: list[str], params: SplitParams, rng: np.random.RandomState) -> dict[str, str]:
    """Assign one class's distinct hashes (sorted) to splits: hash -> split name."""
    sizes = split_sizes(len(hashes), params)
    rest, test = train_test_split(hashes, test_size=sizes["test"], random_state=rng)
    train, val = train_test_split(rest, test_size=sizes["val"], random_state=rng)
    return {**dict.fromkeys(train, "train"), **dict.fromkeys(val, "val"), **dict.fromkeys(test, "test")}


def stratified_split(items: pd.DataFrame, params: SplitParams) -> pd.DataFrame:
    """Split rows with columns path, label, sha256 into train/val/test, stratified by label.

    Returns a copy of items (same order) with a `split` column. Identical contents (same sha256)
    always share a split; rows whose sha256 appears under two labels get split "excluded".
    Seeded by params.seed and independent of the input row order. Raises UserError if a class
    has fewer than 3 distinct images.
    """
    missing = {"path", "label", "sha256"} - set(items.columns)
    if missing:
        raise ValueError(f"items lacks column(s) {', '.join(sorted(missing))}")
    ambiguous = _cross_label_hashes(items)
    kept = items[~items["sha256"].isin(ambiguous)]
    hashes_by_label = {label: sorted(set(group["sha256"])) for label, group in kept.groupby("label", sort=True)}
    for label, hashes in hashes_by_label.items():
        if len(hashes) < MIN_PER_CLASS:
            raise UserError(
                f"class '{label}' has {len(hashes)} distinct image(s); at least {MIN_PER_CLASS} are needed "
                f"for train/val/test; add images to it or remove its folder"
            )
    # One RandomState drawn from in sorted label order keeps the whole split a function of the seed.
    rng = np.random.RandomState(params.seed)
    split_of: dict[str, str] = dict.fromkeys(ambiguous, EXCLUDED)
    for hashes in hashes_by_label.values():
        split_of.update(_split_class(hashes, params, rng))
    result = items.copy()
    result["split"] = result["sha256"].map(split_of)
    return result




def scan_crops(cropped: Path) -> pd.DataFrame:
    """Rows path, label, sha256 for every cropped/<class>/*.png (hidden files ignored).

    Paths are `cropped` joined with class and file name, as POSIX strings. Raises UserError if
    cropped is missing or empty, or a class folder holds no PNG.
    """
    cropped = Path(cropped)
    hint = "run `dvc repro preprocess` first"
    if not cropped.is_dir():
        raise UserError(f"cropped images folder '{cropped}' not found; {hint}")
    rows = []
    for folder in sorted(p for p in cropped.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.glob("*.png") if not p.name.startswith("."))
        if not files:
            raise UserError(f"class folder '{folder}' has no PNG crops; {hint}, or remove the folder")
        rows += [{"path": f.as_posix(), "label": folder.name, "sha256": file_sha256(f)} for f in files]
    if not rows:
        raise UserError(f"'{cropped}' holds no class folders with PNG crops; {hint}")
    return pd.DataFrame(rows, columns=["path", "label", "sha256"])


def count_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Images per class (rows) and split (columns train, val, test), with totals."""
    table = pd.crosstab(manifest["label"], manifest["split"], margins=True, margins_name="total")
    return table.reindex(columns=[*SPLITS, "total"], fill_value=0)


def write_manifest(cropped: Path, manifest: Path, params: SplitParams) -> pd.DataFrame:
    """Hash and split the crops in cropped/<class>/*.png and write the manifest CSV.

    The CSV has columns path, label, split, sha256, sorted by label then path; excluded rows
    (content under two labels) are left out of it and listed on stdout, with a per-class/per-split
    count table. Returns the rows written.
    """
    split = stratified_split(scan_crops(cropped), params)
    excluded = split[split["split"] == EXCLUDED]
    written = split[split["split"] != EXCLUDED].sort_values(["label", "path"]).reset_index(drop=True)
    manifest = Path(manifest)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    tmp = manifest.with_name(f".{manifest.name}.tmp")
    written[MANIFEST_COLUMNS].to_csv(tmp, index=False, lineterminator="\n")
    os.replace(tmp, manifest)
    print(count_table(written).to_string())
    if len(excluded):
        print(f"excluded {len(excluded)} image(s) whose content appears under two labels:")
        for row in excluded.sort_values(["sha256", "path"]).itertuples():
            print(f"  {row.path} ({row.label})")
    return written


def read_manifest(path: Path) -> pd.DataFrame:
    """The manifest written by `write_manifest`, checked for what training needs (UserError if not)."""
    if not path.is_file():
        raise UserError(f"split manifest '{path}' not found; run `dvc repro split` first")
    manifest = pd.read_csv(path)
    missing = {"path", "label", "split", "sha256"} - set(manifest.columns)
    if missing:
        raise UserError(f"manifest '{path}' lacks columns {sorted(missing)}; rerun `dvc repro split`")
    for split in ("train", "val"):
        if not (manifest["split"] == split).any():
            raise UserError(f"manifest '{path}' has no '{split}' rows; check the split ratios in params.yaml")
    return manifest
