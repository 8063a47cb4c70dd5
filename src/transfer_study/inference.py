"""Every statistical decision the report makes, in one place: which runs are independent units,
intervals, tests, the one verdict per comparison, the primary family and its Holm correction,
and where scratch catches up. Pure: tables and arrays in, tables and arrays out. The words that
explain these numbers are wording.py's; the tables and figures that show them, report.py's.

**Units.** A claim rests on independent units, chosen from the runs table as a whole:
- two or more replicates (`replicate`: disjoint datasets, each with its own split) → the unit
  is the replicate. Seeds and split repeats inside one replicate are averaged into its value,
  never counted as extra units;
- one dataset, two or more split repeats (your own images) → the unit is the split, seeds
  averaged. Splits of one dataset overlap (a test image of one is a training image of another),
  so their spread understates the uncertainty: intervals and tests use the Nadeau–Bengio
  corrected resampled t, variance × (1/J + n_test/n_train) instead of variance / J;
- one dataset, one split (seeds only, or one run per cell) → one unit: nothing can be decided.

**Test.** For a comparison A − B, the difference of the two cells' unit values in every unit
that has both (paired: same images). Student t on those J differences (J − 1 degrees of
freedom; accuracies on hundreds of images, averaged, are close to normal), with the corrected
variance for split units. Fewer than MIN_UNITS units, or no spread between units (every unit
gave the same difference, so the spread is not measured), decides nothing.

**One vocabulary.** Each comparison gets one of VERDICTS: "established" where p < alpha (after
Holm's correction for the primary family), "not established" where the test ran and did not
reject, "undetermined: too few units" where it could not run. Every report file quotes the
`comparisons` table; none decides on its own.

**Primary family** (pre-specified; everything else is exploratory and uncorrected): test
accuracy at the full training size for (a) pretrained − scratch per architecture and pretrained
condition and (b) the best pretrained cell − the best scratch cell, each chosen on validation
accuracy. Holm's step-down correction across the family. Accuracy on the external test set is
the primary outcome where every run has one and the units are not splits (thousands of images
never used for training or any choice: less test noise); otherwise the in-split test set's.

**Catch-up**, per architecture and pretrained condition, on the primary outcome: reported only
where an advantage of pretrained is established at a size smaller than the largest, as the
smallest size from which on the mean difference stays ≤ 0, with a bootstrap over replicates
(whole curves resampled); otherwise undetermined.

**One test set** (descriptions, not verdicts): McNemar's test of two runs on the same images;
per-run intervals over test images (Wilson's score interval for accuracy, which stays inside
[0, 1] and never shrinks to a point; a percentile bootstrap for the macro metrics).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from .cells import cell_order
from .config import UserError

# --------------------------------------------------------------------------- vocabulary

ESTABLISHED, NOT_ESTABLISHED, TOO_FEW = "established", "not established", "undetermined: too few units"
VERDICTS = (ESTABLISHED, NOT_ESTABLISHED, TOO_FEW)
PRIMARY, EXPLORATORY = "primary", "exploratory"
REPLICATE, SPLIT, SEEDS_ONLY = "replicate", "split", "seeds only"
PRETRAINED_VS_SCRATCH, BEST_VS_BEST, BETWEEN_CELLS = (
    "pretrained − scratch", "best pretrained − best scratch", "between cells")
# catch-up statuses
CATCHES_UP, NOT_CAUGHT_UP, UNDETERMINED = "catches up", "not within the sizes tried", "undetermined"
NO_ADVANTAGE, NEEDS_REPLICATES, ONE_SIZE = (
    "no advantage established at a smaller size", "needs independent replicates", "one size tried")
FEWER_UNITS, NO_SPREAD = "fewer than {n} units", "no spread between units"

MIN_UNITS = 3  # below this a variance has one degree of freedom or none: no interval, no verdict
PRETRAINED = ("frozen", "finetune")
KEY = ("architecture", "condition", "replicate", "repeat", "seed", "fraction")
RUN_COLUMNS = (*KEY, "run", "train_per_class", "n_train", "n_test", "val_accuracy", "test_accuracy",
               "test_f1_macro", "external_accuracy", "external_f1_macro", "single_class")
OUTCOMES = ("external_accuracy", "test_accuracy", "external_f1_macro", "test_f1_macro")
EXACT_MCNEMAR_BELOW = 25  # b + c below this: exact binomial test; the chi-square approximation is poor


@dataclass(frozen=True)
class Units:
    """What the independent units of a runs table are: kind (REPLICATE, SPLIT or SEEDS_ONLY),
    the runs table's column that names them, and how many there are."""

    kind: str
    column: str
    count: int


