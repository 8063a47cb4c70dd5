"""The cells of the study: one (architecture, condition, seed) each, as params ask for them."""

from __future__ import annotations

from dataclasses import dataclass

from .config import ConfigError, Params


@dataclass(frozen=True)
class Cell:
    architecture: str
    condition: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.architecture}-{self.condition}-s{self.seed}"

    @property
    def pretrained(self) -> bool:
        return self.condition != "scratch"


def cells_for(params: Params, architecture: str | None = None, condition: str | None = None) -> list[Cell]:
    """The cells params ask for, optionally narrowed to one architecture/condition."""
    t = params.train
    chosen = [
        Cell(a, c, s)
        for a in t.architectures
        for c in t.conditions
        for s in t.seeds
        if f"{a}-{c}" not in t.exclude
    ]
    if architecture is not None:
        if architecture not in t.architectures:
            raise ConfigError(f"--arch {architecture} is not in train.architectures {list(t.architectures)}")
        chosen = [c for c in chosen if c.architecture == architecture]
    if condition is not None:
        if condition not in t.conditions:
            raise ConfigError(f"--condition {condition} is not in train.conditions {list(t.conditions)}")
        chosen = [c for c in chosen if c.condition == condition]
    return chosen


def pretrained_architectures(params: Params) -> list[str]:
    """Architectures whose ImageNet weights the cells params ask for need, in train.architectures' order."""
    needed = {c.architecture for c in cells_for(params) if c.pretrained}
    return [a for a in params.train.architectures if a in needed]
