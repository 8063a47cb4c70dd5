"""Tests for wording.py: each case gets the words its numbers support, and no others."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from conftest import REPO_ROOT
from test_inference import make_runs

from transfer_study.inference import ESTABLISHED, NOT_ESTABLISHED, PRIMARY, REPLICATE, TOO_FEW, Units, infer
from transfer_study.report import read_study_table
from transfer_study.wording import (
    comparison_sentence,
    conclusion_markdown,
    interval_text,
    points,
    verdict_text,
)

STUDY = read_study_table(REPO_ROOT / "references" / "study_table1.csv")
UNITS = Units(REPLICATE, "replicate", 3)


def conclude(effects, is_study_data=True, runs=None, **kwargs) -> str:
    runs = make_runs(effects, **kwargs) if runs is None else runs
    return conclusion_markdown(infer(runs, bootstrap_samples=300), runs, STUDY, is_study_data)


def section(text: str, heading: str) -> str:
    """The text under the `## ` heading that starts with `heading`, up to the next heading."""
    match = re.search(rf"^## {re.escape(heading)}.*?\n(.*?)(?=^## |\Z)", text, flags=re.DOTALL | re.MULTILINE)
    assert match, heading
    return match.group(1).strip()


def comparison(**values) -> pd.Series:
    """A row of inference.comparisons with the numbers a wording test needs."""
    row = {"a": "efficientnet_lite0 frozen", "b": "efficientnet_lite0 scratch", "outcome": "external_accuracy",
           "train_per_class": 210.0, "family": PRIMARY, "reason": "", "roles": "pretrained − scratch"} | values
    return pd.Series(row)


# --------------------------------------------------------------------------- numbers


def test_points_are_never_negative_zero_and_intervals_never_zero_width():
    assert points(-0.0001) == "0.0" and points(0.0) == "0.0" and points(0.081) == "+8.1" and points(-0.03) == "-3.0"
    assert interval_text(0.0040, 0.0041) == "+0.40 to +0.41"  # more decimals until the ends differ
    assert interval_text(-0.00001, 0.0) == "-0.001 to 0.000"
    assert interval_text(float("nan"), float("nan")) == "—"


# --------------------------------------------------------------------------- one comparison's sentence


def test_a_large_difference_over_few_units_is_not_called_indistinguishable():
    """+30 points over 3 units with a wide interval: not established, with the interval; never
    'cannot be told apart' (the old wording)."""
    row = comparison(n_units=3, mean=0.30, low=-0.05, high=0.65, p=0.07, p_adjusted=0.07, verdict=NOT_ESTABLISHED)
    sentence = comparison_sentence(row, UNITS, 0.95, family_size=1)
    assert "+30.0 points over 3 replicates (95% interval -5.0 to +65.0" in sentence
    assert "not established (primary)" in sentence and "-5.0 to +65.0 points" in sentence
    assert "cannot be told apart" not in sentence
    two = comparison_sentence(comparison(n_units=2, mean=0.30, low=float("nan"), high=float("nan"), p=float("nan"),
                                         p_adjusted=float("nan"), verdict=TOO_FEW, reason="fewer than 3 units"),
                              UNITS, 0.95, 1)
    assert "+30.0 points on 2 replicates; undetermined: too few units (at least 3 independent units" in two


def test_an_interval_that_excludes_zero_before_holm_says_why_it_is_not_established():
    row = comparison(n_units=6, mean=0.02, low=0.001, high=0.039, p=0.04, p_adjusted=0.12, verdict=NOT_ESTABLISHED)
    sentence = comparison_sentence(row, UNITS, 0.95, family_size=3)
    assert "p = 0.0400, Holm-adjusted over 3 = 0.1200" in sentence
    assert "after Holm's correction for the 3 primary comparisons p is not below 0.05" in sentence


def test_identical_units_are_undetermined_with_the_reason():
    row = comparison(n_units=4, mean=1 / 270, low=float("nan"), high=float("nan"), p=float("nan"),
                     p_adjusted=float("nan"), verdict=TOO_FEW, reason="no spread between units")
    sentence = comparison_sentence(row, UNITS, 0.95, 1)
    assert "+0.4 points on 4 replicates; undetermined: too few units (every unit gave the same difference" in sentence
    assert "+0.4 to +0.4" not in sentence


def test_established_names_the_better_choice_with_its_numbers():
    text = conclude({("efficientnet_lite0", "frozen"): {1.0: -0.06}})
    answer = section(text, "The answer")
    assert ("efficientnet_lite0 scratch beats efficientnet_lite0 frozen on external test accuracy: efficientnet_lite0 "
            "frozen − efficientnet_lite0 scratch is -") in answer
    assert re.search(r"is -[56]\.\d points over 6 replicates \(95% interval -\d\.\d to -\d\.\d; p < 0.0001, Holm-adjusted over 1 < "
                     r"0.0001\): established \(primary\)", answer)
    assert answer.startswith("Of 1 primary comparison(s): 1 established, 0 not established, 0 undetermined")


# --------------------------------------------------------------------------- the design in words


def test_the_conclusion_says_what_the_unit_is_and_how_many():
    text = conclude({("efficientnet_lite0", "frozen"): {1.0: 0.05}}, replicates=range(7), seeds=range(3))
    design = section(text, "How this was decided")
    assert "The unit is the replicate: 7 independent replicate datasets" in design
    assert "never counted as extra units" in design and "Holm-corrected together" in design
    assert "The primary outcome is external test accuracy at the full training size" in design


def test_splits_of_your_own_images_are_said_to_overlap_and_how_that_is_handled():
    text = conclude({("efficientnet_lite0", "frozen"): {1.0: 0.05}}, is_study_data=False, replicates=[0],
                    repeats=range(5), external=False)
    design = section(text, "How this was decided")
    assert "The unit is the split: 5 stratified splits of one dataset" in design
    assert "Splits of one dataset overlap" in design and "Nadeau–Bengio corrected resampled t" in design
    assert "(1/J + n_test/n_train)" in design
    assert "Catch-up" not in text  # one size: no catch-up sentence


def test_one_run_per_cell_establishes_nothing_and_points_to_the_replicated_profiles():
    text = conclude({("resnet18", "frozen"): {1.0: 0.10}}, replicates=[0], seeds=[0])
    assert text.splitlines()[2].startswith("**One run per cell (or seeds on one split) establishes nothing.**")
    assert "`make quick`" in text and "`params.robust.yaml`" in text
    verdicts = {v for v in re.findall(r"\| (established|not established|undetermined: too few units) \(", text)}
    assert verdicts == {TOO_FEW}
    assert "Our runs cannot confirm or contradict that gap: too few units." in section(text, "resnet18")


def test_single_class_runs_get_a_visible_note_and_epoch_caps_are_counted():
    runs = make_runs({("efficientnet_lite0", "frozen"): {0.25: 0.3, 1.0: 0.05}})
    broken = (runs["condition"] == "scratch") & (runs["fraction"] == 0.25) & (runs["replicate"] == 2)
    runs.loc[broken, "single_class"] = True
    runs.loc[runs["condition"] == "frozen", "hit_cap"] = True
    design = section(conclude(None, runs=runs), "How this was decided")
    assert "Kept out of every mean, interval and verdict: 2 run(s) that predict a single class" in design
    assert "efficientnet_lite0-scratch-s0-x2-r0-f0.25" in design
    assert f"{int(runs['hit_cap'].sum())} of {len(runs)} runs were still improving when the epoch cap ended them" in design


# --------------------------------------------------------------------------- catch-up and the study


def test_catch_up_is_worded_only_where_it_is_established():
    caught = section(conclude({("resnet18", "frozen"): {0.1: 0.12, 0.25: 0.06, 0.5: -0.01, 1.0: -0.03}},
                              noise=0.005), "resnet18")
    assert re.search(r"Scratch catches up with resnet18 frozen over 21 to 210 training images per class: from 105 "
                     r"images per class on, the mean difference stays at or below 0 \(95% bootstrap interval over "
                     r"replicates, 300 Monte-Carlo resamples: ", caught)
    dips = section(conclude({("resnet18", "frozen"): {0.1: 0.05, 0.25: -0.01, 1.0: 0.04}}, noise=0.005), "resnet18")
    assert "Scratch does not catch up with resnet18 frozen" in dips and "catches up" not in dips
    flat = section(conclude({("resnet18", "frozen"): {0.1: 0.004, 1.0: -0.02}}, noise=0.02, seed=3), "resnet18")
    assert ("Catch-up of scratch with resnet18 frozen over 21 to 210 training images per class: undetermined, since "
            "no advantage of resnet18 frozen is established at a smaller size.") in flat


@pytest.mark.parametrize("effect, where", [(0.11, "lies inside our 95% interval"),
                                           (0.03, "pretrained gains less here"),
                                           (0.20, "pretrained gains more here")])
def test_study_gap_beside_our_in_split_interval(effect, where):
    paragraph = section(conclude({("resnet18", "frozen"): {1.0: effect}}, noise=0.02), "resnet18")
    assert "reported fine-tuned ahead of scratch by +11.2 points (83.2% vs 71.9%)" in paragraph
    assert where in paragraph and "Ours on the in-split test set is" in paragraph


def test_your_data_is_not_compared_with_the_study():
    text = conclude({("resnet18", "frozen"): {1.0: 0.1}}, is_study_data=False)
    assert "The study, with one run" not in text and "(83.2% vs 71.9%)" not in text and "study's gap" not in text
    assert "its numbers are not compared with your data here" in text


def test_every_comparison_table_quotes_the_verdict_words():
    text = conclude({("efficientnet_lite0", "frozen"): {0.25: 0.1, 1.0: 0.05},
                     ("efficientnet_lite0", "finetune"): {0.25: 0.0, 1.0: 0.0}})
    table = section(text, "Every pretrained − scratch comparison")
    rows = [line for line in table.splitlines() if line.startswith("| efficientnet_lite0")]
    assert len(rows) == 2 * 2 * 4  # two conditions, two sizes, four outcomes
    assert all(row.rstrip(" |").endswith(("(primary)", "(exploratory)")) for row in rows)
    words = {re.search(r"\| ([a-z: ]+) \((?:primary|exploratory)\) \|$", row)[1] for row in rows}
    assert words <= {ESTABLISHED, NOT_ESTABLISHED, TOO_FEW}
    assert verdict_text(comparison(verdict=ESTABLISHED)) == "established (primary)"
