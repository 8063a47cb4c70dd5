"""The words for inference.py's decisions: how numbers, intervals and verdicts are written, and
reports/conclusion.md, the answer to "scratch or pretrained?" in plain words.

Every report file that names a comparison writes it with `comparison_label` and its verdict
with `verdict_text`, from the one `inference.comparisons` table, so a comparison reads the
same wherever it appears. Every sentence is chosen by a verdict, an interval or a catch-up
status: the text says no more than the numbers do.
"""

from __future__ import annotations

import math

import pandas as pd

from .cells import cell_order
from .inference import (
    BEST_VS_BEST,
    CATCHES_UP,
    ESTABLISHED,
    MIN_UNITS,
    NEEDS_REPLICATES,
    NO_ADVANTAGE,
    NO_SPREAD,
    NOT_CAUGHT_UP,
    NOT_ESTABLISHED,
    ONE_SIZE,
    PRETRAINED_VS_SCRATCH,
    PRIMARY,
    REPLICATE,
    SEEDS_ONLY,
    SPLIT,
    TOO_FEW,
    Inference,
    Units,
)

DASH = "—"
OUTCOME_NAMES = {"external_accuracy": "external test accuracy", "test_accuracy": "in-split test accuracy",
                 "external_f1_macro": "external test macro-F1", "test_f1_macro": "in-split test macro-F1"}
LABELS = {"frozen": "frozen ImageNet features (only the classifier trained; the study's \"fine-tuned\")",
          "finetune": "fine-tuning every layer from ImageNet weights"}
STUDY_NAME = {"frozen": "fine-tuned"}  # our condition → the study's name for it
UNIT_NOUN = {REPLICATE: ("replicate", "replicates"), SPLIT: ("split", "splits"), SEEDS_ONLY: ("unit", "units")}
STUDY_PROFILES = ("the quick profile (`make quick`, independent replicate datasets on a 2-core CPU) or the robust "
                  "profile (`params.robust.yaml`, more replicates and training sizes on a GPU)")


# --------------------------------------------------------------------------- numbers


def fmt(value, digits: int = 4) -> str:
    """A number for Markdown; missing values as an em dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return f"{value:.{digits}f}"


def points(value: float, decimals: int = 1) -> str:
    """A difference of fractions as signed percentage points: +8.1; zero unsigned (never -0.0)."""
    if value is None or math.isnan(value):
        return DASH
    text = f"{value * 100:+.{decimals}f}"
    return text[1:] if float(text) == 0 else text


def interval_text(low: float, high: float, unit: str = "") -> str:
    """'low to high' in signed points, with as many decimals as it takes for the two ends to differ
    (a zero-width interval is never printed); an em dash where there is no interval."""
    if math.isnan(low) or math.isnan(high):
        return DASH
    decimals = 1
    while decimals < 4 and points(low, decimals) == points(high, decimals):
        decimals += 1
    return f"{points(low, decimals)} to {points(high, decimals)}{unit}"


def p_text(p: float) -> str:
    """A p-value for a table cell: 0.0123, < 0.0001, or an em dash where no test ran."""
    if p is None or math.isnan(p):
        return DASH
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def p_clause(p: float, name: str = "p") -> str:
    """A p-value in a sentence: 'p = 0.0123' or 'p < 0.0001'."""
    text = p_text(p)
    return f"{name} {text}" if text.startswith("<") else f"{name} = {text}"


def size_text(value: float) -> str:
    return f"{value:,.0f}"


def units_noun(units: Units, n: int) -> str:
    singular, plural = UNIT_NOUN[units.kind]
    return f"{n} {singular if n == 1 else plural}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- one comparison


def comparison_label(row: pd.Series) -> str:
    """The one name of a comparison in every file: 'A − B, N per class, outcome'."""
    return f"{row['a']} − {row['b']}, {size_text(row['train_per_class'])} per class, {OUTCOME_NAMES[row['outcome']]}"


def verdict_text(row: pd.Series) -> str:
    """The one wording of a comparison's verdict: the verdict and its family."""
    return f"{row['verdict']} ({row['family']})"


def comparison_cells(row: pd.Series) -> list[str]:
    """A comparison as table cells: label, units, difference, interval, p, adjusted p, verdict."""
    adjusted = p_text(row["p_adjusted"]) if row["family"] == PRIMARY else DASH
    return [comparison_label(row), str(row["n_units"]), points(row["mean"]), interval_text(row["low"], row["high"]),
            p_text(row["p"]), adjusted, verdict_text(row)]


