"""Stage `split`: seeded, stratified train/val/test splits of the crops, written as a manifest CSV.

Rows are grouped by content hash, so identical images never land in two splits, and images
whose content appears under two different labels are excluded (their label is ambiguous).

The manifest's `split` column is repeat 0, the one split the study profile trains on. With
`split.repeats` > 1 it gains `split_r1`, `split_r2`, ... (further stratified splits), and with a
`split.train_fractions` below 1 a `train_rank_r<k>` column per repeat: a random order of each
class's train images, so a fraction f keeps the first round(f · n) of them. Subsets are therefore
nested and stratified, and val/test stay the same across fractions of a repeat. `rows_for` picks
one training cell's rows.

A profile with several datasets (config.profile_datasets: replicates, an external test set) gets a
`replicate` column: each replicate is split on its own, with its own seeded streams (replicate 0's
are the ones above), and the external test set's rows have split EXTERNAL in every split column
and no replicate. Every cell of a replicate also predicts the external rows (`cell_manifest`).
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
UNUSED = "unused"  # split value, in a cell's manifest, of training rows beyond its training fraction
EXTERNAL = "external"  # split value of the external test set's rows: predicted and scored, never trained on
MANIFEST_COLUMNS = ["path", "label", "split", "sha256"]
REPLICATE_COLUMN = "replicate"  # a profile with several datasets: the row's replicate (<NA>: external)
MIN_PER_CLASS = len(SPLITS)
SPLIT_COLUMN = "split_r{repeat}"  # repeat 0 is the plain `split` column
RANK_COLUMN = "train_rank_r{repeat}"


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


def _split_rng(seed: int, repeat: int, replicate: int = 0) -> np.random.RandomState:
    """Repeat 0 draws from RandomState(seed), as the single split always has; repeat k from (seed, k);
    replicate r >= 1 from its own stream (seed, k, 2, r)."""
    if replicate:
        return np.random.RandomState([seed, repeat, 2, replicate])
    return np.random.RandomState(seed if repeat == 0 else [seed, repeat])


def stratified_split(items: pd.DataFrame, params: SplitParams, repeat: int = 0, replicate: int = 0) -> pd.DataFrame:
    """Split rows with columns path, label, sha256 into train/val/test, stratified by label.

    Returns a copy of items (same order) with a `split` column. Identical contents (same sha256)
    always share a split; rows whose sha256 appears under two labels get split "excluded".
    Seeded by params.seed, `repeat` (repeat 0 is the split params.seed has always given) and
    `replicate`, and independent of the input row order. Raises UserError if a class has fewer than 3 distinct images.
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
    rng = _split_rng(params.seed, repeat, replicate)
    split_of: dict[str, str] = dict.fromkeys(ambiguous, EXCLUDED)
    for hashes in hashes_by_label.values():
        split_of.update(_split_class(hashes, params, rng))
    result = items.copy()
    result["split"] = result["sha256"].map(split_of)
    return result


def train_ranks(split: pd.DataFrame, seed: int, repeat: int, replicate: int = 0) -> pd.Series:
    """Each train row's place (0, 1, ...) in a random order of its class's distinct train contents.

    `split` has columns label, sha256, split. Copies of one content share a rank; rows outside
    train get <NA>. The order comes from its own stream, (seed, repeat, 1) (replicate r >= 1:
    (seed, repeat, 3, r)), so adding ranks leaves the splits untouched, and it does not depend on
    the row order.
    """
    rng = np.random.RandomState([seed, repeat, 3, replicate] if replicate else [seed, repeat, 1])
    train = split[split["split"] == "train"]
    rank_of: dict[str, int] = {}
    for _, group in train.groupby("label", sort=True):
        hashes = sorted(set(group["sha256"]))
        rank_of.update(zip((hashes[i] for i in rng.permutation(len(hashes))), range(len(hashes))))
    ranks = split["sha256"].map(rank_of).where(split["split"] == "train")
    return ranks.astype("Int64")


def subset_size(n_train: int, fraction: float) -> int:
    """Distinct train images one class keeps at `fraction` of its n_train: rounded, at least one."""
    return max(1, min(n_train, math.floor(n_train * fraction + 0.5)))


