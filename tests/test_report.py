"""Tests for report.py: a runs table (evaluate's runs.csv) and the run folders of the study's own
split go through write_report; every report file quotes one verdict per comparison."""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from test_inference import make_runs

from transfer_study.cli import main
from transfer_study.config import EvaluateParams, UserError
from transfer_study.inference import mcnemar
from transfer_study.report import figure1, read_study_table, write_report

STUDY_TABLE = Path(__file__).resolve().parents[1] / "references" / "study_table1.csv"
CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "shirt"]
N_TEST = 270
PARAMS = EvaluateParams(bootstrap_samples=300, confidence=0.95, seed=0)
LABELS = np.random.default_rng(0).integers(0, len(CLASSES), N_TEST)  # one test set, shared by the study split's runs
EFFECTS = {("resnet18", "frozen"): {0.25: 0.12, 1.0: 0.08}, ("resnet18", "finetune"): {0.25: 0.02, 1.0: 0.0},
           ("vgg19", "frozen"): {0.25: 0.03, 1.0: -0.02}, ("small_cnn", "scratch"): {0.25: 0.0, 1.0: 0.03}}
BROKEN = "resnet18-scratch-s1-x3-r0-f0.25"  # predicts one class on validation
REPORT_FILES = ("table1.md", "comparison.md", "across_runs.md", "conclusion.md")


def run_predictions(accuracy: float, seed: int) -> pd.DataFrame:
    """Test predictions with round(accuracy * 270) right answers on the shared test images."""
    rng = np.random.default_rng(seed)
    right = np.zeros(N_TEST, dtype=bool)
    right[rng.choice(N_TEST, int(round(accuracy * N_TEST)), replace=False)] = True
    pred = np.where(right, LABELS, (LABELS + 1) % len(CLASSES))
    frame = pd.DataFrame({"path": [f"test/{i}.png" for i in range(N_TEST)], "split": "test", "label": LABELS,
                          "pred": pred})
    for k in range(len(CLASSES)):
        frame[f"prob_{k}"] = (pred == k) * 0.9 + 0.02
    return frame


def write_project(root: Path, runs: pd.DataFrame, class_names=CLASSES) -> Path:
    """evaluation/runs.csv, and run folders (run.json, predictions.csv) for the runs of the study's split."""
    (root / "evaluation").mkdir(parents=True)
    runs.to_csv(root / "evaluation" / "runs.csv", index=False)
    study_split = runs[(runs["replicate"] == 0) & (runs["repeat"] == 0) & (runs["fraction"] == 1.0)]
    for i, row in study_split.iterrows():
        run_dir = root / "models" / row["run_dir"]
        run_dir.mkdir(parents=True)
        run_predictions(row["test_accuracy"], seed=i).to_csv(run_dir / "predictions.csv", index=False)
        (run_dir / "run.json").write_text(json.dumps({
            "run_id": f"{i:032x}", "architecture": row["architecture"], "condition": row["condition"],
            "seed": int(row["seed"]), "class_names": list(class_names), "model_uri": f"runs:/{i:032x}/model"}))
    return root


