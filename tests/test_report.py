"""Tests for report.py: fake runs go through evaluate_runs (real SQLite MLflow store) and
write_report; the report must say "not distinguishable from noise" exactly where true."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from transfer_study.cli import main
from transfer_study.config import EvaluateParams, UserError
from transfer_study.evaluate import evaluate_runs, mcnemar
from transfer_study.report import (RunTestSet, figure1, pooled_interval, read_runs_table, read_study_table,
                                   read_test_sets, summarise_cells, write_report)

STUDY_TABLE = Path(__file__).resolve().parents[1] / "references" / "study_table1.csv"
CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "shirt"]
N_TEST = 270
PARAMS = EvaluateParams(bootstrap_samples=500, confidence=0.95, seed=0)
LABELS = np.random.default_rng(0).integers(0, len(CLASSES), N_TEST)  # one test set, shared by every run
# (architecture, condition, seed): how many of the 270 test images the run gets right
RUNS = {
    ("resnet18", "scratch", 0): 175, ("resnet18", "scratch", 1): 170,   # ~0.64
    ("resnet18", "frozen", 0): 224, ("resnet18", "frozen", 1): 229,     # ~0.84
    ("vgg19", "scratch", 0): 180,                                       # ~0.67
    ("vgg19", "frozen", 0): 227,                                        # ~0.84: same as resnet18 frozen
    ("vgg19", "finetune", 0): 232,
}
NOISE = "not distinguishable from noise on 270 test images"


def run_predictions(n_correct: int, seed: int) -> pd.DataFrame:
    """Test (and a few val) predictions with exactly n_correct right answers on the test images."""
    rng = np.random.default_rng(seed)
    right = np.zeros(N_TEST, dtype=bool)
    right[rng.choice(N_TEST, n_correct, replace=False)] = True
    pred = np.where(right, LABELS, (LABELS + 1) % len(CLASSES))
    proba = rng.dirichlet(np.ones(len(CLASSES)), N_TEST) * 0.5
    proba[np.arange(N_TEST), pred] += 0.5
    frame = pd.DataFrame({"path": [f"test/{i}.png" for i in range(N_TEST)], "split": "test",
                          "label": LABELS, "pred": pred})
    for k in range(len(CLASSES)):
        frame[f"prob_{k}"] = proba[:, k]
    val = frame.head(30).assign(split="val", path=lambda f: f["path"].str.replace("test/", "val/"))
    return pd.concat([val, frame])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Run folders → evaluate_runs → write_report, once for the module; gives back the folders."""
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)  # a client, not mlflow.set_tracking_uri: no process-wide state
    experiment_id = client.create_experiment("test", artifact_location=(root / "artifacts").as_uri())
    for i, ((arch, condition, seed), n_correct) in enumerate(RUNS.items()):
        run = client.create_run(experiment_id)
        run_dir = root / "models" / f"{arch}-{condition}" / f"s{seed}"
        run_dir.mkdir(parents=True)
        run_predictions(n_correct, seed=i).to_csv(run_dir / "predictions.csv", index=False)
        (run_dir / "run.json").write_text(json.dumps({
            "run_id": run.info.run_id, "architecture": arch, "condition": condition, "seed": seed,
            "class_names": CLASSES, "model_uri": f"runs:/{run.info.run_id}/model"}))
    evaluate_runs(root / "models", root / "evaluation", PARAMS, uri)
    write_report(root / "evaluation", root / "models", root / "reports", STUDY_TABLE, PARAMS, is_study_data=True)
    write_report(root / "evaluation", root / "models", root / "reports-yours", STUDY_TABLE, PARAMS,
                 is_study_data=False)
    return root


def pair_line(markdown: str, cell_a: str, cell_b: str) -> str:
    """The row of table1.md's pair table comparing two cells."""
    (line,) = [row for row in markdown.splitlines() if row.startswith(f"| {cell_a} | {cell_b} |")]
    return line


