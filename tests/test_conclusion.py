"""Tests for conclusion.py: each case gets the words its numbers support, and no others."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from conftest import REPO_ROOT
from test_analysis import make_runs

from transfer_study.analysis import catch_up, paired_analysis
from transfer_study.conclusion import conclusion_markdown, write_conclusion
from transfer_study.report import read_study_table

STUDY = read_study_table(REPO_ROOT / "references" / "study_table1.csv")
CLAIMS = ("beats", "cannot be told apart", "measured once", "catches up", "does not catch up")


def conclude(effects, is_study_data=True, **kwargs) -> str:
    runs = make_runs(effects, **kwargs)
    return conclusion_markdown(paired_analysis(runs), catch_up(runs), STUDY, is_study_data)


def section(text: str, heading: str) -> str:
    """The text under `## heading`, up to the next heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.DOTALL | re.MULTILINE)
    assert match, heading
    return match.group(1).strip()


def claims_in(paragraph: str) -> set[str]:
    return {claim for claim in CLAIMS if claim in paragraph}


def test_pretrained_clearly_better():
    paragraph = section(conclude({("resnet18", "frozen"): {1.0: 0.08}}), "resnet18")
    assert "Starting from frozen ImageNet features" in paragraph and "beats training from scratch" in paragraph
    match = re.search(r"\+(\d\.\d) points on average over 15 paired runs at 210 training images per class "
                      r"\(95% interval \+(\d\.\d) to \+(\d\.\d); exact sign-flip p < 0.0001\)", paragraph)
    assert match and float(match[2]) <= 8.0 <= float(match[3]), paragraph
    assert claims_in(paragraph) == {"beats"}
    assert "Macro-F1 tells the same" in paragraph


def test_pretrained_clearly_worse():
    paragraph = section(conclude({("resnet18", "frozen"): {1.0: -0.06}}), "resnet18")
    assert paragraph.startswith("Training from scratch beats frozen")
    assert "We find the opposite direction." in paragraph  # against the study's +11.2 points
    assert "Starting from" not in paragraph


def test_not_distinguishable_says_what_is_ruled_out():
    paragraph = section(conclude({("resnet18", "frozen"): {1.0: 0.0}}), "resnet18")
    assert paragraph.startswith("Frozen and scratch cannot be told apart")
    assert re.search(r"at 95% confidence, frozen gains at most \d\.\d points over scratch here, and loses at most "
                     r"\d\.\d", paragraph)
    assert claims_in(paragraph) == {"cannot be told apart"}
    assert "We cannot confirm that direction." in paragraph


def test_too_few_pairs_for_the_exact_test():
    paragraph = section(conclude({("resnet18", "frozen"): {1.0: 0.10}}, seeds=[0, 1, 2], repeats=[0]), "resnet18")
    assert "cannot be told apart" in paragraph and "With 3 pairs the exact test cannot reach p < 0.05" in paragraph
    assert "at least 6 pairs" in paragraph and "beats" not in paragraph


def test_one_run_per_cell_cannot_tell_and_gives_no_interval():
    text = conclude({("resnet18", "frozen"): {1.0: 0.10}}, seeds=[0], repeats=[0])
    paragraph = section(text, "resnet18")
    assert "measured once" in paragraph and "does not establish which is better" in paragraph
    assert "interval" not in paragraph and "p =" not in paragraph
    assert "Our single run cannot confirm or contradict that gap." in paragraph
    overall = section(text, "Overall")
    assert "one run per cell cannot tell for resnet18" in overall
    assert "Nothing here establishes that either choice is better." in overall


def test_scratch_catches_up_at_a_size():
    effects = {("resnet18", "frozen"): {0.1: 0.12, 0.25: 0.06, 0.5: 0.0, 1.0: -0.03}}
    paragraph = section(conclude(effects, noise=0.005), "resnet18")
    match = re.search(r"scratch catches up with frozen at about (\d+) images per class \(95% interval: (\d+) to (\d+)\)",
                      paragraph)
    assert match and 53 < int(match[2]) <= int(match[1]) <= int(match[3]) < 210
    assert "may also not catch up" not in paragraph


def test_scratch_never_catches_up_within_the_sizes():
    text = conclude({("resnet18", "finetune"): {0.1: 0.15, 0.5: 0.10, 1.0: 0.08}})
    paragraph = section(text, "resnet18")
    assert ("Over 21 to 210 training images per class, scratch does not catch up: finetune is ahead on average at "
            "every size and clearly ahead at the largest.") in paragraph
    assert "The study did not run finetune" in paragraph
    assert "Scratch does not catch up within the sizes tried for resnet18 vs finetune." in section(text, "Overall")