def comparisons_table(rows: pd.DataFrame, confidence: float) -> str:
    """Comparisons as a Markdown table (the columns the one-verdict check reads: comparison, verdict)."""
    header = ["comparison", "units", "difference (points)", f"{confidence:.0%} interval", "p", "Holm p", "verdict"]
    return markdown_table(header, [comparison_cells(r) for _, r in rows.iterrows()])


def comparison_sentence(row: pd.Series, units: Units, confidence: float, family_size: int) -> str:
    """What one comparison says, by its verdict, with its numbers."""
    level, name = f"{confidence:.0%}", OUTCOME_NAMES[row["outcome"]]
    over = units_noun(units, int(row["n_units"]))
    if row["verdict"] == TOO_FEW:
        measured = (f"{points(row['mean'])} points on {over}" if not math.isnan(row["mean"]) else "not measured")
        why = ("every unit gave the same difference, so its uncertainty cannot be measured" if row["reason"] == NO_SPREAD
               else f"at least {MIN_UNITS} independent units are needed for an interval and a test")
        return f"{row['a']} − {row['b']} on {name}: {measured}; {TOO_FEW} ({why})."
    numbers = (f"{points(row['mean'])} points over {over} ({level} interval {interval_text(row['low'], row['high'])}; "
               f"{p_clause(row['p'])}" + (f", {p_clause(row['p_adjusted'], f'Holm-adjusted over {family_size}')}"
                                          if row["family"] == PRIMARY else "") + ")")
    if row["verdict"] == ESTABLISHED:
        better, worse = (row["a"], row["b"]) if row["mean"] > 0 else (row["b"], row["a"])
        return f"{better} beats {worse} on {name}: {row['a']} − {row['b']} is {numbers}: {verdict_text(row)}."
    text = f"{row['a']} − {row['b']} on {name} is {numbers}: {verdict_text(row)}."
    if row["low"] > 0 or row["high"] < 0:
        return text + (f" The interval alone excludes zero, but after Holm's correction for the {family_size} primary "
                       f"comparisons p is not below {1 - confidence:.2f}.")
    return text + (f" The data are consistent with any difference from {interval_text(row['low'], row['high'])} "
                   f"points, no difference included.")


# --------------------------------------------------------------------------- the design in words


def units_text(inference: Inference) -> str:
    """What the unit is, how many there are and how overlapping units are handled."""
    units = inference.units
    if units.kind == REPLICATE:
        return (f"The unit is the replicate: {units.count} independent replicate datasets, disjoint from each other, "
                f"each with its own split. A replicate's seeds and split repeats are averaged into its one value, "
                f"never counted as extra units. Intervals and tests are Student t over the replicates.")
    if units.kind == SPLIT:
        return (f"The unit is the split: {units.count} stratified splits of one dataset, each split's seeds averaged "
                f"into its one value. Splits of one dataset overlap (a test image of one split is a training image of "
                f"another), so the spread between them understates the uncertainty; intervals and tests use the "
                f"Nadeau–Bengio corrected resampled t, whose variance is the splits' variance × (1/J + n_test/n_train) "
                f"instead of variance / J.")
    return ("All runs share one dataset and one split: one unit. Seeds on one split are not independent evidence about "
            "the training choice, so nothing here can be established.")


def design_text(inference: Inference) -> str:
    """The method paragraph: units, outcome, the primary family and its correction."""
    level = f"{inference.confidence:.0%}"
    primary = inference.primary
    outcome = OUTCOME_NAMES[inference.primary_outcome]
    if inference.primary_outcome.startswith("external"):
        external = ("The external test images (never used for training or any choice) are the same for every unit, "
                    "so their intervals describe those images' population; the in-split test set (the study's kind, "
                    "comparable with it) is reported beside them.")
    elif inference.units.kind == SPLIT:
        external = ("Splits of one dataset share any external test images, which the split correction does not cover, "
                    "so the in-split test set is the outcome.")
    else:
        external = "Not every run was scored on an external test set, so the in-split test set is the outcome."
    return (f"{units_text(inference)} Every comparison pairs two cells on the units that have both and is decided "
            f"once (inference.py), with one vocabulary: \"{ESTABLISHED}\" (p < {inference.alpha:.2f}), "
            f"\"{NOT_ESTABLISHED}\", \"{TOO_FEW}\" (fewer than {MIN_UNITS} units, or none with a spread). "
            f"The primary outcome is {outcome} at the full training size: pretrained − scratch for each architecture "
            f"and pretrained condition, and the best pretrained cell − the best scratch cell, each chosen on "
            f"validation accuracy; {len(primary)} primary comparison(s), Holm-corrected together. Everything else "
            f"is exploratory and uncorrected. Intervals are {level} t intervals, uncorrected. {external}")


