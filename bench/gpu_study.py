"""The whole study profile on this machine, timed: prepare the data, train the six study cells
(several at once on one GPU), evaluate, report, register; then print one table.

    python3 bench/gpu_study.py                 # on the GPU machine (bench/gpu_study.sh sets it up)
    python3 bench/gpu_study.py --smoke         # the same steps at 1 epoch and 32 px: checks the script on a CPU

Per cell: seconds per epoch (median of epochs 2..N, train + validation), the first epoch,
overhead (process start to first epoch plus last epoch to exit), training img/s (train images
÷ median epoch seconds, so validation counts against it), peak GPU memory; and the study's
wall time from the first cell's start to registration. Pretrained cells whose torchvision
weights are not on the machine use placeholder weights of the same shapes (timing only; their
accuracy means nothing), and the table says so. Results: bench/results/gpu-study-<date>.json/.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
CLI = [sys.executable, "-m", "transfer_study.cli"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=6, help="cells trained at once (1: one after another)")
    p.add_argument("--smoke", action="store_true", help="1 epoch at 32/75 px: check the script, not the speed")
    p.add_argument("--work", type=Path, default=ROOT / "gpu-study", help="folder for params, logs and outputs")
    p.add_argument("--cell-timeout", type=float, default=420.0)
    return p.parse_args(argv)


def placeholder_weights(folder: Path, archs: list[str]) -> list[str]:
    """A weights folder for the pretrained cells: real files where this machine has them,
    random state_dicts of the same shapes where it does not. Returns the placeholder archs."""
    from transfer_study import models
    from workspace import _random_imagenet_state

    folder.mkdir(parents=True, exist_ok=True)
    placeholders = []
    for arch in archs:
        target = folder / models.weights_file(arch)
        if target.exists():
            continue
        try:
            target.symlink_to(models.resolve_weights(arch, None, download=False))
        except models.WeightsMissing:
            torch.save(_random_imagenet_state(arch), target)
            placeholders.append(arch)
    return placeholders


def study_params(work: Path, smoke: bool) -> tuple[Path, dict, list[str]]:
    """params.yaml with the weights folder (and, for --smoke, 1 epoch at small sizes)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    t = params["train"]
    pretrained = [a for a in t["architectures"] if any(c != "scratch" for c in t["conditions"])]
    placeholders = placeholder_weights(work / "weights", pretrained)
    t["weights_dir"] = str(work / "weights")
    if smoke:
        t.update(epochs=1, max_batches_per_epoch=2, aux_logits=False,
                 image_size={"resnet18": 32, "vgg19": 32, "inception_v3": 75, "efficientnet_lite0": 32})
        params["preprocess"]["size"] = 80
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path, params, placeholders


def run(cmd: list[str], log: Path, timeout: float) -> float:
    """Run a command with its output in `log`; raise with the log's tail on failure. Returns seconds."""
    started = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed ({code}); its log {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started


def train_cells(cells: list[tuple[str, str]], params_file: Path, work: Path, jobs: int,
                timeout: float) -> dict[str, float]:
    """Train the cells, `jobs` at a time, each in its own process; returns each cell's wall seconds."""
    pending, running, walls = list(cells), {}, {}
    deadline = time.perf_counter() + timeout * max(1, len(cells))
    while pending or running:
        while pending and len(running) < jobs:
            arch, condition = pending.pop(0)
            log = open(work / f"train-{arch}-{condition}.log", "w")
            cmd = CLI + ["--params", str(params_file), "train", "--arch", arch, "--condition", condition]
            running[(arch, condition)] = (subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT),
                                          time.perf_counter(), log)
        for key, (process, started, log) in list(running.items()):
            if process.poll() is None:
                if time.perf_counter() > deadline:
                    process.kill()
                continue
            log.close()
            del running[key]
            if process.returncode != 0:
                text = (work / f"train-{key[0]}-{key[1]}.log").read_text()
                sys.exit(f"cell {key} failed ({process.returncode}):\n{text[-3000:]}")
            walls[f"{key[0]}-{key[1]}"] = time.perf_counter() - started
        time.sleep(0.2)
    return walls


