"""Tests for analysis.py: paired differences, their test and interval, and where scratch catches up."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from transfer_study.analysis import (
    BETTER,
    CATCHES_UP,
    NEVER,
    NOT_BEHIND,
    ONE_SIZE,
    SINGLE,
    UNCLEAR,
    UNDETERMINED,
    WORSE,
    catch_up,
    cell_summary,
    crossing_size,
    min_pairs,
    paired_analysis,
    paired_runs,
    sign_flip_p,
    summarise_differences,
    t_interval,
)
from transfer_study.config import UserError

SIZES = {0.1: 21.0, 0.25: 53.0, 0.5: 105.0, 1.0: 210.0}


def make_runs(effects: dict[tuple[str, str], dict[float, float]], seeds=range(5), repeats=range(3),
              noise=0.01, seed=0) -> pd.DataFrame:
    """Runs with known answers: scratch at 0.75 (+ a shared unit effect), and each (arch, pretrained)
    condition at scratch + effect[fraction] + independent noise of sd `noise` per metric."""
    rng = np.random.default_rng(seed)
    rows = []
    for (arch, condition), by_fraction in effects.items():
        for s in seeds:
            for r in repeats:
                unit = 0.02 * np.sin(7 * s + 3 * r)  # seeds and splits differ, identically for both conditions
                for fraction, effect in by_fraction.items():
                    base = {"architecture": arch, "seed": s, "repeat": r, "fraction": fraction,
                            "train_per_class": SIZES[fraction]}
                    scratch = 0.75 + unit
                    rows.append({**base, "condition": "scratch", "test_accuracy": scratch, "test_f1_macro": scratch})
                    rows.append({**base, "condition": condition,
                                 "test_accuracy": scratch + effect + rng.normal(0, noise),
                                 "test_f1_macro": scratch + effect + rng.normal(0, noise)})
    # one scratch run per (arch, unit, fraction), whatever the number of pretrained conditions
    frame = pd.DataFrame(rows)
    return frame.drop_duplicates(["architecture", "condition", "seed", "repeat", "fraction"]).reset_index(drop=True)


def row_of(table: pd.DataFrame, **where) -> pd.Series:
    mask = np.logical_and.reduce([table[k] == v for k, v in where.items()])
    assert mask.sum() == 1, (where, mask.sum())
    return table[mask].iloc[0]


# --------------------------------------------------------------------------- the test and interval


def test_sign_flip_p_is_exact_on_small_examples():
    # |±1 ±2 ±3| over the 8 patterns: 6 4 2 0 0 2 4 6; the observed 6 is reached by 2 of 8.
    assert sign_flip_p(np.array([1.0, 2.0, 3.0])) == (0.25, "exact")
    assert sign_flip_p(np.full(6, 0.05))[0] == pytest.approx(2 / 64)
    assert sign_flip_p(np.array([0.1, -0.1]))[0] == 1.0
    assert sign_flip_p(np.array([0.1, 0.2, 0.3, -0.6]))[0] == 1.0  # mean exactly 0


def test_sign_flip_p_samples_beyond_sixteen_pairs():
    p, method = sign_flip_p(np.full(20, 0.03))
    assert method.startswith("sampled") and p < 1e-3
    p_null, _ = sign_flip_p(np.tile([0.02, -0.02], 10))
    assert p_null == 1.0


def test_fewest_pairs_the_sign_flip_test_needs():
    assert min_pairs(0.05) == 6
    assert sign_flip_p(np.full(5, 0.05))[0] > 0.05 > sign_flip_p(np.full(6, 0.05))[0]


def test_t_interval_matches_scipy():
    d = np.array([0.03, 0.05, 0.01, 0.06, 0.02, 0.04, -0.01])
    low, high, p = t_interval(d, 0.95)
    reference = stats.ttest_1samp(d, 0)
    assert (low, high) == pytest.approx(tuple(reference.confidence_interval(0.95)))
    assert p == pytest.approx(reference.pvalue)
    assert t_interval(np.full(4, 0.02), 0.95) == (0.02, 0.02, 0.0)
    assert all(math.isnan(v) for v in t_interval(np.array([0.02]), 0.95))


def test_one_pair_cannot_be_analysed():
    summary = summarise_differences(np.array([0.08]), 0.95)
    assert summary["verdict"] == SINGLE and summary["n_pairs"] == 1
    assert math.isnan(summary["low"]) and math.isnan(summary["high"]) and math.isnan(summary["sign_flip_p"])


def test_five_clear_pairs_are_not_enough_for_a_verdict():
    summary = summarise_differences(np.array([0.08, 0.09, 0.07, 0.10, 0.08]), 0.95)
    assert summary["low"] > 0 and summary["t_p"] < 0.001  # the t interval alone would call it
    assert summary["verdict"] == UNCLEAR  # but the exact test cannot go below 2/32


def test_null_differences_are_called_at_the_stated_rate():
    """2,000 simulated studies of 10 pairs with no true difference: each test rejects about 5 % of the time."""
    rng = np.random.default_rng(12)
    studies = 2000
    summaries = [summarise_differences(rng.normal(0, 0.02, 10), 0.95) for _ in range(studies)]
    margin = 3 * math.sqrt(0.05 * 0.95 / studies)  # three binomial standard errors, about 1.5 points
    t_rate = np.mean([s["t_p"] < 0.05 for s in summaries])
    flip_rate = np.mean([s["sign_flip_p"] < 0.05 for s in summaries])
    called = np.mean([s["verdict"] != UNCLEAR for s in summaries])
    assert abs(t_rate - 0.05) < margin, t_rate
    assert abs(flip_rate - 50 / 1024) < margin, flip_rate  # the exact test's attainable level below 0.05
    assert abs(called - 0.05) < margin and called <= min(t_rate, flip_rate), called


def test_true_differences_are_found_and_covered():
    rng = np.random.default_rng(5)
    studies, true = 500, 0.03
    summaries = [summarise_differences(rng.normal(true, 0.02, 15), 0.95) for _ in range(studies)]
    assert np.mean([s["verdict"] == BETTER for s in summaries]) > 0.95  # power ≈ 0.99 at 1.5 sd, 15 pairs
    assert not any(s["verdict"] == WORSE for s in summaries)
    coverage = np.mean([s["low"] <= true <= s["high"] for s in summaries])
    assert abs(coverage - 0.95) < 3 * math.sqrt(0.05 * 0.95 / studies), coverage


# --------------------------------------------------------------------------- runs → pairs → verdicts


def test_paired_analysis_finds_better_worse_and_null():
    runs = make_runs({("resnet18", "frozen"): {1.0: 0.08}, ("resnet18", "finetune"): {1.0: 0.0},
                      ("vgg19", "frozen"): {1.0: -0.05}})
    table = paired_analysis(runs)
    frozen = row_of(table, architecture="resnet18", pretrained="frozen", metric="test_accuracy")
    assert frozen["verdict"] == BETTER and frozen["n_pairs"] == 15 and frozen["low"] < 0.08 < frozen["high"]
    assert frozen["sign_flip_method"] == "exact"
    assert row_of(table, architecture="resnet18", pretrained="finetune", metric="test_accuracy")["verdict"] == UNCLEAR
    assert row_of(table, architecture="vgg19", pretrained="frozen", metric="test_f1_macro")["verdict"] == WORSE
    assert len(table) == 3 * 2  # three comparisons, two metrics


def test_pairs_match_seed_repeat_and_fraction():
    runs = make_runs({("resnet18", "frozen"): {0.5: 0.05, 1.0: 0.02}}, seeds=[0, 1], repeats=[0, 1])
    runs = runs[~((runs["condition"] == "scratch") & (runs["seed"] == 1) & (runs["repeat"] == 1))]
    pairs = paired_runs(runs)
    assert len(pairs) == 2 * 3  # the unit without a scratch run is dropped at both fractions
    assert (pairs["test_accuracy_difference"]
            == pairs["test_accuracy_pretrained"] - pairs["test_accuracy_scratch"]).all()
    by_fraction = paired_analysis(runs).query("metric == 'test_accuracy'").set_index("fraction")
    assert by_fraction.loc[0.5, "mean"] == pytest.approx(0.05, abs=0.02)
    assert by_fraction.loc[0.5, "train_per_class"] == 105.0


def test_one_run_per_cell_says_single_run():
    runs = make_runs({("resnet18", "frozen"): {1.0: 0.1}}, seeds=[0], repeats=[0])
    table = paired_analysis(runs)
    assert set(table["verdict"]) == {SINGLE}
    assert table["low"].isna().all()


def test_bad_runs_tables_are_user_errors():
    runs = make_runs({("resnet18", "frozen"): {1.0: 0.1}}, seeds=[0], repeats=[0])
    with pytest.raises(UserError, match="lacks column.*repeat"):
        paired_analysis(runs.drop(columns="repeat"))
    with pytest.raises(UserError, match="more than one run for architecture=resnet18"):
        paired_analysis(pd.concat([runs, runs.head(1)]))


def test_cell_summary_gives_mean_and_interval_per_cell():
    runs = make_runs({("resnet18", "frozen"): {0.5: 0.05, 1.0: 0.02}}, seeds=[0, 1, 2], repeats=[0, 1])
    table = cell_summary(runs)
    assert len(table) == 2 * 2 and set(table["n_runs"]) == {6}
    scratch = row_of(table, condition="scratch", fraction=1.0)
    values = runs.query("condition == 'scratch' and fraction == 1.0")["test_accuracy"]
    assert scratch["test_accuracy"] == pytest.approx(values.mean())
    assert scratch["test_accuracy_low"] < values.mean() < scratch["test_accuracy_high"]
    single = cell_summary(runs.query("seed == 0 and repeat == 0"))
    assert single["test_accuracy_low"].isna().all() and single["test_accuracy_sd"].isna().all()


# --------------------------------------------------------------------------- catching up


def test_crossing_size_interpolates_in_log_size():
    sizes = np.array([10.0, 100.0, 1000.0])
    assert crossing_size(sizes, np.array([0.2, 0.1, -0.1])) == pytest.approx(10 ** 2.5)
    assert crossing_size(sizes, np.array([0.2, 0.0, -0.1])) == pytest.approx(100)
    assert crossing_size(sizes, np.array([-0.01, 0.1, 0.1])) == -math.inf
    assert crossing_size(sizes, np.array([0.3, 0.2, 0.1])) == math.inf
    assert crossing_size(sizes, np.array([0.2, np.nan, -0.2])) == pytest.approx(100)


def test_scratch_catches_up_where_the_curve_crosses_zero():
    # mean difference 0.12, 0.06, 0.00, -0.03 at 21, 53, 105, 210 per class: it reaches 0 at 105.
    runs = make_runs({("resnet18", "frozen"): {0.1: 0.12, 0.25: 0.06, 0.5: 0.0, 1.0: -0.03}}, noise=0.005)
    row = catch_up(runs).iloc[0]
    assert row["status"] == CATCHES_UP and row["sizes"] == (21.0, 53.0, 105.0, 210.0) and row["n_units"] == 15
    assert 53 < row["low"] <= row["estimate"] <= row["high"] < 210
    assert row["low"] <= 105 <= row["high"]


def test_scratch_never_catches_up_within_the_sizes():
    runs = make_runs({("resnet18", "frozen"): {0.1: 0.15, 0.5: 0.10, 1.0: 0.08}})
    row = catch_up(runs).iloc[0]
    assert row["status"] == NEVER and row["estimate"] == math.inf and row["low"] == math.inf


def test_an_advantage_not_established_at_the_largest_size_is_undetermined():
    runs = make_runs({("resnet18", "frozen"): {0.1: 0.10, 1.0: 0.004}}, noise=0.02, seed=3)
    largest = paired_analysis(runs).query("fraction == 1.0 and metric == 'test_accuracy'").iloc[0]
    assert largest["mean"] > 0 and largest["verdict"] == UNCLEAR  # the premise of this case
    row = catch_up(runs).iloc[0]
    assert row["status"] == UNDETERMINED and row["high"] == math.inf and row["low"] < math.inf


def test_scratch_not_behind_at_the_smallest_size():
    row = catch_up(make_runs({("resnet18", "frozen"): {0.1: -0.02, 1.0: -0.04}})).iloc[0]
    assert row["status"] == NOT_BEHIND and row["estimate"] == -math.inf


def test_catch_up_needs_two_sizes_and_two_units():
    assert catch_up(make_runs({("resnet18", "frozen"): {1.0: 0.1}})).iloc[0]["status"] == ONE_SIZE
    one_unit = make_runs({("resnet18", "frozen"): {0.1: 0.1, 1.0: -0.1}}, seeds=[0], repeats=[0])
    row = catch_up(one_unit).iloc[0]
    assert row["status"] == SINGLE and math.isnan(row["estimate"])
