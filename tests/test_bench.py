"""The benchmark's pure helpers (bench/): clocks, percentiles, the table. The benchmark itself
is not part of CI (`make bench`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from table import Row, fmt, markdown_table  # noqa: E402
from timing import SteadyStateBatches, alternate_windows, percentile  # noqa: E402


def _batches(sizes):
    return lambda: iter([(torch.zeros(n), torch.zeros(n)) for n in sizes])


def test_steady_state_skips_warmup_times_windows_and_starts_new_epochs():
    # An epoch of 3 batches (the last one partial), 2 warm-up batches, then 2 windows of 2 batches.
    source = SteadyStateBatches(_batches([4, 4, 1]), warmup=2, batches=2, windows=2, device=torch.device("cpu"))
    seen = [len(labels) for _, labels in source]
    assert seen == [4, 4, 1, 4, 4, 1]  # the source was remade twice: new epochs
    assert len(source.rates) == 2 and all(rate > 0 for rate in source.rates)


def test_steady_state_stops_a_consumer_loop_after_the_last_window():
    source = SteadyStateBatches(_batches([2] * 100), warmup=1, batches=3, windows=1, device=torch.device("cpu"))
    assert sum(1 for _ in source) == 4


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([5.0, 1.0], 50) == 1.0


def test_alternate_windows_runs_paths_in_turn_and_takes_medians():
    order = []

    def window(name, rates):
        def run():
            order.append(name)
            return rates.pop(0)
        return run

    fast, base = alternate_windows(window("fast", [1.0, 9.0, 5.0]), window("base", [2.0, 4.0, 3.0]), 3)
    assert order == ["fast", "base"] * 3
    assert fast["img_s"] == 5.0 and base["img_s"] == 3.0


def test_row_ratio_and_table():
    row = Row("train", "resnet18 scratch 64 px", "img/s", 300.0, 100.0, target="≥ 3×", met=True)
    assert row.ratio == pytest.approx(3.0)
    assert Row("serve", "x", "ms", 5.0, None).ratio is None
    assert Row("serve", "x", "ms", 5.0, float("nan")).ratio is None
    table = markdown_table([row])
    assert "| train | resnet18 scratch 64 px | img/s | 300 | 100 | 3.00× | ≥ 3× ✓ |" in table
    assert fmt(12345.6) == "12,346" and fmt(None) == "–" and fmt(0.01234) == "0.0123"
