"""Regenerate requirements.lock and conda.yaml from the current virtual environment.

Usage: .venv/bin/python scripts/lock.py   (or `make lock`)
conda.yaml carries the same pins as requirements.lock, so `mlflow run` without
`--env-manager local` builds the environment the tests ran in.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = (
    "# Pinned with 'pip freeze' on Python 3.11 (Linux x86_64); installs on 3.11 and 3.12. torch is PyPI's\n"
    "# ordinary CUDA build, which runs on CPU (see DEVELOPERS.md). Regenerate: make lock\n"
)


def main() -> None:
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    pins = sorted((line for line in frozen if "==" in line and not line.startswith("-e")), key=str.lower)
    (ROOT / "requirements.lock").write_text(HEADER + "\n".join(pins) + "\n")
    conda = ["# Generated from requirements.lock by scripts/lock.py; do not edit by hand.",
             "name: transfer-study", "channels:", "  - conda-forge", "dependencies:",
             "  - python=3.11", "  - pip", "  - pip:"]
    conda += [f"      - {pin}" for pin in pins]
    (ROOT / "conda.yaml").write_text("\n".join(conda) + "\n")
    print(f"{len(pins)} pins written to requirements.lock and conda.yaml")


if __name__ == "__main__":
    main()