def cell_row(arch: str, condition: str, wall: float, work: Path, outputs: Path, num_train: int,
             placeholders: list[str]) -> dict:
    """One table row from the cell's history.csv and log lines."""
    history = pd.read_csv(outputs / "models" / f"{arch}-{condition}" / "s0" / "history.csv")
    seconds = history["seconds"].tolist()
    later = seconds[1:] or seconds
    log = (work / f"train-{arch}-{condition}.log").read_text()
    peak = re.search(r"peak GPU memory ([\d.]+) GiB", log)
    epoch_s = statistics.median(later)
    return {
        "cell": f"{arch}-{condition}", "epochs": len(seconds), "s_per_epoch": round(epoch_s, 3),
        "first_epoch_s": round(seconds[0], 2), "overhead_s": round(wall - sum(seconds), 1),
        "train_img_s": round(num_train / epoch_s), "peak_gpu_gib": float(peak.group(1)) if peak else None,
        "wall_s": round(wall, 1),
        "weights": "placeholder" if condition != "scratch" and arch in placeholders else
                   ("imagenet" if condition != "scratch" else "-"),
    }


def markdown(rows: list[dict], header: dict) -> str:
    cols = ["cell", "epochs", "s_per_epoch", "first_epoch_s", "overhead_s", "train_img_s", "peak_gpu_gib",
            "wall_s", "weights"]
    lines = [f"# Study profile on {header['device']} ({header['date']}, jobs={header['jobs']})", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("–" if r[c] is None else str(r[c]) for c in cols) + " |" for r in rows]
    lines += ["", f"Study wall time (data prepared → six cells → evaluate, report, register): "
                  f"**{header['study_wall_s']:.1f} s** (training {header['train_wall_s']:.1f} s, "
                  f"evaluate+report+register {header['after_s']:.1f} s); data preparation {header['data_s']:.1f} s."]
    if header["placeholders"]:
        lines.append(f"Placeholder weights (timing only): {', '.join(header['placeholders'])}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    params_file, params, placeholders = study_params(work, args.smoke)
    outputs = ROOT / params["paths"]["outputs"]
    data_s = 0.0
    for step in (["data", "validate"], ["preprocess"], ["split"]):
        data_s += run(CLI + ["--params", str(params_file)] + step, work / f"{step[0]}.log", 900)
    t = params["train"]
    cells = [(a, c) for a in t["architectures"] for c in t["conditions"] if f"{a}-{c}" not in t["exclude"]]
    manifest = pd.read_csv(ROOT / params["paths"]["manifest"])
    num_train = int((manifest["split"] == "train").sum())
    started = time.perf_counter()
    walls = train_cells(cells, params_file, work, args.jobs, args.cell_timeout)
    train_wall = time.perf_counter() - started
    after = sum(run(CLI + ["--params", str(params_file), stage], work / f"{stage}.log", 600)
                for stage in ("evaluate", "report", "register"))
    study_wall = time.perf_counter() - started
    rows = [cell_row(a, c, walls[f"{a}-{c}"], work, outputs, num_train, placeholders) for a, c in cells]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    header = {"device": device, "date": datetime.date.today().isoformat(), "jobs": args.jobs,
              "smoke": args.smoke, "study_wall_s": study_wall, "train_wall_s": train_wall,
              "after_s": after, "data_s": data_s, "placeholders": placeholders, "torch": torch.__version__}
    text = markdown(rows, header)
    print(text)
    results = BENCH / "results"
    results.mkdir(exist_ok=True)
    stem = results / f"gpu-study-{header['date']}{'-smoke' if args.smoke else ''}"
    stem.with_suffix(".json").write_text(json.dumps({"header": header, "cells": rows}, indent=2))
    stem.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