def manifest_frame(items: pd.DataFrame, params: SplitParams) -> pd.DataFrame:
    """stratified_split for every repeat, as manifest columns: `split` (repeat 0), `split_r<k>`
    (k >= 1) and, when a train fraction is below 1, `train_rank_r<k>` for every repeat.

    With a `replicate` column, each replicate is split on its own and rows without a replicate
    (the external test set) get EXTERNAL in every split column; same row order as items."""
    if REPLICATE_COLUMN not in items.columns:
        return _replicate_frame(items, params, 0)
    parts = [_replicate_frame(group, params, int(replicate))
             for replicate, group in items[items[REPLICATE_COLUMN].notna()].groupby(REPLICATE_COLUMN)]
    external = items[items[REPLICATE_COLUMN].isna()].assign(split=EXTERNAL)
    for repeat in range(1, params.repeats):
        external[SPLIT_COLUMN.format(repeat=repeat)] = EXTERNAL
    result = pd.concat([*parts, external]).loc[items.index]
    for column in (c for c in result.columns if c.startswith("train_rank_r")):
        result[column] = result[column].astype("Int64")
    return result


def _replicate_frame(items: pd.DataFrame, params: SplitParams, replicate: int) -> pd.DataFrame:
    """manifest_frame's columns for the rows of one replicate."""
    result = stratified_split(items, params, replicate=replicate)
    for repeat in range(1, params.repeats):
        result[SPLIT_COLUMN.format(repeat=repeat)] = stratified_split(items, params, repeat, replicate)["split"]
    if min(params.train_fractions) < 1:
        for repeat in range(params.repeats):
            splits = result.assign(split=result[_split_column(repeat)])
            result[RANK_COLUMN.format(repeat=repeat)] = train_ranks(splits, params.seed, repeat, replicate)
    return result


def _split_column(repeat: int) -> str:
    return "split" if repeat == 0 else SPLIT_COLUMN.format(repeat=repeat)


def repeats_in(manifest: pd.DataFrame) -> int:
    """How many repeats a manifest holds (1 when it has only the `split` column)."""
    repeat = 1
    while SPLIT_COLUMN.format(repeat=repeat) in manifest.columns:
        repeat += 1
    return repeat


def replicate_rows(manifest: pd.DataFrame, replicate: int) -> pd.DataFrame:
    """The manifest rows of one replicate (all rows of a manifest without replicates, which is
    replicate 0); UserError when the manifest lacks it."""
    if REPLICATE_COLUMN not in manifest.columns:
        if replicate == 0:
            return manifest
        raise UserError(f"the split manifest has no replicates, so there is no replicate {replicate}; set "
                        f"data.replicates to at least {replicate + 1} and rerun the data stages and `dvc repro split`")
    rows = manifest[manifest[REPLICATE_COLUMN] == replicate]
    if rows.empty:
        have = sorted(int(r) for r in manifest[REPLICATE_COLUMN].dropna().unique())
        raise UserError(f"the split manifest holds replicates {have}, not {replicate}; set data.replicates to at "
                        f"least {replicate + 1} and rerun the data stages and `dvc repro split`")
    return rows


def external_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    """The external test set's rows of a manifest (none without one)."""
    return manifest[manifest["split"] == EXTERNAL]


def rows_for(manifest: pd.DataFrame, repeat: int, fraction: float, replicate: int = 0) -> pd.DataFrame:
    """The rows one training cell uses: replicate `replicate`'s repeat `repeat` split, its train
    split cut to `fraction`.

    Returns columns path, label, sha256, split (that repeat's train/val/test), in manifest order,
    with the train rows beyond the fraction left out; val and test are the repeat's whole val
    and test splits, the same at every fraction. Repeat 0 at fraction 1.0 is the manifest's own
    `split` column. The external rows are not among them. Raises UserError if the manifest lacks
    the replicate, the repeat or the ranks the fraction needs.
    """
    manifest = replicate_rows(manifest, replicate)
    if not 0 < fraction <= 1:
        raise UserError(f"train fraction {fraction!r} is not in (0, 1]; check split.train_fractions")
    column = _split_column(repeat)
    if repeat < 0 or column not in manifest.columns:
        raise UserError(
            f"the split manifest has {repeats_in(manifest)} repeat(s), so there is no repeat {repeat}; "
            f"set split.repeats to at least {repeat + 1} and rerun `dvc repro split`"
        )
    rows = manifest[["path", "label", "sha256"]].assign(split=manifest[column])
    if fraction == 1:
        return rows.reset_index(drop=True)
    rank_column = RANK_COLUMN.format(repeat=repeat)
    if rank_column not in manifest.columns:
        raise UserError(
            f"the split manifest has no training subsets (column {rank_column}); list a fraction below 1 "
            f"in split.train_fractions and rerun `dvc repro split`"
        )
    rank = manifest[rank_column]
    train = rows["split"] == "train"
    n_train = rows[train].groupby("label")["sha256"].nunique()
    keep = rank < rows["label"].map(lambda label: subset_size(int(n_train.get(label, 0)), fraction))
    return rows[~train | keep.fillna(False).astype(bool)].reset_index(drop=True)