@dataclass(frozen=True)
class Inference:
    """Everything the report says about a runs table, decided once.

    comparisons: one row per comparison (see `comparisons`); cells: one row per cell, size and
    outcome (see `cell_summary`); catch_up: see `catch_up`; kept_out: the runs kept out of every
    verdict and mean (single-class predictors on validation); primary_outcome: the outcome
    column of the primary family; full_fraction: the largest training fraction.
    """

    units: Units
    primary_outcome: str
    full_fraction: float
    confidence: float
    comparisons: pd.DataFrame
    cells: pd.DataFrame
    catch_up: pd.DataFrame
    kept_out: pd.DataFrame

    @property
    def alpha(self) -> float:
        return 1 - self.confidence

    @property
    def primary(self) -> pd.DataFrame:
        return self.comparisons[self.comparisons["family"] == PRIMARY]


# --------------------------------------------------------------------------- units


def check_runs(runs: pd.DataFrame) -> None:
    """Raise UserError unless runs has RUN_COLUMNS and one row per KEY."""
    missing = [c for c in RUN_COLUMNS if c not in runs.columns]
    if missing:
        raise UserError(f"the runs table lacks column(s) {', '.join(missing)}; rerun `dvc repro evaluate` "
                        f"(it writes {', '.join(RUN_COLUMNS)})")
    twice = runs[runs.duplicated(list(KEY), keep=False)]
    if len(twice):
        first = twice.iloc[0]
        raise UserError("the runs table has more than one run for " + ", ".join(f"{k}={first[k]}" for k in KEY)
                        + "; keep one run per cell, replicate, split, seed and fraction")
    if runs["single_class"].isna().any():
        raise UserError("the runs table has runs without a single_class flag; rerun `dvc repro evaluate`")


