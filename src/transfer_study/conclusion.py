"""reports/conclusion.md: the answer to "scratch or pretrained?" in plain words, generated from
analysis.py's numbers and set beside the study's claims.

Every sentence is chosen by a verdict, an interval or a catch-up status, so the text says no
more than the numbers do: "better" only where the paired test and the interval both say so,
an interval only where there are several runs, a catch-up size only where a curve crosses.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from .analysis import (
    BETTER,
    CATCHES_UP,
    NEVER,
    NOT_BEHIND,
    SINGLE,
    UNDETERMINED,
    WORSE,
    catch_up,
    min_pairs,
    paired_analysis,
)
from .report import cell_order, markdown_table

LABELS = {"frozen": "frozen ImageNet features (only the classifier trained; the study's \"fine-tuned\")",
          "finetune": "fine-tuning every layer from ImageNet weights"}
SHORT = {"frozen": "frozen", "finetune": "finetune"}
STUDY_NAME = {"frozen": "fine-tuned"}  # our condition → the study's name for it
ACCURACY, F1 = "test_accuracy", "test_f1_macro"


def points(value: float) -> str:
    """A difference of fractions as signed percentage points: +8.1."""
    return f"{value * 100:+.1f}"


def p_text(p: float) -> str:
    return "p < 0.0001" if p < 1e-4 else f"p = {p:.4f}"


def size_text(value: float) -> str:
    return f"{value:,.0f}"


def headline_rows(paired: pd.DataFrame, arch: str, condition: str) -> tuple[pd.Series, pd.Series]:
    """The accuracy and macro-F1 rows at the largest training size of one comparison."""
    rows = paired[(paired["architecture"] == arch) & (paired["pretrained"] == condition)]
    at = rows[rows["fraction"] == rows["fraction"].max()].set_index("metric")
    return at.loc[ACCURACY], at.loc[F1]


# --------------------------------------------------------------------------- sentences


def comparison_sentence(acc: pd.Series, condition: str, confidence: float) -> str:
    """What the accuracy difference at the full training set says, by its verdict."""
    name, level = SHORT[condition], f"{confidence:.0%}"
    size = f"at {size_text(acc['train_per_class'])} training images per class"
    if acc["verdict"] == SINGLE:
        return (f"With one run per cell, the test accuracy difference {name} − scratch was measured once, {size}: "
                f"{points(acc['mean'])} points. One run cannot tell whether that difference would survive "
                f"another seed or split, so this does not establish which is better; run several seeds and "
                f"splits (the robust profile) for an answer.")
    spread = (f"{points(acc['mean'])} points on average over {acc['n_pairs']} paired runs {size} "
              f"({level} interval {points(acc['low'])} to {points(acc['high'])}; "
              f"exact sign-flip {p_text(acc['sign_flip_p'])})")
    if acc["verdict"] == BETTER:
        return f"Starting from {LABELS[condition]} beats training from scratch: test accuracy {spread}."
    if acc["verdict"] == WORSE:
        return f"Training from scratch beats {LABELS[condition]}: the test accuracy difference is {spread}."
    text = f"{name.capitalize()} and scratch cannot be told apart: the test accuracy difference is {spread}."
    needed = min_pairs(1 - confidence)
    if acc["n_pairs"] < needed:
        return text + (f" With {acc['n_pairs']} pairs the exact test cannot reach p < {1 - confidence:.2f} whatever "
                       f"the results, so no difference can be established; at least {needed} pairs (e.g. 3 seeds × "
                       f"2 splits) are needed.")
    if acc["low"] > 0 or acc["high"] < 0:
        return text + (f" The t interval excludes zero but the exact sign-flip test does not confirm it (p ≥ "
                       f"{1 - confidence:.2f}), so the difference is not established.")
    return text + (f" What is established: at {level} confidence, {name} gains at most "
                   f"{acc['high'] * 100:.1f} points over scratch here, and loses at most {-acc['low'] * 100:.1f}.")


def f1_sentence(f1: pd.Series, acc: pd.Series) -> str:
    """Macro-F1 in one sentence: agreeing with accuracy or not."""
    if f1["verdict"] == SINGLE:
        return f"Macro-F1 moved by {points(f1['mean'])} points in the same single pair."
    interval = f"{points(f1['mean'])} points ({points(f1['low'])} to {points(f1['high'])})"
    if f1["verdict"] == acc["verdict"]:
        return f"Macro-F1 tells the same: {interval}."
    said = {BETTER: "higher", WORSE: "lower"}.get(f1["verdict"])
    if said:
        return f"Macro-F1, by contrast, is clearly {said} with the pretrained start: {interval}."
    return f"Macro-F1 does not confirm it: {interval}, not distinguishable from zero."


def catch_up_sentence(row: pd.Series | None, condition: str, confidence: float) -> str:
    """Where scratch catches up on accuracy, by the curve's status; empty without a curve."""
    if row is None or row["status"] not in (CATCHES_UP, NEVER, UNDETERMINED, NOT_BEHIND, SINGLE):
        return ""
    name, sizes = SHORT[condition], row["sizes"]
    tried = f"{size_text(sizes[0])} to {size_text(sizes[-1])} training images per class"
    if row["status"] == SINGLE:
        return f"Over {tried}, with one run per size, where scratch catches up cannot be told."
    if row["status"] == NOT_BEHIND:
        return (f"Over {tried}, scratch is not behind {name} on average even at the smallest size, so there is "
                f"no catch-up point within these sizes.")
    if row["status"] == NEVER:
        return (f"Over {tried}, scratch does not catch up: {name} is ahead on average at every size and clearly "
                f"ahead at the largest.")
    if row["status"] == UNDETERMINED:
        return (f"Over {tried}, {name} is ahead on average at every size, but at the largest size the advantage "
                f"cannot be told from zero, so whether scratch catches up within these sizes cannot be told.")
    low = (f"at or below {size_text(sizes[0])}" if row["low"] == -math.inf else size_text(row["low"]))
    high = (f"beyond {size_text(sizes[-1])}, the largest size tried" if row["high"] == math.inf
            else size_text(row["high"]))
    text = (f"Over {tried}, scratch catches up with {name} at about {size_text(row['estimate'])} images per class "
            f"({confidence:.0%} interval: {low} to {high}).")
    if row["high"] == math.inf:
        text += " It may also not catch up within these sizes at all."
    return text


