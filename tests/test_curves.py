"""Tests for curves.py: the learning-curve points, the DVC plot CSV and the figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_analysis import make_runs

from transfer_study.curves import curve_points, save_curve_figure, write_curve_csv

EFFECTS = {("efficientnet_lite0", "frozen"): {0.1: 0.12, 0.5: 0.05, 1.0: 0.02},
           ("resnet18", "finetune"): {0.1: 0.10, 0.5: 0.04, 1.0: 0.01}}


def test_curve_points_has_a_row_per_series_and_size_with_intervals():
    points = curve_points(make_runs(EFFECTS, seeds=[0, 1, 2], repeats=[0]))
    # config order: resnet18 before efficientnet_lite0, scratch before frozen and finetune
    assert list(dict.fromkeys(points["series"])) == ["resnet18-scratch", "resnet18-finetune",
                                                     "efficientnet_lite0-scratch", "efficientnet_lite0-frozen"]
    assert len(points) == 4 * 3 and set(points["n_runs"]) == {3}
    first = points.iloc[0]
    assert first["train_per_class"] == 21 and first["low"] < first["test_accuracy"] < first["high"]


def test_curve_csv_has_a_row_per_size_and_a_column_per_series(tmp_path):
    runs = make_runs(EFFECTS, seeds=[0, 1], repeats=[0, 1])
    points = curve_points(runs)
    path = tmp_path / "reports" / "learning_curve.csv"
    write_curve_csv(points, path)
    table = pd.read_csv(path)
    assert list(table.columns) == ["train_per_class", "resnet18-scratch", "resnet18-finetune",
                                   "efficientnet_lite0-scratch", "efficientnet_lite0-frozen"]
    assert table["train_per_class"].tolist() == [21, 105, 210]
    expected = runs.query("architecture == 'resnet18' and condition == 'finetune' and fraction == 0.5")
    assert table.loc[1, "resnet18-finetune"] == pytest.approx(expected["test_accuracy"].mean(), abs=1e-6)


def test_a_series_missing_a_size_leaves_that_cell_empty(tmp_path):
    runs = make_runs(EFFECTS, seeds=[0, 1], repeats=[0])
    runs = runs[~((runs["condition"] == "frozen") & (runs["fraction"] == 0.5))]
    table = write_curve_csv(curve_points(runs), tmp_path / "curve.csv")
    assert table["efficientnet_lite0-frozen"].isna().tolist() == [False, True, False]


@pytest.mark.parametrize("seeds", [[0, 1, 2], [0]])
def test_figure_is_a_png_with_something_drawn(tmp_path, seeds):
    path = tmp_path / "reports" / "learning_curve.png"
    save_curve_figure(curve_points(make_runs(EFFECTS, seeds=seeds, repeats=[0])), path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 300
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 10  # not a blank canvas
