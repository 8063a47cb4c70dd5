"""The `report` stage: Table 1 with confidence intervals, the side-by-side with the
study (on the study's data only), Figure 1 and paired McNemar tests, all in `reports/`.

The study compares single runs whose accuracies differ by fractions of a point. This
report says, for every pair of cells, whether such a difference can be told apart
from the noise of a test set this size, and says so in plain words where it cannot.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import stats

from .config import ARCHITECTURES, CONDITIONS, DEFAULT_DATASET_MD5, DataParams, EvaluateParams, UserError
from .evaluate import (BATCH_METRICS, bootstrap_distribution, classification_metrics, mcnemar,
                       percentile_interval, read_predictions, split_arrays)
from .runs import read_run_info

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Table 1 column → evaluate's metric name, in the study's column order (plus AUC).
TABLE_METRICS = {"f1": "f1_macro", "accuracy": "accuracy", "precision": "precision_macro",
                 "recall": "recall_macro", "auc": "auc_macro"}
STUDY_METRICS = ("f1", "accuracy", "precision", "recall")
# The study's "fine-tuned" trains only the classifier on frozen ImageNet features: our "frozen".
STUDY_TO_OURS = {"fine-tuned": "frozen", "scratch": "scratch"}
PRETRAINED = ("frozen", "finetune")
ALPHA = 0.05
DASH = "—"
NOISE = "not distinguishable from noise on {n} test images"
STUDY_CLASSES = DataParams().classes  # the default dataset's classes, the study's six garments


@dataclass(frozen=True)
class RunTestSet:
    """One run's test predictions, in file order."""

    __test__ = False  # not a pytest test class, despite the name

    run: str
    seed: int
    paths: np.ndarray
    y_true: np.ndarray
    y_pred: np.ndarray
    proba: np.ndarray
    class_names: tuple[str, ...] = ()

    @property
    def correct(self) -> pd.Series:
        return pd.Series(self.y_true == self.y_pred, index=self.paths)


# --------------------------------------------------------------------------- reading


def read_runs_table(evaluation_dir: Path) -> pd.DataFrame:
    """runs.csv from the evaluate stage (run, architecture, condition, seed, run_dir, ...)."""
    path = Path(evaluation_dir) / "runs.csv"
    if not path.is_file():
        raise UserError(f"'{path}' not found; run `dvc repro evaluate` first")
    runs = pd.read_csv(path)
    missing = [c for c in ("run", "architecture", "condition", "seed", "repeat", "fraction", "run_dir")
               if c not in runs.columns]
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
        y_true, y_pred, proba = split_arrays(predictions, "test")
        paths = predictions.loc[predictions["split"] == "test", "path"].to_numpy()
        test_sets[row.run] = RunTestSet(row.run, int(row.seed), paths, y_true, y_pred, proba,
                                        tuple(info["class_names"]))
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


# --------------------------------------------------------------------------- numbers


def cell_order(key: tuple[str, str]) -> tuple:
    """Sort cells as config lists architectures and conditions; unknown names last."""
    arch, cond = key
    return (ARCHITECTURES.index(arch) if arch in ARCHITECTURES else len(ARCHITECTURES), arch,
            CONDITIONS.index(cond) if cond in CONDITIONS else len(CONDITIONS), cond)


def pooled_interval(test_sets: list[RunTestSet], metric: str, params: EvaluateParams) -> tuple[float, float]:
    """CI of one cell's metric that covers test-image noise and seed-to-seed spread.

    Each bootstrap resample draws one of the cell's seeds at random and a resample of
    its test images; the interval is the percentile interval of that pooled
    distribution, widened where needed to include every seed's own value.
    """
    per_seed = np.stack([bootstrap_distribution(t.y_true, t.y_pred, t.proba, BATCH_METRICS[metric],
                                                params.bootstrap_samples, params.seed) for t in test_sets])
    rng = np.random.default_rng([params.seed, 1])  # a stream independent of the image resampling
    chosen = rng.integers(0, len(test_sets), size=params.bootstrap_samples)
    low, high = percentile_interval(per_seed[chosen, np.arange(params.bootstrap_samples)], params.confidence)
    # each seed's own value: the metric with every image counted once
    points = [float(BATCH_METRICS[metric](np.ones((1, len(t.y_true))), t.y_true, t.y_pred, t.proba)[0])
              for t in test_sets]
    if not (math.isnan(low) or any(map(math.isnan, points))):
        low, high = min(low, *points), max(high, *points)
    return low, high