def study_sentence(acc: pd.Series, study: pd.DataFrame, arch: str, condition: str, confidence: float) -> str:
    """Our full-size difference beside the study's single-run gap for the same architecture and condition."""
    if condition not in STUDY_NAME:
        return f"The study did not run {condition} (every layer trained from ImageNet weights)."
    cells = study[study["architecture"] == arch].set_index("condition")
    if condition not in cells.index or "scratch" not in cells.index:
        return f"The study did not run {arch}."
    theirs = float(cells.at[condition, "accuracy"] - cells.at["scratch", "accuracy"])
    text = (f"The study, with one run per cell, reported {STUDY_NAME[condition]} ahead of scratch by "
            f"{points(theirs)} points ({cells.at[condition, 'accuracy']:.1%} vs {cells.at['scratch', 'accuracy']:.1%}).")
    if acc["verdict"] == SINGLE:
        return text + " Our single run cannot confirm or contradict that gap."
    agrees = {BETTER: "We confirm the direction: pretrained is better.",
              WORSE: "We find the opposite direction."}.get(acc["verdict"], "We cannot confirm that direction.")
    if acc["low"] <= theirs <= acc["high"]:
        where = f"lies inside our {confidence:.0%} interval: the two gaps agree within our uncertainty."
    elif theirs > acc["high"]:
        where = f"lies above our {confidence:.0%} interval: pretrained gains less here than in the study."
    else:
        where = f"lies below our {confidence:.0%} interval: pretrained gains more here than in the study."
    return f"{text} {agrees} The study's gap {where}"


# --------------------------------------------------------------------------- paragraphs


def architecture_paragraph(paired: pd.DataFrame, catch: pd.DataFrame, study: pd.DataFrame | None,
                           arch: str, is_study_data: bool, confidence: float) -> str:
    """One architecture: each pretrained condition against scratch, its catch-up and the study beside it."""
    sentences = []
    for condition in [c for c in SHORT if c in set(paired.loc[paired["architecture"] == arch, "pretrained"])]:
        acc, f1 = headline_rows(paired, arch, condition)
        curve = catch[(catch["architecture"] == arch) & (catch["pretrained"] == condition)]
        sentences += [comparison_sentence(acc, condition, confidence), f1_sentence(f1, acc),
                      catch_up_sentence(curve.iloc[0] if len(curve) else None, condition, confidence)]
        if is_study_data and study is not None:
            sentences.append(study_sentence(acc, study, arch, condition, confidence))
    return " ".join(s for s in sentences if s)


def overall_paragraph(paired: pd.DataFrame, catch: pd.DataFrame, study: pd.DataFrame | None,
                      is_study_data: bool) -> str:
    """Counts of verdicts per pretrained condition, what that does and does not establish, and the study's claim."""
    sentences = []
    data = "these data" if is_study_data else "your data"
    for condition in [c for c in SHORT if c in set(paired["pretrained"])]:
        verdicts = {arch: headline_rows(paired, arch, condition)[0]["verdict"]
                    for arch in sorted(set(paired.loc[paired["pretrained"] == condition, "architecture"]),
                                       key=lambda a: cell_order((a, "")))}
        groups = {v: [a for a, w in verdicts.items() if w == v] for v in (BETTER, WORSE, SINGLE)}
        unclear = [a for a, w in verdicts.items() if w not in groups]
        parts = []
        if groups[BETTER]:
            parts.append(f"{SHORT[condition]} is established better than scratch for {', '.join(groups[BETTER])}")
        if groups[WORSE]:
            parts.append(f"scratch is established better than {SHORT[condition]} for {', '.join(groups[WORSE])}")
        if unclear:
            parts.append(f"{SHORT[condition]} and scratch cannot be told apart for {', '.join(unclear)}")
        if groups[SINGLE]:
            parts.append(f"one run per cell cannot tell for {', '.join(groups[SINGLE])}")
        sentences.append(f"{SHORT[condition].capitalize()} vs scratch on {data}, at the full training set: "
                         + "; ".join(parts) + ".")
    caught = catch[catch["status"] == CATCHES_UP]
    if len(caught):
        sentences.append("Scratch catches up within the sizes tried for " + ", ".join(
            f"{r.architecture} vs {SHORT[r.pretrained]} (about {size_text(r.estimate)} per class)"
            for r in caught.itertuples()) + ".")
    never = catch[catch["status"] == NEVER]
    if len(never):
        sentences.append("Scratch does not catch up within the sizes tried for " + ", ".join(
            f"{r.architecture} vs {SHORT[r.pretrained]}" for r in never.itertuples()) + ".")
    if not (paired["verdict"].isin([BETTER, WORSE])).any():
        sentences.append("Nothing here establishes that either choice is better.")
    if is_study_data and study is not None:
        sentences.append(study_overall(paired, study))
    elif not is_study_data:
        sentences.append("The study's Table 1 was measured on its own images, so its numbers are not compared "
                         "with your data here.")
    return " ".join(sentences)


