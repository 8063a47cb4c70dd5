"""How honest is the report's inference? Simulated studies with a known truth, decided by the
report's own steps (inference.unit_values, unit_test, verdicts), and how often each outcome
comes out: 'established' under no true difference (nominal 5%), under a true one (power), and
how often the interval covers the truth.

    python scripts/inference_simulation.py                # every scenario, 4,000 studies each
    python scripts/inference_simulation.py --studies 1000

A simulated study has `units` units × `seeds` seeds × two conditions (scratch, frozen). Every unit
and condition gets a unit effect of sd `spread` (split-to-split, or replicate-to-replicate,
spread) and every run seed noise of sd `spread` too: split spread = seed spread, the clustered
data on which counting runs as pairs fired in 28% of null studies. With `overlap` > 0 the units
are overlapping splits of one dataset whose unit effects correlate by `overlap` (the model behind
Nadeau and Bengio's correction, correlation n_test / n_total). tests/test_inference.py asserts the
issue's lines on 1,000 studies; this script measures them on more. Not part of CI.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from transfer_study.inference import ESTABLISHED, REPLICATE, SPLIT, Units, unit_test, unit_values, verdicts  # noqa: E402

N_TEST, N_TRAIN = 270, 1260  # the default dataset's split: 45 test and 210 training images per class
OVERLAP = N_TEST / (N_TRAIN + 2 * N_TEST)  # n_test / n_total of one split


def simulate(studies: int, units: int, seeds: int, effect: float, spread: float, seed: int,
             overlap: float = 0.0) -> pd.DataFrame:
    """A runs table of `studies` simulated studies (column `study`), one comparison each."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(0, spread, (studies, 1, 2))
    unit_effects = math.sqrt(overlap) * shared + math.sqrt(1 - overlap) * rng.normal(0, spread, (studies, units, 2))
    accuracy = (0.8 + unit_effects[..., None] + rng.normal(0, spread, (studies, units, 2, seeds))
                + np.array([0.0, effect])[None, None, :, None])
    index = pd.MultiIndex.from_product([range(studies), range(units), ["scratch", "frozen"], range(seeds)],
                                       names=["study", "unit_id", "condition", "seed"])
    runs = pd.DataFrame({"test_accuracy": accuracy.ravel()}, index=index).reset_index()
    unit_column = "repeat" if overlap else "replicate"
    return runs.assign(**{unit_column: runs["unit_id"]}, n_test=N_TEST, n_train=N_TRAIN)


def decide_simulated(runs: pd.DataFrame, units: Units, confidence: float = 0.95) -> dict[str, np.ndarray]:
    """The report's own steps on every simulated study at once: unit values (seeds averaged into
    their unit), paired differences frozen − scratch, the t test over units and its verdict."""
    values = unit_values(runs, "test_accuracy", units, ("study", "condition"))
    wide = values.pivot_table(index=["study", "unit"], columns="condition", values="value")
    d = (wide["frozen"] - wide["scratch"]).unstack("unit").to_numpy()
    result = unit_test(d, N_TEST / N_TRAIN, confidence, split_units=units.kind == SPLIT)
    return {**result, "verdict": verdicts(result["p"], 1 - confidence)}


@dataclass(frozen=True)
class Scenario:
    name: str
    units: Units
    seeds: int
    effect: float
    spread: float
    overlap: float = 0.0


SCENARIOS = (
    Scenario("null, 6 replicates x 3 seeds", Units(REPLICATE, "replicate", 6), 3, 0.0, 0.02),
    Scenario("null, 10 replicates x 3 seeds", Units(REPLICATE, "replicate", 10), 3, 0.0, 0.02),
    Scenario("null, 5 overlapping splits x 3 seeds", Units(SPLIT, "repeat", 5), 3, 0.0, 0.02, OVERLAP),
    Scenario("null, 3 overlapping splits x 5 seeds", Units(SPLIT, "repeat", 3), 5, 0.0, 0.02, OVERLAP),
    Scenario("+5 points, 10 replicates x 3 seeds", Units(REPLICATE, "replicate", 10), 3, 0.05, 0.025),
    Scenario("+5 points, 6 replicates x 3 seeds", Units(REPLICATE, "replicate", 6), 3, 0.05, 0.025),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print("| scenario | studies | established | interval covers the truth |")
    print("|---|---|---|---|")
    for s in SCENARIOS:
        runs = simulate(args.studies, s.units.count, s.seeds, s.effect, s.spread, args.seed, s.overlap)
        result = decide_simulated(runs, s.units)
        established = np.mean(result["verdict"] == ESTABLISHED)
        covered = np.mean((result["low"] <= s.effect) & (s.effect <= result["high"]))
        print(f"| {s.name} (sd {s.spread * 100:g} points) | {args.studies} | {established:.1%} | {covered:.1%} |")


if __name__ == "__main__":
    main()
