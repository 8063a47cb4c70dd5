"""Tests for split.py: the stratified, hash-grouped split and the manifest."""

from __future__ import annotations

import hashlib
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from transfer_study.config import SplitParams, UserError
from transfer_study.split import (
    EXCLUDED,
    UNUSED,
    cell_manifest,
    count_table,
    manifest_frame,
    read_manifest,
    rows_for,
    scan_crops,
    split_sizes,
    stratified_split,
    subset_size,
    train_images_per_class,
    train_ranks,
    cell_manifest,
    write_manifest,
)

PARAMS = SplitParams()


def make_items(counts: dict[str, int]) -> pd.DataFrame:
    """Rows path, label, sha256 with `count` distinct contents per label."""
    rows = [
        {"path": f"crops/{label}/{i}.png", "label": label, "sha256": hashlib.sha256(f"{label}{i}".encode()).hexdigest()}
        for label, count in counts.items()
        for i in range(count)
    ]
    return pd.DataFrame(rows)


def split_of(frame: pd.DataFrame) -> dict[str, str]:
    return dict(zip(frame["path"], frame["split"]))


def test_split_is_stratified_within_one_image_of_the_ratios():
    counts = {"coat": 20, "dress": 33, "shirt": 7, "trouser": 300}
    result = stratified_split(make_items(counts), PARAMS)
    table = pd.crosstab(result["label"], result["split"])
    for label, n in counts.items():
        for split in ("train", "val", "test"):
            expected = n * getattr(PARAMS, split)
            assert abs(table.loc[label, split] - expected) <= 1, (label, split, table.loc[label, split], expected)
    assert set(result["split"]) == {"train", "val", "test"}


def test_split_sizes_always_give_each_split_an_image():
    for params in (PARAMS, SplitParams(train=0.1, val=0.45, test=0.45), SplitParams(train=0.98, val=0.01, test=0.01)):
        for n in range(3, 120):
            sizes = split_sizes(n, params)
            assert sum(sizes.values()) == n
            assert min(sizes.values()) >= 1, (n, params, sizes)
    # Once rounding alone gives val and test an image (n >= 4 at 15 %), each split is within one image of its ratio.
    for n in range(4, 120):
        sizes = split_sizes(n, PARAMS)
        assert all(abs(sizes[s] - n * getattr(PARAMS, s)) <= 1 for s in sizes), (n, sizes)


@pytest.mark.parametrize("n, sizes", [(7, (5, 1, 1)), (10, (6, 2, 2)), (30, (20, 5, 5)), (300, (210, 45, 45))])
def test_split_sizes_round_half_up(n, sizes):
    # 15 % of 10 is 1.5 and of 30 is 4.5: rounded, not floored (nor banker's rounding, which gives 4)
    assert split_sizes(n, PARAMS) == dict(zip(("train", "val", "test"), sizes))


UNEVEN = SplitParams(train=0.7, val=0.2, test=0.1)  # val ≠ test: a test share taken from split.val shows


@pytest.mark.parametrize("n, sizes", [(20, (14, 4, 2)), (37, (26, 7, 4)), (100, (70, 20, 10))])
def test_val_and_test_take_their_own_ratios(n, sizes):
    assert split_sizes(n, UNEVEN) == dict(zip(("train", "val", "test"), sizes))


def test_a_stratified_split_gives_val_and_test_their_own_shares():
    result = stratified_split(make_items({"coat": 100, "shirt": 37}), UNEVEN)
    table = pd.crosstab(result["label"], result["split"])
    assert table.loc["coat"].to_dict() == {"test": 10, "train": 70, "val": 20}
    assert table.loc["shirt"].to_dict() == {"test": 4, "train": 26, "val": 7}


def test_three_images_give_one_per_split():
    result = stratified_split(make_items({"a": 3, "b": 3}), PARAMS)
    assert sorted(result[result["label"] == "a"]["split"]) == ["test", "train", "val"]