def kept_runs(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, flagged): runs that predict a single class on validation (`single_class`) are kept
    out of every unit, mean and verdict, and listed instead of averaged in."""
    flagged = runs["single_class"].astype(bool)
    return runs[~flagged], runs[flagged].reset_index(drop=True)


def units_of(runs: pd.DataFrame) -> Units:
    """The independent units of a runs table: replicates if it has two or more, else split
    repeats if two or more, else one unit (seeds only)."""
    replicates, repeats = runs["replicate"].nunique(), runs["repeat"].nunique()
    if replicates >= 2:
        return Units(REPLICATE, "replicate", replicates)
    if repeats >= 2:
        return Units(SPLIT, "repeat", repeats)
    return Units(SEEDS_ONLY, "replicate", 1 if len(runs) else 0)


def unit_values(runs: pd.DataFrame, outcome: str, units: Units, keys: tuple[str, ...]) -> pd.DataFrame:
    """One row per keys × unit: the outcome averaged over the unit's runs (seeds, and split
    repeats inside a replicate), the runs averaged, and their mean n_test / n_train (for the split
    correction).

    Runs without a value of the outcome (no external set) are left out. Columns: *keys, "unit",
    "value", "n_runs", "test_over_train".
    """
    present = runs.dropna(subset=[outcome]).assign(unit=runs[units.column],
                                                    test_over_train=runs["n_test"] / runs["n_train"])
    grouped = present.groupby([*keys, "unit"], sort=False)
    table = grouped[[outcome, "test_over_train"]].mean().rename(columns={outcome: "value"})
    return table.assign(n_runs=grouped.size()).reset_index()[[*keys, "unit", "value", "n_runs", "test_over_train"]]


# --------------------------------------------------------------------------- one set of unit values


def unit_test(values: np.ndarray, test_over_train: np.ndarray | float, confidence: float,
              split_units: bool) -> dict[str, np.ndarray]:
    """Student t on the mean of unit values (the last axis; NaN = a unit missing), vectorised
    over the leading axes.

    split_units: overlapping splits of one dataset, so the variance of the mean is
    variance × (1/J + test_over_train) (Nadeau & Bengio, 2003) instead of variance / J.
    Gives back arrays n, mean, sd, se, low, high, p and reason ("" where the test ran; else
    FEWER_UNITS or NO_SPREAD, and low, high, p are NaN).
    """
    values = np.asarray(values, dtype=float)
    n = np.sum(~np.isnan(values), axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(values, axis=-1) / n  # NaN for no units
        sd = np.sqrt(np.nansum((values - mean[..., None]) ** 2, axis=-1) / (n - 1))
        factor = 1 / n + (np.asarray(test_over_train, dtype=float) if split_units else 0.0)
        se = sd * np.sqrt(factor)
        df = np.maximum(n - 1, 1)
        t = np.abs(mean) / se
        p = np.where(se > 0, 2 * stats.t.sf(t, df), np.nan)
        half = stats.t.ppf(0.5 + confidence / 2, df) * se
    # Equal differences leave rounding-level spread: below 1e-9 of the values' size it is no spread.
    scale = np.max(np.where(np.isnan(values), 0.0, np.abs(values)), axis=-1, initial=0.0)
    few, flat = n < MIN_UNITS, ~(sd > 1e-9 * scale)
    undecided = few | flat
    reason = np.where(few, FEWER_UNITS.format(n=MIN_UNITS), np.where(flat, NO_SPREAD, ""))
    nan = np.full(n.shape, np.nan)
    return {"n": n, "mean": mean, "sd": np.where(n > 1, sd, np.nan), "se": np.where(undecided, nan, se),
            "low": np.where(undecided, nan, mean - half), "high": np.where(undecided, nan, mean + half),
            "p": np.where(undecided, nan, p), "reason": reason}


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values over the last axis; NaN (untested) entries stay NaN and
    do not count in the family, since they cannot be rejected."""
    p = np.asarray(p, dtype=float)
    tested = ~np.isnan(p)
    k = tested.sum(axis=-1, keepdims=True)
    order = np.argsort(np.where(tested, p, np.inf), axis=-1, kind="stable")
    ranked = np.take_along_axis(p, order, axis=-1)
    steps = k - np.arange(p.shape[-1])  # k, k-1, ... for the smallest, next ...
    adjusted_sorted = np.fmin(1.0, np.maximum.accumulate(np.where(np.isnan(ranked), -np.inf, ranked * steps), axis=-1))
    adjusted = np.empty_like(p)
    np.put_along_axis(adjusted, order, adjusted_sorted, axis=-1)
    return np.where(tested, adjusted, np.nan)


def verdicts(p: np.ndarray, alpha: float) -> np.ndarray:
    """The one vocabulary: TOO_FEW where p is NaN (the test could not run), ESTABLISHED where
    p < alpha, NOT_ESTABLISHED otherwise. p is the adjusted p for the primary family."""
    p = np.asarray(p, dtype=float)
    return np.where(np.isnan(p), TOO_FEW, np.where(p < alpha, ESTABLISHED, NOT_ESTABLISHED))


# --------------------------------------------------------------------------- comparisons


def cell_name(architecture: str, condition: str) -> str:
    return f"{architecture} {condition}"


def oriented(cell_a: tuple[str, str], cell_b: tuple[str, str]) -> tuple[tuple[str, str], tuple[str, str]]:
    """The one orientation of a pair of cells, so that a comparison has one sign everywhere:
    pretrained − scratch; otherwise the later cell (config order) − the earlier."""
    a_pretrained, b_pretrained = cell_a[1] in PRETRAINED, cell_b[1] in PRETRAINED
    if a_pretrained != b_pretrained:
        return (cell_a, cell_b) if a_pretrained else (cell_b, cell_a)
    return (cell_a, cell_b) if cell_order(cell_a) > cell_order(cell_b) else (cell_b, cell_a)


def best_cells(runs: pd.DataFrame, fraction: float) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    """(best pretrained cell, best scratch cell) at `fraction` by mean validation accuracy of
    their units (ties: config order); None where there is no such cell."""
    at = runs[runs["fraction"] == fraction]
    per_unit = at.groupby(["architecture", "condition", "replicate", "repeat"])["val_accuracy"].mean()
    score = per_unit.groupby(["architecture", "condition"]).mean()
    best = {}
    for pretrained in (True, False):
        cells = [c for c in score.index if (c[1] in PRETRAINED) == pretrained]
        best[pretrained] = min(cells, key=lambda c: (-score[c], cell_order(c))) if cells else None
    return best[True], best[False]


