"""Section `train`: training throughput (images/s) per architecture × condition.

Fast path: `transfer_study.trainer.Trainer.train_epoch` fed by `DeviceImages.batches`, as
`train_cell` runs them (uint8 store resident in GPU memory, batches gathered on the device,
per-sample augmentation drawn on the device, no per-step host sync, fused Adam, bf16 autocast,
channels_last, the step captured as a CUDA graph on CUDA; frozen backbone under no_grad). Baseline: bench/baseline.py's standard recipe on the same train rows.

Both are measured in steady state: each timed window follows untimed warm-up batches, and
fast and baseline windows alternate; the median window is reported. Peak GPU memory is taken
over one extra window of each path run alone.
"""

from __future__ import annotations

import traceback

import torch

from baseline import StandardTrainer, standard_loader, standard_transform, train_folder
from table import Row
from timing import SteadyStateBatches, alternate_windows, progress
from transfer_study.cells import Cell
from transfer_study.config import SCRATCH_ONLY
from transfer_study.train import seed_everything
from transfer_study.trainer import Trainer
from workspace import BATCH_SIZE, Workspace, epoch_batches


def fast_runner(ws: Workspace, arch: str, condition: str):
    """A function timing one window of the project's Trainer (a fresh epoch loader each call)."""
    seed_everything(0)
    data = ws.training_data(ws.size_of(arch))
    trainer = Trainer(ws.train_params(arch), Cell(arch, condition, 0), len(data.class_names), ws.device)
    images, rows = data.on_device(ws.device), data.rows("train")
    epochs = iter(range(1, 1_000_000))

    def loader():  # a new epoch's batches, as train_cell makes them
        return epoch_batches(images, rows, next(epochs))

    def window() -> float:
        batches = SteadyStateBatches(loader, ws.plan.warmup, ws.plan.batches, 1, ws.device)
        trainer.train_epoch(batches, None)
        return batches.result()

    return window


def baseline_runner(ws: Workspace, arch: str, condition: str):
    """A function timing one window of the standard recipe on the same rows and size."""
    seed_everything(0)
    params = ws.train_params(arch)
    dataset = train_folder(ws.cropped, ws.root, ws.manifest, standard_transform(ws.size_of(arch), params.train.augment))
    trainer = StandardTrainer(params, arch, condition, len(ws.class_names), ws.device)

    def window() -> float:
        # A new loader each window: its 2 workers start during the untimed warm-up batches.
        batches = SteadyStateBatches(lambda: standard_loader(dataset, BATCH_SIZE), ws.plan.warmup,
                                     ws.plan.batches, 1, ws.device)
        for images, labels in batches:
            trainer.step(images, labels)
        return batches.result()

    return window


def _gpu_peak_of(ws: Workspace, make_window) -> tuple[object, int | None]:
    """Build a runner and run one window alone (also a warm-up), returning the runner and the
    peak GPU memory it added above what was allocated before (the other path's model)."""
    if ws.device.type != "cuda":
        window = make_window()
        window()
        return window, None
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(ws.device)
    torch.cuda.reset_peak_memory_stats(ws.device)
    window = make_window()
    window()
    return window, torch.cuda.max_memory_allocated(ws.device) - before


def measure_cell(ws: Workspace, arch: str, condition: str) -> tuple[Row, dict]:
    """One architecture × condition: the fast path and the standard recipe in alternate windows."""
    ws.training_data(ws.size_of(arch))  # built outside the timing (the data section reports it)
    fast_window, fast_gpu = _gpu_peak_of(ws, lambda: fast_runner(ws, arch, condition))
    base_window, base_gpu = _gpu_peak_of(ws, lambda: baseline_runner(ws, arch, condition))
    fast, base = alternate_windows(fast_window, base_window, ws.plan.windows)
    fast["gpu_peak_bytes"], base["gpu_peak_bytes"] = fast_gpu, base_gpu
    del fast_window, base_window  # free both models before the next cell
    result = {"fast": fast, "baseline": base, "size": ws.size_of(arch)}
    progress(f"train {arch} {condition}: {fast['img_s']:.0f} vs {base['img_s']:.0f} img/s")
    notes = []
    if condition != "scratch" and arch in ws.placeholder_weights:
        notes.append("placeholder weights (same shapes)")
    if fast["gpu_peak_bytes"] is not None:
        notes.append(f"peak GPU {fast['gpu_peak_bytes'] / 2**30:.2f} GiB "
                     f"(baseline {base['gpu_peak_bytes'] / 2**30:.2f})")
    if fast.get("cpu_ms_per_img") is not None:
        notes.append(f"CPU time {fast['cpu_ms_per_img']:.1f} vs {base['cpu_ms_per_img']:.1f} ms/img")
    spread = f"windows {min(fast['windows']):.0f}–{max(fast['windows']):.0f}"
    row = Row("train", f"{arch} {condition} {ws.size_of(arch)} px", "img/s", fast["img_s"], base["img_s"],
              note="; ".join([spread] + notes), extra={"fast": fast, "baseline": base})
    return row, result


def run(ws: Workspace) -> tuple[list[Row], dict]:
    """Rows of the section, and {(arch, condition): {"fast": ..., "baseline": ...}} for others.
    A cell that fails becomes a row saying why; the other cells are still measured."""
    rows, results = [], {}
    for arch in ws.archs:
        for condition in ws.conditions:
            if condition != "scratch" and arch in SCRATCH_ONLY:
                continue  # no ImageNet weights: no such cell in any profile
            try:
                row, results[(arch, condition)] = measure_cell(ws, arch, condition)
            except Exception as exc:  # noqa: BLE001 - one broken cell must not hide the others
                traceback.print_exc()
                row = Row("train", f"{arch} {condition} {ws.size_of(arch)} px", "img/s", None,
                          note=f"failed: {type(exc).__name__}: {exc}"[:300])
            rows.append(row)
    return rows, results
