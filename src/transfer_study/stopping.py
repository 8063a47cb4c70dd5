"""The training rule: how long a run trains, at which learning rate, which epoch's weights it keeps,
and whether it stopped at the cap while still improving. `progress` decides all of it, for every
run of every profile, from the run's validation history alone (pure, so a resumed run decides as
an uninterrupted one would, and every condition and training size is trained by the same rule).

- Fixed epochs (train.early_stopping: null, the study's protocol): train.epochs epochs at the
  schedule's learning rate; the best epoch has the highest validation accuracy (the study's checkpoint).
- Early stopping (train.early_stopping): the best epoch has the lowest validation loss. When
  `patience` epochs pass without a lower one, the learning rate is cut by `lr_factor` (at most
  `lr_reductions` times) and the patience starts again; when it runs out with no cut left, training
  stops (never before `min_epochs`, and at `max_epochs` at the latest). The counts are the params'
  optimiser steps (patience_steps, min_steps, max_steps) in epochs of this run's training set,
  rounded up: a run on a quarter of the images gets as many steps as a full one, in four times the
  epochs, and is never stopped by an epoch count meant for the full size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .config import TrainParams


def epoch_steps(n_train: int, train: TrainParams) -> int:
    """Optimiser steps in one epoch over n_train images (train.max_batches_per_epoch caps them)."""
    steps = max(math.ceil(n_train / train.batch_size), 1)
    return steps if train.max_batches_per_epoch is None else min(steps, train.max_batches_per_epoch)


@dataclass(frozen=True)
class StopRule:
    """The rule of one run, in epochs of its training set."""

    max_epochs: int  # the cap
    min_epochs: int = 0  # no stop before this many
    patience: int | None = None  # epochs without a lower validation loss; None: fixed epochs
    lr_reductions: int = 0  # how often the patience running out cuts the learning rate before it stops the run
    lr_factor: float = 0.1  # each cut multiplies the learning rate by this

    @property
    def monitor(self) -> str:
        """The history column that says which epoch is best."""
        return "val_acc" if self.patience is None else "val_loss"


def stop_rule(train: TrainParams, steps_per_epoch: int) -> StopRule:
    """train.early_stopping (or train.epochs) as a StopRule for epochs of `steps_per_epoch` steps."""
    rule = train.early_stopping
    if rule is None:
        return StopRule(train.epochs, train.epochs)
    max_epochs = max(math.ceil(rule.max_steps / steps_per_epoch), 1)
    return StopRule(max_epochs, min(math.ceil(rule.min_steps / steps_per_epoch), max_epochs),
                    max(math.ceil(rule.patience_steps / steps_per_epoch), 1), rule.lr_reductions, rule.lr_factor)


@dataclass(frozen=True)
class Progress:
    """Where a run stands after its last recorded epoch."""

    epochs: int  # epochs trained
    best_epoch: int  # whose weights the run keeps (0: no epoch recorded yet)
    stop: bool  # train no further epoch
    hit_cap: bool  # stopped by the cap while still improving: more training might have helped
    lr_scale: float = 1.0  # the learning rate's factor for the next epoch (lr_factor ** cuts so far)


def progress(history: Sequence[Mapping[str, float]], rule: StopRule) -> Progress:
    """The rule applied to a run's history, one row per epoch in order (epoch, val_loss, val_acc ...).

    The best epoch is the first with the lowest val_loss (early stopping) or the highest val_acc
    (fixed epochs); a NaN never improves (a run with no number at all keeps epoch 1). "Still
    improving" at the cap means the patience had not run out for good there (with fixed epochs:
    the last epoch was the best)."""
    epochs = len(history)
    if not epochs:
        return Progress(0, 0, False, False)
    sign = 1.0 if rule.patience is None else -1.0  # compare as "higher is better"
    best_epoch, best = 1, -math.inf
    waited_since, cuts = 0, 0  # the patience counts from the best epoch or the last cut
    for epoch, row in enumerate(history, start=1):
        value = sign * float(row[rule.monitor])
        if value > best:  # False for NaN
            best_epoch, best, waited_since = epoch, value, epoch
        elif rule.patience is not None and epoch - waited_since >= rule.patience and cuts < rule.lr_reductions:
            cuts, waited_since = cuts + 1, epoch
    at_cap = epochs >= rule.max_epochs
    if rule.patience is None:
        return Progress(epochs, best_epoch, at_cap, at_cap and best_epoch == epochs)
    exhausted = epochs - waited_since >= rule.patience  # with every cut made: the loop cuts while it can
    patience_out = exhausted and epochs >= rule.min_epochs
    return Progress(epochs, best_epoch, patience_out or at_cap, at_cap and not exhausted,
                    rule.lr_factor ** cuts)
