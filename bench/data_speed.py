"""Section `data`: the data pipeline alone (decode + augment, no model), images/s.

Fast path: gather uint8 rows of the store where training keeps it (imagestore.DeviceImages, as
`train_cell` does: no workers), DeviceAugment and normalisation on the device. Baseline: ImageFolder + PIL transforms in 2 workers (bench/baseline.py), batches copied to
the device. Both end with a normalised float batch on the training device.

Fast and baseline windows alternate, as in the train section. Also reported: the one-off
store build, and the data/model ratio (pipeline img/s ÷ training img/s of the same path), whose
target is ≥ 3×: the data path is then never the bottleneck.
"""

from __future__ import annotations

import torch

from baseline import standard_loader, standard_transform, train_folder
from table import Row
from timing import SteadyStateBatches, alternate_windows
from transfer_study import transforms
from transfer_study.trainer import channels_last_on
from workspace import BATCH_SIZE, BatchPlan, Workspace, epoch_batches

DATA_MODEL_TARGET = 3.0


def _plan(ws: Workspace) -> BatchPlan:
    # Windows of about one epoch (1,260 train images = 40 batches): the pipeline alone is fast,
    # and a short window would mostly time the clock.
    return BatchPlan(warmup=max(3, ws.plan.warmup), batches=min(40, 5 * ws.plan.batches), windows=ws.plan.windows)


def fast_pipeline_window(ws: Workspace, size: int):
    """A function timing one window of the fast pipeline (a fresh epoch loader each call)."""
    data = ws.training_data(size)
    augment = transforms.DeviceAugment(ws.params.train.augment)
    images, rows = data.on_device(ws.device), data.rows("train")
    channels_last = channels_last_on(ws.device)
    epochs = iter(range(1, 1_000_000))
    plan = _plan(ws)

    def window() -> float:
        batches = SteadyStateBatches(
            lambda: epoch_batches(images, rows, next(epochs)),
            plan.warmup, plan.batches, 1, ws.device)
        with torch.no_grad():
            for images_u8, _labels in batches:
                transforms.normalize(augment(transforms.to_model_input(images_u8, ws.device, channels_last)))
        return batches.result()

    return window


def baseline_pipeline_window(ws: Workspace, size: int):
    """A function timing one window of ImageFolder + PIL transforms in 2 workers."""
    dataset = train_folder(ws.cropped, ws.root, ws.manifest, standard_transform(size, ws.params.train.augment))
    plan = _plan(ws)

    def window() -> float:
        batches = SteadyStateBatches(lambda: standard_loader(dataset, BATCH_SIZE), plan.warmup, plan.batches, 1,
                                     ws.device)
        for images, labels in batches:
            images.to(ws.device), labels.to(ws.device)
        return batches.result()

    return window


def run(ws: Workspace) -> tuple[list[Row], dict]:
    """Rows per image size used by the benchmarked architectures; {size: {"fast", "baseline"}}."""
    rows, results = [], {}
    for size in sorted({ws.size_of(a) for a in ws.archs}):
        ws.training_data(size)  # the one-off store build, timed by the workspace
        fast_window, base_window = fast_pipeline_window(ws, size), baseline_pipeline_window(ws, size)
        fast_window()  # warm-up: kornia's first call, the page cache
        fast, base = alternate_windows(fast_window, base_window, ws.plan.windows)
        results[size] = {"fast": fast, "baseline": base}
        rows.append(Row("data", f"pipeline alone {size} px", "img/s", fast["img_s"], base["img_s"],
                        note="fast: store gather + DeviceAugment, no workers; baseline: 2 workers + PIL",
                        extra={"fast": fast, "baseline": base}))
        images = len(ws.manifest)
        baseline_epoch = images / base["img_s"]
        rows.append(Row("data", f"store build, once ({images:,} images, {size} px)", "s", ws.store_seconds[size],
                        baseline_epoch, note="baseline: one standard-recipe pass over the same images"))
    return rows, results


def data_model_rows(train_results: dict, data_results: dict) -> list[Row]:
    """Pipeline img/s ÷ training img/s, per trained cell, for each path; target ≥ 3× (fast path)."""
    rows = []
    for (arch, condition), r in train_results.items():
        pipeline = data_results.get(r["size"])
        if pipeline is None:
            continue
        fast = pipeline["fast"]["img_s"] / r["fast"]["img_s"]
        base = pipeline["baseline"]["img_s"] / r["baseline"]["img_s"]
        rows.append(Row("data", f"data/model ratio {arch} {condition}", "×", fast, base,
                        target=f"≥ {DATA_MODEL_TARGET:g}×", met=fast >= DATA_MODEL_TARGET,
                        note="pipeline img/s ÷ training img/s"))
    return rows
