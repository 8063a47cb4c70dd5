"""What to serve, decided on validation only: test-time flips per run, the ensemble's members and
the temperature.

The core is pure: it sees each candidate run's validation probabilities (from predictions.csv)
and those of the mirror images, with the validation labels, and nothing of the test split.
- Flips (`flips_help`): a run is served with test-time flips when averaging its probabilities
  with those of the mirror image raises validation macro-F1, or keeps it and lowers the
  validation log-loss.
- Members (`greedy_members`): greedy forward selection (Caruana et al., 2004) without
  replacement: start from the best single run, add the run that raises the validation
  macro-F1 of the mean probabilities most, stop when no run raises it. An ensemble is
  therefore served only when it beats the best single run on validation macro-F1.
- Temperature (`calibration.choose_temperature`) fitted on the served validation probabilities,
  and served only when the fit can be trusted (else T = 1, with a note).
The edge (`mirror_probabilities`) runs a network on the mirror images of the crops.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .calibration import TemperatureChoice, choose_temperature, negative_log_likelihood
from .evaluate import classification_metrics

MAX_CANDIDATES = 5  # best runs on validation considered for flips and the ensemble: one val pass each
TEMPERATURE_DECIMALS = 3  # the stored temperature is rounded, so a rerun logs the same model
MIRROR_BATCH = 64


@dataclass(frozen=True)
class Candidate:
    """What the choice may see of one run: validation probabilities (n, K), as predicted and on
    the mirror images, in the same image order for every candidate."""

    run: str
    plain: np.ndarray
    mirrored: np.ndarray


@dataclass(frozen=True)
class ServedChoice:
    """The served model: its member runs (best first), whether each run flips, the temperature
    (and the fit it came from), and how the best single run and the served model scored on
    validation (macro-F1)."""

    members: tuple[str, ...]
    tta: dict[str, bool]
    calibration: TemperatureChoice
    best_single: str
    best_single_val_f1: float
    val_f1: float

    @property
    def temperature(self) -> float:
        """The temperature served."""
        return self.calibration.served


def macro_f1(probs: np.ndarray, labels: np.ndarray) -> float:
    """Macro-F1 of the most probable class, as evaluate reports it."""
    return classification_metrics(labels, probs.argmax(1), probs, probs.shape[1])["f1_macro"]


def flips_help(plain: np.ndarray, mirrored: np.ndarray, labels: np.ndarray) -> bool:
    """Whether averaging with the mirror image raises validation macro-F1, or keeps it and lowers log-loss."""
    averaged = (plain + mirrored) / 2
    return (macro_f1(averaged, labels), -negative_log_likelihood(averaged, labels)) > \
        (macro_f1(plain, labels), -negative_log_likelihood(plain, labels))


def served_probabilities(members: dict[str, tuple[np.ndarray, np.ndarray | None]], tta: dict[str, bool]) -> np.ndarray:
    """The mean over members of each one's probabilities, averaged with its mirror images' when it flips.

    `members`: run → (probabilities, mirror-image probabilities or None when the run does not flip).
    Before temperature scaling.
    """
    return np.mean([(plain + mirrored) / 2 if tta[run] else plain for run, (plain, mirrored) in members.items()],
                   axis=0)


def greedy_members(probs: dict[str, np.ndarray], labels: np.ndarray, max_members: int) -> list[str]:
    """Greedy forward selection on validation macro-F1 of the mean probabilities.

    `probs`: run → validation probabilities, in rank order (ties go to the earlier run). Starts
    from the best single run; adds a run only when it strictly raises macro-F1.
    """
    order = list(probs)
    chosen = [max(order, key=lambda run: (macro_f1(probs[run], labels), -order.index(run)))]
    best = macro_f1(probs[chosen[0]], labels)
    while len(chosen) < max_members:
        scores = {run: macro_f1(np.mean([probs[r] for r in [*chosen, run]], axis=0), labels)
                  for run in order if run not in chosen}
        if not scores:
            break
        run = max(scores, key=lambda r: (scores[r], -order.index(r)))
        if scores[run] <= best:
            break
        chosen.append(run)
        best = scores[run]
    return chosen


def choose_served(candidates: list[Candidate], labels: np.ndarray, max_members: int = MAX_CANDIDATES) -> ServedChoice:
    """Flips per candidate, the members and the temperature, from validation alone.

    `candidates` in rank order (best validation macro-F1 first); `labels` the validation labels.
    """
    if not candidates:
        raise ValueError("choose_served needs at least one candidate run")
    tta = {c.run: flips_help(c.plain, c.mirrored, labels) for c in candidates}
    views = {c.run: (c.plain, c.mirrored) for c in candidates}
    probs = {run: served_probabilities({run: views[run]}, tta) for run in views}
    members = greedy_members(probs, labels, max_members)
    served = served_probabilities({run: views[run] for run in members}, tta)
    return ServedChoice(members=tuple(members), tta=tta,
                        calibration=choose_temperature(served, labels, TEMPERATURE_DECIMALS), best_single=members[0],
                        best_single_val_f1=macro_f1(probs[members[0]], labels), val_f1=macro_f1(served, labels))


# --------------------------------------------------------------------------- the edge: a pass over mirror images


def mirror_probabilities(classifier, crops: list[Path]) -> np.ndarray:
    """A served network's probabilities (n, K) on the mirror images of `crops`, through training's
    input path (transforms.py: resize, normalise), with no temperature.

    `classifier`: a loaded serve.ImageClassifier.
    """
    import torch
    from PIL import Image

    from .serve import flipped
    from .transforms import model_input, uint8_batch

    def read(path: Path) -> Image.Image:
        with Image.open(path) as img:
            return img.convert("RGB")

    parts = []
    for start in range(0, len(crops), MIRROR_BATCH):
        images = [read(p) for p in crops[start:start + MIRROR_BATCH]]
        batch = model_input(uint8_batch(images, classifier.image_size), torch.device("cpu"))
        parts.append(classifier.network_probabilities(flipped(batch)))
    return np.concatenate(parts) if parts else np.zeros((0, len(classifier.class_names)))
