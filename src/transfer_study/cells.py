"""The cells of the study, as params ask for them: one run each of (architecture, condition)
× seed × split repeat × training fraction. Repeat 0 at fraction 1 is the study's own run."""

from __future__ import annotations

from dataclasses import dataclass

from .config import ConfigError, Params


@dataclass(frozen=True)
class Cell:
    architecture: str
    condition: str
    seed: int
    repeat: int = 0  # which stratified split (split.repeats)
    fraction: float = 1.0  # share of that split's training images (split.train_fractions)

    @property
    def variant(self) -> str:
        """`s<seed>`, with `-r<repeat>` and `-f<fraction>` when they are not the study's 0 and 1."""
        suffix = (f"-r{self.repeat}" if self.repeat else "") + (f"-f{self.fraction:g}" if self.fraction != 1 else "")
        return f"s{self.seed}{suffix}"

    @property
    def group(self) -> str:
        """`<arch>-<condition>`: the study's cell, whose runs differ in seed, split and size."""
        return f"{self.architecture}-{self.condition}"

    @property
    def name(self) -> str:
        return f"{self.group}-{self.variant}"

    @property
    def pretrained(self) -> bool:
        return self.condition != "scratch"


def runs_per_group(params: Params) -> int:
    """How many runs each (architecture, condition) has: seeds × split repeats × training fractions."""
    return len(params.train.seeds) * params.split.repeats * len(params.split.train_fractions)


def cells_for(params: Params, architecture: str | None = None, condition: str | None = None,
              variant: str | None = None) -> list[Cell]:
    """The cells params ask for, optionally narrowed to one architecture/condition, and to one
    run of them (its `variant`, e.g. s0-r1-f0.5)."""
    t = params.train
    chosen = [
        Cell(a, c, s, r, f)
        for a in t.architectures
        for c in t.conditions
        if f"{a}-{c}" not in t.exclude
        for f in params.split.train_fractions
        for r in range(params.split.repeats)
        for s in t.seeds
    ]
    if architecture is not None:
        if architecture not in t.architectures:
            raise ConfigError(f"--arch {architecture} is not in train.architectures {list(t.architectures)}")
        chosen = [c for c in chosen if c.architecture == architecture]
    if condition is not None:
        if condition not in t.conditions:
            raise ConfigError(f"--condition {condition} is not in train.conditions {list(t.conditions)}")
        chosen = [c for c in chosen if c.condition == condition]
    if variant is not None and chosen:  # none chosen: an excluded cell, which the train command reports
        known = list(dict.fromkeys(c.variant for c in chosen))
        chosen = [c for c in chosen if c.variant == variant]
        if not chosen:
            raise ConfigError(f"--run {variant} is not a run these params ask for; choose from {', '.join(known)}")
    return chosen


def pretrained_architectures(params: Params) -> list[str]:
    """Architectures whose ImageNet weights the cells params ask for need, in train.architectures' order."""
    needed = {c.architecture for c in cells_for(params) if c.pretrained}
    return [a for a in params.train.architectures if a in needed]