def test_split_is_deterministic_and_independent_of_row_order():
    items = make_items({"a": 40, "b": 25})
    first = stratified_split(items, PARAMS)
    shuffled = items.sample(frac=1, random_state=7).reset_index(drop=True)
    assert split_of(stratified_split(items, PARAMS)) == split_of(first)
    assert split_of(stratified_split(shuffled, PARAMS)) == split_of(first)
    assert list(first["path"]) == list(items["path"])  # input order kept
    assert "split" not in items.columns  # the input is not modified


def test_a_different_seed_changes_the_split():
    items = make_items({"a": 40, "b": 25})
    assert split_of(stratified_split(items, SplitParams(seed=0))) != split_of(stratified_split(items, SplitParams(seed=1)))


def test_identical_contents_share_a_split():
    items = make_items({"a": 30, "b": 30})
    copies = items[items["label"] == "a"].head(10).assign(path=lambda f: f["path"] + ".copy.png")
    result = stratified_split(pd.concat([items, copies], ignore_index=True), PARAMS)
    splits_per_hash = result.groupby("sha256")["split"].nunique()
    assert (splits_per_hash == 1).all()
    assert len(result) == 70 and EXCLUDED not in set(result["split"])


def test_content_under_two_labels_is_excluded():
    items = make_items({"a": 10, "b": 10})
    clash = items.iloc[0]["sha256"]
    items = pd.concat([items, pd.DataFrame([{"path": "crops/b/clash.png", "label": "b", "sha256": clash}])])
    result = stratified_split(items, PARAMS)
    excluded = result[result["split"] == EXCLUDED]
    assert sorted(excluded["path"]) == ["crops/a/0.png", "crops/b/clash.png"]
    assert (result[result["sha256"] != clash]["split"] != EXCLUDED).all()


@pytest.mark.parametrize("copies", [0, 3])
def test_a_class_with_fewer_than_three_distinct_images_is_an_error(copies):
    items = make_items({"a": 10, "tiny": 2})
    # Extra copies of the same content do not make a class big enough.
    first_tiny = items[items["label"] == "tiny"].iloc[0]
    extra = pd.DataFrame([{**first_tiny, "path": f"crops/tiny/copy{i}.png"} for i in range(copies)])
    with pytest.raises(UserError, match="'tiny' has 2 distinct"):
        stratified_split(pd.concat([items, extra], ignore_index=True), PARAMS)


# --------------------------------------------------------------------------------------------
# write_manifest
# --------------------------------------------------------------------------------------------


def make_crops(root, counts: dict[str, int]) -> None:
    for label, count in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(count):
            value = len(label) * 10 + i
            Image.new("RGB", (8, 8), (value, i, 0)).save(root / label / f"{i:03d}.png")


def test_write_manifest_writes_sorted_relative_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cropped = tmp_path / "data" / "cropped"
    make_crops(cropped, {"shirt": 12, "coat": 9})
    shutil.copy(cropped / "coat" / "000.png", cropped / "coat" / "dup.png")
    (cropped / "coat" / ".hidden.png").write_bytes(b"ignored")
    manifest = tmp_path / "data" / "split" / "manifest.csv"
    returned = write_manifest(cropped.relative_to(tmp_path), manifest, PARAMS)
    written = pd.read_csv(manifest)
    assert list(written.columns) == ["path", "label", "split", "sha256"]
    assert len(written) == 22
    assert written["path"].iloc[0] == "data/cropped/coat/000.png"
    assert list(written["path"]) == sorted(written["path"], key=lambda p: (p.split("/")[2], p))
    for row in written.itertuples():
        assert hashlib.sha256((tmp_path / row.path).read_bytes()).hexdigest() == row.sha256
    assert written.groupby("sha256")["split"].nunique().max() == 1
    assert returned["path"].tolist() == written["path"].tolist()
    printed = capsys.readouterr().out
    assert "coat" in printed and "shirt" in printed and "train" in printed


