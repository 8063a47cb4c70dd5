"""The learning curve: test accuracy against training images per class, one line per
architecture and condition, with the across-run interval as a band; as a PNG and as a CSV
that `dvc plots` can draw.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .analysis import cell_summary
from .report import cell_order

X = "train_per_class"
LINESTYLE = {"scratch": "-", "frozen": "--", "finetune": ":"}  # colour tells the architecture, style the condition


def curve_points(runs: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """One row per architecture, condition and training fraction, in config order then size.

    Columns: series ("<arch>-<condition>"), architecture, condition, fraction, train_per_class,
    n_runs, test_accuracy (mean over runs), low, high (its t interval over runs; NaN for one run).
    runs: analysis.RUN_COLUMNS.
    """
    table = cell_summary(runs, confidence)
    table = table.assign(series=table["architecture"] + "-" + table["condition"],
                         low=table["test_accuracy_low"], high=table["test_accuracy_high"])
    keys = [(*cell_order((a, c)), size) for a, c, size in zip(table["architecture"], table["condition"], table[X])]
    table = table.iloc[sorted(range(len(table)), key=keys.__getitem__)].reset_index(drop=True)
    return table[["series", "architecture", "condition", "fraction", X, "n_runs", "test_accuracy", "low", "high"]]


def curve_table(points: pd.DataFrame) -> pd.DataFrame:
    """The DVC plot's table: one row per training fraction (ascending), column train_per_class and
    one column of mean test accuracy per series; empty where a series lacks that size."""
    sizes = points.groupby("fraction")[X].median()
    wide = points.pivot(index="fraction", columns="series", values="test_accuracy")
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


def save_curve_figure(points: pd.DataFrame, path: Path, confidence: float = 0.95) -> None:
    """Accuracy vs images per class (log x), a line per series, a band where a size has several runs."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    colours = {arch: f"C{i}" for i, arch in enumerate(dict.fromkeys(points["architecture"]))}
    for series, line in points.groupby("series", sort=False):
        line = line.sort_values(X)
        arch, condition = line["architecture"].iloc[0], line["condition"].iloc[0]
        ax.plot(line[X], line["test_accuracy"], marker="o", color=colours[arch],
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
    ax.set_ylabel("test accuracy")
    several = points["n_runs"].max() > 1
    ax.set_title("Learning curve" + (f": mean over runs, band = {confidence:.0%} t interval" if several
                                     else ": one run per point, no interval"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