def summarise_cells(runs: pd.DataFrame, test_sets: dict[str, RunTestSet], params: EvaluateParams) -> pd.DataFrame:
    """Table 1: one row per (architecture, condition) with mean, std across seeds and pooled CI per metric."""
    rows = []
    groups = runs.groupby(["architecture", "condition"])
    for key in sorted(groups.groups, key=cell_order):
        cell_runs = groups.get_group(key).sort_values("seed")
        cell_sets = [test_sets[r] for r in cell_runs["run"]]
        row = {"architecture": key[0], "condition": key[1], "seeds": len(cell_sets),
               "n_test": int(min(len(t.y_true) for t in cell_sets))}
        metrics = [classification_metrics(t.y_true, t.y_pred, t.proba, t.proba.shape[1]) for t in cell_sets]
        for label, metric in TABLE_METRICS.items():
            values = [m[metric] for m in metrics]
            row[label] = float(np.mean(values))
            row[f"{label}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
            row[f"{label}_ci_low"], row[f"{label}_ci_high"] = pooled_interval(cell_sets, metric, params)
        rows.append(row)
    return pd.DataFrame(rows)


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


def intervals_overlap(low_a: float, high_a: float, low_b: float, high_b: float) -> bool:
    return not (high_a < low_b or high_b < low_a)


def verdict(p_value: float, overlap: bool, n_images: int) -> str:
    """Plain words: a difference counts only if McNemar p < 0.05 and the CIs are apart."""
    noise = NOISE.format(n=n_images)
    if p_value >= ALPHA and overlap:
        return f"{noise} (CIs overlap, McNemar p ≥ {ALPHA})"
    if p_value >= ALPHA:
        return f"{noise} (McNemar p ≥ {ALPHA}, although the CIs do not overlap)"
    if overlap:
        return f"{noise} (CIs overlap, although McNemar p < {ALPHA})"
    return f"distinguishable (McNemar p < {ALPHA} and the CIs do not overlap)"


def compare_cells(table: pd.DataFrame, runs: pd.DataFrame, test_sets: dict[str, RunTestSet]) -> pd.DataFrame:
    """Every pair of cells on test accuracy: difference, CI overlap, McNemar p (largest over seed pairs), verdict."""
    rows = []
    for a, b in itertools.combinations(table.itertuples(index=False), 2):
        runs_a = runs[(runs["architecture"] == a.architecture) & (runs["condition"] == a.condition)]
        runs_b = runs[(runs["architecture"] == b.architecture) & (runs["condition"] == b.condition)]
        tests = [paired_mcnemar(test_sets[ra], test_sets[rb]) for ra, rb in seed_pairs(runs_a, runs_b)]
        p_value = max(t["p_value"] for t in tests)  # a difference must hold for every seed pair
        n_images = min(t["n_images"] for t in tests)
        overlap = intervals_overlap(a.accuracy_ci_low, a.accuracy_ci_high, b.accuracy_ci_low, b.accuracy_ci_high)
        rows.append({"cell_a": f"{a.architecture} {a.condition}", "cell_b": f"{b.architecture} {b.condition}",
                     "accuracy_a": a.accuracy, "accuracy_b": b.accuracy, "difference": b.accuracy - a.accuracy,
                     "ci_overlap": overlap, "mcnemar_p": p_value, "seed_pairs": len(tests), "n_images": n_images,
                     "verdict": verdict(p_value, overlap, n_images)})
    return pd.DataFrame(rows)


def scratch_vs_pretrained(runs: pd.DataFrame, test_sets: dict[str, RunTestSet]) -> pd.DataFrame:
    """McNemar between scratch and each pretrained condition, per architecture and seed pair."""
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
                             "p_value": test["p_value"], "method": test["method"],
                             "verdict": (NOISE.format(n=test["n_images"]) if test["p_value"] >= ALPHA
                                         else f"different (p < {ALPHA})")})
    return pd.DataFrame(rows)


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


def half_width(accuracy: float, n_images: int, confidence: float) -> float:
    """Normal-approximation CI half-width of an accuracy measured on n images."""
    z = stats.norm.ppf(1 - (1 - confidence) / 2)
    return float(z * math.sqrt(accuracy * (1 - accuracy) / n_images))


