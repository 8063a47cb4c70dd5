"""One row per measured figure, and the single markdown table (and JSON) they make."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Row:
    """One figure of one section, next to its baseline measured in the same invocation.

    `ratio` is always value ÷ baseline: above 1 is better for a rate (img/s, req/s), below 1 for
    a time or a memory figure.
    """

    section: str
    measure: str
    unit: str
    value: float | None
    baseline: float | None = None
    target: str = ""  # e.g. "≥ 3×"
    met: bool | None = None  # whether the target holds; None where there is none
    note: str = ""
    extra: dict = field(default_factory=dict)  # raw figures for the JSON (windows, memory ...)

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline or _nan(self.value) or _nan(self.baseline):
            return None
        return self.value / self.baseline


def _nan(x: float) -> bool:
    return isinstance(x, float) and math.isnan(x)


def fmt(x: float | None) -> str:
    """Three significant figures, thousands separated; '–' for a missing figure."""
    if x is None or _nan(x):
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def markdown_table(rows: list[Row]) -> str:
    """Every row in one markdown table, in section order."""
    lines = [
        "| section | measure | unit | value | baseline | ratio | target | note |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        ratio = "–" if r.ratio is None else f"{fmt(r.ratio)}×"
        target = r.target + ("" if r.met is None else (" ✓" if r.met else " ✗"))
        note = " ".join(r.note.split()).replace("|", "/")  # one line, no cell breaks
        lines.append(f"| {r.section} | {r.measure} | {r.unit} | {fmt(r.value)} | {fmt(r.baseline)} | {ratio} "
                     f"| {target} | {note} |")
    return "\n".join(lines)


def write_json(path: Path, machine: dict, settings: dict, rows: list[Row]) -> None:
    """The same figures as the table, plus the raw ones, for comparing machines later."""
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [dataclasses.asdict(r) | {"ratio": r.ratio} for r in rows]
    path.write_text(json.dumps({"machine": machine, "settings": settings, "rows": records}, indent=2, default=str))
