"""Across seeds and splits: is a pretrained start better than scratch, by how much, and from what
training-set size does scratch catch up?

Input is a tidy table of runs, one row per training run, with the columns in RUN_COLUMNS. A
pretrained run (frozen or finetune) is paired with the scratch run of its architecture that has
the same seed, split repeat and training fraction: both saw the same images, so their
difference d = pretrained − scratch carries no split-to-split noise.

The test for n paired differences, and why. Each d is a difference of two accuracies (or
macro-F1s) on a few hundred test images, so it is close to normal, but n is small (3 to 15).
- Interval: the Student t interval, mean(d) ± t(n−1) · sd(d) / √n. It is exact for normal
  differences however small n is, where a bootstrap over 5 or 15 pairs is not.
- Test: the exact sign-flip permutation test. With no true difference each d is as likely to
  be +|d| as −|d|, so all 2^n sign patterns are equally likely; p is the share of them whose
  |mean| is at least the observed one. It is exact for any n and assumes only that symmetry,
  not normality. Its smallest possible p is 2 / 2^n, so it needs at least 6 pairs to go below
  0.05 (MIN_PAIRS).
- Verdict: a difference is established only where the interval excludes 0 and the sign-flip
  p < 1 − confidence. Requiring both keeps the false-positive rate at or below the stated level
  under either test's assumptions; with fewer than 6 pairs nothing is established.
With one pair (one run per cell) there is no spread to estimate: the verdict says so and the
interval is left empty.

Catching up: the mean difference at each training size is interpolated in log(size) to where it
first reaches 0. Its uncertainty comes from a bootstrap over the (seed, repeat) units, which
resamples a unit's whole curve at once, since one seed and split share their noise across sizes.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pandas as pd
from scipy import stats

from .config import CONDITIONS, UserError

METRICS = ("test_accuracy", "test_f1_macro")
RUN_COLUMNS = ("architecture", "condition", "seed", "repeat", "fraction", "train_per_class", *METRICS)
PRETRAINED = tuple(c for c in CONDITIONS if c != "scratch")  # frozen, finetune
UNIT = ["replicate", "seed", "repeat"]  # a pair: the same replicate dataset, seed and split
BETTER, WORSE, UNCLEAR, SINGLE = "better", "worse", "not distinguishable", "single run"
EXACT_UP_TO = 16  # pairs: 2^16 sign patterns enumerate in milliseconds; beyond, sample that many
# catch-up statuses
CATCHES_UP, NOT_BEHIND, NEVER, UNDETERMINED, ONE_SIZE = (
    "catches up", "not behind", "never within sizes", "undetermined", "single size")


def min_pairs(alpha: float) -> int:
    """The fewest pairs with which the two-sided sign-flip test can give p < alpha."""
    return next(n for n in range(1, 64) if 2 / 2**n < alpha)


# --------------------------------------------------------------------------- one set of pairs


def t_interval(d: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """Student t interval on the mean of d and the two-sided p of mean = 0; NaNs for fewer than 2 values."""
    n, mean = len(d), float(np.mean(d))
    if n < 2:
        return math.nan, math.nan, math.nan
    se = float(np.std(d, ddof=1)) / math.sqrt(n)
    if se == 0:  # identical differences: no spread, the mean is all there is
        return mean, mean, (1.0 if mean == 0 else 0.0)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    return mean - half, mean + half, float(2 * stats.t.sf(abs(mean) / se, n - 1))


@lru_cache(maxsize=EXACT_UP_TO + 1)
def _all_signs(n: int) -> np.ndarray:
    """Every pattern of n signs, as a (2^n, n) array of ±1."""
    bits = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
    return (1 - 2 * bits).astype(float)


def sign_flip_p(d: np.ndarray, seed: int = 0) -> tuple[float, str]:
    """Two-sided sign-flip p of mean(d) = 0, and how it was computed.

    Exact (every sign pattern) for up to EXACT_UP_TO values; beyond, 2^EXACT_UP_TO patterns drawn
    with `seed`, with the observed pattern counted in (so p is never 0).
    """
    d = np.asarray(d, dtype=float)
    observed = abs(d.sum())
    tolerance = 1e-12 * max(1.0, float(np.abs(d).sum()))  # equal sums must count as ties despite rounding
    if len(d) <= EXACT_UP_TO:
        sums = np.abs(_all_signs(len(d)) @ d)
        return float(np.mean(sums >= observed - tolerance)), "exact"
    draws = 2**EXACT_UP_TO
    signs = np.random.default_rng(seed).choice(np.array([-1, 1], dtype=np.int8), size=(draws, len(d)))
    hits = int(np.sum(np.abs(signs @ d) >= observed - tolerance))
    return (hits + 1) / (draws + 1), f"sampled ({draws} sign patterns)"


def verdict(n: int, low: float, high: float, p: float, alpha: float) -> str:
    """better / worse only where the interval excludes 0 and the sign-flip p < alpha."""
    if n < 2:
        return SINGLE
    if p < alpha and low > 0:
        return BETTER
    if p < alpha and high < 0:
        return WORSE
    return UNCLEAR


def summarise_differences(d: np.ndarray, confidence: float) -> dict:
    """n, mean, t interval (low, high), t_p, sign-flip p and method, and the verdict for paired differences d."""
    d = np.asarray(d, dtype=float)
    low, high, t_p = t_interval(d, confidence)
    p, method = sign_flip_p(d) if len(d) > 1 else (math.nan, "none (one pair)")
    return {"n_pairs": len(d), "mean": float(np.mean(d)), "low": low, "high": high, "t_p": t_p,
            "sign_flip_p": p, "sign_flip_method": method, "verdict": verdict(len(d), low, high, p, 1 - confidence)}


# --------------------------------------------------------------------------- runs → pairs


def with_replicate(runs: pd.DataFrame) -> pd.DataFrame:
    """runs with a `replicate` column: a table without one holds replicate 0 alone."""
    return runs if "replicate" in runs.columns else runs.assign(replicate=0)


def check_runs(runs: pd.DataFrame) -> None:
    """Raise UserError unless runs has RUN_COLUMNS and one row per (architecture, condition, seed, repeat, fraction)."""
    missing = [c for c in RUN_COLUMNS if c not in runs.columns]
    if missing:
        raise UserError(f"the runs table lacks column(s) {', '.join(missing)}; it needs {', '.join(RUN_COLUMNS)}")
    key = ["architecture", "condition", *UNIT, "fraction"]
    twice = runs[runs.duplicated(key, keep=False)]
    if len(twice):
        first = twice.iloc[0]
        raise UserError("the runs table has more than one run for " + ", ".join(f"{k}={first[k]}" for k in key)
                        + "; keep one run per cell, replicate, seed, repeat and fraction")


def paired_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per pretrained run that has a scratch partner (same architecture, seed, repeat, fraction).

    Columns: architecture, pretrained (frozen or finetune), seed, repeat, fraction, train_per_class,
    and per metric m: m_pretrained, m_scratch, m_difference (pretrained − scratch).
    """
    runs = with_replicate(runs)
    check_runs(runs)
    key = ["architecture", *UNIT, "fraction"]
    scratch = runs[runs["condition"] == "scratch"][[*key, *METRICS]]
    pretrained = runs[runs["condition"].isin(PRETRAINED)].rename(columns={"condition": "pretrained"})
    pairs = pretrained[[*key, "pretrained", "train_per_class", *METRICS]].merge(
        scratch, on=key, suffixes=("_pretrained", "_scratch"))
    for metric in METRICS:
        pairs[f"{metric}_difference"] = pairs[f"{metric}_pretrained"] - pairs[f"{metric}_scratch"]
    columns = ["architecture", "pretrained", *UNIT, "fraction", "train_per_class"]
    return pairs[columns + [c for c in pairs.columns if c not in columns]].sort_values(columns).reset_index(drop=True)


