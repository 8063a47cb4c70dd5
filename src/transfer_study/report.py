"""The `report` stage: the tables and figures in `reports/`, each quoting inference.py's one
decision per comparison in wording.py's words.

- table1.md/.csv: the study's Table 1 at the full training size, on the in-split test set;
- comparison.md/.csv: beside the study's published table (on the study's data only);
- across_runs.md/.csv: every cell at every training size, and pretrained − scratch per size;
- runs.md/.csv: every run: its units, epochs, whether it hit the cap, whether it was kept out;
- mcnemar.md/.csv: McNemar's test on the study's own test set, a description of those images;
- figure1.png, learning_curve.png/.csv (a DVC plot);
- conclusion.md: the answer (wording.conclusion_markdown).
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import stats

from .cells import cell_order
from .config import DEFAULT_DATASET_MD5, DataParams, EvaluateParams, UserError
from .evaluate import TRAINING_COLUMNS, read_predictions, split_arrays
from .inference import PRETRAINED, PRETRAINED_VS_SCRATCH, RUN_COLUMNS, Inference, cell_summary, infer, mcnemar
from .runs import read_run_info
from .wording import (
    DASH,
    OUTCOME_NAMES,
    comparison_cells,
    comparisons_table,
    conclusion_markdown,
    fmt,
    kept_out_text,
    markdown_table,
    p_text,
    points,
    units_noun,
    units_text,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Table 1 column → evaluate's metric name, in the study's column order (plus AUC).
TABLE_METRICS = {"f1": "f1_macro", "accuracy": "accuracy", "precision": "precision_macro",
                 "recall": "recall_macro", "auc": "auc_macro"}
STUDY_METRICS = ("f1", "accuracy", "precision", "recall")
# The study's "fine-tuned" trains only the classifier on frozen ImageNet features: our "frozen".
STUDY_TO_OURS = {"fine-tuned": "frozen", "scratch": "scratch"}
STUDY_CLASSES = DataParams().classes  # the default dataset's classes, the study's six garments
X = "train_per_class"
LINESTYLE = {"scratch": "-", "frozen": "--", "finetune": ":"}  # colour tells the architecture, style the condition


@dataclass(frozen=True)
class RunTestSet:
    """One run's test predictions, in file order."""

    __test__ = False  # not a pytest test class, despite the name

    run: str
    seed: int
    paths: np.ndarray
    y_true: np.ndarray
    y_pred: np.ndarray
    class_names: tuple[str, ...] = ()

    @property
    def correct(self) -> pd.Series:
        return pd.Series(self.y_true == self.y_pred, index=self.paths)


# --------------------------------------------------------------------------- reading


def read_runs_table(evaluation_dir: Path) -> pd.DataFrame:
    """runs.csv from the evaluate stage, with the columns the report reads (inference.RUN_COLUMNS,
    run_dir, the per-metric test columns and TRAINING_COLUMNS)."""
    path = Path(evaluation_dir) / "runs.csv"
    if not path.is_file():
        raise UserError(f"'{path}' not found; run `dvc repro evaluate` first")
    runs = pd.read_csv(path)
    needed = [*RUN_COLUMNS, "run_dir", *TRAINING_COLUMNS,
              *(f"test_{m}{s}" for m in TABLE_METRICS.values() for s in ("", "_ci_low", "_ci_high"))]
    missing = [c for c in dict.fromkeys(needed) if c not in runs.columns]
    if missing or runs.empty:
        raise UserError(f"'{path}' lacks runs or column(s) {', '.join(missing)}; rerun `dvc repro evaluate`")
    return runs


def read_test_sets(runs: pd.DataFrame, models_dir: Path) -> dict[str, RunTestSet]:
    """Each run's test predictions, read from its run folder."""
    test_sets = {}
    for row in runs.itertuples():
        run_dir = Path(models_dir) / row.run_dir
        info = read_run_info(run_dir)
        predictions = read_predictions(run_dir / "predictions.csv", len(info["class_names"]))
        y_true, y_pred, _ = split_arrays(predictions, "test")
        paths = predictions.loc[predictions["split"] == "test", "path"].to_numpy()
        test_sets[row.run] = RunTestSet(row.run, int(row.seed), paths, y_true, y_pred, tuple(info["class_names"]))
    return test_sets