def replicated_runs() -> pd.DataFrame:
    runs = make_runs(EFFECTS, replicates=range(4), seeds=range(2))
    runs.loc[runs["run"] == BROKEN, "single_class"] = True
    runs.loc[runs["run"].str.startswith("resnet18-finetune-s0"), "hit_cap"] = True
    return runs


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Four replicates × two seeds × two sizes → write_report on the study's data and as your data."""
    root = write_project(tmp_path_factory.mktemp("report"), replicated_runs())
    write_report(root / "evaluation", root / "models", root / "reports", STUDY_TABLE, PARAMS, is_study_data=True)
    write_report(root / "evaluation", root / "models", root / "reports-yours", STUDY_TABLE, PARAMS,
                 is_study_data=False)
    return root


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """The study profile: one run per cell, one split."""
    root = write_project(tmp_path_factory.mktemp("single"), make_runs(EFFECTS, replicates=[0], seeds=[0]))
    write_report(root / "evaluation", root / "models", root / "reports", STUDY_TABLE, PARAMS, is_study_data=True)
    return root


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table in text, as a list of {header: cell} rows."""
    tables, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|---") and i > 0 and lines[i - 1].startswith("| "):
            header = [h.strip() for h in lines[i - 1].strip("|").split("|")]
            rows = []
            for row in lines[i + 1:]:
                if not row.startswith("| "):
                    break
                rows.append(dict(zip(header, (c.strip() for c in row.strip("|").split("|")))))
            tables.append(rows)
    return tables


def verdicts_by_file(reports: Path) -> dict[str, dict[str, set[str]]]:
    """{comparison: {file: verdicts}} from every table with 'comparison' and 'verdict' columns."""
    found: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for name in REPORT_FILES:
        for table in markdown_tables((reports / name).read_text()):
            for row in table:
                if "comparison" in row and "verdict" in row:
                    found[row["comparison"]][name].add(row["verdict"])
    return found


# --------------------------------------------------------------------------- one verdict


def test_every_comparison_has_one_verdict_in_every_file(report):
    """A comparison printed in several report files carries the same verdict words in each."""
    found = verdicts_by_file(report / "reports")
    shared = {c: files for c, files in found.items() if len(files) > 1}
    assert len(shared) >= 6, sorted(found)  # the check has something to check
    primary = "resnet18 frozen − resnet18 scratch, 210 per class, external test accuracy"
    assert set(shared[primary]) == {"table1.md", "across_runs.md", "conclusion.md"}
    in_split = "resnet18 frozen − resnet18 scratch, 210 per class, in-split test accuracy"
    assert set(shared[in_split]) == set(REPORT_FILES)
    for name, files in found.items():
        words = set().union(*files.values())
        assert len(words) == 1, (name, dict(files))
    decided = pd.read_csv(report / "reports" / "comparisons.csv")
    assert len(decided) == len(decided.drop_duplicates(["a", "b", "fraction", "outcome"]))
    assert {"established", "not established"} <= set(decided["verdict"])


def test_the_conclusions_sentences_quote_the_same_verdicts(report):
    decided = pd.read_csv(report / "reports" / "comparisons.csv").query("family == 'primary'")
    conclusion = (report / "reports" / "conclusion.md").read_text()
    bullets = [line for line in conclusion.splitlines() if line.startswith("- ")]
    assert len(bullets) == len(decided) == 4  # resnet18 frozen, finetune; vgg19 frozen; best − best
    for bullet, row in zip(bullets, decided.itertuples()):
        assert f"{row.a} − {row.b}" in bullet and f": {row.verdict} (primary)." in bullet, bullet


# --------------------------------------------------------------------------- the files


def test_table1_means_are_over_units_with_intervals_over_units(report):
    table = pd.read_csv(report / "reports" / "table1.csv")
    assert list(zip(table["architecture"], table["condition"])) == [
        ("resnet18", "scratch"), ("resnet18", "frozen"), ("resnet18", "finetune"), ("vgg19", "scratch"),
        ("vgg19", "frozen"), ("small_cnn", "scratch")]
    runs = replicated_runs().query("architecture == 'resnet18' and condition == 'frozen' and fraction == 1.0")
    frozen = table.iloc[1]
    assert frozen["units"] == 4 and frozen["runs"] == 8 and frozen["interval_over"] == "units"
    units = runs.groupby("replicate")["test_accuracy"].mean()
    assert frozen["accuracy"] == pytest.approx(units.mean())
    assert frozen["accuracy_sd"] == pytest.approx(units.std(ddof=1))
    assert frozen["accuracy_ci_low"] < units.mean() < frozen["accuracy_ci_high"]
    assert frozen["external_accuracy"] == pytest.approx(units.mean() + 0.01)
    markdown = (report / "reports" / "table1.md").read_text()
    assert "The unit is the replicate: 4 independent replicate datasets" in markdown
    assert "| resnet18 | frozen | 8 | 4 |" in markdown
    assert "0.17 points" in markdown  # the study's smallest gap, resnet18 vs inception_v3 fine-tuned


def test_one_run_per_cell_gets_its_test_image_interval_and_no_verdict(single_runs):
    table = pd.read_csv(single_runs / "reports" / "table1.csv")
    runs = pd.read_csv(single_runs / "evaluation" / "runs.csv").set_index("run_dir")
    assert (table["interval_over"] == "test images").all() and (table["units"] == 1).all()
    assert table.loc[0, "accuracy_ci_low"] == runs.loc["resnet18-scratch/resnet18-scratch-s0-x0-r0-f1",
                                                       "test_accuracy_ci_low"]
    conclusion = (single_runs / "reports" / "conclusion.md").read_text()
    assert "**One run per cell (or seeds on one split) establishes nothing.**" in conclusion
    verdicts = {v for files in verdicts_by_file(single_runs / "reports").values() for vs in files.values() for v in vs}
    assert {v.split(" (")[0] for v in verdicts} == {"undetermined: too few units"}
    assert "Wilson's score interval for accuracy" in (single_runs / "reports" / "table1.md").read_text()


def test_runs_md_shows_epochs_caps_and_the_runs_kept_out(report):
    runs_md = (report / "reports" / "runs.md").read_text()
    (broken,) = [row for table in markdown_tables(runs_md) for row in table if row["run"] == BROKEN]
    assert broken["in verdicts"] == "kept out (one class on validation)"
    capped = [row for table in markdown_tables(runs_md) for row in table if row["run"].startswith("resnet18-finetune-s0")]
    assert capped and all(row["still improving at the cap"] == "yes" and row["epochs"] == "20"
                          and row["epoch cap"] == "40" for row in capped)
    for name in ("table1.md", "across_runs.md", "conclusion.md"):
        assert f"Kept out of every mean, interval and verdict: 1 run(s) that predict a single class for every " \
               f"validation image ({BROKEN})" in (report / "reports" / name).read_text(), name
    across = pd.read_csv(report / "reports" / "across_runs.csv")
    scratch = across.query("architecture == 'resnet18' and condition == 'scratch' and fraction == 0.25 "
                           "and outcome == 'test_accuracy'").iloc[0]
    assert scratch["n_runs"] == 7  # 4 replicates x 2 seeds, less the one-class run


def test_mcnemar_describes_one_test_set_without_a_verdict(report):
    tests = pd.read_csv(report / "reports" / "mcnemar.csv")
    assert "verdict" not in tests.columns
    assert sorted(zip(tests["architecture"], tests["condition_b"], tests["seed_a"])) == [
        ("resnet18", "finetune", 0), ("resnet18", "finetune", 1), ("resnet18", "frozen", 0), ("resnet18", "frozen", 1),
        ("vgg19", "frozen", 0), ("vgg19", "frozen", 1)]
    scratch = pd.read_csv(report / "models" / "vgg19-scratch" / "vgg19-scratch-s0-x0-r0-f1" / "predictions.csv")
    frozen = pd.read_csv(report / "models" / "vgg19-frozen" / "vgg19-frozen-s0-x0-r0-f1" / "predictions.csv")
    expected = mcnemar(scratch["label"] == scratch["pred"], frozen["label"] == frozen["pred"])
    row = tests[(tests["architecture"] == "vgg19") & (tests["seed_a"] == 0)].iloc[0]
    assert (row["b"], row["c"]) == (expected["b"], expected["c"]) and row["p_value"] == pytest.approx(expected["p_value"])
    markdown = (report / "reports" / "mcnemar.md").read_text()
    assert "A description of one test set" in markdown and "not a verdict" in markdown
    assert not any("verdict" in row for table in markdown_tables(markdown) for row in table)


def test_comparison_sets_the_studys_gaps_beside_our_verdicts(report):
    comparison = pd.read_csv(report / "reports" / "comparison.csv")
    vgg_frozen = comparison[(comparison["architecture"] == "vgg19") & (comparison["condition"] == "frozen")].iloc[0]
    assert vgg_frozen["study_condition"] == "fine-tuned" and vgg_frozen["study_accuracy"] == 0.8666
    markdown = (report / "reports" / "comparison.md").read_text()
    (gaps,) = [t for t in markdown_tables(markdown) if t and "study gap (points, one run)" in t[0]]
    vgg = [row for row in gaps if row["comparison"].startswith("vgg19 frozen − vgg19 scratch")][0]
    assert vgg["study gap (points, one run)"] == "+12.2" and vgg["ours (points)"].startswith("-")
    (inception,) = [r for r in markdown.splitlines() if r.startswith("| inception_v3 | frozen |")]
    assert "| 0.8333 | — |" in inception  # study accuracy, our cell missing


def test_figures_and_the_learning_curve(report):
    with Image.open(report / "reports" / "figure1.png") as image:
        assert image.size == (1032, 540)  # (2 + 2.2 per architecture) x 4.5 inches at 120 dpi
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    drawn = {tuple(c): n for c, n in zip(colours.tolist(), counts)}
    for condition, colour in (("scratch", (31, 119, 180)), ("frozen", (255, 127, 14)), ("finetune", (44, 160, 44))):
        assert drawn.get(colour, 0) > 1000, f"no {condition} bars"
    assert drawn.get((255, 0, 0), 0) > 20, "no study markers"
    curve = pd.read_csv(report / "reports" / "learning_curve.csv")
    assert list(curve.columns) == ["train_per_class", "resnet18-scratch", "resnet18-frozen", "resnet18-finetune",
                                   "vgg19-scratch", "vgg19-frozen", "small_cnn-scratch"]
    assert curve["train_per_class"].tolist() == [53, 210]
    runs = replicated_runs().query("architecture == 'vgg19' and condition == 'frozen' and fraction == 1.0")
    assert curve.loc[1, "vgg19-frozen"] == pytest.approx(runs.groupby("replicate")["external_accuracy"].mean().mean(),
                                                         abs=1e-6)  # the primary outcome, over units
    with Image.open(report / "reports" / "learning_curve.png") as image:
        assert np.asarray(image.convert("L")).std() > 10


def test_figure1_marks_the_study_only_on_its_data(report):
    table = pd.read_csv(report / "reports" / "table1.csv")
    runs = pd.read_csv(report / "evaluation" / "runs.csv").query("fraction == 1.0")
    for study, markers_expected in ((read_study_table(STUDY_TABLE), 4), (None, 0)):
        ax = figure1(table, runs, study, 0.95).axes[0]
        markers = sum(len(line.get_xdata()) for line in ax.get_lines() if line.get_marker() == "x")
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert markers == markers_expected and ("study (one run)" in legend) == (study is not None)
    assert "your data" in ax.get_title()


def test_report_on_your_data_compares_nothing_with_the_study(report):
    study_md, yours_md = ((report / d / "table1.md").read_text() for d in ("reports", "reports-yours"))
    assert study_md.startswith("# Table 1 (reproduced):") and "The study's smallest gap" in study_md
    assert yours_md.startswith("# Table 1 \u2014 your data:") and "reproduced" not in yours_md
    assert "study" not in yours_md.lower()
    pd.testing.assert_frame_equal(pd.read_csv(report / "reports" / "table1.csv"),
                                  pd.read_csv(report / "reports-yours" / "table1.csv"))  # same numbers
    comparison = (report / "reports-yours" / "comparison.md").read_text()
    assert "applies only to the study's dataset" in comparison and "your data" in comparison
    assert "|" not in comparison and "dvc commit" not in comparison  # no table; data.dvc is not stale
    assert not (report / "reports-yours" / "comparison.csv").exists()
    assert "(83.2% vs 71.9%)" not in (report / "reports-yours" / "conclusion.md").read_text()


def test_stale_data_dvc_does_not_bring_the_study_in(tmp_path):
    """data.dvc still at the default version, runs trained on other classes: your data, and why."""
    root = write_project(tmp_path, make_runs(EFFECTS, replicates=[0, 1, 2], seeds=[0]),
                         class_names=["temple", "flower", "a", "b", "c", "d"])
    (root / "reports").mkdir()
    (root / "reports" / "comparison.csv").write_text("left by an earlier report\n")
    write_report(root / "evaluation", root / "models", root / "reports", STUDY_TABLE, PARAMS, is_study_data=True)
    comparison = (root / "reports" / "comparison.md").read_text()
    assert "temple" in comparison and "`dvc commit --force data.dvc`" in comparison and "|" not in comparison
    assert "your data" in (root / "reports" / "table1.md").read_text().splitlines()[0]
    assert not (root / "reports" / "comparison.csv").exists()


def test_a_single_run_is_reported_with_nothing_to_compare(tmp_path):
    """The own-data quick run in tests/test_pipeline.py: one cell, one run."""
    runs = make_runs({("efficientnet_lite0", "frozen"): {1.0: 0.1}}, replicates=[0], seeds=[0], external=False)
    root = write_project(tmp_path, runs[runs["condition"] == "frozen"])
    inference = write_report(root / "evaluation", root / "models", root / "reports", STUDY_TABLE, PARAMS,
                             is_study_data=False)
    assert inference.comparisons.empty
    conclusion = (root / "reports" / "conclusion.md").read_text()
    assert "No architecture has both a scratch and a pretrained run, so there is nothing to conclude." in conclusion
    assert "Only one cell: nothing to compare." in (root / "reports" / "table1.md").read_text()


def test_every_run_predicting_one_class_is_a_user_error_naming_them(tmp_path):
    """Nothing kept at the full size: a message naming the runs and what to change, not a KeyError."""
    runs = make_runs({("efficientnet_lite0", "frozen"): {1.0: 0.1}}, replicates=[0], seeds=[0], external=False)
    runs = runs.assign(single_class=True)
    root = write_project(tmp_path, runs)
    names = ", ".join(runs["run"])
    with pytest.raises(UserError) as caught:
        write_report(root / "evaluation", root / "models", root / "reports", STUDY_TABLE, PARAMS, is_study_data=False)
    assert str(caught.value) == (
        f"every run at the full training size ({names}) predicts one class for every validation image, so the "
        f"report has nothing to compare; train longer (train.early_stopping or train.epochs) or check that the "
        f"classes differ in '{root / 'evaluation' / 'runs.csv'}'")


def test_a_runs_table_without_the_new_columns_says_to_evaluate_again(tmp_path):
    root = write_project(tmp_path, make_runs(EFFECTS, replicates=[0], seeds=[0]))
    runs = pd.read_csv(root / "evaluation" / "runs.csv")
    runs.drop(columns=["replicate", "hit_cap"]).to_csv(root / "evaluation" / "runs.csv", index=False)
    with pytest.raises(UserError, match=r"lacks runs or column\(s\) replicate, hit_cap; rerun `dvc repro evaluate`"):
        write_report(root / "evaluation", root / "models", root / "reports", STUDY_TABLE, PARAMS, is_study_data=True)


def test_missing_study_table_is_a_user_error(report, tmp_path):
    with pytest.raises(UserError) as error:
        write_report(report / "evaluation", report / "models", tmp_path, tmp_path / "nope.csv", PARAMS,
                     is_study_data=True)
    assert str(error.value) == (f"study table '{tmp_path / 'nope.csv'}' not found; it ships in "
                                "references/study_table1.csv")


def test_missing_evaluation_says_to_evaluate(tmp_path):
    shutil.rmtree(tmp_path, ignore_errors=True)
    with pytest.raises(UserError, match="dvc repro evaluate"):
        write_report(tmp_path / "evaluation", tmp_path / "models", tmp_path / "reports", STUDY_TABLE, PARAMS,
                     is_study_data=True)


@pytest.mark.parametrize("data_dvc, title", [(True, "# Table 1 (reproduced):"), (False, "# Table 1 \u2014 your data:")])
def test_cli_report_compares_with_the_study_when_data_dvc_records_its_data(report, tmp_path, monkeypatch,
                                                                            data_dvc, title):
    repo = STUDY_TABLE.parents[1]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["bootstrap_samples"] = 100  # fast: the numbers are not what this test checks
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(repo / "references", tmp_path / "references")
    for folder in ("evaluation", "models"):
        (tmp_path / folder).symlink_to(report / folder)
    if data_dvc:
        shutil.copy(repo / "data.dvc", tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["transfer-study", "report"])
    main()
    assert (tmp_path / "reports" / "table1.md").read_text().startswith(title)
    assert (tmp_path / "reports" / "comparison.csv").exists() == data_dvc