def paired_analysis(runs: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Pretrained − scratch per architecture, pretrained condition, training fraction and metric.

    Columns: architecture, pretrained, fraction, train_per_class (median over the pairs), metric,
    then summarise_differences' n_pairs, mean, low, high, t_p, sign_flip_p, sign_flip_method, verdict.
    Empty when no architecture has both a scratch and a pretrained run.
    """
    pairs = paired_runs(runs)
    rows = []
    for (arch, condition, fraction), group in pairs.groupby(["architecture", "pretrained", "fraction"]):
        for metric in METRICS:
            rows.append({"architecture": arch, "pretrained": condition, "fraction": fraction,
                         "train_per_class": float(group["train_per_class"].median()), "metric": metric,
                         **summarise_differences(group[f"{metric}_difference"].to_numpy(), confidence)})
    return pd.DataFrame(rows, columns=["architecture", "pretrained", "fraction", "train_per_class", "metric",
                                       "n_pairs", "mean", "low", "high", "t_p", "sign_flip_p", "sign_flip_method",
                                       "verdict"])


def cell_summary(runs: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """The across-run table: per architecture, condition and fraction, the runs' count, mean,
    standard deviation and t interval of each metric (interval and sd NaN for a single run).

    The interval spans seed-to-seed and split-to-split spread; it is what a parent run carries.
    """
    runs = with_replicate(runs)
    check_runs(runs)
    rows = []
    for (arch, condition, fraction), group in runs.groupby(["architecture", "condition", "fraction"]):
        row = {"architecture": arch, "condition": condition, "fraction": fraction, "n_runs": len(group),
               "train_per_class": float(group["train_per_class"].median())}
        for metric in METRICS:
            values = group[metric].to_numpy(dtype=float)
            low, high, _ = t_interval(values, confidence)
            row.update({metric: float(values.mean()), f"{metric}_sd": float(np.std(values, ddof=1)) if len(values) > 1
                        else math.nan, f"{metric}_low": low, f"{metric}_high": high})
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- catching up


def crossing_size(sizes: np.ndarray, means: np.ndarray) -> float:
    """Where the mean difference first reaches 0, interpolated in log(size).

    sizes ascending; NaN means are skipped. -inf when it is already <= 0 at the smallest size,
    +inf when it stays above 0 at every size.
    """
    keep = ~np.isnan(means)
    sizes, means = sizes[keep], means[keep]
    below = np.flatnonzero(means <= 0)
    if len(below) == 0:
        return math.inf
    i = int(below[0])
    if i == 0:
        return -math.inf
    share = means[i - 1] / (means[i - 1] - means[i])  # of the way from size i-1 to size i, in log size
    return float(np.exp(np.log(sizes[i - 1]) + share * (np.log(sizes[i]) - np.log(sizes[i - 1]))))


def _unit_curves(pairs: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(sizes ascending, differences as a units × sizes array with NaN where a unit lacks a size)."""
    by_fraction = pairs.groupby("fraction")["train_per_class"].median().sort_values()
    table = pairs.pivot_table(index=UNIT, columns="fraction", values=f"{metric}_difference", aggfunc="first")
    return by_fraction.to_numpy(dtype=float), table[by_fraction.index].to_numpy(dtype=float)


def _bootstrap_crossings(sizes: np.ndarray, curves: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """crossing_size of `samples` resamples of the units (rows of curves), drawn with replacement."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(curves), np.full(len(curves), 1 / len(curves)), size=samples)
    present = ~np.isnan(curves)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (counts @ np.nan_to_num(curves)) / (counts @ present)
    return np.array([crossing_size(sizes, m) for m in means])


def catch_up(runs: pd.DataFrame, metric: str = "test_accuracy", confidence: float = 0.95,
             samples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per architecture and pretrained condition: the training size (images per class) at which
    scratch catches up on `metric`, with a bootstrap interval.

    Columns: architecture, pretrained, metric, sizes (the sizes tried, ascending), n_units (seed ×
    repeat units), status, estimate, low, high. Status is one of CATCHES_UP (estimate between two
    sizes tried), NOT_BEHIND (mean difference <= 0 already at the smallest size), NEVER (above 0
    at every size and established at the largest), UNDETERMINED (above 0 at every size but not
    established at the largest), ONE_SIZE (one size tried) or SINGLE (one unit: no uncertainty).
    estimate, low and high (percentile bounds) are in images per class; -inf means "at or below the
    smallest size tried", +inf "beyond the largest"; NaN for ONE_SIZE and SINGLE.
    """
    pairs = paired_runs(runs)
    per_size = paired_analysis(runs, confidence)
    rows = []
    for (arch, condition), group in pairs.groupby(["architecture", "pretrained"]):
        sizes, curves = _unit_curves(group, metric)
        row = {"architecture": arch, "pretrained": condition, "metric": metric, "sizes": tuple(sizes),
               "n_units": len(curves), "estimate": math.nan, "low": math.nan, "high": math.nan}
        largest = per_size[(per_size["architecture"] == arch) & (per_size["pretrained"] == condition)
                           & (per_size["metric"] == metric)].sort_values("train_per_class").iloc[-1]
        if len(sizes) < 2:
            rows.append({**row, "status": ONE_SIZE})
            continue
        if len(curves) < 2:
            rows.append({**row, "status": SINGLE})
            continue
        estimate = crossing_size(sizes, np.nanmean(curves, axis=0))
        crossings = _bootstrap_crossings(sizes, curves, samples, seed)
        tail = (1 - confidence) / 2
        low, high = np.quantile(crossings, [tail, 1 - tail], method="inverted_cdf")
        if estimate == -math.inf:
            status = NOT_BEHIND
        elif estimate < math.inf:
            status = CATCHES_UP
        else:
            status = NEVER if largest["verdict"] == BETTER else UNDETERMINED
        rows.append({**row, "status": status, "estimate": estimate, "low": float(low), "high": float(high)})
    return pd.DataFrame(rows, columns=["architecture", "pretrained", "metric", "sizes", "n_units", "status",
                                       "estimate", "low", "high"])