def smallest_study_gap(study: pd.DataFrame) -> tuple[float, str, str] | None:
    """The smallest accuracy difference between two of the study's cells, and which cells."""
    cells = [(f"{r.architecture} {r.study_condition}", r.accuracy) for r in study.itertuples()]
    pairs = [(abs(x[1] - y[1]), x[0], y[0]) for x, y in itertools.combinations(cells, 2)]
    return min(pairs) if pairs else None


# --------------------------------------------------------------------------- writing


def fmt(value, digits: int = 4) -> str:
    """A number for Markdown; missing values as an em dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return f"{value:.{digits}f}"


def fmt_p(p: float) -> str:
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def cell_text(row, label: str) -> str:
    """'mean ± std [low, high]' (± std only with several seeds)."""
    text = fmt(row[label])
    if row["seeds"] > 1:
        text += f" ± {fmt(row[f'{label}_std'])}"
    if not math.isnan(row[f"{label}_ci_low"]):
        text += f" [{fmt(row[f'{label}_ci_low'])}, {fmt(row[f'{label}_ci_high'])}]"
    return text


def method_text(table: pd.DataFrame, params: EvaluateParams) -> str:
    several = (table["seeds"] > 1).any()
    level = f"{params.confidence:.0%}"
    text = (f"Metrics are macro averages over classes on the test split. Brackets: {level} percentile bootstrap "
            f"interval over test images ({params.bootstrap_samples} resamples, seed {params.seed}).")
    if several:
        text += (" Where a cell has several seeds, the value is the mean ± standard deviation across seeds, and "
                 "each bootstrap resample also draws one of the cell's seeds at random, so the interval covers "
                 "test-image noise and seed-to-seed spread together; it is widened where needed to include every "
                 "seed's own value.")
    return text


def precision_text(table: pd.DataFrame, study: pd.DataFrame | None, params: EvaluateParams) -> str:
    """What CI half-width the test set size implies, against the study's smallest gap (None: your data)."""
    n_images = int(table["n_test"].min())
    accuracy = float(table["accuracy"].mean())
    level = f"{params.confidence:.0%}"
    near, worst = half_width(accuracy, n_images, params.confidence), half_width(0.5, n_images, params.confidence)
    text = (f"With N = {n_images} test images, a {level} interval on an accuracy near {accuracy:.2f} has a "
            f"half-width of about ±{near * 100:.1f} points (±{worst * 100:.1f} at 0.50): differences between cells "
            f"smaller than about that are {NOISE.format(n=n_images)}.")
    gap = smallest_study_gap(study) if study is not None else None
    if gap is not None:
        text += (f" The study's smallest gap, {gap[1]} vs {gap[2]}, is {gap[0] * 100:.2f} points, "
                 f"far inside that margin: one test set of this size cannot tell such cells apart.")
    return text


def table1_markdown(table: pd.DataFrame, pairs: pd.DataFrame, study: pd.DataFrame | None,
                    params: EvaluateParams) -> str:
    """Table 1 and which differences are noise; titled "(reproduced)" on the study's data, "your data" otherwise."""
    header = ["model", "condition", "seeds", "F1", "accuracy", "precision", "recall", "AUC"]  # TABLE_METRICS order
    rows = [[r["architecture"], r["condition"], str(r["seeds"]), *[cell_text(r, label) for label in TABLE_METRICS]]
            for _, r in table.iterrows()]
    title = "Table 1 (reproduced)" if study is not None else "Table 1 \u2014 your data"
    parts = [f"# {title}: test-set metrics by model and condition\n",
             method_text(table, params) + "\n", markdown_table(header, rows),
             "## How precise is one test set?\n", precision_text(table, study, params) + "\n",
             "## Which differences can be told apart?\n"]
    if pairs.empty:
        parts.append("Only one cell: nothing to compare.\n")
        return "\n".join(parts)
    parts.append(f"Test accuracy, every pair of cells. A difference counts only if the paired McNemar test on the "
                 f"same test images gives p < {ALPHA} (for every seed pair, so the largest p is shown) and the "
                 f"{params.confidence:.0%} intervals do not overlap.\n")
    pair_rows = [[p.cell_a, p.cell_b, f"{p.difference * 100:+.2f} pts", "yes" if p.ci_overlap else "no",
                  fmt_p(p.mcnemar_p), p.verdict] for p in pairs.itertuples()]
    parts.append(markdown_table(["cell A", "cell B", "accuracy B − A", "CIs overlap", "McNemar p", "verdict"],
                                pair_rows))
    noise = int(pairs["verdict"].str.startswith("not distinguishable").sum())
    parts.append(f"{noise} of {len(pairs)} pairs are not distinguishable from noise on "
                 f"{int(pairs['n_images'].min())} test images.\n")
    return "\n".join(parts)


