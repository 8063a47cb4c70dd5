"""The study profile on a GPU machine in one call under a fixed time budget: prepare the data,
measure each study cell's training throughput alone, train the study's cells (several at once
on one GPU), evaluate, report, register; then one table.

    python3 bench/gpu_study.py --budget-s 400     # on the GPU machine (bench/gpu_study.sh sets it up)
    python3 bench/gpu_study.py --smoke            # the same steps at 1 epoch, 2 batches, 32 px: checks it on a CPU

Phases, in order; once the budget is spent, nothing new starts, running cells are stopped, and
the table says what is missing:
1. data: validate → preprocess → split;
2. throughput: one architecture × condition at a time, training only, in a child process (a crash
   costs one cell, and the child restarts for the rest): the Trainer's steady-state img/s (CUDA
   graph, cudnn as in training) against the standard recipe in alternate windows, and peak GPU
   memory (bench/train_speed.py);
3. study: the cells of params.yaml, `--jobs` processes sharing the GPU; one line per cell as it
   ends (seconds per epoch: median of epochs 2..N, train + validation; the first epoch; overhead
   outside the epochs, and the part after the last one; train img/s; peak GPU memory);
4. evaluate, report, register.

Everything is written after every step, so a killed run keeps what it measured:
<work>/gpu-study.json and .md (torch, torchvision, CUDA and the GPU's name head both), the logs in
<work>/logs/; at the end also bench/results/gpu-study-<date>.{json,md}. Pretrained cells whose
torchvision weights are not on the machine use placeholder weights of the same shapes (timing
only; their accuracy means nothing), and the table says which.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
CLI = [sys.executable, "-m", "transfer_study.cli"]
SMOKE_SIZES = {"resnet18": 32, "vgg19": 32, "inception_v3": 75, "efficientnet_lite0": 32}
# Issue 10's targets for one H100/H200 (img/s of the standalone training pass, scratch cells).
THROUGHPUT_TARGETS = {"resnet18-scratch": 6000, "vgg19-scratch": 2000, "inception_v3-scratch": 2500}
RECIPE_TARGET, FROZEN_TARGET, STUDY_TARGET_S, OVERHEAD_TARGET_S = 4.0, 2.0, 180.0, 5.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=400.0, help="wall seconds for all phases together")
    p.add_argument("--throughput-share", type=float, default=0.35,
                   help="share of the budget the throughput pass may use before the study starts")
    p.add_argument("--jobs", type=int, default=6, help="study cells trained at once (1: one after another)")
    p.add_argument("--smoke", action="store_true", help="1 epoch, 2 batches, 32/75 px: check the script, not the speed")
    p.add_argument("--root", type=Path, default=REPO, help="the project folder (data/raw; outputs go here)")
    p.add_argument("--work", type=Path, help="folder for params, results and logs (default <root>/gpu-study)")
    p.add_argument("--archs", help="comma-separated: only these of params.yaml's architectures (tests)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--throughput-child", help=argparse.SUPPRESS)  # JSON: run these cells, one line each
    return p.parse_args(argv)


def environment() -> dict:
    """What every result records: versions, the device and the GPU's name."""
    import torchvision

    cuda = torch.cuda.is_available()
    return {"date": datetime.date.today().isoformat(), "host": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
            "device": "cuda" if cuda else "cpu", "gpu": torch.cuda.get_device_name(0) if cuda else None}


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# --------------------------------------------------------------------------------------------
# Set-up: weights and params
# --------------------------------------------------------------------------------------------


def placeholder_weights(folder: Path, archs: list[str]) -> list[str]:
    """A weights folder for the pretrained cells: real files where this machine has them,
    random state_dicts of the same shapes where it does not. Returns the placeholder archs."""
    from transfer_study import models
    from workspace import _random_imagenet_state

    folder.mkdir(parents=True, exist_ok=True)
    placeholders = []
    for arch in archs:
        target = folder / models.weights_file(arch)
        if target.exists():  # from an earlier call: a link to real weights, or a placeholder
            if not target.is_symlink():
                placeholders.append(arch)
            continue
        try:
            target.symlink_to(models.resolve_weights(arch, None, download=False))
        except models.WeightsMissing:
            torch.save(_random_imagenet_state(arch), target)
            placeholders.append(arch)
    return placeholders