def test_write_manifest_leaves_out_and_lists_cross_label_copies(tmp_path, capsys):
    make_crops(tmp_path / "crops", {"shirt": 5, "coat": 5})
    shutil.copy(tmp_path / "crops" / "coat" / "000.png", tmp_path / "crops" / "shirt" / "stray.png")
    manifest = tmp_path / "manifest.csv"
    write_manifest(tmp_path / "crops", manifest, PARAMS)
    paths = set(pd.read_csv(manifest)["path"])
    assert not any(p.endswith(("coat/000.png", "shirt/stray.png")) for p in paths)
    assert len(paths) == 9
    assert "stray.png" in capsys.readouterr().out


def test_write_manifest_is_deterministic(tmp_path):
    make_crops(tmp_path / "crops", {"a": 10, "b": 10})
    write_manifest(tmp_path / "crops", tmp_path / "m1.csv", PARAMS)
    write_manifest(tmp_path / "crops", tmp_path / "m2.csv", PARAMS)
    assert (tmp_path / "m1.csv").read_bytes() == (tmp_path / "m2.csv").read_bytes()


@pytest.mark.parametrize("setup", ["missing", "empty", "empty_class"])
def test_write_manifest_without_crops_says_to_run_preprocess(tmp_path, setup):
    cropped = tmp_path / "cropped"
    if setup != "missing":
        cropped.mkdir()
    if setup == "empty_class":
        make_crops(cropped, {"a": 5})
        (cropped / "b").mkdir()
    with pytest.raises(UserError, match="dvc repro preprocess"):
        write_manifest(cropped, tmp_path / "manifest.csv", PARAMS)
    assert not (tmp_path / "manifest.csv").exists()


def test_split_frame_assignment_covers_every_row():
    result = stratified_split(make_items({"a": 7, "b": 9}), PARAMS)
    assert result["split"].notna().all()
    assert np.isin(result["split"], ["train", "val", "test"]).all()


# --------------------------------------------------------------------------------------------
# repeats and learning-curve subsets
# --------------------------------------------------------------------------------------------

CURVE = SplitParams(repeats=3, train_fractions=(0.1, 0.5, 1.0))


def test_repeat_zero_is_the_split_this_seed_has_always_given():
    # Pinned from the single-split code before repeats existed: the study profile's manifest must not change.
    result = stratified_split(make_items({"a": 40, "b": 25, "c": 9}), SplitParams(seed=3))
    code = "".join(result["split"].map({"train": "r", "val": "v", "test": "e"}))
    assert code == "rrrrevevvevrrrerrrrrvrrrverrrrrrrrrrrrreeerrrrvvrrrrrreerrrrvrrrvvrerrrrrr"
    assert split_of(manifest_frame(make_items({"a": 40, "b": 25, "c": 9}), SplitParams(seed=3, repeats=4))) == \
        split_of(result)


def test_default_params_add_no_manifest_columns():
    frame = manifest_frame(make_items({"a": 20, "b": 20}), PARAMS)
    assert list(frame.columns) == ["path", "label", "sha256", "split"]


def test_each_repeat_is_a_different_stratified_split():
    items = make_items({"a": 40, "b": 33})
    frame = manifest_frame(items, CURVE)
    columns = ["split", "split_r1", "split_r2"]
    assert [c for c in frame.columns if c.startswith("split")] == columns
    for column in columns:
        counts = pd.crosstab(frame["label"], frame[column])
        sizes = {label: split_sizes(n, CURVE) for label, n in {"a": 40, "b": 33}.items()}
        assert all(counts.loc[label, s] == sizes[label][s] for label in sizes for s in ("train", "val", "test"))
    assert len({tuple(frame[c]) for c in columns}) == 3
    shuffled = manifest_frame(items.sample(frac=1, random_state=3), CURVE).sort_index()
    assert shuffled[columns + ["train_rank_r1"]].equals(frame[columns + ["train_rank_r1"]])