def kept_out_text(kept_out: pd.DataFrame) -> str:
    """The visible note on single-class runs; empty when there are none."""
    if kept_out.empty:
        return ""
    names = ", ".join(kept_out["run"].astype(str))
    return (f"Kept out of every mean, interval and verdict: {len(kept_out)} run(s) that predict a single class for "
            f"every validation image ({names}). They are listed with their numbers in runs.md.")


def cap_text(runs: pd.DataFrame) -> str:
    """How many runs were still improving when the epoch cap ended them."""
    recorded = runs["hit_cap"].dropna()
    if recorded.empty:
        return "Epochs and whether runs hit the epoch cap were not recorded for these runs."
    capped = int(recorded.astype(bool).sum())
    return (f"{capped} of {len(recorded)} runs were still improving when the epoch cap ended them; runs.md gives "
            f"every run's epochs." if capped else
            f"None of the {len(recorded)} runs was still improving at the epoch cap; runs.md gives every run's epochs.")


# --------------------------------------------------------------------------- sentences beside the primary ones


def catch_up_sentence(row: pd.Series, confidence: float) -> str:
    """Where scratch catches up, by the curve's status; every curve gets a sentence."""
    sizes = row["sizes"]
    name = f"{row['architecture']} {row['pretrained']}"
    if row["reason"] == ONE_SIZE:
        return ""
    tried = f"over {size_text(sizes[0])} to {size_text(sizes[-1])} training images per class"
    if row["reason"] == NO_ADVANTAGE:
        return (f"Catch-up of scratch with {name} {tried}: undetermined, since no advantage of {name} is established "
                f"at a smaller size.")
    if row["reason"] == NEEDS_REPLICATES:
        return f"Catch-up of scratch with {name} {tried}: undetermined, since it needs independent replicates."
    def where(size: float) -> str:
        return "beyond the largest size" if size == math.inf else size_text(size)

    ends = where(row["low"]) if row["low"] == row["high"] else f"{where(row['low'])} to {where(row['high'])}"
    interval = (f"{confidence:.0%} bootstrap interval over replicates, {row['samples']} Monte-Carlo resamples: "
                f"{ends}")
    if row["status"] == NOT_CAUGHT_UP:
        return (f"Scratch does not catch up with {name} {tried}: the mean difference is still above 0 at the largest "
                f"size ({interval}).")
    assert row["status"] == CATCHES_UP
    return (f"Scratch catches up with {name} {tried}: from {size_text(row['estimate'])} images per class on, the "
            f"mean difference stays at or below 0 ({interval}).")


def study_sentence(row: pd.Series | None, study: pd.DataFrame, arch: str, condition: str, confidence: float) -> str:
    """Our in-split difference (the study's kind of test set) beside the study's single-run gap."""
    if condition not in STUDY_NAME:
        return f"The study did not run {condition} (every layer trained from ImageNet weights)."
    cells = study[study["architecture"] == arch].set_index("condition")
    if condition not in cells.index or "scratch" not in cells.index:
        return f"The study did not run {arch}."
    theirs = float(cells.at[condition, "accuracy"] - cells.at["scratch", "accuracy"])
    text = (f"The study, with one run per cell, reported {STUDY_NAME[condition]} ahead of scratch by "
            f"{points(theirs)} points ({cells.at[condition, 'accuracy']:.1%} vs {cells.at['scratch', 'accuracy']:.1%}).")
    if row is None or row["verdict"] == TOO_FEW:
        return text + " Our runs cannot confirm or contradict that gap: too few units."
    ours = f"Ours on the in-split test set is {points(row['mean'])} points: {verdict_text(row)}."
    if row["low"] <= theirs <= row["high"]:
        where = f"The study's gap lies inside our {confidence:.0%} interval."
    elif theirs > row["high"]:
        where = f"The study's gap lies above our {confidence:.0%} interval: pretrained gains less here."
    else:
        where = f"The study's gap lies below our {confidence:.0%} interval: pretrained gains more here."
    return f"{text} {ours} {where}"


# --------------------------------------------------------------------------- conclusion.md


def answer_section(inference: Inference) -> list[str]:
    """The primary comparisons: one sentence each, then their table."""
    primary = inference.primary
    if primary.empty:
        return ["No architecture has both a scratch and a pretrained run, so there is nothing to conclude.\n"]
    k = int(primary["p"].notna().sum())
    sentences = []
    for _, row in primary.iterrows():
        role = ("Best pretrained − best scratch (each chosen on validation): " if BEST_VS_BEST in row["roles"]
                and PRETRAINED_VS_SCRATCH not in row["roles"] else "")
        sentences.append("- " + role + comparison_sentence(row, inference.units, inference.confidence, k))
    counts = primary["verdict"].value_counts()
    summary = (f"Of {len(primary)} primary comparison(s): " + ", ".join(
        f"{int(counts.get(v, 0))} {v}" for v in (ESTABLISHED, NOT_ESTABLISHED, TOO_FEW)) + ".")
    if not counts.get(ESTABLISHED):
        summary += " Nothing here establishes that either choice is better."
    return [summary + "\n", "\n".join(sentences) + "\n", comparisons_table(primary, inference.confidence)]