def cell_manifest(manifest: pd.DataFrame, repeat: int, fraction: float, replicate: int = 0) -> pd.DataFrame:
    """The rows (path, label, sha256, split) one training cell predicts: every row of its replicate,
    with the `split` the cell uses (rows_for), then the external test set's rows. Training rows
    left out by the fraction are marked UNUSED, so stores and predictions keep every row while
    training and evaluation see only their own."""
    chosen = rows_for(manifest, repeat, fraction, replicate).set_index("path")["split"]
    own = replicate_rows(manifest, replicate)
    cell = own[MANIFEST_COLUMNS].copy()
    cell["split"] = own["path"].map(chosen).fillna(UNUSED)
    return pd.concat([cell, external_rows(manifest)[MANIFEST_COLUMNS]]).reset_index(drop=True)


def train_images_per_class(rows: pd.DataFrame) -> float:
    """Train rows per class in rows_for's result: the learning curve's x value."""
    train = rows[rows["split"] == "train"]
    return len(train) / train["label"].nunique()



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


def scan_datasets(crops: list[tuple[int | None, Path]]) -> pd.DataFrame:
    """scan_crops of each (replicate, crops folder), with a `replicate` column (<NA>: the external
    test set, given as replicate None)."""
    frames = [scan_crops(folder).assign(**{REPLICATE_COLUMN: replicate}) for replicate, folder in crops]
    items = pd.concat(frames, ignore_index=True)
    items[REPLICATE_COLUMN] = items[REPLICATE_COLUMN].astype("Int64")
    return items


def write_manifest(crops: Path | list[tuple[int | None, Path]], manifest: Path, params: SplitParams) -> pd.DataFrame:
    """Hash and split the crops and write the manifest CSV.

    `crops` is one folder of cropped/<class>/*.png (replicate 0 alone), or the (replicate, folder)
    of each dataset of a profile (config.profile_datasets; None: the external test set); more
    than one adds the `replicate` column. The CSV has columns path, label, split, sha256 (split: repeat 0),
    then any replicate, split_r<k> and train_rank_r<k> columns (see manifest_frame), sorted by label
    then path; excluded rows (content under two labels) are left out of it and listed on stdout,
    with a per-class/per-split count table of replicate 0's repeat 0. Returns the rows written.
    """
    crops = [(0, Path(crops))] if isinstance(crops, (str, Path)) else crops
    several = len(crops) > 1
    split = manifest_frame(scan_datasets(crops) if several else scan_crops(crops[0][1]), params)
    excluded = split[split["split"] == EXCLUDED]
    written = split[split["split"] != EXCLUDED].sort_values(["label", "path"]).reset_index(drop=True)
    manifest = Path(manifest)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    tmp = manifest.with_name(f".{manifest.name}.tmp")
    extra = [c for c in written.columns if c == REPLICATE_COLUMN or c.startswith(("split_r", "train_rank_r"))]
    written[MANIFEST_COLUMNS + extra].to_csv(tmp, index=False, lineterminator="\n")
    os.replace(tmp, manifest)
    print(count_table(rows_for(written, 0, 1.0)).to_string())
    if several:
        replicates = written[REPLICATE_COLUMN].dropna().nunique()
        print(f"{replicates} replicate(s), each split on its own; external test set: "
              f"{len(external_rows(written))} images (split '{EXTERNAL}')")
    if params.repeats > 1 or params.train_fractions != (1.0,):
        sizes = ", ".join(f"{f:g}: {train_images_per_class(rows_for(written, 0, f)):g}"
                          for f in sorted(params.train_fractions))
        print(f"{params.repeats} split repeat(s); train images per class (repeat 0) at each fraction: {sizes}")
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
