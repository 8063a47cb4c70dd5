"""Tests for inference.py: units, the test and its verdicts, the primary family, catch-up, and the
one-test-set descriptions (intervals over test images, McNemar), with simulations of known truth."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_evaluate import synthetic_predictions

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from inference_simulation import OVERLAP, decide_simulated, simulate  # noqa: E402

from transfer_study.config import UserError
from transfer_study.evaluate import BATCH_METRICS, batch_accuracy, classification_metrics
from transfer_study.inference import (
    BEST_VS_BEST,
    CATCHES_UP,
    ESTABLISHED,
    EXPLORATORY,
    NEEDS_REPLICATES,
    NO_ADVANTAGE,
    NO_SPREAD,
    NOT_CAUGHT_UP,
    NOT_ESTABLISHED,
    REPLICATE,
    SEEDS_ONLY,
    SPLIT,
    TOO_FEW,
    UNDETERMINED,
    Units,
    bootstrap_ci,
    bootstrap_distribution,
    holm,
    infer,
    intervals_over_test_images,
    mcnemar,
    percentile_interval,
    resample_weights,
    unit_test,
    unit_values,
    units_of,
    verdicts,
    wilson_interval,
)

SIZES = {0.1: 21.0, 0.25: 53.0, 0.5: 105.0, 1.0: 210.0}
N_CLASSES, N_TEST = 6, 270


def make_runs(effects: dict[tuple[str, str], dict[float, float]], replicates=range(6), seeds=range(2), repeats=(0,),
              noise=0.01, seed=0, external=True, scratch=0.75) -> pd.DataFrame:
    """A runs table (evaluate's runs.csv columns) with known answers: each architecture's scratch
    runs at `scratch` (+ a unit effect shared by every condition of a replicate and split), each
    (arch, condition) in effects at that + effect[fraction] (a scratch cell in effects moves that
    architecture's scratch), and independent noise of sd `noise` per run and metric. External
    accuracy is 0.01 above the in-split one, or NaN without an external set. Validation accuracy
    follows test accuracy."""
    rng = np.random.default_rng(seed)
    rows = []
    cells: dict[tuple[str, str], dict[float, float]] = {}
    for (arch, _), by_fraction in effects.items():
        cells.setdefault((arch, "scratch"), {}).update({f: 0.0 for f in by_fraction})
    cells.update(effects)
    for (arch, condition), by_fraction in cells.items():
        for r in replicates:
            for p in repeats:
                unit = 0.02 * np.sin(7 * r + 3 * p + 1)
                for s in seeds:
                    for fraction, effect in by_fraction.items():
                        accuracy = scratch + unit + effect + rng.normal(0, noise)
                        f1 = scratch + unit + effect + rng.normal(0, noise)
                        name = f"{arch}-{condition}-s{s}-x{r}-r{p}-f{fraction:g}"
                        row = {"run": name, "architecture": arch, "condition": condition, "seed": s, "repeat": p,
                               "replicate": r, "fraction": fraction, "train_per_class": SIZES[fraction],
                               "n_train": SIZES[fraction] * N_CLASSES, "n_val": N_TEST, "n_test": N_TEST,
                               "n_external": 600 if external else 0, "val_accuracy": accuracy + rng.normal(0, 0.005),
                               "test_accuracy": accuracy, "test_f1_macro": f1,
                               "test_precision_macro": f1, "test_recall_macro": accuracy, "test_auc_macro": 0.95,
                               "external_accuracy": accuracy + 0.01 if external else math.nan,
                               "external_f1_macro": f1 + 0.01 if external else math.nan,
                               "single_class": False, "epochs": 20, "max_epochs": 40, "best_epoch": 15,
                               "hit_cap": False, "run_dir": f"{arch}-{condition}/{name}"}
                        for metric in ("accuracy", "f1_macro", "precision_macro", "recall_macro", "auc_macro"):
                            value = row[f"test_{metric}"]
                            row[f"test_{metric}_ci_low"], row[f"test_{metric}_ci_high"] = value - 0.05, value + 0.04
                        rows.append(row)
    return pd.DataFrame(rows)


def only(table: pd.DataFrame, **where) -> pd.Series:
    mask = np.logical_and.reduce([table[k] == v for k, v in where.items()])
    assert mask.sum() == 1, (where, mask.sum())
    return table[mask].iloc[0]


def primary_row(inference, a: str, b: str) -> pd.Series:
    return only(inference.primary, a=a, b=b)


# --------------------------------------------------------------------------- units


def test_units_are_replicates_then_splits_then_none():
    assert units_of(make_runs({("resnet18", "frozen"): {1.0: 0.1}}, replicates=range(4), repeats=(0, 1))) == Units(
        REPLICATE, "replicate", 4)
    assert units_of(make_runs({("resnet18", "frozen"): {1.0: 0.1}}, replicates=[0], repeats=(0, 1, 2))) == Units(
        SPLIT, "repeat", 3)
    assert units_of(make_runs({("resnet18", "frozen"): {1.0: 0.1}}, replicates=[0], seeds=range(5))).kind == SEEDS_ONLY


def test_seeds_and_splits_inside_a_replicate_are_averaged_into_one_unit():
    runs = make_runs({("resnet18", "frozen"): {1.0: 0.05}}, replicates=range(4), seeds=range(3), repeats=(0, 1))
    values = unit_values(runs, "test_accuracy", units_of(runs), ("architecture", "condition"))
    assert len(values) == 2 * 4 and set(values["n_runs"]) == {6}  # 3 seeds x 2 splits in each replicate's value
    one = runs.query("condition == 'frozen' and replicate == 2")["test_accuracy"].mean()
    assert only(values, condition="frozen", unit=2)["value"] == pytest.approx(one)
    row = primary_row(infer(runs), "resnet18 frozen", "resnet18 scratch")
    assert row["n_units"] == 4  # not 24 pairs of runs


def test_unit_test_is_students_t_and_the_split_correction_widens_it():
    d = np.array([0.03, 0.05, 0.01, 0.06, 0.02, 0.04, -0.01])
    result = unit_test(d, 0.2, 0.95, split_units=False)
    reference = stats.ttest_1samp(d, 0)
    assert (result["low"], result["high"]) == pytest.approx(tuple(reference.confidence_interval(0.95)))
    assert result["p"] == pytest.approx(reference.pvalue) and result["reason"] == ""
    corrected = unit_test(d, 0.2, 0.95, split_units=True)
    se = d.std(ddof=1) * math.sqrt(1 / 7 + 0.2)  # Nadeau-Bengio: variance x (1/J + n_test/n_train)
    assert corrected["se"] == pytest.approx(se)
    assert corrected["high"] - corrected["mean"] == pytest.approx(stats.t.ppf(0.975, 6) * se)
    assert corrected["p"] > result["p"]


def decide(differences: np.ndarray, test_over_train: float = 0.0, split_units: bool = False) -> dict:
    """unit_test and its verdict (uncorrected: a family of one), as comparisons() takes them."""
    result = unit_test(differences, test_over_train, 0.95, split_units)
    return {**result, "verdict": verdicts(result["p"], 0.05)}


def test_too_few_units_or_no_spread_decide_nothing():
    few = decide(np.array([0.30, 0.32]))
    assert few["verdict"] == TOO_FEW and "fewer than 3" in str(few["reason"]) and math.isnan(few["low"])
    flat = decide(np.full(5, 1 / 270))  # identical differences: no interval of zero width
    assert flat["verdict"] == TOO_FEW and flat["reason"] == NO_SPREAD and math.isnan(flat["high"])
    assert flat["mean"] == pytest.approx(1 / 270)
    big = decide(np.array([0.30, 0.25, 0.33]))  # a large effect on three units is decided
    assert big["verdict"] == ESTABLISHED


def test_a_difference_below_zero_is_decided_as_one_above_it():
    """Issue 21's fifth example in today's terms: the test is two-sided, so scratch ahead of pretrained
    is established exactly as pretrained ahead is (a one-sided rule would call it 'not established')."""
    d = np.array([0.30, 0.25, 0.33, 0.28])
    ahead, behind = decide(d), decide(-d)
    assert ahead["verdict"] == behind["verdict"] == ESTABLISHED and behind["p"] == pytest.approx(ahead["p"])
    assert (behind["low"], behind["high"]) == pytest.approx((-ahead["high"], -ahead["low"]))
    assert behind["high"] < 0 < ahead["low"]


def test_holm_steps_down_and_ignores_untested():
    assert holm(np.array([0.01, 0.04, 0.03])) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = holm(np.array([0.01, np.nan, 0.04]))
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    assert holm(np.array([[0.5, 0.9], [0.001, 0.02]])) == pytest.approx(np.array([[1.0, 1.0], [0.002, 0.02]]))


def test_check_runs_names_what_is_missing():
    runs = make_runs({("resnet18", "frozen"): {1.0: 0.1}})
    with pytest.raises(UserError, match="lacks column.*replicate.*dvc repro evaluate"):
        infer(runs.drop(columns="replicate"))
    with pytest.raises(UserError, match="more than one run for architecture=resnet18"):
        infer(pd.concat([runs, runs.head(1)]))


# --------------------------------------------------------------------------- the comparisons


def test_primary_family_is_pretrained_minus_scratch_and_best_minus_best_at_full_size():
    runs = make_runs({("efficientnet_lite0", "frozen"): {0.25: 0.1, 1.0: 0.06},
                      ("efficientnet_lite0", "finetune"): {0.25: 0.0, 1.0: 0.0},
                      ("small_cnn", "scratch"): {1.0: 0.02}})
    inference = infer(runs)
    assert inference.primary_outcome == "external_accuracy"
    primary = inference.primary
    assert set(zip(primary["a"], primary["b"])) == {
        ("efficientnet_lite0 frozen", "efficientnet_lite0 scratch"),
        ("efficientnet_lite0 finetune", "efficientnet_lite0 scratch"),
        ("efficientnet_lite0 frozen", "small_cnn scratch")}  # best pretrained (validation) − best scratch
    assert (primary["outcome"] == "external_accuracy").all() and (primary["fraction"] == 1.0).all()
    assert BEST_VS_BEST in only(primary, b="small_cnn scratch")["roles"]
    assert primary["p_adjusted"].to_numpy() == pytest.approx(holm(primary["p"].to_numpy()))
    frozen = primary_row(inference, "efficientnet_lite0 frozen", "efficientnet_lite0 scratch")
    assert frozen["verdict"] == ESTABLISHED and frozen["low"] < 0.06 < frozen["high"]
    assert primary_row(inference, "efficientnet_lite0 finetune", "efficientnet_lite0 scratch")["verdict"] == NOT_ESTABLISHED
    exploratory = inference.comparisons[inference.comparisons["family"] == EXPLORATORY]
    assert (exploratory["p_adjusted"] == exploratory["p"]).all()
    assert set(exploratory["outcome"]) == {"test_accuracy", "external_accuracy", "test_f1_macro", "external_f1_macro"}
    small = only(exploratory, a="efficientnet_lite0 frozen", fraction=0.25, outcome="external_accuracy")
    assert small["verdict"] == ESTABLISHED


def test_each_pair_of_cells_is_one_comparison_with_one_orientation():
    runs = make_runs({("efficientnet_lite0", "frozen"): {1.0: 0.05}, ("efficientnet_lite0", "finetune"): {1.0: 0.0}})
    table = infer(runs).comparisons
    keys = list(zip(table["a"], table["b"], table["fraction"], table["outcome"]))
    assert len(keys) == len(set(keys))
    pairs = {frozenset(k[:2]) for k in keys}
    assert len(pairs) == 3  # frozen/scratch, finetune/scratch, finetune/frozen
    assert not (table["a"].str.endswith("scratch") & ~table["b"].str.endswith("scratch")).any()  # pretrained − scratch


def test_best_cells_are_chosen_on_validation_not_test():
    runs = make_runs({("efficientnet_lite0", "frozen"): {1.0: 0.05}, ("efficientnet_lite0", "finetune"): {1.0: 0.08}})
    frozen = runs["condition"] == "frozen"
    runs.loc[frozen, "val_accuracy"] += 0.2  # validation prefers frozen, test prefers finetune
    best = only(infer(runs).primary, b="efficientnet_lite0 scratch", a="efficientnet_lite0 frozen")
    assert BEST_VS_BEST in best["roles"]


def test_in_split_test_is_primary_without_an_external_set():
    inference = infer(make_runs({("resnet18", "frozen"): {1.0: 0.05}}, external=False))
    assert inference.primary_outcome == "test_accuracy"
    assert set(inference.comparisons["outcome"]) == {"test_accuracy", "test_f1_macro"}


def test_single_class_runs_are_kept_out_of_every_verdict():
    runs = make_runs({("efficientnet_lite0", "frozen"): {1.0: 0.05}})
    broken = (runs["condition"] == "scratch") & (runs["replicate"] == 0) & (runs["seed"] == 1)
    runs.loc[broken, ["single_class", "test_accuracy", "external_accuracy"]] = [True, 1 / 6, 1 / 6]
    inference = infer(runs)
    assert list(inference.kept_out["run"]) == list(runs.loc[broken, "run"])
    row = primary_row(inference, "efficientnet_lite0 frozen", "efficientnet_lite0 scratch")
    without = infer(runs[~broken].assign(single_class=False))
    assert row["mean"] == pytest.approx(primary_row(without, "efficientnet_lite0 frozen",
                                                    "efficientnet_lite0 scratch")["mean"])
    scratch = only(inference.cells, architecture="efficientnet_lite0", condition="scratch", outcome="test_accuracy")
    assert scratch["n_runs"] == 11 and scratch["n_units"] == 6


def test_splits_of_one_dataset_use_the_corrected_test():
    runs = make_runs({("resnet18", "frozen"): {1.0: 0.03}}, replicates=[0], repeats=range(5), seeds=range(3))
    inference = infer(runs)
    assert inference.units == Units(SPLIT, "repeat", 5)
    row = primary_row(inference, "resnet18 frozen", "resnet18 scratch")
    values = unit_values(runs, "test_accuracy", inference.units, ("condition",)).pivot(
        index="unit", columns="condition", values="value")
    d = (values["frozen"] - values["scratch"]).to_numpy()
    assert row["n_units"] == 5 and row["units"] == SPLIT
    se = d.std(ddof=1) * math.sqrt(1 / 5 + N_TEST / (210 * N_CLASSES))
    assert row["high"] - row["mean"] == pytest.approx(stats.t.ppf(0.975, 4) * se)


def test_seeds_on_one_split_are_too_few_units():
    inference = infer(make_runs({("resnet18", "frozen"): {1.0: 0.2}}, replicates=[0], seeds=range(5)))
    assert set(inference.comparisons["verdict"]) == {TOO_FEW}
    assert inference.cells["low"].isna().all()


# --------------------------------------------------------------------------- simulations of known truth
# scripts/inference_simulation.py's model and steps; it measures the same rates on more studies.


@pytest.mark.parametrize("units, overlap", [(Units(REPLICATE, "replicate", 6), 0.0), (Units(SPLIT, "repeat", 5), OVERLAP)])
def test_clustered_null_data_are_established_rarely(units, overlap):
    """1,000 null studies, split spread = seed spread, three seeds per unit: 'established' in at
    most 8% (the old pairs-of-runs rule: 28% on such data)."""
    runs = simulate(1000, units.count, 3, effect=0.0, spread=0.02, seed=11, overlap=overlap)
    result = decide_simulated(runs, units)
    rate = np.mean(result["verdict"] == ESTABLISHED)
    assert rate <= 0.08, rate
    assert rate > 0.01  # a test that never fires would pass the line above too
    coverage = np.mean((result["low"] <= 0) & (0 <= result["high"]))
    assert coverage >= 0.92, coverage


def test_a_true_five_point_effect_on_ten_replicates_is_established():
    runs = simulate(1000, 10, 3, effect=0.05, spread=0.025, seed=12)
    result = decide_simulated(runs, Units(REPLICATE, "replicate", 10))
    assert np.mean(result["verdict"] == ESTABLISHED) >= 0.80
    assert not np.any((result["verdict"] == ESTABLISHED) & (result["mean"] < 0))


def test_the_simulation_takes_the_same_decision_as_the_report():
    """One simulated study through infer (the report's path) and through decide_simulated."""
    runs = simulate(1, 6, 3, effect=0.02, spread=0.02, seed=3)
    table = runs.assign(architecture="efficientnet_lite0", repeat=0, fraction=1.0, train_per_class=210.0,
                        run=[f"r{i}" for i in range(len(runs))], val_accuracy=runs["test_accuracy"],
                        test_f1_macro=runs["test_accuracy"], external_accuracy=math.nan,
                        external_f1_macro=math.nan, single_class=False)
    row = primary_row(infer(table), "efficientnet_lite0 frozen", "efficientnet_lite0 scratch")
    simulated = decide_simulated(runs, Units(REPLICATE, "replicate", 6))
    assert row["p"] == pytest.approx(simulated["p"][0]) and row["verdict"] == simulated["verdict"][0]


# --------------------------------------------------------------------------- catching up


def test_scratch_catches_up_from_the_size_where_the_mean_stays_at_or_below_zero():
    runs = make_runs({("resnet18", "frozen"): {0.1: 0.12, 0.25: 0.06, 0.5: -0.01, 1.0: -0.03}}, noise=0.005,
                     replicates=range(8))
    row = infer(runs, bootstrap_samples=500).catch_up.iloc[0]
    assert row["status"] == CATCHES_UP and row["estimate"] == 105.0 and row["sizes"] == (21.0, 53.0, 105.0, 210.0)
    assert row["low"] <= 105.0 <= row["high"] and row["samples"] == 500


def test_a_curve_that_dips_and_rises_again_has_not_caught_up():
    """+5 / −1 / +4 points: the old first-crossing rule said 'catches up at about 53 per class'."""
    runs = make_runs({("resnet18", "frozen"): {0.1: 0.05, 0.25: -0.01, 1.0: 0.04}}, noise=0.005, replicates=range(8))
    row = infer(runs, bootstrap_samples=500).catch_up.iloc[0]
    assert row["status"] == NOT_CAUGHT_UP and row["estimate"] == math.inf


def test_catch_up_is_undetermined_without_an_established_advantage_or_replicates():
    no_advantage = make_runs({("resnet18", "frozen"): {0.1: 0.004, 1.0: -0.02}}, noise=0.02, seed=3)
    row = infer(no_advantage).catch_up.iloc[0]
    assert row["status"] == UNDETERMINED and row["reason"] == NO_ADVANTAGE and math.isnan(row["estimate"])
    splits = make_runs({("resnet18", "frozen"): {0.1: 0.2, 1.0: -0.05}}, replicates=[0], repeats=range(4))
    assert infer(splits).catch_up.iloc[0]["reason"] == NEEDS_REPLICATES


# --------------------------------------------------------------------------- one test set


def test_wilson_interval_does_not_collapse_at_all_correct():
    low, high = wilson_interval(270, 270, 0.95)
    assert 0.98 < low < 0.99 and high == 1.0  # the percentile bootstrap said [1, 1]
    y = np.arange(270) % 6
    proba = np.eye(6)[y]
    bootstrap = bootstrap_ci(y, y, proba, batch_accuracy, 500, 0.95, seed=0)
    assert all(math.isnan(v) for v in bootstrap)  # a point is no interval: never printed as [1, 1]
    intervals = intervals_over_test_images(y, y, proba, BATCH_METRICS, 200, 0.95, seed=0)
    assert intervals["accuracy"] == pytest.approx((low, high))
    assert wilson_interval(216, 270, 0.95) == pytest.approx(stats.binomtest(216, 270).proportion_ci(
        0.95, method="wilson"))


def test_percentile_interval_is_the_central_one_ignoring_nans():
    values = np.append(np.arange(1001.0), np.nan)
    assert percentile_interval(values, 0.95) == pytest.approx((25.0, 975.0))  # 2.5 % in each tail
    assert percentile_interval(values, 0.5) == pytest.approx((250.0, 750.0))
    assert all(math.isnan(v) for v in percentile_interval(np.full(5, np.nan), 0.95))


def test_bootstrap_ci_covers_true_accuracy_at_nominal_rate():
    true_accuracy, covered, datasets = 0.8, 0, 200
    for i in range(datasets):
        y_true, y_pred, proba = synthetic_predictions(300, 6, true_accuracy, seed=100 + i)
        low, high = bootstrap_ci(y_true, y_pred, proba, batch_accuracy, n=1000, confidence=0.95, seed=i)
        covered += low <= true_accuracy <= high
    assert 0.90 <= covered / datasets <= 0.99


def test_bootstrap_ci_is_reproducible_and_brackets_the_estimate():
    y_true, y_pred, proba = synthetic_predictions(270, 6, 0.83, seed=5)
    first = bootstrap_ci(y_true, y_pred, proba, BATCH_METRICS["f1_macro"], 2000, 0.95, seed=7)
    again = bootstrap_ci(y_true, y_pred, proba, BATCH_METRICS["f1_macro"], 2000, 0.95, seed=7)
    estimate = classification_metrics(y_true, y_pred, proba, 6)["f1_macro"]
    assert first == again
    assert first[0] < estimate < first[1]
    assert 0.03 < (first[1] - first[0]) / 2 < 0.07  # about ±4.5 points for n = 270


def test_bootstrap_values_are_the_metric_of_each_resample_whatever_the_chunk():
    # Speed is bench/'s business; here: every value is the plain metric on its resample of the
    # images, and chunking the resamples (bounded memory) changes nothing.
    y_true, y_pred, proba = synthetic_predictions(90, 3, 0.7, seed=8)
    values = bootstrap_distribution(y_true, y_pred, proba, BATCH_METRICS["f1_macro"], 40, seed=3, chunk=7)
    assert np.array_equal(values, bootstrap_distribution(y_true, y_pred, proba, BATCH_METRICS["f1_macro"], 40, seed=3))
    weights = resample_weights(90, 40, seed=3).astype(int)
    assert (weights.sum(axis=1) == 90).all()
    for b in (0, 17, 39):
        drawn = np.repeat(np.arange(90), weights[b])
        plain = classification_metrics(y_true[drawn], y_pred[drawn], proba[drawn], 3)["f1_macro"]
        assert values[b] == pytest.approx(plain)


def paired_results(both: int, only_a: int, only_b: int, neither: int):
    """Correctness arrays of two classifiers with the given 2x2 table."""
    a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    return np.array(a), np.array(b)


def test_mcnemar_exact_on_small_discordance():
    result = mcnemar(*paired_results(50, 10, 2, 8))
    assert (result["b"], result["c"]) == (10, 2)
    assert result["method"] == "exact binomial"
    assert result["p_value"] == pytest.approx(0.0386, abs=1e-4)  # 2 * (1 + 12 + 66) / 2**12


@pytest.mark.parametrize("b, c, method", [(17, 7, "exact"), (18, 7, "chi-square")])
def test_mcnemar_is_exact_below_25_discordant_pairs(b, c, method):
    """b + c = 24 takes the exact binomial test, 25 the chi-square; the two p-values differ enough
    here (24: 0.064 exact vs 0.066 chi-square; 25: 0.043 vs 0.045) that the test shows which ran."""
    exact = 2 * stats.binom.cdf(min(b, c), b + c, 0.5)
    chi_square = stats.chi2.sf((abs(b - c) - 1) ** 2 / (b + c), df=1)
    assert abs(exact - chi_square) > 1e-3
    result = mcnemar(*paired_results(40, b, c, 9))
    assert (result["b"], result["c"]) == (b, c)
    if method == "exact":
        assert result["method"] == "exact binomial" and result["p_value"] == pytest.approx(exact, rel=1e-9)
    else:
        assert result["method"].startswith("chi-square") and result["p_value"] == pytest.approx(chi_square, rel=1e-9)


def test_mcnemar_chi_square_textbook_example():
    # Agresti's approval ratings: 794 / 150 / 86 / 570; corrected chi-square = 63**2 / 236.
    result = mcnemar(*paired_results(794, 150, 86, 570))
    assert result["method"].startswith("chi-square")
    assert result["statistic"] == pytest.approx(63 ** 2 / 236)
    assert result["p_value"] == pytest.approx(math.erfc(math.sqrt(63 ** 2 / 236 / 2)))  # chi2(1) tail
    assert result["p_value"] < 1e-4


def test_mcnemar_equal_discordance_gives_p_one():
    """b = c = 25: the continuity correction is max(|b − c| − 1, 0) = 0, not −1 (which gave p = 0.8875)."""
    result = mcnemar(*paired_results(100, 25, 25, 20))
    assert result["statistic"] == 0 and result["p_value"] == 1.0


def test_mcnemar_identical_classifiers_and_unpaired_input():
    same = np.array([True, False, True])
    assert mcnemar(same, same)["p_value"] == 1.0
    with pytest.raises(ValueError, match="paired"):
        mcnemar(same, same[:2])