def test_copies_share_split_and_rank_in_every_repeat():
    items = make_items({"a": 30, "b": 30})
    copies = items.head(8).assign(path=lambda f: f["path"] + ".copy.png")
    frame = manifest_frame(pd.concat([items, copies], ignore_index=True), CURVE)
    for column in ("split_r1", "split_r2", "train_rank_r0", "train_rank_r2"):
        assert (frame.groupby("sha256")[column].nunique(dropna=False) == 1).all(), column


def test_train_ranks_order_each_class_once():
    split = stratified_split(make_items({"a": 40, "b": 21}), PARAMS)
    ranks = train_ranks(split, seed=0, repeat=0)
    train = split["split"] == "train"
    assert ranks[~train].isna().all()
    for label, group in ranks[train].groupby(split["label"]):
        assert sorted(group) == list(range(int(train[split["label"] == label].sum()))), label


def test_rows_for_full_repeat_zero_is_the_split_column():
    frame = manifest_frame(make_items({"a": 30, "b": 30}), CURVE)
    rows = rows_for(frame, 0, 1.0)
    assert list(rows.columns) == ["path", "label", "sha256", "split"]
    assert rows["split"].tolist() == frame["split"].tolist()
    assert rows_for(frame, 2, 1.0)["split"].tolist() == frame["split_r2"].tolist()


@pytest.mark.parametrize("repeat", [0, 2])
def test_subsets_are_nested_stratified_and_keep_val_and_test(repeat):
    counts = {"a": 60, "b": 41, "c": 20}
    frame = manifest_frame(make_items(counts), CURVE)
    full = rows_for(frame, repeat, 1.0)
    previous = set()
    for fraction in (0.1, 0.5, 1.0):
        rows = rows_for(frame, repeat, fraction)
        train = rows[rows["split"] == "train"]
        for label, n in counts.items():
            n_train = split_sizes(n, CURVE)["train"]
            assert (train["label"] == label).sum() == subset_size(n_train, fraction), (label, fraction)
        assert previous <= set(train["path"])  # nested: a larger fraction keeps every smaller one's images
        previous = set(train["path"])
        held_out = rows[rows["split"] != "train"].reset_index(drop=True)
        assert held_out.equals(full[full["split"] != "train"].reset_index(drop=True))


def test_subset_size_rounds_and_keeps_at_least_one():
    assert subset_size(210, 0.1) == 21 and subset_size(210, 0.25) == 53 and subset_size(210, 1.0) == 210
    assert subset_size(3, 0.01) == 1


def test_train_images_per_class_counts_the_subset():
    frame = manifest_frame(make_items({"a": 100, "b": 100}), CURVE)
    assert train_images_per_class(rows_for(frame, 1, 1.0)) == 70
    assert train_images_per_class(rows_for(frame, 1, 0.1)) == 7


def test_rows_for_names_the_param_to_change():
    plain = manifest_frame(make_items({"a": 20, "b": 20}), PARAMS)
    with pytest.raises(UserError, match="split.repeats to at least 2"):
        rows_for(plain, 1, 1.0)
    with pytest.raises(UserError, match="split.train_fractions"):
        rows_for(plain, 0, 0.5)
    with pytest.raises(UserError, match=r"\(0, 1\]"):
        rows_for(plain, 0, 1.5)


def test_write_manifest_with_repeats_round_trips(tmp_path, capsys):
    make_crops(tmp_path / "crops", {"coat": 20, "shirt": 20})
    manifest = tmp_path / "manifest.csv"
    written = write_manifest(tmp_path / "crops", manifest, SplitParams(repeats=2, train_fractions=(0.5, 1.0)))
    read = pd.read_csv(manifest)
    assert list(read.columns) == ["path", "label", "split", "sha256", "split_r1", "train_rank_r0", "train_rank_r1"]
    assert all(cell == "" or cell.isdigit() for line in manifest.read_text().splitlines()[1:]
               for cell in line.split(",")[5:])  # ranks as integers, blank off train
    for repeat in (0, 1):
        assert rows_for(read, repeat, 0.5)["path"].tolist() == rows_for(written, repeat, 0.5)["path"].tolist()
    assert "train images per class (repeat 0) at each fraction: 0.5: 7, 1: 14" in capsys.readouterr().out