def test_table1_has_one_row_per_cell_with_seed_mean_and_intervals(report):
    table = pd.read_csv(report / "reports" / "table1.csv")
    assert list(zip(table["architecture"], table["condition"])) == [
        ("resnet18", "scratch"), ("resnet18", "frozen"), ("vgg19", "scratch"), ("vgg19", "frozen"),
        ("vgg19", "finetune")]
    resnet_frozen = table.iloc[1]
    assert resnet_frozen["seeds"] == 2
    assert resnet_frozen["accuracy"] == pytest.approx((224 + 229) / 2 / N_TEST)
    assert resnet_frozen["accuracy_std"] == pytest.approx(np.std([224 / N_TEST, 229 / N_TEST], ddof=1))
    assert resnet_frozen["accuracy_ci_low"] < 224 / N_TEST and 229 / N_TEST < resnet_frozen["accuracy_ci_high"]
    for label in ("f1", "precision", "recall", "auc"):
        assert (table[f"{label}_ci_low"] <= table[label]).all() and (table[label] <= table[f"{label}_ci_high"]).all()

    markdown = (report / "reports" / "table1.md").read_text()
    assert "0.8389 ± 0.0131 [" in markdown  # mean ± std [CI] for the two-seed cell
    assert "draws one of the cell's seeds" in markdown  # the pooling method is stated
    mean_accuracy = table["accuracy"].mean()  # the report quotes the half-width near the mean accuracy
    half_width = 1.96 * np.sqrt(mean_accuracy * (1 - mean_accuracy) / N_TEST)
    assert f"N = 270 test images, a 95% interval on an accuracy near {mean_accuracy:.2f}" in markdown
    assert f"half-width of about ±{half_width * 100:.1f} points" in markdown


def test_table1_says_where_differences_are_noise(report):
    markdown = (report / "reports" / "table1.md").read_text()
    same = pair_line(markdown, "resnet18 frozen", "vgg19 frozen")
    assert NOISE in same and "| yes |" in same  # 0.84 vs 0.84: CIs overlap
    apart = pair_line(markdown, "resnet18 scratch", "resnet18 frozen")
    assert "distinguishable (McNemar p < 0.05" in apart and NOISE not in apart
    assert "0.17 points" in markdown  # the study's smallest gap, resnet18 vs inception_v3 fine-tuned


def test_comparison_maps_conditions_and_marks_missing_cells(report):
    comparison = pd.read_csv(report / "reports" / "comparison.csv")
    vgg_frozen = comparison[(comparison["architecture"] == "vgg19") & (comparison["condition"] == "frozen")].iloc[0]
    assert vgg_frozen["study_condition"] == "fine-tuned" and vgg_frozen["study_accuracy"] == 0.8666
    assert vgg_frozen["ours_accuracy"] == pytest.approx(227 / N_TEST)

    markdown = (report / "reports" / "comparison.md").read_text()
    (finetune,) = [r for r in markdown.splitlines() if r.startswith("| vgg19 | finetune |")]
    assert finetune.split("|")[3].strip() == "—"  # the study did not run finetune
    (inception,) = [r for r in markdown.splitlines() if r.startswith("| inception_v3 | frozen |")]
    assert "| 0.8333 | — |" in inception  # study accuracy, our cell missing


def test_figure1_draws_a_bar_per_condition_and_the_studys_marks(report):
    from PIL import Image

    with Image.open(report / "reports" / "figure1.png") as image:
        assert image.size == (768, 540)  # (2 + 2.2 per architecture) x 4.5 inches at 120 dpi
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    drawn = {tuple(c): n for c, n in zip(colours.tolist(), counts)}
    # matplotlib's first three colours: scratch, frozen, finetune bars (solid, thousands of pixels)
    for condition, colour in (("scratch", (31, 119, 180)), ("frozen", (255, 127, 14)), ("finetune", (44, 160, 44))):
        assert drawn.get(colour, 0) > 1000, f"no {condition} bars"
    assert drawn.get((255, 0, 0), 0) > 20, "no study markers"


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