def comparison_pairs(runs: pd.DataFrame, full_fraction: float) -> dict[tuple, set[str]]:
    """Every comparison the report makes: {(cell a, cell b, fraction): roles}, oriented.

    pretrained − scratch per architecture at every size; at the full size also every pair of
    cells, and the best pretrained − best scratch cell."""
    pairs: dict[tuple, set[str]] = {}
    cells_at = runs.groupby("fraction")[["architecture", "condition"]].apply(
        lambda f: sorted(set(zip(f["architecture"], f["condition"])), key=cell_order))
    for fraction, cells in cells_at.items():
        for arch, condition in cells:
            if condition in PRETRAINED and (arch, "scratch") in cells:
                pairs.setdefault(((arch, condition), (arch, "scratch"), fraction), set()).add(PRETRAINED_VS_SCRATCH)
        if fraction == full_fraction:
            for a, b in itertools.combinations(cells, 2):
                pairs.setdefault((*oriented(a, b), fraction), set()).add(BETWEEN_CELLS)
            pretrained, scratch = best_cells(runs, fraction)
            if pretrained and scratch:
                pairs.setdefault((pretrained, scratch, fraction), set()).add(BEST_VS_BEST)
    return pairs


def outcomes_of(runs: pd.DataFrame, units: Units) -> list[str]:
    """The outcomes compared: the in-split test set's, and the external set's where every run
    has one, unless the units are splits (they share the external images, which the split
    correction does not cover)."""
    external = units.kind != SPLIT and len(runs) and runs["external_accuracy"].notna().all()
    return [o for o in OUTCOMES if external or not o.startswith("external")]


def primary_outcome(outcomes: list[str]) -> str:
    return "external_accuracy" if "external_accuracy" in outcomes else "test_accuracy"


def comparisons(runs: pd.DataFrame, units: Units, confidence: float) -> pd.DataFrame:
    """One row per comparison and outcome, with its one verdict.

    runs: kept runs only (no single-class predictors). Columns: a, b (cell names), a_architecture,
    a_condition, b_architecture, b_condition, fraction, train_per_class, outcome, roles (";"-joined),
    family (PRIMARY or EXPLORATORY), units (kind), n_units, mean (a − b), sd, low, high (the
    uncorrected interval), p, p_adjusted (Holm within the primary family; p for exploratory
    rows), verdict, reason (why undetermined; "" otherwise).
    """
    columns = ["a", "b", "a_architecture", "a_condition", "b_architecture", "b_condition", "fraction",
               "train_per_class", "outcome", "roles", "family", "units", "n_units", "mean", "sd", "low", "high",
               "p", "p_adjusted", "verdict", "reason"]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    full = float(runs["fraction"].max())
    pairs = comparison_pairs(runs, full)
    outcomes = outcomes_of(runs, units)
    primary = primary_outcome(outcomes)
    sizes = runs.groupby(["architecture", "condition", "fraction"])["train_per_class"].median()
    empty = pd.DataFrame({"value": [], "test_over_train": []})
    rows = []
    for outcome in outcomes:
        values = unit_values(runs, outcome, units, ("architecture", "condition", "fraction"))
        by_cell = {key: group.set_index("unit") for key, group in values.groupby(["architecture", "condition",
                                                                                   "fraction"])}
        for (a, b, fraction), roles in pairs.items():
            va, vb = by_cell.get((*a, fraction), empty), by_cell.get((*b, fraction), empty)
            common = va.index.intersection(vb.index)  # paired: units with both cells
            ratio = pd.concat([va.loc[common, "test_over_train"], vb.loc[common, "test_over_train"]]).median()
            result = unit_test((va.loc[common, "value"] - vb.loc[common, "value"]).to_numpy(dtype=float), ratio,
                               confidence, units.kind == SPLIT)
            is_primary = (outcome == primary and fraction == full
                          and bool(roles & {PRETRAINED_VS_SCRATCH, BEST_VS_BEST}))
            rows.append({"a": cell_name(*a), "b": cell_name(*b), "a_architecture": a[0], "a_condition": a[1],
                         "b_architecture": b[0], "b_condition": b[1], "fraction": fraction,
                         "train_per_class": float(np.median([sizes[(*a, fraction)], sizes[(*b, fraction)]])),
                         "outcome": outcome, "roles": ";".join(sorted(roles)),
                         "family": PRIMARY if is_primary else EXPLORATORY, "units": units.kind,
                         **{k: (v.item() if isinstance(v, np.ndarray) else v) for k, v in result.items()}})
    if not rows:  # one cell: nothing to compare
        return pd.DataFrame(columns=columns)
    table = pd.DataFrame(rows).rename(columns={"n": "n_units"})
    table["n_units"] = table["n_units"].astype(int)
    table["p_adjusted"] = table["p"]
    primary_rows = table["family"] == PRIMARY
    if primary_rows.any():
        table.loc[primary_rows, "p_adjusted"] = holm(table.loc[primary_rows, "p"].to_numpy())
    table["verdict"] = verdicts(table["p_adjusted"].to_numpy(), 1 - confidence)
    return table[columns]


