"""Section `scale`: cost of the fast path as the dataset grows.

For each dataset size (6 classes × per_class Fashion-MNIST garments, fetched with
`transfer_study.data.fetch_dataset` into a temporary folder), a fresh child process builds the
uint8 store straight from the raw PNGs (the crop stage is skipped: its cost is per image too),
runs one epoch of the data pipeline over every image, and optionally one epoch of frozen-head
training. A child per size keeps each peak-memory figure its own.

Baseline: the smallest size, measured in the same invocation. Times are compared with a linear
extrapolation from it (ratio ≈ 1 means linear); memory should stay flat beyond the store,
because the store is a memmap: its file pages count in peak RSS once read, but they are page
cache the kernel can drop, whereas anonymous memory (heap, tensors) is what must not grow.

Fashion-MNIST's train set has 6,000 images per class, so 6 classes give at most 36,000
(42,000 with the test set, which fetch_dataset does not read); that is the largest size here.

Run as a script with --child, it is that child (one size) and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
MAX_PER_CLASS = 6000  # Fashion-MNIST train images per class


# --------------------------------------------------------------------------------------------
# The child: one dataset size
# --------------------------------------------------------------------------------------------

def _labelled_paths(raw: Path) -> tuple[list[Path], np.ndarray]:
    paths = sorted(raw.rglob("*.png"))
    names = sorted({p.parent.name for p in paths})
    return paths, np.array([names.index(p.parent.name) for p in paths])


def measure_one_size(raw: Path, size: int, work: Path, device: torch.device, train: bool, repeats: int) -> dict:
    """Store build and one data-pipeline epoch over `raw` (median of `repeats` each), and if `train`
    one frozen-head epoch. Peak anonymous memory is taken per phase: build, then epochs."""
    from timing import PeakAnonymousMemory, anonymous_rss_bytes, peak_rss_bytes, sync
    from workspace import epoch_batches
    from transfer_study import imagestore, transforms
    from transfer_study.config import AugmentParams

    paths, labels = _labelled_paths(raw)
    anon_after_import = anonymous_rss_bytes() or 0
    result = {"images": len(paths), "size": size, "anon_after_import_bytes": anon_after_import}

    cuda = device.type == "cuda"
    with PeakAnonymousMemory() as build_memory:
        build_times = []
        for attempt in range(repeats):  # a fresh folder each time, so no build is a cache hit
            started = time.perf_counter()
            # The key only names the cache file; the folder is fresh, so names are enough.
            store = imagestore.build_store(paths, [p.name for p in paths], size, work / f"stores-{attempt}")
            build_times.append(time.perf_counter() - started)
            if attempt < repeats - 1:
                shutil.rmtree(work / f"stores-{attempt}")
    result["store_s"], result["store_s_all"] = statistics.median(build_times), build_times
    result["store_bytes"] = int(store.nbytes)

    with PeakAnonymousMemory() as epoch_memory:
        images = imagestore.DeviceImages(store, labels, device)
        rows = np.arange(len(labels))
        augment = transforms.DeviceAugment(AugmentParams())
        epoch_times = []
        for epoch in range(repeats):
            started = time.perf_counter()
            with torch.no_grad():
                for images_u8, _batch_labels in epoch_batches(images, rows, epoch):
                    transforms.normalize(augment(transforms.to_model_input(images_u8, device, cuda)))
            sync(device)
            epoch_times.append(time.perf_counter() - started)
        result["epoch_s"], result["epoch_s_all"] = statistics.median(epoch_times), epoch_times
        if train:
            result |= _frozen_head_epoch(store, labels, size, device, work)
    result["peak_anon_build_bytes"] = max(build_memory.peak_bytes, anon_after_import)
    result["peak_anon_epoch_bytes"] = max(epoch_memory.peak_bytes, anon_after_import)
    result["peak_rss_bytes"] = peak_rss_bytes()
    if device.type == "cuda":
        result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def _frozen_head_epoch(store, labels, size: int, device: torch.device, work: Path) -> dict:
    """One epoch of Lite0-frozen training through the project's Trainer over every image."""
    import dataclasses

    from timing import sync
    from transfer_study import imagestore, models
    from workspace import epoch_batches
    from transfer_study.config import Params
    from transfer_study.cells import Cell
    from transfer_study.trainer import Trainer

    weights_dir = None
    try:
        models.resolve_weights("efficientnet_lite0", None, download=False)
    except models.WeightsMissing:  # throughput does not depend on the values (see workspace.py)
        weights_dir = work / "weights"
        weights_dir.mkdir(parents=True, exist_ok=True)
        torch.save(models.EfficientNetLite0().state_dict(), weights_dir / models.LITE0_WEIGHTS_FILE)
    params = Params()
    params = dataclasses.replace(params, train=dataclasses.replace(
        params.train, image_size={"efficientnet_lite0": size}, batch_size=32,
        weights_dir=str(weights_dir) if weights_dir else None))
    trainer = Trainer(params, Cell("efficientnet_lite0", "frozen", 0), int(labels.max()) + 1, device)
    cuda = device.type == "cuda"
    batches = epoch_batches(imagestore.DeviceImages(store, labels, device), np.arange(len(labels)), 1)
    started = time.perf_counter()
    trainer.train_epoch(batches, None)
    sync(device)
    return {"train_s": time.perf_counter() - started}