def study_params(work: Path, smoke: bool, archs: list[str] | None) -> tuple[Path, dict, list[str]]:
    """params.yaml with the weights folder (and, for --smoke, 1 epoch of 2 batches at small sizes);
    weights for the pretrained cells of `archs` (None: all)."""
    from transfer_study.cells import pretrained_architectures
    from transfer_study.config import load_params

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    t = params["train"]
    pretrained = [a for a in pretrained_architectures(load_params(REPO / "params.yaml")) if not archs or a in archs]
    placeholders = placeholder_weights(work / "weights", pretrained)
    t["weights_dir"] = str(work / "weights")
    if smoke:
        t.update(epochs=1, max_batches_per_epoch=2, aux_logits=False)
        t["image_size"].update(SMOKE_SIZES)
        params["preprocess"]["size"] = 80
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path, params, placeholders


# --------------------------------------------------------------------------------------------
# Results: written after every step
# --------------------------------------------------------------------------------------------


class Results:
    def __init__(self, work: Path, header: dict):
        self.work, self.header = work, header
        self.throughput: list[dict] = []
        self.cells: list[dict] = []
        self.steps: dict[str, dict] = {}  # data, evaluate, report, register: seconds and status

    def say(self, line: str) -> None:
        print(f"[gpu-study {time.strftime('%H:%M:%S')}] {line}", flush=True)

    def save(self) -> None:
        data = {"header": self.header, "steps": self.steps, "throughput": self.throughput, "cells": self.cells}
        (self.work / "gpu-study.json").write_text(json.dumps(data, indent=2, default=str))
        (self.work / "gpu-study.md").write_text(markdown(data))


def markdown(data: dict) -> str:
    """The table: environment, throughput pass, study cells, steps and targets."""
    h = data["header"]
    device = h["gpu"] or "CPU"
    lines = [f"# Study profile on {device} ({h['date']}, jobs={h['jobs']}{', smoke' if h['smoke'] else ''})", "",
             f"torch {h['torch']}, torchvision {h['torchvision']}, CUDA {h['cuda']}, Python {h['python']}, "
             f"host {h['host']}; budget {h['budget_s']:.0f} s{'; ' + h['stopped'] if h.get('stopped') else ''}.", ""]
    if data["throughput"]:
        cols = ["cell", "px", "img_s", "recipe_img_s", "ratio", "peak_gpu_gib", "weights", "status"]
        lines += ["## Training throughput, one cell at a time (standard recipe in the same child)", "",
                  _table(cols, data["throughput"]), ""]
    if data["cells"]:
        cols = ["cell", "epochs", "s_per_epoch", "first_epoch_s", "overhead_s", "finish_s", "train_img_s",
                "peak_gpu_gib", "wall_s", "weights", "status"]
        lines += ["## The study's cells, trained together", "", _table(cols, data["cells"]), ""]
    steps = data["steps"]
    if steps:
        lines.append("Steps: " + "; ".join(f"{k} {v['seconds']:.1f} s ({v['status']})" for k, v in steps.items()) + ".")
    if h.get("study_wall_s") is not None:
        lines.append(f"Study wall time (cells → evaluate, report, register): **{h['study_wall_s']:.1f} s**.")
    if h["placeholders"]:
        lines.append(f"Placeholder weights (timing only): {', '.join(h['placeholders'])}.")
    if not h["smoke"]:
        lines += ["", "## Targets (issue 10, one H100/H200)", ""] + [f"- {t}" for t in targets(data)]
    return "\n".join(lines) + "\n"