# --------------------------------------------------------------------------- cells


def cell_summary(runs: pd.DataFrame, units: Units, confidence: float,
                 outcomes: tuple[str, ...] = ("test_accuracy", "test_f1_macro")) -> pd.DataFrame:
    """Per architecture, condition, fraction and outcome: runs, units, the mean over unit values,
    their sd, and the interval over units (NaN with too few units or no spread).

    Columns: architecture, condition, fraction, train_per_class, outcome, n_runs, n_units, mean,
    sd, low, high, reason.
    """
    rows = []
    sizes = runs.groupby(["architecture", "condition", "fraction"])["train_per_class"].median()
    for outcome in outcomes:
        values = unit_values(runs, outcome, units, ("architecture", "condition", "fraction"))
        for (arch, condition, fraction), group in values.groupby(["architecture", "condition", "fraction"]):
            result = unit_test(group["value"].to_numpy(), group["test_over_train"].median(), confidence,
                               units.kind == SPLIT)
            rows.append({"architecture": arch, "condition": condition, "fraction": fraction,
                         "train_per_class": float(sizes[(arch, condition, fraction)]), "outcome": outcome,
                         "n_runs": int(group["n_runs"].sum()), "n_units": int(result["n"]),
                         **{k: result[k].item() for k in ("mean", "sd", "low", "high", "reason")}})
    columns = ["architecture", "condition", "fraction", "train_per_class", "outcome", "n_runs", "n_units", "mean",
               "sd", "low", "high", "reason"]
    table = pd.DataFrame(rows, columns=columns)
    if table.empty:
        return table
    keys = [(*cell_order((a, c)), f) for a, c, f in zip(table["architecture"], table["condition"], table["fraction"])]
    order = sorted(range(len(table)), key=lambda i: (outcomes.index(table["outcome"].iloc[i]), keys[i]))
    return table.iloc[order].reset_index(drop=True)


# --------------------------------------------------------------------------- catching up


def first_size_staying_at_or_below_zero(means: np.ndarray) -> np.ndarray:
    """Index of the first size from which every later mean difference is ≤ 0, over the last
    axis; the number of sizes where the last one is still above 0. NaN sizes are skipped (they
    neither break nor make a run of ≤ 0)."""
    means = np.asarray(means, dtype=float)
    at_or_below = np.where(np.isnan(means), True, means <= 0)
    stays = np.flip(np.cumprod(np.flip(at_or_below, axis=-1), axis=-1), axis=-1).astype(bool)
    stays &= ~np.flip(np.cumprod(np.flip(np.isnan(means), axis=-1), axis=-1), axis=-1).astype(bool)
    k = means.shape[-1]
    return np.where(stays.any(axis=-1), np.argmax(stays, axis=-1), k)