def test_undetermined_and_not_behind_curves_claim_no_catch_up_size():
    undetermined = section(conclude({("resnet18", "frozen"): {0.1: 0.10, 1.0: 0.004}}, noise=0.02, seed=3), "resnet18")
    assert "whether scratch catches up within these sizes cannot be told" in undetermined
    assert "at about" not in undetermined
    not_behind = section(conclude({("resnet18", "frozen"): {0.1: -0.02, 1.0: -0.04}}), "resnet18")
    assert "scratch is not behind frozen on average even at the smallest size" in not_behind
    assert "at about" not in not_behind


@pytest.mark.parametrize("effect, where", [(0.11, "lies inside our 95% interval"),
                                           (0.03, "pretrained gains less here than in the study"),
                                           (0.20, "pretrained gains more here than in the study")])
def test_study_gap_beside_our_interval(effect, where):
    paragraph = section(conclude({("resnet18", "frozen"): {1.0: effect}}, noise=0.03), "resnet18")
    assert "reported fine-tuned ahead of scratch by +11.2 points (83.2% vs 71.9%)" in paragraph
    assert where in paragraph and "We confirm the direction" in paragraph


def test_study_overall_counts_the_architectures_confirmed():
    text = conclude({("resnet18", "frozen"): {1.0: 0.1}, ("vgg19", "frozen"): {1.0: 0.0},
                     ("efficientnet_lite0", "frozen"): {1.0: 0.1}})
    overall = section(text, "Overall")
    assert "here that is established for 1 of the 2 we ran (resnet18)." in overall
    assert "frozen is established better than scratch for resnet18, efficientnet_lite0" in overall
    assert "frozen and scratch cannot be told apart for vgg19" in overall
    assert "The study did not run efficientnet_lite0." in section(text, "efficientnet_lite0")


def test_your_data_is_not_compared_with_the_study():
    text = conclude({("resnet18", "frozen"): {1.0: 0.1}}, is_study_data=False)
    assert "The study, with one run" not in text and "11.2" not in text and "study's gap" not in text
    overall = section(text, "Overall")
    assert "on your data" in overall and "its numbers are not compared with your data here" in overall


def test_per_size_table_lists_every_comparison():
    effects = {("resnet18", "frozen"): {0.1: 0.12, 1.0: 0.02}, ("resnet18", "finetune"): {0.1: 0.2, 1.0: 0.1}}
    table = section(conclude(effects), "Every comparison, by training size")
    rows = [line for line in table.splitlines() if line.startswith("| resnet18")]
    assert len(rows) == 4 and all(" 15 |" in row for row in rows)


def test_write_conclusion_writes_the_text(tmp_path):
    runs = make_runs({("resnet18", "frozen"): {1.0: 0.08}})
    path = tmp_path / "reports" / "conclusion.md"
    text = write_conclusion(runs, STUDY, path, is_study_data=True)
    assert path.read_text() == text and text.startswith("# Conclusion")
    assert not list(path.parent.glob(".*tmp"))


def _runs_with_differences(differences: list[float]) -> pd.DataFrame:
    """resnet18 scratch and frozen on len(differences) units (seed × split), frozen − scratch as given."""
    rows = []
    for unit, difference in enumerate(differences):
        base = {"architecture": "resnet18", "seed": unit // 2, "repeat": unit % 2, "fraction": 1.0,
                "train_per_class": 210.0}
        scratch = 0.70 + 0.01 * unit
        rows.append({**base, "condition": "scratch", "test_accuracy": scratch, "test_f1_macro": scratch})
        rows.append({**base, "condition": "frozen", "test_accuracy": scratch + difference,
                     "test_f1_macro": scratch + difference})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("sign", [1, -1])
def test_an_interval_that_excludes_zero_on_either_side_is_not_enough_without_the_exact_test(sign):
    """Five units 5 points apart and one 1 point the other way: the t interval excludes zero, but the
    sign-flip test gives p = 4/64 ≥ 0.05. Either side of zero, the words say so and claim nothing."""
    runs = _runs_with_differences([sign * d for d in (0.05, 0.05, 0.05, 0.05, 0.05, -0.01)])
    paired = paired_analysis(runs)
    accuracy = paired[paired["metric"] == "test_accuracy"].iloc[0]
    assert accuracy["sign_flip_p"] == pytest.approx(4 / 64)
    assert (accuracy["low"] > 0) if sign > 0 else (accuracy["high"] < 0)
    paragraph = section(conclusion_markdown(paired, catch_up(runs), STUDY, True), "resnet18")
    assert paragraph.startswith("Frozen and scratch cannot be told apart: the test accuracy difference is "
                                f"{'+' if sign > 0 else '-'}4.0 points on average over 6 paired runs")
    assert ("The t interval excludes zero but the exact sign-flip test does not confirm it (p ≥ 0.05), so the "
            "difference is not established.") in paragraph
    assert "What is established" not in paragraph and claims_in(paragraph) == {"cannot be told apart"}