def _manifest(tmp_path, splits: list[str]):
    path = tmp_path / "manifest.csv"
    pd.DataFrame({"path": [f"c/{i}.png" for i in range(len(splits))], "label": "coat", "split": splits,
                  "sha256": [f"{i:064x}" for i in range(len(splits))]}).to_csv(path, index=False)
    return path


def test_read_manifest_checks_what_training_needs(tmp_path):
    assert list(read_manifest(_manifest(tmp_path, ["train", "val", "test"]))["split"]) == ["train", "val", "test"]
    for splits, missing in ((["train", "test"], "val"), (["val", "test"], "train")):
        with pytest.raises(UserError, match=f"has no '{missing}' rows; check the split ratios"):
            read_manifest(_manifest(tmp_path, splits))
    pd.read_csv(_manifest(tmp_path, ["train", "val"])).drop(columns=["sha256"]).to_csv(tmp_path / "old.csv")
    with pytest.raises(UserError, match=r"lacks columns \['sha256'\]; rerun `dvc repro split`"):
        read_manifest(tmp_path / "old.csv")
    with pytest.raises(UserError, match="not found; run `dvc repro split` first"):
        read_manifest(tmp_path / "missing.csv")


# --------------------------------------------------------------------------------------------
# Replicates and the external test set
# --------------------------------------------------------------------------------------------


def replicate_items(replicates: int, per_label: int = 20, external: int = 5) -> pd.DataFrame:
    """make_items for each replicate (its own contents) and an external set (replicate <NA>)."""
    frames = [make_items({"a": per_label, "b": per_label}).assign(
        path=lambda f, r=r: f["path"].str.replace("crops/", f"crops/rep{r}/"),
        sha256=lambda f, r=r: f["sha256"] + str(r), replicate=r) for r in range(replicates)]
    frames.append(make_items({"a": external, "b": external}).assign(
        path=lambda f: f["path"].str.replace("crops/", "crops/external/"), sha256=lambda f: f["sha256"] + "x",
        replicate=pd.NA))
    items = pd.concat(frames, ignore_index=True)
    items["replicate"] = items["replicate"].astype("Int64")
    return items


def test_each_replicate_is_split_on_its_own_and_the_external_rows_are_never_trained_on():
    items = replicate_items(3)
    frame = manifest_frame(items, CURVE)
    external = frame["replicate"].isna()
    assert (frame.loc[external, ["split", "split_r1", "split_r2"]] == "external").all().all()
    assert frame.loc[external, "train_rank_r0"].isna().all()
    for replicate in range(3):
        rows = rows_for(frame, 0, 1.0, replicate)
        assert len(rows) == 40 and rows["path"].str.contains(f"rep{replicate}/").all()
        assert pd.crosstab(rows["label"], rows["split"]).loc["a"].to_dict() == split_sizes(20, CURVE)
    # Replicate 0 is split as a manifest without replicates splits the same images.
    alone = manifest_frame(items[items["replicate"] == 0].drop(columns="replicate"), CURVE)
    assert split_of(rows_for(frame, 0, 1.0, 0)) == split_of(alone)