def catch_up(comparisons_table: pd.DataFrame, runs: pd.DataFrame, units: Units, outcome: str, confidence: float,
             samples: int, seed: int) -> pd.DataFrame:
    """Per architecture and pretrained condition: the training size (images per class) from which
    scratch has caught up on `outcome`, i.e. the mean difference stays ≤ 0.

    Reported (status CATCHES_UP, or NOT_CAUGHT_UP when the mean is still above 0 at the largest
    size) only where the advantage of pretrained is established (an exploratory verdict) at a
    size smaller than the largest, with replicates as units; otherwise status UNDETERMINED with
    the reason (NO_ADVANTAGE, NEEDS_REPLICATES, ONE_SIZE). low/high: the percentile interval of
    the same size over `samples` bootstrap resamples of the replicates (whole curves at once;
    Monte-Carlo, seeded); inf means "beyond the largest size tried".
    Columns: architecture, pretrained, outcome, sizes, n_units, status, reason, estimate, low, high, samples.
    """
    rows = []
    curves = comparisons_table[(comparisons_table["outcome"] == outcome)
                               & comparisons_table["roles"].str.contains(PRETRAINED_VS_SCRATCH, regex=False)]
    for (arch, condition), curve in curves.groupby(["a_architecture", "a_condition"], sort=False):
        curve = curve.sort_values("train_per_class")
        sizes = curve["train_per_class"].to_numpy(dtype=float)
        row = {"architecture": arch, "pretrained": condition, "outcome": outcome, "sizes": tuple(sizes),
               "n_units": int(curve["n_units"].min()), "estimate": math.nan, "low": math.nan, "high": math.nan,
               "samples": 0}
        smaller = curve.iloc[:-1]
        if len(sizes) < 2:
            rows.append({**row, "status": UNDETERMINED, "reason": ONE_SIZE})
        elif units.kind != REPLICATE:
            rows.append({**row, "status": UNDETERMINED, "reason": NEEDS_REPLICATES})
        elif not ((smaller["verdict"] == ESTABLISHED) & (smaller["mean"] > 0)).any():
            rows.append({**row, "status": UNDETERMINED, "reason": NO_ADVANTAGE})
        else:
            differences = unit_curves(runs, units, outcome, arch, condition, curve["fraction"].to_numpy())
            index = int(first_size_staying_at_or_below_zero(np.nanmean(differences, axis=0)))
            low, high = bootstrap_catch_up(differences, samples, seed, confidence)
            as_size = lambda i: math.inf if i >= len(sizes) else float(sizes[i])  # noqa: E731
            rows.append({**row, "status": CATCHES_UP if index < len(sizes) else NOT_CAUGHT_UP, "reason": "",
                         "estimate": as_size(index), "low": as_size(low), "high": as_size(high), "samples": samples})
    return pd.DataFrame(rows, columns=["architecture", "pretrained", "outcome", "sizes", "n_units", "status",
                                       "reason", "estimate", "low", "high", "samples"])


def unit_curves(runs: pd.DataFrame, units: Units, outcome: str, arch: str, condition: str,
                fractions: np.ndarray) -> np.ndarray:
    """Pretrained − scratch unit differences as a units × fractions array (NaN where a unit lacks a size)."""
    values = unit_values(runs[runs["architecture"] == arch], outcome, units, ("condition", "fraction"))
    wide = values.pivot_table(index="unit", columns=["condition", "fraction"], values="value")
    differences = wide[condition] - wide["scratch"]
    return differences.reindex(columns=fractions).to_numpy(dtype=float)


def bootstrap_catch_up(differences: np.ndarray, samples: int, seed: int, confidence: float) -> tuple[int, int]:
    """Percentile interval (size indices) of the catch-up size over resamples of the units (rows)."""
    rng = np.random.default_rng(seed)
    n = len(differences)
    counts = rng.multinomial(n, np.full(n, 1 / n), size=samples)
    present = ~np.isnan(differences)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (counts @ np.nan_to_num(differences)) / (counts @ present)
    indices = first_size_staying_at_or_below_zero(means)
    tail = (1 - confidence) / 2
    low, high = np.quantile(indices, [tail, 1 - tail], method="inverted_cdf")
    return int(low), int(high)


# --------------------------------------------------------------------------- the whole report


def infer(runs: pd.DataFrame, confidence: float = 0.95, bootstrap_samples: int = 2000, seed: int = 0) -> Inference:
    """Decide everything the report says about a runs table (evaluate's runs.csv, RUN_COLUMNS).

    Single-class runs (`single_class`: one class predicted for every validation image) are
    kept out of every unit, mean and verdict, and listed in `kept_out`.
    """
    check_runs(runs)
    kept, flagged = kept_runs(runs)
    units = units_of(kept)
    table = comparisons(kept, units, confidence)
    outcomes = outcomes_of(kept, units)
    outcome = primary_outcome(outcomes)
    full = float(runs["fraction"].max()) if len(runs) else 1.0
    return Inference(units=units, primary_outcome=outcome, full_fraction=full, confidence=confidence,
                     comparisons=table, cells=cell_summary(kept, units, confidence, tuple(outcomes)),
                     catch_up=catch_up(table, kept, units, outcome, confidence, bootstrap_samples, seed),
                     kept_out=flagged)