def _table(cols: list[str], rows: list[dict]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join("–" if r.get(c) is None else str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def targets(data: dict) -> list[str]:
    """Each target with the measured figure and ✓/✗ (– where it was not measured)."""
    fast = {r["cell"]: r for r in data["throughput"] if r.get("img_s") is not None}

    def mark(ok) -> str:
        return "–" if ok is None else ("✓" if ok else "✗")

    lines = []
    for cell, goal in THROUGHPUT_TARGETS.items():
        value = fast.get(cell, {}).get("img_s")
        lines.append(f"{cell} ≥ {goal:,} img/s: {value if value is not None else 'not measured'} "
                     f"{mark(None if value is None else value >= goal)}")
    for cell, row in fast.items():
        lines.append(f"{cell} ≥ {RECIPE_TARGET:g}× the standard recipe: {row['ratio']}× {mark(row['ratio'] >= RECIPE_TARGET)}")
        if cell.endswith("-frozen") and cell.replace("-frozen", "-scratch") in fast:
            ratio = row["img_s"] / fast[cell.replace("-frozen", "-scratch")]["img_s"]
            lines.append(f"{cell} ≥ {FROZEN_TARGET:g}× its scratch cell: {ratio:.2f}× {mark(ratio >= FROZEN_TARGET)}")
    wall = data["header"].get("study_wall_s")
    lines.append(f"study ≤ {STUDY_TARGET_S:.0f} s: {wall if wall is not None else 'not measured'} "
                 f"{mark(None if wall is None else wall <= STUDY_TARGET_S)}")
    for row in data["cells"]:
        if row.get("finish_s") is not None:
            lines.append(f"{row['cell']} run folder and model logging ≤ {OVERHEAD_TARGET_S:g} s: {row['finish_s']} s "
                         f"{mark(row['finish_s'] <= OVERHEAD_TARGET_S)}")
    return lines


# --------------------------------------------------------------------------------------------
# Phase 1 and 4: pipeline stages
# --------------------------------------------------------------------------------------------


def run_stage(name: str, args: list[str], root: Path, logs: Path, results: Results, deadline: Deadline) -> bool:
    """Run one CLI stage with its output in logs/<name>.log; record its seconds and status."""
    started = time.perf_counter()
    status = "ok"
    if deadline.left() <= 0:
        status = "not run: budget spent"
    else:
        with open(logs / f"{name}.log", "w") as out:
            try:
                code = subprocess.run(CLI + args, cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                      timeout=deadline.left()).returncode
                status = "ok" if code == 0 else f"failed ({code}; logs/{name}.log)"
            except subprocess.TimeoutExpired:
                status = "stopped: budget spent"
    results.steps[name] = {"seconds": round(time.perf_counter() - started, 1), "status": status}
    results.say(f"{name}: {status} in {results.steps[name]['seconds']} s")
    results.save()
    return status == "ok"


# --------------------------------------------------------------------------------------------
# Phase 2: throughput, one cell at a time, in a child process
# --------------------------------------------------------------------------------------------


def throughput_child(spec: dict) -> int:
    """Measure spec's cells in this process, printing one JSON line per cell as it ends."""
    import train_speed
    from workspace import BatchPlan, Workspace

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plan = BatchPlan(**spec["plan"])
    deadline = time.monotonic() + spec["seconds"]
    with tempfile.TemporaryDirectory(prefix="gpu-study-throughput-") as tmp:
        ws = Workspace(Path(spec["root"]), device, "study", list(dict.fromkeys(a for a, _ in spec["cells"])),
                       sorted({c for _, c in spec["cells"]}), plan, Path(tmp), Path(spec["weights_dir"]),
                       params_file=Path(spec["params"]))
        for arch, condition in spec["cells"]:
            row = {"cell": f"{arch}-{condition}", "px": ws.size_of(arch)}
            if time.monotonic() > deadline:
                row["status"] = "not measured: budget spent"
            else:
                try:
                    _, result = train_speed.measure_cell(ws, arch, condition)
                    fast, base = result["fast"], result["baseline"]
                    row.update(img_s=round(fast["img_s"]), recipe_img_s=round(base["img_s"]),
                               ratio=round(fast["img_s"] / base["img_s"], 2), status="ok",
                               peak_gpu_gib=None if fast["gpu_peak_bytes"] is None
                               else round(fast["gpu_peak_bytes"] / 2**30, 2),
                               windows=fast["windows"], recipe_windows=base["windows"])
                except Exception as exc:  # noqa: BLE001 - the next cell is still measured
                    row["status"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
            print(json.dumps(row), flush=True)
    return 0


def throughput_pass(cells: list[tuple[str, str]], params_file: Path, root: Path, work: Path, smoke: bool,
                    results: Results, deadline: Deadline, placeholders: list[str]) -> None:
    """Run throughput_child on the cells not yet reported, again after a crash, until all report."""
    plan = {"warmup": 1, "batches": 2, "windows": 1} if smoke else {"warmup": 10, "batches": 20, "windows": 2}
    pending = list(cells)
    with open(work / "logs" / "throughput.log", "a") as log:
        while pending:
            spec = {"cells": pending, "params": str(params_file), "root": str(root), "plan": plan,
                    "weights_dir": str(work / "weights"), "seconds": deadline.left()}
            child = subprocess.Popen([sys.executable, __file__, "--throughput-child", json.dumps(spec)],
                                     cwd=root, stdout=subprocess.PIPE, stderr=log, text=True)
            for line in child.stdout:
                if not line.startswith("{"):
                    continue
                row = json.loads(line)
                row["weights"] = _weights(row["cell"], placeholders)
                results.throughput.append(row)
                pending = [c for c in pending if f"{c[0]}-{c[1]}" != row["cell"]]
                results.say(f"throughput {row['cell']}: {row.get('img_s', '–')} img/s vs "
                            f"{row.get('recipe_img_s', '–')} (recipe), {row['status']}")
                results.save()
            code = child.wait()
            if not pending:
                break
            # The child died: in the middle of a cell (that cell fails, the rest go on in a new child),
            # or before its first cell, in its set-up (then every cell would fail alike).
            failed = pending if len(pending) == len(spec["cells"]) else pending[:1]
            for arch, condition in failed:
                results.throughput.append({"cell": f"{arch}-{condition}", "status":
                                           f"failed: the child process exited ({code}); logs/throughput.log"})
            pending = pending[len(failed):]
            results.save()


def _weights(cell: str, placeholders: list[str]) -> str:
    arch, condition = cell.rsplit("-", 1)
    return "-" if condition == "scratch" else ("placeholder" if arch in placeholders else "imagenet")


# --------------------------------------------------------------------------------------------
# Phase 3: the study's cells, several at once
# --------------------------------------------------------------------------------------------


def train_cells(cells: list, params_file: Path, params: dict, root: Path, work: Path, jobs: int,
                results: Results, deadline: Deadline, placeholders: list[str]) -> None:
    """Train the cells, `jobs` at a time, each in its own process; a row per cell as it ends."""
    pending, running, stopped = list(cells), {}, set()
    while pending or running:
        while pending and len(running) < jobs and deadline.left() > 0:
            cell = pending.pop(0)
            log = open(work / "logs" / f"train-{cell.group}.log", "w")
            cmd = CLI + ["--params", str(params_file), "train", "--arch", cell.architecture,
                         "--condition", cell.condition]
            running[cell] = (subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT),
                             time.perf_counter(), log)
        if not running:
            break
        for cell, (process, started, log) in list(running.items()):
            if process.poll() is None:
                if deadline.left() <= 0 and cell not in stopped:
                    stopped.add(cell)
                    process.send_signal(signal.SIGINT)  # Ctrl-C: the run is marked KILLED, resumable
                    try:
                        process.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        process.kill()
                continue
            log.close()
            del running[cell]
            row = cell_row(cell, time.perf_counter() - started, process.returncode, params, root, work, placeholders)
            if cell in stopped:
                row["status"] = "stopped: budget spent"
            results.cells.append(row)
            results.say(f"cell {row['cell']}: {row['status']} in {row['wall_s']} s; {row.get('epochs') or 0} epochs, "
                        f"{row.get('s_per_epoch', '–')} s/epoch, {row.get('train_img_s', '–')} img/s, "
                        f"after the last epoch {row.get('finish_s', '–')} s, peak GPU {row.get('peak_gpu_gib', '–')} GiB")
            results.save()
        time.sleep(0.2)
    for cell in pending:
        results.cells.append({"cell": cell.group, "status": "not run: budget spent"})
    results.save()


def cell_row(cell, wall: float, code: int, params: dict, root: Path, work: Path, placeholders: list[str]) -> dict:
    """One table row from the cell's history.csv and log lines (as far as they got)."""
    from transfer_study.runs import run_dir_for

    row = {"cell": cell.group, "wall_s": round(wall, 1), "weights": _weights(cell.group, placeholders),
           "status": "ok" if code == 0 else f"failed ({code}; logs/train-{cell.group}.log)"}
    log = (work / "logs" / f"train-{cell.group}.log").read_text(errors="replace")
    peak = re.search(r"peak GPU memory ([\d.]+) GiB", log)
    finish = re.search(r"run folder written and model logged in ([\d.]+)s", log)
    row.update(peak_gpu_gib=float(peak.group(1)) if peak else None, finish_s=float(finish.group(1)) if finish else None)
    history = run_dir_for(root / params["paths"]["outputs"] / "models", cell.group, cell.variant) / "history.csv"
    if code == 0 and history.is_file():
        import pandas as pd

        seconds = pd.read_csv(history)["seconds"].tolist()
        epoch_s = statistics.median(seconds[1:] or seconds)
        manifest = pd.read_csv(root / params["paths"]["manifest"])
        row.update(epochs=len(seconds), s_per_epoch=round(epoch_s, 3), first_epoch_s=round(seconds[0], 2),
                   overhead_s=round(wall - sum(seconds), 1),
                   train_img_s=round(int((manifest["split"] == "train").sum()) / epoch_s))
    return row


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.throughput_child:
        return throughput_child(json.loads(args.throughput_child))
    from transfer_study.cells import cells_for
    from transfer_study.config import load_params

    deadline = Deadline(args.budget_s)
    root = args.root.resolve()
    work = (args.work or root / "gpu-study").resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    header = environment() | {"jobs": args.jobs, "smoke": args.smoke, "budget_s": args.budget_s, "placeholders": []}
    results = Results(work, header)
    results.say(f"torch {header['torch']}, torchvision {header['torchvision']}, CUDA {header['cuda']}, "
                f"GPU {header['gpu'] or 'none (CPU)'}; budget {args.budget_s:.0f} s")
    archs = args.archs.split(",") if args.archs else None
    params_file, params, header["placeholders"] = study_params(work, args.smoke, archs)
    results.save()
    data_ok = all(run_stage(name, ["--params", str(params_file)] + step, root, work / "logs", results, deadline)
                  for name, step in (("validate", ["data", "validate"]), ("preprocess", ["preprocess"]),
                                     ("split", ["split"])))
    cells = [c for c in cells_for(load_params(params_file)) if not archs or c.architecture in archs]
    if data_ok and not args.skip_throughput:
        groups = list(dict.fromkeys((c.architecture, c.condition) for c in cells))
        share = Deadline(min(deadline.left(), args.throughput_share * args.budget_s))
        throughput_pass(groups, params_file, root, work, args.smoke, results, share, header["placeholders"])
    if data_ok:
        started = time.perf_counter()
        train_cells(cells, params_file, params, root, work, args.jobs, results, deadline, header["placeholders"])
        for stage in ("evaluate", "report", "register"):
            run_stage(stage, ["--params", str(params_file), stage], root, work / "logs", results, deadline)
        if all(r["status"] == "ok" for r in results.cells) and all(s["status"] == "ok" for s in results.steps.values()):
            header["study_wall_s"] = round(time.perf_counter() - started, 1)
    if deadline.left() <= 0:
        header["stopped"] = "the budget ran out: rows marked 'budget' are missing"
    results.save()
    text = (work / "gpu-study.md").read_text()
    print(text)
    stem = root / "bench" / "results" / f"gpu-study-{header['date']}{'-smoke' if args.smoke else ''}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text((work / "gpu-study.json").read_text())
    # A budget that ran out is a clean stop (the table says what is missing); a failure is not.
    failed = [r for r in results.cells + results.throughput + list(results.steps.values())
              if r["status"].startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