def study_overall(paired: pd.DataFrame, study: pd.DataFrame) -> str:
    """The study's headline claim beside how many of its architectures we confirm it for."""
    theirs = sorted(set(study["architecture"]))
    ran = sorted(set(paired.loc[paired["pretrained"] == "frozen", "architecture"]) & set(theirs))
    if not ran:
        return "None of the study's architectures was run with frozen features here, so its claim is not tested."
    confirmed = [a for a in ran if headline_rows(paired, a, "frozen")[0]["verdict"] == BETTER]
    return (f"The study claimed, from one run per cell, that its \"fine-tuned\" (our frozen) beats scratch for all "
            f"{len(theirs)} of its models; here that is established for {len(confirmed)} of the {len(ran)} we ran"
            + (f" ({', '.join(confirmed)})." if confirmed else "."))


def per_size_table(paired: pd.DataFrame, confidence: float) -> str:
    """Every comparison at every size, on test accuracy."""
    rows = paired[paired["metric"] == ACCURACY].sort_values(["architecture", "pretrained", "train_per_class"])
    header = ["model", "pretrained", "train images per class", "pairs", "accuracy difference (points)",
              f"{confidence:.0%} interval", "sign-flip p", "verdict"]
    lines = []
    for r in rows.itertuples():
        interval = "—" if math.isnan(r.low) else f"{points(r.low)} to {points(r.high)}"
        p = "—" if math.isnan(r.sign_flip_p) else p_text(r.sign_flip_p).removeprefix("p = ")
        lines.append([r.architecture, r.pretrained, size_text(r.train_per_class), str(r.n_pairs), points(r.mean),
                      interval, p, r.verdict])
    return markdown_table(header, lines)


def method_text(confidence: float) -> str:
    return (f"Each pretrained run is paired with the scratch run of the same architecture, seed, split and "
            f"training size, and the difference pretrained − scratch is taken per pair. The {confidence:.0%} "
            f"interval is a Student t interval on the mean difference; the p-value is the exact sign-flip "
            f"permutation test, which assumes no normality and is exact for few pairs. A difference counts as "
            f"established only where the interval excludes zero and p < {1 - confidence:.2f}; with fewer than "
            f"{min_pairs(1 - confidence)} pairs that cannot happen. With one run per cell no interval is given.")


def conclusion_markdown(paired: pd.DataFrame, catch: pd.DataFrame, study: pd.DataFrame | None,
                        is_study_data: bool, confidence: float = 0.95) -> str:
    """The whole conclusion.md from analysis.paired_analysis and analysis.catch_up tables.

    study: report.read_study_table's frame (architecture, condition as ours, accuracy ...), used
    only when is_study_data; otherwise the text speaks of "your data" and compares no numbers.
    """
    parts = ["# Conclusion: train from scratch, or start from ImageNet weights?\n", method_text(confidence) + "\n"]
    if paired.empty:
        parts.append("No architecture has both a scratch and a pretrained run, so there is nothing to conclude.\n")
        return "\n".join(parts)
    for arch in sorted(set(paired["architecture"]), key=lambda a: cell_order((a, ""))):
        parts += [f"## {arch}\n", architecture_paragraph(paired, catch, study, arch, is_study_data, confidence) + "\n"]
    parts += ["## Overall\n", overall_paragraph(paired, catch, study, is_study_data) + "\n",
              "## Every comparison, by training size\n", per_size_table(paired, confidence)]
    return "\n".join(parts)


def write_conclusion(runs: pd.DataFrame, study: pd.DataFrame | None, path: Path, is_study_data: bool,
                     confidence: float = 0.95) -> str:
    """Analyse a runs table (analysis.RUN_COLUMNS) and write the conclusion to path; returns the text."""
    text = conclusion_markdown(paired_analysis(runs, confidence), catch_up(runs, confidence=confidence),
                               study, is_study_data, confidence)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return text
