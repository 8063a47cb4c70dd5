"""Section `e2e`: wall time and peak host memory of the whole quick profile.

Runs `transfer-study --params params.quick.yaml pipeline --skip-data` (train every cell,
evaluate, report, register) in a subprocess, in a temporary project folder that links the real
`data/` (crops and manifest from `dvc repro split`), `references/` and `data.dvc`. Everything the
pipeline writes (checkpoints and stores, outputs/quick, artifacts) and its MLflow store (an
isolated SQLite file) stay in that folder: the project's own store and caches are not touched,
and no cached store makes the run cheaper than a first run.

Baselines: for time, the pipeline's own epoch loops (the `seconds` of every history.csv, measured
in the same run under the same load), so the ratio is the whole pipeline's cost over its
training; the note adds the estimate from the train section's img/s. For memory, the peak RSS
of a process that only imports what the CLI imports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from table import Row


def _child_env(tracking_uri: str) -> dict:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, PATH=path)


def _vm_hwm_bytes(pid: int) -> int | None:
    """Peak RSS (VmHWM) of a running process, or None once it is gone (or off Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def run_measured(command: list[str], cwd: Path, env: dict, log: Path, timeout: float) -> tuple[float, int, int]:
    """Run command; (wall seconds, exit status, its peak RSS in bytes).

    The peak is the child's own VmHWM, read every 0.1 s while it runs (a high-water mark, so only a
    spike in its last 0.1 s could be missed). Not getrusage: a child's ru_maxrss (wait4, and so
    RUSAGE_CHILDREN) starts from the RSS of the process that forked it, because exec records the
    old address space's high-water mark; from this benchmark, after training, that is over 1 GB
    whatever the child does. ru_maxrss is the fallback where /proc is missing.
    """
    started = time.perf_counter()
    peak = None
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            peak = _vm_hwm_bytes(process.pid) or peak
            if time.perf_counter() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.1)
    process.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait for it again
    return time.perf_counter() - started, process.returncode, peak or usage.ru_maxrss * 1024  # KiB on Linux


def make_project(root: Path, params_file: str, project: Path, epochs: int | None) -> Path:
    """A temporary project linking the real data; the params file copied (epochs overridden if given)."""
    project.mkdir(parents=True, exist_ok=True)
    for name in ("data", "references", "data.dvc"):
        if (root / name).exists() and not (project / name).exists():
            (project / name).symlink_to(root / name)
    text = (root / params_file).read_text()
    if epochs is not None:  # a smoke run of this section, not the quick profile's figure
        import yaml

        raw = yaml.safe_load(text)
        raw["train"].update(epochs=epochs, early_stopping=None)  # exactly that many epochs
        text = yaml.safe_dump(raw, sort_keys=False)
    (project / params_file).write_text(text)
    return project


def epoch_loop_seconds(outputs: Path) -> float | None:
    """Σ of the `seconds` column of every run's history.csv: the time spent in epoch loops."""
    import pandas as pd

    histories = sorted(outputs.glob("models/*/s*/history.csv"))
    return float(sum(pd.read_csv(h)["seconds"].sum() for h in histories)) if histories else None


def training_compute_seconds(params, train_results: dict, train_images: int) -> float | None:
    """Σ over the profile's cells of epochs × train images ÷ measured fast img/s; None if any is missing,
    or when early stopping decides the epochs (unknown before the runs)."""
    from transfer_study.cells import cells_for

    if params.train.early_stopping is not None:
        return None
    total = 0.0
    for cell in cells_for(params):
        measured = train_results.get((cell.architecture, cell.condition))
        if measured is None:
            return None
        total += params.train.epochs * train_images / measured["fast"]["img_s"]
    return total


def epochs_text(params, epochs: int | None) -> str:
    if epochs is not None:
        return f"{epochs} epochs"
    return "early stopping" if params.train.early_stopping is not None else f"{params.train.epochs} epochs"


def run(root: Path, params, params_file: str, tmp: Path, train_results: dict, train_images: int,
        timeout: float = 3600, epochs: int | None = None) -> list[Row]:
    executable = shutil.which("transfer-study", path=str(Path(sys.executable).parent))
    if executable is None:
        raise RuntimeError("the `transfer-study` command is not installed beside this Python (make venv)")
    project = make_project(root, params_file, tmp / "e2e-project", epochs)
    env = _child_env(f"sqlite:///{project / 'mlflow.db'}")
    log = tmp / "e2e.log"
    wall, status, peak = run_measured([executable, "--params", params_file, "pipeline", "--skip-data"],
                                      project, env, log, timeout)
    if status != 0:
        last = [line for line in log.read_text().splitlines() if line.strip()][-3:]
        raise RuntimeError(f"the pipeline exited with status {status} after {wall:.0f} s; see {log} "
                           f"(run with --keep); last lines: {' / '.join(last)}")
    floor_command = [sys.executable, "-c", "import mlflow, click, kornia, transfer_study.cli, transfer_study.train"]
    _, _, floor = run_measured(floor_command, project, env, tmp / "e2e-floor.log", 300)

    loops = epoch_loop_seconds(project / params.paths.outputs)
    estimate = training_compute_seconds(params, train_results, train_images) if epochs is None else None
    smoke = "" if epochs is None else f"SMOKE RUN: {epochs} epoch(s), not the profile's figure; "
    mb = 2**20
    return [
        Row("e2e", f"quick profile pipeline --skip-data ({epochs_text(params, epochs)})", "s", wall, loops,
            note=smoke + "baseline: its own epoch loops (history.csv seconds, val included)"
            + (f"; train-section estimate {estimate:.0f} s" if estimate else ""),
            extra={"log": str(log), "epoch_loops_s": loops, "train_section_estimate_s": estimate}),
        Row("e2e", "peak host memory of the pipeline", "MB", peak / mb, floor / mb,
            note="the child's VmHWM; baseline: a process that only imports the CLI's modules"),
    ]