def figure_parts(report, study) -> tuple[int, list[str], str]:
    """Figure 1 drawn from the fixture's runs: (red x markers, legend labels, title)."""
    runs = read_runs_table(report / "evaluation")
    test_sets = read_test_sets(runs, report / "models")
    table = summarise_cells(runs, test_sets, EvaluateParams(bootstrap_samples=50))
    ax = figure1(table, test_sets, runs, study, 0.95).axes[0]
    markers = sum(len(line.get_xdata()) for line in ax.get_lines() if line.get_marker() == "x")
    return markers, [t.get_text() for t in ax.get_legend().get_texts()], ax.get_title()


def test_figure1_marks_the_study_only_on_its_data(report):
    markers, legend, title = figure_parts(report, read_study_table(STUDY_TABLE))
    assert markers == 4 and "study (one run)" in legend  # resnet18 and vgg19, scratch and frozen
    markers, legend, title = figure_parts(report, None)
    assert markers == 0 and not [t for t in legend if "study" in t] and "your data" in title


def test_stale_data_dvc_does_not_bring_the_study_in(report, tmp_path):
    """data.dvc still at the default version, runs trained on other classes: your data, and why."""
    shutil.copytree(report / "models", tmp_path / "models")
    for run_json in (tmp_path / "models").glob("*/s*/run.json"):
        info = json.loads(run_json.read_text())
        run_json.write_text(json.dumps({**info, "class_names": ["temple", "flower", "a", "b", "c", "d"]}))
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "comparison.csv").write_text("left by an earlier report\n")
    write_report(report / "evaluation", tmp_path / "models", tmp_path / "reports", STUDY_TABLE, PARAMS,
                 is_study_data=True)
    comparison = (tmp_path / "reports" / "comparison.md").read_text()
    assert "temple" in comparison and "`dvc commit --force data.dvc`" in comparison and "|" not in comparison
    assert "your data" in (tmp_path / "reports" / "table1.md").read_text().splitlines()[0]
    assert not (tmp_path / "reports" / "comparison.csv").exists()


def test_mcnemar_pairs_scratch_with_each_pretrained_condition_per_seed(report):
    tests = pd.read_csv(report / "reports" / "mcnemar.csv")
    assert sorted(zip(tests["architecture"], tests["condition_b"], tests["seed_a"])) == [
        ("resnet18", "frozen", 0), ("resnet18", "frozen", 1), ("vgg19", "finetune", 0), ("vgg19", "frozen", 0)]
    assert tests["p_value"].between(0, 1).all()

    scratch = pd.read_csv(report / "models" / "vgg19-scratch" / "s0" / "predictions.csv").query("split == 'test'")
    frozen = pd.read_csv(report / "models" / "vgg19-frozen" / "s0" / "predictions.csv").query("split == 'test'")
    expected = mcnemar(scratch["label"] == scratch["pred"], frozen["label"] == frozen["pred"])
    row = tests[(tests["architecture"] == "vgg19") & (tests["condition_b"] == "frozen")].iloc[0]
    assert (row["b"], row["c"]) == (expected["b"], expected["c"])
    assert row["p_value"] == pytest.approx(expected["p_value"]) and row["p_value"] < 0.05
    assert "McNemar" in (report / "reports" / "mcnemar.md").read_text()


def test_pooled_interval_covers_the_seed_spread():
    labels = np.arange(300) % 3
    proba = np.full((300, 3), 1 / 3)
    good = RunTestSet("a", 0, np.arange(300), labels, np.where(np.arange(300) < 270, labels, (labels + 1) % 3), proba)
    poor = RunTestSet("b", 1, np.arange(300), labels, np.where(np.arange(300) < 180, labels, (labels + 1) % 3), proba)
    low, high = pooled_interval([good, poor], "accuracy", PARAMS)
    assert low <= 0.6 and 0.9 <= high


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