# --------------------------------------------------------------------------------------------
# The parent: every size, rows of the table
# --------------------------------------------------------------------------------------------

def fetch(per_class: int, dest: Path, source: Path | None) -> float:
    """Write 6 × per_class Fashion-MNIST PNGs to dest (seed 0); seconds taken."""
    from transfer_study.config import DataParams
    from transfer_study.data import fetch_dataset

    started = time.perf_counter()
    fetch_dataset(dest, DataParams(per_class=per_class), source=source)
    return time.perf_counter() - started


def run_child(raw: Path, size: int, work: Path, device: str, train: bool, repeats: int) -> dict:
    """One size in a fresh interpreter; its JSON result."""
    command = [sys.executable, str(BENCH_DIR / "scaling.py"), "--child", "--raw", str(raw), "--size", str(size),
               "--work", str(work), "--device", device, "--repeats", str(repeats)] + (["--train"] if train else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"scaling child for {raw} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(per_class_sizes: list[int], size: int, device: torch.device, tmp: Path, train: bool,
        repeats: int = 3, fmnist_source: Path | None = None) -> list:
    from table import Row

    results = []
    for per_class in per_class_sizes:
        per_class = min(per_class, MAX_PER_CLASS)
        raw = tmp / f"scale-{per_class}" / "raw"
        fetch_s = fetch(per_class, raw, fmnist_source)
        result = run_child(raw, size, tmp / f"scale-{per_class}", str(device), train, repeats)
        shutil.rmtree(tmp / f"scale-{per_class}")  # the largest store is GBs on a GPU machine
        results.append(result | {"per_class": per_class, "fetch_s": fetch_s})

    base = results[0]
    rows = []
    mb = 2**20
    for r in results:
        scale = r["images"] / base["images"]
        label = f"{r['images']:,} images, {size} px"
        timings = [("store build", "store_s"), ("data epoch", "epoch_s")] + (
            [("frozen-head train epoch", "train_s")] if train else [])
        is_base = r is base
        for name, key in timings:
            rows.append(Row("scale", f"{name}, {label}", "s", r[key], base[key] * scale,
                            target="" if is_base else "≤ 1.25× (linear)",
                            met=None if is_base else r[key] <= 1.25 * base[key] * scale,
                            note="the baseline point" if is_base else
                            f"baseline: {base['images']:,}-image time × {scale:g}", extra=r))
        grown_store = r["store_bytes"] - base["store_bytes"]
        for phase, name in (("build", "store build"), ("epoch", "epochs, with training" if train else "epochs")):
            key = f"peak_anon_{phase}_bytes"
            flat = None if is_base else r[key] - base[key] <= 0.1 * grown_store
            rows.append(Row("scale", f"peak anonymous memory ({name}), {label}", "MB", r[key] / mb, base[key] / mb,
                            target="" if is_base else "Δ ≤ 10% of Δstore", met=flat,
                            note=f"store {r['store_bytes'] / mb:,.0f} MB (memmap); "
                                 f"+{(r[key] - r['anon_after_import_bytes']) / mb:.0f} MB over imports"))
        gpu = f"; peak GPU {r['gpu_peak_bytes'] / 2**30:.2f} GiB" if r.get("gpu_peak_bytes") else ""
        rows.append(Row("scale", f"peak RSS, {label}", "MB", r["peak_rss_bytes"] / mb, base["peak_rss_bytes"] / mb,
                        note=f"includes store pages read (page cache){gpu}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", required=True)
    parser.add_argument("--raw", type=Path, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = measure_one_size(args.raw, args.size, args.work, torch.device(args.device), args.train, args.repeats)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
