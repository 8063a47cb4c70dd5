"""Calibrated probabilities: temperature scaling, expected calibration error, reliability diagrams.

Pure functions on arrays (probabilities (n, K), labels (n,) as class indices). Temperature
scaling divides the logits by one number T fitted on validation (Guo et al., 2017); T > 1
softens an over-confident model, and the predicted class never changes. Served models
only keep probabilities, so logits are recovered from them as log(p): equal to the logits up
to a constant per row, which softmax ignores.

A fitted T is served only when the fit can be trusted (`choose_temperature`): a validation set
with few wrong answers cannot say how sure a wrong answer should be (all correct, the fit
sharpens until the search range ends, and a wrong test answer is served at probability 1.0);
a fit at an end of the range found no optimum; a fit that barely lowers validation log-loss is
noise. Then T = 1 is served, the model's own probabilities, and a note says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ECE_BINS = 15
PROBABILITY_FLOOR = 1e-12  # log(0) guard: a probability that underflowed to 0
TEMPERATURE_RANGE = (0.1, 10.0)  # searched; a fit at either end (e.g. a perfect validation set) says little
BOUND_TOLERANCE = 1e-3  # relative: a fitted T this close to an end of TEMPERATURE_RANGE is at it
# Fewer wrong validation answers than this say too little about over-confidence to fit T on.
MIN_VALIDATION_ERRORS = 10
# A fit that lowers validation log-loss (nats per image) by less than this is within noise.
MIN_LOG_LOSS_GAIN = 0.01


def logits_from_probabilities(probs: np.ndarray) -> np.ndarray:
    """log(p): the logits up to a constant per row (softmax(log p) == p)."""
    return np.log(np.clip(np.asarray(probs, dtype=float), PROBABILITY_FLOOR, 1.0))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    shifted = np.asarray(logits, dtype=float) - np.max(logits, axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def temperature_scaled(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T): the probabilities a model with logits / T would give."""
    if temperature == 1.0:
        return np.asarray(probs, dtype=float)
    return softmax(logits_from_probabilities(probs) / temperature)


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log p(true class)."""
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels)
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], PROBABILITY_FLOOR, 1.0))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in TEMPERATURE_RANGE that minimises the NLL of softmax(logits / T) on these labels.

    The NLL is convex in 1/T, so a bounded 1-D search finds the optimum. Raises ValueError
    on an empty set or mismatched lengths.
    """
    from scipy.optimize import minimize_scalar

    logits, labels = np.asarray(logits, dtype=float), np.asarray(labels)
    if len(logits) == 0 or len(logits) != len(labels):
        raise ValueError(f"fit_temperature needs as many labels as rows of logits, at least one; "
                         f"got {len(logits)} rows and {len(labels)} labels")
    low, high = TEMPERATURE_RANGE

    def nll(inverse_t: float) -> float:
        return negative_log_likelihood(softmax(logits * inverse_t), labels)

    result = minimize_scalar(nll, bounds=(1.0 / high, 1.0 / low), method="bounded", options={"xatol": 1e-6})
    return float(1.0 / result.x)


def at_search_bound(temperature: float) -> bool:
    """Whether a fitted T lies at (within BOUND_TOLERANCE of) an end of TEMPERATURE_RANGE."""
    return any(math.isclose(temperature, end, rel_tol=BOUND_TOLERANCE) for end in TEMPERATURE_RANGE)


@dataclass(frozen=True)
class TemperatureChoice:
    """The temperature served and the fit it came from, on validation."""

    served: float  # the fitted T, or 1.0 when the fit is not trusted
    fitted: float  # the log-loss optimum in TEMPERATURE_RANGE
    errors: int  # wrong validation answers
    log_loss_before: float  # validation log-loss at T = 1
    log_loss_fitted: float  # ... at the fitted T
    note: str | None  # why the fitted T is not served; None when it is

    @property
    def at_bound(self) -> bool:
        return at_search_bound(self.fitted)


def choose_temperature(probs: np.ndarray, labels: np.ndarray, decimals: int = 3) -> TemperatureChoice:
    """Fit T on validation probabilities (rounded to `decimals`, so a rerun serves the same model)
    and serve it only when the fit can be trusted: at least MIN_VALIDATION_ERRORS wrong answers,
    not at an end of TEMPERATURE_RANGE, and validation log-loss lower by MIN_LOG_LOSS_GAIN or more.
    Otherwise T = 1, with a note that says why."""
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels)
    fitted = round(fit_temperature(logits_from_probabilities(probs), labels), decimals)
    errors = int((probs.argmax(axis=1) != labels).sum())
    before = negative_log_likelihood(probs, labels)
    after = negative_log_likelihood(temperature_scaled(probs, fitted), labels)
    reasons = []
    if errors < MIN_VALIDATION_ERRORS:
        reasons.append(f"{errors} wrong validation answer(s), fewer than the {MIN_VALIDATION_ERRORS} a fit needs")
    if at_search_bound(fitted):
        reasons.append(f"the fit ran to the end of its range ({TEMPERATURE_RANGE[0]:g} to {TEMPERATURE_RANGE[1]:g})")
    if before - after < MIN_LOG_LOSS_GAIN:
        reasons.append(f"it lowers validation log-loss by {before - after:.4f}, less than {MIN_LOG_LOSS_GAIN}")
    note = (f"fitted temperature {fitted:g} not applied: {'; '.join(reasons)}; served as the model gives them "
            "(T = 1)") if reasons else None
    return TemperatureChoice(1.0 if reasons else fitted, fitted, errors, before, after, note)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Equal-width confidence bins over (0, 1]: for each, its edges, count, mean confidence
    (top probability) and accuracy (None for an empty bin)."""
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin k holds confidences in (edges[k], edges[k+1]]; a confidence of exactly 0 cannot occur.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    out = []
    for k in range(bins):
        members = which == k
        count = int(members.sum())
        out.append({"lower": float(edges[k]), "upper": float(edges[k + 1]), "count": count,
                    "confidence": float(confidence[members].mean()) if count else None,
                    "accuracy": float(correct[members].mean()) if count else None})
    return out


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    table = reliability_bins(probs, labels, bins)
    total = sum(b["count"] for b in table)
    if total == 0:
        raise ValueError("expected_calibration_error needs at least one prediction")
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in table if b["count"]) / total)


def reliability_diagram(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str, bins: int = ECE_BINS):
    """A matplotlib Figure: one panel per entry of `curves` (name → (probs, labels)), each with
    per-bin accuracy against confidence, the diagonal of perfect calibration and the ECE."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(4.5 * len(curves), 4.5), layout="constrained")
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (name, (probs, labels)) in zip(axes, curves.items()):
        table = [b for b in reliability_bins(probs, labels, bins) if b["count"]]
        width = 1.0 / bins
        ax.bar([b["lower"] for b in table], [b["accuracy"] for b in table], width=width, align="edge",
               edgecolor="black", color="tab:blue", label="accuracy")
        ax.bar([b["lower"] for b in table], [b["confidence"] - b["accuracy"] for b in table], width=width,
               bottom=[b["accuracy"] for b in table], align="edge", color="tab:red", alpha=0.3, label="gap")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
               title=f"{name}: ECE {expected_calibration_error(probs, labels, bins):.3f}")
        ax.legend(loc="upper left", fontsize="small")
    fig.suptitle(title)
    return fig
