"""Tests for stopping.py: the one training rule (epochs, learning-rate cuts, best epoch, the cap)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from transfer_study.config import EarlyStoppingParams, TrainParams
from transfer_study.stopping import Progress, StopRule, epoch_steps, progress, stop_rule

RULE = EarlyStoppingParams(patience_steps=120, min_steps=0, max_steps=1600, lr_reductions=1, lr_factor=0.1)


def history(val_losses, val_accs=None) -> list[dict]:
    accs = val_accs or [0.5] * len(val_losses)
    return [{"epoch": e, "val_loss": loss, "val_acc": acc} for e, (loss, acc) in enumerate(zip(val_losses, accs), 1)]


def test_steps_become_epochs_of_each_training_set():
    t = TrainParams(batch_size=32, early_stopping=RULE)
    assert epoch_steps(1260, t) == 40 and epoch_steps(315, t) == 10
    assert stop_rule(t, 40) == StopRule(max_epochs=40, min_epochs=0, patience=3, lr_reductions=1, lr_factor=0.1)
    assert stop_rule(t, 10) == StopRule(max_epochs=160, min_epochs=0, patience=12, lr_reductions=1, lr_factor=0.1)
    fixed = TrainParams(epochs=50)
    assert stop_rule(fixed, 40) == StopRule(50, 50) and stop_rule(fixed, 40).monitor == "val_acc"


def test_a_run_still_improving_at_the_cap_is_reported_as_such():
    rule = StopRule(max_epochs=5, patience=2)
    improving = progress(history([1.0, 0.9, 0.8, 0.7, 0.6]), rule)
    assert improving == Progress(epochs=5, best_epoch=5, stop=True, hit_cap=True)
    # Improved within the patience before the cap: still improving, too.
    assert progress(history([1.0, 0.9, 0.8, 0.7, 0.75]), rule).hit_cap
    # Its patience ran out at the cap itself: it had stopped improving.
    flat = progress(history([1.0, 0.9, 0.8, 0.85, 0.86]), rule)
    assert flat.stop and not flat.hit_cap and flat.best_epoch == 3


def test_patience_cuts_the_learning_rate_first_then_stops_at_the_lowest_loss():
    rule = StopRule(max_epochs=40, patience=2, lr_reductions=1, lr_factor=0.1)
    losses = [1.0, 0.8, 0.85, 0.9]  # no new low for 2 epochs: cut
    assert progress(history(losses), rule) == Progress(4, 2, False, False, 0.1)
    losses += [0.7, 0.75, 0.72]  # after the cut a new low at epoch 5, then 2 epochs without one: stop
    assert progress(history(losses), rule) == Progress(7, 5, True, False, 0.1)
    assert progress(history(losses[:6]), rule).stop is False


def test_a_quarter_size_run_is_not_stopped_by_an_epoch_count_tuned_for_the_full_size():
    """The full size (40 steps an epoch) stops 3 epochs after its last improvement; a run on a
    quarter of the images (10 steps an epoch) with a loss that falls in the same way per step
    trains as many steps, in four times the epochs."""
    t = TrainParams(batch_size=32, early_stopping=dataclasses.replace(RULE, lr_reductions=0))

    def loss_after(steps: int) -> float:  # improves until step 240, then stays flat
        return 1.0 / (1 + min(steps, 240) / 40)

    def run(steps_per_epoch: int) -> Progress:
        rule, rows = stop_rule(t, steps_per_epoch), []
        while True:
            rows.append({"val_loss": loss_after(len(rows) * steps_per_epoch + steps_per_epoch), "val_acc": 0.0})
            decision = progress(rows, rule)
            if decision.stop:
                return decision

    full, quarter = run(40), run(10)
    assert full.epochs == 9 and full.best_epoch == 6  # best at step 240, then 3 epochs (120 steps) of patience
    assert quarter.epochs == 36 and quarter.best_epoch == 24  # the same 360 steps, in 10-step epochs
    assert not full.hit_cap and not quarter.hit_cap
    # An epoch count tuned for the full size (patience 3 epochs, no minimum) would stop the quarter run
    # 30 steps after its first flat epoch, after fewer steps than the full size trained.
    epoch_tuned = StopRule(max_epochs=40, patience=3)
    rows = [{"val_loss": loss_after(10 * (e + 1)), "val_acc": 0.0} for e in range(40)]
    stops_at = next(e for e in range(1, 41) if progress(rows[:e], epoch_tuned).stop)
    assert stops_at * 10 < full.epochs * 40


def test_min_epochs_hold_off_a_stop_and_a_later_improvement_resets_the_patience():
    rule = StopRule(max_epochs=40, min_epochs=6, patience=2)
    rows = history([1.0, 1.1, 1.2, 1.3])
    assert not progress(rows, rule).stop  # patience out, but not yet 6 epochs
    rows = history([1.0, 1.1, 1.2, 1.3, 0.9, 0.95])
    assert not progress(rows, rule).stop  # a new low at 5 restarted the patience
    assert progress(history([1.0, 1.1, 1.2, 1.3, 0.9, 0.95, 0.96]), rule).stop


def test_fixed_epochs_keep_the_best_validation_accuracy_and_run_to_the_end():
    rule = StopRule(max_epochs=4)
    rows = history([0.1, 0.1, 0.1, 0.1], [0.5, 0.7, 0.7, 0.6])
    assert progress(rows[:3], rule) == Progress(3, 2, False, False)
    assert progress(rows, rule) == Progress(4, 2, True, False)
    assert progress(history([0.1] * 4, [0.5, 0.6, 0.7, 0.8]), rule).hit_cap


def test_a_run_without_numbers_keeps_its_first_epoch_and_stops():
    rule = StopRule(max_epochs=40, patience=2)
    decision = progress(history([math.nan] * 3), rule)
    assert decision.best_epoch == 1 and decision.stop and not decision.hit_cap
    assert progress([], rule) == Progress(0, 0, False, False)


@pytest.mark.parametrize("bad, match", [
    ({"patience_steps": 0}, "patience_steps = 0"),
    ({"min_steps": 2000}, "min_steps = 2000"),
    ({"lr_factor": 1.5}, "lr_factor = 1.5"),
    ({"lr_reductions": -1}, "lr_reductions = -1"),
])
def test_bad_rule_params_name_the_param(tmp_path, bad, match):
    import yaml

    from transfer_study.config import ConfigError, load_params

    rule = {"patience_steps": 120, "min_steps": 0, "max_steps": 1600} | bad
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"train": {"early_stopping": rule}}))
    with pytest.raises(ConfigError, match=f"train.early_stopping.{match}"):
        load_params(tmp_path / "p.yaml")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"train": {"early_stopping": {"patience_steps": 50}}}))
    assert load_params(tmp_path / "p.yaml").train.early_stopping == EarlyStoppingParams(patience_steps=50)