def test_a_cell_predicts_its_replicate_and_the_external_rows():
    frame = manifest_frame(replicate_items(2), CURVE)
    cell = cell_manifest(frame, 1, 0.5, replicate=1)
    assert list(cell.columns) == ["path", "label", "split", "sha256"]
    assert set(cell["split"]) == {"train", "val", "test", "unused", "external"}
    assert cell.loc[cell["split"] != "external", "path"].str.contains("rep1/").all()
    assert (cell["split"] == "external").sum() == 10
    with pytest.raises(UserError, match="data.replicates to at least 3"):
        cell_manifest(frame, 0, 1.0, replicate=2)
    with pytest.raises(UserError, match="no replicates"):
        rows_for(manifest_frame(make_items({"a": 9}), PARAMS), 0, 1.0, replicate=1)


def test_write_manifest_of_several_datasets_round_trips(tmp_path, capsys):
    folders = []
    for name, count in (("rep0", 9), ("rep1", 9), ("external", 4)):
        for label in ("a", "b"):
            for i in range(count):
                path = tmp_path / "crops" / name / label / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (i, len(name), ord(label))).save(path)
        folders.append((None if name == "external" else int(name[-1]), tmp_path / "crops" / name))
    written = write_manifest(folders, tmp_path / "manifest.csv", PARAMS)
    manifest = read_manifest(tmp_path / "manifest.csv")
    assert list(manifest.columns) == ["path", "label", "split", "sha256", "replicate"]
    assert manifest["split"].value_counts()["external"] == 8 and manifest["replicate"].isna().sum() == 8
    assert sorted(manifest["replicate"].dropna().unique()) == [0, 1] and len(written) == len(manifest)
    assert "2 replicate(s), each split on its own; external test set: 8 images" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Pinned cases (what the mutation run, scripts/mutations.py, found untested)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, params, sizes", [
    (4, SplitParams(train=0.1, val=0.45, test=0.45), (1, 1, 2)),  # a tie: val gives the image back
    (10, SplitParams(train=0.02, val=0.49, test=0.49), (1, 4, 5)),
    (5, SplitParams(train=0.1, val=0.4, test=0.5), (1, 2, 2)),  # test is larger: test gives it back
])
def test_extreme_ratios_take_the_train_image_back_from_the_larger_of_val_and_test(n, params, sizes):
    assert split_sizes(n, params) == dict(zip(("train", "val", "test"), sizes))


def test_items_without_a_hash_column_are_a_programming_error():
    with pytest.raises(ValueError, match=r"^items lacks column\(s\) label, sha256$"):
        stratified_split(pd.DataFrame({"path": ["a.png"]}), PARAMS)


def test_the_split_does_not_depend_on_the_order_classes_come_in():
    """The classes draw from one RandomState in sorted order, whichever class the rows list first."""
    items = make_items({"a": 12, "b": 9, "c": 7})
    backwards = items.iloc[::-1].reset_index(drop=True)
    assert split_of(stratified_split(backwards, PARAMS)) == split_of(stratified_split(items, PARAMS))
    curve = SplitParams(train_fractions=(0.5, 1.0))
    assert manifest_frame(backwards, curve).set_index("path")["train_rank_r0"].sort_index().equals(
        manifest_frame(items, curve).set_index("path")["train_rank_r0"].sort_index())


def test_train_ranks_and_a_cells_manifest_are_pinned():
    """Pinned from the code as it is: a changed rank stream or subset rule changes every learning curve."""
    frame = manifest_frame(make_items({"a": 6, "b": 5}), SplitParams(repeats=2, train_fractions=(0.5, 1.0)))
    assert frame["train_rank_r1"].tolist() == [2, 3, pd.NA, pd.NA, 0, 1, 0, pd.NA, 2, 1, pd.NA]
    assert frame["train_rank_r0"].tolist() == [2, pd.NA, 0, 3, pd.NA, 1, 2, pd.NA, 0, pd.NA, 1]
    cell = cell_manifest(frame, 1, 0.5)
    assert list(cell.columns) == ["path", "label", "split", "sha256"]
    assert "".join(cell["split"].map({"train": "r", "val": "v", "test": "e", UNUSED: "u"})) == "uuevrrreurv"
    assert cell_manifest(frame, 0, 1.0)["split"].tolist() == frame["split"].tolist()