def one_unit_note(inference: Inference) -> str:
    """Said first when the runs cannot establish anything (one unit)."""
    if inference.units.kind != SEEDS_ONLY:
        return ""
    return ("**One run per cell (or seeds on one split) establishes nothing.** Whatever the differences below, they "
            "were measured on one dataset and one split, so they cannot tell a better training choice from the luck "
            f"of that split. For an answer, run {STUDY_PROFILES}: their conclusions rest on independent units.\n")


def architecture_section(inference: Inference, arch: str, study: pd.DataFrame | None) -> str:
    """Exploratory detail for one architecture: in-split and macro-F1 beside the primary outcome,
    catch-up, and the study's gap."""
    table, full = inference.comparisons, inference.full_fraction
    of_arch = table[(table["a_architecture"] == arch) & (table["b_architecture"] == arch)
                    & table["roles"].str.contains(PRETRAINED_VS_SCRATCH, regex=False)]
    sentences = []
    k = int(inference.primary["p"].notna().sum())
    for condition in [c for c in LABELS if c in set(of_arch["a_condition"])]:
        at_full = of_arch[(of_arch["a_condition"] == condition) & (of_arch["fraction"] == full)]
        in_split = at_full[at_full["outcome"] == "test_accuracy"]
        if inference.primary_outcome != "test_accuracy" and len(in_split):
            sentences.append(comparison_sentence(in_split.iloc[0], inference.units, inference.confidence, k))
        f1 = at_full[at_full["outcome"] == inference.primary_outcome.replace("accuracy", "f1_macro")]
        if len(f1):
            interval = interval_text(f1.iloc[0]["low"], f1.iloc[0]["high"])
            sentences.append(f"Macro-F1 on the same test set: {points(f1.iloc[0]['mean'])} points"
                             + ("" if interval == DASH else f" ({interval})") + f", {verdict_text(f1.iloc[0])}.")
        curve = inference.catch_up[(inference.catch_up["architecture"] == arch)
                                   & (inference.catch_up["pretrained"] == condition)]
        if len(curve):
            sentences.append(catch_up_sentence(curve.iloc[0], inference.confidence))
        if study is not None:
            sentences.append(study_sentence(in_split.iloc[0] if len(in_split) else None, study, arch, condition,
                                            inference.confidence))
    return " ".join(s for s in sentences if s)


def conclusion_markdown(inference: Inference, runs: pd.DataFrame, study: pd.DataFrame | None,
                        is_study_data: bool) -> str:
    """The whole conclusion.md.

    runs: the runs table (for the epoch-cap note); study: report.read_study_table's frame, used
    only when is_study_data; otherwise the text speaks of "your data" and compares no numbers.
    """
    parts = ["# Conclusion: train from scratch, or start from ImageNet weights?\n"]
    note = one_unit_note(inference)
    if note:
        parts.append(note)
    parts += ["## How this was decided\n", design_text(inference) + "\n"]
    notes = [kept_out_text(inference.kept_out), cap_text(runs)]
    parts.append(" ".join(n for n in notes if n) + "\n")
    parts += [f"## The answer: primary comparisons on {OUTCOME_NAMES[inference.primary_outcome]}\n",
              *answer_section(inference)]
    architectures = sorted(set(inference.comparisons["a_architecture"]) & set(inference.comparisons["b_architecture"]),
                           key=lambda a: cell_order((a, "")))
    for arch in architectures:
        text = architecture_section(inference, arch, study if is_study_data else None)
        if text:
            parts += [f"## {arch}: exploratory detail\n", text + "\n"]
    if not is_study_data:
        parts.append("The study's Table 1 was measured on its own images, so its numbers are not compared with your "
                     "data here.\n")
    curves = inference.comparisons[inference.comparisons["roles"].str.contains(PRETRAINED_VS_SCRATCH, regex=False)]
    parts += ["## Every pretrained − scratch comparison, by training size\n",
              comparisons_table(curves.sort_values(["outcome", "a_architecture", "a_condition", "train_per_class"],
                                                   key=sort_key), inference.confidence)]
    return "\n".join(parts)


def sort_key(column: pd.Series) -> pd.Series:
    """Outcomes in OUTCOME_NAMES' order, other columns as they are (for DataFrame.sort_values)."""
    if column.name == "outcome":
        return column.map(list(OUTCOME_NAMES).index)
    return column