# --------------------------------------------------------------------------- one test set


def wilson_interval(correct: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson's score interval for a proportion correct / n: unlike the percentile bootstrap it
    does not collapse to a point at 0 or n correct (all 270 right: [0.986, 1]), and it covers
    near its level at the sizes of a test set. NaN for n = 0."""
    if n == 0:
        return math.nan, math.nan
    interval = stats.binomtest(int(correct), int(n)).proportion_ci(confidence, method="wilson")
    return float(interval.low), float(interval.high)


def resample_weights(n_images: int, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, n_images) counts: row b says how often each image is drawn in resample b."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_images, size=(n_resamples, n_images))
    offsets = (np.arange(n_resamples) * n_images)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=n_resamples * n_images)
    return counts.reshape(n_resamples, n_images).astype(float)


def bootstrap_distribution(y_true, y_pred, proba, metric_fn: Callable, n: int, seed: int,
                           chunk: int = 500) -> np.ndarray:
    """The metric on `n` bootstrap resamples of the images (same seed → same resamples).

    `metric_fn` is batched (evaluate.BATCH_METRICS). Gives back an array of n values.
    Resamples are processed `chunk` at a time to bound memory.
    """
    y_true, y_pred, proba = np.asarray(y_true), np.asarray(y_pred), np.asarray(proba, dtype=float)
    weights = resample_weights(len(y_true), n, seed)
    parts = [metric_fn(weights[i:i + chunk], y_true, y_pred, proba) for i in range(0, n, chunk)]
    return np.concatenate(parts)


def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central `confidence` percentile interval of values (NaNs ignored). NaN, NaN when all are
    NaN, or when every value is the same: a point is no interval (every resample of a test set
    with no errors scores the same)."""
    values = np.asarray(values, dtype=float)
    if np.isnan(values).all() or np.nanmin(values) == np.nanmax(values):
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ci(y_true, y_pred, proba, metric_fn: Callable, n: int, confidence: float,
                 seed: int) -> tuple[float, float]:
    """Percentile bootstrap CI over test images: (low, high) at `confidence` (e.g. 0.95)."""
    values = bootstrap_distribution(y_true, y_pred, proba, metric_fn, n, seed)
    return percentile_interval(values, confidence)


def intervals_over_test_images(y_true, y_pred, proba, metric_fns: Mapping[str, Callable], samples: int, confidence: float,
                       seed: int) -> dict[str, tuple[float, float]]:
    """One run's interval over its test images for each metric: Wilson's for accuracy, a
    percentile bootstrap (`samples` resamples, seeded) for the others."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return {name: (wilson_interval(int(np.sum(y_true == y_pred)), len(y_true), confidence) if name == "accuracy"
                   else bootstrap_ci(y_true, y_pred, proba, fn, samples, confidence, seed))
            for name, fn in metric_fns.items()}



def mcnemar(correct_a, correct_b) -> dict:
    """McNemar's test of two classifiers on the same images: a description of one test set
    (do these two trained models differ on these images?), never a verdict on training choices.

    Takes two boolean arrays (is each image classified correctly by A, by B), in the same image
    order. Gives back b (A right, B wrong), c (A wrong, B right), the statistic, the two-sided
    p-value and the method: exact binomial when b + c < 25, else chi-square with the continuity
    correction max(|b − c| − 1, 0)² / (b + c), so that b = c gives p = 1.
    """
    correct_a, correct_b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if correct_a.shape != correct_b.shape:
        raise ValueError(f"McNemar needs paired results on the same images; "
                         f"got {correct_a.shape} and {correct_b.shape}")
    b = int(np.sum(correct_a & ~correct_b))
    c = int(np.sum(~correct_a & correct_b))
    if b + c < EXACT_MCNEMAR_BELOW:
        p_value = 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5).pvalue
        return {"b": b, "c": c, "statistic": float(min(b, c)), "p_value": float(p_value), "method": "exact binomial"}
    statistic = max(abs(b - c) - 1, 0) ** 2 / (b + c)
    return {"b": b, "c": c, "statistic": float(statistic), "p_value": float(stats.chi2.sf(statistic, df=1)),
            "method": "chi-square, continuity-corrected"}