def comparison_markdown(comparison: pd.DataFrame, params: EvaluateParams) -> str:
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
             "its precision/recall/F1 averaging is not stated (ours are macro averages).\n")
    return intro + "\n" + markdown_table(header, rows)


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


def mcnemar_markdown(tests: pd.DataFrame) -> str:
    intro = ("# Paired tests: scratch vs pretrained\n\n"
             "McNemar's test on the same test images (matched by path): b = images scratch gets right and the "
             "pretrained run gets wrong, c = the reverse. Exact binomial test when b + c < 25, else chi-square "
             f"with continuity correction. p ≥ {ALPHA} means the two runs are not distinguishable from noise on "
             "these test images.\n")
    if tests.empty:
        return intro + "\nNo architecture has both a scratch and a pretrained run.\n"
    header = ["model", "seed", "A", "B", "images", "accuracy A", "accuracy B", "b", "c", "p", "method", "verdict"]
    seed = lambda r: str(r.seed_a) if r.seed_a == r.seed_b else f"{r.seed_a}/{r.seed_b}"  # noqa: E731
    rows = [[r.architecture, seed(r), r.condition_a, r.condition_b, str(r.n_images), fmt(r.accuracy_a),
             fmt(r.accuracy_b), str(r.b), str(r.c), fmt_p(r.p_value), r.method, r.verdict]
            for r in tests.itertuples()]
    return intro + "\n" + markdown_table(header, rows)


