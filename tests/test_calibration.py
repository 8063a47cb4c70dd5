"""Tests for calibration.py: temperature scaling, ECE and the reliability diagram."""

from __future__ import annotations

import numpy as np
import pytest

from transfer_study import calibration


def overconfident(n: int = 3000, classes: int = 4, sharpness: float = 4.0, seed: int = 0):
    """Labels drawn from softmax(z), reported as softmax(sharpness * z): a model `sharpness` times
    too sure of itself, whose true temperature is `sharpness`."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, size=(n, classes))
    true = calibration.softmax(logits)
    labels = np.array([rng.choice(classes, p=p) for p in true])
    return sharpness * logits, labels


def test_temperature_scaling_lowers_the_ece_of_an_overconfident_model():
    logits, labels = overconfident()
    before = calibration.softmax(logits)
    temperature = calibration.fit_temperature(logits, labels)
    after = calibration.temperature_scaled(before, temperature)

    assert temperature == pytest.approx(4.0, rel=0.15)
    assert calibration.expected_calibration_error(before, labels) > 0.15
    assert calibration.expected_calibration_error(after, labels) < 0.04
    assert calibration.negative_log_likelihood(after, labels) < calibration.negative_log_likelihood(before, labels)
    assert np.array_equal(after.argmax(1), before.argmax(1))  # the predicted class never changes
    assert np.allclose(after.sum(1), 1.0)


def test_fit_on_log_probabilities_equals_fit_on_logits():
    logits, labels = overconfident(n=500, seed=1)
    from_probs = calibration.fit_temperature(calibration.logits_from_probabilities(calibration.softmax(logits)), labels)
    assert from_probs == pytest.approx(calibration.fit_temperature(logits, labels), rel=1e-4)


def test_a_calibrated_model_keeps_a_temperature_near_one():
    logits, labels = overconfident(sharpness=1.0, seed=2)
    assert calibration.fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.1)


def test_temperature_scaled_matches_softmax_of_scaled_logits():
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    probs = calibration.softmax(logits)
    assert np.allclose(calibration.temperature_scaled(probs, 2.5), calibration.softmax(logits / 2.5))
    assert np.allclose(calibration.temperature_scaled(probs, 1.0), probs)


def test_ece_by_hand():
    # Two images at confidence 0.9 (one right), two at 0.6 (both right): bins (13/15, 14/15] and (8/15, 9/15].
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 1, 0, 1])
    expected = (2 * abs(0.5 - 0.9) + 2 * abs(1.0 - 0.6)) / 4
    assert calibration.expected_calibration_error(probs, labels) == pytest.approx(expected)
    table = calibration.reliability_bins(probs, labels)
    assert len(table) == 15 and sum(b["count"] for b in table) == 4
    assert [b["count"] for b in table if b["count"]] == [2, 2]
    assert calibration.expected_calibration_error(np.eye(3), np.arange(3)) == 0.0


def test_fit_temperature_refuses_empty_or_mismatched_input():
    with pytest.raises(ValueError, match="labels"):
        calibration.fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int))
    with pytest.raises(ValueError, match="labels"):
        calibration.fit_temperature(np.zeros((2, 3)), np.zeros(3, dtype=int))


def test_reliability_diagram_draws_one_panel_per_curve(tmp_path):
    logits, labels = overconfident(n=300, seed=3)
    probs = calibration.softmax(logits)
    fig = calibration.reliability_diagram({"before": (probs, labels),
                                           "after": (calibration.temperature_scaled(probs, 4.0), labels)}, "test")
    assert len(fig.axes) == 2 and fig.axes[0].get_title().startswith("before: ECE")
    fig.savefig(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_an_all_correct_validation_set_serves_the_model_s_own_probabilities_with_a_note():
    """The issue's case: every validation answer right, so the fit sharpens to the range's end and
    would serve a wrong test answer at probability 1.0. T = 1 is served and the note says why."""
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 15)
    probs = np.full((15, 3), 0.2)
    probs[np.arange(15), labels] = 0.6
    choice = calibration.choose_temperature(probs, labels)
    assert choice.fitted == pytest.approx(calibration.TEMPERATURE_RANGE[0], rel=1e-2) and choice.at_bound
    assert choice.served == 1.0 and choice.errors == 0
    assert "0 wrong validation answer(s), fewer than the 10 a fit needs" in choice.note
    assert "the fit ran to the end of its range (0.1 to 10)" in choice.note
    assert np.allclose(calibration.temperature_scaled(probs, choice.served), probs)


def test_a_trustworthy_fit_is_served_and_a_useless_one_is_not():
    logits, labels = overconfident(n=600, seed=5)
    choice = calibration.choose_temperature(calibration.softmax(logits), labels)
    assert choice.note is None and choice.served == choice.fitted == pytest.approx(4.0, rel=0.2)
    assert choice.log_loss_fitted < choice.log_loss_before - calibration.MIN_LOG_LOSS_GAIN
    # Already calibrated: the fit lands near 1 and gains less than the noise floor, so T = 1.
    logits, labels = overconfident(n=600, sharpness=1.0, seed=6)
    calibrated = calibration.choose_temperature(calibration.softmax(logits), labels)
    assert calibrated.served == 1.0 and "lowers validation log-loss by" in calibrated.note


def test_a_fit_next_to_an_end_of_the_range_is_at_it():
    """Not exact equality: the bounded search stops a hair inside the range."""
    low, high = calibration.TEMPERATURE_RANGE
    assert calibration.at_search_bound(low * 1.0002) and calibration.at_search_bound(high * 0.9995)
    assert not calibration.at_search_bound(1.0) and not calibration.at_search_bound(low * 1.05)