def read_study_table(path: Path) -> pd.DataFrame:
    """The study's Table 1 (model, condition, f1, accuracy, precision, recall) with our condition names."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"study table '{path}' not found; it ships in references/study_table1.csv")
    study = pd.read_csv(path)
    missing = [c for c in ("model", "condition", *STUDY_METRICS) if c not in study.columns]
    if missing:
        raise UserError(f"study table '{path}' lacks column(s) {', '.join(missing)}")
    study = study.rename(columns={"model": "architecture", "condition": "study_condition"})
    study["condition"] = study["study_condition"].map(lambda c: STUDY_TO_OURS.get(c, c))
    return study


# --------------------------------------------------------------------------- Table 1


def summarise_cells(runs: pd.DataFrame, inference: Inference) -> pd.DataFrame:
    """Table 1: one row per (architecture, condition) at the full size, over the kept runs.

    Per metric label: the mean over units, sd over units, and the interval over units; a cell of
    one run gets its test-image interval instead (evaluate's), and a cell of several runs in too
    few units none. `interval_over` says which. External accuracy where every run has one.
    """
    kept = runs[~runs["single_class"].astype(bool) & (runs["fraction"] == inference.full_fraction)]
    outcomes = [f"test_{m}" for m in TABLE_METRICS.values()]
    external = inference.primary_outcome == "external_accuracy"
    summary = cell_summary(kept, inference.units, inference.confidence,
                           tuple(outcomes + (["external_accuracy"] if external else []))).set_index(
        ["architecture", "condition", "outcome"])
    rows = []
    for (arch, condition), cell_runs in sorted(kept.groupby(["architecture", "condition"]), key=lambda g: cell_order(g[0])):
        first = summary.loc[(arch, condition, "test_accuracy")]
        single = len(cell_runs) == 1
        row = {"architecture": arch, "condition": condition, "runs": len(cell_runs), "units": int(first["n_units"]),
               "n_test": int(cell_runs["n_test"].min()),
               "interval_over": "units" if not math.isnan(first["low"]) else ("test images" if single else "none")}
        for label, metric in [*TABLE_METRICS.items(), *([("external_accuracy", "accuracy")] if external else [])]:
            outcome = "external_accuracy" if label == "external_accuracy" else f"test_{metric}"
            cell = summary.loc[(arch, condition, outcome)]
            low, high = cell["low"], cell["high"]
            if single and outcome.startswith("test_"):
                low, high = cell_runs[f"{outcome}_ci_low"].iloc[0], cell_runs[f"{outcome}_ci_high"].iloc[0]
            row.update({label: cell["mean"], f"{label}_sd": cell["sd"], f"{label}_ci_low": low,
                        f"{label}_ci_high": high})
        rows.append(row)
    return pd.DataFrame(rows)


def cell_text(row, label: str) -> str:
    """'mean ± sd [low, high]' (± sd over units only with several units; no brackets without an interval)."""
    text = fmt(row[label])
    if row["units"] > 1 and not math.isnan(row[f"{label}_sd"]):
        text += f" ± {fmt(row[f'{label}_sd'])}"
    if not math.isnan(row[f"{label}_ci_low"]):
        text += f" [{fmt(row[f'{label}_ci_low'])}, {fmt(row[f'{label}_ci_high'])}]"
    return text


def half_width(accuracy: float, n_images: int, confidence: float) -> float:
    """Normal-approximation CI half-width of an accuracy measured on n images."""
    z = stats.norm.ppf(1 - (1 - confidence) / 2)
    return float(z * math.sqrt(accuracy * (1 - accuracy) / n_images))


def smallest_study_gap(study: pd.DataFrame) -> tuple[float, str, str] | None:
    """The smallest accuracy difference between two of the study's cells, and which cells."""
    cells = [(f"{r.architecture} {r.study_condition}", r.accuracy) for r in study.itertuples()]
    pairs = [(abs(x[1] - y[1]), x[0], y[0]) for x, y in itertools.combinations(cells, 2)]
    return min(pairs) if pairs else None


def table1_method_text(table: pd.DataFrame, inference: Inference, params: EvaluateParams) -> str:
    level = f"{params.confidence:.0%}"
    text = (f"Metrics are macro averages over classes on each run's own (in-split) test images, at the full "
            f"training size; each cell's value is the mean over its units. {units_text(inference)} Brackets: "
            f"the {level} interval over units where a cell has at least 3 of them (± their sd).")
    if (table["interval_over"] == "test images").any():
        text += (f" A cell of one run gets the {level} interval over its test images instead (Wilson's score "
                 f"interval for accuracy; a percentile bootstrap with {params.bootstrap_samples} resamples for the "
                 f"others, none where every resample scores the same): it shows test-set noise only, not how "
                 f"another seed or dataset would do.")
    if (table["interval_over"] == "none").any():
        text += " Cells with several runs in too few units get no interval."
    return text


def precision_text(table: pd.DataFrame, study: pd.DataFrame | None, params: EvaluateParams) -> str:
    """What CI half-width the test set size implies, against the study's smallest gap (None: your data)."""
    n_images = int(table["n_test"].min())
    accuracy = float(table["accuracy"].mean())
    level = f"{params.confidence:.0%}"
    near, worst = half_width(accuracy, n_images, params.confidence), half_width(0.5, n_images, params.confidence)
    text = (f"With N = {n_images} test images, a {level} interval on an accuracy near {accuracy:.2f} has a "
            f"half-width of about ±{near * 100:.1f} points (±{worst * 100:.1f} at 0.50): one test set of this size "
            f"cannot resolve differences between two runs much smaller than that.")
    gap = smallest_study_gap(study) if study is not None else None
    if gap is not None:
        text += (f" The study's smallest gap, {gap[1]} vs {gap[2]}, is {gap[0] * 100:.2f} points, "
                 f"far inside that margin: one test set of this size cannot tell such cells apart.")
    return text


def full_size_comparisons(inference: Inference, outcomes: tuple[str, ...]) -> pd.DataFrame:
    table = inference.comparisons
    return table[(table["fraction"] == inference.full_fraction) & table["outcome"].isin(outcomes)]


def table1_markdown(table: pd.DataFrame, inference: Inference, study: pd.DataFrame | None,
                    params: EvaluateParams) -> str:
    """Table 1 and which differences are established; titled "(reproduced)" on the study's data, "your data" otherwise."""
    labels = [*TABLE_METRICS, *(["external_accuracy"] if "external_accuracy" in table.columns else [])]
    header = ["model", "condition", "runs", "units", "F1", "accuracy", "precision", "recall", "AUC",
              *(["external accuracy"] if "external_accuracy" in table.columns else [])]
    rows = [[r["architecture"], r["condition"], str(r["runs"]), str(r["units"]), *[cell_text(r, label) for label in labels]]
            for _, r in table.iterrows()]
    title = "Table 1 (reproduced)" if study is not None else "Table 1 \u2014 your data"
    parts = [f"# {title}: test-set metrics by model and condition\n",
             table1_method_text(table, inference, params) + "\n", markdown_table(header, rows)]
    note = kept_out_text(inference.kept_out)
    if note:
        parts.append(note + "\n")
    parts += ["## How precise is one test set?\n", precision_text(table, study, params) + "\n",
              "## Which differences are established?\n"]
    pairs = full_size_comparisons(inference, ("test_accuracy", "external_accuracy"))
    if pairs.empty:
        parts.append("Only one cell: nothing to compare.\n")
        return "\n".join(parts)
    parts.append("Every pair of cells, decided once over independent units (conclusion.md says how); the "
                 "verdicts are the same in every report file.\n")
    parts.append(comparisons_table(pairs, inference.confidence))
    return "\n".join(parts)


# --------------------------------------------------------------------------- beside the study


def compare_with_study(table: pd.DataFrame, study: pd.DataFrame) -> pd.DataFrame:
    """Our cells beside the study's, matched on (architecture, our condition); NaN where a side is missing."""
    ours = table.set_index(["architecture", "condition"])
    theirs = study.set_index(["architecture", "condition"])
    keys = sorted(set(ours.index) | set(theirs.index), key=cell_order)
    rows = []
    for key in keys:
        row = {"architecture": key[0], "condition": key[1],
               "study_condition": theirs.at[key, "study_condition"] if key in theirs.index else None}
        for metric in STUDY_METRICS:
            row[f"study_{metric}"] = float(theirs.at[key, metric]) if key in theirs.index else float("nan")
            row[f"ours_{metric}"] = float(ours.at[key, metric]) if key in ours.index else float("nan")
        low = ours.at[key, "accuracy_ci_low"] if key in ours.index else float("nan")
        high = ours.at[key, "accuracy_ci_high"] if key in ours.index else float("nan")
        row["ours_accuracy_ci_low"], row["ours_accuracy_ci_high"] = low, high
        row["accuracy_difference"] = row["ours_accuracy"] - row["study_accuracy"]
        both = not (math.isnan(low) or math.isnan(row["study_accuracy"]))
        row["study_accuracy_in_our_ci"] = (low <= row["study_accuracy"] <= high) if both else None
        rows.append(row)
    return pd.DataFrame(rows)


def study_gaps_markdown(inference: Inference, study: pd.DataFrame) -> str:
    """The study's pretrained − scratch gaps beside our comparisons on the in-split test set."""
    table = full_size_comparisons(inference, ("test_accuracy",))
    table = table[table["roles"].str.contains(PRETRAINED_VS_SCRATCH, regex=False)]
    accuracy = study.set_index(["architecture", "condition"])["accuracy"]
    rows = []
    for _, r in table.iterrows():
        a, b = (r["a_architecture"], r["a_condition"]), (r["b_architecture"], r["b_condition"])
        gap = accuracy[a] - accuracy[b] if a in accuracy.index and b in accuracy.index else math.nan
        cells = comparison_cells(r)
        rows.append([cells[0], points(gap), cells[2], cells[3], cells[6]])
    if not rows:
        return ""
    header = ["comparison", "study gap (points, one run)", "ours (points)", f"our {inference.confidence:.0%} interval",
              "verdict"]
    return "\n## Pretrained − scratch: the study's gap beside ours\n\n" + markdown_table(header, rows)


def comparison_markdown(comparison: pd.DataFrame, inference: Inference, study: pd.DataFrame,
                        params: EvaluateParams) -> str:
    header = ["model", "condition (ours)", "study condition"]
    for metric in STUDY_METRICS:
        header += [f"{metric} study", f"{metric} ours"]
    header += [f"our accuracy {params.confidence:.0%} CI", "study accuracy inside our CI"]
    rows = []
    for r in comparison.itertuples():
        row = [r.architecture, r.condition, r.study_condition if isinstance(r.study_condition, str) else DASH]
        for metric in STUDY_METRICS:
            row += [fmt(getattr(r, f"study_{metric}")), fmt(getattr(r, f"ours_{metric}"))]
        ci = (DASH if math.isnan(r.ours_accuracy_ci_low)
              else f"[{fmt(r.ours_accuracy_ci_low)}, {fmt(r.ours_accuracy_ci_high)}]")
        inside = DASH if r.study_accuracy_in_our_ci is None else ("yes" if r.study_accuracy_in_our_ci else "no")
        rows.append(row + [ci, inside])
    intro = ("# Side by side with the study's Table 1\n\n"
             "The study's \"fine-tuned\" (ImageNet weights, only the classifier trained) is our \"frozen\"; "
             "\"scratch\" is \"scratch\". The study did not run \"finetune\" (every layer trained from ImageNet "
             "weights). \u2014 marks a cell missing on one side. The study reports one run per cell and no intervals; "
             "its precision/recall/F1 averaging is not stated (ours are macro averages, on the in-split test set).\n")
    return intro + "\n" + markdown_table(header, rows) + study_gaps_markdown(inference, study)


def your_data_markdown(class_names: list[str], stale_data_dvc: bool) -> str:
    """comparison.md for runs on other data than the default dataset: why there is no side-by-side."""
    text = ("# Side by side with the study's Table 1\n\n"
            "Not made for these runs: the comparison with the study applies only to the study's dataset, the "
            f"default one (Fashion-MNIST's six garment classes, version {DEFAULT_DATASET_MD5} in data.dvc). "
            f"These runs were trained on your data (classes: {', '.join(class_names)}), so table1.md and "
            "figure1.png show your data alone.\n")
    if stale_data_dvc:
        text += ("\ndata.dvc still records the default dataset, but the runs were trained on other classes: "
                 "record your data with `dvc commit --force data.dvc`, then `git commit data.dvc`.\n")
    return text


# --------------------------------------------------------------------------- across runs, runs, McNemar


def mean_and_interval(mean: float, low: float, high: float) -> str:
    """'mean [low, high]', or the mean alone where there is no interval."""
    return fmt(mean) + ("" if math.isnan(low) else f" [{fmt(low)}, {fmt(high)}]")


def across_runs_markdown(inference: Inference) -> str:
    """Each cell at each size (mean [interval] over units), then pretrained − scratch per size."""
    cells = inference.cells
    outcomes = [o for o in OUTCOME_NAMES if o in set(cells["outcome"])]
    rows = []
    groups = cells.groupby(["architecture", "condition", "train_per_class"])
    for arch, condition, size in sorted(groups.groups, key=lambda k: (*cell_order(k[:2]), k[2])):
        by_outcome = groups.get_group((arch, condition, size)).set_index("outcome")
        rows.append([arch, condition, f"{size:g}", str(by_outcome["n_runs"].max()), str(by_outcome["n_units"].max()),
                     *[mean_and_interval(*by_outcome.loc[o, ["mean", "low", "high"]]) if o in by_outcome.index
                       else DASH for o in outcomes]])
    header = ["model", "condition", "train images per class", "runs", "units", *[OUTCOME_NAMES[o] for o in outcomes]]
    curves = inference.comparisons[inference.comparisons["roles"].str.contains(PRETRAINED_VS_SCRATCH, regex=False)]
    curves = curves.sort_values(["a_architecture", "a_condition", "outcome", "train_per_class"])
    parts = ["# Across replicates, splits and seeds\n",
             f"{units_text(inference)} Each value is the mean over units [its {inference.confidence:.0%} interval over "
             f"units, where there are enough]. conclusion.md says which comparisons are primary.\n",
             markdown_table(header, rows)]
    note = kept_out_text(inference.kept_out)
    if note:
        parts.append(note + "\n")
    parts += ["## Pretrained − scratch at each training size\n", comparisons_table(curves, inference.confidence)]
    return "\n".join(parts)


def runs_markdown(runs: pd.DataFrame, inference: Inference) -> str:
    """Every run: where it sits, how long it trained, whether it hit the epoch cap or was kept out."""
    def number(value) -> str:
        return DASH if pd.isna(value) else f"{value:g}"

    def flag(value) -> str:
        return DASH if pd.isna(value) else ("yes" if bool(value) else "no")

    ordered = runs.sort_values(["fraction", "architecture", "condition", "replicate", "repeat", "seed"],
                               key=lambda c: c.map(lambda a: cell_order((a, ""))) if c.name == "architecture" else c)
    rows = [[r["run"], str(r["replicate"]), str(r["repeat"]), str(r["seed"]), f"{r[X]:g}", number(r["epochs"]),
             number(r["best_epoch"]), number(r["max_epochs"]), flag(r["hit_cap"]),
             "kept out (one class on validation)" if r["single_class"] else "used",
             fmt(r["val_accuracy"]), fmt(r["test_accuracy"]), fmt(r["external_accuracy"])]
            for _, r in ordered.iterrows()]
    header = ["run", "replicate", "split", "seed", "train images per class", "epochs", "best epoch", "epoch cap",
              "still improving at the cap", "in verdicts", "val accuracy", "test accuracy", "external accuracy"]
    return ("# Every run\n\nEach run's training length (epochs trained, the epoch whose checkpoint was kept, the "
            "cap), whether it was still improving when the cap ended it, and whether it entered the verdicts: a run "
            "that predicts one class for every validation image is kept out of every mean and verdict. Validation "
            "chose each run's checkpoint, so its validation accuracy is optimistic; test accuracy is the honest "
            f"figure. Units: {units_noun(inference.units, inference.units.count)}.\n\n"
            + markdown_table(header, rows))


def seed_pairs(runs_a: pd.DataFrame, runs_b: pd.DataFrame) -> list[tuple[str, str]]:
    """Runs to pair for McNemar: same seed where the cells share seeds, else in seed order."""
    seeds_a, seeds_b = dict(zip(runs_a["seed"], runs_a["run"])), dict(zip(runs_b["seed"], runs_b["run"]))
    common = sorted(set(seeds_a) & set(seeds_b))
    if common:
        return [(seeds_a[s], seeds_b[s]) for s in common]
    return list(zip((seeds_a[s] for s in sorted(seeds_a)), (seeds_b[s] for s in sorted(seeds_b))))


def paired_mcnemar(a: RunTestSet, b: RunTestSet) -> dict:
    """McNemar on the test images both runs predicted (matched by path); adds n_images."""
    both = pd.concat([a.correct.rename("a"), b.correct.rename("b")], axis=1, join="inner")
    if both.empty:
        raise UserError(f"runs {a.run} and {b.run} share no test images; were they trained on different splits?")
    return {**mcnemar(both["a"].to_numpy(), both["b"].to_numpy()), "n_images": len(both)}


def scratch_vs_pretrained(runs: pd.DataFrame, test_sets: dict[str, RunTestSet]) -> pd.DataFrame:
    """McNemar between scratch and each pretrained condition, per architecture and seed pair, on one test set."""
    rows = []
    for arch in sorted(runs["architecture"].unique(), key=lambda a: cell_order((a, ""))):
        of_arch = runs[runs["architecture"] == arch]
        scratch = of_arch[of_arch["condition"] == "scratch"]
        for condition in PRETRAINED:
            pretrained = of_arch[of_arch["condition"] == condition]
            if scratch.empty or pretrained.empty:
                continue
            for run_a, run_b in seed_pairs(scratch, pretrained):
                a, b = test_sets[run_a], test_sets[run_b]
                test = paired_mcnemar(a, b)
                rows.append({"architecture": arch, "seed_a": a.seed, "seed_b": b.seed, "condition_a": "scratch",
                             "condition_b": condition, "n_images": test["n_images"],
                             "accuracy_a": float(np.mean(a.y_true == a.y_pred)),
                             "accuracy_b": float(np.mean(b.y_true == b.y_pred)),
                             "b": test["b"], "c": test["c"], "statistic": test["statistic"],
                             "p_value": test["p_value"], "method": test["method"]})
    return pd.DataFrame(rows)


def mcnemar_markdown(tests: pd.DataFrame) -> str:
    intro = ("# McNemar's test on the study's own test set: scratch vs pretrained runs\n\n"
             "A description of one test set (replicate 0, split 0, full training size), not a verdict: it says "
             "whether two trained models differ on these particular images, not whether one way of training is "
             "better; that takes independent units (conclusion.md). b = images the scratch run gets right and the "
             "pretrained run gets wrong, c = the reverse. Exact binomial test when b + c < 25, else chi-square with "
             "the continuity correction max(|b − c| − 1, 0)² / (b + c).\n")
    if tests.empty:
        return intro + "\nNo architecture has both a scratch and a pretrained run on that test set.\n"
    header = ["model", "seed", "A", "B", "images", "accuracy A", "accuracy B", "b", "c", "p", "method"]
    seed = lambda r: str(r.seed_a) if r.seed_a == r.seed_b else f"{r.seed_a}/{r.seed_b}"  # noqa: E731
    rows = [[r.architecture, seed(r), r.condition_a, r.condition_b, str(r.n_images), fmt(r.accuracy_a),
             fmt(r.accuracy_b), str(r.b), str(r.c), p_text(r.p_value), r.method] for r in tests.itertuples()]
    return intro + "\n" + markdown_table(header, rows)


# --------------------------------------------------------------------------- figures


def figure1(table: pd.DataFrame, runs: pd.DataFrame, study: pd.DataFrame | None, confidence: float) -> Figure:
    """Test accuracy by model and condition: bars with interval error bars, run dots, study markers (None: none)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    archs = list(dict.fromkeys(table["architecture"]))
    conditions = sorted(table["condition"].unique(), key=lambda c: cell_order(("", c)))
    width = 0.8 / len(conditions)
    fig = Figure(figsize=(2 + 2.2 * len(archs), 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, condition in enumerate(conditions):
        cells = table[table["condition"] == condition].set_index("architecture")
        x = np.array([archs.index(a) for a in cells.index]) + (i - (len(conditions) - 1) / 2) * width
        errors = np.nan_to_num(np.clip([cells["accuracy"] - cells["accuracy_ci_low"],
                                        cells["accuracy_ci_high"] - cells["accuracy"]], 0, None))
        ax.bar(x, cells["accuracy"], width * 0.9, yerr=errors, capsize=4, label=condition)
        for xi, arch in zip(x, cells.index):
            values = runs[(runs["architecture"] == arch) & (runs["condition"] == condition)]["test_accuracy"]
            ax.plot([xi] * len(values), values, "k.", markersize=4)
            if study is None:
                continue
            published = study[(study["architecture"] == arch) & (study["condition"] == condition)]
            if not published.empty:
                ax.plot(xi, published["accuracy"].iloc[0], "rx", markersize=8)
    if study is not None:
        ax.plot([], [], "rx", label="study (one run)")
    ax.set_xticks(range(len(archs)), archs)
    ax.set_ylabel("in-split test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"Test accuracy{'' if study is not None else ' on your data'}: runs (dots), mean and "
                 f"{confidence:.0%} interval")
    ax.legend(loc="lower right", fontsize="small")
    return fig


def curve_points(inference: Inference) -> pd.DataFrame:
    """The learning curve on the primary outcome: one row per architecture, condition and
    fraction, in config order then size. Columns: series ("<arch>-<condition>"), architecture,
    condition, fraction, train_per_class, n_units, accuracy (mean over units), low, high."""
    table = inference.cells[inference.cells["outcome"] == inference.primary_outcome]
    table = table.assign(series=table["architecture"] + "-" + table["condition"], accuracy=table["mean"])
    keys = [(*cell_order((a, c)), size) for a, c, size in zip(table["architecture"], table["condition"], table[X])]
    table = table.iloc[sorted(range(len(table)), key=keys.__getitem__)].reset_index(drop=True)
    return table[["series", "architecture", "condition", "fraction", X, "n_units", "accuracy", "low", "high"]]


def curve_table(points: pd.DataFrame) -> pd.DataFrame:
    """The DVC plot's table: one row per training fraction (ascending), column train_per_class and
    one column of mean accuracy per series; empty where a series lacks that size."""
    sizes = points.groupby("fraction")[X].median()
    wide = points.pivot(index="fraction", columns="series", values="accuracy")
    wide = wide[list(dict.fromkeys(points["series"]))]  # series in curve_points' order
    wide.insert(0, X, sizes)
    return wide.sort_values(X).reset_index(drop=True).rename_axis(columns=None)


def write_curve_csv(points: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Write curve_table(points) to path. For a DVC plot: x: train_per_class, y: the series columns."""
    table = curve_table(points)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    table.to_csv(tmp, index=False, lineterminator="\n", float_format="%.6g")
    os.replace(tmp, path)
    return table


def curve_figure(points: pd.DataFrame, outcome: str, confidence: float = 0.95) -> Figure:
    """Accuracy vs images per class (log x), a line per series, a band where a size has an interval."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    colours = {arch: f"C{i}" for i, arch in enumerate(dict.fromkeys(points["architecture"]))}
    for series, line in points.groupby("series", sort=False):
        line = line.sort_values(X)
        arch, condition = line["architecture"].iloc[0], line["condition"].iloc[0]
        ax.plot(line[X], line["accuracy"], marker="o", color=colours[arch],
                linestyle=LINESTYLE.get(condition, "-."), label=series)
        band = line.dropna(subset=["low", "high"])
        if len(band):
            ax.fill_between(band[X], band["low"], band["high"], color=colours[arch], alpha=0.15, linewidth=0)
    if (points[X] > 0).all():  # a log axis needs positive sizes
        ax.set_xscale("log")
    sizes = np.sort(points[X].unique())
    ax.set_xticks(sizes, [f"{s:g}" for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("training images per class (log scale)")
    ax.set_ylabel(OUTCOME_NAMES[outcome])
    banded = points["low"].notna().any()
    ax.set_title("Learning curve" + (f": mean over units, band = {confidence:.0%} interval over units" if banded
                                     else ": mean over runs, too few units for an interval"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


# --------------------------------------------------------------------------- the stage


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(evaluation_dir: Path, models_dir: Path, reports_dir: Path, study_table: Path,
                 params: EvaluateParams, *, is_study_data: bool) -> Inference:
    """Write the report files (see the module docstring) to reports_dir; gives back the inference.

    Reads the evaluate stage's runs.csv, the test predictions of the study's own split (replicate
    0, split 0, full size: McNemar's test) from their run folders under models_dir and, when the
    runs were trained on the study's data, the study's published Table 1 (study_table).
    is_study_data: whether data.dvc records the default dataset (config.DEFAULT_DATASET_MD5).
    Otherwise, or when the runs' classes are not the study's, the report says "your data" and
    compares nothing with the study.
    """
    runs = read_runs_table(evaluation_dir)
    inference = infer(runs, params.confidence, params.bootstrap_samples, params.seed)
    full = runs[runs["fraction"] == inference.full_fraction]
    if full["single_class"].astype(bool).all():
        raise UserError(f"every run at the full training size ({', '.join(full['run'])}) predicts one class for "
                        f"every validation image, so the report has nothing to compare; train longer "
                        f"(train.early_stopping or train.epochs) or check that the classes differ in "
                        f"'{Path(evaluation_dir) / 'runs.csv'}'")
    one_test_set = runs[(runs["replicate"] == runs["replicate"].min()) & (runs["repeat"] == 0)
                        & (runs["fraction"] == inference.full_fraction)]
    test_sets = read_test_sets(one_test_set, models_dir)
    class_names = sorted({c for t in test_sets.values() for c in t.class_names})
    # data.dvc left at the default version after data/raw was replaced must not bring the study in.
    stale_data_dvc = is_study_data and set(class_names) != set(STUDY_CLASSES)
    study = read_study_table(study_table) if is_study_data and not stale_data_dvc else None
    table = summarise_cells(runs, inference)
    tests = scratch_vs_pretrained(one_test_set, test_sets)

    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(reports_dir / "table1.csv", index=False)
    write_text(reports_dir / "table1.md", table1_markdown(table, inference, study, params))
    inference.comparisons.to_csv(reports_dir / "comparisons.csv", index=False)
    (reports_dir / "pairs.csv").unlink(missing_ok=True)  # an older report's pair table, now comparisons.csv
    if study is not None:
        comparison = compare_with_study(table, study)
        comparison.to_csv(reports_dir / "comparison.csv", index=False)
        write_text(reports_dir / "comparison.md", comparison_markdown(comparison, inference, study, params))
    else:
        (reports_dir / "comparison.csv").unlink(missing_ok=True)  # a study-data report's, now stale
        write_text(reports_dir / "comparison.md", your_data_markdown(class_names, stale_data_dvc))
    tests.to_csv(reports_dir / "mcnemar.csv", index=False)
    write_text(reports_dir / "mcnemar.md", mcnemar_markdown(tests))
    figure1(table, runs[~runs["single_class"].astype(bool) & (runs["fraction"] == inference.full_fraction)],
            study, params.confidence).savefig(reports_dir / "figure1.png", dpi=120)
    inference.cells.to_csv(reports_dir / "across_runs.csv", index=False)
    write_text(reports_dir / "across_runs.md", across_runs_markdown(inference))
    runs[["run", "architecture", "condition", "replicate", "repeat", "seed", "fraction", X,
          *TRAINING_COLUMNS]].to_csv(reports_dir / "runs.csv", index=False)
    write_text(reports_dir / "runs.md", runs_markdown(runs, inference))
    points = curve_points(inference)
    write_curve_csv(points, reports_dir / "learning_curve.csv")
    curve_figure(points, inference.primary_outcome, params.confidence).savefig(reports_dir / "learning_curve.png",
                                                                               dpi=120)
    write_text(reports_dir / "conclusion.md", conclusion_markdown(inference, runs, study, is_study_data))
    return inference