def figure1(table: pd.DataFrame, test_sets: dict[str, RunTestSet], runs: pd.DataFrame,
            study: pd.DataFrame | None, confidence: float) -> Figure:
    """Test accuracy by model and condition: bars with CI error bars, seed dots, study markers (None: none)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    archs = list(dict.fromkeys(table["architecture"]))
    conditions = sorted(table["condition"].unique(), key=lambda c: cell_order(("", c)))
    width = 0.8 / len(conditions)
    fig = Figure(figsize=(2 + 2.2 * len(archs), 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, condition in enumerate(conditions):
        cells = table[table["condition"] == condition].set_index("architecture")
        x = np.array([archs.index(a) for a in cells.index]) + (i - (len(conditions) - 1) / 2) * width
        errors = np.clip([cells["accuracy"] - cells["accuracy_ci_low"], cells["accuracy_ci_high"] - cells["accuracy"]],
                         0, None)
        ax.bar(x, cells["accuracy"], width * 0.9, yerr=errors, capsize=4, label=condition)
        for xi, arch in zip(x, cells.index):
            cell_runs = runs[(runs["architecture"] == arch) & (runs["condition"] == condition)]["run"]
            seeds = [np.mean(test_sets[r].y_true == test_sets[r].y_pred) for r in cell_runs]
            ax.plot([xi] * len(seeds), seeds, "k.", markersize=4)
            if study is None:
                continue
            published = study[(study["architecture"] == arch) & (study["condition"] == condition)]
            if not published.empty:
                ax.plot(xi, published["accuracy"].iloc[0], "rx", markersize=8)
    if study is not None:
        ax.plot([], [], "rx", label="study (one run)")
    ax.set_xticks(range(len(archs)), archs)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"Test accuracy{'' if study is not None else ' on your data'} with {confidence:.0%} "
                 "bootstrap intervals")
    ax.legend(loc="lower right", fontsize="small")
    return fig


def write_report(evaluation_dir: Path, models_dir: Path, reports_dir: Path, study_table: Path,
                 params: EvaluateParams, *, is_study_data: bool) -> None:
    """Write table1.md/.csv, pairs.csv, comparison.md (and .csv), figure1.png and mcnemar.md/.csv to reports_dir.

    Reads the evaluate stage's runs.csv, each run's test predictions from its run folder under
    models_dir and, when the runs were trained on the study's data, the study's published Table 1
    (study_table). is_study_data: whether data.dvc records the default dataset
    (config.DEFAULT_DATASET_MD5). Otherwise, or when the runs' classes are not the study's, the
    report says "your data" and compares nothing with the study.
    """
    all_runs = read_runs_table(evaluation_dir)
    # Table 1, its pairs and McNemar compare runs on one test set: the study's split at full size,
    # of replicate 0 (data/raw; a runs table from before replicates holds replicate 0 alone).
    first = all_runs["replicate"] == 0 if "replicate" in all_runs.columns else True
    runs = all_runs[(all_runs["repeat"] == 0) & (all_runs["fraction"] == 1.0) & first]
    test_sets = read_test_sets(runs, models_dir)
    class_names = sorted({c for t in test_sets.values() for c in t.class_names})
    # data.dvc left at the default version after data/raw was replaced must not bring the study in.
    stale_data_dvc = is_study_data and set(class_names) != set(STUDY_CLASSES)
    study = read_study_table(study_table) if is_study_data and not stale_data_dvc else None
    table = summarise_cells(runs, test_sets, params)
    pairs = compare_cells(table, runs, test_sets)
    tests = scratch_vs_pretrained(runs, test_sets)

    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(reports_dir / "table1.csv", index=False)
    (reports_dir / "table1.md").write_text(table1_markdown(table, pairs, study, params))
    pairs.to_csv(reports_dir / "pairs.csv", index=False)
    if study is not None:
        comparison = compare_with_study(table, study)
        comparison.to_csv(reports_dir / "comparison.csv", index=False)
        (reports_dir / "comparison.md").write_text(comparison_markdown(comparison, params))
    else:
        (reports_dir / "comparison.csv").unlink(missing_ok=True)  # a study-data report's, now stale
        (reports_dir / "comparison.md").write_text(your_data_markdown(class_names, stale_data_dvc))
    tests.to_csv(reports_dir / "mcnemar.csv", index=False)
    (reports_dir / "mcnemar.md").write_text(mcnemar_markdown(tests))
    figure1(table, test_sets, runs, study, params.confidence).savefig(reports_dir / "figure1.png", dpi=120)
    write_repeated_analysis(all_runs, reports_dir, study, params.confidence)


def write_repeated_analysis(runs: pd.DataFrame, reports_dir: Path, study: pd.DataFrame | None,
                            confidence: float) -> None:
    """Across seeds, splits and training sizes: across_runs.md/.csv (mean and t-interval per cell
    and size), learning_curve.csv/.png (accuracy against training images per class) and
    conclusion.md, the written answer (analysis.py, curves.py, conclusion.py)."""
    from .analysis import cell_summary
    from .conclusion import write_conclusion
    from .curves import curve_points, save_curve_figure, write_curve_csv

    summary = cell_summary(runs, confidence)
    summary.to_csv(reports_dir / "across_runs.csv", index=False)
    (reports_dir / "across_runs.md").write_text(across_runs_markdown(summary, confidence))
    points = curve_points(runs, confidence)
    write_curve_csv(points, reports_dir / "learning_curve.csv")
    save_curve_figure(points, reports_dir / "learning_curve.png", confidence)
    write_conclusion(runs, study, reports_dir / "conclusion.md", is_study_data=study is not None,
                     confidence=confidence)


def across_runs_markdown(summary: pd.DataFrame, confidence: float) -> str:
    """The across-run table: each cell's mean test accuracy and macro-F1 over seeds × splits, per size."""
    rows = [[f"{r.architecture}", f"{r.condition}", f"{r.train_per_class:g}", str(r.n_runs),
             f"{fmt(r.test_accuracy)} [{fmt(r.test_accuracy_low)}, {fmt(r.test_accuracy_high)}]",
             f"{fmt(r.test_f1_macro)} [{fmt(r.test_f1_macro_low)}, {fmt(r.test_f1_macro_high)}]"]
            for r in summary.itertuples()]
    header = ["model", "condition", "train images per class", "runs",
              f"test accuracy [{confidence:.0%} t-interval over runs]", "test macro-F1 [interval]"]
    return ("# Across seeds and splits\n\nEach run is one seed on one stratified split; the interval is a "
            "t-interval over the runs (blank for a single run). See conclusion.md for the paired "
            "comparison.\n\n" + markdown_table(header, rows) + "\n")
