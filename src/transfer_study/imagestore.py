"""The data of a cell: the split manifest's images decoded and resized once into a
memory-mapped uint8 store, gathered in whole batches (augmentation: transforms.py).

Decoding PNGs with PIL on every epoch is most of the cost of a standard recipe on
small images; here each image is decoded once per (dataset, size) and cached, so
an epoch only gathers rows of a uint8 array. The store is a `.npy` memmap, so
datasets larger than RAM still work.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from .config import UserError
from .transforms import resize_to_input


def store_key(paths: list[str], hashes: list[str], size: int) -> str:
    """A key that changes when any image, the order or the size changes."""
    digest = hashlib.sha256(str(size).encode())
    for path, content_hash in zip(paths, hashes):
        digest.update(f"{path}\0{content_hash}\n".encode())
    return digest.hexdigest()[:16]


def build_store(paths: list[Path], hashes: list[str], size: int, cache_dir: Path) -> np.ndarray:
    """Return an (N, size, size, 3) uint8 memmap of the images, building it once.

    The store is written under a temporary name and renamed when complete, so an
    interrupted build is never mistaken for a finished one.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = store_key([str(p) for p in paths], hashes, size)
    final = cache_dir / f"images-{size}px-{key}.npy"
    if final.exists():
        return np.load(final, mmap_mode="r")
    # Named per process: cells trained at once may build the same store, and a shared temp file
    # truncated by one of them under another's memmap kills that process (SIGBUS).
    partial = final.with_suffix(f".partial-{os.getpid()}.npy")
    store = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))

    def fill(rows: range) -> None:
        for i in rows:
            with Image.open(paths[i]) as img:
                store[i] = resize_to_input(img, size)

    # Chunks, not a task per image: pool.map submits every task at once (~2 KB of heap each),
    # which would make memory grow with the dataset.
    chunks = [range(start, min(start + 256, len(paths))) for start in range(0, len(paths), 256)]
    with ThreadPoolExecutor() as pool:
        list(pool.map(fill, chunks))
    store.flush()
    del store
    os.replace(partial, final)  # atomic: a reader sees the old store or the complete new one
    return np.load(final, mmap_mode="r")


class DeviceImages:
    """A cell's uint8 images and labels where its steps run, gathered into batches by row index.

    On a GPU the whole store is copied to device memory once (1,800 crops at 299 px are 0.5 GB),
    so a batch is one gather on the device: no DataLoader, no host copies, no pinned buffers.
    When it does not fit (RESIDENT_FRACTION of free memory), batches are gathered on the host
    and copied, and `resident` says so. On a CPU the memmap store is used where it lies.
    """

    RESIDENT_FRACTION = 0.5

    def __init__(self, store: np.ndarray, labels: np.ndarray, device: torch.device):
        self.device = device
        host = torch.from_numpy(np.asarray(store)) if store.flags.writeable else _read_only_view(store)
        self.resident = device.type == "cuda" and _fits_on_device(host.numel(), device, self.RESIDENT_FRACTION)
        # NHWC in memory, NCHW in shape: a channels_last view, which is what the models take.
        self.images = (host.to(device) if self.resident else host).permute(0, 3, 1, 2)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).to(device if self.resident else "cpu")

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 (N,3,H,W), labels (N,)) of `rows`, on the training device."""
        rows = rows.to(self.labels.device, non_blocking=True)
        images, labels = self.images[rows], self.labels[rows]
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def batches(self, shards: list[list[int]]):
        """One batch per shard (a list of rows), in order; the rows go to the device in one copy."""
        flat = torch.tensor([row for shard in shards for row in shard], dtype=torch.long)
        flat = flat.to(self.labels.device, non_blocking=True)
        start = 0
        for shard in shards:
            yield self.batch(flat[start:start + len(shard)])
            start += len(shard)

    def in_order(self, rows: np.ndarray, batch_size: int):
        """Batches of `rows` in their order (validation, prediction)."""
        order = [int(r) for r in rows]
        return self.batches([order[i:i + batch_size] for i in range(0, len(order), batch_size)])


def _read_only_view(store: np.ndarray) -> torch.Tensor:
    """A tensor over a read-only memmap without a copy (torch warns, but nothing writes to it)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(store))


def _fits_on_device(nbytes: int, device: torch.device, fraction: float) -> bool:
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes <= fraction * free


class TrainingData:
    """Stores and labels of the train and val (and all) rows, at one image size."""

    def __init__(self, manifest: pd.DataFrame, root: Path, size: int, cache_dir: Path):
        self.class_names = sorted(manifest["label"].unique())
        index = {name: i for i, name in enumerate(self.class_names)}
        self.manifest = manifest.reset_index(drop=True)
        self.labels = self.manifest["label"].map(index).to_numpy()
        paths = [root / p for p in self.manifest["path"]]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise UserError(
                f"{len(missing)} image(s) in the manifest are missing, e.g. '{missing[0]}'; "
                "rerun `dvc repro preprocess split`"
            )
        self.store = build_store(paths, list(self.manifest["sha256"]), size, cache_dir)

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.manifest["split"].to_numpy() == split)

    def on_device(self, device: torch.device) -> DeviceImages:
        """Every row's images and labels where training runs (see DeviceImages)."""
        return DeviceImages(self.store, self.labels, device)