def test_rows_for_at_full_size_needs_no_ranks_and_a_fraction_of_zero_is_refused():
    plain = manifest_frame(make_items({"a": 20, "b": 20}), PARAMS)
    assert rows_for(plain, 0, 1.0)["split"].tolist() == plain["split"].tolist()
    with pytest.raises(UserError, match=re.escape("train fraction 0 is not in (0, 1]; check split.train_fractions")):
        rows_for(plain, 0, 0)


@pytest.mark.parametrize("repeats", [1, 2, 3])
def test_rows_for_names_how_many_repeats_the_manifest_has(repeats):
    frame = manifest_frame(make_items({"a": 20, "b": 20}), SplitParams(repeats=repeats))
    message = (f"the split manifest has {repeats} repeat(s), so there is no repeat {repeats + 2}; set split.repeats "
               f"to at least {repeats + 3} and rerun `dvc repro split`")
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        rows_for(frame, repeats + 2, 1.0)


def test_a_class_without_train_rows_keeps_its_val_and_test_rows_in_a_subset():
    """A hand-edited manifest whose class lost its train rows: a subset still keeps that class's held-out rows."""
    frame = manifest_frame(make_items({"a": 10, "b": 10}), SplitParams(train_fractions=(0.5, 1.0)))
    frame = frame[(frame["label"] == "a") | (frame["split"] != "train")].reset_index(drop=True)
    rows = rows_for(frame, 0, 0.5)
    assert rows[rows["label"] == "b"]["split"].tolist() == frame[frame["label"] == "b"]["split"].tolist()
    assert (rows[rows["label"] == "a"]["split"] == "train").sum() == 3  # half of its 6


def test_count_table_counts_each_class_and_split_with_totals():
    split = stratified_split(make_items({"a": 6, "b": 5}), PARAMS)
    table = count_table(split)
    assert list(table.columns) == ["train", "val", "test", "total"]
    assert table.to_dict("index") == {"a": {"train": 4, "val": 1, "test": 1, "total": 6},
                                      "b": {"train": 3, "val": 1, "test": 1, "total": 5},
                                      "total": {"train": 7, "val": 2, "test": 2, "total": 11}}
    no_test = count_table(split[split["split"] != "test"])
    assert no_test["test"].tolist() == [0, 0, 0]  # a split with no rows is a column of zeros


def test_scan_crops_skips_hidden_folders_and_stray_files(tmp_path):
    make_crops(tmp_path / "crops", {"coat": 3})
    (tmp_path / "crops" / ".cache").mkdir()  # e.g. a tool's hidden folder
    (tmp_path / "crops" / "README.txt").write_text("not a class")
    frame = scan_crops(tmp_path / "crops")
    assert list(frame.columns) == ["path", "label", "sha256"] and set(frame["label"]) == {"coat"}
    message = f"cropped images folder '{tmp_path / 'none'}' not found; run `dvc repro preprocess` first"
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        scan_crops(tmp_path / "none")


def test_write_manifest_makes_its_folder_returns_plain_rows_and_reports_repeats(tmp_path, capsys):
    make_crops(tmp_path / "crops", {"coat": 10, "shirt": 10})
    shutil.copy(tmp_path / "crops" / "coat" / "000.png", tmp_path / "crops" / "shirt" / "stray.png")
    manifest = tmp_path / "a" / "b" / "manifest.csv"
    written = write_manifest(tmp_path / "crops", manifest, SplitParams(repeats=2))
    assert list(written.index) == list(range(19)) and "index" not in written.columns
    assert manifest.read_bytes().count(b"\r") == 0 and list(pd.read_csv(manifest).columns)[:4] == [
        "path", "label", "split", "sha256"]
    out = capsys.readouterr().out
    assert "2 split repeat(s); train images per class (repeat 0) at each fraction: 1: 6.5" in out
    assert "excluded 2 image(s) whose content appears under two labels:" in out
